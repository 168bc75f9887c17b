"""Retrieval figures as trec_eval defines them (what mteb reports), x100: nDCG@10, MRR@10, MAP@100, Recall@k.

For one query with graded relevance g(d) (only g > 0 is relevant; R = the relevant documents) and
a ranking d_1, d_2, ... (the retrieved documents by score, best first; equal scores ordered by
document id, descending, as trec_eval breaks ties):

    nDCG@10   = DCG@10 / IDCG@10,  DCG@10 = sum_{i<=10} g(d_i) / log2(i + 1)  (linear gains: trec_eval's
                ndcg_cut_10), IDCG@10 the same sum over the grades of R sorted high to low
    MRR@10    = 1 / i for the first relevant d_i with i <= 10, else 0  (trec_eval's recip_rank, cut at 10)
    MAP@100   = (1 / |R|) sum_{i<=100, d_i in R} |R among d_1..d_i| / i  (map_cut_100: divided by ALL
                relevant documents, retrieved or not)
    Recall@k  = |R among d_1..d_k| / |R|

Each figure is the mean over the queries that have at least one relevant document (a query
without one is left out, as trec_eval and mteb do), times 100. sentence-transformers'
InformationRetrievalEvaluator agrees on binary grades, except MAP@k: it divides by min(k, |R|).
"""

from __future__ import annotations

import math
from typing import Mapping

IR_KEYS = ("ndcg@10", "mrr@10", "map@100", "recall@1", "recall@5", "recall@10", "recall@100")
DEPTH = 100  # documents each query retrieves: the deepest cut above
RECALL_CUTS = (1, 5, 10, 100)


def trec_order(scores: Mapping[str, float]) -> list[str]:
    """Document ids by score, best first; ties by id, descending (trec_eval's order)."""
    by_id = sorted(scores, reverse=True)
    return sorted(by_id, key=lambda document: -scores[document])  # stable: ties keep the id order


def query_figures(ranking: list[str], grades: Mapping[str, int]) -> dict[str, float]:
    """The figures of one query (fractions, not x100); `grades` holds its relevant documents (g > 0)."""
    relevant = {document: grade for document, grade in grades.items() if grade > 0}
    if not relevant:
        raise ValueError("a query without a relevant document has no figures")
    dcg = sum(relevant.get(document, 0) / math.log2(i + 2) for i, document in enumerate(ranking[:10]))
    ideal = sum(grade / math.log2(i + 2) for i, grade in enumerate(sorted(relevant.values(), reverse=True)[:10]))
    first = next((i for i, document in enumerate(ranking[:10]) if document in relevant), None)
    hits, precision_sum = 0, 0.0
    for i, document in enumerate(ranking[:DEPTH]):
        if document in relevant:
            hits += 1
            precision_sum += hits / (i + 1)
    figures = {"ndcg@10": dcg / ideal, "mrr@10": 0.0 if first is None else 1.0 / (first + 1),
               "map@100": precision_sum / len(relevant)}
    for k in RECALL_CUTS:
        figures[f"recall@{k}"] = sum(document in relevant for document in ranking[:k]) / len(relevant)
    return figures


def ir_figures(run: Mapping[str, Mapping[str, float]], relevant: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """Mean figures x100 over the queries of `relevant` that have a document graded above 0.

    run: query id -> {document id: score} of its retrieved documents (at least the top DEPTH); a
    query missing from the run retrieved nothing.
    """
    evaluated = [query for query, grades in relevant.items() if any(grade > 0 for grade in grades.values())]
    if not evaluated:
        raise ValueError("no query has a relevant document")
    totals = dict.fromkeys(IR_KEYS, 0.0)
    for query in evaluated:
        for key, value in query_figures(trec_order(run.get(query, {})), relevant[query]).items():
            totals[key] += value
    return {key: 100.0 * total / len(evaluated) for key, total in totals.items()}
