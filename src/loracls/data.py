"""Read labelled (or unlabelled) text from a local file or a hub dataset into `Examples`.

Local formats, by extension: .csv, .tsv, .txt (comma, tab, or one text per line), .jsonl/.json, .parquet
(needs pyarrow) and .pkl/.pickle (only with allow_pickle=True).  Anything else that looks like `name`,
`owner/name` or `owner/name:split` and is not an existing path is loaded with `datasets.load_dataset`.

Every problem a user can cause (missing file, bad encoding, ragged rows, unknown label, ...) raises a
`LoraclsError` with a one-line message naming the problem, where it is (line number) and the fix.  Nothing is
returned until the whole source has been read and checked.

Detection rules, in short (see `read_examples`):
  * CSV header: if the user named columns by (non-numeric) name, the first row must hold them.  Otherwise the
    first row is a header when none of its fields is an integer and every field is a short identifier-like
    name (single-column files: only a known name such as `text`), or when a column is all integers below it.
  * Headerless: an all-integer first column is the label; the text is the other columns joined with one
    space (AG News: title + " " + description).  Columns may be named by 0-based index ("0", "1,2").
  * Header: label from label/labels/class/class index/category/target/y; text from text/sentence/content/
    review/document, else title+description, else the single remaining non-numeric non-id column.
  * Integer labels are 0-based, except 1..K in headerless files and 1..K in header files with a classes.txt
    beside them (none being 0): those are 1-based.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import itertools
import json
import math
import numbers
import os
import pickle
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from loracls.errors import LoraclsError

DELIMITED_EXTENSIONS = {".csv": ",", ".tsv": "\t", ".txt": None}
JSON_EXTENSIONS = (".jsonl", ".json", ".ndjson")
PARQUET_EXTENSIONS = (".parquet",)
PICKLE_EXTENSIONS = (".pkl", ".pickle")
KNOWN_EXTENSIONS = (*DELIMITED_EXTENSIONS, *JSON_EXTENSIONS, *PARQUET_EXTENSIONS, *PICKLE_EXTENSIONS)
SUPPORTED_HINT = "use .csv, .tsv, .txt, .jsonl, .json or .parquet (or .pkl with --allow-pickle)"

# Column names, normalized by _norm (lower case, runs of spaces/underscores/hyphens -> "_"), in priority order.
LABEL_NAMES = ("label", "labels", "class", "class_index", "category", "target", "y")
TEXT_NAMES = ("text", "sentence", "content", "review", "document")
ID_NAMES = ("id", "guid")
# Names that make a single-column first row a header (a multi-column one only needs identifier-like fields).
KNOWN_HEADER_NAMES = frozenset(
    LABEL_NAMES + TEXT_NAMES + ID_NAMES
    + ("title", "description", "body", "headline", "question", "answer", "comment", "tweet", "message",
       "sentence1", "sentence2", "summary", "abstract", "label_text", "texts", "sentences", "idx", "index"))
LABEL_NAMES_FILES = ("classes.txt", "labels.txt")

_INT_RE = re.compile(r"[+-]?[0-9]+(?:\.0*)?\Z")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_ \-]{0,39}\Z")
_HUB_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*(?:/[A-Za-z0-9][A-Za-z0-9_.\-]*)?(?::.+)?\Z")
_MISSING = object()  # a JSON record without a key
_MAX_DATA_CLASSES = 100_000  # integer labels above this are not class ids


@dataclass
class Examples:
    """Texts with their labels and where each came from.

    `source` and `skipped_empty` describe the read; `subset` keeps them as they are.
    """

    texts: list[str]
    labels: list[int] | None  # 0-based class ids into the label names; None if the source has no labels
    rows: list[int]  # 0-based index of each kept example among the source's data rows (header, blank lines excluded)
    ids: list[str] | None  # values of the source's id column ('id', 'ID', 'Id', 'guid'), else None
    source: str  # what was read (path or hub name), for messages and reports
    skipped_empty: int = 0  # rows dropped because their text was empty or whitespace only

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
        )


# ---------------------------------------------------------------------------------------------------------------
# public API


def read_examples(source: str, *, text_columns: list[str] | None = None, label_column: str | None = None,
                  label_names: list[str] | None = None, require_labels: bool = True, allow_pickle: bool = False,
                  default_split: str = "train") -> tuple[Examples, list[str]]:
    """Read a local file or a hub dataset.  Returns the examples and the label names (class names, index = id).

    text_columns: columns joined with one space to form the text (names, or 0-based indices in headerless files);
    None detects them.  label_column: likewise for the label.  label_names: the known classes (e.g. those of a
    trained model); labels are then checked against them.  require_labels=False (prediction) ignores any label
    column and returns labels=None.
    """
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        _fail("no data source given; pass a file path (e.g. data/train.csv) or a hub dataset name")
    source = str(source)
    if isinstance(text_columns, str):
        text_columns = [c.strip() for c in text_columns.split(",") if c.strip()]
    if text_columns is not None:
        text_columns = [str(c).strip() for c in text_columns]
        if not text_columns or any(not c for c in text_columns):
            _fail("the text columns are empty; pass e.g. --text-columns title,description")
    if label_column is not None:
        label_column = str(label_column).strip()
        if not label_column:
            _fail("the label column is empty; pass e.g. --label-column label")
    if label_names is not None:
        label_names = [str(n) for n in label_names]
        if not label_names:
            _fail("the list of label names is empty; give at least one class name")

    path = Path(source).expanduser()
    try:
        exists = path.exists()
    except (OSError, ValueError):  # e.g. a NUL character or an overlong name
        exists = False
    if exists or _path_like(source):
        table = _read_local(path, source, allow_pickle)
        names_file = find_label_names_file(str(path)) if path.is_file() else None
    elif _HUB_RE.match(source):
        table = _read_hub(source, default_split)
        names_file = None
    else:
        _fail(f"file {source!r} does not exist; check the path (or give a hub dataset name such as ag_news:test)")
    return _build_examples(table, text_columns=text_columns, label_column=label_column, label_names=label_names,
                           names_file=names_file, require_labels=require_labels)


def split_validation(examples: Examples, fraction: float, seed: int) -> tuple[Examples, Examples]:
    """Hold out round(fraction*n) examples (at least 1 when fraction > 0 and n > 1, and never all of them),
    chosen with a torch.Generator seeded by seed.  Returns (train, validation), each in the original order."""
    import torch

    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        _fail(f"the validation fraction must be in [0, 1), got {fraction!r}")
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


def find_label_names_file(source: str) -> list[str] | None:
    """Class names from classes.txt (or labels.txt) beside a local file, one per line (line 1 = class 0)."""
    try:
        p = Path(str(source)).expanduser()
        if not p.is_file():
            return None
        for name in LABEL_NAMES_FILES:
            f = p.parent / name
            if f.is_file() and f.resolve() != p.resolve():
                return _read_names_file(f)
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------------------------------------------
# small helpers


def _fail(message: str):
    raise LoraclsError(" ".join(str(message).splitlines()))


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", "_", str(name).strip().lower())


def _is_int(s) -> bool:
    return isinstance(s, str) and _INT_RE.match(s.strip()) is not None


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except (TypeError, ValueError):
        return False


def _cols_list(columns: list[str]) -> str:
    return ", ".join(repr(c) for c in columns)


def _names_list(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _path_like(source: str) -> bool:
    if os.sep in source or (os.altsep and os.altsep in source):
        # 'owner/name' (one slash, no known extension) is a hub name, not a path
        if not (_HUB_RE.match(source) and source.count("/") == 1 and not _has_known_ext(source)):
            return True
    return source.startswith((".", "~")) or _has_known_ext(source)


def _has_known_ext(source: str) -> bool:
    return Path(source).suffix.lower() in KNOWN_EXTENSIONS


def _line_of_offset(data: bytes, pos: int) -> int:
    head = data[:pos]
    return head.count(b"\n") + head.count(b"\r") - head.count(b"\r\n") + 1


def _read_names_file(f: Path) -> list[str]:
    data = _read_bytes(f, str(f))
    text = _decode(data, str(f))
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        _fail(f"label names file {str(f)!r} is empty; write one class name per line (line 1 = class 0) or delete it")
    for i, name in enumerate(lines):
        if not name:
            _fail(f"line {i + 1} of label names file {str(f)!r} is blank; write one class name per line, no gaps")
        if name in lines[:i]:
            _fail(f"label names file {str(f)!r} lists {name!r} twice (lines {lines.index(name) + 1} and {i + 1}); "
                  "make the class names unique")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# reading sources into a _Table


@dataclass
class _Table:
    """Column-major data of one source, before column selection."""

    source: str
    columns: list[str]  # header names; "0".."n-1" when header is False
    cols: list[list]  # cols[j][i]: value of column j in data row i
    nrows: int
    loc: Callable[[int], str]  # data row index -> "line 5" / "row 5" / "item 5"
    header: bool  # False: headerless delimited file, columns are addressed by 0-based index
    local: bool
    format_names: dict[str, list[str]]  # ClassLabel names carried by the data (hub, HF parquet, pickled Dataset)
    stringy: Callable[[int], bool] | None = None  # column j holds text (not numbers)


def _read_local(path: Path, display: str, allow_pickle: bool) -> _Table:
    if not path.exists():
        hint = ""
        try:
            if path.parent.is_dir():
                close = difflib.get_close_matches(path.name, [p.name for p in path.parent.iterdir()], n=1)
                if close:
                    hint = f" (did you mean {str(path.parent / close[0])!r}?)"
        except OSError:
            pass
        _fail(f"file {display!r} does not exist{hint}; check the path")
    if path.is_dir():
        _fail(f"{display!r} is a directory, not a file; give the path of a data file inside it "
              f"(e.g. {os.path.join(display, 'train.csv')!r})")
    ext = path.suffix.lower()
    if ext in DELIMITED_EXTENSIONS:
        return _read_delimited(path, display, DELIMITED_EXTENSIONS[ext])
    if ext in JSON_EXTENSIONS:
        return _read_json(path, display, ext)
    if ext in PARQUET_EXTENSIONS:
        return _read_parquet(path, display)
    if ext in PICKLE_EXTENSIONS:
        return _read_pickle(path, display, allow_pickle)
    _fail(f"{display!r} has an unsupported file type {ext or '(no extension)'!r}; {SUPPORTED_HINT}")


def _read_bytes(path: Path, display: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except PermissionError:
        _fail(f"cannot read {display!r}: permission denied; check the file's permissions (e.g. chmod +r)")
    except IsADirectoryError:
        _fail(f"{display!r} is a directory, not a file; give the path of a data file inside it")
    except OSError as e:
        _fail(f"cannot read {display!r} ({e.strerror or _short(e)}); check the path and the file")


def _check_not_empty(data: bytes, display: str):
    if not data.strip():
        _fail(f"{display!r} is empty; give a file with data rows")


def _decode(data: bytes, display: str, *, check_nul: bool = True) -> str:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        _fail(f"{display!r} is UTF-16 text; save it as UTF-8")
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    if check_nul:
        nul = data.find(b"\x00")
        if nul >= 0:
            _fail(f"{display!r} contains a NUL byte on line {_line_of_offset(data, nul)}, so it is binary or not "
                  "UTF-8 (UTF-16?); save it as UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        _fail(f"line {_line_of_offset(data, e.start)} of {display!r} is not valid UTF-8 (byte 0x{data[e.start]:02x}); "
              "re-save the file as UTF-8")


def _parse_csv(text: str, delimiter: str, limit_records: int | None = None):
    """Parse into records (blank lines dropped) and the physical line each record starts on."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    records, starts, last = [], [], 0
    for rec in reader:
        start, last = last + 1, reader.line_num
        if not rec:
            continue
        records.append(rec)
        starts.append(start)
        if limit_records is not None and len(records) >= limit_records:
            break
    return records, starts, last


