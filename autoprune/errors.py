"""The one exception type for mistakes a user can fix.

The CLI prints its message on one line and exits with code 2; anything else that escapes is a bug.
"""


class UserError(Exception):
    """Bad input: a one-line message naming the problem, shown without a traceback."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the trial is recorded as failed."""
