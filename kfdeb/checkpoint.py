"""Resumable training state, written atomically, loaded without unpickling.

A state is a nested structure (dicts, lists, numbers, strings, tensors, numpy arrays): model
weights, optimizer moments, schedulers, the grad scaler, RNG states, sampler positions. It is
split into `NAME.safetensors` (every tensor and array, under a numbered key) and `NAME.json`
(everything else, with {"__tensor__": key} where a tensor was).

Atomicity: a state goes to `state/step-NNNNNNNN.tmp-*`, is renamed to `state/step-NNNNNNNN`,
and only then does `state/LATEST` (itself written to a temporary file and renamed) name it.
A run killed at any instant leaves LATEST naming a complete state; older states and stray
temporaries are removed after the switch, and stray temporaries (a save killed midway) also
before a new one starts. rename() within one filesystem is atomic on POSIX.

One process writes a state: the caller (global rank 0) has gathered what the other ranks must
save (`rank-R`: each rank's own RNG) through the process group, so no rank needs to see the
folder, and nodes need no shared filesystem.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from kfdeb.files import publish_folder, write_text

STATE_DIR = "state"
LATEST = "LATEST"


def split(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(a JSON-able skeleton, its tensors by key): a nested state taken apart (see module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    return _encode(state, tensors), tensors


def join(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The nested state that `split` took apart."""
    return _decode(skeleton, tensors)


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value).copy())
        return {"__ndarray__": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"__dict__": {k: _encode(v, tensors) for k, v in value.items()}}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, tensors) for v in value]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a training state")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__ndarray__" in value:
            return tensors[value["__ndarray__"]].numpy()
        if "__dict__" in value:
            return {k: _decode(v, tensors) for k, v in value["__dict__"].items()}
        if "__items__" in value:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
    return value


def write_part(folder: Path, name: str, state: Any) -> None:
    """Write `name.json` + `name.safetensors` for `state` into `folder`."""
    encoded, tensors = split(state)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(encoded), encoding="utf-8")


def read_part(folder: Path, name: str) -> Any:
    tensors = load_file(str(folder / f"{name}.safetensors"))
    return join(json.loads((folder / f"{name}.json").read_text(encoding="utf-8")), tensors)


def begin(output_dir: str | os.PathLike, step: int) -> Path:
    """A fresh temporary folder for the state of `step`; stray ones of killed saves are removed first."""
    root = Path(output_dir) / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stray in root.glob("step-*.tmp-*"):
        shutil.rmtree(stray, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"step-{step:08d}.tmp-", dir=root))


def commit(scratch: Path, step: int) -> Path:
    """Make the state in `scratch` the latest, atomically; drop older states and stray temporaries."""
    root = scratch.parent
    final = root / f"step-{step:08d}"
    if final.exists():  # a resumed run repeating a step it had already saved
        shutil.rmtree(final)
    publish_folder(scratch, final)  # its files synced to disk before the rename (files.py)
    write_text(root / LATEST, final.name + "\n")
    for entry in root.iterdir():
        if entry.name not in (final.name, LATEST):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
    return final


def latest(output_dir: str | os.PathLike) -> Path | None:
    """The folder LATEST names, or None when no state was committed."""
    pointer = Path(output_dir) / STATE_DIR / LATEST
    if not pointer.is_file():
        return None
    folder = pointer.parent / pointer.read_text(encoding="utf-8").strip()
    return folder if folder.is_dir() else None
