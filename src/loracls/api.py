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

Keywords are the config's field names, the same as the CLI flags with underscores (`max_length=128`, `rank=8`,
`train="data.csv"`); `config=` takes a RunConfig or a YAML path to start from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from loracls.config import RunConfig, field_paths, load_config
from loracls.errors import LoraclsError

__all__ = ["TrainResult", "Predictor", "train", "resume", "load", "export", "plan", "sweep", "make_config"]


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

    def load(self, **kwargs) -> "Predictor":
        return load(self.run_dir, **kwargs)


def train(config: RunConfig | str | Path | None = None, *, overwrite: bool = False, allow_pickle: bool = False,
          progress: bool = True, **overrides: Any) -> TrainResult:
    """Train a run, as `loracls train`; returns its directory and metrics.  The progress bar is tqdm.auto's, so
    it renders as a widget in Jupyter."""
    from loracls.training import train as run_training

    cfg = make_config(config, **overrides)
    run = run_training(cfg, overwrite=overwrite, allow_pickle=allow_pickle, progress=progress)
    return _result(run.path)


def _result(run_dir: Path) -> TrainResult:
    """The run and its metrics; under torchrun only rank 0 has them (the others get metrics None)."""
    from loracls.predict import is_main

    return TrainResult(run_dir, json.loads((run_dir / "metrics.json").read_text()) if is_main() else None)


def resume(run_dir: str | Path, *, allow_pickle: bool = False, progress: bool = True,
           threads: int | None = None) -> TrainResult:
    """Continue an interrupted run, as `loracls train --resume`."""
    from loracls.training import resume as resume_training

    run = resume_training(str(run_dir), allow_pickle=allow_pickle, progress=progress, threads=threads)
    return _result(run.path)


class Predictor:
    """A trained run, ready to classify texts.  `loracls.load()` makes one."""

    def __init__(self, impl):
        self._impl = impl
        self.run_dir: Path = Path(impl.run_dir)
        self.backend: str = impl.backend

    @property
    def labels(self) -> list[str]:
        """Class names; index = label id."""
        return list(self._impl.label_map.names)

    def predict_proba(self, texts: Sequence[str] | str) -> np.ndarray:
        """Class probabilities, float32 [len(texts), len(labels)], in input order."""
        ids, _ = self._impl.tokenize(_texts(texts))
        return self._impl.predict_proba_ids(ids)

    def predict(self, texts: Sequence[str] | str) -> list[dict]:
        """One {"label", "label_id", "probs": {name: p}} per text: `loracls predict`'s JSONL rows without the id."""
        from loracls.predict import prediction_records

        return prediction_records(self.predict_proba(texts), self.labels)

    def evaluate(self, data: str | Path | tuple[Sequence[str], Sequence[Any]], labels: Sequence[Any] | None = None,
                 **read_options: Any) -> dict:
        """Metrics on labelled data: a file or hub dataset (as `loracls evaluate`), or texts with their labels
        (class names or the values the training data used), given as (texts, labels) or data=texts,
        labels=labels."""
        from loracls.metrics import evaluate_probs
        from loracls.predict import evaluate_file

        if isinstance(data, (str, Path)) and labels is None:
            return evaluate_file(self._impl, str(data), **read_options)
        texts, gold = (data, labels) if labels is not None else data
        texts = _texts(texts)
        if len(texts) != len(gold):
            raise LoraclsError(f"{len(texts)} texts but {len(gold)} labels; give one label per text")
        ids = [self._label_id(g) for g in gold]
        return evaluate_probs(self.predict_proba(texts), ids, self.labels)

    def _label_id(self, label: Any) -> int:
        m = self._impl.label_map
        text = str(label).strip()
        for j, (name, value) in enumerate(zip(m.names, m.values or m.names)):
            if text in (name, value):
                return j
        raise LoraclsError(f"label {label!r} is none of the run's classes ({', '.join(m.names)})")

    def __repr__(self) -> str:
        return f"Predictor({str(self.run_dir)!r}, backend={self.backend!r}, labels={self.labels})"


def _texts(texts: Sequence[str] | str) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    out = list(texts)
    bad = next((t for t in out if not isinstance(t, str)), None)
    if bad is not None:
        raise LoraclsError(f"texts must be strings, got a {type(bad).__name__}")
    return out


def load(run_dir: str | Path, backend: str = "auto", device: str = "auto", *, batch_size: int | None = None,
         threads: int | None = None) -> Predictor:
    """A saved run ready for inference.  backend: auto (fast where it can), fast, peft, onnx or onnx-int8 (ONNX
    Runtime; the run is exported into its folder on first use)."""
    from loracls.predict import open_predictor

    return Predictor(open_predictor(run_dir, backend=backend, device=device, batch_size=batch_size,
                                    threads=threads))


def export(run_dir: str | Path, output_dir: str | Path, format: str = "transformers", quantize: str | None = None,
           *, overwrite: bool = False) -> Path:
    """A merged model folder: `transformers` (AutoModelForSequenceClassification / pipeline()) or `onnx`
    (onnxruntime / optimum; quantize="int8" for ONNX Runtime's dynamic int8)."""
    if format == "transformers":
        if quantize is not None:
            raise LoraclsError("quantize applies to format='onnx' only")
        from loracls.exports import export_run

        return export_run(str(run_dir), str(output_dir), overwrite=overwrite)
    if format == "onnx":
        from loracls.onnx_export import export_onnx

        return export_onnx(run_dir, output_dir, quantize=quantize, overwrite=overwrite)
    raise LoraclsError(f"unknown export format {format!r}; choose transformers or onnx")


def plan(model: str, num_labels: int = 4, **lora: Any):
    """The exact trainable-parameter plan of a LoRA setting (keywords: rank, alpha, targets, layers, head,
    rslora, ...), from the model's config.json alone.  `.total` is the trainable count, `.breakdown` per part."""
    from loracls import planning
    from loracls.models import resolve_model_dir

    cfg = make_config(model=model, **lora)
    model_config = planning.read_model_config(resolve_model_dir(cfg.model, need_weights=False),
                                              cfg.trust_remote_code)
    return planning.count(model_config, num_labels, cfg.lora)


def sweep(config: RunConfig | str | Path | None = None, *, budget: int, trials: int = 20,
          time_limit: float | None = None, output_dir: str | Path | None = None, seeds: list[int] | None = None,
          storage: str | None = None, methods: Sequence[str] = ("lora", "dora"), **overrides: Any):
    """Search the most accurate model within `budget` trainable parameters, as `loracls sweep`; returns a
    SweepResult (output_dir, best, leaderboard).  Keywords set the fixed part of every trial."""
    from loracls import search as sweeping

    cfg = make_config(config, **overrides)
    return sweeping.sweep(cfg, budget=budget, trials=trials, time_limit=time_limit, output_dir=output_dir,
                          seeds=seeds, storage=storage, space=sweeping.Space(methods=list(methods)))
