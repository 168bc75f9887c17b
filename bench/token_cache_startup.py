"""Startup at full KorNLI scale with and without the token cache: wall time and peak memory per process.

    python bench/token_cache_startup.py [--work /tmp/kfdeb-startup] [--scale 1.0]

Writes the synthetic KorNLI train files (bench/synthetic_kornli.py: 942,854 pairs -> 628,568
triplets) plus the bundled KorSTS into WORK/data, empties WORK/cache, then runs, one at a time,

    python train.py --model_name_or_path kfdeb:tiny-deberta --data_dir WORK/data --max_steps 2 ...
      (i)   --no_cache                       every file read and tokenized in memory (the old path)
      (ii)  --cache_dir WORK/cache           first run: builds the cache
      (iii) --cache_dir WORK/cache           second run: a cache hit
      (iv)  the same under torchrun, 2 ranks on this machine: a hit on both

and prints a markdown table: each run's wall time (the command, start to exit) and, per process
(the torchrun agent and each rank apart), its peak RSS (the kernel's VmHWM) and peak PSS
(proportional set size: pages shared between processes, e.g. the cache's memory-mapped arrays
and the libraries, counted once in total, so the ranks' PSS add up to what the job holds). Both
are sampled every 0.1 s from /proc (Linux only). Issue 11's targets, on an idle 2-core machine:
(ii) <= 60 s and <= 1.5 GB, (iii) <= 25 s and <= 0.8 GB, (iv) the second rank adds <= 0.3 GB.

The runs check themselves: (ii) must build, (iii) and (iv) must not, and (i), (ii) and (iii) must
log the same losses. Run it alone on the machine: another busy process distorts every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"build": (60, 1.5), "hit": (25, 0.8)}  # wall s, peak RSS GB


def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    return children


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _pss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def _label(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        command = handle.read().replace(b"\0", b" ").decode(errors="replace")
    if "torch.distributed.run" in command:
        return "torchrun agent"
    with open(f"/proc/{pid}/environ", "rb") as handle:
        env = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)
    return f"rank {env[b'RANK'].decode()}" if b"RANK" in env else "train.py"


class PeakMemory:
    """Peak RSS and PSS (GB) of a process and its descendants, by label, sampled every `interval` s."""

    def __init__(self, root: int, interval: float = 0.1):
        self.root, self.interval = root, interval
        self.peaks: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        labels: dict[int, str] = {}
        while not self._stop.is_set():
            children, pending, pids = _proc_children(), [self.root], []
            while pending:
                pid = pending.pop()
                pids.append(pid)
                pending += children.get(pid, [])
            for pid in pids:
                try:
                    label = labels.get(pid) or labels.setdefault(pid, _label(pid))
                    rss, pss = _status_kb(pid, "VmHWM") / 2**20, _pss_kb(pid) / 2**20
                except (OSError, KeyError):
                    continue  # gone meanwhile
                peak = self.peaks.setdefault(label, {"rss": 0.0, "pss": 0.0})
                peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, dict[str, float]]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def run(name: str, command: list[str], log: Path) -> dict:
    started = time.perf_counter()
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=REPO,
                                   env={**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"})
        memory = PeakMemory(process.pid)
        status = process.wait()
    wall = time.perf_counter() - started
    peaks = memory.stop()
    text = log.read_text()
    if status != 0:
        sys.exit(f"{name} failed (exit {status}); see {log}:\n{text[-3000:]}")
    return {"name": name, "wall_s": wall, "peaks": peaks, "output": text}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def losses(output_dir: Path) -> list:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["task"], r["loss"]) for r in rows if "task" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/kfdeb-startup"))
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of KorNLI's size (1: the real size)")
    args = parser.parse_args()
    data, cache = args.work / "data", args.work / "cache"
    marker = data / f"scale-{args.scale}"
    if not marker.exists():  # generated once per scale; the runs below never write into it
        shutil.rmtree(data, ignore_errors=True)
        subprocess.run([sys.executable, str(REPO / "bench" / "synthetic_kornli.py"), str(data), "--scale", str(args.scale)],
                       check=True)
        marker.touch()
    shutil.rmtree(cache, ignore_errors=True)

    def train(output: str, *extra: str) -> list[str]:
        return [str(REPO / "train.py"), "--model_name_or_path", "kfdeb:tiny-deberta", "--data_dir", str(data),
                "--max_steps", "2", "--device", "cpu", "--progress", "false", "--overwrite_output_dir",
                "--output_dir", str(args.work / output), *extra]

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--rdzv_backend",
                "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--max_restarts", "0"]
    no_cache = run("(i) no cache", [sys.executable, *train("out-no-cache", "--no_cache")], args.work / "no-cache.log")
    assert not cache.exists(), "--no_cache wrote a cache"
    build = run("(ii) first run: build", [sys.executable, *train("out-build", "--cache_dir", str(cache))],
                args.work / "build.log")
    hit = run("(iii) second run: hit", [sys.executable, *train("out-hit", "--cache_dir", str(cache))], args.work / "hit.log")
    two = run("(iv) 2 ranks: hit", [*torchrun, *train("out-2-ranks", "--cache_dir", str(cache))], args.work / "2-ranks.log")
    runs = [no_cache, build, hit, two]
    assert build["output"].count("building the token cache") == 4, "the first run did not build the cache"
    for later in (hit, two):
        assert "building the token cache" not in later["output"] and later["output"].count("(hit)") == 4, later["name"]
    assert losses(args.work / "out-no-cache") == losses(args.work / "out-build") == losses(args.work / "out-hit"), \
        "the cached runs' losses differ from the uncached run's"

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    print(f"\nkfdeb {commit}, {os.cpu_count()} CPUs ({cpu}), data {data} (scale {args.scale}), "
          f"`python bench/token_cache_startup.py --scale {args.scale}`\n")
    print("| run | wall s | process | peak RSS GB | peak PSS GB |\n|---|---|---|---|---|")
    for result in runs:
        for index, (label, peak) in enumerate(sorted(result["peaks"].items())):
            wall = f"{result['wall_s']:.1f}" if index == 0 else ""
            print(f"| {result['name'] if index == 0 else ''} | {wall} | {label} | {peak['rss']:.2f} | {peak['pss']:.2f} |")
    ranks = [peak for label, peak in two["peaks"].items() if label.startswith("rank")]
    single = hit["peaks"]["train.py"]
    print(f"\nsecond rank adds (2-rank job's PSS, ranks summed, minus the 1-process hit's PSS): "
          f"{sum(p['pss'] for p in ranks) - single['pss']:.2f} GB; by RSS: {sum(p['rss'] for p in ranks) - single['rss']:.2f} GB")
    for key, result in (("build", build), ("hit", hit)):
        wall, gigabytes = TARGETS[key]
        rss = result["peaks"]["train.py"]["rss"]
        print(f"{result['name']}: {result['wall_s']:.1f} s (target <= {wall}), {rss:.2f} GB peak RSS (target <= {gigabytes})")


if __name__ == "__main__":
    main()
