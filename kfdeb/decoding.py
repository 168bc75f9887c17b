"""A user's file as text: UTF-8, strictly, and what a file that is not UTF-8 looks like instead.

`decode` reads UTF-8 (a BOM at the start of the file removed) and reports a bad byte with its line
and its offset in that line. Korean text saved on Windows is often CP949 (EUC-KR and its extension,
Unified Hangul Code): `not_utf8` reads the whole file again to tell such a file from one that mixes
encodings or is neither, and gives the command that converts a CP949 file. Hangul in CP949 is two
bytes from 0x81-0xFE, rarely valid UTF-8, so a CP949 line is seldom taken for a UTF-8 one.
Imports nothing of kfdeb but errors.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from kfdeb.errors import UserInputError


def decode(data: bytes, path: str, first_line: int = 1) -> str:
    """`data` (a whole file, or one line of it starting at line `first_line`) as text: UTF-8, a BOM at the
    start of the file removed; a bad byte is reported with its line and its offset in that line, and
    what the file looks like instead (`not_utf8`)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_no = first_line + data.count(b"\n", 0, err.start)
        line_start = data.rfind(b"\n", 0, err.start) + 1
        bad_byte = f"byte {err.start - line_start}: {data[err.start:err.start + 1]!r}"
        raise UserInputError(f"{path}:{line_no}: {not_utf8(path, bad_byte)}") from None
    return text.removeprefix("\ufeff") if first_line == 1 else text


def not_utf8(path: str, bad_byte: str) -> str:
    """Why the file at `path`, which is not UTF-8, is refused, from all its lines.

    Every line that is not UTF-8 decodes as CP949 and no line with non-ASCII text is UTF-8: the file is
    CP949, and the message gives the command that converts it. Both UTF-8 and CP949 lines (lines appended
    by another program): refused as mixed, since converting it would garble its UTF-8 lines. Otherwise
    (or when the file cannot be read again): the bad byte."""
    utf8_line = cp949_line = None
    try:
        with open(path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                if raw.isascii():
                    continue
                try:
                    raw.decode("utf-8")
                    utf8_line = utf8_line or line_no
                except UnicodeDecodeError:
                    try:
                        raw.decode("cp949")
                    except UnicodeDecodeError:
                        return f"not valid UTF-8 ({bad_byte})"
                    cp949_line = cp949_line or line_no
                if utf8_line and cp949_line:
                    return (f"not valid UTF-8 ({bad_byte}): the file mixes encodings (line {utf8_line} is UTF-8, "
                            f"line {cp949_line} CP949/EUC-KR); save every line as UTF-8")
    except OSError:
        return f"not valid UTF-8 ({bad_byte})"
    if cp949_line is None:  # the file changed since it was read
        return f"not valid UTF-8 ({bad_byte})"
    file = Path(path)
    converted = file.with_name(f"{file.stem}.utf8{file.suffix}")
    return (f"not UTF-8: the file looks CP949/EUC-KR encoded (Windows Korean); convert it: "
            f"iconv -f cp949 -t utf-8 {shlex.quote(path)} > {shlex.quote(str(converted))}")
