"""The two objectives (kfdeb/losses.py): naive formulas, finite differences, sentence-transformers."""

from __future__ import annotations

import math

import pytest
import torch

from kfdeb.losses import cosine_mse_loss, in_batch_negatives_loss


def naive_in_batch_negatives(anchors, positives, negatives, scale=20.0):
    """Loops over the definition: L = (1/B) sum_i [log sum_j exp(s_ij) - s_ii], c = [p; n]."""
    candidates = list(positives) + list(negatives)
    total = 0.0
    for i, a in enumerate(anchors):
        scores = [scale * float(a @ c / (a.norm() * c.norm())) for c in candidates]
        total += math.log(sum(math.exp(s) for s in scores)) - scores[i]
    return total / len(anchors)


def naive_cosine_mse(u, v, labels):
    return sum((float(x @ y / (x.norm() * y.norm())) - float(t)) ** 2 for x, y, t in zip(u, v, labels)) / len(u)


def embeddings(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_in_batch_negatives_equals_the_naive_formula():
    a, p, n = embeddings(6, 5, seed=1), embeddings(6, 5, seed=2), embeddings(6, 5, seed=3)
    assert in_batch_negatives_loss(a, p, n).item() == pytest.approx(naive_in_batch_negatives(a, p, n), rel=1e-6)
    no_hard = in_batch_negatives_loss(a, p).item()
    assert no_hard == pytest.approx(naive_in_batch_negatives(a, p, []), rel=1e-6)


def test_cosine_mse_equals_the_naive_formula():
    u, v = embeddings(7, 4, seed=4), embeddings(7, 4, seed=5)
    labels = torch.rand(7, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert cosine_mse_loss(u, v, labels).item() == pytest.approx(naive_cosine_mse(u, v, labels), rel=1e-6)


def test_gradients_match_finite_differences():
    a, p, n = (embeddings(4, 3, seed=s).requires_grad_() for s in (7, 8, 9))
    assert torch.autograd.gradcheck(in_batch_negatives_loss, (a, p, n), eps=1e-6, atol=1e-7)
    labels = torch.rand(4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda u, v: cosine_mse_loss(u, v, labels), (a, p), eps=1e-6, atol=1e-7)


def test_losses_equal_sentence_transformers():
    import sentence_transformers.sentence_transformer.losses as st_losses
    a, p, n = (embeddings(8, 16, seed=s, dtype=torch.float32) for s in (10, 11, 12))
    reference = st_losses.MultipleNegativesRankingLoss(model=None, scale=20.0)
    assert in_batch_negatives_loss(a, p, n).item() == pytest.approx(
        reference.compute_loss_from_embeddings([a, p, n], None).item(), abs=1e-6)
    labels = torch.rand(8)
    cosine = st_losses.CosineSimilarityLoss(model=None)
    assert cosine_mse_loss(a, p, labels).item() == pytest.approx(
        cosine.compute_loss_from_embeddings([a, p], labels).item(), abs=1e-7)


def test_losses_run_in_float32_under_bf16_autocast():
    """Under autocast the logits' matmul would run in bf16: every floating op of both losses must be fp32."""
    from conftest import RecordOps

    a, p, n = (embeddings(6, 16, seed=s, dtype=torch.float32) for s in (1, 2, 3))
    labels = torch.rand(6, generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with RecordOps() as ops:
            nli = in_batch_negatives_loss(a, p, n)
            sts = cosine_mse_loss(a, p, labels)
    assert "mm" in ops.names() and ops.floating_dtypes() == {torch.float32}
    assert nli.dtype == sts.dtype == torch.float32
    assert nli.item() == pytest.approx(naive_in_batch_negatives(a.double(), p.double(), n.double()), abs=1e-5)
    assert sts.item() == pytest.approx(naive_cosine_mse(a.double(), p.double(), labels.double()), abs=1e-6)
