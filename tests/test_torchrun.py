"""torchrun jobs as users run them: nodes without a shared disk, ranks and nodes killed, data that differ, exit."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from kfdeb import train_state
from launch import ENV, assert_same_training, descendants, free_port, kill_trees, start, torchrun, train_args, wait_all


def two_nodes(outputs: list[Path], *extra: str, model, data, port: int | None = None) -> list[subprocess.Popen]:
    """Two torchrun agents on 127.0.0.1 (one rank each), each with its own --output_dir, as on two
    machines that share no disk: node 0's folder gets the run, node 1's is never written. `data`: one
    folder for both, or a list with each node's own copy."""
    port = port or free_port()
    datas = data if isinstance(data, list) else [data, data]
    return [start(torchrun(*train_args(model, datas[rank], out, *extra), nproc=1, nnodes=2, node_rank=rank, port=port))
            for rank, out in enumerate(outputs)]


def test_nodes_whose_data_differ_by_one_row_stop_at_once_naming_the_file(tiny_deberta, ddp_data, tmp_path):
    """Each node reads its own copy of the training files; node 1's NLI file lacks one row. Before the first
    step every rank compares what it built with rank 0's, and both stop with the same line, long before
    --dist_timeout, instead of drifting into collectives that no longer match."""
    copy = shutil.copytree(ddp_data, tmp_path / "node1-data")
    nli = copy / "KorNLI" / "small.train.ko.tsv"
    nli.write_text("".join(nli.read_text(encoding="utf-8").splitlines(keepends=True)[:-1]), encoding="utf-8")
    outputs = [tmp_path / "node0", tmp_path / "node1"]
    started = time.time()
    results = wait_all(two_nodes(outputs, "--dist_timeout", "600", model=tiny_deberta, data=[ddp_data, copy]),
                       tmp_path / "logs", timeout=120)
    assert time.time() - started < 60
    digest = hashlib.sha256(nli.read_bytes()).hexdigest()[:12]
    for status, _, stderr in results:
        assert status != 0
        assert "error: the nodes' data differ: rank 1 on " in stderr
        assert f"has nli training files small.train.ko.tsv ({nli.stat().st_size} bytes, sha256 {digest}), but rank 0 " \
               f"on " in stderr and "give every node the same files (and tokenizer)" in stderr
    assert not (outputs[0] / "state").exists()


def test_two_nodes_without_a_shared_disk_match_the_single_process(tiny_deberta, ddp_data, single_process_run, tmp_path):
    outputs = [tmp_path / "node0", tmp_path / "node1"]
    for status, _, stderr in wait_all(two_nodes(outputs, model=tiny_deberta, data=ddp_data), tmp_path):
        assert status == 0, stderr[-3000:]
    assert_same_training(single_process_run, outputs[0])
    assert (outputs[0] / "best" / "model.safetensors").exists()
    assert not outputs[1].exists()  # rank 0 alone writes; the final evaluation read nothing on node 1
    # each rank its own dropout stream (seed + rank), both saved; the data order is global
    ranks = [train_state.read_part(train_state.latest(outputs[0]), f"rank-{r}")["torch"] for r in (0, 1)]
    assert not torch.equal(ranks[0], ranks[1])


def test_a_killed_rank_ends_the_job_within_a_minute(tiny_deberta, ddp_data, tmp_path):
    out = tmp_path / "killed"
    launcher = subprocess.Popen(torchrun(*train_args(tiny_deberta, ddp_data, out, "--max_steps", "100000",
                                                      "--eval_steps", "100000", "--save_steps", "100000")),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and launcher.poll() is None:  # wait until both ranks are training
        metrics = out / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count("\n") >= 4:
            break
        time.sleep(0.2)
    workers = descendants(launcher.pid)
    assert launcher.poll() is None and len(workers) == 2
    os.kill(max(workers), signal.SIGKILL)  # one rank dies, as on an OOM kill
    killed_at = time.time()
    launcher.wait(timeout=90)
    assert launcher.returncode != 0
    assert time.time() - killed_at < 60
    for pid in workers:  # no orphan left behind
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]


def test_two_nodes_killed_mid_save_resume_to_the_single_process_result(tiny_deberta, ddp_data, single_process_run,
                                                                       tmp_path):
    """Both nodes SIGKILLed mid-run, a save left half-written, then `--resume` on both: the run ends
    where one process ends, with rank 0's disk alone holding the state."""
    outputs = [tmp_path / "node0", tmp_path / "node1"]
    nodes = two_nodes(outputs, model=tiny_deberta, data=ddp_data)
    deadline = time.time() + 120
    while time.time() < deadline and all(node.poll() is None for node in nodes):
        state = train_state.latest(outputs[0])
        if state is not None and int(state.name.split("-")[1]) >= 4:
            # the ranks and their agents at once, as a lost cluster (torchrun starts each rank
            # in a session of its own, so killing the agent's process group would leave them running)
            kill_trees(nodes)
            break
        time.sleep(0.01)
    for status, _, _ in wait_all(nodes, tmp_path / "killed", timeout=60):
        assert status == -signal.SIGKILL
    saved_at = int(train_state.latest(outputs[0]).name.split("-")[1])
    assert saved_at < 12
    # what a kill during the next save leaves: a scratch folder of the step the resumed run saves again
    stray = outputs[0] / "state" / f"step-{saved_at + 4:08d}.tmp-killed"
    stray.mkdir()
    (stray / "train.safetensors").write_bytes(b"half a file")

    # without --resume, rank 0's refusal reaches both nodes at once (no wait for a timeout)
    refused = wait_all(two_nodes(outputs, model=tiny_deberta, data=ddp_data), tmp_path / "refused", timeout=120)
    for status, _, stderr in refused:
        assert status != 0 and "holds a previous run's state; pass --resume" in stderr

    resumed = wait_all(two_nodes(outputs, "--resume", model=tiny_deberta, data=ddp_data), tmp_path / "resumed")
    for status, _, stderr in resumed:
        assert status == 0, stderr[-3000:]
    assert "resumed from" in resumed[0][1]
    assert not stray.exists()
    assert_same_training(single_process_run, outputs[0])
    assert not outputs[1].exists()


def test_a_torchrun_worker_leaves_without_the_interpreter_teardown_where_gloo_aborted():
    """cli.exit_process: under torchrun (WORLD_SIZE > 1) the process leaves with os._exit after flushing, so no
    process-group thread can be caught releasing a collective's tensors inside the interpreter's teardown
    (SIGABRT after a successful run; its agent then skips the exit barrier and the other node waits 300 s).
    One process: a normal exit, teardown included."""
    code = ("import atexit, sys; from kfdeb import cli; atexit.register(lambda: print('teardown ran'));"
            "print('flushed', end=''); sys.stderr.write('err'); cli.exit_process(3)")
    for world, teardown in (("2", False), ("1", True)):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                                env={**ENV, "WORLD_SIZE": world})
        assert result.returncode == 3 and result.stdout.startswith("flushed") and result.stderr == "err"
        assert ("teardown ran" in result.stdout) == teardown, world
