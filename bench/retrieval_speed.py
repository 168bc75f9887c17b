"""Retrieval evaluation side by side (issues 25, 28): kfdeb's evaluate.py path vs sentence-transformers'
InformationRetrievalEvaluator, the same model and data, the same figures, the time each takes.

Data: the bundled korsts-test set's 309 queries and their relevant documents, with every other distinct
sentence of the bundled files (KorSTS train/dev/test, XNLI dev/test) added to the corpus as a distractor,
except the queries' own texts: 25,120 documents. Binary grades and at most a few relevant documents a query, so the two engines'
definitions agree (ir_metrics.py) but for one thing: documents with the same score are ranked by id
descending in kfdeb (trec_eval's order, as pytrec_eval and mteb rank them) and ascending in
sentence-transformers. Ties are real where a tokenizer maps different texts to the same tokens
(all-MiniLM-L6-v2's English WordPiece turns most Korean syllables into [UNK]: 151 of the 25,120
documents share their token ids with another), so the figures may differ by that, and only by that.

Engines, each in a fresh process, alternating A/B and B/A over --reps (bench/harness.py), each with
its defaults as a user runs it: kfdeb `kfdeb.load(model)` + `evaluate_retrieval` (batch 64, each
distinct text encoded once, length-sorted batches, one normalisation, chunked exact search), and
`SentenceTransformer(model)` + `InformationRetrievalEvaluator` (batch 32, cosine only, the model's
prompts passed as query_prompt / corpus_prompt). Timed: the evaluation only (the model is loaded and
warmed up first). Also kfdeb at batch 32, as a third engine, so the batch size's share shows, and
kfdeb with KFDEB_CPU_GEMM=blas (linear layers on torch's F.linear, as the reference computes them,
instead of oneDNN's GEMM: kfdeb/cpu_linear.py), so the kernel's share shows. Issue 35's pair: kfdeb with
`dtype="bfloat16"` (autocast: the matrix products in bf16, pooling and search in float32) and
sentence-transformers with `model_kwargs={"torch_dtype": torch.bfloat16}` (the weights themselves in bf16).

    pip install -e ".[bench]"
    python bench/retrieval_speed.py --model minilm --reps 3
    python bench/retrieval_speed.py --model e5 --reps 3
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from harness import alternating_parser, bundled_sentences, cpu_model, gemm_switch, git_commit, model_path, run_alternating

ENGINES = ("kfdeb", "reference", "kfdeb-batch32", "kfdeb-blas", "kfdeb-bf16", "reference-bf16")


def dataset():
    """(queries, corpus, relevant) of the bench (module docstring), as plain dicts, in a fixed order."""
    from kfdeb.ir_data import read_ir_data

    base = read_ir_data("kfdeb:korsts-test", "test")
    corpus = dict(base.corpus)
    seen = set(corpus.values()) | set(base.queries.values())  # a query's own text is never a distractor
    for text in bundled_sentences():
        if text not in seen:
            corpus[f"x{len(corpus)}"] = text
            seen.add(text)
    return base.queries, corpus, base.relevant


def child(args) -> None:
    os.environ["TQDM_DISABLE"] = "1"  # no progress bars from either engine in the bench's output
    import torch

    from kfdeb.cli import quiet_third_party
    from kfdeb.ir_data import IrData
    from kfdeb.ir_metrics import IR_KEYS

    quiet_third_party()
    queries, corpus, relevant = dataset()
    extra = {}
    if args.engine.startswith("kfdeb"):
        import kfdeb
        import kfdeb.retrieval
        from kfdeb import ir_metrics
        from kfdeb.retrieval import evaluate_retrieval

        model = kfdeb.load(args.model_path, device="cpu", dtype="bfloat16" if args.engine == "kfdeb-bf16" else "float32")
        batch = 32 if args.engine == "kfdeb-batch32" else 64
        extra["onednn_linears"] = gemm_switch(args.engine)
        data = IrData("bench", queries, corpus, relevant)
        evaluate_retrieval(model, IrData("warm", dict(list(queries.items())[:8]), dict(list(corpus.items())[:64]),
                                         {q: relevant[q] for q in list(queries)[:8]}), batch)
        runs = []  # the ranked scores evaluate_retrieval scores, kept to re-rank its ties as the reference does
        kfdeb.retrieval.ir_figures = lambda run, graded: runs.append(run) or ir_metrics.ir_figures(run, graded)
        started = time.perf_counter()
        figures = evaluate_retrieval(model, data, batch).figures
        seconds = time.perf_counter() - started
        ir_metrics.trec_order = lambda scores: sorted(scores, key=lambda document: (-scores[document], document))
        extra["figures_with_ties_ascending"] = ir_metrics.ir_figures(runs[-1], relevant)
    else:
        from sentence_transformers import SentenceTransformer, util
        from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

        model_kwargs = {"torch_dtype": torch.bfloat16} if args.engine == "reference-bf16" else None
        model = SentenceTransformer(args.model_path, device="cpu", model_kwargs=model_kwargs)
        prompts = model.prompts or {}
        options = dict(mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[1], precision_recall_at_k=[1, 5, 10, 100],
                       map_at_k=[100], write_csv=False, score_functions={"cosine": util.cos_sim},
                       main_score_function="cosine", query_prompt=prompts.get("query"),
                       corpus_prompt=prompts.get("document") or prompts.get("passage"))
        sets = {q: set(docs) for q, docs in relevant.items()}
        warm = InformationRetrievalEvaluator(dict(list(queries.items())[:8]), dict(list(corpus.items())[:64]),
                                             {q: sets[q] for q in list(queries)[:8]}, **options)
        warm(model)
        evaluator = InformationRetrievalEvaluator(queries, corpus, sets, **options)
        started = time.perf_counter()
        found = evaluator(model)
        seconds = time.perf_counter() - started
        figures = {key: 100 * found[f"cosine_{key}"] for key in IR_KEYS}
    Path(args.json).write_text(json.dumps({"engine": args.engine, "seconds": seconds, "figures": figures,
                                           "threads": torch.get_num_threads(), **extra}))


def main() -> None:
    args = alternating_parser(__doc__, engines=ENGINES).parse_args()
    if args.engine:
        return child(args)
    path = model_path(args.model, Path(args.cache))
    queries, corpus, _ = dataset()
    print(f"model {args.model} ({path}), {len(queries)} queries, {len(corpus)} documents, commit {git_commit()}, "
          f"{cpu_model()}", flush=True)

    def report(rep: int, engine: str, result: dict) -> None:
        print(f"rep {rep} {engine}: {result['seconds']:.1f} s, nDCG@10 {result['figures']['ndcg@10']:.4f}", flush=True)

    with tempfile.TemporaryDirectory() as work:
        runs = run_alternating(__file__, args.reps, Path(work), ["--model_path", path], report, tuple(args.engines))
    keys = list(next(results for results in runs.values() if results)[0]["figures"])
    print("\n| engine | evaluation seconds (median of " + str(args.reps) + ") | runs | " + " | ".join(keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for engine, results in runs.items():
        times = [r["seconds"] for r in results]
        print(f"| {engine} | {statistics.median(times):.1f} | {' / '.join(f'{t:.1f}' for t in times)} | "
              + " | ".join(f"{results[0]['figures'][k]:.2f}" for k in keys) + " |")
    median = {engine: statistics.median(r["seconds"] for r in results) for engine, results in runs.items() if results}
    if "kfdeb" in median and "reference" in median:
        gap = max(abs(runs["kfdeb"][0]["figures"][k] - runs["reference"][0]["figures"][k]) for k in keys)
        same_ties = max(abs(runs["kfdeb"][0]["figures_with_ties_ascending"][k] - runs["reference"][0]["figures"][k])
                        for k in keys)
        print(f"\nlargest figure difference kfdeb vs reference: {gap:.2e} (with ties ranked as the reference ranks "
              f"them: {same_ties:.2e}); kfdeb is {median['reference'] / median['kfdeb']:.2f}x faster")
    for engine in median:
        if engine != "reference" and "reference" in median:
            print(f"{engine}: {median['reference'] / median[engine]:.2f}x reference float32"
                  + (f", {median['reference-bf16'] / median[engine]:.2f}x reference-bf16" if "reference-bf16" in median
                     else "") + f", nDCG@10 {runs[engine][0]['figures']['ndcg@10']:.2f}")


if __name__ == "__main__":
    main()
