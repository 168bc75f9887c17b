"""The windowed disentangled attention bias (kfdeb/deberta.py) against transformers' own."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DebertaV2Model

from kfdeb import deberta
from kfdeb.model import load_encoder
from kfdeb.tiny import tiny_deberta_config


@pytest.mark.parametrize("buckets,share_key,length", [
    (32, True, 9),       # inside the linear part of the buckets
    (32, True, 40),      # past it: log buckets
    (32, False, 70),     # separate position projections
    (256, True, 300),    # kf-deberta-base's buckets, beyond 2 x 128
    (-1, True, 20),      # no buckets: plain relative positions
])
def test_windowed_bias_equals_the_full_one_forward_and_backward(buckets, share_key, length):
    config = tiny_deberta_config(300, dropout=0.0, position_buckets=buckets)
    config.share_att_key = share_key
    torch.manual_seed(0)
    reference = DebertaV2Model(config).double()
    windowed = copy.deepcopy(reference)
    assert deberta.install(windowed) == config.num_hidden_layers
    ids = torch.randint(5, 300, (3, length))
    mask = torch.ones_like(ids)
    mask[1, length // 2:] = 0
    weights = torch.randn(3, length, config.hidden_size, dtype=torch.float64)
    outputs = []
    for model in (reference, windowed):
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        (hidden * weights * mask[..., None]).sum().backward()
        outputs.append(hidden)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-12)
    for (name, a), (_, b) in zip(reference.named_parameters(), windowed.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-10, msg=name)


def test_encoder_loads_with_the_windowed_bias(tiny_deberta):
    encoder = load_encoder(tiny_deberta)
    layers = [m for m in encoder.modules() if hasattr(m, "_full_attention_bias")]
    assert len(layers) == encoder.transformer.config.num_hidden_layers