def _consistent(records: list[list[str]]) -> bool:
    """At least 2 fields per record and the same number in all records (the last may be cut by sampling)."""
    body = records[:-1] if len(records) > 1 else records
    return bool(body) and len(body[0]) >= 2 and all(len(r) == len(body[0]) for r in body)


def _sample_text(text: str, n_lines: int = 50) -> str:
    return "".join(itertools.islice(io.StringIO(text, newline=""), n_lines))


_DELIM_WORDS = {"\t": "tab", ";": "semicolon", ",": "comma"}


def _read_delimited(path: Path, display: str, delimiter: str | None) -> _Table:
    data = _read_bytes(path, display)
    _check_not_empty(data, display)
    text = _decode(data, display)
    _raise_field_size_limit()
    sample = _sample_text(text)
    if delimiter is None:  # .txt: tab, comma, or one text per line
        for cand in ("\t", ","):
            if _consistent(_parse_csv(sample, cand)[0]):
                delimiter = cand
                break
    if delimiter is None:
        records, starts = [], []
        for i, line in enumerate(text.split("\n")):
            line = line[:-1] if line.endswith("\r") else line
            if line:
                records.append([line])
                starts.append(i + 1)
        last_line = text.count("\n") + 1
    else:
        first = _parse_csv(sample, delimiter, limit_records=1)[0]
        if first and len(first[0]) == 1:
            for alt in ("\t", ";", ","):
                if alt != delimiter and _consistent(_parse_csv(sample, alt)[0]):
                    fix = {"\t": "rename it to .tsv", ",": "rename it to .csv"}.get(
                        alt, "save it with commas (or with tabs, as .tsv)")
                    _fail(f"{display!r} looks {_DELIM_WORDS[alt]}-separated, not {_DELIM_WORDS[delimiter]}-separated "
                          f"(each line is one field); {fix}")
        try:
            records, starts, last_line = _parse_csv(text, delimiter)
        except csv.Error as e:
            _fail(f"{display!r} is not valid {_DELIM_WORDS[delimiter]}-separated text ({_short(e)}); fix the quoting")
        if records and last_line > starts[-1]:
            _check_closed_quote(text, delimiter, starts[-1], display)
    if not records:
        _fail(f"{display!r} is empty; give a file with data rows")
    width = len(records[0])
    for rec, line in zip(records, starts):
        if len(rec) != width and not (len(rec) == 1 and not rec[0].strip()):
            hint = ""
            if delimiter == "," and any(c in sample.split("\n", 1)[0] for c in "\t;"):
                hint = " (is the file really comma-separated?)"
            _fail(f"line {line} of {display!r} has {len(rec)} fields but line {starts[0]} has {width}{hint}; "
                  "fix that row (quote fields that contain the separator or quotes)")
    keep = [i for i, rec in enumerate(records) if len(rec) == width]
    if len(keep) != len(records):
        records = [records[i] for i in keep]
        starts = [starts[i] for i in keep]
    return _Pending(display, records, starts)


