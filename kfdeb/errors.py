"""The one exception type for mistakes in what the user gave us.

A `UserInputError` carries a complete one-line message (file, line, field, what to do).
The command-line scripts print it as `error: <message>` and exit with status 2; anything
else that escapes is a bug in kfdeb and keeps its traceback. This module is the only
thing the leaf modules share.
"""


class UserInputError(Exception):
    """A bad file, flag or model folder: shown as one line, exit status 2."""
