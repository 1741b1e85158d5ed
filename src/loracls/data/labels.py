"""How labels become class ids, decided once from the training data (`Labels`) and applied to every later file.

One rule for every command: `label_key` is how any two labels are compared (numbers by value, letters without
case unless data.label_case is exact), in training, in its validation and test files, and in `evaluate` and
`predict`.  Integer labels are class ids that start at their smallest value (stars 1-4: four classes "1".."4";
0-based data: "0".."K-1"); with class names beside the data (classes.txt) 1..K is 1-based and 0..K-1 0-based.
Before a column's values become classes, loracls.data.detect refuses the columns they would misread.  The run
stores what each class's label looked like in the training data, so a later file that holds only some classes
maps the same way.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from loracls.data.common import INT_RE, MAX_DATA_CLASSES, MISSING, fail, names_list, number_key
from loracls.data.detect import counter, inspect_labels, refuse


@dataclass(frozen=True)
class Labels:
    """How labels map to class ids, decided once from the training data and stored in the run.

    names:  class names, index = id (from classes.txt, the dataset's ClassLabel, or the data itself).
    values: the label as the training data wrote it, index = id: "1" for AG News' World (1-based integers), "0"
            for a 0-based dataset, the name itself for named labels.  A later file's label is looked up among
            the values first, then among the names, so a file holding only some classes maps as training did.
            None for runs written before loracls stored it: then each file's integers are read as 0- or 1-based
            on their own.
    """

    names: list[str]
    values: list[str] | None = None

    def __len__(self) -> int:
        return len(self.names)


def label_key(label: str, case: str) -> str:
    """The form in which two labels are compared, by every command: '3.200' and '3.2' (or '01' and '1') are one
    label, and so are 'World' and 'world' unless case is "exact" (data.label_case)."""
    s = str(label).strip()
    key = number_key(s)
    if key is not None:
        return key
    return s if case == "exact" else s.casefold()


def label_strings(raw: list, loc: Callable[[int], str], src: str, column: str) -> list[str]:
    """Each label as a stripped string (a JSON 3.5 reads like the text "3.5"); an empty label is an error."""
    out = []
    for i, v in enumerate(raw):
        if isinstance(v, str):
            s = v.strip()
        elif isinstance(v, bool):
            s = str(v)
        elif isinstance(v, numbers.Integral):
            s = str(int(v))
        elif isinstance(v, numbers.Real) and not math.isnan(v):
            if not math.isfinite(v):
                fail(f"{loc(i)} of {src!r} has label {v!r} in column {column!r}; labels must be class ids or class "
                     "names")
            s = str(int(v)) if float(v).is_integer() else repr(float(v))
        elif v is None or v is MISSING or isinstance(v, numbers.Real):
            s = ""
        else:
            fail(f"{loc(i)} of {src!r} has a {type(v).__name__} as label in column {column!r}; labels must be class "
                 "ids or class names")
        if not s:
            fail(f"{loc(i)} of {src!r} has no label in column {column!r}; fill it in or remove the row")
        out.append(s)
    return out


def _key_index(keys_of: list[tuple[int, str]], case: str) -> dict[str, int]:
    """label_key -> class id, the first listed winning."""
    index: dict[str, int] = {}
    for j, label in keys_of:
        index.setdefault(label_key(label, case), j)
    return index


def map_labels(raw: list, loc: Callable[[int], str], *, src: str, column: str, names: list[str],
               values: list[str], format_names: list[str] | None, case: str = "check") -> list[int]:
    """Class ids of `raw` under a stored mapping: each label is looked up, by `label_key`, among the training
    data's values, then among the class names."""
    if format_names is not None and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in raw):
        strs = [format_names[v] if 0 <= v < len(format_names) else str(int(v)) for v in raw]
    else:
        strs = label_strings(raw, loc, src, column)
    by_value = _key_index(list(enumerate(values)), case)
    by_name = _key_index(list(enumerate(names)), case)
    out = []
    for i, s in enumerate(strs):
        key = label_key(s, case)
        j = by_value.get(key, by_name.get(key))
        if j is None:
            fail(f"{loc(i)} of {src!r} has label {s!r}, which is none of the run's {len(names)} classes (labels "
                 f"{names_list(values)}; names {names_list(names)}); fix the label or use the right run")
        out.append(j)
    return out


# How spreadsheets and pandas write a missing value.  Among numeric labels such a cell is no class name.
MISSING_MARKERS = {"nan", "na", "n/a", "null", "none", "#n/a"}


