"""Reading a source into a `Table` (or, for a delimited file, `Records`): one reader per format.

Local formats, by extension: .csv, .tsv, .txt (comma, tab, or one text per line), .jsonl/.json, .parquet
(needs pyarrow) and .pkl/.pickle (only with allow_pickle=True).  Anything else that looks like `name`,
`owner/name` or `owner/name:split` and is not an existing path is loaded with `datasets.load_dataset`.
Every problem is a one-line LoraclsError naming the line or row and the fix.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import itertools
import json
import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from loracls.data.common import (DELIMITED_EXTENSIONS, HUB_RE, JSON_EXTENSIONS, KNOWN_EXTENSIONS, LABEL_NAMES_FILES,
                                 MISSING, PARQUET_EXTENSIONS, PICKLE_EXTENSIONS, SUPPORTED_HINT, Records, Table, fail,
                                 short)


def read_source(source: str, allow_pickle: bool, default_split: str,
                quoting: str = "auto") -> tuple[Table | Records, bool]:
    """The source's data, and whether it is a local file (else a hub dataset).  `quoting` (auto, csv or none)
    applies to CSV/TSV files: see `_read_delimited`."""
    path = Path(source).expanduser()
    try:
        exists = path.exists()
    except (OSError, ValueError):  # e.g. a NUL character or an overlong name
        exists = False
    if exists or path_like(source):
        return read_local(path, source, allow_pickle, quoting), True
    if HUB_RE.match(source):
        return _laid_out(read_hub(source, default_split), "hub dataset"), False
    fail(f"file {source!r} does not exist; check the path (or give a hub dataset name such as ag_news:test)")


def find_label_names_file(source: str) -> list[str] | None:
    """Class names from classes.txt (or labels.txt) beside a local file, one per line (line 1 = class 0)."""
    try:
        p = Path(str(source)).expanduser()
        if not p.is_file():
            return None
        for name in LABEL_NAMES_FILES:
            f = p.parent / name
            if f.is_file() and f.resolve() != p.resolve():
                return read_names_file(f)
    except OSError:
        return None
    return None


def read_names_file(f: Path) -> list[str]:
    data = read_bytes(f, str(f))
    text = decode(data, str(f))
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        fail(f"label names file {str(f)!r} is empty; write one class name per line (line 1 = class 0) or delete it")
    for i, name in enumerate(lines):
        if not name:
            fail(f"line {i + 1} of label names file {str(f)!r} is blank; write one class name per line, no gaps")
        if name in lines[:i]:
            fail(f"label names file {str(f)!r} lists {name!r} twice (lines {lines.index(name) + 1} and {i + 1}); "
                 "make the class names unique")
    return lines


def path_like(source: str) -> bool:
    if os.sep in source or (os.altsep and os.altsep in source):
        # 'owner/name' (one slash, no known extension) is a hub name, not a path
        if not (HUB_RE.match(source) and source.count("/") == 1 and not _has_known_ext(source)):
            return True
    return source.startswith((".", "~")) or _has_known_ext(source)


def _has_known_ext(source: str) -> bool:
    return Path(source).suffix.lower() in KNOWN_EXTENSIONS


def _line_of_offset(data: bytes, pos: int) -> int:
    head = data[:pos]
    return head.count(b"\n") + head.count(b"\r") - head.count(b"\r\n") + 1


def read_local(path: Path, display: str, allow_pickle: bool, quoting: str = "auto") -> Table | Records:
    if not path.exists():
        hint = ""
        try:
            if path.parent.is_dir():
                close = difflib.get_close_matches(path.name, [p.name for p in path.parent.iterdir()], n=1)
                if close:
                    hint = f" (did you mean {str(path.parent / close[0])!r}?)"
        except OSError:
            pass
        fail(f"file {display!r} does not exist{hint}; check the path")
    if path.is_dir():
        fail(f"{display!r} is a directory, not a file; give the path of a data file inside it "
             f"(e.g. {os.path.join(display, 'train.csv')!r})")
    ext = path.suffix.lower()
    if ext in DELIMITED_EXTENSIONS:
        return _read_delimited(path, display, DELIMITED_EXTENSIONS[ext], quoting)
    if ext in JSON_EXTENSIONS:
        return _laid_out(_read_json(path, display, ext), "JSON")
    if ext in PARQUET_EXTENSIONS:
        return _laid_out(_read_parquet(path, display), "Parquet")
    if ext in PICKLE_EXTENSIONS:
        return _laid_out(_read_pickle(path, display, allow_pickle), "pickle")
    fail(f"{display!r} has an unsupported file type {ext or '(no extension)'!r}; {SUPPORTED_HINT}")


def _laid_out(table: Table, layout: str) -> Table:
    table.layout = layout
    return table


def read_bytes(path: Path, display: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except PermissionError:
        fail(f"cannot read {display!r}: permission denied; check the file's permissions (e.g. chmod +r)")
    except IsADirectoryError:
        fail(f"{display!r} is a directory, not a file; give the path of a data file inside it")
    except OSError as e:
        fail(f"cannot read {display!r} ({e.strerror or short(e)}); check the path and the file")


def _check_not_empty(data: bytes, display: str):
    if not data.strip():
        fail(f"{display!r} is empty; give a file with data rows")


def decode(data: bytes, display: str, *, check_nul: bool = True) -> str:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        fail(f"{display!r} is UTF-16 text; save it as UTF-8")
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    if check_nul:
        nul = data.find(b"\x00")
        if nul >= 0:
            fail(f"{display!r} contains a NUL byte on line {_line_of_offset(data, nul)}, so it is binary or not "
                 "UTF-8 (UTF-16?); save it as UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(f"line {_line_of_offset(data, e.start)} of {display!r} is not valid UTF-8 (byte 0x{data[e.start]:02x}); "
             "re-save the file as UTF-8")


def _parse_csv(text: str, delimiter: str, limit_records: int | None = None, quoted: bool = True):
    """Parse into records (blank lines dropped), the physical line each record starts and ends on, and the last
    line read.  quoted=False reads quotes as plain text (csv.QUOTE_NONE)."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter,
                        quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE)
    records, starts, ends, last = [], [], [], 0
    for rec in reader:
        start, last = last + 1, reader.line_num
        if not rec:
            continue
        records.append(rec)
        starts.append(start)
        ends.append(last)
        if limit_records is not None and len(records) >= limit_records:
            break
    return records, starts, ends, last


