"""DeBERTa-v2's disentangled attention bias over only the relative positions a batch can use.

DeBERTa adds to the content scores Q_i.K_j two position terms (c2p and p2c). With r the table of
2k relative-position embeddings (k = position_buckets: 256 in kf-deberta-base, so 512 rows) and
b(i - j) the (log-)bucketed relative position,

    c2p_ij = Q_i . Kr_{k + b(i - j)},      p2c_ij = K_j . Qr_{k - b(j - i)}     (Kr, Qr: projections of r)

transformers computes Q . Kr^T against all 2k rows (a B x H x L x 2k tensor), copies Kr once per
sentence, and then gathers the L columns each row needs. For a batch padded to length L the
relative positions lie in [-(L-1), L-1]; b is monotonic, so every index used falls in one window
of rows [k - b(L-1), k + b(L-1)], at most 2L - 1 of them. This module projects and multiplies
only that window (broadcast over the batch instead of copied) and shifts the gather indices by
the window's start: the same sums of the same products, for short sentences a fraction of the
work and memory (L = 32: 63 of 512 rows).

`install(model)` swaps the method on each attention layer of a DebertaV2Model; during ONNX export
(tracing, where the window would freeze to the example's length) the original method runs.
"""

from __future__ import annotations

import types

import torch


def _bucket(relative: int, bucket_size: int, max_position: int) -> int:
    """b(relative) for one offset: transformers' make_log_bucket_position, on the host."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    if bucket_size <= 0 or max_position <= 0:
        return relative
    return int(make_log_bucket_position(torch.tensor([relative]), bucket_size, max_position)[0])


def windowed_attention_bias(self, query_layer, key_layer, relative_pos, rel_embeddings, scale_factor):
    """Drop-in for DisentangledSelfAttention.disentangled_attention_bias (self: that layer)."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position, scaled_size_sqrt

    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return self._full_attention_bias(query_layer, key_layer, relative_pos, rel_embeddings, scale_factor)
    heads = self.num_attention_heads
    length, key_length = query_layer.size(-2), key_layer.size(-2)
    if length != key_length:  # not used by encoders; keep the reference path for it
        return self._full_attention_bias(query_layer, key_layer, relative_pos, rel_embeddings, scale_factor)
    if relative_pos is None:
        relative_pos = build_relative_position(query_layer, key_layer, self.position_buckets, self.max_relative_positions)
    relative_pos = relative_pos.to(device=query_layer.device, dtype=torch.long).reshape(-1, length, length)[0]
    span = self.pos_ebd_size
    # the window of relative-embedding rows any c2p (k + b) or p2c (k - b) index can reach
    reach = max(abs(_bucket(length - 1, self.position_buckets, self.max_relative_positions)),
                abs(_bucket(-(length - 1), self.position_buckets, self.max_relative_positions)))
    first, last = max(span - reach, 0), min(span + reach, 2 * span - 1)
    window = rel_embeddings[first : last + 1]  # W x hidden, W <= 2L - 1

    def per_head(x: torch.Tensor) -> torch.Tensor:  # W x hidden -> heads x W x d
        return x.view(x.size(0), heads, -1).transpose(0, 1)

    batch = query_layer.size(0) // heads
    query = query_layer.view(batch, heads, length, -1)
    key = key_layer.view(batch, heads, length, -1)
    scale = scaled_size_sqrt(query_layer, scale_factor)  # float32 sqrt, as the reference rounds it
    score = 0
    if "c2p" in self.pos_att_type:
        position_key = per_head(self.key_proj(window) if self.share_att_key else self.pos_key_proj(window))
        c2p = torch.matmul(query, position_key.transpose(-1, -2))  # B x H x L x W
        index = (torch.clamp(relative_pos + span, 0, 2 * span - 1) - first).expand(batch, heads, length, length)
        score = score + torch.gather(c2p, -1, index) / scale.to(dtype=c2p.dtype)
    if "p2c" in self.pos_att_type:
        position_query = per_head(self.query_proj(window) if self.share_att_key else self.pos_query_proj(window))
        p2c = torch.matmul(key, position_query.transpose(-1, -2))  # B x H x L(keys) x W
        index = (torch.clamp(-relative_pos + span, 0, 2 * span - 1) - first).expand(batch, heads, length, length)
        score = score + torch.gather(p2c, -1, index).transpose(-1, -2) / scale.to(dtype=p2c.dtype)
    return score.reshape(batch * heads, length, length) if torch.is_tensor(score) else score


def install(model: torch.nn.Module) -> int:
    """Use the windowed bias in every DeBERTa-v2 attention layer of `model`; returns how many."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention

    count = 0
    for module in model.modules():
        if isinstance(module, DisentangledSelfAttention) and module.relative_attention:
            module._full_attention_bias = module.disentangled_attention_bias
            module.disentangled_attention_bias = types.MethodType(windowed_attention_bias, module)
            count += 1
    return count