def refuse_missing_markers(strs: list[str], loc: Callable[[int], str], *, src: str, column: str) -> None:
    """One line naming the first row whose label is a missing-value marker ('nan', 'N/A', ...) where every other
    label is a number: a missing label, as an empty cell is, not a class of its own."""
    missing = [i for i, s in enumerate(strs) if s.casefold() in MISSING_MARKERS]
    if missing and len(missing) < len(strs) and all(
            number_key(s) is not None for s in strs if s.casefold() not in MISSING_MARKERS):
        i = missing[0]
        fail(f"{loc(i)} of {src!r} has {strs[i]!r} in label column {column!r}, a missing value among numeric labels "
             f"({len(missing):,} rows); fill in those labels or drop the rows")


def read_scores(raw: list, loc: Callable[[int], str], *, src: str, column: str) -> list[float]:
    """A regression's targets: each label as a finite number; anything else is one line naming its row."""
    strs = label_strings(raw, loc, src, column)
    found = counter(strs)
    if found is not None:
        fail(f"column {column!r} of {src!r} looks like row ids, not a regression's targets ({found.evidence}); "
             "name the column of the targets with --label-column")
    out = []
    for i, s in enumerate(strs):
        try:
            v = float(s)
        except ValueError:
            v = math.nan
        if not math.isfinite(v):
            fail(f"{loc(i)} of {src!r} has {s!r} in label column {column!r}, which is not a number; a regression "
                 "needs a number in every row: fix the row, or pick another task with --task")
        out.append(v)
    return out


def split_label_lists(raw: list, loc: Callable[[int], str], *, src: str, column: str,
                      separator: str | None) -> list[list[str]]:
    """Each row's labels for a multi-label run: a JSON list's items, or the cell split at `separator`, each
    stripped.  An empty cell (or list) is a row with no labels."""
    out = []
    for i, v in enumerate(raw):
        if isinstance(v, (list, tuple)):
            items = label_strings(list(v), lambda _: loc(i), src, column) if v else []
        elif v is None or v is MISSING or (isinstance(v, float) and math.isnan(v)) or \
                (isinstance(v, str) and not v.strip()):
            items = []
        else:
            (s,) = label_strings([v], lambda _: loc(i), src, column)
            items = [p.strip() for p in s.split(separator)] if separator else [s]
            if not all(items):
                fail(f"{loc(i)} of {src!r} has an empty label in {s!r} (column {column!r}, labels separated by "
                     f"{separator!r}); remove the stray separator")
        out.append(items)
    return out


def multi_hot(lists: list[list[int]], k: int) -> list[tuple[int, ...]]:
    """Rows of class-id lists as 0/1 tuples of width k, a multi-label run's labels."""
    rows = []
    for ids in lists:
        row = [0] * k
        for j in ids:
            row[j] = 1
        rows.append(tuple(row))
    return rows


def map_label_sets(raw: list, loc: Callable[[int], str], *, src: str, column: str, names: list[str],
                   values: list[str], separator: str | None, case: str = "check") -> list[tuple[int, ...]]:
    """A multi-label run's labels of `raw` (lists, or cells separated by `separator`) under its stored mapping,
    as 0/1 tuples over its classes."""
    lists = split_label_lists(raw, loc, src=src, column=column, separator=separator)
    rows, _ = classes_of_lists(lists, loc, lambda flat, flat_loc: (map_labels(
        flat, flat_loc, src=src, column=column, names=names, values=values, format_names=None, case=case),
        len(names)))
    return rows


def classes_of_lists(lists: list[list[str]], loc: Callable[[int], str], to_ids):
    """Each row's list of labels as a 0/1 tuple: `to_ids(labels, loc)` reads every row's labels as one column
    (`loc` naming the row each came from) and returns (class ids, number of classes, *anything else*).  Returns
    (the rows, the rest of what to_ids returned)."""
    owner = [k for k, items in enumerate(lists) for _ in items]
    ids, k, *rest = to_ids([item for items in lists for item in items], lambda i: loc(owner[i]))
    grouped: list[list[int]] = [[] for _ in lists]
    for row, j in zip(owner, ids):
        grouped[row].append(j)
    return multi_hot(grouped, k), rest


def read_label_columns(cols: list[list], loc: Callable[[int], str], *, src: str,
                       columns: list[str]) -> list[tuple[int, ...]]:
    """A multi-label run's labels from several 0/1 columns, one per label: each cell 0 or 1 (true/false, 0.0/1.0
    too); anything else is one line naming the row and column."""
    yes, no = {"1", "true", "yes"}, {"0", "false", "no"}
    rows: list[list[int]] = [[] for _ in cols[0]] if cols else []
    for column, values in zip(columns, cols):
        for i, s in enumerate(label_strings(values, loc, src, column)):
            key = number_key(s) or s.casefold()
            if key not in yes | no:
                fail(f"{loc(i)} of {src!r} has {s!r} in label column {column!r}; each of --label-columns holds 0 or 1 "
                     "(the label applies or not): fix the row, or name other columns")
            rows[i].append(1 if key in yes else 0)
    return [tuple(r) for r in rows]


