"""Training for retrieval (issues 26, 28): in-batch negatives only, + the NLI contradiction, + 3 mined negatives.

Data: the bundled XNLI **dev** file (retrieval experiments never train on xnli.test.ko.tsv, which the
xnli-test set is built from; kfdeb refuses that mix): each premise -> its entailment hypothesis.
830 premises, 830 pairs. Variants, each 3 epochs of the in-batch objective alone (--tasks nli): 36
updates (12 an epoch), about the 39 of one epoch of the 2,499 dev + test pairs that issue 28's MiniLM table trained on
(a choice made before any run, not tuned on test); batch 64 (the seed recipe's NLI batch), lr 2e-5,
warmup 10%, max_seq_length 128, fp32, the model's own prompts (e5's `query: ` / `passage: `, none for
MiniLM):

    pairs      (anchor, positive): in-batch negatives only
    triplets   (anchor, positive, contradiction): the seed's triplets
    mined      (anchor, positive, negative_1..3): 3 negatives mined by the *untrained* model with
               mine.py's defaults and --relative_margin 0.05 over the distinct positives, n-tuple
               output (rows that cannot get 3 are dropped, as the reference does; their count is reported).
               Few rows sharing many texts: when kfdeb's no-duplicates sampler cannot fill batches of 64
               from them, the batch is halved until it can (`fillable_batch_size`, checked before
               training; MiniLM's 157 rows train at 32), same 3 epochs
    mined-pairs the mined rows' (anchor, positive) alone, at mined's batch size: the control that
               separates what the mined negatives add from what keeping only those rows does

Scored (final weights; nothing is tuned on test): nDCG@10 and Recall@1 on the bundled korsts-test and
xnli-test retrieval sets, and KorSTS test cosine Spearman; the untrained model too ("none").
Each (model, variant, seed) runs in its own process, one after the other, and writes
OUT/<model>-<variant>-seed<seed>.json; a run whose JSON exists is not repeated.

    pip install -e ".[bench]"
    python bench/retriever_training.py --models minilm e5 --seeds 42 1 2
    python bench/retriever_training.py --models minilm e5 --seeds 42 1 2 --report
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

VARIANTS = ("none", "pairs", "triplets", "mined-pairs", "mined")
SETS = ("korsts-test", "xnli-test")


def training_files(out: Path, model: str, name: str) -> dict[str, Path]:
    """The variants' files in the own-data formats, written once per model (the mined file needs the model)."""
    from kfdeb.readers import BUNDLED_DATA_DIR, read_nli

    pairs = read_nli(BUNDLED_DATA_DIR / "KorNLI" / "xnli.dev.ko.tsv").pairs
    partners: dict[str, dict[str, str]] = {}
    for premise, hypothesis, label in pairs:
        partners.setdefault(premise, {}).setdefault(label, hypothesis)  # the first of each label, in file order
    rows = [(p, by["entailment"], by.get("contradiction")) for p, by in partners.items() if "entailment" in by]
    files = {"pairs": out / "xnli-dev-pairs.jsonl", "triplets": out / "xnli-dev-triplets.jsonl",
             "mined": out / f"xnli-dev-mined-{name}.jsonl"}
    if not files["pairs"].exists():
        files["pairs"].write_text("".join(json.dumps({"anchor": a, "positive": p}, ensure_ascii=False) + "\n"
                                          for a, p, _ in rows), encoding="utf-8")
        files["triplets"].write_text("".join(json.dumps({"anchor": a, "positive": p, "negative": n}, ensure_ascii=False)
                                             + "\n" for a, p, n in rows if n), encoding="utf-8")
    if not files["mined"].exists():
        log = subprocess.run([sys.executable, str(REPO / "mine.py"), model, "--pairs", str(files["pairs"]), "--output",
                              str(files["mined"]), "--num_negatives", "3", "--relative_margin", "0.05",
                              "--output_format", "n-tuple", "--progress", "false"],
                             capture_output=True, text=True, check=True).stdout
        (out / f"{files['mined'].stem}.log").write_text(log)
    files["mined-pairs"] = out / f"xnli-dev-mined-{name}-pairs.jsonl"
    if not files["mined-pairs"].exists():  # the mined rows without their negatives: the control for "mined"
        files["mined-pairs"].write_text("".join(
            json.dumps({"anchor": row["anchor"], "positive": row["positive"]}, ensure_ascii=False) + "\n"
            for row in map(json.loads, files["mined"].open(encoding="utf-8"))), encoding="utf-8")
    return files


def fillable_batch_size(rows: list[tuple[str, ...]], seed: int, epochs: int = 3) -> int:
    """64, or the largest power of two below it whose batches kfdeb's no-duplicates sampler can fill for
    `epochs` epochs of these rows at this seed (checked by drawing them, before any training).

    Only the mined files can need less: margin mining drops the rows it cannot give 3 negatives, and
    the negatives it keeps are other rows' positives, so few rows share many texts (MiniLM keeps 157
    of 830 rows, and no batch of 64 of them is free of repeats). A feasibility rule fixed before any
    run, not a choice made by looking at scores."""
    from kfdeb.batching import NoDuplicatesBatches
    from kfdeb.errors import UserInputError

    batch_size = 64
    while True:
        try:
            sampler = NoDuplicatesBatches(rows, batch_size, seed)
            for _ in range(epochs * len(sampler)):
                sampler.next_batch()
            return batch_size
        except UserInputError:
            if batch_size == 1:
                raise
            batch_size //= 2


