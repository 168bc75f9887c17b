"""Fine-tuning e5 for retrieval on FAQ-shaped data (issue 34): the levers alone, the preset, the start.

Data (shipped, bench/build_chatbot_sets.py): Chatbot_data_for_Korean split by answer. Training:
examples/data/chatbot_train_pairs.jsonl (question -> answer); dev (selection only):
examples/data/dev_pairs.jsonl (held-out answers of the train side); test: kfdeb:chatbot-test (held-out
questions retrieve among all 7,779 distinct answers), kfdeb:xnli-test and KorSTS test (what the model could
lose). Every variant trains `--tasks nli` on the same pairs with the model's prompts, one epoch, lr 2e-5,
warmup 10%, max_seq_length 128 (the texts are short: the longest chatbot text is under 100 tokens), dev
nDCG@10 evaluated at step 0 and every --eval_steps, and is scored twice on test: its final weights and its
best/ (dev-selected; the starting model when no step beat it). Nothing is chosen on test.

    none        the untrained model
    recipe      kfdeb's recipe as a user runs it today: MultipleNegativesRankingLoss, scale 20, batch 32
    scale50     recipe + --scale 50            scale100    recipe + --scale 100
    symmetric   recipe + --nli_loss mnrl_symmetric
    gist        recipe + --nli_loss gist --guide_model self (the starting weights guide the masking)
    preset      --preset retriever (its own settings)

The same recipe in sentence-transformers (SentenceTransformerTrainer, its BatchSamplers.NO_DUPLICATES, the same
data, prompts `query: ` / `passage: ` on anchor / positive, batch 32, 1 epoch, lr 2e-5, warmup 10%, weight decay
0.01, clip 1.0, max_seq_length 128, the last incomplete batch dropped as kfdeb does: 275 updates), final weights
scored by the same kfdeb evaluators (needs `accelerate`, sentence-transformers' [train] extra):

    st-scale100   MultipleNegativesRankingLoss(scale=100): the preset's objective
    st-symmetric  MultipleNegativesSymmetricRankingLoss(scale=20)
    st-gist       GISTEmbedLoss(guide=the starting model, temperature=0.05): kfdeb's gist variant

`--data xnli` is the second held-out set's scenario: training on the bundled XNLI **dev** premise -> entailment
pairs (830; xnli-test is built from the test file), with `--ir_dev_fraction 0.1` of them held out as the dev set
(no dev file of its own), scored on the same test sets.

`--data both` is the user who needs both: the chatbot training pairs and the XNLI dev pairs in one run
(`--nli_train_files` of the two files, concatenated as a user would, no reweighting), dev = the chatbot dev pairs
plus the same 10% of the XNLI pairs that `--data xnli` holds out for that seed (`held_out.hold_out`), one pairs file.

Each (variant, seed) runs in its own process, one after another (alone on the machine), and writes
OUT/<model>-<variant>-seed<seed>.json; a run whose JSON exists is not repeated.

    python bench/retriever_recipe.py --model e5 --seeds 42 1 2
    python bench/retriever_recipe.py --model e5 --data xnli --seeds 42 1 2
    python bench/retriever_recipe.py --model e5 --data both --seeds 42 1 2 --variants preset
    python bench/retriever_recipe.py --model e5 --report
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

from harness import REPO, cpu_model, git_commit, model_path
from build_chatbot_sets import write_pairs

COMMON = {"tasks": "nli", "nli_train_files": str(REPO / "examples" / "data" / "chatbot_train_pairs.jsonl"),
          "ir_dev_data": str(REPO / "examples" / "data" / "dev_pairs.jsonl"), "metric_for_best": "ndcg@10",
          "num_epochs": 1, "learning_rate": 2e-5, "warmup_ratio": 0.1, "max_seq_length": 128, "nli_batch_size": 32,
          "eval_steps": 50, "save_steps": 100000, "progress": "false"}
VARIANTS: dict[str, dict | None] = {
    "none": None,
    "recipe": {},
    "scale50": {"scale": 50.0},
    "scale100": {"scale": 100.0},
    "symmetric": {"nli_loss": "mnrl_symmetric"},
    "gist": {"nli_loss": "gist", "guide_model": "self"},
    "preset": {"preset": "retriever"},
    "st-scale100": {"st_loss": "mnrl", "scale": 100.0},
    "st-symmetric": {"st_loss": "mnrl_symmetric", "scale": 20.0},
    "st-gist": {"st_loss": "gist", "scale": 20.0},
}
TESTS = ("chatbot-test", "xnli-test")


def training_data(data: str, out: Path, seed: int) -> dict:
    """The flags that name the training pairs and the dev set of `data` (module docstring)."""
    if data == "chatbot":
        return {"nli_train_files": COMMON["nli_train_files"], "ir_dev_data": COMMON["ir_dev_data"]}
    if data == "both":
        return both_data(out, seed)
    from kfdeb.readers import BUNDLED_DATA_DIR, read_nli

    pairs = out / "xnli-dev-pairs.jsonl"
    if not pairs.exists():  # each premise -> its first entailment hypothesis, in file order
        partners: dict[str, str] = {}
        for premise, hypothesis, label in read_nli(BUNDLED_DATA_DIR / "KorNLI" / "xnli.dev.ko.tsv").pairs:
            if label == "entailment":
                partners.setdefault(premise, hypothesis)
        write_pairs(pairs, partners.items())
    return {"nli_train_files": str(pairs), "ir_dev_fraction": 0.1}


def read_pairs(path: Path) -> list[tuple[str, str]]:
    from kfdeb.readers import read_jsonl

    return [(row["anchor"], row["positive"]) for _, row in read_jsonl(path)]


def both_data(out: Path, seed: int) -> dict:
    """--data both: the chatbot pairs + the XNLI pairs that --data xnli trains on for `seed`; the two dev sets in one file."""
    from kfdeb.held_out import hold_out

    xnli = training_data("xnli", out, seed)
    rows = read_pairs(Path(xnli["nli_train_files"]))
    training, held = hold_out(rows, xnli["ir_dev_fraction"], seed)  # what train.py --ir_dev_fraction holds out
    train_part, dev = out / f"both-seed{seed}-xnli-train.jsonl", out / f"both-seed{seed}-dev.jsonl"
    write_pairs(train_part, (rows[i] for i in training))
    write_pairs(dev, read_pairs(Path(COMMON["ir_dev_data"])) + [rows[i] for i in held])
    return {"nli_train_files": f"{COMMON['nli_train_files']},{train_part}", "ir_dev_data": str(dev)}


def flags(values: dict) -> list[str]:
    return [part for key, value in values.items() for part in (f"--{key}", str(value))]


def figures(folder: Path, device: str) -> dict:
    """Test figures of a model folder: the two retrieval sets and KorSTS test, as evaluate.py computes them."""
    import torch

    from kfdeb.evaluation import evaluate_split
    from kfdeb.ir_data import read_ir_data
    from kfdeb.model import load_encoder
    from kfdeb.readers import BUNDLED_DATA_DIR
    from kfdeb.retrieval import evaluate_retrieval

    encoder = load_encoder(folder, device=device, max_seq_length=128)
    found = {"korsts_test": evaluate_split(encoder, BUNDLED_DATA_DIR, "test").figures, "threads": torch.get_num_threads()}
    for name in TESTS:
        found[name] = evaluate_retrieval(encoder, read_ir_data(f"kfdeb:{name}", "test")).figures
    return found


def train_reference(args, run: Path) -> None:
    """The variant's recipe in sentence-transformers (module docstring); its final weights saved in run/final."""
    import sentence_transformers
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    settings = VARIANTS[args.variant]
    model = SentenceTransformer(args.model_path, device=args.device)
    model.max_seq_length = COMMON["max_seq_length"]
    data = training_data(args.data, Path(args.out), args.seed)
    rows = [row for file in data["nli_train_files"].split(",") for row in read_pairs(Path(file))]
    if data.get("ir_dev_fraction"):  # the rows kfdeb trains on: the same seeded hold-out (held_out.py)
        from kfdeb.held_out import hold_out

        rows = [rows[i] for i in hold_out(rows, data["ir_dev_fraction"], args.seed)[0]]
    dataset = Dataset.from_dict({"anchor": [a for a, _ in rows], "positive": [p for _, p in rows]})
    if settings["st_loss"] == "mnrl":
        loss = losses.MultipleNegativesRankingLoss(model, scale=settings["scale"])
    elif settings["st_loss"] == "mnrl_symmetric":
        loss = losses.MultipleNegativesSymmetricRankingLoss(model, scale=settings["scale"])
    else:  # the starting weights as the guide, as kfdeb's --guide_model self
        guide = SentenceTransformer(args.model_path, device=args.device)
        guide.max_seq_length = COMMON["max_seq_length"]
        loss = losses.GISTEmbedLoss(model, guide=guide, temperature=1 / settings["scale"])
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(run), num_train_epochs=COMMON["num_epochs"], per_device_train_batch_size=COMMON["nli_batch_size"],
        learning_rate=COMMON["learning_rate"], warmup_ratio=COMMON["warmup_ratio"], weight_decay=0.01, max_grad_norm=1.0,
        lr_scheduler_type="linear", seed=args.seed, data_seed=args.seed, batch_sampler=BatchSamplers.NO_DUPLICATES,
        prompts={"anchor": "query: ", "positive": "passage: "}, dataloader_drop_last=True, save_strategy="no",
        logging_steps=25, report_to="none", use_cpu=args.device == "cpu", disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=dataset, loss=loss)
    trainer.train()
    print(f"sentence-transformers {sentence_transformers.__version__}: {trainer.state.global_step} updates", flush=True)
    model.save(str(run / "final"))


