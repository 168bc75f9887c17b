"""README.md's bash blocks, run exactly as written (.ci/run step 3, in a fresh venv; not part of the suite).

A copy of this checkout (its tracked and unignored files: what a clone has), then, in README order, every
block that does not say what it needs (tests/test_readme.py reads the blocks): the first is the main command
(`pip install ... && python train.py --preset smoke && python evaluate.py output/smoke`), the others build on
what it left (`output/smoke/best`), as a newcomer following the README would. `python` and `pip` are this
venv's. A block that fails names its README line and shows the end of its output.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO
from test_readme import readme_blocks


def clone_like_copy(target: Path) -> Path:
    """The files a fresh clone of this checkout has (tracked and unignored), as they are in the work tree."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def test_every_unmarked_readme_block_runs_as_written(tmp_path):
    clone = clone_like_copy(tmp_path / "kfdeb")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("PYTHONPATH", None)
    ran, skipped = [], []
    for block in readme_blocks(clone / "README.md"):
        if block.needs is not None:
            skipped.append(f"README line {block.line}: {block.needs}")
            continue
        started = time.monotonic()
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.text], cwd=clone, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1200)
        print(f"README line {block.line}: exit {done.returncode} in {time.monotonic() - started:.0f} s")
        assert done.returncode == 0, f"README line {block.line} failed:\n{block.text}\n...\n{done.stdout[-4000:]}"
        ran.append(block.line)
    print("not run here:\n  " + "\n  ".join(skipped))
    assert ran and ran[0] == readme_blocks(clone / "README.md")[0].line  # the main command first
