"""The one exception type for mistakes in what the user gave us.

A `UserInputError` carries a complete one-line message (file, line, field, what to do).
The command-line scripts print it as `error: <message>` and exit with status 2; anything
else that escapes is a bug in kfdeb and keeps its traceback. This module is the only
thing the leaf modules share (with `first_line`, which keeps a library's message to one line).
"""


class UserInputError(Exception):
    """A bad file, flag or model folder: shown as one line, exit status 2."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of a library's exception message (or its type name), for a one-line error."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:limit]


class TrainingStopped(Exception):
    """Training stopped on request (SIGTERM) after saving its state: a complete one-line message, exit status 143."""