def child(args) -> None:
    from kfdeb import train_state
    from kfdeb.model import load_encoder

    out = Path(args.out)
    result = {"model": args.name, "data": args.data, "variant": args.variant, "seed": args.seed, "commit": git_commit(), "cpu": cpu_model()}
    if args.variant.startswith("st-"):
        import sentence_transformers

        run = out / f"{args.name}-{args.data}-{args.variant}-seed{args.seed}"
        started = time.perf_counter()
        train_reference(args, run)
        result["seconds"] = time.perf_counter() - started
        result["engine"] = f"sentence-transformers {sentence_transformers.__version__}"
        result["final"] = figures(run / "final", args.device)
    elif VARIANTS[args.variant] is None:
        result["final"] = figures(Path(args.model_path), args.device)
    else:
        run = out / f"{args.name}-{args.data}-{args.variant}-seed{args.seed}"
        common = {key: value for key, value in COMMON.items() if key not in ("nli_train_files", "ir_dev_data")}
        values = {**(common if args.variant != "preset" else {}), **training_data(args.data, out, args.seed),
                  **VARIANTS[args.variant]}
        command = [sys.executable, str(REPO / "train.py"), "--model_name_or_path", args.model_path, "--seed",
                   str(args.seed), "--output_dir", str(run), "--overwrite_output_dir", "true", "--device", args.device,
                   *flags(values)]
        started = time.perf_counter()
        log = subprocess.run(command, capture_output=True, text=True)
        (out / f"{run.name}.log").write_text(log.stdout + log.stderr)
        if log.returncode:
            sys.exit(f"{run.name}: train.py failed, see {run.name}.log")
        result["seconds"] = time.perf_counter() - started
        result["command"] = " ".join(command[1:])
        metadata = json.loads((run / "best" / "kfdeb.json").read_text())
        result["best_step"], result["dev"] = metadata.get("best_step"), metadata.get("dev")
        result["last_line"] = [line for line in log.stdout.splitlines() + log.stderr.splitlines()
                               if line.startswith(("best:", "no step beat"))]
        result["best"] = figures(run / "best", args.device)
        # the final weights sit in the resumable state written at the last step
        final = train_state.read_part(train_state.latest(run), "train")
        encoder = load_encoder(run / "best", device=args.device, max_seq_length=128)
        encoder.load_state_dict(final["model"])
        encoder.save(run / "final")
        result["final_step"] = final["progress"]["step"]
        result["final"] = figures(run / "final", args.device)
        shutil.rmtree(run / train_state.STATE_DIR, ignore_errors=True)
    Path(args.json).write_text(json.dumps(result))


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)):.2f}"


