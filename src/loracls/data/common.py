"""What the data modules share: the column-major `Table` every reader produces, `Records` (a delimited file
before its header row is decided), the column and label vocabularies, and one-line error helpers."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from loracls.errors import LoraclsError

DELIMITED_EXTENSIONS = {".csv": ",", ".tsv": "\t", ".txt": None}


JSON_EXTENSIONS = (".jsonl", ".json", ".ndjson")


PARQUET_EXTENSIONS = (".parquet",)


PICKLE_EXTENSIONS = (".pkl", ".pickle")


KNOWN_EXTENSIONS = (*DELIMITED_EXTENSIONS, *JSON_EXTENSIONS, *PARQUET_EXTENSIONS, *PICKLE_EXTENSIONS)


SUPPORTED_HINT = "use .csv, .tsv, .txt, .jsonl, .json or .parquet (or .pkl with --allow-pickle)"

# Column names, normalized by norm (lower case, runs of spaces/underscores/hyphens -> "_"), in priority order.
LABEL_NAMES = ("label", "labels", "class", "class_index", "category", "target", "y", "score", "rating", "stars")
TEXT_NAMES = ("text", "sentence", "content", "review", "document")
ID_NAMES = ("id", "guid")
# Names that make a single-column first row a header (a multi-column one only needs identifier-like fields).
KNOWN_HEADER_NAMES = frozenset(
    LABEL_NAMES + TEXT_NAMES + ID_NAMES
    + ("title", "description", "body", "headline", "question", "answer", "comment", "tweet", "message",
       "sentence1", "sentence2", "summary", "abstract", "label_text", "texts", "sentences", "idx", "index"))
LABEL_NAMES_FILES = ("classes.txt", "labels.txt")

INT_RE = re.compile(r"[+-]?[0-9]+(?:\.0*)?\Z")
DECIMAL_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")  # no nan/inf, unlike float()
IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_ \-]{0,39}\Z")
HUB_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*(?:/[A-Za-z0-9][A-Za-z0-9_.\-]*)?(?::.+)?\Z")
MISSING = object()  # a JSON record without a key
MAX_DATA_CLASSES = 100_000  # integer labels above this are not class ids


@dataclass
class Table:
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
    layout: str = ""  # how the source was read, for the data summary: "CSV, comma-separated, header row"


@dataclass
class Records:
    """A delimited file's parsed rows before its header row is decided (that depends on the columns the user
    names; see columns.decide_header).  starts[i] is the line records[i] starts on."""

    source: str
    records: list[list[str]]
    starts: list[int]
    layout: str = ""  # "TSV, tab-separated, quotes read as text (...)"


class MissingColumn(LoraclsError):
    """The source has no column by a name (or index) that was asked for."""


def fail(message: str):
    raise LoraclsError(" ".join(str(message).splitlines()))


def missing_column(message: str):
    raise MissingColumn(" ".join(str(message).splitlines()))


def short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", "_", str(name).strip().lower())


def is_int(s) -> bool:
    return isinstance(s, str) and INT_RE.match(s.strip()) is not None


def is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except (TypeError, ValueError):
        return False


def number_key(s: str) -> str | None:
    """One spelling per number ('3.200' and '3.2' -> '3.2'; '01', '1.0' and '+1' -> '1'), None for anything else."""
    s = s.strip()
    if INT_RE.match(s):
        return str(int(s.split(".", 1)[0]))  # exact for long integers, where float() would round
    if not DECIMAL_RE.match(s):
        return None
    x = float(s)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


def cols_list(columns: list[str]) -> str:
    return ", ".join(repr(c) for c in columns)


def names_list(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
