"""Training side by side: kfdeb's loop vs sentence-transformers' `old_fit` (the v2 `fit`).

Same model folder, data, triplets, batches (the reference is fed kfdeb's sampler batches), seed
and recipe (per-task AdamW lr 2e-5, warmup 10%, batches 64 NLI + 8 STS, max_seq_length 256, dev
evaluation every --eval_steps and at epoch ends, best checkpoint kept); both best checkpoints
are then scored on KorSTS test by the same evaluator. Dropout draws differ between the engines.
Each engine runs in a fresh process, one at a time, alternating A/B and B/A over --reps
(benchmarks must run alone: two busy processes on 2 cores stall each other).

    pip install -e ".[bench]"
    python bench/train_vs_reference.py                                   # all-MiniLM-L6-v2, bundled XNLI + KorSTS, 1 epoch
    python bench/train_vs_reference.py --amp bf16 --reference_amp         # mixed precision on both
    python bench/train_vs_reference.py --model deberta-base-random --max_steps 3 --reps 1   # throughput only
    python bench/train_vs_reference.py --no_dropout --max_seq_length 128 --reps 1          # the same run, computed twice

--no_dropout trains a copy of the model with its dropout probabilities set to 0. The engines then
draw nothing at random apart from the batches, which they share, so a whole run must give the same
weights up to float rounding: the script prints the largest weight difference between the two
final models (also without the attention key biases, whose gradient is zero up to rounding) and the
largest difference of the KorSTS test cosine similarities they compute, which proves (or refutes)
that the step maths agrees over a whole run, not only one step. `--compare DIR` re-prints that
comparison for the models a previous run left in DIR.

Reported: examples/s = (NLI triplets + STS pairs) per second of training (the fit call minus its
dev evaluations and best-model saves; no data loading, no final test), wall time, peak memory
(max RSS of the process on CPU, max allocated on CUDA) and the KorSTS test figures.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from harness import REPO, git_commit, model_path, run_alternating


def peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_kfdeb(args, out: Path) -> dict:
    from kfdeb.config import resolve
    from kfdeb.loop import train

    config = resolve({
        "model_name_or_path": args.model_path, "data_dir": args.data_dir, "nli_train_glob": args.nli_train_glob,
        "max_seq_length": args.max_seq_length, "nli_batch_size": 64, "sts_batch_size": 8, "num_epochs": args.epochs,
        "max_steps": args.max_steps, "eval_steps": args.eval_steps, "save_steps": 10**9, "learning_rate": 2e-5,
        "seed": args.seed, "output_dir": str(out), "device": args.device, "amp": args.amp, "progress": False,
        "logging_steps": 50, "overwrite_output_dir": True,
        "query_prompt": "", "document_prompt": "",  # the reference's fit prepends no prompt (e5 has its own)
    })
    summary = train(config)
    return {"steps": summary["total_steps"], "train_seconds": summary["train_seconds"],
            "eval_seconds": summary["eval_seconds"], "test": summary["test"]}


def without_dropout(model: str, workdir: Path) -> str:
    """A copy of the model folder whose config sets every dropout probability to 0."""
    import shutil

    folder = workdir / "no-dropout"
    shutil.copytree(model, folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    changed = {k: 0.0 for k in config if k.endswith("dropout_prob") or k.endswith("dropout")}
    if not changed:
        raise SystemExit(f"{model}/config.json names no dropout probability")
    (folder / "config.json").write_text(json.dumps({**config, **changed}, indent=2))
    print(f"dropout off: {', '.join(sorted(changed))} = 0 in {folder}", flush=True)
    return str(folder)


# Softmax ignores a constant added to every score of a query, and q . b_key is such a constant: the
# key bias's gradient is zero up to rounding, and AdamW's normalised step moves it by ~lr times the
# sign of that noise. Two correct engines may therefore disagree on it by up to lr x steps while
# computing the same function; the other tensors must agree to rounding. (BERT's names. DeBERTa's
# key_proj bias is not such a tensor: its position-to-content scores vary it across keys.)
def is_key_bias(name: str) -> bool:
    return name.endswith("attention.self.key.bias")


def weight_gap(left: dict, right: dict, skip=lambda name: False) -> tuple[float, float, str]:
    """Largest |left - right| over the tensors (those `skip` names left out), that divided by the
    tensor's largest |left|, and the tensor where the relative gap is largest."""
    gaps = {k: (float((left[k].double() - right[k].double()).abs().max()), float(left[k].double().abs().max()))
            for k in left if not skip(k)}
    worst = max(gaps, key=lambda k: gaps[k][0] / max(gaps[k][1], 1e-12))
    return max(g for g, _ in gaps.values()), gaps[worst][0] / max(gaps[worst][1], 1e-12), worst


