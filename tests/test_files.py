"""kfdeb/files.py: what kfdeb publishes has the modes the process umask gives, atomically written as before."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest
import torch

from kfdeb.files import publish_files, publish_folder, write_text


@contextlib.contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def modes(root: Path) -> dict[str, int]:
    """Every entry under `root` (root included) -> its permission bits."""
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def expected_modes(root: Path, mask: int) -> dict[str, int]:
    return {str(p.relative_to(root)): (0o777 if p.is_dir() else 0o666) & ~mask for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_published_files_and_folders_follow_the_umask(tmp_path, mask):
    """safetensors' save_file writes 0600 and mkdtemp makes 0700: published, they get what open/mkdir would give."""
    import tempfile

    from safetensors.torch import save_file

    with umask(mask):
        scratch = Path(tempfile.mkdtemp(dir=tmp_path))
        save_file({"w": torch.zeros(2)}, str(scratch / "model.safetensors"))
        (scratch / "sub").mkdir()
        (scratch / "sub" / "a.json").write_text("{}")
        assert stat.S_IMODE((scratch / "model.safetensors").stat().st_mode) == 0o600  # what the library does
        publish_files(scratch, tmp_path / "files")
        scratch = Path(tempfile.mkdtemp(dir=tmp_path))
        save_file({"w": torch.zeros(2)}, str(scratch / "model.safetensors"))
        publish_folder(scratch, tmp_path / "folder")
        write_text(tmp_path / "text.txt", "x")
    for root in (tmp_path / "files", tmp_path / "folder"):
        assert modes(root) == expected_modes(root, mask)
    assert stat.S_IMODE((tmp_path / "text.txt").stat().st_mode) == 0o666 & ~mask


def test_a_runs_best_folder_state_and_export_are_readable_by_others(tiny_deberta, small_data, tmp_path):
    """A whole (tiny) run and its export under umask 022 and 027: best/ (the folder to publish), the state and the
    ONNX folder get the umask's modes, not safetensors' 0600 or mkdtemp's 0700."""
    from kfdeb import cli
    from kfdeb.loop import train
    from test_loop import small_config

    for mask in (0o022, 0o027):
        out = tmp_path / f"run-{mask:o}"
        with umask(mask):
            train(small_config(tiny_deberta, small_data, out, max_steps=2, eval_steps=2, save_steps=2, logging_steps=1))
            assert cli.export_main([str(out), "--max_seq_length", "32"]) == 0
        for root in (out / "best", out / "state", out / "best" / "onnx"):
            assert modes(root) == expected_modes(root, mask), root
