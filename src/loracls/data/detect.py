"""What a label column looks like, decided in one place, before its values become classes.

Reading a column's values as the classes of a single-label task is silently wrong when the column holds
something else, so `inspect_labels` looks for these layouts, and `refuse` turns a finding into one line that
names the column, what it looks like and the flag that decides:

    regression target  decimal numbers, not all whole, with many distinct values (STS-B's 0-5 scores)
    row ids            a different value in most rows, or integers that only ever increase
    sparse integers    integer labels whose range would hold far more classes than occur (codes such as 200, 404)
    label lists        values holding ',', ';' or '|' whose parts are labels too ("World,Sports", "Sports,World")
    case variants      labels equal but for case (Business, business, BUSINESS)

`--labels-as-names` reads the values as class names anyway (each distinct value one class); `--label-case`
decides case variants.  The thresholds are conservative: a real class column of any size stays far from them.
`--task regression` reads the column as numbers instead (these checks are for classes only).  Under `--task auto`
a column of label lists makes the run multi-label (`list_separator` finds the separator) rather than a refusal.
"""

from __future__ import annotations

from dataclasses import dataclass

from loracls.data.common import fail, number_key

# More than 20 distinct decimal values is a measurement, not a set of classes: decimal class labels such as
# 0.5-step ratings have 10, and STS-B's scores show over 20 within the first hundred rows.
REGRESSION_MIN_DISTINCT = 20
# A class column repeats its values: one with distinct values in more than half the rows gives classes of about
# one example.  Below 100 distinct values a small file with many small classes (60 intents in 150 rows) is left
# alone; the single-example classes then show in the data summary.
ID_MIN_DISTINCT = 100
ID_MIN_SHARE = 0.5
# Integers that strictly increase over 20 rows are a counter (20+ classes of one example each, in order).
INCREASING_MIN_ROWS = 20
# Integer labels fill the range lo..hi (a subset that lacks a class keeps its place); past 10 empty classes and
# twice the classes that occur, the integers are codes (HTTP statuses, years), not class ids.
SPARSE_MIN_EMPTY = 10
SEPARATORS = (",", ";", "|")


@dataclass(frozen=True)
class Finding:
    """Why a label column cannot be read as classes: what it looks like, and the evidence."""

    kind: str  # "regression target", "row ids", "sparse integers", "label lists", "case variants"
    evidence: str


def _quoted(values, limit: int = 3) -> str:
    return ", ".join(repr(v) for v in list(values)[:limit])


def counter(strs: list[str]) -> Finding | None:
    """Integers that strictly increase over many rows: a row counter, neither classes nor a regression's targets
    (a headerless GLUE file's first column)."""
    keys = [number_key(s) for s in strs]
    if len(strs) < INCREASING_MIN_ROWS or any(k is None or "." in k or "e" in k for k in keys):
        return None
    ints = [int(k) for k in keys]
    if all(a < b for a, b in zip(ints, ints[1:])):
        return Finding("row ids", f"integers increasing from {ints[0]} to {ints[-1]} over {len(ints):,} rows")
    return None