def summarize(results: list[dict]) -> None:
    print("\n| training data | variant | weights | seeds | chatbot-test nDCG@10 | chatbot-test R@1 | xnli-test nDCG@10 | "
          "KorSTS test cos Spearman | best step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for data, variant in [(d, v) for d in ("chatbot", "xnli", "both") for v in VARIANTS]:
        runs = [r for r in results if r["variant"] == variant and r.get("data", "chatbot") == data]
        for weights in ("final", "best") if variant != "none" and not variant.startswith("st-") else ("final",):
            if not runs:
                continue
            figure = lambda key, metric: cell([r[weights][key][metric] for r in runs])  # noqa: E731
            steps = ", ".join(str(r.get("best_step", "-")) for r in runs) if weights == "best" else "-"
            print(f"| {data if variant != 'none' else '-'} | {variant} | {weights if variant != 'none' else 'untrained'} | "
                  f"{', '.join(str(r['seed']) for r in runs)} | {figure('chatbot-test', 'ndcg@10')} | "
                  f"{figure('chatbot-test', 'recall@1')} | {figure('xnli-test', 'ndcg@10')} | "
                  f"{figure('korsts_test', 'cosine_spearman')} | {steps} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="e5")
    parser.add_argument("--data", default="chatbot", choices=("chatbot", "xnli", "both"), help="the training pairs and dev set")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(REPO / "output" / "retriever-recipe"))
    parser.add_argument("--cache", default=str(REPO / "output" / "bench-models"), help="where e5 is built")
    parser.add_argument("--report", action="store_true", help="run nothing: summarize the JSONs there are")
    for hidden in ("--variant", "--seed", "--json", "--model_path", "--name"):
        parser.add_argument(hidden, help=argparse.SUPPRESS, type=int if hidden == "--seed" else str)
    args = parser.parse_args()
    if args.variant:
        return child(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = "" if args.report else model_path(args.model, Path(args.cache))
    results = [json.loads(p.read_text()) for p in sorted(out.glob(f"{args.model}-*.json"))] if args.report else []
    for seed in args.seeds if not args.report else []:
        for variant in args.variants:
            if variant == "none" and seed != args.seeds[0]:
                continue  # the untrained model has no seed
            json_path = out / f"{args.model}-{args.data}-{variant}-seed{seed}.json"
            if not json_path.exists() and not args.report:
                started = time.perf_counter()
                command = [sys.executable, __file__, "--variant", variant, "--seed", str(seed), "--json", str(json_path),
                           "--model_path", path, "--name", args.model, "--out", str(out), "--device", args.device,
                           "--data", args.data]
                if subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode:
                    sys.exit(f"{variant} seed {seed}: failed (its message above)")
                print(f"{variant} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
            if json_path.exists():
                results.append(json.loads(json_path.read_text()))
    summarize(results)


if __name__ == "__main__":
    main()
