"""The training loop: the reference multitask recipe, one step at a time.

One step = for each objective in order (NLI, then STS): the next global batch, this rank's
slice, one forward over all of its columns, the loss, backward, and with the per_task
optimizer (the reference) that objective's own clip + AdamW + scheduler step: two updates a step.
With --optimizer joint the gradients of both losses add up and one update follows.
steps per epoch = the shortest objective's batches; the samplers keep their position across
epochs. Dev evaluation at step 0 (the start), every eval_steps and at each epoch end keeps the best
model, so best/ holds the start when no step beat it; resumable
state is written every save_steps and at each epoch end; the best model is evaluated on KorSTS
test at the end. Setting the run up: run.py (its data: tasks.py); the resumable state: train_state.py.

Host syncs: none inside a step (fp16's GradScaler aside, as in the reference). Losses, gradient
norms and the non-finite watch stay on the device (StepMeter) until a logging, evaluation or
saving step reads them, all ranks at once.

SIGTERM (a scheduler's notice, forwarded to every worker by torchrun's agent): while the loop runs
it only sets a flag; the next flush (a logging, evaluation or saving step: at most --logging_steps
steps away) carries it in the all-reduce the flush already does, so every rank learns at the same
step, finishes that step's evaluation if one is due, saves the state of that step (rank 0 writes
it) and stops with exit status 143. Stopping at a flush, where the logged window closes anyway,
is what lets `--resume` reproduce the uninterrupted run's metrics.jsonl row for row.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import threading
import time
from typing import Any

import numpy as np
import torch

from kfdeb import distributed, train_state
from kfdeb.batching import length_sorted_chunks, shard
from kfdeb.config import TrainConfig
from kfdeb.errors import TrainingStopped
from kfdeb.gradcache import cached_backward
from kfdeb.losses import Objective, nli_loss, sts_loss
from kfdeb.run import Run, evaluate_and_keep_best, finish, setup
from kfdeb.tasks import Task


def embed_columns(model: torch.nn.Module, task: Task, rows: np.ndarray, ctx: distributed.Context,
                  pad_id: int, pad_to_multiple_of: int) -> torch.Tensor:
    """Embeddings of every text of `rows` (examples x columns of text ids): columns x examples x H."""
    # all columns (anchors, positives, negatives) in one forward call, regrouped by length into
    # as many chunks as there are columns (less padding than per column or one block); listed
    # column-major so the embeddings reshape to columns x batch x hidden
    chunk_ids, chunk_masks, restore = length_sorted_chunks(task.token_ids(rows), len(rows), pad_id, pad_to_multiple_of)
    embeddings = model([ids.to(ctx.device, non_blocking=True) for ids in chunk_ids],
                       [mask.to(ctx.device, non_blocking=True) for mask in chunk_masks])
    return embeddings[restore.to(ctx.device, non_blocking=True)].view(rows.shape[1], len(rows), -1)


def task_loss(model: torch.nn.Module, task: Task, batch: list[int], ctx: distributed.Context,
              pad_id: int, pad_to_multiple_of: int, objective: Objective = Objective()) -> torch.Tensor:
    """This rank's share of the objective's loss on the global `batch` (losses.py explains the scaling)."""
    local = shard(batch, ctx.rank, ctx.world_size)
    placeholder = not local
    if placeholder:  # a short last STS batch with fewer pairs than ranks: one pair that counts for nothing,
        local = batch[:1]  # so every rank still joins DDP's gradient reduction (and the ranking loss's gather)
    columns = embed_columns(model, task, task.rows[local], ctx, pad_id, pad_to_multiple_of)
    if task.name == "nli":
        return nli_loss(columns, objective)
    labels = torch.from_numpy(task.labels[local]).to(ctx.device, non_blocking=True)
    return sts_loss(columns, labels, len(batch), objective, placeholder)


def cached_nli_backward(run: Run, task: Task, batch: list[int], mini_batch_size: int) -> torch.Tensor:
    """The NLI loss and its full-batch gradient, embedding `mini_batch_size` triplets at a time (gradcache.py)."""
    ctx, encoder = run.ctx, run.encoder

    def embed(rows: np.ndarray, with_grad: bool) -> torch.Tensor:
        with run.autocast():  # without autograd, the bare encoder: DDP has nothing to reduce
            return embed_columns(run.model if with_grad else encoder, task, rows, ctx, encoder.pad_id, run.pad_multiple)

    no_sync = run.model.no_sync if ctx.distributed else contextlib.nullcontext
    rows = task.rows[shard(batch, ctx.rank, ctx.world_size)]
    return cached_backward(embed, lambda columns: nli_loss(columns, run.objective), rows, mini_batch_size, run.backward, no_sync, ctx.device)


def update(parameters: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any,
           scaler: torch.amp.GradScaler | None, max_grad_norm: float) -> torch.Tensor:
    """Clip, step, zero, schedule. Returns the pre-clip gradient norm (a device tensor: no sync)."""
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    skipped = False
    if scaler is not None:
        scale_before = scaler.get_scale()
        scaler.step(optimizer)  # skipped when the gradients overflowed
        scaler.update()
        skipped = scaler.get_scale() < scale_before  # fp16 only: a host sync, as in the reference
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not skipped:  # a skipped step does not advance the schedule
        scheduler.step()
    return grad_norm


class StepMeter:
    """Device-side sums of losses and gradient norms between log lines, and the non-finite watch.

    Nothing here reads a value back to the host during a step; `flush` is the one sync point,
    and it runs only on logging, evaluation and saving steps.
    """

    def __init__(self, run: Run):
        self.run = run
        device = run.ctx.device
        self.loss_sums = torch.zeros(len(run.tasks), device=device)
        self.norm_sums = torch.zeros(len(run.tasks), device=device)
        self.first_bad_step = torch.full((len(run.tasks),), -1, dtype=torch.long, device=device)
        self.steps = 0
        self.started = time.perf_counter()

    def add_loss(self, task_index: int, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach()
        self.loss_sums[task_index] += loss
        bad = (self.first_bad_step[task_index] < 0) & ~torch.isfinite(loss)
        self.first_bad_step[task_index] = torch.where(bad, step, self.first_bad_step[task_index])

    def add_norm(self, task_index: int | None, norm: torch.Tensor) -> None:
        """One update's gradient norm, for one task (per_task) or for all of them (None: joint)."""
        # an integer index or a whole-tensor add: a Python-list index would copy it to the device
        if task_index is None:
            self.norm_sums += norm
        else:
            self.norm_sums[task_index] += norm

    def flush(self, step: int, bar: Any, stop_requested: bool = False) -> bool:
        """Log the window's means; return whether any rank was asked to stop (SIGTERM), agreed by all."""
        run = self.run
        # the non-finite check agreed by all ranks (a NaN may show on one rank's shard only), so
        # all stop at the same step with the same message; rank 0 prints it (cli.py). A stop
        # request rides in the same all-reduce: no extra collective, every rank stops here.
        never = torch.iinfo(torch.long).max
        first_bad = torch.where(self.first_bad_step >= 0, self.first_bad_step, never)
        stop = torch.tensor([step if stop_requested else never], device=first_bad.device)
        agreed = distributed.all_reduce_min(run.ctx, torch.cat([first_bad, stop])).tolist()  # host sync
        first_bad, stop_now = agreed[:-1], agreed[-1] != never
        at = min(first_bad)
        if at != never:
            name = run.tasks[first_bad.index(at)].name
            kept = (f"the last good state (step-{run.last_saved_step:08d}) stays in {run.output_dir / train_state.STATE_DIR}"
                    if run.last_saved_step >= 0 else "no state had been saved yet")
            raise FloatingPointError(
                f"the {name} loss is not finite at step {at}; training stopped and {kept} "
                "(lower --learning_rate, or use --amp bf16 instead of fp16)"
            )
        seconds = time.perf_counter() - self.started
        rate = sum(t.batch_size for t in run.tasks) * self.steps / seconds if seconds > 0 else 0.0
        losses = (distributed.all_reduce_mean(run.ctx, self.loss_sums) / self.steps).tolist()
        norms = (self.norm_sums / self.steps).tolist()
        lrs = [s.get_last_lr()[0] for s in run.schedulers]
        postfix = {}
        for i, task in enumerate(run.tasks):
            lr = lrs[i] if len(lrs) > 1 else lrs[0]
            run.log.write(step=step, epoch=(step - 1) // run.steps_per_epoch, task=task.name, loss=losses[i], lr=lr,
                          grad_norm=norms[i], examples_per_s=rate)
            postfix[f"{task.name}_loss"] = f"{losses[i]:.4f}"
        if bar is not None:
            bar.set_postfix({**postfix, "lr": f"{lrs[0]:.2e}", "ex/s": f"{rate:.0f}"}, refresh=False)
        self.loss_sums.zero_()
        self.norm_sums.zero_()
        self.steps = 0
        return stop_now

    def restart_clock(self) -> None:
        """Examples/s counts training only: evaluation and saving happen off the clock."""
        if self.steps == 0:
            self.started = time.perf_counter()