def gap_over_update(start: dict, left: dict, right: dict) -> float:
    """||left - right|| / ||left - start|| over all trained tensors but the key biases: how large the
    engines' disagreement is next to how far training moved the weights."""
    names = [k for k in left if not is_key_bias(k)]
    gap = sum(float((left[k].double() - right[k].double()).square().sum()) for k in names)
    update = sum(float((left[k].double() - start[k].double()).square().sum()) for k in names)
    return (gap / update) ** 0.5


def korsts_test_cosines(folder: Path, data_dir: str, device: str) -> np.ndarray:
    """The model's cosine similarity of each KorSTS test pair, in float64."""
    from kfdeb.readers import read_sts
    from kfdeb.evaluation import pair_embeddings
    from kfdeb.readers import sts_path
    from kfdeb.model import load_encoder

    first, second, _ = pair_embeddings(load_encoder(folder, device=device), read_sts(sts_path(data_dir, "test")))
    first, second = first.astype(np.float64), second.astype(np.float64)
    return (first * second).sum(1) / (np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1))


def compare_final_models(workdir: Path, data_dir: str, device: str) -> None:
    """What a run left in `workdir` (kfdeb's best/, old_fit's output folder, with --no_dropout the
    starting weights in no-dropout/): how far apart the two final models' weights and outputs are."""
    from safetensors.torch import load_file

    from kfdeb.readers import read_sts
    from kfdeb.readers import sts_path
    from kfdeb.metrics import spearman

    kfdeb_dir, reference_dir, start = workdir / "kfdeb" / "best", workdir / "reference", workdir / "no-dropout"
    ours, theirs = load_file(str(kfdeb_dir / "model.safetensors")), load_file(str(reference_dir / "model.safetensors"))
    if ours.keys() != theirs.keys():
        raise SystemExit(f"{kfdeb_dir} and {reference_dir} hold different tensors")
    if (start / "model.safetensors").exists():
        published = load_file(str(start / "model.safetensors")).keys()
        unpublished = sorted(set(ours) - set(published))
        if unpublished:  # e5's pooler: unused by the embedding, zero in kfdeb's save, randomly drawn in the reference's
            print(f"left out, not in the starting weights and not used by the embedding: {', '.join(unpublished)}")
            ours, theirs = ({k: v for k, v in d.items() if k in published} for d in (ours, theirs))
    largest, relative, where = weight_gap(ours, theirs)
    print(f"final weights, kfdeb vs reference: max |difference| {largest:.3e}; largest relative to the tensor's "
          f"max |value|: {relative:.3e} ({where})")
    largest, relative, where = weight_gap(ours, theirs, skip=is_key_bias)
    print(f"  without the attention key biases (gradient zero up to rounding): max |difference| {largest:.3e}; "
          f"largest relative {relative:.3e} ({where})")
    if (start / "model.safetensors").exists():
        print(f"  ||kfdeb - reference|| / ||kfdeb - starting weights|| (no key biases): "
              f"{gap_over_update(load_file(str(start / 'model.safetensors')), ours, theirs):.3e}")
    gold = [p.label for p in read_sts(sts_path(data_dir, "test"))]
    ours, theirs = (korsts_test_cosines(folder, data_dir, device) for folder in (kfdeb_dir, reference_dir))
    print(f"  KorSTS test, {len(gold)} pairs: max |cosine difference| {np.abs(ours - theirs).max():.3e}; "
          f"cos Spearman kfdeb {100 * spearman(ours, gold):.6f}, reference {100 * spearman(theirs, gold):.6f}",
          flush=True)