def _check_closed_quote(text: str, delimiter: str, start_line: int, display: str):
    """A quoted field left open swallows the rest of the file into the last record; find it."""
    lines = io.StringIO(text, newline="").readlines()
    tail = "".join(lines[start_line - 1:])
    try:
        list(csv.reader(io.StringIO(tail, newline=""), delimiter=delimiter, strict=True))
    except csv.Error as e:
        if "unexpected end of data" in str(e):
            _fail(f"line {start_line} of {display!r} opens a quoted field that is never closed; "
                  "add the missing closing quote (\")")


def _raise_field_size_limit():
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 10


class _Pending:
    """A delimited file whose header row is not decided yet (that depends on the user's column names)."""

    def __init__(self, display: str, records: list[list[str]], starts: list[int]):
        self.source, self.records, self.starts = display, records, starts

    def resolve(self, user_names: list[str]) -> _Table:
        records, starts, display = self.records, self.starts, self.source
        first = [f.strip() for f in records[0]]
        if user_names:
            missing = [c for c in user_names if _match_column(first, c) is None]
            if missing and not _looks_like_header(records):
                _fail(f"{display!r} has no header row (line {starts[0]} is data), so column {missing[0]!r} cannot be "
                      f"found; name columns by 0-based index instead, e.g. --text-columns 1,2 --label-column 0")
            header = True
        else:
            header = _looks_like_header(records)
        if header:
            columns = [name if name else f"column{j}" for j, name in enumerate(first)]
            body, body_starts = records[1:], starts[1:]
            if not body:
                _fail(f"{display!r} has a header ({_cols_list(columns)}) but no data rows; add data rows")
        else:
            columns = [str(j) for j in range(len(first))]
            body, body_starts = records, starts
        cols = [list(c) for c in zip(*body)]
        sample = body[:200]

        def stringy(j: int) -> bool:
            return not all(_is_number(r[j]) for r in sample)

        return _Table(source=display, columns=columns, cols=cols, nrows=len(body),
                      loc=lambda i: f"line {body_starts[i]}", header=header, local=True, format_names={},
                      stringy=stringy)


