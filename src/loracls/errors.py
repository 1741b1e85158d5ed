"""The one exception type for mistakes a user can make (bad path, bad column, bad hyperparameter, ...).

The CLI turns a `LoraclsError` into a single line on stderr and exit code 2.  Anything else that escapes is a bug
in loracls and keeps its traceback.
"""


class LoraclsError(Exception):
    """A user-caused problem.  The message names the problem and how to fix it, in one line."""


def first_line(e: BaseException, limit: int = 80) -> str:
    """The first line of an exception's message, cut to `limit` characters, for embedding in a one-line error
    (the exception's type name when the message is empty, so the line never ends up blank or raises)."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__
