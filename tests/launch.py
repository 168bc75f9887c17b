"""Launching torchrun jobs from tests: ports, commands, and waiting with every node's output kept.

- Ports: one torchrun agent (`--standalone`) binds a free port itself, so a single-node job has no
  port to race for. Two agents (two "nodes" on 127.0.0.1) need a port agreed in advance:
  `free_port` picks one *below* the kernel's ephemeral range (ip_local_port_range), which
  outgoing connections never take, so between the check and the agent's bind only another
  explicit listener could take it (a port from bind(0) is an ephemeral one, which any process's
  next outgoing connection, gloo's included, may be handed in that interval).
- Waiting: `wait_all` drains every node's pipes at once, writes each node's status, command,
  port, stdout and stderr to LOG_DIR (default: pytest's tmp folder of the test), and on its
  timeout kills every process of every node (torchrun starts each worker in a session of its
  own, so the workers are found as descendants in /proc) before it fails with all outputs.
  Its default timeout (200 s) is shorter than torchrun's own exit barrier (300 s: an agent
  whose workers succeeded waits that long for the other nodes' agents), so a test timeout is
  never mistaken for, nor hidden by, an agent waiting for a failed node.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from kfdeb import train_state

REPO = Path(__file__).resolve().parents[1]

ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONFAULTHANDLER": "1"}  # a worker that dies of a signal leaves its Python stacks in its stderr
WAIT_TIMEOUT = 200  # < torchrun's 300 s exit barrier


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A port no one listens on, outside the ephemeral range (module docstring)."""
    low, _ = _ephemeral_range()
    candidates = list(range(max(1024, low - 12000), low))
    random.SystemRandom().shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def torchrun(*args: str, nproc: int = 2, nnodes: int = 1, node_rank: int | None = None,
             port: int | None = None) -> list[str]:
    """`python -m torch.distributed.run` for one node (--standalone: it picks its own port) or, with
    node_rank and port, one of `nnodes` agents with a static rendezvous (README's command for nodes
    without a shared disk: node 0 holds the run's folder)."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
               "--max_restarts", "0"]
    if node_rank is None:
        command.append("--standalone")
    else:
        command += [f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}"]
    return command + list(args)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, found through /proc (a torchrun worker sits in a session of its own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def kill_trees(processes: list[subprocess.Popen]) -> None:
    """SIGKILL every process of every tree, workers first seen before any agent dies (an orphan is reparented)."""
    victims = [pid for process in processes for pid in descendants(process.pid)] + [p.pid for p in processes]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start(command: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or ENV)


def wait_all(nodes: list[subprocess.Popen], log_dir: Path, timeout: float = WAIT_TIMEOUT,
             name: str = "node") -> list[tuple[int, str, str]]:
    """(status, stdout, stderr) of each process, all pipes drained at once (a node blocked on a full pipe
    would stall the others in their next collective); every output kept in log_dir (module docstring)."""
    started = time.time()
    with ThreadPoolExecutor(len(nodes)) as pool:
        futures = [pool.submit(node.communicate) for node in nodes]
        while time.time() < started + timeout and not all(f.done() for f in futures):
            time.sleep(0.1)
        timed_out = not all(f.done() for f in futures)
        if timed_out:
            kill_trees(nodes)
        outputs = [f.result() for f in futures]
    results = [(node.returncode, out, err) for node, (out, err) in zip(nodes, outputs)]
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = []
    for index, (node, (status, out, err)) in enumerate(zip(nodes, results)):
        log = log_dir / f"{name}{index}-{node.pid}.log"
        log.write_text(f"status {status} after {time.time() - started:.1f} s{' (killed: timeout)' if timed_out else ''}\n"
                       f"command {' '.join(map(str, node.args))}\n--- stdout\n{out}\n--- stderr\n{err}\n")
        logs.append(log)
    if timed_out:
        tails = "\n".join(f"{log}:\n{log.read_text()[-2500:]}" for log in logs)
        raise AssertionError(f"timed out after {timeout:.0f} s; every process killed; outputs:\n{tails}")
    return results


# the runs the data-parallel tests compare ------------------------------------------------------------

def train_args(model, data, out, *extra) -> list[str]:
    return [str(REPO / "train.py"), "--model_name_or_path", str(model), "--data_dir", str(data),
            "--nli_train_glob", "KorNLI/*.train.ko.tsv", "--nli_batch_size", "16", "--sts_batch_size", "4",
            "--max_seq_length", "64", "--max_steps", "12", "--eval_steps", "4", "--save_steps", "4",
            "--logging_steps", "1", "--learning_rate", "1e-4", "--device", "cpu", "--output_dir", str(out),
            "--progress", "false", *extra]


def losses_and_weights(out: Path):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {(r["step"], r["task"]): (r["loss"], r["grad_norm"]) for r in rows if "task" in r}
    return losses, train_state.read_part(train_state.latest(out), "train")["model"]


def assert_same_training(reference: Path, other: Path) -> None:
    expected_losses, expected_weights = losses_and_weights(reference)
    losses, weights = losses_and_weights(other)
    assert sorted(losses) == sorted(expected_losses) and len(losses) == 24  # 12 steps x (NLI, STS)
    for key, (loss, grad_norm) in expected_losses.items():
        assert losses[key][0] == pytest.approx(loss, abs=1e-5), key
        # Adam's step does not see a gradient's scale; the clipped norm does: a mis-scaled DDP loss shows here
        assert losses[key][1] == pytest.approx(grad_norm, rel=1e-4), key
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-5, msg=name)
