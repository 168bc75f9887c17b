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


def naive_n_tuples(anchors, positives, negative_columns, scale=20.0):
    """sentence-transformers' MultipleNegativesRankingLoss on n-tuples, by its definition: anchor i against every
    positive and every negative of every column, target its own positive; a double loop in float64."""
    candidates = list(positives) + [n for column in negative_columns for n in column]
    total = 0.0
    for i, a in enumerate(anchors):
        scores = [scale * float(a @ c / (a.norm() * c.norm())) for c in candidates]
        total += math.log(sum(math.exp(s) for s in scores)) - scores[i]
    return total / len(anchors)


def test_n_tuples_equal_the_naive_loop_with_its_gradients():
    """(anchor, positive, negative_1 .. negative_3): loss and gradient of every input against the naive loop,
    the gradient by finite differences of it."""
    a, p = embeddings(5, 4, seed=21).requires_grad_(), embeddings(5, 4, seed=22).requires_grad_()
    negatives = embeddings(3, 5, 4, seed=23).requires_grad_()
    loss = in_batch_negatives_loss(a, p, negatives)
    assert loss.item() == pytest.approx(naive_n_tuples(a.detach(), p.detach(), negatives.detach()), rel=1e-9)
    loss.backward()
    step = 1e-6
    for which, tensor in enumerate((a, p, negatives)):
        for index in (0, 7, tensor.numel() - 1):
            moved = [x.detach().clone() for x in (a, p, negatives)]
            target = moved[which].reshape(-1)
            target[index] += step
            up = naive_n_tuples(*moved)
            target[index] -= 2 * step
            down = naive_n_tuples(*moved)
            assert tensor.grad.reshape(-1)[index].item() == pytest.approx((up - down) / (2 * step), abs=1e-6)
    assert torch.autograd.gradcheck(lambda x, y, z: in_batch_negatives_loss(x, y, z), (a, p, negatives),
                                    eps=1e-6, atol=1e-7)
    # one negative column, as a triplet's, is the same loss as a 1-tuple
    one = embeddings(5, 4, seed=24)
    assert in_batch_negatives_loss(a, p, one).item() == pytest.approx(in_batch_negatives_loss(a, p, one[None]).item())


def test_n_tuples_equal_sentence_transformers_loss_and_gradients():
    import sentence_transformers.sentence_transformer.losses as st_losses

    columns = [embeddings(8, 16, seed=s, dtype=torch.float32).requires_grad_() for s in range(30, 35)]  # a, p, 3 n
    ours = in_batch_negatives_loss(columns[0], columns[1], torch.stack(columns[2:]))
    ours.backward()
    ours_grads = [c.grad.clone() for c in columns]
    for c in columns:
        c.grad = None
    theirs = st_losses.MultipleNegativesRankingLoss(model=None, scale=20.0).compute_loss_from_embeddings(columns, None)
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    for mine, column in zip(ours_grads, columns):
        torch.testing.assert_close(mine, column.grad, rtol=0, atol=1e-6)


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


# --- ranking losses (CoSENT, AnglE) and Matryoshka ------------------------------------------------

def naive_angle(x, y):
    """AnglE's similarity from its definition: halves as real and imaginary parts, z / w scaled by |w| / |z|."""
    half = len(x) // 2
    z = [complex(float(x[k]), float(x[k + half])) for k in range(half)]
    w = [complex(float(y[k]), float(y[k + half])) for k in range(half)]
    norm_z = math.sqrt(sum(abs(t) ** 2 for t in z))
    norm_w = math.sqrt(sum(abs(t) ** 2 for t in w))
    quotients = [a / b * abs(b) ** 2 / (norm_z * norm_w) for a, b in zip(z, w)]  # = a conj(b) / (|z| |w|)
    return abs(sum(q.real for q in quotients) + sum(q.imag for q in quotients))


def naive_cosine(x, y):
    return float(x @ y / (x.norm() * y.norm()))


def naive_ranking(u, v, labels, similarity, scale=20.0):
    """log(1 + sum over (i, j) with y_i < y_j of exp(s_i - s_j)), by a double loop."""
    scores = [scale * similarity(x, y) for x, y in zip(u, v)]
    total = 1.0
    for i in range(len(scores)):
        for j in range(len(scores)):
            if float(labels[i]) < float(labels[j]):
                total += math.exp(scores[i] - scores[j])
    return math.log(total)


@pytest.mark.parametrize("similarity,naive", [("cosent", naive_cosine), ("angle", naive_angle)])
def test_ranking_losses_equal_the_naive_double_loop(similarity, naive):
    from kfdeb.losses import ranking_loss

    u, v = embeddings(9, 6, seed=20), embeddings(9, 6, seed=21)
    labels = torch.tensor([0.2, 0.8, 0.2, 1.0, 0.0, 0.6, 0.6, 0.4, 0.9], dtype=torch.float64)  # ties included
    assert ranking_loss(u, v, labels, similarity).item() == pytest.approx(naive_ranking(u, v, labels, naive), rel=1e-12)
    # the labels count only through their order: a monotone map changes nothing
    assert ranking_loss(u, v, labels ** 3 * 5 - 1, similarity).item() == pytest.approx(
        ranking_loss(u, v, labels, similarity).item(), rel=1e-15)
    # all labels tied: no ordered pair, loss log(1) = 0
    assert ranking_loss(u, v, torch.full((9,), 0.5, dtype=torch.float64), similarity).item() == 0.0
    # gradients: finite differences
    u.requires_grad_(), v.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ranking_loss(a, b, labels, similarity), (u, v), eps=1e-6, atol=1e-7)


