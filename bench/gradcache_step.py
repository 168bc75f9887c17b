"""GradCache: peak memory and speed of one NLI step, with and without --nli_mini_batch_size.

One training step of the NLI objective (forward, loss, backward, clip + AdamW) on kf-deberta-base's
shape (random weights, bench/harness.py), bundled XNLI triplets, max_seq_length 64, fp32, CPU.
Each configuration runs in a fresh process, one after the other, so each has its own peak RSS.

    python bench/gradcache_step.py                                  # batch 64 and 256 x mini 16, 32, off
    python bench/gradcache_step.py --configs 256:16 256:32 64:0     # batch:mini (0 = off)

Reported per configuration: seconds of the step, triplets/s, peak RSS of the process (model,
AdamW moments and the step's activations), and the step's seconds over the uncached step of the
same batch where that one ran (GradCache's one extra forward should cost about a third).
A configuration killed for memory is reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import REPO, git_commit, model_path


def child(args) -> None:
    limit = int(args.memory_limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    import torch

    from kfdeb import distributed
    from kfdeb.cli import quiet_third_party
    from kfdeb.config import BUNDLED, resolve
    from kfdeb.loop import cached_nli_backward, task_loss, update
    from kfdeb.run import setup

    quiet_third_party()
    batch, mini = args.batch, args.mini
    config = resolve({"model_name_or_path": args.model_path, "data_dir": BUNDLED, "nli_train_glob": "KorNLI/xnli.*.ko.tsv",
                      "tasks": "nli", "nli_batch_size": batch, "nli_mini_batch_size": mini, "max_seq_length": 64,
                      "output_dir": str(Path(args.workdir) / f"run-{batch}-{mini}"), "overwrite_output_dir": True,
                      "progress": False, "device": "cpu", "amp": "none"})
    run = setup(config, distributed.Context(0, 0, 1, torch.device("cpu")))
    parts = run.parts
    task = parts.tasks[0]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    parts.model.train()
    started = time.perf_counter()
    batch = task.rank_batch(task.sampler.next_batch(), run.ctx)
    if mini:
        loss = cached_nli_backward(run, task, batch, mini)
    else:
        loss = task_loss(parts.model, task, batch, run.ctx, parts.encoder.pad_id, 1)
        loss.backward()
    update(parts.parameters, parts.optimizers[0], parts.schedulers[0], None, 1.0)
    seconds = time.perf_counter() - started
    result = {"batch": batch, "mini": mini, "seconds": seconds, "loss": loss.item(),
              "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "rss_before_step_gb": rss_before,
              "threads": torch.get_num_threads()}
    Path(args.json).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["64:0", "64:16", "64:32", "256:16", "256:32", "256:0"],
                        help="batch:mini_batch pairs (mini 0: GradCache off)")
    parser.add_argument("--model", default="deberta-base-random")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--memory_limit_gb", type=float, default=18.0,
                        help="cap on each child's heap (RLIMIT_DATA), so a configuration that does not fit fails "
                             "alone instead of waking the OOM killer")
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mini", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--model_path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.json:
        child(args)
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kfdeb-gradcache-"))
    path = model_path(args.model, workdir)
    results = []
    for spec in args.configs:
        batch, mini = (int(x) for x in spec.split(":"))
        json_path = workdir / f"{batch}-{mini}.json"
        done = subprocess.run([sys.executable, __file__, "--batch", str(batch), "--mini", str(mini), "--json", str(json_path),
                               "--model_path", path, "--workdir", str(workdir), "--memory_limit_gb",
                               str(args.memory_limit_gb)], env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode == 0:
            results.append(json.loads(json_path.read_text()))
        else:  # over --memory_limit_gb (an allocation failed), or -9: the kernel's OOM killer
            results.append({"batch": batch, "mini": mini, "failed": done.returncode})
        print(results[-1], flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"\ncommit {git_commit()}, {cpu}, {os.cpu_count()} CPUs, command: python bench/gradcache_step.py "
          f"--configs {' '.join(args.configs)}\n")
    print("| NLI batch | mini-batch | step s | triplets/s | peak RSS GB | step s / uncached step s |\n|---|---|---|---|---|---|")
    plain = {r["batch"]: r["seconds"] for r in results if r.get("mini") == 0 and "seconds" in r}
    for r in results:
        mini = r["mini"] or "off"
        if "failed" in r:
            why = ("killed (out of memory)" if r["failed"] in (-9, 137)
                   else f"does not fit in {args.memory_limit_gb:g} GB (exit {r['failed']})")
            print(f"| {r['batch']} | {mini} | {why} | | | |")
            continue
        ratio = f"{r['seconds'] / plain[r['batch']]:.2f}" if r["batch"] in plain else "-"
        print(f"| {r['batch']} | {mini} | {r['seconds']:.1f} | {r['batch'] / r['seconds']:.2f} | {r['peak_gb']:.2f} | {ratio} |")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