class SameBatches:
    """A loader for old_fit that yields kfdeb's sampler batches: each iter() is one pass (len batches),
    the position carries over, as NoDuplicatesDataLoader's read pointer and a reshuffling DataLoader do."""

    def __init__(self, examples, sampler):
        self.examples, self.sampler, self.collate_fn = examples, sampler, None

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for _ in range(len(self)):
            yield self.collate_fn([self.examples[i] for i in self.sampler.next_batch()])


def run_reference(args, out: Path) -> dict:
    import torch
    from sentence_transformers import InputExample, SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss, MultipleNegativesRankingLoss

    from kfdeb.batching import NoDuplicatesBatches, ShuffledBatches, nli_triplets_of_files
    from kfdeb.readers import find_nli_files, read_nli, read_sts
    from kfdeb.evaluation import evaluate_split
    from kfdeb.model import load_encoder

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    data_dir = Path(args.data_dir)
    pairs_per_file = [read_nli(f).pairs for f in find_nli_files(data_dir, args.nli_train_glob)]
    triplets = nli_triplets_of_files(pairs_per_file, args.seed)  # the same triplets kfdeb trains on
    sts = read_sts(data_dir / "KorSTS" / "sts-train.tsv")
    dev = read_sts(data_dir / "KorSTS" / "sts-dev.tsv")
    model = SentenceTransformer(args.model_path, device=args.device)
    model.max_seq_length = args.max_seq_length
    # the reference consumes exactly kfdeb's batches (its own loaders would draw another order
    # from python's random), so the two runs differ only in how they compute, not in what they see
    nli_examples = [InputExample(texts=list(t)) for t in triplets]
    sts_examples = [InputExample(texts=[p.sentence1, p.sentence2], label=p.label) for p in sts]
    nli_loader = SameBatches(nli_examples, NoDuplicatesBatches(triplets, 64, args.seed))
    sts_loader = SameBatches(sts_examples, ShuffledBatches(len(sts), 8, args.seed))
    steps_per_epoch = min(len(nli_loader), len(sts_loader))
    epochs = args.epochs
    if args.max_steps:
        steps_per_epoch, epochs = min(steps_per_epoch, args.max_steps), math.ceil(args.max_steps / steps_per_epoch)

    eval_seconds = [0.0]

    class SpearmanMax(EmbeddingSimilarityEvaluator):  # v2 evaluators returned a float; old_fit compares it
        def __call__(self, *a, **k):
            started = time.perf_counter()
            score = super().__call__(*a, **k)[self.primary_metric]
            eval_seconds[0] += time.perf_counter() - started
            return score

    save = model.save

    def timed_save(*a, **k):  # old_fit saves the best model right after evaluating: off the training clock too
        started = time.perf_counter()
        save(*a, **k)
        eval_seconds[0] += time.perf_counter() - started

    model.save = timed_save

    evaluator = SpearmanMax([p.sentence1 for p in dev], [p.sentence2 for p in dev], [p.label for p in dev],
                            batch_size=64, similarity_fn_names=["cosine", "euclidean", "manhattan", "dot"], name="sts-dev")
    total = steps_per_epoch * epochs
    started = time.perf_counter()
    model.old_fit(train_objectives=[(nli_loader, MultipleNegativesRankingLoss(model)), (sts_loader, CosineSimilarityLoss(model))],
                  evaluator=evaluator, epochs=epochs, steps_per_epoch=steps_per_epoch, evaluation_steps=args.eval_steps,
                  warmup_steps=math.ceil(0.1 * total), optimizer_params={"lr": 2e-5}, output_path=str(out),
                  use_amp=args.reference_amp, show_progress_bar=False)
    seconds = time.perf_counter() - started
    test = evaluate_split(load_encoder(out, device=args.device), data_dir, "test").figures
    return {"steps": total, "train_seconds": seconds, "eval_seconds": eval_seconds[0], "test": test}