def train(config: TrainConfig) -> dict[str, Any]:
    """Run `config` (in a torchrun process group if launched by torchrun); returns the summary."""
    ctx = distributed.setup(config.device, config.dist_timeout)
    try:
        return _train(config, ctx)
    finally:
        distributed.cleanup()


def _train(config: TrainConfig, ctx: distributed.Context) -> dict[str, Any]:
    run = setup(config, ctx)
    position = train_state.resume(run)
    if position.step == 0:  # the start: best/ until a step beats it (a resumed run has its figures in the state)
        evaluate_and_keep_best(run, position, epoch=0)
    meter = StepMeter(run)
    bar = None
    if config.progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=run.total_steps, initial=position.step, desc="train", unit="step", mininterval=1.0)
    run.model.train()
    started = time.perf_counter()
    with StopRequest() as sigterm:
        while position.step < run.total_steps:
            step = position.step + 1  # 1-based: the step being taken
            for t, task in enumerate(run.tasks):  # NLI, then STS
                batch = task.sampler.next_batch()  # the global batch; task_loss takes this rank's slice
                if task.name == "nli" and config.nli_mini_batch_size:  # GradCache: same gradient, less memory
                    loss = cached_nli_backward(run, task, batch, config.nli_mini_batch_size)
                else:
                    with run.autocast():
                        loss = task_loss(run.model, task, batch, ctx, run.encoder.pad_id, run.pad_multiple, run.objective)
                    run.backward(loss)
                meter.add_loss(t, loss, step)
                if config.optimizer == "per_task":  # the reference: each objective updates right after its backward
                    meter.add_norm(t, update(run.parameters, run.optimizers[t], run.schedulers[t], run.scaler,
                                             config.max_grad_norm))
            if config.optimizer == "joint":  # the gradients of both objectives have added up
                meter.add_norm(None, update(run.parameters, run.optimizers[0], run.schedulers[0], run.scaler,
                                            config.max_grad_norm))
            position.step = step
            meter.steps += 1
            if bar is not None:
                bar.update(1)

            epoch_end = step % run.steps_per_epoch == 0 or step == run.total_steps
            evaluate_now = step % config.eval_steps == 0 or epoch_end
            save_now = step % config.save_steps == 0 or epoch_end
            stop = False
            if step % config.logging_steps == 0 or evaluate_now or save_now:
                # host sync: loss values, the non-finite check, and a SIGTERM received by any rank
                stop = meter.flush(step, bar, stop_requested=sigterm.received)
            if evaluate_now:
                evaluate_and_keep_best(run, position, epoch=(step - 1) // run.steps_per_epoch)
            if save_now or (stop and run.last_saved_step != step):
                train_state.save(run, position)
            if stop:  # every rank stops here, the state of this step saved: --resume goes on exactly
                raise TrainingStopped(stopped_message(run, step))
            meter.restart_clock()
    if bar is not None:
        bar.close()
    return finish(run, position, train_seconds=time.perf_counter() - started)  # steps, evaluations and saves


class StopRequest:
    """SIGTERM, as schedulers send it before they kill (SLURM, Kubernetes, preemptible instances), and
    as torchrun's agent forwards it to every worker: while the loop runs, it only sets `received`;
    the loop stops at its next flush, where the ranks agree (module docstring)."""

    def __init__(self):
        self.received = False
        self.previous: Any = None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:  # outside the loop (setup, the final evaluation) SIGTERM ends the process
            signal.signal(signal.SIGTERM, self.previous)


def stopped_message(run: Run, step: int) -> str:
    command = " ".join(shlex.quote(arg) for arg in ["python", *sys.argv]) if sys.argv and sys.argv[0] else "train.py"
    resume = "" if "--resume" in sys.argv else " --resume"
    launcher = " (under torchrun: the same torchrun command)" if run.ctx.distributed else ""
    return (f"stopped by SIGTERM at step {step} of {run.total_steps}: the training state is saved in "
            f"{run.output_dir / train_state.STATE_DIR / f'step-{step:08d}'}; continue with{launcher}: {command}{resume}")
