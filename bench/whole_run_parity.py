"""Whole-run quality parity: kfdeb and the reference engine, each with its own data pipeline.

kfdeb: `kfdeb.loop.train` (its triplets, NoDuplicatesBatches, ShuffledBatches). The reference: the
seed repository's training_multi-task.py on sentence-transformers' v2 loop (`old_fit`), i.e.
`load_kor_nli_samples` per NLI file (transcribed below: DictReader, partner sets, random.choice),
lists concatenated, the legacy `NoDuplicatesDataLoader`, `DataLoader(shuffle=True)` for KorSTS,
MultipleNegativesRankingLoss + CosineSimilarityLoss, one AdamW + WarmupLinear per objective,
seeds set as the script sets them (random, numpy, torch).

Recipe (the issue's): all-MiniLM-L6-v2's bare HF encoder + mean pooling on both sides (its
sentence-transformers folder ends in a Normalize module; the script builds models.Transformer +
Pooling), the bundled XNLI dev + test as NLI training data (batch 64) + KorSTS train (batch 8),
1 epoch = min(NLI batches, STS batches) steps, lr 2e-5, warmup ceil(10% of steps), weight decay
0.01, max grad norm 1, max_seq_length 128, fp32. The *final* weights of each run are scored on
KorSTS test by the same evaluator (kfdeb's; it equals the reference's to 4e-4 points).

Every (seed, engine) runs in its own process, one after the other (never two at once: they would
stall each other on 2 cores), the engine order alternating from seed to seed; each writes
OUT/<engine>-seed<seed>.json (per-step losses of both objectives, test figures; OUT defaults to
output/whole-run-parity, which git ignores), and a run whose JSON exists is not repeated, so an
interrupted measurement continues where it stopped.

    pip install -e ".[bench]"
    python bench/whole_run_parity.py --seeds 42 1 2                       # the measurement (~20 min per run on 2 CPU cores)
    python bench/whole_run_parity.py --seeds 42 --max_steps 3             # harness check

Reported: KorSTS test cosine Spearman per run, mean +- sd (n - 1) per engine, the difference of
means and Welch's t; per-step losses: each engine's mean over seeds, smoothed by a moving average
(window --window), the largest |kfdeb - reference| of those curves, against the seed noise (the
largest sd across seeds of one engine's smoothed curve, pooled over the engines); OUT/curves.png.
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

from harness import ENGINES, REPO, git_commit, model_path

# the files of a Hugging Face encoder folder; everything else (modules.json, sentence_bert_config.json,
# 1_Pooling, 2_Normalize) is the sentence-transformers wrapping the recipe does not start from
HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "vocab.txt")


def bare_encoder(model_dir: Path, workdir: Path) -> Path:
    """A folder with only `model_dir`'s HF encoder files (links): both engines load it as encoder + mean pooling."""
    bare = workdir / "bare-encoder"
    bare.mkdir(parents=True, exist_ok=True)
    for name in HF_FILES:
        if (model_dir / name).exists() and not (bare / name).exists():
            (bare / name).symlink_to((model_dir / name).resolve())
    return bare


def kfdeb_recipe(args, out: Path) -> dict:
    """The issue's recipe as kfdeb config values (bench/objectives.py adds its variants' flags)."""
    return {
        "model_name_or_path": args.model_path, "data_dir": args.data_dir, "nli_train_glob": args.nli_train_glob,
        "tasks": "nli,sts", "max_seq_length": args.max_seq_length, "nli_batch_size": 64, "sts_batch_size": 8,
        "num_epochs": 1, "max_steps": args.max_steps, "learning_rate": 2e-5, "warmup_ratio": 0.1, "weight_decay": 0.01,
        "max_grad_norm": 1.0, "optimizer": "per_task", "amp": "none", "seed": args.seed, "device": args.device,
        "eval_steps": 10**9, "save_steps": 10**9, "logging_steps": 1,  # dev only at the (one) epoch end; every loss
        "output_dir": str(out), "overwrite_output_dir": True, "progress": False,
    }


