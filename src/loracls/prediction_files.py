"""Predictions and metrics for files, with any predictor (loracls.predictor): JSONL, CSV or a Kaggle-style
`ID,Label` submission.

A predictor tokenizes like training did and returns its task's outputs; this module reads the data with the run's
columns and label mapping, and writes the files in the task's row format.  It imports no torch, so ONNX serving
stays light.

Every input row gets exactly one output row, in input order.  A row whose text is empty is predicted too (from
the special tokens alone, which is what the model sees) and flagged: `"empty_text": true` in JSONL, an
`empty_text` column in CSV (present when any row is empty), a note on stderr; a Kaggle file keeps its two columns.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

from loracls.atomic import atomic_write_text
from loracls.data import read_options, read_with_columns
from loracls.errors import LoraclsError
from loracls.report import plural
from loracls.rundir import RUN_FILES, RUN_FOLDERS, check_creatable
from loracls.predictor import Predictor, is_main, under_torchrun

FORMATS = ("jsonl", "csv", "kaggle")


def outputs(predictor: Predictor, token_ids: list[list[int]]) -> np.ndarray:
    """predictor's outputs (its task's: class probabilities for single-label) for every example; under torchrun
    each rank predicts its share of the rows and every rank gets them all, in input order."""
    if not under_torchrun():
        return predictor.outputs(token_ids)
    from loracls.distributed import world

    return world().predict(lambda idx: predictor.outputs([token_ids[i] for i in idx]), len(token_ids),
                           predictor.task.outputs(len(predictor.label_map.names)))


def read(predictor, source: str, *, require_labels: bool, max_samples: int | None = None, allow_pickle: bool = False,
         text_columns: list[str] | None = None, text_pair_columns: list[str] | None = None,
         label_column: str | None = None, keep_empty: bool = False):
    """Read `source` with the run's columns (or the given ones) and label mapping, and tokenize it like training
    did.  Returns (examples, token ids, number truncated)."""
    options = read_options(predictor.config.data)  # the columns, quoting and label rule training used
    pairs = options["text_pair_columns"] is not None
    if text_columns and pairs or text_pair_columns and not pairs:
        raise LoraclsError(f"the run reads {'text pairs' if pairs else 'one text per row'}: name its "
             f"{'pair with --text-pair-columns a,b' if pairs else 'text with --text-columns'}, as it was trained")
    given = {k: v for k, v in (("text_columns", text_columns), ("text_pair_columns", text_pair_columns),
                               ("label_column", label_column)) if v}
    kw = dict(labels=predictor.label_map, require_labels=require_labels, allow_pickle=allow_pickle,
              default_split="test", keep_empty=keep_empty)
    examples, note = read_with_columns(source, {**options, **given}, detect_if_missing=not given, **kw)
    if note is not None and is_main():
        print(f"loracls: {note}", file=sys.stderr)
    if max_samples is not None and len(examples) > max_samples:
        examples = examples.subset(list(range(max_samples)))
    if examples.skipped_empty and is_main():
        print(f"loracls: skipped {plural(examples.skipped_empty, 'row')} with empty text", file=sys.stderr)
    token_ids, truncated = predictor.tokenize(examples.texts)
    return examples, token_ids, truncated


def evaluate_file(predictor, source: str, *, max_samples: int | None = None, allow_pickle: bool = False,
                  text_columns: list[str] | None = None, text_pair_columns: list[str] | None = None,
                  label_column: str | None = None) -> dict:
    """Metrics of a run on labelled data (its labels mapped as the run's training data mapped them)."""
    examples, token_ids, truncated = read(predictor, source, require_labels=True, max_samples=max_samples,
                                          allow_pickle=allow_pickle, text_columns=text_columns,
                                          text_pair_columns=text_pair_columns, label_column=label_column)
    metrics = predictor.task.metrics(outputs(predictor, token_ids), examples.labels, predictor.label_map.names)
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
                 text_columns: list[str] | None = None, text_pair_columns: list[str] | None = None) -> int:
    """Predict every row of `source` and write `output` atomically.  Returns the number of predictions."""
    if fmt not in FORMATS:
        raise LoraclsError(f"unknown output format {fmt!r}; choose {', '.join(FORMATS)}")
    out = check_output(predictor.run_dir, source, output)
    t0 = time.perf_counter()
    examples, token_ids, _ = read(predictor, source, require_labels=False, allow_pickle=allow_pickle,
                                  text_columns=text_columns, text_pair_columns=text_pair_columns, keep_empty=True)
    empty = [is_empty(t) for t in examples.texts]
    if any(empty) and is_main():
        first = examples.rows[empty.index(True)]
        n = sum(empty)
        print(f"loracls: {plural(n, 'row')} {'has' if n == 1 else 'have'} empty text (the first is row {first}): "
              "predicted from the special tokens alone and flagged empty_text", file=sys.stderr)
    t1 = time.perf_counter()
    values = outputs(predictor, token_ids)
    t2 = time.perf_counter()
    if not is_main():
        return len(examples)
    records = predictor.task.records(values, predictor.label_map.names)
    atomic_write_text(out, render_predictions(predictor.task, records, examples.rows, examples.ids,
                                              predictor.label_map.names, fmt, empty))
    print(f"loracls: read+tokenized {len(examples)} rows in {t1 - t0:.3f} s; inference {t2 - t1:.3f} s "
          f"({len(examples) / max(t2 - t1, 1e-9):.1f} rows/s)", file=sys.stderr)
    return len(examples)


def is_empty(text: str | tuple[str, str]) -> bool:
    """A text (or both texts of a pair) the output flags `empty_text`: nothing but whitespace, so the model sees
    the special tokens alone."""
    return all(not t.strip() for t in ((text,) if isinstance(text, str) else text))


def render_predictions(task, records: list[dict], rows: list[int], ids: list[str] | None, labels: list[str], fmt: str,
                       empty: list[bool] | None = None) -> str:
    """The task's prediction records as a file.  `id` is the source's id column when it has one, else the 0-based
    row index; Kaggle's ID is always the row.  `empty` flags rows whose text was empty."""
    empty = empty or [False] * len(rows)
    keys = ids if ids is not None else rows
    if fmt == "jsonl":
        out = []
        for k, record, e in zip(keys, records, empty):
            row = {"id": k, **record}
            if e:
                row["empty_text"] = True
            out.append(json.dumps(row, ensure_ascii=False) + "\n")
        return "".join(out)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if fmt == "kaggle":
        w.writerow(["ID", "Label"])
        w.writerows([r, task.kaggle_value(record)] for r, record in zip(rows, records))
        return buf.getvalue()
    flag = any(empty)
    w.writerow(["id"] + task.csv_header(labels) + (["empty_text"] if flag else []))
    w.writerows([k] + task.csv_cells(record, labels) + ([int(e)] if flag else [])
                for k, record, e in zip(keys, records, empty))
    return buf.getvalue()
