"""AdamW parameter groups and the warmup-linear learning-rate schedule.

Weight decay applies to every parameter except those whose name contains `bias`,
`LayerNorm.bias` or `LayerNorm.weight` (the reference's rule, by substring).

Warmup-linear with W warmup steps out of T: the learning rate at scheduler step t is
base_lr * f(t) with

    f(t) = t / W                      for t < W      (0 at t = 0)
    f(t) = max(0, (T - t) / (T - W))  for t >= W     (1 at t = W, 0 at t = T)

(transformers' get_linear_schedule_with_warmup; W and T-W are clamped to at least 1.)
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")


def warmup_linear(step: int, warmup_steps: int, total_steps: int) -> float:
    """f(t) above: the factor on the base learning rate after `step` scheduler steps."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """ceil(ratio * total): the reference script's warmup length."""
    return math.ceil(total_steps * warmup_ratio)


def param_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float
) -> list[dict]:
    decay, no_decay = [], []
    for name, param in named_parameters:
        if param.requires_grad:
            (no_decay if any(key in name for key in NO_DECAY) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    lr: float,
    weight_decay: float,
    fused: bool = False,
) -> torch.optim.AdamW:
    """AdamW(betas 0.9/0.999, eps 1e-8) over the decay / no-decay groups.

    fused=True uses torch's single-kernel AdamW (CPU and CUDA): the same update rule, computed in
    one pass over the parameters instead of a Python loop of small ops.
    """
    groups = param_groups(named_parameters, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_linear(step, warmup_steps, total_steps)
    )
