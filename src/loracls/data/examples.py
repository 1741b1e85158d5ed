"""`read_examples`: a source's rows as `Examples` (texts, labels, row numbers, ids), and the validation split."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Any

from loracls.data.columns import decide_header, match_column, resolve_column, select_columns
from loracls.data.common import MISSING, Records, Table, cols_list, fail, number_key
from loracls.data.detect import list_separator
from loracls.data.labels import (Labels, classes_of_lists, map_label_sets, map_labels, read_label_columns,
                                 read_scores, resolve_labels, split_label_lists)
from loracls.data.readers import find_label_names_file, read_source


@dataclass
class Examples:
    """Texts with their labels and where each came from.

    `source`, `skipped_empty` and `reading` describe the read; `subset` keeps them as they are.
    """

    texts: list[str | tuple[str, str]]  # a text, or a text pair (a, b) (reading["text_pair"]; models.tokenize)
    labels: list | None  # per row: a class id (single-label), a 0/1 tuple over the classes (multi-label) or a
    # number (regression); None if the source has no labels
    rows: list[int]  # 0-based index of each kept example among the source's data rows (header, blank lines excluded)
    ids: list[str] | None  # values of the source's id column ('id', 'ID', 'Id', 'guid'), else None
    source: str  # what was read (path or hub name), for messages and reports
    skipped_empty: int = 0  # rows dropped because their text was empty or whitespace only
    reading: dict | None = None  # how the source was read (see `_reading`), for the data summary

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> "Examples":
        idx = list(indices)
        return Examples(
            texts=[self.texts[i] for i in idx],
            labels=None if self.labels is None else [self.labels[i] for i in idx],
            rows=[self.rows[i] for i in idx],
            ids=None if self.ids is None else [self.ids[i] for i in idx],
            source=self.source,
            skipped_empty=self.skipped_empty,
            reading=self.reading,
        )


def read_examples(source: str, *, text_columns: list[str] | None = None, text_pair_columns: list[str] | None = None,
                  label_column: str | None = None, labels: Labels | None = None,
                  label_names: list[str] | None = None, require_labels: bool = True, allow_pickle: bool = False,
                  default_split: str = "train", keep_empty: bool = False, quoting: str = "auto",
                  label_case: str = "check", labels_as_names: bool = False, task: str = "auto",
                  label_columns: list[str] | None = None,
                  label_separator: str | None = None) -> tuple[Examples, Labels]:
    """Read a local file or a hub dataset.  Returns the examples and how their labels map (see `Labels`).

    text_columns: columns joined with one space to form the text (names, or 0-based indices in headerless files);
    None detects them.  label_column: likewise for the label.  text_pair_columns: two columns read as a text pair
    (a, b) instead of text_columns; with neither given, a header naming a known pair (columns.PAIR_NAMES) gives
    one.  labels: the run's label mapping (from its training data); every label is then mapped through it.
    label_names: only the class names (no stored values).
    require_labels=False (prediction) ignores any label column and returns examples with labels=None.
    keep_empty=True keeps rows whose text is empty (prediction answers every row); otherwise they are skipped
    and counted in `skipped_empty`.  quoting, label_case, labels_as_names and task are DataSettings' fields of those
    names (how CSV/TSV quotes are read, how labels equal but for case are treated, values read as class names).
    """
    if labels is not None:
        label_names = labels.names
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        fail("no data source given; pass a file path (e.g. data/train.csv) or a hub dataset name")
    source = str(source)
    if isinstance(text_columns, str):
        text_columns = [c.strip() for c in text_columns.split(",") if c.strip()]
    if text_columns is not None:
        text_columns = [str(c).strip() for c in text_columns]
        if not text_columns or any(not c for c in text_columns):
            fail("the text columns are empty; pass e.g. --text-columns title,description")
    if isinstance(text_pair_columns, str):
        text_pair_columns = text_pair_columns.split(",")
    if text_pair_columns is not None:
        text_pair_columns = [str(c).strip() for c in text_pair_columns]
        if len(text_pair_columns) != 2 or not all(text_pair_columns):
            fail(f"a text pair is two columns, got {text_pair_columns!r}; pass e.g. --text-pair-columns "
                 "sentence1,sentence2")
        if text_columns is not None:
            fail("both text columns and text pair columns are given; pass --text-columns for one text or "
                 "--text-pair-columns for a pair, not both")
    if label_column is not None:
        label_column = str(label_column).strip()
        if not label_column:
            fail("the label column is empty; pass e.g. --label-column label")
    if label_names is not None:
        label_names = [str(n) for n in label_names]
        if not label_names:
            fail("the list of label names is empty; give at least one class name")

    table, local = read_source(source, allow_pickle, default_split, quoting)
    names_file = find_label_names_file(source) if local else None
    if isinstance(label_columns, str):
        label_columns = [c.strip() for c in label_columns.split(",") if c.strip()]
    return _build_examples(table, text_columns=text_columns, pair_columns=text_pair_columns,
                           label_column=label_column, label_names=label_names,
                           label_values=labels.values if labels is not None else None, names_file=names_file,
                           require_labels=require_labels, keep_empty=keep_empty, label_case=label_case,
                           labels_as_names=labels_as_names, task=task, label_columns=label_columns,
                           separator=label_separator)


def split_validation(examples: Examples, fraction: float, seed: int) -> tuple[Examples, Examples]:
    """Hold out round(fraction*n) examples (at least 1 when fraction > 0 and n > 1, and never all of them),
    chosen with a torch.Generator seeded by seed.  Returns (train, validation), each in the original order."""
    import torch

    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        fail(f"the validation fraction must be in [0, 1), got {fraction!r}")
    n = len(examples)
    k = int(round(fraction * n))
    if fraction > 0 and n > 1:
        k = min(max(k, 1), n - 1)
    else:
        k = 0
    if k == 0:
        return examples.subset(range(n)), examples.subset([])
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen).tolist()
    held = set(perm[:k])
    val_idx = sorted(held)
    train_idx = [i for i in range(n) if i not in held]
    return examples.subset(train_idx), examples.subset(val_idx)


def _build_examples(table: Table | Records, *, text_columns, pair_columns, label_column, label_names, label_values,
                    names_file, require_labels, keep_empty=False, label_case="check",
                    labels_as_names=False, task="auto", label_columns=None,
                    separator=None) -> tuple[Examples, Labels]:
    if isinstance(table, Records):
        # at prediction time a named label column may be absent: it does not decide the header then
        label_specs = (label_columns or ([label_column] if label_column else [])) if require_labels else []
        specs = list(text_columns or pair_columns or []) + list(label_specs)
        table = decide_header(table, [c for c in specs if not c.isdigit()], pair=bool(pair_columns))
    src = table.source
    several = [resolve_column(table, c, "label") for c in label_columns] if label_columns and require_labels else []
    text_idx, label_idx, id_idx, why, pair = select_columns(table, text_columns, label_column,
                                                            require_labels and not several, pair_columns, several)
    if several:
        label_idx, why["label"] = several, "from --label-columns"

    # texts; empty or whitespace-only ones (both texts of a pair) are skipped
    keep: list[int] = []
    texts: list[str | tuple[str, str]] = []
    for i, parts in enumerate(zip(*[table.cols[j] for j in text_idx])):
        if not all(type(p) is str for p in parts):
            parts = [_to_text(p, table, i, text_idx) for p in parts]
        text = tuple(parts) if pair else parts[0] if len(parts) == 1 else " ".join(parts)
        if not keep_empty and all(not p or p.isspace() for p in parts):
            continue
        keep.append(i)
        texts.append(text)
    skipped = table.nrows - len(keep)
    if not keep:
        which = cols_list([table.columns[j] for j in text_idx])
        fail(f"all {table.nrows} rows of {src!r} have empty text (column(s) {which}); check the file or choose "
             "other columns with --text-columns")

    ids = None
    if id_idx is not None:
        raw_ids = [_id_text(v) for v in table.cols[id_idx]]
        seen: dict[str, int] = {}
        for i, v in enumerate(raw_ids):
            if v in seen:
                fail(f"duplicate id {v!r} in column {table.columns[id_idx]!r} of {src!r}: {table.loc(seen[v])} and "
                     f"{table.loc(i)}; make the ids unique or remove the id column")
            seen[v] = i
        ids = [raw_ids[i] for i in keep]

    known, origin = (label_names, "the given label names") if label_names is not None else \
        (names_file, "classes.txt" if names_file is not None else None)
    chosen, task_why = task, "--task " + task
    if require_labels:
        read = _LabelRead(table, keep, known, origin, label_values, names_file, label_case, labels_as_names,
                          text_idx)
        chosen, task_why, separator = _task_of_labels(read, label_idx, task, separator)
        if chosen == "regression":  # the label is a number, not a class
            ids_of_labels = read_scores(read.values(label_idx), read.loc, src=src, column=table.columns[label_idx])
            result, note = Labels([column_spec(table, label_idx)]), "read as numbers"
        elif chosen == "multi-label":
            ids_of_labels, result, note = read.label_sets(label_idx, separator)
        else:
            ids_of_labels, result, note = read.classes(label_idx)
    else:
        names = list(known) if known is not None else \
            list(table.format_names.get(table.columns[label_idx], [])) \
            if label_idx is not None and not isinstance(label_idx, list) else []
        result, note = Labels(names, list(label_values) if label_values is not None else None), None
        ids_of_labels, label_idx = None, None
    reading = _reading(table, text_idx, pair, label_idx, why, note, skipped, keep)
    reading.update(task=chosen, task_why=task_why, label_separator=separator)
    examples = Examples(texts=texts, labels=ids_of_labels, rows=keep, ids=ids, source=src, skipped_empty=skipped,
                        reading=reading)
    return examples, result


class _LabelRead:
    """The label cells of one table's kept rows, read as a run's task reads them."""

    def __init__(self, table: Table, keep: list[int], known, origin, label_values, names_file, case, as_names,
                 text_idx):
        self.table, self.keep, self.known, self.origin = table, keep, known, origin
        self.label_values, self.names_file, self.case, self.as_names = label_values, names_file, case, as_names
        self.text_idx = text_idx

    def loc(self, k: int) -> str:
        return self.table.loc(self.keep[k])

    def values(self, j: int) -> list:
        raw = self.table.cols[j]
        return [raw[i] for i in self.keep]

    def classes(self, j: int, values: list | None = None, loc=None) -> tuple[list[int], Labels, str]:
        """One class per value: mapped through the run's classes, or decided from this file."""
        t, column = self.table, self.table.columns[j]
        values = self.values(j) if values is None else values
        loc = loc or self.loc
        format_names = t.format_names.get(column)
        if self.known is not None and self.label_values is not None:
            ids = map_labels(values, loc, src=t.source, column=column, names=self.known, values=self.label_values,
                             format_names=format_names, case=self.case)
            return ids, Labels(list(self.known), list(self.label_values)), "mapped through the run's classes"
        ids, names, vals, note = resolve_labels(
            values, loc, src=t.source, column=column, known=self.known, origin=self.origin,
            format_names=format_names, headerless=not t.header, local=t.local,
            classes_file=self.names_file is not None, case=self.case, as_names=self.as_names,
            hint=_label_column_hint(t, j, self.text_idx))
        return ids, Labels(names, vals), note

    def label_sets(self, j, separator: str | None) -> tuple[list[tuple[int, ...]], Labels, str]:
        """Multi-label: several 0/1 columns (j a list), or one column of label lists, each label one of the
        classes decided from all the lists."""
        t = self.table
        if isinstance(j, list):
            names = [column_spec(t, c) for c in j]
            if self.known is not None and [str(n) for n in self.known] != names:
                fail(f"the label columns of {t.source!r} ({cols_list(names)}) are not the run's labels "
                     f"({cols_list(self.known)}); pass the run's --label-columns in the same order")
            rows = read_label_columns([self.values(c) for c in j], self.loc, src=t.source, columns=names)
            return rows, Labels(names, names), f"{len(names)} 0/1 columns, one per label"
        column = t.columns[j]
        if self.known is not None and self.label_values is not None:
            rows = map_label_sets(self.values(j), self.loc, src=t.source, column=column, names=list(self.known),
                                  values=self.label_values, separator=separator, case=self.case)
            return rows, Labels(list(self.known), list(self.label_values)), "mapped through the run's labels"
        lists = split_label_lists(self.values(j), self.loc, src=t.source, column=column, separator=separator)
        if not any(lists):
            fail(f"no row of {t.source!r} has a label in column {column!r}; a multi-label run needs labels")

        def to_ids(flat, flat_loc):
            ids, labels, note = self.classes(j, flat, flat_loc)
            return ids, len(labels), labels, note

        rows, (labels, note) = classes_of_lists(lists, self.loc, to_ids)
        how = f"lists separated by {separator!r}" if separator else "lists"
        return rows, labels, f"{how}, {note}"


