"""Parameter groups and warmup-linear (kfdeb/optim.py) against transformers' schedule."""

from __future__ import annotations

import pytest
import torch

from kfdeb.optim import build_adamw, build_scheduler, param_groups, warmup_linear, warmup_steps_for


@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 10), (10, 10), (72, 719), (1, 1)])
def test_warmup_linear_equals_transformers(warmup, total):
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_linear_schedule_with_warmup(optimizer, warmup, total)
    for step in range(total + 3):
        assert warmup_linear(step, warmup, total) == pytest.approx(reference.lr_lambdas[0](step), abs=1e-15)


def test_schedule_shape():
    assert warmup_linear(0, 10, 100) == 0.0
    assert warmup_linear(5, 10, 100) == 0.5
    assert warmup_linear(10, 10, 100) == 1.0
    assert warmup_linear(55, 10, 100) == 0.5
    assert warmup_linear(100, 10, 100) == 0.0
    assert warmup_steps_for(7190, 0.1) == 719 and warmup_steps_for(101, 0.1) == 11


def test_weight_decay_groups_follow_the_reference_names():
    names = ["embeddings.word_embeddings.weight", "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias",
             "encoder.layer.0.attention.self.query_proj.weight", "encoder.layer.0.attention.self.query_proj.bias",
             "encoder.rel_embeddings.weight", "encoder.LayerNorm.weight"]
    params = [(n, torch.nn.Parameter(torch.zeros(1))) for n in names]
    decay, no_decay = param_groups(params, 0.01)
    lookup = {id(p): n for n, p in params}
    assert [lookup[id(p)] for p in decay["params"]] == [names[0], names[3], names[5]]
    assert [lookup[id(p)] for p in no_decay["params"]] == [names[1], names[2], names[4], names[6]]
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0


def test_scheduler_drives_the_optimizer_lr():
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = build_adamw([("w", param)], lr=2e-5, weight_decay=0.01)
    scheduler = build_scheduler(optimizer, 2, 4)
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.ones(2)
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.0, 1e-5, 2e-5, 1e-5])
