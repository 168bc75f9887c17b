"""The two training objectives, optionally spread over data-parallel ranks.

In-batch negatives with hard negatives (sentence-transformers' MultipleNegativesRankingLoss).
For a global batch of B rows (a_i, p_i, n_i^1 .. n_i^k) (k = 1: triplets; k = 0: pairs) and the
candidates c = [p_1..p_B; n_1^1..n_B^1; ...; n_1^k..n_B^k] ((1 + k)B x H):

    s_ij = scale * cos(a_i, c_j),   L_nli = (1/B) sum_i [ logsumexp_j s_ij - s_ii ]

i.e. cross-entropy over (1 + k)B candidates with target j = i (scale s = --scale, default 20): a row's
own negatives are its hard negatives, every other row's positive and negatives are in-batch ones.

The in-batch objective's variants (--nli_loss), all at --scale s (1 / temperature; default 20, the
recipe's), with g(i) the column of anchor i's own positive in the global batch:

- mnrl (the above; sentence-transformers' MultipleNegativesRankingLoss).
- mnrl_symmetric (MultipleNegativesSymmetricRankingLoss): the mean of the above and the reverse
  direction, positive p_i against every anchor of the batch, target a_i:
      L = (1/B) sum_i [ (logsumexp_j s_ij - s_ii) + (logsumexp_j s'_ij - s'_ii) ] / 2,   s'_ij = s cos(p_i, a_j)
  (hard negatives take part in the first direction only, as in the reference).
- gist (GISTEmbedLoss / CachedGISTEmbedLoss): a frozen guide model's cosines t(.,.) of the same texts
  mask false negatives. Anchor i's threshold is the guide's score of its own positive,
  t_i = t(a_i, p_i) - margin (margin_strategy absolute) or t_i - |t_i| margin (relative); every
  candidate the guide scores above it is dropped (logit -inf), the own positive excepted. The logits
  of anchor i are s * cos over the blocks [positives; anchors (contrast_anchors); positives, from p_i
  (contrast_positives); each negative column], each masked by the guide that way, a_i and p_i
  themselves left out of the anchor and positive blocks; target: the own positive. Differs from the
  reference only with several ranks: the reference compares a rank's anchors with its own anchors
  only, kfdeb with the global batch's, so that W ranks give one process's loss.

Rows that share a positive text (FAQ data: many questions for one answer) are never negatives of
each other, in every variant: given the batch's text keys (`keys`: normalised text ids of every
column, the no-duplicates sampler's), a candidate whose text is anchor i's own positive text is
masked (-inf) except in the own column g(i), and so are the anchors and positives of the other
rows with that positive (the reverse direction, GIST's anchor and positive blocks). The reference
losses do not do this (MNRL counts such a copy as a negative; GIST masks it only when the guide
scores it above the positive, and an identical text scores equal, which its strict > keeps);
with the sampler letting positives repeat (batching.py), this is what keeps them from being
false negatives. Without repeats the masks are empty and each variant is the reference's.

Cosine regression (CosineSimilarityLoss) for B pairs (u_i, v_i) with labels y_i in [0, 1]:

    L_sts = (1/B) sum_i (cos(u_i, v_i) - y_i)^2

Guards against zero vectors: the pairwise cosine is x.y / max(|x| |y|, 1e-8); the NLI loss's cosine
matrix normalises each row as x / max(|x|, 1e-12) (F.normalize's guard). torch.cosine_similarity,
which the reference's CosineSimilarityLoss calls, clamps each norm instead: x.y / (max(|x|, 1e-8)
max(|y|, 1e-8)). The three agree unless a norm is below ~1e-4, which no real embedding is. Both losses are computed
in at least float32 whatever the autocast dtype: autocast is switched off inside them (it would run
the logits' matrix product in bf16/fp16) and their inputs are widened to float32. The softmax over
2B logits scaled by 20 is where low precision hurts: a bf16 cosine carries ~3 significant digits.

Ranking losses for scored pairs (--sts_loss cosent|angle), on s_i = scale * sim(u_i, v_i):

    L_rank = log(1 + sum_{(i, j): y_i < y_j} exp(s_i - s_j))        (scale 20)

over every ordered pair of the global batch: a pair whose label is lower should score lower, the
labels count only through their order and ties add nothing. CoSENT: sim = cos. AnglE: sim is the
angle similarity of the AnglE paper: with each embedding's first and second halves as the real
and imaginary parts of z = a + ib and w = c + id, the complex quotient z / w rescaled by |w| / |z|
has the parts sum_k (a_k c_k + b_k d_k) / (|z| |w|) = cos(z, w) and sum_k (b_k c_k - a_k d_k) / (|z| |w|);
sim = |sum of both| (an odd width gets a zero coordinate).

Matryoshka (MRL, --matryoshka_dims d_1 > d_2 > ...): L_mrl = sum_k w_k L(normalize(e[:, :d_k])) for
either objective, from one forward: only the loss repeats per width. Every similarity above
is invariant to the scale of each vector, so normalize(e[:, :d]) and e[:, :d] give the same loss
and `matryoshka` does not compute the normalisation: with the single full width and weight 1,
L_mrl is the plain loss bit for bit.

`nli_loss` and `sts_loss` apply these to a task's columns of embeddings (columns x batch x H: anchor,
positive[, negative]; or the two sides of the scored pairs), with Matryoshka on top.

Data parallelism (W ranks, rank r holding b_r of the B examples, sum_r b_r = B): see
`_rank_share` for how each rank's loss is scaled so that DDP's gradient average reproduces the
single-process gradient of the global batch exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

COSINE_EPS = 1e-8
STS_LOSSES = ("cosine", "cosent", "angle")
NLI_LOSSES = ("mnrl", "mnrl_symmetric", "gist")
GIST_MARGIN_STRATEGIES = ("absolute", "relative")


@dataclass(frozen=True)
class Objective:
    """What turns a batch's embeddings into a loss, besides the task: the STS loss, the Matryoshka widths with their
    weights (none: the full embedding, the reference recipe), the in-batch loss, its scale and GIST's options."""

    sts_loss: str = "cosine"  # one of STS_LOSSES
    matryoshka_dims: tuple[int, ...] = ()
    matryoshka_weights: tuple[float, ...] = ()
    nli_loss: str = "mnrl"  # one of NLI_LOSSES
    scale: float = 20.0  # the in-batch losses' 1 / temperature
    gist_margin_strategy: str = "absolute"  # GIST only: one of GIST_MARGIN_STRATEGIES
    gist_margin: float = 0.0
    gist_contrast_anchors: bool = True
    gist_contrast_positives: bool = True


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _no_autocast(x: torch.Tensor):
    return torch.autocast(x.device.type, enabled=False)


