"""The exceptions the scripts turn into one line and an exit status: mistakes in what the user gave us, and stops.

A `UserInputError` carries a complete one-line message (file, line, field, what to do).
The command-line scripts print it as `error: <message>` and exit with status 2 (cli.execute);
anything else that escapes is a bug in kfdeb and keeps its traceback. `first_line` keeps a
library's message to one line. `TrainingStopped` is training's orderly stop on SIGTERM (exit 143).
Every module may import this one; it imports nothing of kfdeb.
"""


class UserInputError(Exception):
    """A bad file, flag or model folder: shown as one line, exit status 2."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of a library's exception message (or its type name), for a one-line error."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:limit]


class TrainingStopped(Exception):
    """Training stopped on request (SIGTERM) after saving its state: a complete one-line message, exit status 143."""
