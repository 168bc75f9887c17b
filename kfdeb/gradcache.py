"""GradCache: the exact gradient of a large in-batch-negatives batch at one mini-batch's activation memory.

Gao et al., 2021 (arXiv 2101.06983); sentence-transformers' CachedMultipleNegativesRankingLoss.
The loss L(e) of a batch depends on the parameters θ only through the embeddings e = f_θ(x), so
with the batch cut into mini-batches k (e = [e_1; ...; e_K]):

    dL/dθ = Σ_k (∂e_k/∂θ)ᵀ g_k,    g_k = ∂L/∂e_k

1. embed every mini-batch without autograd (no activations kept): e_k
2. L on all of e (leaves that require grad), backward to e only: g_k (a few B x H numbers)
3. embed each mini-batch again with autograd and backpropagate the surrogate Σ e_k · g_k, whose
   gradient with respect to θ is (∂e_k/∂θ)ᵀ g_k; the gradients of the K surrogates add up to dL/dθ.

Step 3 draws the same dropout masks as step 1: before each mini-batch, step 1 records the random
state (CPU and this device's CUDA generator) and step 3 restores it, so the result is the gradient
of the full-batch loss under exactly those masks. Afterwards the generators continue from where
step 1 left them, as if the batch had been embedded once.

Cost: one extra forward pass (~1/3 of a step); memory: one mini-batch's activations plus the
embeddings. Mixed precision: the surrogate goes through the caller's `backward` (the GradScaler's
scaling), the loss on the embeddings runs in fp32 and needs none. Data parallel: the loss may
gather candidates across ranks (its backward is a collective that every rank joins once); the
surrogates' backwards run under `no_sync` except the last one, so DDP reduces the accumulated
gradient once, whatever the number of mini-batches on each rank.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Sequence

import torch


def random_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_random_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def cached_backward(
    embed: Callable[[Sequence[Any], bool], torch.Tensor],
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    rows: Sequence[Any],
    mini_batch_size: int,
    backward: Callable[[torch.Tensor], None],
    no_sync: Callable[[], ContextManager] = contextlib.nullcontext,
    device: torch.device = torch.device("cpu"),
) -> torch.Tensor:
    """Accumulate dL/dθ of the batch `rows` into the parameters' .grad; return L (detached).

    embed(rows, with_grad) -> columns x len(rows) x H embeddings (float32); loss_of(columns x B x H)
    -> the loss; backward(tensor) backpropagates (e.g. through a GradScaler); no_sync() suspends
    DDP's gradient reduction. Mini-batches of `mini_batch_size` rows, the last one possibly smaller.
    """
    chunks = [rows[start : start + mini_batch_size] for start in range(0, len(rows), mini_batch_size)]
    states = []
    with torch.no_grad():  # step 1
        parts = []
        for chunk in chunks:
            states.append(random_state(device))
            parts.append(embed(chunk, False))
    after = random_state(device)
    cached = torch.cat(parts, dim=1).requires_grad_(True)
    loss = loss_of(cached)
    loss.backward()  # step 2: reaches the embeddings only (they are leaves)
    gradients = cached.grad.split([len(chunk) for chunk in chunks], dim=1)
    for index, (chunk, state, gradient) in enumerate(zip(chunks, states, gradients)):  # step 3
        set_random_state(state, device)
        last = index == len(chunks) - 1
        with contextlib.nullcontext() if last else no_sync():
            backward((embed(chunk, True) * gradient).sum())
    set_random_state(after, device)
    return loss.detach()
