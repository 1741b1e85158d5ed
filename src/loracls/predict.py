"""Predictions for new data, written as JSONL, CSV or a Kaggle-style `ID,Label` submission.

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
from loracls.build import LoadedRun
from loracls.errors import LoraclsError
from loracls.evaluate import predict_probs, read_for_run
from loracls.rundir import RUN_FILES, RUN_FOLDERS, check_creatable

FORMATS = ("jsonl", "csv", "kaggle")


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


def predict_file(loaded: LoadedRun, source: str, output: str, fmt: str, *, allow_pickle: bool = False,
                 batch_size: int | None = None, text_columns: list[str] | None = None) -> int:
    """Predict every row of `source` and write `output` atomically (batch_size: examples per forward pass, by
    default the run's eval_batch_size).  Returns the number of predictions."""
    if fmt not in FORMATS:
        raise LoraclsError(f"unknown output format {fmt!r}; choose {', '.join(FORMATS)}")
    out = check_output(loaded.run.path, source, output)
    t0 = time.perf_counter()
    examples, token_ids, _ = read_for_run(loaded, source, require_labels=False, allow_pickle=allow_pickle,
                                          text_columns=text_columns, keep_empty=True)
    empty = [not t.strip() for t in examples.texts]
    if any(empty):
        first = examples.rows[empty.index(True)]
        print(f"loracls: {sum(empty)} rows have empty text (the first is row {first}); they are predicted from "
              "the special tokens alone and flagged empty_text", file=sys.stderr)
    t1 = time.perf_counter()
    probs = predict_probs(loaded.model, token_ids, batch_size or loaded.config.train.eval_batch_size)
    t2 = time.perf_counter()
    text = render_predictions(probs, examples.rows, examples.ids, loaded.labels, fmt, empty)
    atomic_write_text(out, text)
    print(f"loracls: read+tokenized {len(examples)} rows in {t1 - t0:.3f} s; inference {t2 - t1:.3f} s "
          f"({len(examples) / max(t2 - t1, 1e-9):.1f} rows/s)", file=sys.stderr)
    return len(examples)


def render_predictions(probs: np.ndarray, rows: list[int], ids: list[str] | None, labels: list[str], fmt: str,
                       empty: list[bool] | None = None) -> str:
    """`id` is the source's id column when it has one, else the 0-based row index; Kaggle's ID is always the row.
    `empty` flags rows whose text was empty."""
    pred = probs.argmax(axis=1)
    empty = empty or [False] * len(rows)
    buf = io.StringIO()
    if fmt == "kaggle":
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["ID", "Label"])
        w.writerows([r, int(p)] for r, p in zip(rows, pred))
        return buf.getvalue()
    keys = ids if ids is not None else rows
    if fmt == "jsonl":
        out = []
        for k, p, pr, e in zip(keys, pred, probs, empty):
            row = {"id": k, "label": labels[p], "label_id": int(p),
                   "probs": {name: float(v) for name, v in zip(labels, pr)}}
            if e:
                row["empty_text"] = True
            out.append(json.dumps(row, ensure_ascii=False) + "\n")
        return "".join(out)
    w = csv.writer(buf, lineterminator="\n")
    flag = any(empty)
    w.writerow(["id", "label", "label_id"] + [f"prob_{name}" for name in labels] + (["empty_text"] if flag else []))
    w.writerows([k, labels[p], int(p)] + [f"{float(v):.6g}" for v in pr] + ([int(e)] if flag else [])
                for k, p, pr, e in zip(keys, pred, probs, empty))
    return buf.getvalue()