def _task_of_labels(read: _LabelRead, j, task: str, separator: str | None) -> tuple[str, str, str | None]:
    """(the task, why it was chosen, the label separator) for the label column(s) j under data.task `task`:
    auto is multi-label for several label columns, a given separator, JSON lists or a column of separated label
    lists (loracls.data.detect), else single-label."""
    if isinstance(j, list):
        return "multi-label", "several 0/1 label columns (--label-columns)", None
    values = read.values(j)
    if task in ("single-label", "regression"):
        return task, f"--task {task}", separator
    if any(isinstance(v, (list, tuple)) for v in values):
        return "multi-label", "the labels are lists", separator
    if separator is not None:
        return "multi-label", f"labels separated by {separator!r} (--label-separator)", separator
    if task == "multi-label" or not read.as_names:
        strs = [s for s in (v.strip() if isinstance(v, str) else None for v in values) if s]
        found = list_separator(strs, read.case) if strs else None
        if found is not None:
            why = f"--task multi-label, labels separated by {found[0]!r}" if task == "multi-label" else \
                f"the label column holds lists of labels ({found[1]})"
            return "multi-label", why, found[0]
    if task == "multi-label":
        return task, "--task multi-label (one label per row so far: no separator found)", None
    return "single-label", "one label per row", None


