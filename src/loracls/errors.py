"""The one exception type for mistakes a user can make (bad path, bad column, bad hyperparameter, ...).

The CLI turns a `LoraclsError` into a single line on stderr and exit code 2.  So does it for an error that a
condition of the user's machine caused (disk full, read-only filesystem, permission denied, a file where a folder
should be, a folder removed meanwhile): `machine_error_message` words those, whichever library was writing.
Anything else that escapes is a bug in loracls and keeps its traceback.
"""

from __future__ import annotations

import errno
import re


class LoraclsError(Exception):
    """A user-caused problem.  The message names the problem and how to fix it, in one line."""


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C / SIGTERM once the checkpoint is safely written.  The CLI exits 130."""

    def __init__(self, run_dir):
        super().__init__(f"interrupted; resume with: loracls train --resume {run_dir}")
        self.run_dir = run_dir


def first_line(e: BaseException, limit: int = 80) -> str:
    """The first line of an exception's message, for embedding in a one-line error: cut at a word boundary to at
    most `limit` characters (with '...' when cut), or the exception's type name when the message is empty."""
    text = str(e).strip()
    return shorten(text.splitlines()[0], limit) if text else type(e).__name__


def shorten(text: str, limit: int) -> str:
    """`text` on one line, cut at the last space before `limit` characters (never mid-word) and marked '...'."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text[:max(limit - 3, 1)]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:(") + "..."


# errno -> (what happened, what to do).  Each is a condition of the user's machine, not a bug in loracls.
_OS_FIXES = {
    errno.ENOSPC: ("no space is left on the device", "free some disk space or write somewhere else, then run again"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space or write somewhere else, then run again"),
    errno.EROFS: ("the filesystem is read-only", "choose a folder on a writable filesystem"),
    errno.EACCES: ("permission is denied", "check the permissions, or choose a folder you can write to"),
    errno.EPERM: ("the operation is not permitted", "check the permissions, or choose another folder"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "choose a path whose parents are folders"),
    errno.EISDIR: ("it is a folder, not a file", "give a file path"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errno.EMFILE: ("too many files are open", "raise the open-file limit (ulimit -n), then run again"),
    errno.EFBIG: ("a file grew past the size limit", "raise the file-size limit (ulimit -f) or write somewhere else"),
    errno.ENOENT: ("it does not exist (was a folder removed meanwhile?)", "check the path, then run again"),
    errno.EIO: ("the disk reported an input/output error", "check the disk and the folder, then run again"),
}

# The libraries loracls writes through wrap these OS errors in their own exceptions, keeping only text: safetensors
# and tokenizers (Rust: "... (os error 28)"), onnxruntime ("[Errno 28] ..." inside its own Fail), SQLite under
# Optuna's storage (its own sentences, no errno), PyTorch's zip writer (an iostream failure, no errno either).
_ERRNO_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")
_WORDS = {
    "no space left on device": errno.ENOSPC, "database or disk is full": errno.ENOSPC,
    "disk quota exceeded": errno.EDQUOT, "read-only file system": errno.EROFS,
    "attempt to write a readonly database": errno.EROFS, "permission denied": errno.EACCES,
    "not a directory": errno.ENOTDIR, "file too large": errno.EFBIG, "disk i/o error": errno.EIO,
}
# SQLite names its errors (Python's sqlite3 keeps the name): the sentence of a moved database file says read-only.
_SQLITE = {"SQLITE_FULL": errno.ENOSPC, "SQLITE_READONLY_DBMOVED": errno.ENOENT, "SQLITE_READONLY": errno.EROFS,
           "SQLITE_PERM": errno.EACCES, "SQLITE_IOERR": errno.EIO}
_TORCH_WRITER = ("PytorchStreamWriter failed", "iostream error", "file write failed")
_TORCH_FIX = ("a file could not be written (is the disk full?)", "free some disk space or write somewhere else, "
              "then run again")


def os_error_message(e: OSError) -> str | None:
    """A one-line message for an OSError caused by the user's machine (see _OS_FIXES), else None (a bug)."""
    fix = _OS_FIXES.get(getattr(e, "errno", None))
    if fix is None:
        return None
    what, todo = fix
    where = e.filename if getattr(e, "filename", None) else None
    return f"cannot write or read {str(where)!r}: {what}; {todo}" if where else f"{what}; {todo}"


def machine_error_message(e: BaseException) -> str | None:
    """A one-line message for an error that the user's machine caused, whichever library raised it, else None (a
    bug).  Looks through the chain of causes for an OSError with a known errno (os_error_message), then for the
    texts the writing libraries wrap such an error in (see _WORDS)."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:  # raise ... from ..., and an error raised while handling another
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for x in chain:
        if isinstance(x, OSError) and getattr(x, "errno", None) in _OS_FIXES:
            return os_error_message(x)
    for x in chain:
        text = str(x)
        found = _ERRNO_IN_TEXT.search(text)
        code = int(next(g for g in found.groups() if g)) if found else None
        if code not in _OS_FIXES:
            code = _sqlite_errno(getattr(x, "sqlite_errorname", None) or "")
        if code not in _OS_FIXES:
            code = next((c for words, c in _WORDS.items() if words in text.lower()), None)
        if code is not None:
            return "{}; {}".format(*_OS_FIXES[code])
        if any(words in text for words in _TORCH_WRITER):
            return "{}; {}".format(*_TORCH_FIX)
    return None


def _sqlite_errno(name: str) -> int | None:
    """The errno of SQLite's error `name`: its own entry, else its primary code's (SQLITE_IOERR_WRITE: IOERR)."""
    return _SQLITE.get(name, _SQLITE.get("_".join(name.split("_")[:2])))
