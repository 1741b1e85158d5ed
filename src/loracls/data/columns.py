"""Which columns hold the text, the label and the ids, and whether a delimited file's first row is a header.

Header rule: if the user named columns by (non-numeric) name, the first row must hold them.  Otherwise the first
row is a header when none of its fields is an integer and every field is a short identifier-like name
(single-column files: only a known name such as `text`), or when a column is all integers below it.

Headerless: an all-integer first column is the label; the text is the other columns that hold text (not only
numbers), joined with one space (AG News: title + " " + description).  Columns may be named by 0-based index
("0", "1,2").  With a header: label from label/labels/class/class index/category/target/y; text from
text/sentence/content/review/document, else title+description, else the single remaining non-numeric non-id
column.  A header that holds both columns of a known pair (PAIR_NAMES: sentence1/sentence2, question/sentence, ...)
gives a text pair instead, before any single text column is looked for; so do --text-pair-columns a,b, by name or
0-based index.  `select_columns` also says how each was chosen, for the data summary.  A column asked for that the
source lacks is a `MissingColumn` error.
"""

from __future__ import annotations

import difflib

from loracls.data.common import (ID_NAMES, IDENT_RE, KNOWN_HEADER_NAMES, LABEL_NAMES, TEXT_NAMES, Records, Table,
                                 cols_list, fail, is_int, is_number, missing_column, norm)
from loracls.errors import LoraclsError

# Headers that name a text pair (GLUE's, SNLI's and the datasets built like them), normalized by norm, in
# priority order.  A header with both columns of one of them is read as that pair, unless columns are given.
PAIR_NAMES = (("sentence1", "sentence2"), ("question", "sentence"), ("question1", "question2"),
              ("premise", "hypothesis"), ("text_a", "text_b"), ("sentence_a", "sentence_b"))


def _by_index(pair: bool) -> str:
    """The flag that names text columns by index, as an example for a refusal."""
    return "--text-pair-columns 7,8" if pair else "--text-columns 1,2"


def decide_header(pending: Records, user_names: list[str], pair: bool = False) -> Table:
    """The Table of a delimited file, its first row taken as a header or as data (see the module docstring).
    pair: the text columns named are a pair's (for the example in a refusal)."""
    records, starts, display = pending.records, pending.starts, pending.source
    first = [f.strip() for f in records[0]]
    if user_names:
        missing = [c for c in user_names if match_column(first, c) is None]
        if missing and not looks_like_header(records):
            missing_column(f"{display!r} has no header row (line {starts[0]} is data), so column {missing[0]!r} "
                           f"cannot be found; name columns by 0-based index instead, e.g. {_by_index(pair)} "
                           "--label-column 0")
        header = True
    else:
        header = looks_like_header(records)
    if header:
        columns = [name if name else f"column{j}" for j, name in enumerate(first)]
        body, body_starts = records[1:], starts[1:]
        if not body:
            fail(f"{display!r} has a header ({cols_list(columns)}) but no data rows; add data rows")
    else:
        columns = [str(j) for j in range(len(first))]
        body, body_starts = records, starts
    cols = [list(c) for c in zip(*body)]
    sample = body[:200]

    def stringy(j: int) -> bool:
        return not all(is_number(r[j]) for r in sample)

    layout = f"{pending.layout}, {'header row' if header else 'no header row'}"
    return Table(source=display, columns=columns, cols=cols, nrows=len(body),
                 loc=lambda i: f"line {body_starts[i]}", header=header, local=True, format_names={},
                 stringy=stringy, layout=layout)


def looks_like_header(records: list[list[str]]) -> bool:
    first = [f.strip() for f in records[0]]
    if any(is_int(f) for f in first):
        return False
    if len(first) == 1:
        return norm(first[0]) in KNOWN_HEADER_NAMES
    named = [f for f in first if f]
    if named and all(IDENT_RE.match(f) and len(f.split()) <= 4 for f in named):
        return True
    # a column of integers under a non-integer first field: that field is a name
    body = records[1:201]
    return bool(body) and any(all(is_int(r[j]) for r in body) for j in range(len(first)))


def match_column(columns: list[str], spec: str) -> int | None:
    if spec in columns:
        return columns.index(spec)
    hits = [j for j, c in enumerate(columns) if norm(c) == norm(spec)]
    return hits[0] if len(hits) == 1 else None