def column_spec(table: Table, j: int) -> str:
    """How to name column j so that the same column is found again: its header name, else its 0-based index."""
    name = table.columns[j]
    if table.header and not name.isdigit() and match_column(table.columns, name) == j:
        return name
    return str(j)


def _reading(table: Table, text_idx: list[int], pair: bool, label_idx: int | list[int] | None, why: dict,
             note: str | None, skipped: int, keep: list[int]) -> dict:
    """What was read and how: the facts of the data summary (loracls.data.splits.summary_lines).  text_pair: the
    text columns are a pair (a, b), not joined; label_columns: a multi-label run's 0/1 columns (label_idx a
    list), else None."""
    several = isinstance(label_idx, list)
    dropped = [i for i, _ in zip(sorted(set(range(table.nrows)) - set(keep)), range(3))] if skipped else []
    return {"source": table.source, "layout": table.layout,
            "text_columns": [column_spec(table, j) for j in text_idx], "text_pair": pair,
            "text_why": why.get("text", ""),
            "label_column": None if label_idx is None or several else column_spec(table, label_idx),
            "label_columns": [column_spec(table, j) for j in label_idx] if several else None,
            "label_why": why.get("label", ""), "labels": note,
            "empty_text_rows": skipped, "empty_text_first": [table.loc(i) for i in dropped]}


def _label_column_hint(table: Table, label_idx: int, text_idx: list[int]) -> str:
    """' (column 'stars' holds 4 distinct values)': another column that could be the label, for a refusal."""
    n = min(table.nrows, 2000)
    for j in range(len(table.columns)):
        if j == label_idx or j in text_idx:
            continue
        values = {str(v).strip() for v in table.cols[j][:n]}
        if 2 <= len(values) <= min(50, n // 3) and all(number_key(v) is None or "." not in v for v in values):
            return f" (column {column_spec(table, j)!r} holds {len(values)} distinct values)"
    return ""


def _to_text(v: Any, table: Table, i: int, text_idx: list[int]) -> str:
    if v is None or v is MISSING:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, float) and math.isnan(v):
        return ""
    if isinstance(v, (numbers.Number, bool)):
        return str(v)
    fail(f"{table.loc(i)} of {table.source!r} has a {type(v).__name__} in text column(s) "
         f"{cols_list([table.columns[j] for j in text_idx])}; the text must be a string, choose other columns "
         "with --text-columns")


def _id_text(v: Any) -> str:
    if v is None or v is MISSING:
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return v if isinstance(v, str) else str(v)