def inspect_labels(strs: list[str], *, case: str, as_names: bool) -> Finding | None:
    """The first layout of `strs` (stripped label strings of one column) that classes would misread, or None."""
    n = len(strs)
    numbers = [number_key(s) for s in strs]
    if not as_names and all(k is not None for k in numbers):
        distinct = sorted(set(numbers), key=float)
        whole = all("." not in k and "e" not in k for k in distinct)
        if not whole and len(distinct) > REGRESSION_MIN_DISTINCT:
            return Finding("regression target", f"{len(distinct):,} distinct decimal values from {distinct[0]} to "
                                                f"{distinct[-1]}, e.g. {_quoted(dict.fromkeys(strs))}")
        if whole:
            ints = [int(k) for k in numbers]
            found = counter(strs)
            if found:
                return found
            span = max(ints) - min(ints) + 1
            if span - len(distinct) > SPARSE_MIN_EMPTY and span > 2 * len(distinct) \
                    and not len(distinct) > max(ID_MIN_DISTINCT, ID_MIN_SHARE * n):
                return Finding("sparse integers", f"{len(distinct)} distinct integers from {min(ints)} to {max(ints)}, "
                                                  f"which would make {span:,} classes, {span - len(distinct):,} "
                                                  "of them empty")
    distinct_strs = set(numbers[i] if numbers[i] is not None else s for i, s in enumerate(strs))
    if not as_names and len(distinct_strs) > max(ID_MIN_DISTINCT, ID_MIN_SHARE * n):
        return Finding("row ids", f"{len(distinct_strs):,} distinct values in {n:,} rows")
    words = [s for s, k in zip(strs, numbers) if k is None]
    if not as_names:
        found = _label_lists(words, case)
        if found:
            return Finding("label lists", found[1])
    if case == "check":
        spellings: dict[str, set[str]] = {}
        for s in words:
            spellings.setdefault(s.casefold(), set()).add(s)
        for group in spellings.values():
            if len(group) > 1:
                return Finding("case variants", _quoted(sorted(group), 4))
    return None


def list_separator(strs: list[str], case: str) -> tuple[str, str] | None:
    """(separator, evidence) where a label column's values are lists of labels, else None."""
    return _label_lists([s for s in strs if number_key(s) is None], case)


def _label_lists(words: list[str], case: str) -> tuple[str, str] | None:
    """(separator, evidence) that labels are separated lists: their parts are labels of their own, the same parts
    come in another order, or a few parts make many combinations.  A single class name with a comma ("Arts,
    Culture") shows none of these."""
    fold = (lambda s: s) if case == "exact" else str.casefold
    values = {fold(s): s for s in words}
    for sep in SEPARATORS:
        lists = {}
        for key, shown in values.items():
            parts = [p.strip() for p in key.split(sep)]
            if len(parts) > 1 and all(parts):
                lists[key] = (shown, frozenset(parts))
        if not lists:
            continue
        singles = {k for k in values if sep not in k}
        for shown, parts in lists.values():
            own = sorted(p for p in parts if p in singles)
            if own:
                return sep, f"{shown!r} holds {len(parts)} labels separated by {sep!r}, and {_quoted(own, 2)} is a " \
                            "label of its own"
        seen: dict[frozenset, str] = {}
        for shown, parts in lists.values():
            if parts in seen:
                return sep, f"{seen[parts]!r} and {shown!r} hold the same labels in another order"
            seen[parts] = shown
        every_part = set().union(*(parts for _, parts in lists.values()))
        if len(lists) >= 3 and len(every_part) < len(lists):
            return sep, f"{len(lists)} combinations of {len(every_part)} labels separated by {sep!r}, e.g. " \
                        f"{_quoted(v for v, _ in lists.values())}"
    return None


def refuse(finding: Finding, *, column: str, src: str, hint: str = "") -> None:
    """Raise the one-line refusal of `finding`, naming the column and the flag that decides.  `hint` (another
    column that could hold the classes) follows --label-column where the column is not a label at all."""
    what = f"column {column!r} of {src!r}"
    if finding.kind == "case variants":
        fail(f"{what} has labels equal but for case ({finding.evidence}); make them one class with --label-case fold, "
             "or keep them apart with --label-case exact")
    if finding.kind == "row ids":
        fail(f"{what} looks like row ids, not classes ({finding.evidence}); name the label column with "
             f"--label-column{hint}, or pass --labels-as-names to make each value a class")
    if finding.kind == "sparse integers":
        fail(f"{what} looks like integer codes, not class ids ({finding.evidence}); pass --labels-as-names to make "
             f"each value a class, or name another label column with --label-column{hint}")
    if finding.kind == "regression target":
        fail(f"{what} looks like a regression target ({finding.evidence}); pass --task regression to predict the "
             "number, pick a class column with --label-column, or pass --labels-as-names to make each value a class")
    fail(f"{what} looks like lists of labels ({finding.evidence}) in a single-label run; pass --task multi-label "
         "to predict any number of labels per text, or --labels-as-names to make each combination a class")