def _consistent(records: list[list[str]]) -> bool:
    """At least 2 fields per record and the same number in all records (the last may be cut by sampling)."""
    body = records[:-1] if len(records) > 1 else records
    return bool(body) and len(body[0]) >= 2 and all(len(r) == len(body[0]) for r in body)


def _sample_text(text: str, n_lines: int = 50) -> str:
    return "".join(itertools.islice(io.StringIO(text, newline=""), n_lines))


_DELIM_WORDS = {"\t": "tab", ";": "semicolon", ",": "comma"}


def _read_delimited(path: Path, display: str, delimiter: str | None, quoting: str = "auto") -> Records:
    data = read_bytes(path, display)
    _check_not_empty(data, display)
    text = decode(data, display)
    _raise_field_size_limit()
    sample = _sample_text(text)
    quoted = quoting != "none"
    if delimiter is None:  # .txt: tab, comma, or one text per line
        for cand in ("\t", ","):
            if _consistent(_parse_csv(sample, cand, quoted=quoted)[0]):
                delimiter = cand
                break
    if delimiter is None:
        records, starts = [], []
        for i, line in enumerate(text.split("\n")):
            line = line[:-1] if line.endswith("\r") else line
            if line:
                records.append([line])
                starts.append(i + 1)
        if not records:
            fail(f"{display!r} is empty; give a file with data rows")
        return Records(display, records, starts, layout="text, one per line")
    first = _parse_csv(sample, delimiter, limit_records=1, quoted=quoted)[0]
    if first and len(first[0]) == 1:
        for alt in ("\t", ";", ","):
            if alt != delimiter and _consistent(_parse_csv(sample, alt, quoted=quoted)[0]):
                fix = {"\t": "rename it to .tsv", ",": "rename it to .csv"}.get(
                    alt, "save it with commas (or with tabs, as .tsv)")
                fail(f"{display!r} looks {_DELIM_WORDS[alt]}-separated, not {_DELIM_WORDS[delimiter]}-separated "
                     f"(each line is one field); {fix}")
    (records, starts, ends, last_line), how = _parse_delimited(text, delimiter, quoting, display)
    if how == "CSV quoting" and records and last_line > starts[-1]:
        _check_closed_quote(text, delimiter, starts[-1], display)
    if not records:
        fail(f"{display!r} is empty; give a file with data rows")
    bad = _ragged(records)
    if bad is not None:
        fail(_ragged_message(records, starts, ends, bad, display, delimiter, how, sample))
    keep = [i for i, rec in enumerate(records) if len(rec) == len(records[0])]
    if len(keep) != len(records):
        records = [records[i] for i in keep]
        starts = [starts[i] for i in keep]
    kind = {",": "CSV", "\t": "TSV"}.get(delimiter, "text")
    return Records(display, records, starts, layout=f"{kind}, {_DELIM_WORDS[delimiter]}-separated, {how}")


