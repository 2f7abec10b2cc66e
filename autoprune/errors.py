"""The one exception type for mistakes a user can fix.

The CLI prints its message on one line and exits with code 2; anything else that escapes is a bug.
"""


class UserError(Exception):
    """Bad input: a one-line message naming the problem, shown without a traceback.

    Messages often quote what the user wrote (keys, values, file lines); control characters in
    those are escaped here, once, so the message stays one line whatever the input held.
    """

    def __init__(self, message: str) -> None:
        one_line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message))
        super().__init__(one_line)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the trial is recorded as failed."""
