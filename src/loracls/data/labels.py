"""How labels become class ids, decided once from the training data (`Labels`) and applied to every later file.

Integer labels are 0-based, except 1..K in headerless files and 1..K in header files with a classes.txt beside
them (none being 0): those are 1-based.  The run stores what each class's label looked like in the training
data, so a later file that holds only some classes maps the same way.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

from loracls.data.common import INT_RE, MAX_DATA_CLASSES, MISSING, fail, names_list


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


def _name_indexes(names: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Class name -> index, exactly and case-folded (the first of names equal when folded wins)."""
    folded: dict[str, int] = {}
    for j, n in enumerate(names):
        folded.setdefault(n.strip().lower(), j)
    return {n: j for j, n in enumerate(names)}, folded


def label_strings(raw: list, loc: Callable[[int], str], src: str, column: str) -> list[str]:
    out = []
    for i, v in enumerate(raw):
        if isinstance(v, str):
            s = v.strip()
        elif isinstance(v, bool):
            s = str(v)
        elif isinstance(v, numbers.Integral):
            s = str(int(v))
        elif isinstance(v, numbers.Real) and not math.isnan(v):
            if not float(v).is_integer():
                fail(f"{loc(i)} of {src!r} has label {v!r} in column {column!r}; labels must be whole-number class "
                     "ids or class names")
            s = str(int(v))
        elif v is None or v is MISSING or isinstance(v, numbers.Real):
            s = ""
        else:
            fail(f"{loc(i)} of {src!r} has a {type(v).__name__} as label in column {column!r}; labels must be class "
                 "ids or class names")
        if not s:
            fail(f"{loc(i)} of {src!r} has no label in column {column!r}; fill it in or remove the row")
        out.append(s)
    return out


def canonical_int(s: str) -> str:
    """'+1', '1.0', ' 01' -> '1': one spelling per integer label."""
    return str(int(s.strip().split(".", 1)[0]))


def map_labels(raw: list, loc: Callable[[int], str], *, src: str, column: str, names: list[str],
               values: list[str], format_names: list[str] | None) -> list[int]:
    """Class ids of `raw` under a stored mapping: each label is looked up among the training data's values, then
    among the class names (exactly, then ignoring case)."""
    if format_names is not None and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in raw):
        strs = [format_names[v] if 0 <= v < len(format_names) else str(int(v)) for v in raw]
    else:
        strs = label_strings(raw, loc, src, column)
    by_value = {v: j for j, v in enumerate(values)}
    by_name, folded = _name_indexes(names)
    out = []
    for i, s in enumerate(strs):
        key = canonical_int(s) if INT_RE.match(s) else s
        j = by_value.get(key, by_name.get(s, folded.get(s.lower())))
        if j is None:
            fail(f"{loc(i)} of {src!r} has label {s!r}, which is none of the run's {len(names)} classes (labels "
                 f"{names_list(values)}; names {names_list(names)}); fix the label or use the right run")
        out.append(j)
    return out


def resolve_labels(raw: list, loc: Callable[[int], str], *, src: str, column: str, known: list[str] | None,
                   origin: str | None, format_names: list[str] | None, headerless: bool, local: bool,
                   classes_file: bool) -> tuple[list[int], list[str], list[str] | None]:
    """Class ids, class names and the label values (see `Labels`) of one file's labels, decided from the file
    alone.  Values are None where they cannot be told apart from an older run's names (known names, no values)."""
    by_name = False
    if format_names is not None and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in raw):
        k = len(format_names)
        for i, v in enumerate(raw):
            if not 0 <= v < k:
                fail(f"{loc(i)} of {src!r} has label {int(v)}, outside the {k} classes 0..{k - 1} of column "
                     f"{column!r} (unlabelled split?); use a labelled split or fix the data")
        if known is None:
            return [int(v) for v in raw], list(format_names), [str(j) for j in range(k)]
        strs, by_name = [format_names[v] for v in raw], True
    else:
        strs = label_strings(raw, loc, src, column)

    if not by_name and all(INT_RE.match(s) for s in strs):
        vals = [int(s.split(".", 1)[0]) for s in strs]
        lo, hi = min(vals), max(vals)
        k = len(known) if known is not None else None
        one_based = False
        if local and headerless:
            one_based = lo >= 1 and (k is None or hi <= k)
        elif local and classes_file and k:
            one_based = lo >= 1 and hi <= k
        first = 1 if one_based else 0
        if k is not None:
            for i, v in enumerate(vals):
                if not first <= v < k + first:
                    valid = f"1..{k} (or 0..{k - 1})" if local and headerless else f"{first}..{k - 1 + first}"
                    fail(f"{loc(i)} of {src!r} has label {v}, but the valid labels are {valid} "
                         f"({names_list(known)}, from {origin}); fix the label or the label names")
            names = list(known)
        else:
            for i, v in enumerate(vals):
                if v < 0:
                    fail(f"{loc(i)} of {src!r} has label {v}; integer labels must be class ids >= 0 (or use class "
                         "names)")
            if hi >= MAX_DATA_CLASSES:
                i = vals.index(hi)
                fail(f"{loc(i)} of {src!r} has label {hi}, too large for a class id; check that {column!r} is the "
                     "label column (--label-column) or use class names")
            names = [str(j + first) for j in range(hi + 1 - first)]
        values = [str(j + first) for j in range(len(names))]
        return ([v - first for v in vals] if first else vals), names, values

    if known is not None:
        index, folded = _name_indexes(known)
        labels = []
        for i, s in enumerate(strs):
            j = index.get(s)
            if j is None:
                j = folded.get(s.lower())
            if j is None:
                fail(f"{loc(i)} of {src!r} has label {s!r}, which is not one of the {len(known)} label names "
                     f"({names_list(known)}, from {origin}); fix the label or the label names")
            labels.append(j)
        return labels, list(known), list(known)
    names = sorted(set(strs))
    if len(names) > 1000 and len(names) > len(strs) // 2:
        fail(f"column {column!r} of {src!r} has {len(names)} different labels in {len(strs)} rows; it is probably "
             "not the label column, name the right one with --label-column")
    index = {name: j for j, name in enumerate(names)}
    return [index[s] for s in strs], names, list(names)