def _parse_delimited(text: str, delimiter: str, quoting: str, display: str):
    """Records under `quoting`, and how quotes were read.  auto reads them as CSV does, except in a tab-separated
    file that splits into the same number of fields on every line when quotes are plain text, where CSV quoting
    would break or join its rows, or strip quotes that a CSV writer did not put there.  GLUE-style TSV files are
    not quoted at all: a sentence that opens with a quote (as one in STS-B's train.tsv does) would otherwise
    swallow the lines after it, and '"Quoted," he said' would lose its quotes."""
    if quoting == "none":
        try:
            return _parse_csv(text, delimiter, quoted=False), "quotes read as text (--quoting none)"
        except csv.Error as e:
            fail(f"{display!r} is not valid {_DELIM_WORDS[delimiter]}-separated text ({short(e)}); fix that line")
    try:
        parsed, error = _parse_csv(text, delimiter), None
    except csv.Error as e:
        parsed, error = None, e
    if quoting == "auto" and delimiter == "\t":
        try:
            plain = _parse_csv(text, delimiter, quoted=False)
        except csv.Error:
            plain = None
        if plain is not None and plain[0] and len(plain[0][0]) >= 2 and _ragged(plain[0]) is None:
            why = _csv_breaks(parsed) if parsed is not None else "CSV quoting fails"
            if why is None and parsed[0] != plain[0]:
                why = _not_csv_written(plain)
            if why is not None:
                return plain, f"quotes read as text ({why}; --quoting csv insists)"
    if error is not None:
        fail(f"{display!r} is not valid {_DELIM_WORDS[delimiter]}-separated text ({short(error)}); fix the quoting, "
             "or pass --quoting none if quotes in this file are plain text")
    return parsed, "CSV quoting"


def _csv_breaks(parsed) -> str | None:
    """Where CSV quoting joins lines into one row or gives rows of different widths, or None."""
    records, starts, ends, _ = parsed
    joined = next((s for s, e in zip(starts, ends) if e > s), None)
    if joined is not None:
        return f"CSV quoting joins lines from line {joined}"
    bad = _ragged(records)
    return None if bad is None else f"CSV quoting breaks line {starts[bad]}"


def _not_csv_written(plain) -> str | None:
    """Where a field opens with a quote that a CSV writer did not write (it would close the field with a quote and
    double the quotes inside), or None when every such field looks CSV-written."""
    for rec, line in zip(plain[0], plain[1]):
        for f in rec:
            if f.startswith('"') and (len(f) < 2 or not f.endswith('"') or '"' in f[1:-1].replace('""', "")):
                return f"line {line} has a field that opens with a quote CSV would strip"
    return None


def _ragged(records: list[list[str]]) -> int | None:
    """The first record whose number of fields differs from the first record's (blank lines aside), or None."""
    width = len(records[0]) if records else 0
    return next((i for i, rec in enumerate(records)
                 if len(rec) != width and not (len(rec) == 1 and not rec[0].strip())), None)


