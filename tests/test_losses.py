"""The two objectives (kfdeb/losses.py): naive formulas, finite differences, sentence-transformers."""

from __future__ import annotations

import math

import pytest
import torch

from kfdeb.losses import cosine_mse_loss, gist_loss, in_batch_negatives_loss


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
    labels = torch.rand(4, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda u, v: cosine_mse_loss(u, v, labels), (a, p), eps=1e-6, atol=1e-7)


def test_losses_equal_sentence_transformers():
    import sentence_transformers.sentence_transformer.losses as st_losses
    a, p, n = (embeddings(8, 16, seed=s, dtype=torch.float32) for s in (10, 11, 12))
    reference = st_losses.MultipleNegativesRankingLoss(model=None, scale=20.0)
    assert in_batch_negatives_loss(a, p, n).item() == pytest.approx(
        reference.compute_loss_from_embeddings([a, p, n], None).item(), abs=1e-6)
    # Seeded: unseeded labels drew from the global generator, whose state depends on which tests the
    # xdist worker ran before. Both sides are float32 sums in different orders, so they agree to a few
    # ulps (ST casts labels to float32 even for float64 inputs), not to one: rel 1e-6 is ~16 ulps.
    labels = torch.rand(8, generator=torch.Generator().manual_seed(13))
    cosine = st_losses.CosineSimilarityLoss(model=None)
    assert cosine_mse_loss(a, p, labels).item() == pytest.approx(
        cosine.compute_loss_from_embeddings([a, p], labels).item(), rel=1e-6)


def test_losses_run_in_float32_under_bf16_autocast():
    """Under autocast the logits' matmul would run in bf16: every floating op of both losses must be fp32."""
    from conftest import RecordOps

    a, p, n = (embeddings(6, 16, seed=s, dtype=torch.float32) for s in (1, 2, 3))
    labels = torch.rand(6, generator=torch.Generator().manual_seed(4))
    guide = [a + 0.1, p - 0.1, n]  # the guide's embeddings come widened to float32 (loop.guide_embeddings)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with RecordOps() as ops:
            nli = in_batch_negatives_loss(a, p, n)
            sts = cosine_mse_loss(a, p, labels)
            symmetric = in_batch_negatives_loss(a, p, n, symmetric=True, keys=torch.arange(18).view(3, 6))
            gist = gist_loss([a, p, n], guide)
    assert "mm" in ops.names() and ops.floating_dtypes() == {torch.float32}
    assert symmetric.dtype == gist.dtype == torch.float32
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


# --- the in-batch levers: --scale, mnrl_symmetric, gist, shared positives (issue 34) ------------------

class _Given(torch.nn.Module):
    """A sentence-transformers module returning the embedding under `key` of the features fed in, with the
    tokenizer and length GISTEmbedLoss checks (one shared tokenizer: the guide reads the model's features)."""

    def __init__(self, key):
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        super().__init__()
        self.key, self.max_seq_length = key, 16
        self.tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))

    def forward(self, features):
        return {**features, "sentence_embedding": features[self.key]}

    def get_sentence_embedding_dimension(self):
        return 12


def _given_model(key="embedding"):
    import sentence_transformers

    return sentence_transformers.SentenceTransformer(modules=[_Given(key)], device="cpu")


def _reference_and_gradients(reference, columns, guide_columns=None):
    """The reference loss on these embeddings (float64) and its gradient w.r.t. each column."""
    leaves = [c.detach().clone().requires_grad_() for c in columns]
    features = [{"embedding": leaf, **({"guide": g.detach()} if guide_columns is not None else {})}
                for leaf, g in zip(leaves, guide_columns if guide_columns is not None else leaves)]
    loss = reference(features, None)
    loss.backward()
    return loss.item(), [leaf.grad for leaf in leaves]


def _ours_and_gradients(loss_of, columns):
    leaves = [c.detach().clone().requires_grad_() for c in columns]
    loss = loss_of(leaves)
    loss.backward()
    return loss.item(), [leaf.grad for leaf in leaves]