def run_kfdeb(args) -> dict:
    from kfdeb import train_state
    from kfdeb.config import resolve
    from kfdeb.loop import train

    out = Path(args.out) / f"kfdeb-seed{args.seed}"
    config = resolve(kfdeb_recipe(args, out))
    started = time.perf_counter()
    summary = train(config)
    seconds = time.perf_counter() - started
    shutil.rmtree(out / train_state.STATE_DIR)  # resumable state (weights + 2 AdamW states): not needed here
    # one epoch has one dev evaluation, at its last step: the kept model is the final weights
    assert summary["best_step"] == summary["total_steps"], summary
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {task: [r["loss"] for r in rows if r.get("task") == task] for task in ("nli", "sts")}
    # summary["test"]: the kept (= final) model reloaded from disk, through kfdeb's evaluator
    return {"steps": summary["total_steps"], "losses": losses, "test": summary["test"], "seconds": seconds}


def read_kor_sts_samples(path):
    """The seed repository's load_kor_sts_samples."""
    import csv

    from sentence_transformers import InputExample

    with open(path, encoding="utf8") as handle:
        return [InputExample(texts=[row["sentence1"], row["sentence2"]], label=float(row["score"]) / 5.0)
                for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]


def read_kor_nli_samples(path):
    """The seed repository's load_kor_nli_samples (data_util.py): draws from python's `random`."""
    import csv
    import random

    from sentence_transformers import InputExample

    data: dict[str, dict[str, set]] = {}

    def add_to_samples(sent1, sent2, label):
        if sent1 not in data:
            data[sent1] = {"contradiction": set(), "entailment": set(), "neutral": set()}
        data[sent1][label].add(sent2)

    with open(path, encoding="utf-8") as handle:
        for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            sent1, sent2 = row["sentence1"].strip(), row["sentence2"].strip()
            add_to_samples(sent1, sent2, row["gold_label"])
            add_to_samples(sent2, sent1, row["gold_label"])
    samples = []
    for sent1, others in data.items():
        if len(others["entailment"]) > 0 and len(others["contradiction"]) > 0:
            samples.append(InputExample(texts=[sent1, random.choice(list(others["entailment"])),
                                               random.choice(list(others["contradiction"]))]))
            samples.append(InputExample(texts=[random.choice(list(others["entailment"])), sent1,
                                               random.choice(list(others["contradiction"]))]))
    return samples


def recording(loss_module, sink: list):
    """Append each loss value the module returns to `sink` (old_fit keeps none)."""
    forward = loss_module.forward

    def forward_and_record(*inputs, **kwargs):
        value = forward(*inputs, **kwargs)
        sink.append(value.item())
        return value

    loss_module.forward = forward_and_record
    return loss_module


def run_reference(args) -> dict:
    import random

    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.datasets import NoDuplicatesDataLoader
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss, MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from torch.utils.data import DataLoader

    from kfdeb.evaluation import evaluate_split
    from kfdeb.model import load_encoder

    out = Path(args.out) / f"reference-seed{args.seed}"
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    word_embedding_model = Transformer(args.model_path, max_seq_length=args.max_seq_length)
    pooling_model = Pooling(word_embedding_model.get_word_embedding_dimension(), pooling_mode="mean")
    model = SentenceTransformer(modules=[word_embedding_model, pooling_model], device=args.device)
    data_dir = Path(args.data_dir)
    nli_samples = []
    for path in sorted(data_dir.glob(args.nli_train_glob)):  # the script's glob order is the directory's; sorted here
        nli_samples += read_kor_nli_samples(path)
    nli_loader = NoDuplicatesDataLoader(nli_samples, batch_size=64)
    sts_loader = DataLoader(read_kor_sts_samples(data_dir / "KorSTS" / "sts-train.tsv"), shuffle=True, batch_size=8)
    losses: dict[str, list[float]] = {"nli": [], "sts": []}
    objectives = [(nli_loader, recording(MultipleNegativesRankingLoss(model), losses["nli"])),
                  (sts_loader, recording(CosineSimilarityLoss(model=model), losses["sts"]))]
    steps = min(len(nli_loader), len(sts_loader))
    if args.max_steps:
        steps = min(steps, args.max_steps)
    started = time.perf_counter()
    # no evaluator: old_fit then saves the final weights (the script's one dev evaluation at the
    # epoch end would keep the same ones)
    model.old_fit(train_objectives=objectives, epochs=1, steps_per_epoch=steps, warmup_steps=math.ceil(steps * 0.1),
                  optimizer_params={"lr": 2e-5}, weight_decay=0.01, max_grad_norm=1, output_path=str(out),
                  show_progress_bar=False)
    seconds = time.perf_counter() - started
    test = evaluate_split(load_encoder(out, device=args.device), args.data_dir, "test").figures  # the final weights
    return {"steps": steps, "losses": losses, "test": test, "seconds": seconds, "nli_examples": len(nli_samples)}


