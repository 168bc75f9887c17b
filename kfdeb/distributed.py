"""Process-group setup and the few collectives the loop needs (torch.distributed only).

`torchrun` sets RANK, LOCAL_RANK and WORLD_SIZE; a plain `python train.py` sets none and runs as
one process with no process group at all. Backend: NCCL when the ranks drive GPUs, gloo on CPU.

Failure bounds: a rank that dies (OOM kill, crash) is seen by its torchrun agent within seconds,
which ends the job with a non-zero status. `timeout_s` bounds everything else: a rank that waits
in a collective longer than that (a stalled peer, a node lost with its agent) fails the job. It
must exceed the longest legitimate wait, which is rank 0 writing a checkpoint while the others
wait at their next collective.

No shared filesystem is assumed: global rank 0 alone reads and writes the output folder, and
what the other ranks need from it travels through the collectives below (`main_only`,
`broadcast_tensors`).
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

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


def resolve_device(requested: str, local_rank: int, world_size: int, cuda_available: bool) -> str:
    """The device this rank trains on, as a string: `--device` resolved for this rank.

    auto: this rank's GPU (cuda:LOCAL_RANK) when CUDA is available, else cpu. cuda: this rank's
    GPU in any world size (one process: cuda:0). cuda:N pins one GPU, which only one process may
    do: under torchrun every rank would pick the same GPU.
    """
    from kfdeb.errors import UserInputError

    if requested == "auto":
        return f"cuda:{local_rank}" if cuda_available else "cpu"
    if requested.startswith("cuda"):
        if not cuda_available:
            raise UserInputError(f"--device {requested}: CUDA is not available on this machine (torch "
                                 f"{torch.__version__}); use --device cpu or auto")
        if requested == "cuda":
            return f"cuda:{local_rank}"
        if world_size > 1:
            raise UserInputError(f"--device {requested}: names one GPU, but {world_size} processes run; "
                                 "use --device cuda (each rank takes cuda:LOCAL_RANK)")
        return requested
    if requested == "cpu":
        return "cpu"
    raise UserInputError(f"--device {requested!r}: expected auto, cpu, cuda or cuda:N")


def setup(device: str = "auto", timeout_s: int = 1800) -> Context:
    """Join torchrun's process group if there is one; pick this rank's device."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    torch_device = torch.device(resolve_device(device, local_rank, world_size, torch.cuda.is_available()))
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