def _looks_like_header(records: list[list[str]]) -> bool:
    first = [f.strip() for f in records[0]]
    if any(_is_int(f) for f in first):
        return False
    if len(first) == 1:
        return _norm(first[0]) in KNOWN_HEADER_NAMES
    named = [f for f in first if f]
    if named and all(_IDENT_RE.match(f) and len(f.split()) <= 4 for f in named):
        return True
    # a column of integers under a non-integer first field: that field is a name
    body = records[1:201]
    return bool(body) and any(all(_is_int(r[j]) for r in body) for j in range(len(first)))


def _match_column(columns: list[str], spec: str) -> int | None:
    if spec in columns:
        return columns.index(spec)
    hits = [j for j, c in enumerate(columns) if _norm(c) == _norm(spec)]
    return hits[0] if len(hits) == 1 else None


def _records_table(display: str, records: list[dict], loc: Callable[[int], str], format_names=None) -> _Table:
    keys: dict[str, None] = {}
    for r in records:
        for k in r:
            keys.setdefault(str(k), None)
    columns = list(keys)
    cols = [[r.get(k, _MISSING) for r in records] for k in columns]
    return _columns_table(display, columns, cols, loc, local=True, format_names=format_names or {})


def _columns_table(display: str, columns: list[str], cols: list[list], loc: Callable[[int], str], *,
                   local: bool, format_names: dict[str, list[str]]) -> _Table:
    if not columns:
        _fail(f"{display!r} has no columns; give data with a text column (and a label column for training)")
    nrows = len(cols[0])
    for name, col in zip(columns, cols):
        if len(col) != nrows:
            _fail(f"column {name!r} of {display!r} has {len(col)} values but column {columns[0]!r} has {nrows}; "
                  "give columns of equal length")
    if nrows == 0:
        _fail(f"{display!r} has no rows; give a file with data rows")

    def stringy(j: int) -> bool:
        return any(isinstance(v, str) for v in cols[j][:200])

    return _Table(source=display, columns=columns, cols=cols, nrows=nrows, loc=loc, header=True, local=local,
                  format_names=format_names, stringy=stringy)