def cosine_matrix(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """cos(q_i, c_j) for all i, j: (n x H, m x H) -> n x m."""
    q = queries / queries.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    c = candidates / candidates.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return q @ c.T


def pairwise_cosine(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """cos(u_i, v_i) for each row i: (n x H, n x H) -> n."""
    return (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1)).clamp(min=COSINE_EPS)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rank_share(per_example_sum: torch.Tensor, global_batch_size: int, world_size: int) -> torch.Tensor:
    # Why multiply by W: the global loss is L = (1/B) sum_r S_r, with S_r the sum of per-example
    # losses on rank r. Rank r backpropagates l_r = W * S_r / B; the gathers route every term's
    # gradient back to the rank that computed the embedding, so rank r ends up holding
    # g_r = sum_r' d l_r' / d theta_r (its own parameters' share). DDP then averages:
    # (1/W) sum_r g_r = (1/W) * W * dL/dtheta = dL/dtheta, the single-process gradient of the
    # global batch. With equal shards (b = B/W) l_r is just the mean over the local examples.
    return per_example_sum * (world_size / global_batch_size)


def _gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows in rank order, keeping the gradient path to each rank."""
    # torch.distributed.nn's all_gather is differentiable: its backward sums the incoming
    # gradients over ranks and hands each rank the slice for the rows it contributed.
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(tensor), dim=0)


def _negative_columns(negatives: torch.Tensor | Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
    if negatives is None:
        return []
    if isinstance(negatives, torch.Tensor) and negatives.dim() == 2:
        return [negatives]  # one negative column: a triplet's
    return list(negatives)  # n-tuples: every negative column, each b x H


def _all_rows(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    return _gather_rows(tensor) if world_size > 1 else tensor


def shares_positive(positive_keys: torch.Tensor, candidate_keys: torch.Tensor, rows: torch.Tensor,
                    positives_first: bool = True) -> torch.Tensor:
    """b x m: True where candidate j's text key is the positive key of global row rows[i], except, when the
    candidates start with the batch's positives (positives_first), j = rows[i]: the own positive, the target.
    positive_keys: B (the global batch's), candidate_keys: m."""
    mask = candidate_keys[None, :] == positive_keys[rows][:, None]
    if positives_first:
        mask[torch.arange(len(rows), device=mask.device), rows] = False
    return mask


def in_batch_negatives_loss(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | Sequence[torch.Tensor] | None = None,
    scale: float = 20.0,
    symmetric: bool = False,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_nli (symmetric: mnrl_symmetric's) of this rank's rows against the candidates of all ranks (single
    process: all of them).

    anchors/positives/negatives: b x H, this rank's slice of the global batch (every rank the
    same b: the NLI batch size must divide by the world size). keys: columns x B integer text keys of the
    global batch (None: no masking of shared positives). Returns this rank's share of the loss (see
    `_rank_share`); with one process that is the loss itself.
    """
    rank, world_size = _world()
    # Candidates are laid out exactly as in one process over the global batch:
    # [p of rank 0, p of rank 1, ...; n of rank 0, n of rank 1, ...], so anchor i of rank r
    # has its positive at row r*b + i and every hard negative of every rank is a candidate.
    columns = [_all_rows(column, world_size) for column in [positives, *_negative_columns(negatives)]]
    local = anchors.shape[0]
    targets = torch.arange(local, device=anchors.device) + rank * local
    with _no_autocast(anchors):
        candidates = _at_least_fp32(torch.cat(columns, dim=0))
        logits = scale * cosine_matrix(_at_least_fp32(anchors), candidates)
        if keys is not None:
            logits = logits.masked_fill(shares_positive(keys[1], keys[1:].reshape(-1), targets), float("-inf"))
        per_example_sum = F.cross_entropy(logits, targets, reduction="sum")
        if symmetric:  # each positive against every anchor of the batch
            reverse = scale * cosine_matrix(_at_least_fp32(positives), _at_least_fp32(_all_rows(anchors, world_size)))
            if keys is not None:
                reverse = reverse.masked_fill(shares_positive(keys[1], keys[1], targets), float("-inf"))
            per_example_sum = (per_example_sum + F.cross_entropy(reverse, targets, reduction="sum")) / 2
    return _rank_share(per_example_sum, local * world_size, world_size)


def gist_loss(
    columns: Sequence[torch.Tensor],
    guide_columns: Sequence[torch.Tensor],
    scale: float = 20.0,
    margin_strategy: str = "absolute",
    margin: float = 0.0,
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """GIST's loss (module docstring) of this rank's rows: columns = (anchors, positives, negatives_1..n), each
    b x H, and the guide's embeddings of the same texts (any width, no gradient). keys as in
    `in_batch_negatives_loss`. Returns this rank's share (`_rank_share`)."""
    rank, world_size = _world()
    local = columns[0].shape[0]
    targets = torch.arange(local, device=columns[0].device) + rank * local
    everyone = lambda tensors: [_all_rows(t, world_size) for t in tensors]  # noqa: E731
    with _no_autocast(columns[0]):
        anchors, positives = _at_least_fp32(columns[0]), _at_least_fp32(columns[1])
        guide = [_at_least_fp32(g.detach()) for g in guide_columns]
        all_candidates = everyone([_at_least_fp32(c) for c in columns[1:]])
        all_guide = everyone(guide[1:])
        guide_positive = cosine_matrix(guide[0], all_guide[0])  # b x B
        threshold = guide_positive[torch.arange(local, device=targets.device), targets][:, None]
        limit = threshold - (threshold.abs() * margin if margin_strategy == "relative" else margin)
        blocks = []

        def add(similarity: torch.Tensor, guided: torch.Tensor, column_keys: torch.Tensor | None,
                own: str) -> None:
            masked = guided > limit  # the guide scores it above the row's own positive: a false negative
            rows = torch.arange(local, device=masked.device)
            if column_keys is not None:  # another row with the same positive, or a copy of the own positive
                masked |= shares_positive(keys[1], column_keys, targets, positives_first=own != "negatives")
            if own == "keep":  # the target
                masked[rows, targets] = False
            elif own == "drop":  # the row's own anchor or positive: not a negative of itself
                masked[rows, targets] = True
            blocks.append(similarity.masked_fill(masked, float("-inf")))

        def key_row(index: int) -> torch.Tensor | None:
            return keys[index] if keys is not None else None

        add(cosine_matrix(anchors, all_candidates[0]), guide_positive, key_row(1), "keep")
        if contrast_anchors:
            add(cosine_matrix(anchors, _all_rows(anchors, world_size)),
                cosine_matrix(guide[0], _all_rows(guide[0], world_size)), key_row(1), "drop")
        if contrast_positives:
            add(cosine_matrix(positives, all_candidates[0]), cosine_matrix(guide[1], all_guide[0]), key_row(1), "drop")
        for index, (negative, guide_negative) in enumerate(zip(all_candidates[1:], all_guide[1:]), start=2):
            add(cosine_matrix(anchors, negative), cosine_matrix(guide[0], guide_negative), key_row(index), "negatives")
        per_example_sum = F.cross_entropy(scale * torch.cat(blocks, dim=1), targets, reduction="sum")
    return _rank_share(per_example_sum, local * world_size, world_size)


def cosine_mse_loss(
    u: torch.Tensor, v: torch.Tensor, labels: torch.Tensor, global_batch_size: int | None = None
) -> torch.Tensor:
    """L_sts of this rank's pairs; `global_batch_size` (default: this rank's size) is B over all ranks."""
    _, world_size = _world()
    with _no_autocast(u):
        squared_errors = (pairwise_cosine(_at_least_fp32(u), _at_least_fp32(v)) - _at_least_fp32(labels)) ** 2
        return _rank_share(squared_errors.sum(), global_batch_size or u.shape[0] * world_size, world_size)


def angle_similarity(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """AnglE's similarity of each row pair (module docstring): n x H, n x H -> n."""
    if u.shape[-1] % 2:  # the halves must pair up: one zero coordinate changes no norm and no product
        u, v = F.pad(u, (0, 1)), F.pad(v, (0, 1))
    a, b = u.chunk(2, dim=-1)
    c, d = v.chunk(2, dim=-1)
    norms = (u.norm(dim=-1) * v.norm(dim=-1)).clamp(min=COSINE_EPS)
    real = (a * c + b * d).sum(-1) / norms
    imaginary = (b * c - a * d).sum(-1) / norms
    return (real + imaginary).abs()


STS_SIMILARITIES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cosent": pairwise_cosine, "angle": angle_similarity}


def _gather_padded(values: torch.Tensor, rows_per_rank: int) -> torch.Tensor:
    """Every rank's rows, each rank's block padded with zeros to `rows_per_rank` (shards differ by one at most)."""
    padded = torch.cat([values, values.new_zeros((rows_per_rank - values.shape[0], *values.shape[1:]))])
    return _gather_rows(padded)


def ranking_loss(
    u: torch.Tensor, v: torch.Tensor, labels: torch.Tensor, similarity: str, global_batch_size: int | None = None,
    valid: bool = True, scale: float = 20.0,
) -> torch.Tensor:
    """L_rank (CoSENT: similarity "cosent", AnglE: "angle") over the pairs of the global batch.

    u, v: this rank's b x H pairs, labels: b. With W ranks the similarities and labels of all ranks
    are gathered (the similarities with their gradient path, as the NLI loss gathers candidates),
    so every ordered pair of the global batch is compared and the loss does not depend on W.
    Every rank returns the whole L: the gather's backward hands rank r the sum over ranks of
    dL/d(its rows), W dL/d(its rows), and DDP's average over W restores dL/dtheta (`_rank_share`'s
    argument with sum_r l_r = W L). valid=False: this rank holds a placeholder pair (a global batch
    with fewer pairs than ranks) that joins the collectives and is left out of every comparison.
    """
    _, world_size = _world()
    with _no_autocast(u):
        scores = scale * STS_SIMILARITIES[similarity](_at_least_fp32(u), _at_least_fp32(v))
        labels = _at_least_fp32(labels)
        counted = torch.full_like(labels, 1.0 if valid else 0.0)
        if world_size > 1:
            rows = -(-(global_batch_size or u.shape[0] * world_size) // world_size)  # the largest shard
            scores, labels, counted = (_gather_padded(t, rows) for t in (scores, labels, counted.detach()))
        ordered = (labels[:, None] < labels[None, :]) & (counted[:, None] > 0) & (counted[None, :] > 0)
        differences = (scores[:, None] - scores[None, :]).masked_fill(~ordered, float("-inf"))  # s_i - s_j
        # the 1 inside the log is exp(0): one more term of the logsumexp
        return torch.logsumexp(torch.cat([differences.new_zeros(1), differences.flatten()]), dim=0)


def matryoshka(loss_of: Callable[[torch.Tensor], torch.Tensor], embeddings: torch.Tensor,
               dims: Sequence[int] = (), weights: Sequence[float] = ()) -> torch.Tensor:
    """sum_k w_k * loss_of(embeddings[..., :d_k]); no dims: loss_of(embeddings). The embeddings are
    computed once by the caller; truncated views share their storage, so each width costs only its loss."""
    if not dims:
        return loss_of(embeddings)
    total = None
    for dim, weight in zip(dims, weights):
        term = weight * loss_of(embeddings[..., :dim])  # x 1.0 is exact: one full width is the plain loss
        total = term if total is None else total + term
    return total


def nli_loss(columns: torch.Tensor, objective: Objective = Objective(), keys: torch.Tensor | None = None,
             guide_columns: torch.Tensor | None = None) -> torch.Tensor:
    """The in-batch objective (--nli_loss) on (anchor, positive, negative_1 .. negative_n) columns, n >= 0 (n = 0:
    the positives alone are the candidates). keys: the global batch's text keys (columns x B) for the masks of
    shared positives; guide_columns: the guide's embeddings of this rank's rows (gist), at full width whatever the
    Matryoshka width, as the reference's guide."""
    def loss_of(c: torch.Tensor) -> torch.Tensor:
        if objective.nli_loss == "gist":
            return gist_loss(list(c), list(guide_columns), objective.scale, objective.gist_margin_strategy,
                             objective.gist_margin, objective.gist_contrast_anchors, objective.gist_contrast_positives,
                             keys)
        return in_batch_negatives_loss(c[0], c[1], c[2:] if len(c) > 2 else None, scale=objective.scale,
                                       symmetric=objective.nli_loss == "mnrl_symmetric", keys=keys)

    return matryoshka(loss_of, columns, objective.matryoshka_dims, objective.matryoshka_weights)


def sts_loss(columns: torch.Tensor, labels: torch.Tensor, global_batch_size: int, objective: Objective = Objective(),
             placeholder: bool = False) -> torch.Tensor:
    """Cosine MSE (the reference), CoSENT or AnglE on this rank's pairs of a global batch of `global_batch_size`."""
    def loss_of(c: torch.Tensor) -> torch.Tensor:
        if objective.sts_loss == "cosine":  # a mean of per-pair terms: a placeholder pair weighs 0
            weight = 0.0 if placeholder else 1.0
            return weight * cosine_mse_loss(c[0], c[1], labels, global_batch_size=global_batch_size)
        return ranking_loss(c[0], c[1], labels, objective.sts_loss, global_batch_size, valid=not placeholder)

    return matryoshka(loss_of, columns, objective.matryoshka_dims, objective.matryoshka_weights)
