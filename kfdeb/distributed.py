"""Process-group setup and the few collectives the loop needs (torch.distributed only).

`torchrun` sets RANK, LOCAL_RANK and WORLD_SIZE; a plain `python train.py` sets none and runs as
one process with no process group at all. Backend: NCCL when the ranks drive GPUs, gloo on CPU.
Every collective has the group's timeout: a rank that dies or stalls makes the others fail
within `timeout_s` instead of hanging, and torchrun then ends the job with a non-zero status.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto", timeout_s: int = 60) -> Context:
    """Join torchrun's process group if there is one; pick this rank's device."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and world_size > 1:
        device = f"cuda:{local_rank}"
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=torch_device if backend == "nccl" else None,
        )
    return Context(rank, local_rank, world_size, torch_device)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def print0(ctx: Context, *args: Any, **kwargs: Any) -> None:
    if ctx.is_main:
        print(*args, **kwargs, flush=True)


def all_reduce_mean(ctx: Context, tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over ranks (a copy; the input is left alone)."""
    if not ctx.distributed:
        return tensor.clone()
    result = tensor.clone()
    dist.all_reduce(result, op=dist.ReduceOp.SUM)
    return result / ctx.world_size


def all_true(ctx: Context, flag: bool) -> bool:
    """True only if `flag` is true on every rank (so all ranks take the same branch)."""
    if not ctx.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def gather_strided(ctx: Context, local_rows: np.ndarray, total: int) -> np.ndarray:
    """Reassemble rows that rank r computed for items r, r + W, r + 2W, ... into items 0..total-1."""
    if not ctx.distributed:
        return local_rows
    parts: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(parts, local_rows)
    rows = np.empty((total,) + local_rows.shape[1:], dtype=local_rows.dtype)
    for rank, part in enumerate(parts):
        rows[rank::ctx.world_size] = part
    return rows
