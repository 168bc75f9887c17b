"""README.md is tested documentation: every fenced bash block, English and Korean sections alike.

A block either runs in CI exactly as written (tests/readme_blocks.py, .ci/run's step 3: a fresh clone, the
main command first, then every such block in README order, in a fresh venv), or says in its first line what it
needs that CI lacks (`# needs: a GPU ...`, `# needs: the hub ...`), or carries an HTML comment on the line
before its fence naming the CI step that runs it (`<!-- ci: ... -->`). Here, in the suite, every command of
every block, marked or not, goes through its script's own argument parser (a renamed or removed flag, a
value outside a flag's choices fail here), and every shipped file a block names exists.
"""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, SCRIPT_MAINS

README = REPO / "README.md"
NEEDS = "# needs:"  # the marker of a block CI cannot run, and what it lacks
CI_COMMENT = re.compile(r"^<!-- ci: (.+) -->$")
SHIPPED_PREFIXES = ("examples/", "kfdeb/", "bench/", "tests/")  # paths a block may name that a clone has


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    text: str
    needs: str | None  # why CI does not run it, or None: CI runs it

    @property
    def commands(self) -> list[list[str]]:
        """Each simple command of the block as argv: continuations joined, comments dropped, split at && ; |."""
        joined = re.sub(r"\\\n", " ", self.text)
        found = []
        for line in joined.splitlines():
            words: list[str] = []
            for word in shlex.split(line, comments=True):
                if word in ("&&", "||", ";", "|"):
                    found.append(words)
                    words = []
                else:
                    words.append(word)
            found.append(words)
        return [words for words in found if words]


def readme_blocks(path: Path = README) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            start, body = i, []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            comment = CI_COMMENT.match(lines[start - 1].strip()) if start else None
            first = body[0].strip() if body else ""
            needs = first[len(NEEDS):].strip() if first.startswith(NEEDS) else (comment.group(1) if comment else None)
            blocks.append(Block(start + 1, "\n".join(body) + "\n", needs))
        i += 1
    return blocks


def script_call(argv: list[str]) -> tuple[str, list[str]] | None:
    """(script, its arguments) for `python SCRIPT.py ...` and `torchrun ... SCRIPT.py ...`, else None."""
    for i, word in enumerate(argv):
        if word in SCRIPT_MAINS and (argv[0] in ("python", "torchrun") or argv[0].endswith("/python")):
            return word, argv[i + 1:]
    return None


class Parsed(Exception):
    """Raised in place of running a script once its arguments parsed."""


def parse_only(script: str, args: list[str], monkeypatch) -> None:
    """The script's main up to its argument parser: unknown flags and bad choices raise as they would for a user."""
    from kfdeb import cli
    from kfdeb.flags import FlagParser  # the scripts' parser (argparse with kfdeb's spellings and errors)

    with monkeypatch.context() as patched:
        for parser_class in (argparse.ArgumentParser, FlagParser):
            original = parser_class.parse_args

            def parse_then_stop(self, args=None, namespace=None, original=original):
                original(self, args, namespace)
                raise Parsed

            patched.setattr(parser_class, "parse_args", parse_then_stop)
        with pytest.raises(Parsed):
            getattr(cli, SCRIPT_MAINS[script])(args)


def test_the_readme_has_its_blocks_and_the_parser_sees_them(monkeypatch, capsys):
    blocks = readme_blocks()
    assert len(blocks) >= 10 and all(block.commands for block in blocks)
    # the parser itself: a marker, a continuation, a comment and && are read as a reader of the README would
    sample = Block(1, "# needs: x\npython train.py --a 1 \\\n  --b 'c d'  # note\npip install e && python mine.py m\n", None)
    assert sample.commands == [["python", "train.py", "--a", "1", "--b", "c d"], ["pip", "install", "e"],
                               ["python", "mine.py", "m"]]
    # and a renamed flag or a value outside the choices fails the parse, as it would fail a reader
    from kfdeb.errors import UserInputError

    for script, args in [("train.py", ["--learning_rate", "1e-4", "--no_such_flag"]),
                         ("evaluate.py", ["m", "--batch_size", "many"]), ("mine.py", ["m", "--no_such_flag", "1"])]:
        with pytest.raises((SystemExit, UserInputError)):  # argparse's exit, or kfdeb's one-line error
            parse_only(script, args, monkeypatch)


@pytest.mark.parametrize("block", readme_blocks(), ids=lambda block: f"line-{block.line}")
def test_every_command_of_a_block_parses_and_names_shipped_files(block, monkeypatch, capsys):
    """Marked or not: each script's flags and choices as its parser has them, and the shipped files it names."""
    calls = [call for call in map(script_call, block.commands) if call]
    for script, args in calls:
        parse_only(script, args, monkeypatch)
    named = [word for argv in block.commands for word in argv for part in word.split(",") if part.startswith(SHIPPED_PREFIXES)]
    for word in named:
        for part in word.split(","):
            if part.startswith(SHIPPED_PREFIXES) and not any(c in part for c in "*?["):
                assert (REPO / part).exists(), f"README line {block.line}: {part} is not in the repository"
    assert block.needs is not None or calls or block.commands[0][0] in ("pip", "git", "kfdeb-train"), block.text


def test_a_block_ci_cannot_run_says_what_it_needs():
    """The marker is one line that names something: never an empty `# needs:`."""
    for block in readme_blocks():
        if block.needs is not None:
            assert len(block.needs) > 5, f"README line {block.line}: the marker must say what the block needs"
