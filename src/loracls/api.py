"""The Python API: what the CLI does, as functions for notebooks and scripts.  The CLI is a thin layer over these.

    import loracls

    result = loracls.train(model="path/to/model", train="train.csv", test="test.csv", epochs=1, lr=5e-4)
    result.metrics["test"]["accuracy"]
    clf = loracls.load(result.run_dir)                  # backend "auto", "fast", "peft", "onnx" or "onnx-int8"
    clf.predict(["Stocks rallied on Monday."])          # [{"label": ..., "label_id": ..., "probs": {...}}]
    clf.predict_proba(texts)                            # numpy array [n, K]
    clf.evaluate("test.csv")                            # the metrics dict of `loracls evaluate --json`
    loracls.export(result.run_dir, "exported/", format="onnx", quantize="int8")
    loracls.plan("path/to/model", num_labels=4, rank=8, targets="all-linear").total
    loracls.train(model="path/to/model", train="train.csv", rank="auto", budget=100_000)  # largest rank that fits

Keywords are the config's field names, the same as the CLI flags with underscores (`max_length=128`, `rank=8`,
`train="data.csv"`); `config=` takes a RunConfig or a YAML path to start from.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import numbers
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loracls import search
from loracls.config import RunConfig, field_paths, load_config
from loracls.errors import LoraclsError
from loracls.models import model_config_of
from loracls.rundir import METRICS
from loracls.tasks import task_of

# `plan` without a config or a count of classes: AG News' four, the reference task.
DEFAULT_NUM_LABELS = 4
EXPORT_FORMATS = ("transformers", "onnx")  # the first is export()'s default

__all__ = ["Predictor", "TrainResult", "export", "load", "make_config", "plan", "resume", "serve", "sweep",
           "train"]


# The environment variables transformers and huggingface_hub read when first imported.
_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@contextlib.contextmanager
def quiet_libraries():
    """transformers' and huggingface_hub's own progress bars ("Loading weights", "Writing model shards") and load
    reports (the base model's unused pooler, the new head: expected in every run) off while loracls works, whose
    own output says what happens.  The caller's settings come back after, so a notebook's own use of transformers
    is left as it was.  Imports neither library: ONNX serving starts without them."""
    import logging

    saved_env = {k: os.environ.get(k) for k in _QUIET_ENV}
    os.environ.update(_QUIET_ENV)  # for a first import inside the block
    before = _library_output() if "transformers" in sys.modules else None
    if before is not None:
        _set_library_output(logging.ERROR, bars=False)
    try:
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if "transformers" in sys.modules:  # imported before, or inside the block with the settings above
            level = os.environ.get("TRANSFORMERS_VERBOSITY", "warning").upper()
            bars = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").lower() not in ("1", "true", "yes", "on")
            _set_library_output(*(before or (getattr(logging, level, logging.WARNING), bars)))


def _library_output() -> tuple[int, bool]:
    from transformers.utils import logging as hf_logging

    return hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()


def _set_library_output(level: int, bars: bool) -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity(level)
    # huggingface_hub reads HF_HUB_DISABLE_PROGRESS_BARS once, at its import: when that happened inside the block,
    # turning its bars back on warns that the (by now restored) variable "has priority".
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


# Set while the `loracls` command runs: its errors keep the flags' names alone.
_COMMAND_LINE = contextvars.ContextVar("loracls_command_line", default=False)
# The flags whose keyword is not the flag's own name with underscores.
_KEYWORD_OF_FLAG = {"output": "output_dir", "no-progress": "progress=False", "resume": "loracls.resume(run_dir)",
                    "input": "predict(texts)", "label-column": "label_column"}
_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")


@contextlib.contextmanager
def command_line():
    """Errors worded for the command line, as `loracls` prints them (the CLI runs every command inside)."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def for_python(message: str) -> str:
    """`message` with the keyword of each flag it names, for a caller of the Python API: errors are worded once,
    with the CLI's flags, and every flag is a keyword here (the config's field names, with underscores)."""
    flags = list(dict.fromkeys(_FLAG.findall(message)))
    if not flags:
        return message
    names = ", ".join(f"{_KEYWORD_OF_FLAG.get(f, f.replace('-', '_'))} for --{f}" for f in flags)
    return f"{message} (in Python: {names})"


def _api_call(fn):
    """`fn` run under quiet_libraries(), its LoraclsError worded for Python unless the CLI called it."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with quiet_libraries():
                return fn(*args, **kwargs)
        except LoraclsError as e:
            if _COMMAND_LINE.get() or "(in Python: " in str(e):  # the CLI's, or worded by an outer API call
                raise
            raise LoraclsError(for_python(str(e))) from e.__cause__

    return wrapper


def make_config(config: RunConfig | str | Path | None = None, **overrides: Any) -> RunConfig:
    """A RunConfig from a base (a RunConfig, a YAML path, or the defaults) and field-name keywords."""
    base = config if isinstance(config, RunConfig) else load_config(config) if config is not None else RunConfig()
    paths = field_paths()
    unknown = [k for k in overrides if k not in paths]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], list(paths), n=1)
        raise LoraclsError(f"unknown setting {unknown[0]!r}" + (f"; did you mean {close[0]!r}?" if close else
                                                                  f"; the settings are {', '.join(paths)}"))
    return base.with_overrides({paths[k]: v for k, v in overrides.items()})


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict | None
    """The run's metrics.json (None on the ranks other than 0 of a torchrun job)."""

    def load(self, **kwargs) -> Predictor:
        return load(self.run_dir, **kwargs)


@_api_call
def train(config: RunConfig | str | Path | None = None, *, budget: int | None = None, overwrite: bool = False,
          allow_pickle: bool = False, progress: bool = True, **overrides: Any) -> TrainResult:
    """Train a run, as `loracls train`; returns its directory and metrics.  rank="auto" takes the largest rank
    whose trainable-parameter count fits `budget`; `budget` also becomes max_trainable when that is unset.  The
    progress bar is tqdm.auto's, so it renders as a widget in Jupyter; where stderr is a file or a pipe, a line per
    log point replaces it."""
    from loracls import planning
    from loracls.training import train as run_training

    overrides, auto = _without_auto_rank(overrides)
    cfg = make_config(config, **overrides)
    if auto:
        k, _ = planning.labels_from_data(cfg, hub=True, allow_pickle=allow_pickle)
        cfg = _fit_rank(cfg, budget, task_of(cfg).outputs(k))
    if budget is not None and cfg.max_trainable is None:
        cfg = cfg.with_overrides({"max_trainable": budget})
    run = run_training(cfg, overwrite=overwrite, allow_pickle=allow_pickle, progress=progress)
    return _result(run.path)


def _without_auto_rank(overrides: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The keywords without rank="auto" (a config holds whole ranks only), and whether it was there."""
    auto = overrides.get("rank") == "auto"
    return {k: v for k, v in overrides.items() if not (auto and k == "rank")}, auto


def _fit_rank(cfg: RunConfig, budget: int | None, num_labels: int, model_config=None) -> RunConfig:
    """`cfg` with the largest rank whose trainable count, with a head of `num_labels` outputs, fits `budget`."""
    from loracls import planning

    cfg = planning.with_auto_rank(cfg, model_config or model_config_of(cfg), num_labels, budget)
    print(f"loracls: rank auto picked r={cfg.lora.rank} (budget {budget:,})", file=sys.stderr)
    return cfg


def _result(run_dir: Path) -> TrainResult:
    """The run and its metrics; under torchrun only rank 0 has them (the others get metrics None)."""
    from loracls.predictor import is_main

    return TrainResult(run_dir, json.loads((run_dir / METRICS).read_text()) if is_main() else None)


@_api_call
def resume(run_dir: str | Path, *, allow_pickle: bool = False, progress: bool = True,
           threads: int | None = None) -> TrainResult:
    """Continue an interrupted run, as `loracls train --resume`."""
    from loracls.training import resume as resume_training

    run = resume_training(str(run_dir), allow_pickle=allow_pickle, progress=progress, threads=threads)
    return _result(run.path)


class Predictor:
    """A trained run, ready to classify texts.  `loracls.load()` makes one."""

    def __init__(self, impl):
        self._impl = impl  # evaluate.TorchPredictor or serve.OnnxPredictor: the one holder of the run's state

    @property
    def run_dir(self) -> Path:
        return Path(self._impl.run_dir)

    @property
    def backend(self) -> str:
        """The backend it predicts with (`auto` resolved)."""
        return self._impl.backend

    @property
    def labels(self) -> list[str]:
        """Class names; index = label id."""
        return list(self._impl.label_map.names)

    @property
    def task(self) -> str:
        """The run's task (`single-label`)."""
        return self._impl.task.name

    @property
    def pairs(self) -> bool:
        """Whether the run reads text pairs: then every input is a (text, text_pair) tuple."""
        return self._impl.config.data.text_pair_columns is not None

    def predict_proba(self, texts: Sequence[str] | str) -> np.ndarray:
        """The task's outputs, float32, in input order: class probabilities [len(texts), len(labels)] for
        single-label, the value [len(texts), 1] for regression ([0, width] for no texts)."""
        texts = _texts(texts, pairs=self.pairs)
        if not texts:
            return np.zeros((0, self._impl.task.outputs(len(self.labels))), dtype=np.float32)
        ids, _ = self._impl.tokenize(texts)
        return self._impl.outputs(ids)

    def predict(self, texts: Sequence[str] | str) -> list[dict]:
        """One record per text (or (text, text_pair) tuple): `loracls predict`'s JSONL rows without the id,
        {"label", "label_id", "probs": {name: p}} for single-label, {"value"} for regression.  An empty text is
        predicted from the special tokens alone and flagged `"empty_text": True`, as there."""
        from loracls.prediction_files import is_empty

        texts = _texts(texts, pairs=self.pairs)
        records = self._impl.task.records(self.predict_proba(texts), self.labels)
        for record, text in zip(records, texts):
            if is_empty(text):
                record["empty_text"] = True
        return records

    @_api_call
    def evaluate(self, data: str | Path | tuple[Sequence[str], Sequence[Any]] | Sequence[str],
                 labels: Sequence[Any] | None = None, **read_options: Any) -> dict:
        """Metrics on labelled data: a file or hub dataset (as `loracls evaluate`), or texts with their labels
        (class names, any case, or the values the training data used: 1 and "1" alike; for a multi-label run a
        list of them per text, or one string separated as in training; for a regression numbers), given as
        evaluate((texts, labels)) or evaluate(texts, labels=labels)."""
        from loracls.prediction_files import evaluate_file

        if isinstance(data, (str, Path)) and labels is None:
            return evaluate_file(self._impl, str(data), **read_options)
        texts, gold = _labelled(data, labels, self.pairs)
        task = self._impl.task
        ids = task.read_gold(gold, self._impl.label_map, self._impl.config.data)
        return task.metrics(self.predict_proba(texts), ids, self.labels)

    def __repr__(self) -> str:
        return f"Predictor({str(self.run_dir)!r}, backend={self.backend!r}, labels={self.labels})"


def _labelled(data, labels, pairs: bool = False) -> tuple[list, list]:
    """(texts, labels) from evaluate()'s two spellings; a LoraclsError for anything else, rather than reading
    texts as labels."""
    if labels is None:
        pair = isinstance(data, tuple) and len(data) == 2 and not any(isinstance(x, str) for x in data)
        if not pair:
            raise LoraclsError("evaluate() needs labels with texts: evaluate(texts, labels=[...]) or "
                               "evaluate((texts, labels)), or a labelled data file")
        data, labels = data
    texts = _texts(data, pairs=pairs)
    gold = [labels] if isinstance(labels, (str, numbers.Integral)) else list(labels)
    if len(texts) != len(gold):
        raise LoraclsError(f"{len(texts)} texts but {len(gold)} labels; give one label per text")
    return texts, gold


def _texts(texts, name: str = "texts", pairs: bool = False) -> list:
    """A list of strings from a string or a sequence of them, or for a run on pairs a list of (text, text_pair)
    tuples (a dict {"text", "text_pair"} is one too); a LoraclsError naming the parameter (and the index) for
    anything else, before any of it reaches the tokenizer."""
    if isinstance(texts, str) or pairs and _pair(texts) is not None:
        texts = [texts]
    if texts is None or isinstance(texts, (bytes, dict)) or not isinstance(texts, Iterable):
        what = "a (text, text_pair) tuple or a list of them" if pairs else "a string or a list of strings"
        raise LoraclsError(f"{name} must be {what}, not {_kind(texts)}")
    out = [_pair(t) for t in texts] if pairs else list(texts)
    if pairs:
        bad = next((i for i, t in enumerate(out) if t is None), None)
        if bad is not None:
            raise LoraclsError(f"{name}[{bad}] is {_kind(list(texts)[bad])}; this run reads text pairs: pass "
                               "(text, text_pair) tuples of two strings")
        return out
    bad = next((i for i, t in enumerate(out) if not isinstance(t, str)), None)
    if bad is not None:
        hint = " (this run reads one text, not pairs)" if isinstance(out[bad], tuple) else ""
        raise LoraclsError(f"{name}[{bad}] is {_kind(out[bad])}, not a string{hint}; pass text only (\"\" for an "
                           "empty text)")
    return out


def _pair(item) -> tuple[str, str] | None:
    """(text, text_pair) from a 2-tuple or list of strings, or a dict with those keys; None for anything else."""
    if isinstance(item, dict) and set(item) == {"text", "text_pair"}:
        item = (item["text"], item["text_pair"])
    if isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, str) for x in item):
        return (item[0], item[1])
    return None