def resolve_column(table: Table, spec: str, what: str) -> int:
    """The index of the column `spec` names (by header name, or 0-based index); a `MissingColumn` error naming
    `what` the column was for otherwise."""
    src, columns = table.source, table.columns
    ncols = len(columns)
    if table.header:
        j = match_column(columns, spec)
        if j is not None:
            return j
        if spec.isdigit() and int(spec) < ncols:
            return int(spec)
        close = difflib.get_close_matches(spec, columns, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        missing_column(f"{what} column {spec!r} is not in {src!r}{hint}; available columns: "
                       f"{cols_list(columns)}")
    if not spec.isdigit():
        missing_column(f"{src!r} has no header row, so {what} column {spec!r} cannot be found; name columns by "
                       f"0-based index instead, e.g. {_by_index(what == 'text pair')} --label-column 0")
    if int(spec) >= ncols:
        missing_column(f"{what} column index {spec} is out of range for {src!r}, which has {ncols} columns "
                       f"(0..{ncols - 1}); give a 0-based column index")
    return int(spec)


def select_columns(table: Table, text_columns, label_column, require_labels, pair_columns=None, exclude=()):
    """Return (text column indices, label column index or None, id column index or None, why, pair), where why
    says how the text and label columns were chosen: {"text": ..., "label": ...}, and pair is True when the two
    text columns are a text pair (given as pair_columns, or found by their names) rather than joined.  `exclude`:
    columns never detected as text, label or id (a multi-label run's 0/1 label columns)."""
    src, columns = table.source, table.columns
    ncols = len(columns)
    exclude = set(exclude)

    def resolve(spec: str, what: str) -> int:
        return resolve_column(table, spec, what)

    text_idx = [resolve(c, "text") for c in text_columns] if text_columns else None
    why = {"text": "from --text-columns" if text_columns else "", "label": ""}
    pair = bool(pair_columns)
    if pair:
        text_idx = [resolve(c, "text pair") for c in pair_columns]
        why["text"] = "from --text-pair-columns"
    label_idx = None
    if label_column:
        try:
            label_idx = resolve(label_column, "label")
            why["label"] = "from --label-column"
        except LoraclsError:
            if require_labels:
                raise  # at prediction time a missing label column is fine; detection below may still find one
    id_idx = None

    if table.header:
        names = [norm(c) for c in columns]
        if label_idx is None:
            for name in LABEL_NAMES:
                hits = [j for j, n in enumerate(names) if n == name and j not in (text_idx or []) and j not in exclude]
                if hits:
                    label_idx = hits[0]
                    why["label"] = "found by its name"
                    break
        for j, n in enumerate(names):
            if n in ID_NAMES and j != label_idx and j not in (text_idx or []) and j not in exclude:
                id_idx = j
                break
        if require_labels and label_idx is None:
            fail(f"{src!r} has no label column (columns: {cols_list(columns)}); name it with --label-column, "
                 "or call it 'label'")
        taken = {label_idx, id_idx} | exclude
        if text_idx is None:
            for a, b in PAIR_NAMES:
                if a in names and b in names and not {names.index(a), names.index(b)} & taken:
                    text_idx, pair = [names.index(a), names.index(b)], True
                    why["text"] = "found by their names"
                    break
        if text_idx is None:
            for name in TEXT_NAMES:
                hits = [j for j, n in enumerate(names) if n == name and j not in taken]
                if hits:
                    text_idx = [hits[0]]
                    why["text"] = "found by its name"
                    break
            if text_idx is None and "title" in names and "description" in names:
                text_idx = [names.index("title"), names.index("description")]
                why["text"] = "found by their names"
            if text_idx is None:
                cands = [j for j in range(ncols) if j not in taken and table.stringy(j)]
                if len(cands) == 1:
                    text_idx = cands
                    why["text"] = "the only column of text"
                elif not cands:
                    fail(f"no text column found in {src!r} (columns: {cols_list(columns)}); name it with "
                         "--text-columns")
                else:
                    fail(f"several columns of {src!r} could hold the text ({cols_list([columns[j] for j in cands])}); "
                         "choose with --text-columns (a comma list is joined with spaces), or --text-pair-columns a,b "
                         "for a text pair")
    else:
        if label_idx is None and ncols > 1 and (text_idx is None or 0 not in text_idx) and 0 not in exclude \
                and all(is_int(v) for v in table.cols[0]):
            label_idx = 0
            why["label"] = "no header: the integer first column"
        if text_idx is None:
            # Numbers (row ids, scores) are never text: joining them in would hide a misread column.
            others = [j for j in range(ncols) if j != label_idx and j not in exclude]
            text_idx = [j for j in others if table.stringy(j)] or others
            why["text"] = f"no header: every {'other ' if label_idx is not None else ''}column" + \
                (" holding text" if len(text_idx) < len(others) else "")
            if not text_idx:
                fail(f"{src!r} has only the label column; give a file with a text column")

    if require_labels and label_idx is None:
        fail(f"{src!r} has no header and no integer label column first; give the label column's 0-based index "
             "with --label-column (e.g. 0), or add a header with a 'label' column")
    if label_idx is not None and label_idx in text_idx:
        fail(f"column {columns[label_idx]!r} of {src!r} is both the label and a text column; choose different "
             "columns with --text-columns/--label-column")
    return text_idx, label_idx, id_idx, why, pair
