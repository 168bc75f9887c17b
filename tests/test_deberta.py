"""The windowed disentangled attention bias (kfdeb/deberta.py) against transformers' own.

deberta.py replaces a private method of transformers' DeBERTa-v2 attention and calls private
helpers next to it; the first test below names whatever of that a transformers release changes.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import transformers
from transformers import DebertaV2Model
from transformers.models.deberta_v2 import modeling_deberta_v2

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


# What deberta.py replaces or calls in transformers.models.deberta_v2.modeling_deberta_v2, with the
# parameters it passes or takes (the same from transformers 4.56 to 5.23).
PATCHED_INTERNALS = {
    "DisentangledSelfAttention.disentangled_attention_bias":
        ["self", "query_layer", "key_layer", "relative_pos", "rel_embeddings", "scale_factor"],
    "build_relative_position": ["query_layer", "key_layer", "bucket_size", "max_position"],
    "make_log_bucket_position": ["relative_pos", "bucket_size", "max_position"],
    "scaled_size_sqrt": ["query_layer", "scale_factor"],
}
# attributes of a DisentangledSelfAttention layer that windowed_attention_bias reads
LAYER_ATTRIBUTES = ["num_attention_heads", "relative_attention", "pos_ebd_size", "position_buckets",
                    "max_relative_positions", "pos_att_type", "share_att_key", "query_proj", "key_proj",
                    "pos_query_proj", "pos_key_proj"]


def parameter_names(function) -> list[str]:
    schema = getattr(function, "schema", None)  # a torch.jit.script function (transformers 4.x)
    return [a.name for a in schema.arguments] if schema is not None else list(inspect.signature(function).parameters)


def changed(what: str) -> str:
    return (f"transformers {transformers.__version__} changed {what}, which kfdeb/deberta.py relies on: "
            "update deberta.py (its tests here prove it still matches), or cap transformers below this "
            "release in pyproject.toml")


def test_the_transformers_internals_deberta_py_patches_are_still_there(monkeypatch):
    for dotted, expected in PATCHED_INTERNALS.items():
        target = modeling_deberta_v2
        for part in dotted.split("."):
            assert hasattr(target, part), changed(f"modeling_deberta_v2: {dotted} is gone")
            target = getattr(target, part)
        names = parameter_names(target)
        assert names == expected, changed(f"the parameters of {dotted} from {expected} to {names}")

    config = tiny_deberta_config(300, dropout=0.0)
    config.share_att_key = False  # builds pos_query_proj / pos_key_proj too
    layer = modeling_deberta_v2.DisentangledSelfAttention(config)
    missing = [name for name in LAYER_ATTRIBUTES if not hasattr(layer, name)]
    assert not missing, changed(f"DisentangledSelfAttention: no attribute {', '.join(missing)}")

    # the forward pass must still go through the method install() swaps, or the patch does nothing
    calls = []

    def counted(self, *args):
        calls.append(self)
        return windowed(self, *args)

    windowed = deberta.windowed_attention_bias
    monkeypatch.setattr(deberta, "windowed_attention_bias", counted)
    model = DebertaV2Model(tiny_deberta_config(300, dropout=0.0))
    deberta.install(model)
    model(input_ids=torch.randint(5, 300, (2, 7)), attention_mask=torch.ones(2, 7, dtype=torch.long))
    assert len(calls) == config.num_hidden_layers, changed(
        "DisentangledSelfAttention.forward: it no longer calls self.disentangled_attention_bias, "
        "so deberta.install has no effect")