def _ragged_message(records, starts, ends, bad: int, display: str, delimiter: str, how: str, sample: str) -> str:
    rec, line, width = records[bad], starts[bad], len(records[0])
    if how == "CSV quoting" and ends[bad] > line:
        return (f"line {line} of {display!r} opens a quoted field (\") that runs to line {ends[bad]}, so that row has "
                f"{len(rec)} fields but line {starts[0]} has {width}; close the quote, or pass --quoting none if "
                "quotes in this file are plain text")
    hint = ""
    if delimiter == "," and any(c in sample.split("\n", 1)[0] for c in "\t;"):
        hint = " (is the file really comma-separated?)"
    fix = "fix that row (quote fields that contain the separator or quotes)" if how == "CSV quoting" else \
        "fix that row (with quotes read as text, a field cannot hold the separator)"
    if how == "CSV quoting" and any('"' in f for f in rec):
        fix += ", or pass --quoting none if quotes in this file are plain text"
    return f"line {line} of {display!r} has {len(rec)} fields but line {starts[0]} has {width}{hint}; {fix}"


def _check_closed_quote(text: str, delimiter: str, start_line: int, display: str):
    """A quoted field left open swallows the rest of the file into the last record; find it."""
    lines = io.StringIO(text, newline="").readlines()
    tail = "".join(lines[start_line - 1:])
    try:
        list(csv.reader(io.StringIO(tail, newline=""), delimiter=delimiter, strict=True))
    except csv.Error as e:
        if "unexpected end of data" in str(e):
            fail(f"line {start_line} of {display!r} opens a quoted field that is never closed; "
                 "add the missing closing quote (\")")


def _raise_field_size_limit():
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 10


def _records_table(display: str, records: list[dict], loc: Callable[[int], str], format_names=None) -> Table:
    keys: dict[str, None] = {}
    for r in records:
        for k in r:
            keys.setdefault(str(k), None)
    columns = list(keys)
    cols = [[r.get(k, MISSING) for r in records] for k in columns]
    return _columns_table(display, columns, cols, loc, local=True, format_names=format_names or {})


def _columns_table(display: str, columns: list[str], cols: list[list], loc: Callable[[int], str], *,
                   local: bool, format_names: dict[str, list[str]]) -> Table:
    if not columns:
        fail(f"{display!r} has no columns; give data with a text column (and a label column for training)")
    nrows = len(cols[0])
    for name, col in zip(columns, cols):
        if len(col) != nrows:
            fail(f"column {name!r} of {display!r} has {len(col)} values but column {columns[0]!r} has {nrows}; "
                 "give columns of equal length")
    if nrows == 0:
        fail(f"{display!r} has no rows; give a file with data rows")

    def stringy(j: int) -> bool:
        return any(isinstance(v, str) for v in cols[j][:200])

    return Table(source=display, columns=columns, cols=cols, nrows=nrows, loc=loc, header=True, local=local,
                 format_names=format_names, stringy=stringy)


