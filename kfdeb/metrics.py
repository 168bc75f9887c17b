"""Pearson and Spearman correlation and the four similarity scores of the KorSTS table.

For x, y in R^n (computed in float64):

    pearson(x, y)  = sum (x_i - mean x)(y_i - mean y) / sqrt(sum (x_i - mean x)^2 * sum (y_i - mean y)^2)
    spearman(x, y) = pearson(rank(x), rank(y))

rank() gives 1-based positions in ascending order; tied values all get the average of the
positions they span (scipy.stats.rankdata's "average" method). If x or y is constant the
denominator is zero and the correlation is undefined: the functions return NaN (as scipy does,
which also warns), never raise, so a degenerate model mid-training is reported, not fatal.

Similarity of embedding pairs (a_i, b_i), float32 as the reference evaluator computes them:
cosine = (a / max(|a|, 1e-12)).(b / max(|b|, 1e-12)), euclidean = -|a - b|_2, manhattan = -|a - b|_1, dot = a.b.
`sts_figures` reports Pearson and Spearman of each against the gold scores, times 100.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SIMILARITIES = ("cosine", "euclidean", "manhattan", "dot")
FIGURE_KEYS = tuple(f"{sim}_{corr}" for sim in SIMILARITIES for corr in ("pearson", "spearman"))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"pearson needs two 1-d arrays of equal length >= 2, got {x.shape} and {y.shape}")
    xc, yc = x - x.mean(), y - y.mean()
    denominator = np.sqrt(np.dot(xc, xc) * np.dot(yc, yc))
    if denominator == 0.0 or not np.isfinite(denominator):
        return float("nan")
    return float(np.clip(np.dot(xc, yc) / denominator, -1.0, 1.0))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their positions."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    ordered = x[order]
    starts_group = np.concatenate(([True], ordered[1:] != ordered[:-1]))
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.append(starts[1:], len(x))  # exclusive
    mean_position = (starts + ends + 1) / 2.0  # mean of the 1-based positions starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = mean_position[group]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(average_ranks(x), average_ranks(y))


def pair_similarities(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """The four similarity scores of each row pair (a_i, b_i), in float32."""
    # float32 torch ops in the reference evaluator's order: the same roundings, so near-equal
    # scores (identical sentence pairs) tie or order exactly as there and Spearman agrees
    a = torch.as_tensor(np.asarray(a), dtype=torch.float32)
    b = torch.as_tensor(np.asarray(b), dtype=torch.float32)
    difference = a - b
    scores = {
        "cosine": (F.normalize(a, p=2, dim=-1) * F.normalize(b, p=2, dim=-1)).sum(dim=-1),
        "euclidean": -torch.linalg.vector_norm(difference, dim=-1),
        "manhattan": -difference.abs().sum(dim=-1),
        "dot": (a * b).sum(dim=-1),
    }
    return {name: value.numpy() for name, value in scores.items()}


def sts_figures(embeddings1: np.ndarray, embeddings2: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """The 8 figures of the KorSTS table (x100): {cosine_pearson, cosine_spearman, ..., dot_spearman}."""
    figures = {}
    for name, scores in pair_similarities(embeddings1, embeddings2).items():
        figures[f"{name}_pearson"] = 100.0 * pearson(gold, scores)
        figures[f"{name}_spearman"] = 100.0 * spearman(gold, scores)
    return figures
