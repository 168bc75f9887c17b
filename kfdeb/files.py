"""Writing files so that no reader ever sees half of one, and reading the small JSON files kfdeb keeps.

Every writer of kfdeb (model folders, training states, the token cache, ONNX exports, the model
card and plot) follows one protocol: write into a scratch file or folder *on the same filesystem*
as the destination, flush and fsync what was written, then put it in place with rename(2), which
POSIX makes atomic within a filesystem, and fsync the folder that holds the new name, so the
rename itself survives a power loss. A process killed at any instant leaves the old file or the
new one, plus perhaps a scratch entry that the next writer removes; never a torn file.

- `write_file(path, write)`: one file (`write(handle)` fills it), via `.NAME.tmp-PID`.
- `publish_files(scratch, folder, order)`: every file of a scratch folder moved to the same place
  under `folder`, one rename each, in an order the caller gives (what a reader depends on first).
- `publish_folder(scratch, final)`: a whole scratch folder renamed to `final` (which must not exist).

What is published has the modes an ordinary `open`/`mkdir` gives under the process umask (0644 files
and 0755 folders under umask 022): scratch folders from `tempfile.mkdtemp` are 0700 and safetensors'
`save_file` writes 0600, which would leave a published model unreadable to other users and to
containers running as another uid.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable

from kfdeb.errors import UserInputError


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserInputError(f"{path}: unreadable JSON ({err})") from None


def json_text(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask can only set it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give `path` (a file or folder, and everything under a folder) the mode the umask gives new entries."""
    mask = _umask()
    entries = [Path(path), *Path(path).rglob("*")] if Path(path).is_dir() else [Path(path)]
    for entry in entries:
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(folder: Path) -> None:
    """Make the names in `folder` (a rename into it) durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_file(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """`path` written whole or not at all: `write(handle)` fills a scratch file, fsynced, then renamed."""
    path = Path(path)
    scratch = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(scratch, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        follow_umask(scratch)  # open() already did, unless the file existed: set it all the same
        os.replace(scratch, path)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: Path, text: str) -> None:
    write_file(path, lambda handle: handle.write(text.encode("utf-8")))


def publish_files(scratch: Path, folder: Path, order: Callable[[Path], Any] = lambda _: 0) -> None:
    """Move every file under `scratch` to the same place under `folder`, each by one atomic rename.

    Each file is fsynced before its rename; files go in ascending `order(relative path)`, so a
    reader never sees a file before those it depends on. `scratch` must be on `folder`'s filesystem.
    """
    files = sorted((p.relative_to(scratch) for p in scratch.rglob("*") if p.is_file()), key=lambda p: (order(p), p))
    touched = {folder}
    for relative in files:
        fsync_file(scratch / relative)
        follow_umask(scratch / relative)
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        os.replace(scratch / relative, folder / relative)
        touched.add((folder / relative).parent)
    for parent in touched:
        fsync_dir(parent)


def publish_folder(scratch: Path, final: Path) -> None:
    """Rename the finished folder `scratch` to `final` (absent), its files and the rename made durable."""
    for path in scratch.rglob("*"):
        if path.is_file():
            fsync_file(path)
    follow_umask(scratch)
    fsync_dir(scratch)
    os.rename(scratch, final)
    fsync_dir(final.parent)