def resolve_labels(raw: list, loc: Callable[[int], str], *, src: str, column: str, known: list[str] | None,
                   origin: str | None, format_names: list[str] | None, headerless: bool, local: bool,
                   classes_file: bool, case: str = "check", as_names: bool = False,
                   hint: str = "") -> tuple[list[int], list[str], list[str] | None, str]:
    """Class ids, class names, the label values (see `Labels`) and a note on how they were read, for one file's
    labels decided from the file alone (and `known` names, if any).  `hint` ends a refusal's --label-column."""
    by_name = False
    if format_names is not None and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in raw):
        k = len(format_names)
        for i, v in enumerate(raw):
            if not 0 <= v < k:
                fail(f"{loc(i)} of {src!r} has label {int(v)}, outside the {k} classes 0..{k - 1} of column "
                     f"{column!r} (unlabelled split?); use a labelled split or fix the data")
        if known is None:
            return [int(v) for v in raw], list(format_names), [str(j) for j in range(k)], \
                "class ids 0..{} named by the dataset".format(k - 1)
        strs, by_name = [format_names[v] for v in raw], True
    else:
        strs = label_strings(raw, loc, src, column)
        refuse_missing_markers(strs, loc, src=src, column=column)

    if known is not None:
        return _with_known_names(strs, loc, src=src, column=column, known=known, origin=origin, by_name=by_name,
                                 headerless=headerless, local=local, classes_file=classes_file, case=case)
    finding = inspect_labels(strs, case=case, as_names=as_names)
    if finding is not None:
        refuse(finding, column=column, src=src, hint=hint)

    if not as_names and all(INT_RE.match(s) for s in strs):
        vals = [int(s.split(".", 1)[0]) for s in strs]
        lo, hi = min(vals), max(vals)
        for i, v in enumerate(vals):
            if v < 0:
                fail(f"{loc(i)} of {src!r} has label {v}; integer labels must be class ids >= 0 (or use class "
                     "names)")
        if hi >= MAX_DATA_CLASSES:
            i = vals.index(hi)
            fail(f"{loc(i)} of {src!r} has label {hi}, too large for a class id; check that {column!r} is the "
                 "label column (--label-column) or use class names")
        # Class ids start at the smallest label: stars 1-4 are four classes, not five with an empty "0".
        names = [str(v) for v in range(lo, hi + 1)]
        note = f"integer class ids {lo}..{hi}" if lo != hi else f"integer class id {lo}"
        return [v - lo for v in vals], names, list(names), note

    keys = [label_key(s, case) for s in strs]
    spellings: dict[str, Counter] = {}
    for key, s in zip(keys, strs):
        spellings.setdefault(key, Counter())[s] += 1
    # A class is named by its most frequent spelling; numbers sort by value, names alphabetically.
    numeric = all(number_key(s) is not None for s in strs)
    order = sorted(spellings, key=float if numeric else (lambda k: min(spellings[k])))
    # One spelling per number ('3.2', whichever of '3.2' and '3.200' came first).
    names = list(order) if numeric else [spellings[k].most_common(1)[0][0] for k in order]
    index = {k: j for j, k in enumerate(order)}
    merged = sum(len(c) - 1 for c in spellings.values()) if not numeric else 0
    note = "numbers read as class names, by value" if numeric else "class names" + \
        (f" ({merged} other spellings folded in by --label-case fold)" if merged else "")
    return [index[k] for k in keys], names, list(names), note


def _with_known_names(strs: list[str], loc, *, src, column, known, origin, by_name, headerless, local,
                      classes_file, case) -> tuple[list[int], list[str], list[str] | None, str]:
    """Labels read against class names given beside the data (classes.txt) or by the caller."""
    if not by_name and all(INT_RE.match(s) for s in strs):
        vals = [int(s.split(".", 1)[0]) for s in strs]
        lo, hi = min(vals), max(vals)
        k = len(known)
        one_based = lo >= 1 and hi <= k and local and (headerless or classes_file)
        first = 1 if one_based else 0
        for i, v in enumerate(vals):
            if not first <= v < k + first:
                valid = f"1..{k} (or 0..{k - 1})" if local and headerless else f"{first}..{k - 1 + first}"
                fail(f"{loc(i)} of {src!r} has label {v}, but the valid labels are {valid} "
                     f"({names_list(known)}, from {origin}); fix the label or the label names")
        values = [str(j + first) for j in range(k)]
        return [v - first for v in vals], list(known), values, \
            f"integer class ids {first}..{k - 1 + first} named by {origin}"
    index = _key_index(list(enumerate(known)), case)
    labels = []
    for i, s in enumerate(strs):
        j = index.get(label_key(s, case))
        if j is None:
            fail(f"{loc(i)} of {src!r} has label {s!r}, which is not one of the {len(known)} label names "
                 f"({names_list(known)}, from {origin}); fix the label or the label names")
        labels.append(j)
    return labels, list(known), list(known), f"class names from {origin}"
