"""top_k (kfdeb/search.py) against brute force, and the semantic-search example."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import run_script
from kfdeb.search import top_k


def brute_force(queries: np.ndarray, corpus: np.ndarray, k: int):
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    c = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    scores = q @ c.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("k,chunk,batch", [(1, 1000, 256), (5, 7, 3), (13, 4, 1), (50, 16, 5)])
def test_top_k_equals_brute_force_in_any_chunking(k, chunk, batch):
    rng = np.random.default_rng(k)
    queries, corpus = rng.normal(size=(11, 8)), rng.normal(size=(37, 8))
    scores, indices = top_k(queries, corpus, k=k, corpus_chunk=chunk, query_batch=batch)
    expected_scores, expected_indices = brute_force(queries, corpus, min(k, 37))
    assert indices.shape == (11, min(k, 37))  # k above the corpus size is clamped to it
    np.testing.assert_array_equal(indices.numpy(), expected_indices)
    np.testing.assert_allclose(scores.numpy(), expected_scores, atol=1e-6)


def test_ties_keep_the_lower_index_and_bad_arguments_are_refused():
    corpus = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 0.0]])
    _, indices = top_k(torch.tensor([1.0, 0.0]), corpus, k=3, corpus_chunk=2)
    assert indices.tolist() == [[0, 2, 3]]
    with pytest.raises(ValueError, match="k must be at least 1"):
        top_k(corpus, corpus, k=0)
    with pytest.raises(ValueError, match="dimension"):
        top_k(torch.zeros(1, 3), corpus)


def test_semantic_search_example_runs(tiny_deberta):
    result = run_script("examples/semantic_search.py", tiny_deberta)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Query:") == 3
    assert result.stdout.count("(Score: ") == 15
