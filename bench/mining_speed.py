"""Hard-negative mining side by side (issues 26, 28): kfdeb's mine.py path vs sentence-transformers'
`util.mine_hard_negatives`, the same model, pairs, corpus and options; the same rows; the time each takes.

Data: the bundled XNLI dev premises -> their entailment hypothesis (830 pairs, as
bench/retriever_training.py trains on), and a corpus of every distinct sentence of the bundled files
(KorSTS train/dev/test, XNLI dev/test: about 25k texts; the positives are in it). Options: 3 negatives,
relative margin 0.05, n-tuple output, the top strategy, the model's own prompts (e5: `query: ` /
`passage: `), batch 32 (both defaults).

Engines, each in a fresh process, alternating A/B and B/A over --reps (bench/harness.py): kfdeb
`kfdeb.load(model)` + `kfdeb.mining.mine_hard_negatives`, and `SentenceTransformer(model)` +
`mine_hard_negatives` (exact torch search, no faiss). Timed: the mining only (the model is loaded and
warmed up first): encoding the corpus and the anchors, the search, the filters, the rows. Each run
writes its rows; the report says whether every engine wrote the same rows in the same order. Also
kfdeb with KFDEB_CPU_GEMM=blas (linear layers on torch's F.linear, as the reference computes them,
instead of oneDNN's GEMM: kfdeb/cpu_linear.py), so the kernel's share shows.

    pip install -e ".[bench]"
    python bench/mining_speed.py --model minilm --reps 3
    python bench/mining_speed.py --model e5 --reps 3
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from harness import alternating_parser, bundled_sentences, cpu_model, gemm_switch, git_commit, model_path, run_alternating

OPTIONS = dict(num_negatives=3, relative_margin=0.05, output_format="n-tuple")
ENGINES = ("kfdeb", "reference", "kfdeb-blas")


def dataset() -> tuple[list[tuple[str, str]], list[str]]:
    """(pairs, corpus) of the bench (module docstring)."""
    from kfdeb.readers import BUNDLED_DATA_DIR, read_nli

    pairs: dict[str, str] = {}
    for premise, hypothesis, label in read_nli(BUNDLED_DATA_DIR / "KorNLI" / "xnli.dev.ko.tsv").pairs:
        if label == "entailment":
            pairs.setdefault(premise, hypothesis)
    return list(pairs.items()), bundled_sentences()


def child(args) -> None:
    os.environ["TQDM_DISABLE"] = "1"  # no progress bars from either engine in the bench's output
    import torch

    from kfdeb.cli import quiet_third_party

    quiet_third_party()
    pairs, corpus = dataset()
    warm_pairs, warm_corpus = pairs[:16], corpus[:200]
    extra = {}
    if args.engine.startswith("kfdeb"):
        extra["onednn_linears"] = gemm_switch(args.engine)
        import kfdeb
        from kfdeb.mining import MiningSettings, mine_hard_negatives

        model = kfdeb.load(args.model_path, device="cpu")
        prompts = model.role_prompt("query"), model.role_prompt("document")
        settings = MiningSettings(**OPTIONS)
        mine_hard_negatives(model, warm_pairs, warm_corpus, settings, *prompts, batch_size=32)
        started = time.perf_counter()
        mined = mine_hard_negatives(model, pairs, corpus, settings, *prompts, batch_size=32)
        seconds = time.perf_counter() - started
        rows = [list(row) for row in mined.rows]
    else:
        from datasets import Dataset
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.util import mine_hard_negatives

        model = SentenceTransformer(args.model_path, device="cpu")
        prompts = model.prompts or {}
        options = dict(OPTIONS, batch_size=32, verbose=False, use_faiss=False, query_prompt=prompts.get("query"),
                       corpus_prompt=prompts.get("document") or prompts.get("passage"))

        def table(rows):
            return Dataset.from_dict({"anchor": [a for a, _ in rows], "positive": [p for _, p in rows]})

        mine_hard_negatives(table(warm_pairs), model, corpus=warm_corpus, **options)
        data = table(pairs)
        started = time.perf_counter()
        mined = mine_hard_negatives(data, model, corpus=corpus, **options)
        seconds = time.perf_counter() - started
        rows = [[row[column] for column in mined.column_names] for row in mined]
    Path(args.json).write_text(json.dumps({"engine": args.engine, "seconds": seconds, "rows": rows,
                                           "threads": torch.get_num_threads(), **extra}, ensure_ascii=False))


def main() -> None:
    args = alternating_parser(__doc__, engines=ENGINES).parse_args()
    if args.engine:
        return child(args)
    path = model_path(args.model, Path(args.cache))
    pairs, corpus = dataset()
    print(f"model {args.model} ({path}), {len(pairs)} pairs, a corpus of {len(corpus)} texts, {OPTIONS}, "
          f"commit {git_commit()}, {cpu_model()}", flush=True)

    def report(rep: int, engine: str, result: dict) -> None:
        print(f"rep {rep} {engine}: {result['seconds']:.1f} s, {len(result['rows'])} rows", flush=True)

    with tempfile.TemporaryDirectory() as work:
        runs = run_alternating(__file__, args.reps, Path(work), ["--model_path", path], report, tuple(args.engines))
    every = [result["rows"] for results in runs.values() for result in results]
    same = all(rows == every[0] for rows in every)
    print(f"\n| engine | mining seconds (median of {args.reps}) | runs | rows |")
    print("|---|---|---|---|")
    for engine, results in runs.items():
        times = [r["seconds"] for r in results]
        print(f"| {engine} | {statistics.median(times):.1f} | {' / '.join(f'{t:.1f}' for t in times)} | "
              f"{len(results[0]['rows'])} |")
    speedup = statistics.median(r["seconds"] for r in runs["reference"]) / statistics.median(r["seconds"] for r in runs["kfdeb"])
    print(f"\nevery run wrote the same rows in the same order: {same}; kfdeb is {speedup:.2f}x faster")
    if not same:
        kfdeb_rows, reference_rows = runs["kfdeb"][0]["rows"], runs["reference"][0]["rows"]
        differ = sum(a != b for a, b in zip(kfdeb_rows, reference_rows)) + abs(len(kfdeb_rows) - len(reference_rows))
        print(f"rows that differ between kfdeb and the reference (first run each): {differ}")


if __name__ == "__main__":
    main()
