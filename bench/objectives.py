"""STS losses and Matryoshka widths on the seed's recipe (issue 12): cosine MSE vs CoSENT vs AnglE,
and an MRL model's per-width KorSTS table against the plain model truncated to the same widths.

Recipe: the one of bench/whole_run_parity.py (kfdeb side): all-MiniLM-L6-v2's bare HF encoder +
mean pooling, bundled XNLI dev + test triplets (batch 64) + KorSTS train (batch 8), 1 epoch = 78
steps, per-task AdamW lr 2e-5, warmup 10%, weight decay 0.01, clip 1, max_seq_length 128, fp32; the
final weights (the one dev evaluation is at the last step) scored on KorSTS test. Variants:

    cosine   --sts_loss cosine (the reference recipe)
    cosent   --sts_loss cosent
    angle    --sts_loss angle
    mrl      --sts_loss cosine --matryoshka_dims 384,256,128,64,32 (weights 1)

Every run is scored at the full width and at each of 384, 256, 128, 64, 32 (prefixes of the
embedding, as evaluate.py --dims). Nothing is tuned on KorSTS test: the settings above are fixed.

Every (variant, seed) runs in its own process, one after the other; each writes
OUT/<variant>-seed<seed>.json and a run whose JSON exists is not repeated. The cosine variant is the
very configuration of whole_run_parity.py's kfdeb runs: with --cosine_runs DIR, a finished
DIR/kfdeb-seed<seed>/ of that bench (its train_config.json must equal the one built here, output dir
aside) is scored instead of being trained again.

    pip install -e ".[bench]"
    python bench/objectives.py --seeds 42 1 2 [--cosine_runs output/whole-run-parity]   # ~15 min per run, 2 cores
    python bench/objectives.py --seeds 42 1 2 --report                                  # the runs done so far
    python bench/objectives.py --seeds 42 --variants mrl --max_steps 3                  # harness check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from harness import REPO, git_commit, model_path
from whole_run_parity import add_recipe_arguments, bare_encoder, kfdeb_recipe

VARIANTS = {
    "cosine": {"sts_loss": "cosine"},
    "cosent": {"sts_loss": "cosent"},
    "angle": {"sts_loss": "angle"},
    "mrl": {"sts_loss": "cosine", "matryoshka_dims": "384,256,128,64,32"},
}
DIMS = (384, 256, 128, 64, 32)


def recipe(args, out: Path, variant: str) -> dict:
    """whole_run_parity.py's kfdeb config, plus the variant's flags."""
    return {**kfdeb_recipe(args, out), **VARIANTS[variant]}


def data_digest(data_dir: str, nli_train_glob: str) -> str:
    """sha256 over the files the recipe reads (another checkout's bundled copy is the same data)."""
    import hashlib

    digest = hashlib.sha256()
    root = Path(data_dir)
    for path in sorted(root.glob(nli_train_glob)) + sorted((root / "KorSTS").glob("sts-*.tsv")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def child(args) -> None:
    import torch

    from kfdeb import train_state
    from kfdeb.cli import quiet_third_party
    from kfdeb.config import resolve
    from kfdeb.evaluation import evaluate_split
    from kfdeb.loop import train
    from kfdeb.model import load_encoder

    quiet_third_party()
    out = Path(args.out) / f"{args.variant}-seed{args.seed}"
    config = resolve(recipe(args, out, args.variant))
    reused = Path(args.cosine_runs) / f"kfdeb-seed{args.seed}" if args.variant == "cosine" and args.cosine_runs else None
    seconds = None
    if reused is not None and (reused / "best" / "model.safetensors").exists():
        saved = json.loads((reused / "train_config.json").read_text())
        mine = config.to_dict()
        # the same weights behind either bench's bare-encoder folder of links; keys the older run lacks are defaults
        same_model = (Path(saved["model_name_or_path"], "model.safetensors").resolve()
                      == Path(mine["model_name_or_path"], "model.safetensors").resolve())
        same_data = data_digest(saved["data_dir"], saved["nli_train_glob"]) == data_digest(args.data_dir, args.nli_train_glob)
        differing = sorted(k for k in set(saved) | set(mine) if k not in ("output_dir", "model_name_or_path", "data_dir")
                           and saved.get(k, mine.get(k)) != mine.get(k))
        differing += ([] if same_model else ["model_name_or_path"]) + ([] if same_data else ["data_dir"])
        if differing:
            raise SystemExit(f"{reused}: not this recipe ({', '.join(differing)} differ); run without --cosine_runs")
        out = reused
    else:
        started = time.perf_counter()
        summary = train(config)
        seconds = time.perf_counter() - started
        shutil.rmtree(out / train_state.STATE_DIR)
        assert summary["best_step"] == summary["total_steps"], summary  # one dev evaluation: the final weights
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {task: [r["loss"] for r in rows if r.get("task") == task] for task in ("nli", "sts")}
    result = evaluate_split(load_encoder(out, device=args.device), args.data_dir, "test", dims=DIMS)
    Path(args.json).write_text(json.dumps({
        "variant": args.variant, "seed": args.seed, "losses": losses, "seconds": seconds, "reused_from": str(reused or ""),
        "test": result.figures, "test_by_dim": {str(d): f for d, f in result.by_dim.items()},
        "threads": torch.get_num_threads(), "commit": git_commit()}))


def mean_sd(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return mean, sd


def cell(values: list[float]) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:.2f} ± {sd:.2f}" if len(values) > 1 else f"{mean:.2f}"


def summarize(results: dict[str, list[dict]]) -> None:
    print("\n| variant | seeds | test cos Spearman per seed | mean ± sd | test cos Pearson mean ± sd |")
    print("|---|---|---|---|---|")
    for variant, runs in results.items():
        if runs:
            spearman = [r["test"]["cosine_spearman"] for r in runs]
            pearson = [r["test"]["cosine_pearson"] for r in runs]
            print(f"| {variant} | {', '.join(str(r['seed']) for r in runs)} | "
                  f"{' / '.join(f'{v:.2f}' for v in spearman)} | {cell(spearman)} | {cell(pearson)} |")
    print("\nKorSTS test cosine Spearman at each width (prefix of the embedding), mean ± sd over seeds:\n")
    print("| variant | " + " | ".join(str(d) for d in DIMS) + " |")
    print("|---|" + "---|" * len(DIMS))
    for variant, runs in results.items():
        if runs:
            print(f"| {variant} | " + " | ".join(cell([r["test_by_dim"][str(d)]["cosine_spearman"] for r in runs])
                                          for d in DIMS) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(parser)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--cosine_runs", default="", help="whole_run_parity.py's output folder: score its kfdeb runs "
                                                         "as the cosine variant instead of training them again")
    parser.add_argument("--out", default=str(REPO / "output" / "objectives"), help="JSONs and models")
    parser.add_argument("--report", action="store_true", help="run nothing: summarize the runs whose JSON exists")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return child(args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = bare_encoder(Path(model_path(args.model, out)), out)
    print(f"model {args.model} (bare encoder {model}), variants {args.variants}, seeds {args.seeds}, "
          f"max_steps {args.max_steps or 'one epoch'}, commit {git_commit()}", flush=True)
    results: dict[str, list[dict]] = {variant: [] for variant in args.variants}
    for seed in args.seeds:
        for variant in args.variants:
            json_path = out / f"{variant}-seed{seed}{f'-steps{args.max_steps}' if args.max_steps else ''}.json"
            if args.report and not json_path.exists():
                continue
            if not json_path.exists():
                started = time.perf_counter()
                command = [sys.executable, __file__, "--variant", variant, "--seed", str(seed), "--json", str(json_path),
                           "--model_path", str(model), "--data_dir", args.data_dir, "--nli_train_glob", args.nli_train_glob,
                           "--max_seq_length", str(args.max_seq_length), "--max_steps", str(args.max_steps),
                           "--device", args.device, "--out", str(out), "--cosine_runs", args.cosine_runs]
                if subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode:
                    sys.exit(f"{variant} seed {seed}: failed (its message above)")
                print(f"{variant} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
            result = json.loads(json_path.read_text())
            results[variant].append(result)
            print(f"{variant} seed {seed}: test cos Spearman {result['test']['cosine_spearman']:.2f}, at widths "
                  + ", ".join(f"{d} {result['test_by_dim'][str(d)]['cosine_spearman']:.2f}" for d in DIMS), flush=True)
    summarize(results)


if __name__ == "__main__":
    main()