def _kind(value: Any) -> str:
    """How an error names a value's type: None, or 'an int', 'a float'."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


@_api_call
def load(run_dir: str | Path, backend: str = "auto", device: str = "auto", *, batch_size: int | None = None,
         threads: int | None = None, precision: str | None = None) -> Predictor:
    """A saved run ready for inference.  backend: auto (fast where it can), fast, peft, onnx or onnx-int8 (ONNX
    Runtime; the run is exported into its folder on first use)."""
    from loracls.predictor import open_predictor

    return Predictor(open_predictor(run_dir, backend=backend, device=device, batch_size=batch_size,
                                    threads=threads, precision=precision))


@_api_call
def export(run_dir: str | Path, output_dir: str | Path, format: str = EXPORT_FORMATS[0],
           quantize: str | None = None, *, overwrite: bool = False) -> Path:
    """A merged model folder: `transformers` (AutoModelForSequenceClassification / pipeline()) or `onnx`
    (onnxruntime / optimum; quantize="int8" for ONNX Runtime's dynamic int8)."""
    if format == "transformers":
        if quantize is not None:
            raise LoraclsError("quantize applies to format='onnx' only")
        from loracls.exports import export_run

        return export_run(str(run_dir), str(output_dir), overwrite=overwrite)
    if format == "onnx":
        from loracls.onnx_export import export_onnx
        from loracls.rundir import absolute_path

        return absolute_path(export_onnx(run_dir, output_dir, quantize=quantize, overwrite=overwrite))
    raise LoraclsError(f"unknown export format {format!r}; choose {' or '.join(EXPORT_FORMATS)}")


@_api_call
def plan(model: str | None = None, num_labels: int | None = None, *, config: RunConfig | str | Path | None = None,
         budget: int | None = None, **lora: Any):
    """The exact trainable-parameter plan of a LoRA setting (keywords: rank, alpha, targets, layers, head,
    rslora, ...; rank="auto" the largest that fits `budget`), from the model's config.json alone.  `.total` is the
    trainable count, `.breakdown` per part.  See plan_inputs for num_labels."""
    from loracls import planning

    cfg, model_config, k = plan_inputs(model, num_labels, config=config, budget=budget, **lora)
    return planning.count(model_config, k, cfg.lora)


def plan_inputs(model: str | None = None, num_labels: int | None = None, *,
                config: RunConfig | str | Path | None = None, budget: int | None = None, **lora: Any):
    """What a plan is counted from: (the RunConfig, the model's config.json, the head's width: the task's outputs
    for num_labels classes).  num_labels None: the classes of `config`'s local training file (never the hub), or
    DEFAULT_NUM_LABELS without a config."""
    from loracls import planning

    if model is None and config is None:
        raise LoraclsError("plan needs a model (--model M) or a config (--config FILE)")
    overrides, auto = _without_auto_rank({"model": model, **lora})
    cfg = make_config(config, **overrides)
    if num_labels is None:
        num_labels = planning.labels_from_data(cfg)[0] if config is not None else DEFAULT_NUM_LABELS
    model_config = model_config_of(cfg)
    task = task_of(cfg)
    if task.has_classes and num_labels < 2:
        raise LoraclsError(f"--num-labels must be at least 2 for a {task.name} task")
    outputs = task.outputs(num_labels)
    if auto:
        cfg = _fit_rank(cfg, budget, outputs, model_config)
    return cfg, model_config, outputs


@_api_call
def sweep(config: RunConfig | str | Path | None = None, *, budget: int, trials: int = search.DEFAULT_TRIALS,
          time_limit: float | None = None, output_dir: str | Path | None = None, seeds: list[int] | None = None,
          storage: str | None = None, progress: bool = False, allow_pickle: bool = False, metric: str | None = None,
          **overrides: Any):
    """Search the most accurate model within `budget` trainable parameters, as `loracls sweep`; returns a
    SweepResult (output_dir, best, leaderboard).  Keywords set the fixed part of every trial; targets, head and
    method, when given, fix those searched dimensions (e.g. method="lora" searches LoRA only).  metric: the
    validation metric trials are chosen on (None: the task's, accuracy, micro F1 or Spearman)."""
    fixed = search.fixed_settings(overrides)
    cfg = make_config(config, **overrides)
    return search.sweep(cfg, budget=budget, trials=trials, time_limit=time_limit, output_dir=output_dir,
                        seeds=seeds, storage=storage, fixed=fixed, progress=progress, allow_pickle=allow_pickle,
                        metric=metric)


@_api_call
def serve(run_dir: str | Path, *, device: str = "auto", threads: int | None = None, **settings: Any) -> None:
    """Serve a run over HTTP, as `loracls serve`, until SIGTERM or Ctrl-C (then the requests in flight finish).
    Keywords are loracls.server.ServerSettings' fields: host, port, backend, max_batch_tokens,
    max_concurrent_requests, max_input_texts, workers, batch_size, payload_limit, log_level.  Blocks; needs
    loracls[serve]."""
    from loracls.server import serve as run_server

    run_server(run_dir, device=device, threads=threads, **settings)