def _read_json(path: Path, display: str, ext: str) -> _Table:
    data = _read_bytes(path, display)
    _check_not_empty(data, display)
    text = _decode(data, display, check_nul=False)
    head = text.lstrip()[:1]
    if head == "[" or (ext == ".json" and head == "{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if head == "[":
                _fail(f"{display!r} is not valid JSON ({e.msg} at line {e.lineno}); fix the syntax there")
            obj = None  # maybe JSON lines after all
        if isinstance(obj, list):
            for i, r in enumerate(obj):
                if not isinstance(r, dict):
                    _fail(f"item {i + 1} of {display!r} is a {type(r).__name__}, not an object; give a list of "
                          "objects such as {\"text\": ..., \"label\": ...}")
            if not obj:
                _fail(f"{display!r} is an empty JSON list; give a file with data rows")
            return _records_table(display, obj, lambda i: f"item {i + 1}")
        if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
            return _columns_table(display, [str(k) for k in obj], list(obj.values()), lambda i: f"row {i + 1}",
                                  local=True, format_names={})
        if isinstance(obj, dict):  # one object, maybe spread over several lines
            return _records_table(display, [obj], lambda i: "line 1")
    records, lines = [], []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            _fail(f"line {n} of {display!r} is not valid JSON ({e.msg}, column {e.colno}); fix that line "
                  "(each line must be one JSON object)")
        if not isinstance(rec, dict):
            _fail(f"line {n} of {display!r} is a JSON {type(rec).__name__}, not an object; write one object "
                  "such as {\"text\": ..., \"label\": ...} per line")
        records.append(rec)
        lines.append(n)
    if not records:
        _fail(f"{display!r} is empty; give a file with data rows")
    return _records_table(display, records, lambda i: f"line {lines[i]}")


def _hf_features_names(features: Any) -> dict[str, list[str]]:
    """ClassLabel names from a datasets Features object or its JSON form."""
    out: dict[str, list[str]] = {}
    if features is None:
        return out
    try:
        items = features.items()
    except AttributeError:
        return out
    for name, feat in items:
        names = feat.get("names") if isinstance(feat, dict) else getattr(feat, "names", None)
        kind = feat.get("_type") if isinstance(feat, dict) else type(feat).__name__
        if kind == "ClassLabel" and isinstance(names, (list, tuple)) and names:
            out[str(name)] = [str(n) for n in names]
    return out


def _read_parquet(path: Path, display: str) -> _Table:
    _read_bytes(path, display)  # permission and readability check with a clear message
    try:
        import pyarrow.parquet as pq
    except ImportError:
        _fail(f"reading {display!r} needs pyarrow; pip install pyarrow (or loracls[parquet]), or convert the file "
              "to CSV or JSONL")
    try:
        table = pq.read_table(str(path))
    except Exception as e:  # pyarrow raises several types for corrupt files
        _fail(f"cannot read {display!r} as Parquet ({_short(e)}); check that it is a valid Parquet file")
    format_names = {}
    meta = table.schema.metadata or {}
    if b"huggingface" in meta:
        try:
            info = json.loads(meta[b"huggingface"].decode("utf-8"))
            format_names = _hf_features_names(info.get("info", {}).get("features"))
        except (ValueError, AttributeError):
            format_names = {}
    data = table.to_pydict()
    return _columns_table(display, [str(k) for k in data], list(data.values()), lambda i: f"row {i + 1}",
                          local=True, format_names=format_names)


def _read_pickle(path: Path, display: str, allow_pickle: bool) -> _Table:
    if not allow_pickle:
        _fail(f"{display!r} is a pickle, and unpickling runs code from the file; pass --allow-pickle only if you "
              "trust it, or convert it to CSV, JSONL or Parquet")
    data = _read_bytes(path, display)
    _check_not_empty(data, display)
    warnings.warn(f"unpickling {display!r} runs code from the file; only do this for files you trust",
                  UserWarning, stacklevel=3)
    try:
        obj = pickle.loads(data)
    except ImportError as e:
        _fail(f"cannot unpickle {display!r}: it needs the module {getattr(e, 'name', None) or _short(e)!r}; install "
              "it, or convert the file to CSV, JSONL or Parquet")
    except Exception as e:  # unpickling can fail in any way
        _fail(f"cannot unpickle {display!r} ({type(e).__name__}: {_short(e)}); give a pickle of a dataset, a dict of "
              "lists, a list of dicts or a DataFrame")
    return _object_table(obj, display, local=True)


def _object_table(obj: Any, display: str, *, local: bool) -> _Table:
    """A datasets.Dataset, dict of lists, list of dicts, or anything with .to_dict() (pandas DataFrame)."""
    loc = lambda i: f"row {i + 1}"  # noqa: E731
    if hasattr(obj, "column_names") and hasattr(obj, "features") and not isinstance(obj, dict):
        columns = [str(c) for c in obj.column_names]
        cols = [list(obj[c]) for c in obj.column_names]
        return _columns_table(display, columns, cols, loc, local=local, format_names=_hf_features_names(obj.features))
    if isinstance(obj, dict):
        if obj and all(hasattr(v, "column_names") for v in obj.values()):
            _fail(f"{display!r} holds several splits ({', '.join(map(str, obj))}); save one split, e.g. "
                  "dataset['train']")
        cols = []
        for k, v in obj.items():
            if hasattr(v, "tolist"):
                v = v.tolist()
            if not isinstance(v, (list, tuple)):
                _fail(f"{display!r} holds a dict whose value for {str(k)!r} is a {type(v).__name__}, not a list; "
                      "give a dict of equal-length lists (one per column)")
            cols.append(list(v))
        return _columns_table(display, [str(k) for k in obj], cols, loc, local=local, format_names={})
    if isinstance(obj, (list, tuple)):
        if not obj:
            _fail(f"{display!r} holds an empty list; give data with rows")
        for i, r in enumerate(obj):
            if not isinstance(r, dict):
                _fail(f"item {i + 1} of {display!r} is a {type(r).__name__}, not a dict; give a list of dicts such "
                      "as {'text': ..., 'label': ...}")
        return _records_table(display, list(obj), loc)
    if hasattr(obj, "to_dict"):
        try:
            converted = obj.to_dict(orient="list")
        except TypeError:
            converted = obj.to_dict()
        if isinstance(converted, (dict, list)):
            return _object_table(converted, display, local=local)
    _fail(f"{display!r} holds a {type(obj).__name__}; give a datasets.Dataset, a dict of lists, a list of dicts "
          "or a pandas DataFrame")


def _read_hub(source: str, default_split: str) -> _Table:
    name, _, split = source.partition(":")
    split = split or default_split
    try:
        import datasets
    except ImportError:
        _fail(f"{source!r} is not an existing file, and loading it as a hub dataset needs the 'datasets' package; "
              "give a local file path or install loracls[hub]")
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, missing dataset, bad split, ...: all user-fixable
        _fail(f"could not load {source!r} as a hub dataset (split {split!r}; {type(e).__name__}: {_short(e)}); give a "
              "local file path, or check the name and split (hub loading needs loracls[hub])")
    if not (hasattr(ds, "column_names") and hasattr(ds, "features")):
        _fail(f"hub dataset {source!r} did not load as one split; name a split, e.g. {name}:train")
    return _object_table(ds, source, local=False)


# ---------------------------------------------------------------------------------------------------------------
# columns, texts, ids and labels


def _build_examples(table: _Table, *, text_columns, label_column, label_names, names_file,
                    require_labels) -> tuple[Examples, list[str]]:
    if isinstance(table, _Pending):
        # at prediction time a named label column may be absent: it does not decide the header then
        specs = list(text_columns or []) + ([label_column] if label_column and require_labels else [])
        table = table.resolve([c for c in specs if not c.isdigit()])
    src = table.source
    text_idx, label_idx, id_idx = _select_columns(table, text_columns, label_column, require_labels)

    # texts; empty or whitespace-only ones are skipped
    keep: list[int] = []
    texts: list[str] = []
    for i, parts in enumerate(zip(*[table.cols[j] for j in text_idx])):
        if all(type(p) is str for p in parts):
            text = parts[0] if len(parts) == 1 else " ".join(parts)
        else:
            text = " ".join(_to_text(p, table, i, text_idx) for p in parts)
        if not text or text.isspace():
            continue
        keep.append(i)
        texts.append(text)
    skipped = table.nrows - len(keep)
    if not keep:
        which = _cols_list([table.columns[j] for j in text_idx])
        _fail(f"all {table.nrows} rows of {src!r} have empty text (column(s) {which}); check the file or choose "
              "other columns with --text-columns")

    ids = None
    if id_idx is not None:
        raw_ids = [_id_text(v) for v in table.cols[id_idx]]
        seen: dict[str, int] = {}
        for i, v in enumerate(raw_ids):
            if v in seen:
                _fail(f"duplicate id {v!r} in column {table.columns[id_idx]!r} of {src!r}: {table.loc(seen[v])} and "
                      f"{table.loc(i)}; make the ids unique or remove the id column")
            seen[v] = i
        ids = [raw_ids[i] for i in keep]

    known, origin = (label_names, "the given label names") if label_names is not None else \
        (names_file, "classes.txt" if names_file is not None else None)
    labels = None
    if require_labels:
        format_names = table.format_names.get(table.columns[label_idx])
        raw = table.cols[label_idx]
        labels, names = _resolve_labels(
            [raw[i] for i in keep], lambda k: table.loc(keep[k]), src=src, column=table.columns[label_idx],
            known=known, origin=origin, format_names=format_names, headerless=not table.header,
            local=table.local, classes_file=names_file is not None)
    else:
        names = list(known) if known is not None else \
            list(table.format_names.get(table.columns[label_idx], [])) if label_idx is not None else []
    examples = Examples(texts=texts, labels=labels, rows=keep, ids=ids, source=src, skipped_empty=skipped)
    return examples, names


def _to_text(v: Any, table: _Table, i: int, text_idx: list[int]) -> str:
    if v is None or v is _MISSING:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, float) and math.isnan(v):
        return ""
    if isinstance(v, (numbers.Number, bool)):
        return str(v)
    _fail(f"{table.loc(i)} of {table.source!r} has a {type(v).__name__} in text column(s) "
          f"{_cols_list([table.columns[j] for j in text_idx])}; the text must be a string, choose other columns "
          "with --text-columns")


def _id_text(v: Any) -> str:
    if v is None or v is _MISSING:
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return v if isinstance(v, str) else str(v)


def _select_columns(table: _Table, text_columns, label_column, require_labels):
    """Return (text column indices, label column index or None, id column index or None)."""
    src, columns = table.source, table.columns
    ncols = len(columns)

    def resolve(spec: str, what: str) -> int:
        if table.header:
            j = _match_column(columns, spec)
            if j is not None:
                return j
            if spec.isdigit() and int(spec) < ncols:
                return int(spec)
            close = difflib.get_close_matches(spec, columns, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            _fail(f"{what} column {spec!r} is not in {src!r}{hint}; available columns: {_cols_list(columns)}")
        if not spec.isdigit():
            _fail(f"{src!r} has no header row, so {what} column {spec!r} cannot be found; name columns by 0-based "
                  "index instead, e.g. --text-columns 1,2 --label-column 0")
        if int(spec) >= ncols:
            _fail(f"{what} column index {spec} is out of range for {src!r}, which has {ncols} columns (0..{ncols - 1}); "
                  "give a 0-based column index")
        return int(spec)

    text_idx = [resolve(c, "text") for c in text_columns] if text_columns else None
    label_idx = None
    if label_column:
        try:
            label_idx = resolve(label_column, "label")
        except LoraclsError:
            if require_labels:
                raise  # at prediction time a missing label column is fine; detection below may still find one
    id_idx = None

    if table.header:
        norm = [_norm(c) for c in columns]
        if label_idx is None:
            for name in LABEL_NAMES:
                hits = [j for j, n in enumerate(norm) if n == name and j not in (text_idx or [])]
                if hits:
                    label_idx = hits[0]
                    break
        for j, n in enumerate(norm):
            if n in ID_NAMES and j != label_idx and j not in (text_idx or []):
                id_idx = j
                break
        if require_labels and label_idx is None:
            _fail(f"{src!r} has no label column (columns: {_cols_list(columns)}); name it with --label-column, "
                  "or call it 'label'")
        if text_idx is None:
            taken = {label_idx, id_idx}
            for name in TEXT_NAMES:
                hits = [j for j, n in enumerate(norm) if n == name and j not in taken]
                if hits:
                    text_idx = [hits[0]]
                    break
            if text_idx is None and "title" in norm and "description" in norm:
                text_idx = [norm.index("title"), norm.index("description")]
            if text_idx is None:
                cands = [j for j in range(ncols) if j not in taken and table.stringy(j)]
                if len(cands) == 1:
                    text_idx = cands
                elif not cands:
                    _fail(f"no text column found in {src!r} (columns: {_cols_list(columns)}); name it with "
                          "--text-columns")
                else:
                    _fail(f"several columns of {src!r} could hold the text ({_cols_list([columns[j] for j in cands])}); "
                          "choose with --text-columns (a comma list is joined with spaces)")
    else:
        if label_idx is None and ncols > 1 and (text_idx is None or 0 not in text_idx) \
                and all(_is_int(v) for v in table.cols[0]):
            label_idx = 0
        if text_idx is None:
            text_idx = [j for j in range(ncols) if j != label_idx]
            if not text_idx:
                _fail(f"{src!r} has only the label column; give a file with a text column")

    if require_labels and label_idx is None:
        _fail(f"{src!r} has no header and no integer label column first; give the label column's 0-based index "
              "with --label-column (e.g. 0), or add a header with a 'label' column")
    if label_idx is not None and label_idx in text_idx:
        _fail(f"column {columns[label_idx]!r} of {src!r} is both the label and a text column; choose different "
              "columns with --text-columns/--label-column")
    return text_idx, label_idx, id_idx


def _label_strings(raw: list, loc: Callable[[int], str], src: str, column: str) -> list[str]:
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
                _fail(f"{loc(i)} of {src!r} has label {v!r} in column {column!r}; labels must be whole-number class "
                      "ids or class names")
            s = str(int(v))
        elif v is None or v is _MISSING or isinstance(v, numbers.Real):
            s = ""
        else:
            _fail(f"{loc(i)} of {src!r} has a {type(v).__name__} as label in column {column!r}; labels must be class "
                  "ids or class names")
        if not s:
            _fail(f"{loc(i)} of {src!r} has no label in column {column!r}; fill it in or remove the row")
        out.append(s)
    return out


def _resolve_labels(raw: list, loc: Callable[[int], str], *, src: str, column: str, known: list[str] | None,
                    origin: str | None, format_names: list[str] | None, headerless: bool, local: bool,
                    classes_file: bool) -> tuple[list[int], list[str]]:
    by_name = False
    if format_names is not None and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in raw):
        k = len(format_names)
        for i, v in enumerate(raw):
            if not 0 <= v < k:
                _fail(f"{loc(i)} of {src!r} has label {int(v)}, outside the {k} classes 0..{k - 1} of column "
                      f"{column!r} (unlabelled split?); use a labelled split or fix the data")
        if known is None:
            return [int(v) for v in raw], list(format_names)
        strs, by_name = [format_names[v] for v in raw], True
    else:
        strs = _label_strings(raw, loc, src, column)

    if not by_name and all(_INT_RE.match(s) for s in strs):
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
                    _fail(f"{loc(i)} of {src!r} has label {v}, but the valid labels are {valid} "
                          f"({_names_list(known)}, from {origin}); fix the label or the label names")
            names = list(known)
        else:
            for i, v in enumerate(vals):
                if v < 0:
                    _fail(f"{loc(i)} of {src!r} has label {v}; integer labels must be class ids >= 0 (or use class "
                          "names)")
            if hi >= _MAX_DATA_CLASSES:
                i = vals.index(hi)
                _fail(f"{loc(i)} of {src!r} has label {hi}, too large for a class id; check that {column!r} is the "
                      "label column (--label-column) or use class names")
            names = [str(j + first) for j in range(hi + 1 - first)]
        return ([v - first for v in vals] if first else vals), names

    if known is not None:
        index = {name: j for j, name in enumerate(known)}
        folded: dict[str, int] = {}
        for j, name in enumerate(known):
            folded.setdefault(name.strip().lower(), j)
        labels = []
        for i, s in enumerate(strs):
            j = index.get(s)
            if j is None:
                j = folded.get(s.lower())
            if j is None:
                _fail(f"{loc(i)} of {src!r} has label {s!r}, which is not one of the {len(known)} label names "
                      f"({_names_list(known)}, from {origin}); fix the label or the label names")
            labels.append(j)
        return labels, list(known)
    names = sorted(set(strs))
    if len(names) > 1000 and len(names) > len(strs) // 2:
        _fail(f"column {column!r} of {src!r} has {len(names)} different labels in {len(strs)} rows; it is probably "
              "not the label column, name the right one with --label-column")
    index = {name: j for j, name in enumerate(names)}
    return [index[s] for s in strs], names
