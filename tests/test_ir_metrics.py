"""Retrieval figures (kfdeb/ir_metrics.py) against trec_eval's own code (pytrec_eval), on generated runs."""

from __future__ import annotations

import math
import random

import pytest

from kfdeb.ir_metrics import IR_KEYS, ir_figures, query_figures, trec_order

import pytrec_eval  # noqa: E402  (the [test] extra: trec_eval is the reference)

TREC_MEASURES = {"ndcg_cut_10", "map_cut_100", "recip_rank", "recall_1", "recall_5", "recall_10", "recall_100"}


def generated(seed: int, queries: int = 40, documents: int = 300):
    """qrels with grades 0-3 (some queries with several relevant documents, some with none, some absent),
    and a run of 120 scored documents per query, scores drawn from few values so that ties are common."""
    rng = random.Random(seed)
    qrels, run = {}, {}
    for q in range(queries):
        query = f"q{q}"
        chosen = rng.sample(range(documents), rng.choice([0, 1, 1, 2, 3, 5, 12]) + rng.choice([0, 0, 2]))
        grades = {f"d{d:03d}": rng.choice([0, 1, 1, 2, 3]) for d in chosen}
        if q % 9 != 8:  # every ninth query is in the run only
            qrels[query] = grades or {f"d{rng.randrange(documents):03d}": 0}  # a query whose only grade is 0
        pool = rng.sample(range(documents), 120)
        run[query] = {f"d{d:03d}": round(rng.random(), 1) for d in pool}  # ten score values: many ties
        for document in list(grades)[: len(grades) // 2]:  # half the graded documents retrieved
            run[query][document] = round(rng.random(), 1)
    return qrels, run


def trec_eval(qrels, run):
    """pytrec_eval per query, MRR cut at 10 (trec_eval's recip_rank is uncut: the run is cut to 10 first)."""
    full = pytrec_eval.RelevanceEvaluator(qrels, TREC_MEASURES).evaluate(run)
    top10 = {q: {d: docs[d] for d in trec_order(docs)[:10]} for q, docs in run.items()}
    cut = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    names = {"ndcg@10": "ndcg_cut_10", "map@100": "map_cut_100", "recall@1": "recall_1", "recall@5": "recall_5",
             "recall@10": "recall_10", "recall@100": "recall_100"}
    return {q: {**{key: measures[name] for key, name in names.items()}, "mrr@10": cut[q]["recip_rank"]}
            for q, measures in full.items()}


@pytest.mark.parametrize("seed", range(5))
def test_every_figure_equals_trec_eval_query_by_query_and_in_the_mean(seed):
    qrels, run = generated(seed)
    reference = trec_eval(qrels, run)
    evaluated = [q for q, grades in qrels.items() if any(g > 0 for g in grades.values())]
    assert set(reference) == set(qrels) and len(evaluated) < len(qrels)  # trec_eval: qrels-only queries dropped
    for query in evaluated:
        ours = query_figures(trec_order(run[query]), qrels[query])
        for key in IR_KEYS:
            assert ours[key] == pytest.approx(reference[query][key], abs=1e-12), (query, key)
    means = ir_figures(run, qrels)  # over the queries with a relevant document only
    for key in IR_KEYS:
        assert means[key] == pytest.approx(100 * sum(reference[q][key] for q in evaluated) / len(evaluated), abs=1e-9)


def test_ties_are_broken_as_trec_eval_breaks_them():
    """Equal scores rank by document id, descending: with d2 relevant, d3 comes first in a tie."""
    qrels = {"q": {"d2": 1}}
    run = {"q": {"d1": 0.5, "d2": 0.5, "d3": 0.5, "d0": 0.9}}
    assert trec_order(run["q"]) == ["d0", "d3", "d2", "d1"]
    assert ir_figures(run, qrels)["mrr@10"] == pytest.approx(100 / 3)
    assert trec_eval(qrels, run)["q"]["mrr@10"] == pytest.approx(1 / 3)


def test_graded_gains_are_linear_and_map_divides_by_every_relevant_document():
    qrels = {"q": {"a": 3, "b": 1, **{f"r{i}": 1 for i in range(150)}}}
    run = {"q": {"b": 0.9, "a": 0.8, "x": 0.7}}
    ours = ir_figures(run, qrels)
    reference = trec_eval(qrels, run)["q"]
    ideal = 3 + sum(1 / math.log2(i + 2) for i in range(1, 10))
    assert ours["ndcg@10"] == pytest.approx(100 * (1 + 3 / math.log2(3)) / ideal)
    assert ours["map@100"] == pytest.approx(100 * (1 / 1 + 2 / 2) / 152) == pytest.approx(100 * reference["map@100"])
    with pytest.raises(ValueError, match="no query has a relevant document"):
        ir_figures(run, {"q": {"a": 0}})
