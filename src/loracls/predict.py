"""Predictions and metrics for files, with any predictor: JSONL, CSV or a Kaggle-style `ID,Label` submission.

A predictor is a saved run ready for inference (`open_predictor`): evaluate.TorchPredictor for the fast and peft
backends, serve.OnnxPredictor for ONNX Runtime.  Each tokenizes like training did and returns probabilities;
this module reads the data with the run's columns and label mapping and writes the files.  It imports no torch,
so ONNX serving stays light.

Every input row gets exactly one output row, in input order.  A row whose text is empty is predicted too (from
the special tokens alone, which is what the model sees) and flagged: `"empty_text": true` in JSONL, an
`empty_text` column in CSV (present when any row is empty), a note on stderr; a Kaggle file keeps its two columns.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from loracls.atomic import atomic_write_text
from loracls.config import BACKEND_CHOICES
from loracls.data import MissingColumn, read_examples, read_options
from loracls.errors import LoraclsError
from loracls.metrics import evaluate_probs
from loracls.report import plural
from loracls.rundir import RUN_FILES, RUN_FOLDERS, check_creatable
from loracls.serve import ONNX_BACKENDS

FORMATS = ("jsonl", "csv", "kaggle")
INFERENCE_BACKENDS = (*BACKEND_CHOICES, *ONNX_BACKENDS)


def open_predictor(run_dir, *, backend: str = "auto", device: str = "auto", batch_size: int | None = None,
                   threads: int | None = None, precision: str | None = None):
    """A saved run ready for inference with `backend` (any backend reads any run); `precision` applies to the
    torch backends (None: the run's setting)."""
    if backend not in INFERENCE_BACKENDS:
        raise LoraclsError(f"unknown backend {backend!r}; choose {', '.join(INFERENCE_BACKENDS)}")
    if backend in ONNX_BACKENDS:
        from loracls.serve import OnnxPredictor

        return OnnxPredictor(run_dir, backend=backend, batch_size=batch_size, threads=threads)
    from loracls.build import use_threads
    from loracls.evaluate import TorchPredictor

    use_threads(threads)
    if under_torchrun():
        from loracls.distributed import world

        device = world().device(device)
    return TorchPredictor.open(run_dir, backend=backend, device=device, batch_size=batch_size, precision=precision)


# These two read torchrun's environment rather than loracls.distributed.world(), which imports torch: ONNX
# serving must start without it.  world() checks the same variables when a job actually joins.
def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main() -> bool:
    """Rank 0 of a torchrun job, or a plain process: the one that writes and prints."""
    return int(os.environ.get("RANK", "0")) == 0


def probabilities(predictor, token_ids: list[list[int]]) -> np.ndarray:
    """predictor's probabilities for every example; under torchrun each rank predicts its share of the rows and
    every rank gets them all, in input order."""
    if not under_torchrun():
        return predictor.predict_proba_ids(token_ids)
    from loracls.distributed import world

    return world().predict(lambda idx: predictor.predict_proba_ids([token_ids[i] for i in idx]), len(token_ids),
                           len(predictor.label_map.names))


def read(predictor, source: str, *, require_labels: bool, max_samples: int | None = None, allow_pickle: bool = False,
         text_columns: list[str] | None = None, label_column: str | None = None, keep_empty: bool = False):
    """Read `source` with the run's columns (or the given ones) and label mapping, and tokenize it like training
    did.  Returns (examples, token ids, number truncated)."""
    options = read_options(predictor.config.data)  # the columns, quoting and label rule training used
    given = {k: v for k, v in (("text_columns", text_columns), ("label_column", label_column)) if v}
    kw = dict(labels=predictor.label_map, require_labels=require_labels, allow_pickle=allow_pickle,
              default_split="test", keep_empty=keep_empty)
    try:
        examples, _ = read_examples(source, **kw, **{**options, **given})
    except MissingColumn:
        if given:
            raise
        # A file laid out unlike the training data (no header, other names) is read with the columns detected in
        # it, as training detects them, and says so; its labels still map through the run's classes.
        examples, _ = read_examples(source, **kw, **{**options, "text_columns": None, "label_column": None})
        if is_main():
            r = examples.reading
            label = f", label {r['label_column']!r}" if require_labels else ""
            print(f"loracls: {source} lacks the run's columns (text {', '.join(options['text_columns'] or [])}); "
                  f"read with its own: text {' + '.join(map(repr, r['text_columns']))} ({r['text_why']}){label}",
                  file=sys.stderr)
    if max_samples is not None and len(examples) > max_samples:
        examples = examples.subset(list(range(max_samples)))
    if examples.skipped_empty and is_main():
        print(f"loracls: skipped {plural(examples.skipped_empty, 'row')} with empty text", file=sys.stderr)
    token_ids, truncated = predictor.tokenize(examples.texts)
    return examples, token_ids, truncated


def evaluate_file(predictor, source: str, *, max_samples: int | None = None, allow_pickle: bool = False,
                  text_columns: list[str] | None = None, label_column: str | None = None) -> dict:
    """Metrics of a run on labelled data (its labels mapped as the run's training data mapped them)."""
    examples, token_ids, truncated = read(predictor, source, require_labels=True, max_samples=max_samples,
                                          allow_pickle=allow_pickle, text_columns=text_columns,
                                          label_column=label_column)
    probs = probabilities(predictor, token_ids)
    metrics = evaluate_probs(probs, examples.labels, predictor.label_map.names)
    metrics["truncated"] = truncated
    metrics["skipped_empty"] = examples.skipped_empty
    return metrics


def check_output(run_dir: str | Path, source: str, output: str) -> Path:
    """Refuse an output path that would overwrite the input or a file of the run, or cannot be written."""
    out = Path(output).absolute()
    if out.is_dir():
        raise LoraclsError(f"output {output!r} is a folder; give a file path with --output")
    check_creatable(out.parent, "the folder of output", "--output")
    if not out.parent.is_dir():
        raise LoraclsError(f"the folder of output {output!r} does not exist; create it first")
    src = Path(source).expanduser()
    if src.exists() and src.resolve() == out.resolve():
        raise LoraclsError(f"--output {output!r} is the input file; write the predictions to another file")
    run = Path(run_dir).resolve()
    target = out.resolve()
    if target.parent == run and target.name in RUN_FILES or any(run / f in target.parents for f in RUN_FOLDERS):
        raise LoraclsError(f"--output {output!r} is a file of the run itself; write the predictions elsewhere")
    return out


def predict_file(predictor, source: str, output: str, fmt: str, *, allow_pickle: bool = False,
                 text_columns: list[str] | None = None) -> int:
    """Predict every row of `source` and write `output` atomically.  Returns the number of predictions."""
    if fmt not in FORMATS:
        raise LoraclsError(f"unknown output format {fmt!r}; choose {', '.join(FORMATS)}")
    out = check_output(predictor.run_dir, source, output)
    t0 = time.perf_counter()
    examples, token_ids, _ = read(predictor, source, require_labels=False, allow_pickle=allow_pickle,
                                  text_columns=text_columns, keep_empty=True)
    empty = [is_empty(t) for t in examples.texts]
    if any(empty) and is_main():
        first = examples.rows[empty.index(True)]
        n = sum(empty)
        print(f"loracls: {plural(n, 'row')} {'has' if n == 1 else 'have'} empty text (the first is row {first}): "
              "predicted from the special tokens alone and flagged empty_text", file=sys.stderr)
    t1 = time.perf_counter()
    probs = probabilities(predictor, token_ids)
    t2 = time.perf_counter()
    if not is_main():
        return len(examples)
    atomic_write_text(out, render_predictions(probs, examples.rows, examples.ids, predictor.label_map.names, fmt,
                                              empty))
    print(f"loracls: read+tokenized {len(examples)} rows in {t1 - t0:.3f} s; inference {t2 - t1:.3f} s "
          f"({len(examples) / max(t2 - t1, 1e-9):.1f} rows/s)", file=sys.stderr)
    return len(examples)


def is_empty(text: str) -> bool:
    """A text the output flags `empty_text`: nothing but whitespace, so the model sees the special tokens alone."""
    return not text.strip()


def prediction_records(probs: np.ndarray, labels: list[str]) -> list[dict]:
    """{"label", "label_id", "probs": {name: p}} per row: what a JSONL line holds besides its id."""
    pred = probs.argmax(axis=1)
    return [{"label": labels[p], "label_id": int(p), "probs": {name: float(v) for name, v in zip(labels, pr)}}
            for p, pr in zip(pred, probs)]


def render_predictions(probs: np.ndarray, rows: list[int], ids: list[str] | None, labels: list[str], fmt: str,
                       empty: list[bool] | None = None) -> str:
    """`id` is the source's id column when it has one, else the 0-based row index; Kaggle's ID is always the row.
    `empty` flags rows whose text was empty."""
    empty = empty or [False] * len(rows)
    keys = ids if ids is not None else rows
    if fmt == "jsonl":
        out = []
        for k, record, e in zip(keys, prediction_records(probs, labels), empty):
            row = {"id": k, **record}
            if e:
                row["empty_text"] = True
            out.append(json.dumps(row, ensure_ascii=False) + "\n")
        return "".join(out)
    pred = probs.argmax(axis=1)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if fmt == "kaggle":
        w.writerow(["ID", "Label"])
        w.writerows([r, int(p)] for r, p in zip(rows, pred))
        return buf.getvalue()
    flag = any(empty)
    w.writerow(["id", "label", "label_id"] + [f"prob_{name}" for name in labels] + (["empty_text"] if flag else []))
    w.writerows([k, labels[p], int(p)] + [f"{float(v):.6g}" for v in pr] + ([int(e)] if flag else [])
                for k, p, pr, e in zip(keys, pred, probs, empty))
    return buf.getvalue()