def _assert_same(ours, theirs):
    assert ours[0] == pytest.approx(theirs[0], rel=1e-12)
    for mine, reference in zip(ours[1], theirs[1]):
        torch.testing.assert_close(mine, reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scale", [20.0, 100.0, 7.5])
@pytest.mark.parametrize("width", [2, 3, 5])  # pairs, triplets, 3 negatives
def test_scale_and_symmetric_equal_sentence_transformers(scale, width):
    """--scale and --nli_loss mnrl / mnrl_symmetric against MultipleNegativesRankingLoss and
    MultipleNegativesSymmetricRankingLoss at that scale: value and gradient of every column, float64."""
    import warnings

    import sentence_transformers.sentence_transformer.losses as st_losses

    columns = [embeddings(8, 12, seed=40 + s) for s in range(width)]
    model = _given_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the reference's class is deprecated, its maths is not
        symmetric_reference = st_losses.MultipleNegativesSymmetricRankingLoss(model, scale=scale)
    for symmetric, reference in ((False, st_losses.MultipleNegativesRankingLoss(model, scale=scale)),
                                 (True, symmetric_reference)):
        ours = _ours_and_gradients(
            lambda c: in_batch_negatives_loss(c[0], c[1], c[2:] or None, scale=scale, symmetric=symmetric), columns)
        _assert_same(ours, _reference_and_gradients(reference, columns))
    # the scale matters: the figures at 20 and 100 differ
    assert in_batch_negatives_loss(*columns[:2], scale=100.0) != in_batch_negatives_loss(*columns[:2], scale=20.0)


def _gist_ours(columns, guide_columns, scale, **options):
    from kfdeb.losses import gist_loss

    return _ours_and_gradients(lambda c: gist_loss(c, guide_columns, scale, **options), columns)


@pytest.mark.parametrize("margin_strategy,margin", [("absolute", 0.0), ("absolute", 0.1), ("relative", 0.05)])
@pytest.mark.parametrize("contrast", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("width", [2, 3])
def test_gist_equals_sentence_transformers(margin_strategy, margin, contrast, width):
    """--nli_loss gist against GISTEmbedLoss on the same embeddings, float64: the guide the model itself (its own
    embeddings of the same texts, as --guide_model self at step 0) and another model; every margin option and
    contrast flag. Enough of the guide's scores pass the thresholds that the masks are not empty."""
    import sentence_transformers.sentence_transformer.losses as st_losses

    scale = 20.0
    columns = [embeddings(8, 12, seed=50 + s) for s in range(width)]
    columns[1] = columns[0] + 0.8 * columns[1]  # positives near their anchors, as in training data
    other_guide = [c + 0.7 * embeddings(8, 12, seed=60 + s) for s, c in enumerate(columns)]
    anchors, positives = contrast
    options = dict(margin_strategy=margin_strategy, margin=margin, contrast_anchors=anchors, contrast_positives=positives)
    for guide_columns in (columns, other_guide):
        reference = st_losses.GISTEmbedLoss(_given_model(), _given_model("guide"), temperature=1 / scale, **options)
        theirs = _reference_and_gradients(reference, columns, guide_columns)
        _assert_same(_gist_ours(columns, guide_columns, scale, **options), theirs)
    # the guide masked something: without it (a guide that scores nothing above any positive) the loss differs
    blind = [torch.zeros_like(c) for c in columns]
    blind[0] = blind[1] = torch.ones_like(columns[0])
    assert _gist_ours(columns, blind, scale, **options)[0] != pytest.approx(theirs[0], rel=1e-6)


def test_gist_on_n_tuples_equals_cached_gist():
    """n-tuples (3 negatives): CachedGISTEmbedLoss, the reference that takes them (mini-batches of 3)."""
    import sentence_transformers.sentence_transformer.losses as st_losses

    columns = [embeddings(7, 12, seed=70 + s) for s in range(5)]
    guide_columns = [c + 0.5 * embeddings(7, 12, seed=80 + s) for s, c in enumerate(columns)]
    reference = st_losses.CachedGISTEmbedLoss(_given_model(), _given_model("guide"), temperature=0.01, mini_batch_size=3)
    _assert_same(_gist_ours(columns, guide_columns, 100.0), _reference_and_gradients(reference, columns, guide_columns))


def test_matryoshka_gist_keeps_the_guide_at_full_width():
    import sentence_transformers.sentence_transformer.losses as st_losses
    from kfdeb.losses import Objective, nli_loss

    columns = torch.stack([embeddings(8, 12, seed=90 + s) for s in range(3)])
    guide_columns = columns + 0.5 * embeddings(3, 8, 12, seed=93)
    dims, weights = (12, 6, 3), (1.0, 0.5, 0.25)
    model = _given_model()
    reference = st_losses.MatryoshkaLoss(model, st_losses.GISTEmbedLoss(model, _given_model("guide"), temperature=0.05),
                                         matryoshka_dims=list(dims), matryoshka_weights=list(weights))
    theirs = _reference_and_gradients(reference, list(columns), list(guide_columns))
    objective = Objective(matryoshka_dims=dims, matryoshka_weights=weights, nli_loss="gist", scale=20.0)
    ours = _ours_and_gradients(lambda c: nli_loss(torch.stack(c), objective, guide_columns=guide_columns), list(columns))
    _assert_same(ours, theirs)


def naive_masked_in_batch(columns, keys, scale, variant, guide=None, margin=0.0, contrast=(True, True)):
    """The in-batch losses with shared positives masked, by their definitions, one row at a time in float64:
    a candidate whose key is the row's positive key is left out, except the row's own positive; the reverse
    direction and GIST's anchor and positive blocks leave out the rows with the same positive key."""
    a, p, negatives = columns[0], columns[1], list(columns[2:])
    B = len(a)

    def cos(x, y):
        return float(x @ y / (x.norm() * y.norm()))

    total = 0.0
    for i in range(B):
        same = lambda j: keys[1][j] == keys[1][i]  # noqa: E731
        # (score, candidate's guide score or None, kept) for every candidate of anchor i
        terms = [(cos(a[i], p[j]), j) for j in range(B) if j == i or not same(j)]
        terms += [(cos(a[i], n[j]), None) for c, n in enumerate(negatives) for j in range(B)
                  if keys[2 + c][j] != keys[1][i]]
        if variant == "gist":
            threshold = cos(guide[0][i], guide[1][i]) - margin
            kept = [cos(a[i], p[j]) for j in range(B) if j == i or (not same(j) and cos(guide[0][i], guide[1][j]) <= threshold)]
            if contrast[0]:
                kept += [cos(a[i], a[j]) for j in range(B) if j != i and not same(j)
                         and cos(guide[0][i], guide[0][j]) <= threshold]
            if contrast[1]:
                kept += [cos(p[i], p[j]) for j in range(B) if j != i and not same(j)
                         and cos(guide[1][i], guide[1][j]) <= threshold]
            kept += [cos(a[i], n[j]) for c, n in enumerate(negatives) for j in range(B)
                     if keys[2 + c][j] != keys[1][i] and cos(guide[0][i], guide[2 + c][j]) <= threshold]
            scores = [scale * s for s in kept]
        else:
            scores = [scale * s for s, _ in terms]
        forward = math.log(sum(math.exp(s) for s in scores)) - scale * cos(a[i], p[i])
        if variant == "mnrl_symmetric":
            reverse = [scale * cos(p[i], a[j]) for j in range(B) if j == i or not same(j)]
            forward = (forward + math.log(sum(math.exp(s) for s in reverse)) - scale * cos(p[i], a[i])) / 2
        total += forward
    return total / B


@pytest.mark.parametrize("variant", ["mnrl", "mnrl_symmetric", "gist"])
def test_rows_that_share_a_positive_are_never_negatives_of_each_other(variant):
    """Rows 0, 3, 5 share one positive text (one of them twice as a negative elsewhere), rows 1 and 6 another:
    the loss is the masked formula, computed naively, and its gradient that formula's (finite differences)."""
    from kfdeb.losses import Objective, nli_loss

    columns = torch.stack([embeddings(7, 6, seed=100 + s) for s in range(3)])
    positive_keys = [10, 11, 12, 10, 13, 10, 11]
    keys = torch.tensor([[0, 1, 2, 3, 4, 5, 6], positive_keys, [20, 21, 10, 22, 23, 24, 25]])  # row 2's negative: text 10
    columns[1, 3] = columns[1, 5] = columns[1, 0]  # one text, one embedding
    columns[2, 2] = columns[1, 0]
    guide = columns.detach() + 0.3 * embeddings(3, 7, 6, seed=110)
    objective = Objective(nli_loss=variant, scale=20.0)
    loss = nli_loss(columns, objective, keys, guide)
    assert loss.item() == pytest.approx(naive_masked_in_batch(columns, keys, 20.0, variant, guide), rel=1e-12)
    # unmasked, the same embeddings give another loss: the masks are what the figure above measured
    assert nli_loss(columns, objective, None, guide).item() != pytest.approx(loss.item(), rel=1e-3)
    leaf = columns.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda c: nli_loss(c, objective, keys, guide), (leaf,), eps=1e-6, atol=1e-7)
    # with no key repeated the masks are empty: the reference's loss
    distinct = torch.arange(21).view(3, 7)
    assert nli_loss(columns, objective, distinct, guide).item() == pytest.approx(
        nli_loss(columns, objective, None, guide).item(), rel=1e-15)
