"""Pearson, Spearman and the 8 KorSTS figures (kfdeb/metrics.py) against scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from kfdeb.metrics import FIGURE_KEYS, average_ranks, pair_similarities, pearson, spearman, sts_figures


@pytest.mark.parametrize("seed", range(5))
def test_pearson_and_spearman_equal_scipy_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    n = 500
    gold = rng.integers(0, 6, n).astype(np.float64) / 5  # six values: heavy ties
    scores = np.round(gold + rng.normal(0, 0.5, n), 1)  # rounded: ties in the scores too
    assert abs(pearson(gold, scores) - stats.pearsonr(gold, scores)[0]) < 1e-9
    assert abs(spearman(gold, scores) - stats.spearmanr(gold, scores)[0]) < 1e-9
    np.testing.assert_allclose(average_ranks(scores), stats.rankdata(scores, method="average"), rtol=0, atol=1e-12)


def test_constant_input_is_nan_as_documented():
    assert math.isnan(pearson(np.ones(10), np.arange(10.0)))
    assert math.isnan(spearman(np.arange(10.0), np.full(10, 3.0)))
    with pytest.raises(ValueError):
        pearson(np.ones(3), np.ones(4))


def test_similarities_and_figures_follow_their_definitions():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16)).astype(np.float32)
    b = (a + rng.normal(scale=0.8, size=a.shape)).astype(np.float32)
    gold = rng.integers(0, 26, 200) / 5.0
    sims = pair_similarities(a, b)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    np.testing.assert_allclose(sims["cosine"], [x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a64, b64)], rtol=1e-5)
    np.testing.assert_allclose(sims["euclidean"], [-np.linalg.norm(x - y) for x, y in zip(a64, b64)], rtol=1e-5)
    np.testing.assert_allclose(sims["manhattan"], [-np.abs(x - y).sum() for x, y in zip(a64, b64)], rtol=1e-5)
    np.testing.assert_allclose(sims["dot"], [x @ y for x, y in zip(a64, b64)], rtol=1e-5)
    figures = sts_figures(a, b, gold)
    assert tuple(figures) == FIGURE_KEYS
    for name in ("cosine", "euclidean", "manhattan", "dot"):
        assert figures[f"{name}_pearson"] == pytest.approx(100 * stats.pearsonr(gold, sims[name])[0], abs=1e-9)
        assert figures[f"{name}_spearman"] == pytest.approx(100 * stats.spearmanr(gold, sims[name])[0], abs=1e-9)
