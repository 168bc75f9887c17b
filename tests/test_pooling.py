"""Masked mean pooling (kfdeb/pooling.py) against the naive formula, by gradcheck and by memory."""

from __future__ import annotations

import torch

from kfdeb.pooling import MaskedMeanPool, masked_mean_pool


def naive_mean(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def random_batch(batch=5, length=7, hidden=6, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, length, hidden, dtype=dtype, generator=generator)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0] = length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return h, mask


def test_forward_equals_the_naive_masked_mean():
    h, mask = random_batch()
    torch.testing.assert_close(masked_mean_pool(h, mask), naive_mean(h, mask), rtol=0, atol=1e-12)
    h32, mask32 = random_batch(batch=16, length=33, hidden=64, dtype=torch.float32, seed=1)
    torch.testing.assert_close(masked_mean_pool(h32, mask32), naive_mean(h32, mask32), rtol=0, atol=1e-6)


def test_hand_written_backward_passes_gradcheck_and_matches_autograd():
    h, mask = random_batch()
    h.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: MaskedMeanPool.apply(x, mask), (h,), eps=1e-6, atol=1e-9)
    weights = torch.randn(h.shape[0], h.shape[2], dtype=torch.float64)
    (ours,) = torch.autograd.grad((masked_mean_pool(h, mask) * weights).sum(), h)
    (naive,) = torch.autograd.grad((naive_mean(h, mask) * weights).sum(), h)
    torch.testing.assert_close(ours, naive, rtol=0, atol=1e-12)
    assert ours[mask == 0].abs().max() == 0  # padding gets no gradient


def test_all_padding_row_gives_zeros_not_nan():
    h = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    out = masked_mean_pool(h, mask)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0


def largest_allocation(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(event.cpu_memory_usage for event in prof.key_averages())


def test_forward_allocates_no_masked_copy_and_saves_only_mask_and_counts():
    h, mask = random_batch(batch=8, length=64, hidden=128, dtype=torch.float32)
    h.requires_grad_(True)
    full = h.numel() * h.element_size()
    assert largest_allocation(lambda: naive_mean(h, mask)) >= full  # the B x L x H temporary
    assert largest_allocation(lambda: masked_mean_pool(h, mask)) < full / 8
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        masked_mean_pool(h, mask)
    assert sum(saved) == 8 * 64 + 8  # mask (B x L) and counts (B); h is not kept


def test_bf16_hidden_gives_float32_embeddings_close_to_fp32():
    h, mask = random_batch(batch=4, length=10, hidden=16, dtype=torch.float32)
    out = masked_mean_pool(h.to(torch.bfloat16), mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, naive_mean(h, mask), rtol=2e-2, atol=2e-2)


def test_pooling_runs_in_float32_under_bf16_autocast():
    """Autocast would run the bmm in bf16; pooling switches it off and widens the token states."""
    from conftest import RecordOps

    h, mask = random_batch(batch=4, length=9, hidden=8, dtype=torch.float32)
    h_bf16 = h.to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with RecordOps() as forward:
            pooled = masked_mean_pool(h_bf16, mask)
    with RecordOps() as backward:
        (pooled * torch.randn_like(pooled)).sum().backward()
    matmuls = [c for c in forward.calls if c[0] == "bmm"]
    assert matmuls and all(set(inputs) == {torch.float32} for _, inputs, _ in matmuls)
    assert pooled.dtype == torch.float32
    # the widened states give the float32 mean of the bf16 values, to float32 rounding
    torch.testing.assert_close(pooled, naive_mean(h_bf16.detach().float(), mask), rtol=0, atol=1e-6)
    assert {torch.float32} <= {d for c in backward.calls if c[0] == "bmm" for d in c[1]}
    assert h_bf16.grad.dtype == torch.bfloat16