def _read_json(path: Path, display: str, ext: str) -> Table:
    data = read_bytes(path, display)
    _check_not_empty(data, display)
    text = decode(data, display, check_nul=False)
    head = text.lstrip()[:1]
    if head == "[" or (ext == ".json" and head == "{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if head == "[":
                fail(f"{display!r} is not valid JSON ({e.msg} at line {e.lineno}); fix the syntax there")
            obj = None  # maybe JSON lines after all
        if isinstance(obj, list):
            for i, r in enumerate(obj):
                if not isinstance(r, dict):
                    fail(f"item {i + 1} of {display!r} is a {type(r).__name__}, not an object; give a list of "
                         "objects such as {\"text\": ..., \"label\": ...}")
            if not obj:
                fail(f"{display!r} is an empty JSON list; give a file with data rows")
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
            fail(f"line {n} of {display!r} is not valid JSON ({e.msg}, column {e.colno}); fix that line "
                 "(each line must be one JSON object)")
        if not isinstance(rec, dict):
            fail(f"line {n} of {display!r} is a JSON {type(rec).__name__}, not an object; write one object "
                 "such as {\"text\": ..., \"label\": ...} per line")
        records.append(rec)
        lines.append(n)
    if not records:
        fail(f"{display!r} is empty; give a file with data rows")
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


def _read_parquet(path: Path, display: str) -> Table:
    read_bytes(path, display)  # permission and readability check with a clear message
    try:
        import pyarrow.parquet as pq
    except ImportError:
        fail(f"reading {display!r} needs pyarrow; pip install pyarrow (or loracls[parquet]), or convert the file "
             "to CSV or JSONL")
    try:
        table = pq.read_table(str(path))
    except Exception as e:  # pyarrow raises several types for corrupt files
        fail(f"cannot read {display!r} as Parquet ({short(e)}); check that it is a valid Parquet file")
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


def _read_pickle(path: Path, display: str, allow_pickle: bool) -> Table:
    if not allow_pickle:
        fail(f"{display!r} is a pickle, and unpickling runs code from the file; pass --allow-pickle only if you "
             "trust it, or convert it to CSV, JSONL or Parquet")
    data = read_bytes(path, display)
    _check_not_empty(data, display)
    warnings.warn(f"unpickling {display!r} runs code from the file; only do this for files you trust",
                  UserWarning, stacklevel=3)
    try:
        obj = pickle.loads(data)
    except ImportError as e:
        fail(f"cannot unpickle {display!r}: it needs the module {getattr(e, 'name', None) or short(e)!r}; install "
             "it, or convert the file to CSV, JSONL or Parquet")
    except Exception as e:  # unpickling can fail in any way
        fail(f"cannot unpickle {display!r} ({type(e).__name__}: {short(e)}); give a pickle of a dataset, a dict of "
             "lists, a list of dicts or a DataFrame")
    return _object_table(obj, display, local=True)


def _object_table(obj: Any, display: str, *, local: bool) -> Table:
    """A datasets.Dataset, dict of lists, list of dicts, or anything with .to_dict() (pandas DataFrame)."""
    loc = lambda i: f"row {i + 1}"  # noqa: E731
    if hasattr(obj, "column_names") and hasattr(obj, "features") and not isinstance(obj, dict):
        columns = [str(c) for c in obj.column_names]
        cols = [list(obj[c]) for c in obj.column_names]
        return _columns_table(display, columns, cols, loc, local=local, format_names=_hf_features_names(obj.features))
    if isinstance(obj, dict):
        if obj and all(hasattr(v, "column_names") for v in obj.values()):
            fail(f"{display!r} holds several splits ({', '.join(map(str, obj))}); save one split, e.g. "
                 "dataset['train']")
        cols = []
        for k, v in obj.items():
            if hasattr(v, "tolist"):
                v = v.tolist()
            if not isinstance(v, (list, tuple)):
                fail(f"{display!r} holds a dict whose value for {str(k)!r} is a {type(v).__name__}, not a list; "
                     "give a dict of equal-length lists (one per column)")
            cols.append(list(v))
        return _columns_table(display, [str(k) for k in obj], cols, loc, local=local, format_names={})
    if isinstance(obj, (list, tuple)):
        if not obj:
            fail(f"{display!r} holds an empty list; give data with rows")
        for i, r in enumerate(obj):
            if not isinstance(r, dict):
                fail(f"item {i + 1} of {display!r} is a {type(r).__name__}, not a dict; give a list of dicts such "
                     "as {'text': ..., 'label': ...}")
        return _records_table(display, list(obj), loc)
    if hasattr(obj, "to_dict"):
        try:
            converted = obj.to_dict(orient="list")
        except TypeError:
            converted = obj.to_dict()
        if isinstance(converted, (dict, list)):
            return _object_table(converted, display, local=local)
    fail(f"{display!r} holds a {type(obj).__name__}; give a datasets.Dataset, a dict of lists, a list of dicts "
         "or a pandas DataFrame")


def read_hub(source: str, default_split: str) -> Table:
    name, _, split = source.partition(":")
    split = split or default_split
    try:
        import datasets
    except ImportError:
        fail(f"{source!r} is not an existing file, and loading it as a hub dataset needs the 'datasets' package; "
             "give a local file path or install loracls[hub]")
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, missing dataset, bad split, ...: all user-fixable
        fail(f"could not load {source!r} as a hub dataset (split {split!r}; {type(e).__name__}: {short(e)}); give a "
             "local file path, or check the name and split (hub loading needs loracls[hub])")
    if not (hasattr(ds, "column_names") and hasattr(ds, "features")):
        fail(f"hub dataset {source!r} did not load as one split; name a split, e.g. {name}:train")
    return _object_table(ds, source, local=False)