def child(args) -> None:
    import torch

    from kfdeb.cli import quiet_third_party

    quiet_third_party()
    result = (run_kfdeb if args.engine == "kfdeb" else run_reference)(args)
    result.update(engine=args.engine, seed=args.seed, threads=torch.get_num_threads(), commit=git_commit())
    Path(args.json).write_text(json.dumps(result))


def mean_sd(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return mean, sd


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    return [sum(values[max(0, i + 1 - window): i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))]


def welch_summary(a: list[float], b: list[float]) -> str:
    """Welch's t for mean(a) - mean(b), its Welch-Satterthwaite degrees of freedom, two-sided p and
    the 95% interval of the difference (scipy's t distribution)."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return ""
    (ma, sa), (mb, sb) = mean_sd(a), mean_sd(b)
    va, vb = sa**2 / len(a), sb**2 / len(b)
    if va + vb == 0:
        return ""
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t = (ma - mb) / se
    half = stats.t.ppf(0.975, df) * se
    return (f", Welch t {t:.2f}, df {df:.1f}, two-sided p {2 * stats.t.sf(abs(t), df):.2f}, "
            f"standard error {se:.3f}, 95% interval [{ma - mb - half:+.2f}, {ma - mb + half:+.2f}]")


def summarize(results: dict[str, list[dict]], window: int, out: Path) -> None:
    print("\n| engine | seed | steps | NLI loss first / last | STS loss first / last | test cos Pearson | test cos Spearman |")
    print("|---|---|---|---|---|---|---|")
    for engine in ENGINES:
        for r in results[engine]:
            nli, sts = r["losses"]["nli"], r["losses"]["sts"]
            print(f"| {engine} | {r['seed']} | {r['steps']} | {nli[0]:.4f} / {nli[-1]:.4f} | {sts[0]:.4f} / {sts[-1]:.4f} | "
                  f"{r['test']['cosine_pearson']:.2f} | {r['test']['cosine_spearman']:.2f} |")
    spearman = {engine: [r["test"]["cosine_spearman"] for r in results[engine]] for engine in ENGINES}
    stats = {engine: mean_sd(spearman[engine]) for engine in ENGINES}
    print()
    for engine in ENGINES:
        mean, sd = stats[engine]
        spread = f"+- {sd:.2f}" if len(spearman[engine]) > 1 else "(one seed: no sd)"
        print(f"{engine:9s}: test cos Spearman {mean:.2f} {spread} (n = {len(spearman[engine])})")
    difference = stats["kfdeb"][0] - stats["reference"][0]
    print(f"difference of means kfdeb - reference: {difference:+.3f} points"
          + welch_summary(spearman["kfdeb"], spearman["reference"]))

    # per-step losses: both engines' mean curves, smoothed; the gap between them against the seed spread
    steps = min(len(r["losses"]["nli"]) for engine in ENGINES for r in results[engine])
    curves: dict[str, dict[str, list[float]]] = {}
    for task in ("nli", "sts"):
        noise = 0.0
        for engine in ENGINES:
            smoothed = [moving_average(r["losses"][task][:steps], window) for r in results[engine]]
            curves.setdefault(engine, {})[task] = [sum(col) / len(col) for col in zip(*smoothed)]
            if len(smoothed) > 1:
                noise = max(noise, max(mean_sd(list(col))[1] for col in zip(*smoothed)))
        gap = [abs(a - b) for a, b in zip(curves["kfdeb"][task], curves["reference"][task])]
        worst = max(range(steps), key=gap.__getitem__)
        raw = {engine: sum(sum(r["losses"][task][:steps]) for r in results[engine]) / (steps * len(results[engine]))
               for engine in ENGINES}
        print(f"{task.upper()} loss over {steps} steps: mean kfdeb {raw['kfdeb']:.4f}, reference {raw['reference']:.4f}; "
              f"max |diff| of the {window}-step moving averages {gap[worst]:.4f} (step {worst + 1}); "
              f"largest seed sd of one engine's moving average {noise:.4f}" + (" (one seed: no spread)" if noise == 0 else ""))
    plot(results, curves, window, steps, out / "curves.png")
    print(f"loss curves: {out / 'curves.png'}")


def plot(results: dict[str, list[dict]], curves: dict, window: int, steps: int, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = {"kfdeb": "tab:blue", "reference": "tab:orange"}
    for axis, task in zip(axes, ("nli", "sts")):
        for engine in ENGINES:
            for r in results[engine]:
                axis.plot(range(1, steps + 1), r["losses"][task][:steps], color=colours[engine], alpha=0.2, linewidth=0.8)
            axis.plot(range(1, steps + 1), curves[engine][task], color=colours[engine], linewidth=2,
                      label=f"{engine} (mean of {len(results[engine])}, {window}-step moving average)")
        axis.set_title(f"{task.upper()} loss per step")
        axis.set_xlabel("step")
        axis.legend()
    figure.tight_layout()
    figure.savefig(png, dpi=110)


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe's flags, and the ones a parent passes its child process (bench/objectives.py shares them)."""
    parser.add_argument("--model", default="minilm", help="model folder, or minilm (its bare HF encoder is used)")
    parser.add_argument("--data_dir", default=str(REPO / "kfdeb" / "bundled" / "kor-nlu"))
    parser.add_argument("--nli_train_glob", default="KorNLI/xnli.*.ko.tsv")
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--max_steps", type=int, default=0, help="stop after N steps (harness checks); 0: one epoch")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--model_path", help=argparse.SUPPRESS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(parser)
    parser.add_argument("--window", type=int, default=10, help="moving-average window of the loss comparison")
    parser.add_argument("--out", default=str(REPO / "output" / "whole-run-parity"), help="JSONs, models and curves.png")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        return child(args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = bare_encoder(Path(model_path(args.model, out)), out)
    print(f"model {args.model} (bare encoder {model}), data {args.data_dir} {args.nli_train_glob}, seeds {args.seeds}, "
          f"max_steps {args.max_steps or 'one epoch'}, device {args.device}, commit {git_commit()}", flush=True)
    results: dict[str, list[dict]] = {engine: [] for engine in ENGINES}
    for index, seed in enumerate(args.seeds):
        for engine in ENGINES if index % 2 == 0 else ENGINES[::-1]:
            json_path = out / f"{engine}-seed{seed}{f'-steps{args.max_steps}' if args.max_steps else ''}.json"
            if not json_path.exists():
                started = time.perf_counter()
                command = [sys.executable, __file__, *sys.argv[1:], "--engine", engine, "--seed", str(seed),
                           "--json", str(json_path), "--model_path", str(model)]
                # PYTHONHASHSEED: the reference draws partners from set order, which follows string hashes
                subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"})
                print(f"seed {seed} {engine}: {time.perf_counter() - started:.0f} s", flush=True)
            result = json.loads(json_path.read_text())
            results[engine].append(result)
            print(f"seed {seed} {engine:9s}: {result['steps']} steps, test cos Spearman {result['test']['cosine_spearman']:.2f}",
                  flush=True)
    summarize(results, args.window, out)


if __name__ == "__main__":
    main()