def child(args) -> None:
    import torch

    from kfdeb import train_state
    from kfdeb.cli import quiet_third_party
    from kfdeb.config import resolve
    from kfdeb.distributed import Context
    from kfdeb.evaluation import evaluate_split
    from kfdeb.ir_data import read_ir_data
    from kfdeb.loop import train
    from kfdeb.model import load_encoder
    from kfdeb.readers import BUNDLED_DATA_DIR
    from kfdeb.retrieval import evaluate_retrieval
    from kfdeb.tasks import read_own_in_batch_rows

    quiet_third_party()
    out = Path(args.out)
    files = training_files(out, args.model_path, args.name)
    seconds, rows, best_step, batch_size = None, None, None, None
    folder = Path(args.model_path)
    if args.variant != "none":
        run = out / f"{args.name}-{args.variant}-seed{args.seed}"
        recipe = {"model_name_or_path": args.model_path, "tasks": "nli", "num_epochs": 3, "learning_rate": 2e-5,
                  "warmup_ratio": 0.1, "max_seq_length": 128, "seed": args.seed, "eval_steps": 100000,
                  "save_steps": 100000, "output_dir": str(run), "overwrite_output_dir": True,
                  "data_dir": str(BUNDLED_DATA_DIR), "progress": False, "device": args.device,
                  "metric_for_best": "max_spearman"}  # KorSTS dev at each epoch end, as before metric auto
        cpu = Context(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
        # the rows as the training reads them; mined-pairs trains as mined does (same rows, batch and
        # updates), only without the negatives
        sampled = read_own_in_batch_rows(resolve({**recipe, "nli_train_files": str(
            files["mined" if args.variant == "mined-pairs" else args.variant])}), cpu)
        batch_size = fillable_batch_size(sampled, args.seed)
        rows = len(sampled)
        config = resolve({**recipe, "nli_train_files": str(files[args.variant]), "nli_batch_size": batch_size})
        started = time.perf_counter()
        summary = train(config)
        seconds = time.perf_counter() - started
        best_step = summary["best_step"]
        folder = run / "best"
    encoder = load_encoder(folder, device=args.device, max_seq_length=128)
    if args.variant != "none":
        # the final weights are scored, not the dev-best (dev is evaluated at each epoch end): they sit in
        # the resumable state the run wrote at its last step
        final = train_state.read_part(train_state.latest(run), "train")
        assert final["progress"]["step"] == summary["total_steps"], final["progress"]
        encoder.load_state_dict(final["model"])
        shutil.rmtree(run / train_state.STATE_DIR, ignore_errors=True)  # weights + AdamW state: not needed any more
    result = {"model": args.name, "variant": args.variant, "seed": args.seed, "rows": rows,
              "batch_size": batch_size,
              "updates": summary["total_steps"] if args.variant != "none" else None, "seconds": seconds, "dev_best_step": best_step,
              "threads": torch.get_num_threads(), "commit": git_commit(), "prompts": encoder.prompts,
              "korsts_test": evaluate_split(encoder, BUNDLED_DATA_DIR, "test").figures}
    for name in SETS:
        split = name.split("-")[1]
        result[name] = evaluate_retrieval(encoder, read_ir_data(f"kfdeb:{name}", split)).figures
    Path(args.json).write_text(json.dumps(result))


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.2f} ± {sd:.2f}"


def summarize(results: list[dict]) -> None:
    print("\n| model | training data | rows | batch, updates | seeds | korsts-test nDCG@10 | korsts-test R@1 | xnli-test nDCG@10 "
          "| xnli-test R@1 | KorSTS test cos Spearman |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model in dict.fromkeys(r["model"] for r in results):
        for variant in VARIANTS:
            runs = [r for r in results if r["model"] == model and r["variant"] == variant]
            if not runs:
                continue
            figure = lambda key, metric: cell([r[key][metric] for r in runs])  # noqa: E731
            # batch and updates: the JSONs written before they were recorded trained at 64, 36 updates
            shape = "-" if variant == "none" else f"{runs[0].get('batch_size', 64)}, {runs[0].get('updates', 36)}"
            print(f"| {model} | {variant} | {runs[0]['rows'] or '-'} | {shape} | {', '.join(str(r['seed']) for r in runs)} | "
                  f"{figure('korsts-test', 'ndcg@10')} | {figure('korsts-test', 'recall@1')} | "
                  f"{figure('xnli-test', 'ndcg@10')} | {figure('xnli-test', 'recall@1')} | "
                  f"{figure('korsts_test', 'cosine_spearman')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm", "e5"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(REPO / "output" / "retriever-training"))
    parser.add_argument("--cache", default=str(REPO / "output" / "bench-models"), help="where e5 is built")
    parser.add_argument("--report", action="store_true", help="run nothing: summarize the JSONs there are")
    for hidden in ("--variant", "--seed", "--json", "--model_path", "--name"):
        parser.add_argument(hidden, help=argparse.SUPPRESS, type=int if hidden == "--seed" else str)
    args = parser.parse_args()
    if args.variant:
        return child(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for model in args.models:
        path = model_path(model, Path(args.cache))
        for seed in args.seeds:
            for variant in args.variants:
                if variant == "none" and seed != args.seeds[0]:
                    continue  # the untrained model has no seed
                json_path = out / f"{model}-{variant}-seed{seed}.json"
                if not json_path.exists() and not args.report:
                    started = time.perf_counter()
                    command = [sys.executable, __file__, "--variant", variant, "--seed", str(seed), "--json",
                               str(json_path), "--model_path", path, "--name", model, "--out", str(out), "--device",
                               args.device]
                    if subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode:
                        sys.exit(f"{model} {variant} seed {seed}: failed (its message above)")
                    print(f"{model} {variant} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
                if json_path.exists():
                    results.append(json.loads(json_path.read_text()))
    summarize(results)


if __name__ == "__main__":
    main()
