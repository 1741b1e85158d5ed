"""Predictions for new data, written as JSONL, CSV or a Kaggle-style `ID,Label` submission."""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

from loracls.data import read_examples
from loracls.errors import LoraclsError
from loracls.evaluate import LoadedRun, evaluate_probs, predict_probs
from loracls.models import tokenize
from loracls.rundir import atomic_write_text

FORMATS = ("jsonl", "csv", "kaggle")


def read_for_run(loaded: LoadedRun, source: str, *, require_labels: bool, max_samples: int | None = None,
                 allow_pickle: bool = False):
    """Read `source` with the run's text/label columns and class names, and tokenize it like training did."""
    d = loaded.config.data
    examples, _ = read_examples(source, text_columns=d.text_columns, label_column=d.label_column,
                                label_names=loaded.labels, require_labels=require_labels, allow_pickle=allow_pickle,
                                default_split="test")
    if max_samples is not None and len(examples) > max_samples:
        examples = examples.subset(list(range(max_samples)))
    if examples.skipped_empty:
        print(f"loracls: skipped {examples.skipped_empty} rows with empty text", file=sys.stderr)
    token_ids, truncated = tokenize(loaded.tokenizer, examples.texts, d.max_length)
    return examples, token_ids, truncated


def evaluate_run(loaded: LoadedRun, source: str, *, max_samples: int | None = None, allow_pickle: bool = False,
                 batch_size: int | None = None) -> dict:
    examples, token_ids, truncated = read_for_run(loaded, source, require_labels=True, max_samples=max_samples,
                                                  allow_pickle=allow_pickle)
    probs = predict_probs(loaded.model, token_ids, batch_size or loaded.config.train.eval_batch_size)
    metrics = evaluate_probs(probs, examples.labels, loaded.labels)
    metrics["truncated"] = truncated
    metrics["skipped_empty"] = examples.skipped_empty
    return metrics


def predict_file(loaded: LoadedRun, source: str, output: str, fmt: str, *, allow_pickle: bool = False,
                 batch_size: int | None = None) -> int:
    """Predict every row of `source` and write `output` atomically (batch_size: examples per forward pass, by
    default the run's eval_batch_size).  Returns the number of predictions."""
    if fmt not in FORMATS:
        raise LoraclsError(f"unknown output format {fmt!r}; choose {', '.join(FORMATS)}")
    out = Path(output)
    if out.is_dir():
        raise LoraclsError(f"output {output!r} is a folder; give a file path with --output")
    if not out.parent.is_dir():
        raise LoraclsError(f"the folder of output {output!r} does not exist; create it first")
    t0 = time.perf_counter()
    examples, token_ids, _ = read_for_run(loaded, source, require_labels=False, allow_pickle=allow_pickle)
    t1 = time.perf_counter()
    probs = predict_probs(loaded.model, token_ids, batch_size or loaded.config.train.eval_batch_size)
    t2 = time.perf_counter()
    text = render_predictions(probs, examples.rows, examples.ids, loaded.labels, fmt)
    atomic_write_text(out, text)
    print(f"loracls: read+tokenized {len(examples)} rows in {t1 - t0:.3f} s; inference {t2 - t1:.3f} s "
          f"({len(examples) / max(t2 - t1, 1e-9):.1f} rows/s)", file=sys.stderr)
    return len(examples)


def render_predictions(probs: np.ndarray, rows: list[int], ids: list[str] | None, labels: list[str], fmt: str) -> str:
    """`id` is the source's id column when it has one, else the 0-based row index; Kaggle's ID is always the row."""
    pred = probs.argmax(axis=1)
    buf = io.StringIO()
    if fmt == "kaggle":
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["ID", "Label"])
        w.writerows([r, int(p)] for r, p in zip(rows, pred))
        return buf.getvalue()
    keys = ids if ids is not None else rows
    if fmt == "jsonl":
        return "".join(json.dumps({"id": k, "label": labels[p], "label_id": int(p),
                                   "probs": {name: float(v) for name, v in zip(labels, pr)}}, ensure_ascii=False) + "\n"
                       for k, p, pr in zip(keys, pred, probs))
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "label", "label_id"] + [f"prob_{name}" for name in labels])
    w.writerows([k, labels[p], int(p)] + [f"{float(v):.6g}" for v in pr] for k, p, pr in zip(keys, pred, probs))
    return buf.getvalue()
