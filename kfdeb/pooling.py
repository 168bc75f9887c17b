"""Pooling token states into a sentence embedding: masked mean (one batched matrix product, a hand-written
backward) or the first token (CLS pooling, `first_token_pool`).

For token states h (B x L x H) and a 0/1 attention mask m (B x L), with n_b = max(sum_l m_bl, 1e-9):

    forward:   e_b = (1 / n_b) * sum_l m_bl h_bl        = bmm(m[:, None, :], h)[:, 0, :] / n_b
    backward:  dL/dh_bl = m_bl * (dL/de_b) / n_b         (an outer product of m_b and g_b / n_b)

The naive `(h * m[..., None]).sum(1) / n` writes a B x L x H masked copy of h in the forward
only to sum it away; here the forward reads h once through bmm and allocates just B x H, and
autograd keeps only the mask and the counts (not h). The backward has to produce a B x L x H
gradient anyway and builds it with one bmm as well. The clamp of n at 1e-9 matches sentence-transformers' Pooling, so
an all-padding row gives a zero vector instead of NaN.

Precision: everything here runs in at least float32, whatever the autocast dtype: autocast is
switched off inside, bf16/fp16 token states are widened to float32 before the product (float64
stays float64), and the result is float32. A bf16 product would round the sum of up to
max_seq_length token states to 8 bits of mantissa before the division; the embedding feeds
cosines that the losses compare to within 1e-2. The gradient returns in h's dtype.
"""

from __future__ import annotations

import torch


class MaskedMeanPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # bf16/fp16 -> fp32, fp64 stays
        with torch.autocast(hidden.device.type, enabled=False):  # autocast would run bmm in bf16/fp16
            mask = attention_mask.to(dtype)
            counts = mask.sum(dim=1, keepdim=True).clamp(min=1e-9)
            summed = torch.bmm(mask.unsqueeze(1), hidden.to(dtype)).squeeze(1)
        ctx.save_for_backward(mask, counts)
        ctx.hidden_dtype = hidden.dtype
        return summed / counts

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        mask, counts = ctx.saved_tensors
        with torch.autocast(grad_output.device.type, enabled=False):
            scaled = grad_output.to(counts.dtype) / counts  # B x H
            grad_hidden = torch.bmm(mask.unsqueeze(2), scaled.unsqueeze(1))  # B x L x H
        return grad_hidden.to(ctx.hidden_dtype), None


def masked_mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states where attention_mask is 1: (B x L x H, B x L) -> B x H, at least float32."""
    return MaskedMeanPool.apply(hidden, attention_mask)


def first_token_pool(hidden: torch.Tensor) -> torch.Tensor:
    """The first token's state ([CLS] / <s>), in at least float32: B x L x H -> B x H (CLS pooling)."""
    return hidden[:, 0].to(torch.promote_types(hidden.dtype, torch.float32))
