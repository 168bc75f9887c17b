"""What the four scripts' command lines share: one-line flag errors, did-you-mean, dash spellings, --progress.

- `FlagParser`: an argparse parser whose mistakes are one line on stderr, exit status 2, as every other
  user mistake (cli.execute): `error: unrecognized argument --learnin_rate (did you mean --learning_rate?)`.
  The nearest flags come from difflib (similarity ratio >= 0.6, at most two), not from argparse, so
  every supported Python (3.10+) answers the same. A flag spelled with dashes where kfdeb has
  underscores (`--learning-rate`, `--no-check`) is taken as the underscore flag.
- `--progress auto|true|false` on every script that encodes: auto draws a bar only when stderr is a
  terminal, so a log redirected to a file gets no `\r` updates.
- `add_field_flags`, `presets_help`: train.py's --help built from TrainConfig's fields, in sections.
Imports nothing of kfdeb but errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import textwrap
from typing import Any, Iterable, Sequence, TextIO

from kfdeb.errors import UserInputError

PROGRESS_CHOICES = ("auto", "true", "false")
PROGRESS_HELP = "progress bars: auto (only when stderr is a terminal), true or false"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


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


def progress_value(value: Any, source: str) -> str:
    """`progress_setting` for values from a config file or a dict: a bad one is a one-line UserInputError."""
    try:
        return progress_setting(value)
    except argparse.ArgumentTypeError as err:
        raise UserInputError(f"{source}: {err}") from None


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


def shown(value: Any) -> str:
    """A default or preset value as typed on the command line (true/false for a bool)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def add_field_flags(parser: argparse.ArgumentParser, fields: Iterable[dataclasses.Field],
                    groups: dict[str, str]) -> None:
    """A --NAME flag per dataclass field (metadata: help, choices, group: a key of `groups`, whose titles
    are --help's sections, in their order); the value given, or no attribute when the flag is absent.
    A bool flag alone means true; --progress alone means true. The help ends with the default, unless
    it says what the default means itself or the default is ""."""
    sections = {key: parser.add_argument_group(title) for key, title in groups.items()}
    for spec in fields:
        # a field without a known group: a section of its own, and tests/test_config.py fails naming it
        section = sections.get(spec.metadata["group"]) or parser.add_argument_group(f"{spec.name}: no group")
        default = "" if spec.default == "" or "default:" in spec.metadata["help"] else f" (default: {shown(spec.default)})"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": spec.metadata["help"] + default}
        if spec.metadata["choices"] == PROGRESS_CHOICES:
            kwargs.update(nargs="?", const="true", type=progress_setting)
        elif isinstance(spec.default, bool):
            kwargs.update(nargs="?", const=True, type=parse_bool, metavar="BOOL")
        else:
            kwargs.update(type=type(spec.default), metavar={int: "N", float: "X"}.get(type(spec.default), "TEXT"))
        if spec.metadata["choices"]:
            kwargs.update(choices=list(spec.metadata["choices"]), metavar="{" + ",".join(spec.metadata["choices"]) + "}")
        section.add_argument(f"--{spec.name}", **kwargs)


def presets_help(presets: dict[str, dict[str, Any]], summaries: dict[str, str], width: int = 100) -> str:
    """--help's closing section: each preset, what it is for and the flags it sets."""
    lines = ["presets (--preset NAME sets these; --config and flags override them):"]
    for name, values in presets.items():
        lines.append(textwrap.fill(f"{name}: {summaries[name]}", width, initial_indent="  ", subsequent_indent="    ",
                                   break_on_hyphens=False))
        flags = " ".join(f"--{key}\0{shown(value)}" for key, value in values.items())  # \0: a flag and its value
        lines.append(textwrap.fill(flags, width, initial_indent="    ", subsequent_indent="    ",  # on one line
                                   break_on_hyphens=False, break_long_words=False).replace("\0", " "))
    return "\n".join(lines)


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
