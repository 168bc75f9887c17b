"""The two training objectives, optionally spread over data-parallel ranks.

In-batch negatives with hard negatives (sentence-transformers' MultipleNegativesRankingLoss).
For a global batch of B triplets (a_i, p_i, n_i) and candidates c = [p_1..p_B; n_1..n_B] (2B x H):

    s_ij = scale * cos(a_i, c_j),   L_nli = (1/B) sum_i [ logsumexp_j s_ij - s_ii ]

i.e. cross-entropy over 2B candidates with target j = i (scale 20).

Cosine regression (CosineSimilarityLoss) for B pairs (u_i, v_i) with labels y_i in [0, 1]:

    L_sts = (1/B) sum_i (cos(u_i, v_i) - y_i)^2

cos(x, y) = x.y / max(|x| |y|, 1e-8) (torch.cosine_similarity's guard). Both losses are computed
in at least float32 whatever the autocast dtype: autocast is switched off inside them (it would run
the logits' matrix product in bf16/fp16) and their inputs are widened to float32. The softmax over
2B logits scaled by 20 is where low precision hurts: a bf16 cosine carries ~3 significant digits.

Data parallelism (W ranks, rank r holding b_r of the B examples, sum_r b_r = B): see
`_rank_share` for how each rank's loss is scaled so that DDP's gradient average reproduces the
single-process gradient of the global batch exactly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

COSINE_EPS = 1e-8


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


def in_batch_negatives_loss(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    scale: float = 20.0,
) -> torch.Tensor:
    """L_nli of this rank's triplets against the candidates of all ranks (single process: all of them).

    anchors/positives/negatives: b x H, this rank's slice of the global batch (every rank the
    same b: the NLI batch size must divide by the world size). Returns this rank's share of the
    loss (see `_rank_share`); with one process that is L_nli itself.
    """
    rank, world_size = _world()
    columns = [positives] if negatives is None else [positives, negatives]
    if world_size > 1:
        # Candidates are laid out exactly as in one process over the global batch:
        # [p of rank 0, p of rank 1, ...; n of rank 0, n of rank 1, ...], so anchor i of rank r
        # has its positive at row r*b + i and every hard negative of every rank is a candidate.
        columns = [_gather_rows(column) for column in columns]
    local = anchors.shape[0]
    targets = torch.arange(local, device=anchors.device) + rank * local
    with _no_autocast(anchors):
        candidates = _at_least_fp32(torch.cat(columns, dim=0))
        logits = scale * cosine_matrix(_at_least_fp32(anchors), candidates)
        per_example_sum = F.cross_entropy(logits, targets, reduction="sum")
    return _rank_share(per_example_sum, local * world_size, world_size)


def cosine_mse_loss(
    u: torch.Tensor, v: torch.Tensor, labels: torch.Tensor, global_batch_size: int | None = None
) -> torch.Tensor:
    """L_sts of this rank's pairs; `global_batch_size` (default: this rank's size) is B over all ranks."""
    _, world_size = _world()
    with _no_autocast(u):
        squared_errors = (pairwise_cosine(_at_least_fp32(u), _at_least_fp32(v)) - _at_least_fp32(labels)) ** 2
        return _rank_share(squared_errors.sum(), global_batch_size or u.shape[0] * world_size, world_size)
