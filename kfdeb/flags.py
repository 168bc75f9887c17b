"""What the four scripts' command lines share: one-line flag errors, did-you-mean, dash spellings, --progress.

- `FlagParser`: an argparse parser whose mistakes are one line on stderr, exit status 2, as every other
  user mistake (cli.execute): `error: unrecognized argument --learnin_rate (did you mean --learning_rate?)`.
  The nearest flags come from difflib (ratio >= 0.6, what Python 3.14's suggest_on_error uses too), so
  every supported Python (3.10+) answers the same. A flag spelled with dashes where kfdeb has
  underscores (`--learning-rate`, `--no-check`) is taken as the underscore flag.
- `--progress auto|true|false` on every script that encodes: auto draws a bar only when stderr is a
  terminal, so a log redirected to a file gets no `\r` updates.
Imports nothing of kfdeb.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import Any, Sequence, TextIO

PROGRESS_CHOICES = ("auto", "true", "false")
PROGRESS_HELP = "progress bars: auto (only when stderr is a terminal), true or false"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def progress_setting(text: Any) -> str:
    """--progress's value as auto, true or false (also takes a bool, and yes/no/on/off/1/0 for true/false)."""
    lowered = str(text).lower()
    if lowered == "auto":
        return "auto"
    if lowered in _TRUE:
        return "true"
    if lowered in _FALSE:
        return "false"
    raise argparse.ArgumentTypeError(f"expected {', '.join(PROGRESS_CHOICES)}, got {text!r}")


def progress_shown(setting: Any, stream: TextIO | None = None) -> bool:
    """Whether to draw progress bars: true, false, or auto = `stream` (stderr, where tqdm draws) is a terminal."""
    setting = progress_setting(setting)
    if setting != "auto":
        return setting == "true"
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", default="auto", nargs="?", const="true", type=progress_setting,
                        metavar="{" + ",".join(PROGRESS_CHOICES) + "}", help=PROGRESS_HELP + " (default: auto)")


def nearest_flags(unknown: str, known: Sequence[str], limit: int = 2) -> list[str]:
    """The known --flags closest to `unknown` (dashes and underscores alike), best first."""
    by_key = {flag.lstrip("-").replace("-", "_"): flag for flag in known if flag.startswith("--")}
    key = unknown.split("=", 1)[0].lstrip("-").replace("-", "_")
    return [by_key[name] for name in difflib.get_close_matches(key, list(by_key), n=limit, cutoff=0.6)]


class FlagParser(argparse.ArgumentParser):
    """argparse with kfdeb's command-line conventions (module docstring)."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        return super().parse_known_args(self.underscore_spellings(sys.argv[1:] if args is None else list(args)),
                                        namespace)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self.unrecognized(extras))
        return parsed

    def underscore_spellings(self, args: list[str]) -> list[str]:
        """`--learning-rate 1e-4` and `--learning-rate=1e-4` as `--learning_rate`; what follows `--` is left alone."""
        known = self._option_string_actions
        spelled = []
        for position, arg in enumerate(args):
            if arg == "--":
                return spelled + args[position:]
            name, equals, value = arg.partition("=")
            underscored = "--" + name[2:].replace("-", "_")
            # exact, or a prefix argparse completes as it does `--learning_r`
            if name.startswith("--") and name not in known and any(flag.startswith(underscored) for flag in known):
                arg = underscored + equals + value
            spelled.append(arg)
        return spelled

    def unrecognized(self, extras: list[str]) -> str:
        flags = [arg for arg in extras if arg.startswith("--") or arg.startswith("-") and not _is_number(arg)]
        if not flags:
            return f"unrecognized argument {extras[0]!r} (a value without its flag?)"
        known = [flag for flag in self._option_string_actions if flag.startswith("--")]
        parts = []
        for flag in flags:
            nearest = nearest_flags(flag, known)
            hint = f" (did you mean {' or '.join(nearest)}?)" if nearest else ""
            parts.append(flag.split("=", 1)[0] + hint)
        return f"unrecognized argument{'s' if len(parts) > 1 else ''} " + ", ".join(parts)

    def error(self, message: str) -> Any:
        """One line, no usage block (--help shows it): `error: <message>`, exit status 2."""
        self.exit(2, f"error: {message}\n")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