def test_angle_similarity_of_an_odd_width_pads_one_zero():
    from kfdeb.losses import angle_similarity

    u, v = embeddings(4, 5, seed=22), embeddings(4, 5, seed=23)
    padded = [naive_angle(torch.cat([x, x.new_zeros(1)]), torch.cat([y, y.new_zeros(1)])) for x, y in zip(u, v)]
    torch.testing.assert_close(angle_similarity(u, v), torch.tensor(padded, dtype=torch.float64), rtol=1e-12, atol=0)


def test_ranking_losses_equal_sentence_transformers():
    import sentence_transformers.sentence_transformer.losses as st_losses
    from kfdeb.losses import ranking_loss

    u, v = embeddings(16, 12, seed=24, dtype=torch.float32), embeddings(16, 12, seed=25, dtype=torch.float32)
    labels = torch.randint(0, 6, (16,), generator=torch.Generator().manual_seed(26)).float() / 5  # KorSTS-like ties
    for similarity, reference in (("cosent", st_losses.CoSENTLoss(model=None, scale=20.0)),
                                  ("angle", st_losses.AnglELoss(model=None, scale=20.0))):
        assert ranking_loss(u, v, labels, similarity).item() == pytest.approx(
            reference.compute_loss_from_embeddings([u, v], labels).item(), abs=1e-5), similarity


def naive_matryoshka(loss_of, columns, dims, weights):
    """sum_k w_k L(normalize(e[:, :d_k])), normalising explicitly."""
    return sum(w * loss_of(torch.nn.functional.normalize(columns[..., :d], dim=-1)) for d, w in zip(dims, weights))


def test_matryoshka_equals_the_weighted_sum_over_normalised_prefixes():
    from kfdeb.losses import matryoshka, ranking_loss

    a, p, n = embeddings(6, 8, seed=27), embeddings(6, 8, seed=28), embeddings(6, 8, seed=29)
    columns = torch.stack([a, p, n])
    labels = torch.rand(6, generator=torch.Generator().manual_seed(30), dtype=torch.float64)
    dims, weights = (8, 5, 2), (1.0, 0.5, 2.0)
    cases = [(lambda c: in_batch_negatives_loss(c[0], c[1], c[2]), columns),
             (lambda c: cosine_mse_loss(c[0], c[1], labels), columns[:2]),
             (lambda c: ranking_loss(c[0], c[1], labels, "angle"), columns[:2])]
    for loss_of, inputs in cases:
        assert matryoshka(loss_of, inputs, dims, weights).item() == pytest.approx(
            naive_matryoshka(loss_of, inputs, dims, weights).item(), rel=1e-12)
        # one full width at weight 1 is the plain loss, bit for bit
        assert torch.equal(matryoshka(loss_of, inputs, (8,), (1.0,)), loss_of(inputs))
        leaf = inputs.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda x: matryoshka(loss_of, x, dims, weights), (leaf,), eps=1e-6, atol=1e-7)


class _GivenEmbeddings(torch.nn.Module):
    """A sentence-transformers module whose 'sentence_embedding' is the tensor fed in: the reference
    losses then see exactly the embeddings ours see."""

    def forward(self, features):
        return {**features, "sentence_embedding": features["embedding"]}

    def get_sentence_embedding_dimension(self):
        return 12


def test_matryoshka_equals_sentence_transformers():
    import sentence_transformers
    import sentence_transformers.sentence_transformer.losses as st_losses
    from kfdeb.losses import matryoshka, ranking_loss

    model = sentence_transformers.SentenceTransformer(modules=[_GivenEmbeddings()], device="cpu")
    a, p, n = (embeddings(8, 12, seed=s, dtype=torch.float32) for s in (31, 32, 33))
    labels = torch.randint(0, 6, (8,), generator=torch.Generator().manual_seed(34)).float() / 5
    dims, weights = (12, 6, 3), (1.0, 0.5, 0.25)
    cases = [
        (st_losses.MultipleNegativesRankingLoss(model, scale=20.0), [a, p, n], None,
         lambda c: in_batch_negatives_loss(c[0], c[1], c[2])),
        (st_losses.CosineSimilarityLoss(model), [a, p], labels, lambda c: cosine_mse_loss(c[0], c[1], labels)),
        (st_losses.CoSENTLoss(model, scale=20.0), [a, p], labels, lambda c: ranking_loss(c[0], c[1], labels, "cosent")),
        (st_losses.AnglELoss(model, scale=20.0), [a, p], labels, lambda c: ranking_loss(c[0], c[1], labels, "angle")),
    ]
    for base, columns, target, loss_of in cases:
        reference = st_losses.MatryoshkaLoss(model, base, matryoshka_dims=list(dims), matryoshka_weights=list(weights))
        expected = reference([{"embedding": column} for column in columns], target)
        assert matryoshka(loss_of, torch.stack(columns), dims, weights).item() == pytest.approx(
            expected.item(), abs=2e-5), type(base).__name__
