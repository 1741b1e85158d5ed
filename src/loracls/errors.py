"""The one exception type for mistakes a user can make (bad path, bad column, bad hyperparameter, ...).

The CLI turns a `LoraclsError` into a single line on stderr and exit code 2.  So does it for an `OSError` whose
errno names a condition of the user's machine (disk full, read-only filesystem, permission denied, a file where a
folder should be): `os_error_message` words those.  Anything else that escapes is a bug in loracls and keeps its
traceback.
"""

from __future__ import annotations

import errno


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
}


def os_error_message(e: OSError) -> str | None:
    """A one-line message for an OSError caused by the user's machine (see _OS_FIXES), else None (a bug)."""
    fix = _OS_FIXES.get(getattr(e, "errno", None))
    if fix is None:
        return None
    what, todo = fix
    where = e.filename if getattr(e, "filename", None) else None
    return f"cannot write or read {str(where)!r}: {what}; {todo}" if where else f"{what}; {todo}"