def child(args) -> None:
    import torch

    from kfdeb.cli import quiet_third_party

    quiet_third_party()
    out = Path(args.workdir) / args.engine
    result = (run_kfdeb if args.engine == "kfdeb" else run_reference)(args, out)
    # training throughput: the fit call without its dev evaluations and best-model saves
    result["examples_per_s"] = result["steps"] * (64 + 8) / (result["train_seconds"] - result["eval_seconds"])
    result["peak_mb"] = peak_memory_mb(args.device)
    result["threads"] = torch.get_num_threads()
    Path(args.json).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help="model folder, minilm, or deberta-base-random")
    parser.add_argument("--data_dir", default=str(REPO / "kfdeb" / "bundled" / "kor-nlu"))
    parser.add_argument("--nli_train_glob", default="KorNLI/xnli.*.ko.tsv")
    parser.add_argument("--max_seq_length", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max_steps", type=int, default=0, help="cap the steps (throughput runs)")
    parser.add_argument("--eval_steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="kfdeb's autocast")
    parser.add_argument("--reference_amp", action="store_true", help="old_fit(use_amp=True): fp16 on CUDA, bf16 on CPU")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--no_dropout", action="store_true", help="train a copy with dropout 0: both runs deterministic")
    parser.add_argument("--compare", metavar="DIR", help="only compare the final models a previous run left in DIR "
                        "(the kfdeb-bench-* folder it printed): weights and KorSTS test similarities")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--model_path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        return child(args)
    if args.compare:
        return compare_final_models(Path(args.compare), args.data_dir, args.device)

    workdir = Path(tempfile.mkdtemp(prefix="kfdeb-bench-"))
    model = model_path(args.model, workdir)
    if args.no_dropout:
        model = without_dropout(model, workdir)
    print(f"model {args.model} ({model}), device {args.device}, kfdeb amp {args.amp}, reference amp {args.reference_amp}, "
          f"commit {git_commit()}", flush=True)

    def report(rep: int, engine: str, result: dict) -> None:
        print(f"rep {rep} {engine:9s}: {result['examples_per_s']:7.1f} examples/s, fit {result['train_seconds']:6.1f} s "
              f"(dev eval {result['eval_seconds']:5.1f} s), "
              f"wall {result['wall_seconds']:6.1f} s, peak {result['peak_mb']:7.0f} MB, test cos Spearman "
              f"{result['test']['cosine_spearman']:.2f}", flush=True)

    results = run_alternating(__file__, args.reps, workdir, ["--workdir", str(workdir), "--model_path", model], report)

    def mean(engine: str, key: str) -> float:
        return sum(r[key] for r in results[engine]) / len(results[engine])

    print("\n| engine | examples/s | fit s (incl. dev eval) | wall s | peak MB | test cos Pearson | test cos Spearman |")
    print("|---|---|---|---|---|---|---|")
    for engine in results:
        figures = results[engine][-1]["test"]
        print(f"| {engine} | {mean(engine, 'examples_per_s'):.1f} | {mean(engine, 'train_seconds'):.1f} | "
              f"{mean(engine, 'wall_seconds'):.1f} | {mean(engine, 'peak_mb'):.0f} | {figures['cosine_pearson']:.2f} | "
              f"{figures['cosine_spearman']:.2f} |")
    ratio = mean("kfdeb", "examples_per_s") / mean("reference", "examples_per_s")
    gap = results["kfdeb"][-1]["test"]["cosine_spearman"] - results["reference"][-1]["test"]["cosine_spearman"]
    print(f"\nkfdeb / reference examples/s: {ratio:.2f}x; test cos Spearman difference {gap:+.2f} points")
    compare_final_models(workdir, args.data_dir, args.device)  # the last repetition's final models


if __name__ == "__main__":
    main()