def all_reduce_min(ctx: Context, tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise minimum of `tensor` over ranks (a copy)."""
    result = tensor.clone()
    if ctx.distributed:
        dist.all_reduce(result, op=dist.ReduceOp.MIN)
    return result


class AnyRankFlag:
    """A flag any rank may raise, seen by every rank at the same exchange: one exchange late, with no device sync.

    `exchange(raised)` sends this rank's flag and returns whether any rank had raised it at the
    previous exchange. The flag travels as an all-reduce (MAX) of one CPU integer on a gloo group
    of its own, launched asynchronously and waited for at the next exchange: every rank reads the
    same result at the same exchange, so all act on it at the same step. Cost per exchange: one
    4-byte all-reduce between the ranks' CPUs over TCP, in flight while the next step computes;
    no device tensor is involved, so under NCCL the step's device work stays queued (the wait
    returns at once unless another rank's host is a whole step behind). Under NCCL the gloo group
    is the one TCP mesh kfdeb adds: nodes reach each other at their hostnames' addresses, or on the
    interface GLOO_SOCKET_IFNAME names. One process: `raised` itself, at once.
    """

    def __init__(self, ctx: Context):
        self.ctx = ctx
        # every rank creates it at the same point (new_group is collective); CPU tensors whatever the device
        self.group = dist.new_group(backend="gloo") if ctx.distributed else None
        self.pending: tuple[torch.Tensor, Any] | None = None

    def exchange(self, raised: bool) -> bool:
        if not self.ctx.distributed:
            return raised
        agreed = False
        if self.pending is not None:
            flag, work = self.pending
            work.wait()
            agreed = bool(flag.item())  # a CPU tensor: no device sync
            self.pending = None
        if not agreed:  # once agreed, every rank stops exchanging: nothing is left in flight
            flag = torch.tensor([int(raised)], dtype=torch.int32)
            self.pending = (flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True))
        return agreed

    def close(self) -> None:
        """Wait for the exchange still in flight (every rank launched it), before the group goes away."""
        if self.pending is not None:
            self.pending[1].wait()
            self.pending = None


def broadcast_object(ctx: Context, value: Any) -> Any:
    """Rank 0's `value` (any picklable object, small) on every rank."""
    if not ctx.distributed:
        return value
    holder = [value if ctx.is_main else None]
    dist.broadcast_object_list(holder, src=0, device=ctx.device if ctx.device.type == "cuda" else None)
    return holder[0]


def main_only(ctx: Context, work: Callable[[], Any]) -> Any:
    """Run `work` on rank 0 alone and return its result, or raise its UserInputError, on every rank.

    What only rank 0 can do (read or write the output folder) may fail on the user's input; the
    other ranks must learn of it and stop too, with the same message, instead of waiting for a
    collective that never comes.
    """
    from kfdeb.errors import UserInputError

    outcome: Any = None
    if ctx.is_main:
        try:
            outcome = ("ok", work())
        except UserInputError as err:
            if not ctx.distributed:
                raise
            outcome = ("error", str(err))
    status, value = broadcast_object(ctx, outcome)
    if status == "error":
        raise UserInputError(value)
    return value


def each_node_first(ctx: Context, work: Callable[[], Any]) -> Any:
    """Run `work` on each node's local rank 0 while the node's other ranks wait; raise a
    UserInputError of any node on every rank. Returns `work`'s result on local ranks 0, else None.

    For what each node keeps on its own disk (the token cache): one process per node writes it,
    then every rank reads it. All ranks wait for all nodes (one collective), which costs nothing
    when the nodes do the same work.
    """
    from kfdeb.errors import UserInputError

    result, error = None, None
    if ctx.local_rank == 0:
        try:
            result = work()
        except UserInputError as err:
            if not ctx.distributed:
                raise
            error = str(err)
    errors = [e for e in gather_objects(ctx, error) if e is not None]
    if errors:
        raise UserInputError(errors[0])
    return result


def broadcast_tensors(ctx: Context, tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Rank 0's named CPU tensors on every rank, as CPU tensors (the other ranks pass None).

    Names, shapes and dtypes go first as one small object, then each tensor by its own broadcast
    (through this rank's GPU under NCCL): a base-size training state (~3.7 GB) never exists as
    one pickle.
    """
    if not ctx.distributed:
        return tensors or {}
    specs = broadcast_object(ctx, {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} if ctx.is_main else None)
    received = {}
    for name, (shape, dtype) in specs.items():
        # as raw bytes: the backends do not carry every dtype (gloo has no uint32, NumPy RNG states are)
        nbytes = math.prod(shape) * dtype.itemsize
        if ctx.is_main:
            buffer = tensors[name].detach().contiguous().reshape(-1).view(torch.uint8).to(ctx.device)
        else:
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=ctx.device)
        if nbytes:
            dist.broadcast(buffer, src=0)
        received[name] = tensors[name] if ctx.is_main else buffer.cpu().view(dtype).reshape(shape)
    return received


def gather_objects(ctx: Context, value: Any) -> list[Any]:
    """Every rank's `value` (small, picklable), in rank order, on every rank."""
    if not ctx.distributed:
        return [value]
    parts: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(parts, value)
    return parts


def gather_strided(ctx: Context, local_rows: np.ndarray, total: int) -> np.ndarray:
    """Reassemble rows that rank r computed for items r, r + W, r + 2W, ... into items 0..total-1."""
    if not ctx.distributed:
        return local_rows
    parts = gather_objects(ctx, local_rows)
    rows = np.empty((total,) + local_rows.shape[1:], dtype=local_rows.dtype)
    for rank, part in enumerate(parts):
        rows[rank::ctx.world_size] = part
    return rows
