"""The one exception type for mistakes a user can make (bad path, bad column, bad hyperparameter, ...).

The CLI turns a `LoraclsError` into a single line on stderr and exit code 2.  Anything else that escapes is a bug
in loracls and keeps its traceback.
"""


class LoraclsError(Exception):
    """A user-caused problem.  The message names the problem and how to fix it, in one line."""
