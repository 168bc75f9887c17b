"""The training loop: the reference multitask recipe, one step at a time.

One step = for each objective in order (NLI, then STS): the next global batch, this rank's
slice, one forward over all of its columns, the loss, backward, and with the per_task
optimizer (the reference) that objective's own clip + AdamW + scheduler step: two updates a step.
With --optimizer joint the gradients of both losses add up and one update follows.
steps per epoch = the shortest objective's batches; the samplers keep their position across
epochs. Dev evaluation at step 0 (the start), every eval_steps and at each epoch end keeps the best
model, so best/ holds the start when no step beat it; resumable
state is written every save_steps and at each epoch end; the best model is evaluated on KorSTS
test at the end. Setting the run up: run.py (its data and batches: tasks.py); where the run stands
and its resumable state: train_state.py; its evaluations: run_evaluation.py.

The in-batch objective's loss (--nli_loss, losses.py) gets the global batch's text keys (shared
positives are masked) and, for gist, the guide's embeddings of this rank's rows: one forward of the
batch without gradient (`guide_embeddings`), before GradCache's two passes.

Host syncs: none inside a step (fp16's GradScaler aside, as in the reference). Losses, gradient
norms and the non-finite watch stay on the device (StepMeter) until a logging, evaluation or
saving step reads them, all ranks at once.

SIGTERM (a scheduler's notice, forwarded to every worker by torchrun's agent): while the loop runs
it only sets a flag, which the end of every step reads. One process stops at the end of the step
the signal arrived in. Several ranks must stop at the same step (they all save the state of one
step), so each step's end sends this rank's flag to the others and reads what they sent at the
previous step's end (distributed.AnyRankFlag: an asynchronous CPU all-reduce, no device sync): a
signal that arrives during step N stops every rank at the end of step N + 1, whatever
--logging_steps is. The stopping step finishes its evaluation if one is due, saves its state
(rank 0 writes it) and the run exits with status 143. Between log lines the state also keeps each
rank's open logging window (StepMeter.state_dict), so `--resume` writes the uninterrupted run's
metrics.jsonl row for row.
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
from kfdeb.batching import length_sorted_chunks
from kfdeb.config import TrainConfig
from kfdeb.errors import TrainingStopped
from kfdeb.flags import progress_shown
from kfdeb.gradcache import cached_backward
from kfdeb.losses import Objective, nli_loss, sts_loss
from kfdeb.mining import settings_from_options
from kfdeb.remine import refresh
from kfdeb.run import Run, setup
from kfdeb.run_evaluation import evaluate_and_keep_best, finish
from kfdeb.tasks import Batch, Task


def embed_columns(model: torch.nn.Module, task: Task, rows: np.ndarray, ctx: distributed.Context,
                  pad_id: int, pad_to_multiple_of: int, guide: bool = False) -> torch.Tensor:
    """Embeddings of every text of `rows` (examples x columns of text ids): columns x examples x H (guide: the
    texts in the guide model's token ids, Task.token_ids)."""
    # all columns (anchors, positives, negatives) in one forward call, regrouped by length into
    # as many chunks as there are columns (less padding than per column or one block); listed
    # column-major so the embeddings reshape to columns x batch x hidden
    chunk_ids, chunk_masks, restore = length_sorted_chunks(task.token_ids(rows, guide), len(rows), pad_id,
                                                           pad_to_multiple_of)
    embeddings = model([ids.to(ctx.device, non_blocking=True) for ids in chunk_ids],
                       [mask.to(ctx.device, non_blocking=True) for mask in chunk_masks])
    return embeddings[restore.to(ctx.device, non_blocking=True)].view(rows.shape[1], len(rows), -1)


def guide_embeddings(guide: torch.nn.Module | None, task: Task, rows: np.ndarray, ctx: distributed.Context,
                     pad_multiple: int, autocast: Any, mini_batch_size: int = 0) -> torch.Tensor | None:
    """--guide_model's embeddings of this rank's rows (columns x b x H_guide): one forward without gradient, in
    eval mode (its own), `mini_batch_size` rows at a time under GradCache (0: all at once)."""
    if guide is None:
        return None
    size = mini_batch_size or len(rows)
    with torch.no_grad(), autocast():
        parts = [embed_columns(guide, task, rows[start : start + size], ctx, guide.pad_id, pad_multiple, guide=True)
                 for start in range(0, len(rows), size)]
    return torch.cat(parts, dim=1).float()


def task_loss(model: torch.nn.Module, task: Task, batch: Batch, ctx: distributed.Context,
              pad_id: int, pad_to_multiple_of: int, objective: Objective = Objective(),
              guide: torch.nn.Module | None = None) -> torch.Tensor:
    """This rank's share of the objective's loss on the global batch (losses.py explains the scaling);
    guide: --guide_model's encoder (gist)."""
    columns = embed_columns(model, task, batch.rows, ctx, pad_id, pad_to_multiple_of)
    if task.name == "nli":
        guided = guide_embeddings(guide, task, batch.rows, ctx, pad_to_multiple_of, contextlib.nullcontext)
        return nli_loss(columns, objective, batch.keys, guided)
    return sts_loss(columns, batch.labels, batch.size, objective, batch.placeholder)


def cached_nli_backward(run: Run, task: Task, batch: Batch, mini_batch_size: int) -> torch.Tensor:
    """The NLI loss and its full-batch gradient, embedding `mini_batch_size` triplets at a time (gradcache.py);
    the guide (gist) embeds the batch once, before."""
    ctx, encoder, model = run.ctx, run.parts.encoder, run.parts.model

    def embed(rows: np.ndarray, with_grad: bool) -> torch.Tensor:
        with run.autocast():  # without autograd, the bare encoder: DDP has nothing to reduce
            return embed_columns(model if with_grad else encoder, task, rows, ctx, encoder.pad_id, run.pad_multiple)

    no_sync = model.no_sync if ctx.distributed else contextlib.nullcontext
    guided = guide_embeddings(run.parts.guide, task, batch.rows, ctx, run.pad_multiple, run.autocast, mini_batch_size)
    return cached_backward(embed, lambda columns: nli_loss(columns, run.objective, batch.keys, guided), batch.rows,
                           mini_batch_size, run.backward, no_sync, ctx.device)


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
        tasks = len(run.parts.tasks)
        self.loss_sums = torch.zeros(tasks, device=device)
        self.norm_sums = torch.zeros(tasks, device=device)
        self.first_bad_step = torch.full((tasks,), -1, dtype=torch.long, device=device)
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

    def check_finite(self, last_saved_step: int) -> None:
        """Raise FloatingPointError if a loss of the window was not finite, on every rank alike; the message names
        the state that stays (`last_saved_step`: -1 for none)."""
        run = self.run
        # agreed by all ranks (a NaN may show on one rank's shard only), so all stop at the same
        # step with the same message; rank 0 prints it (cli.py)
        never = torch.iinfo(torch.long).max
        first_bad = torch.where(self.first_bad_step >= 0, self.first_bad_step, never)
        first_bad = distributed.all_reduce_min(run.ctx, first_bad).tolist()  # host sync
        at = min(first_bad)
        if at != never:
            name = run.parts.tasks[first_bad.index(at)].name
            kept = (f"the last good state (step-{last_saved_step:08d}) stays in {run.output_dir / train_state.STATE_DIR}"
                    if last_saved_step >= 0 else "no state had been saved yet")
            raise FloatingPointError(
                f"the {name} loss is not finite at step {at}; training stopped and {kept} "
                "(lower --learning_rate, or use --amp bf16 instead of fp16)"
            )

    def flush(self, step: int, bar: Any, last_saved_step: int) -> None:
        """The non-finite check, then the window's means logged and the window closed."""
        run = self.run
        self.check_finite(last_saved_step)
        seconds = time.perf_counter() - self.started
        rate = sum(t.batch_size for t in run.parts.tasks) * self.steps / seconds if seconds > 0 else 0.0
        losses = (distributed.all_reduce_mean(run.ctx, self.loss_sums) / self.steps).tolist()
        norms = (self.norm_sums / self.steps).tolist()
        lrs = [s.get_last_lr()[0] for s in run.parts.schedulers]
        postfix = {}
        for i, task in enumerate(run.parts.tasks):
            lr = lrs[i] if len(lrs) > 1 else lrs[0]
            run.log.write(step=step, epoch=run.epoch_of(step), task=task.name, loss=losses[i], lr=lr,
                          grad_norm=norms[i], examples_per_s=rate)
            postfix[f"{task.name}_loss"] = f"{losses[i]:.4f}"
        if bar is not None:
            bar.set_postfix({**postfix, "lr": f"{lrs[0]:.2e}", "ex/s": f"{rate:.0f}"}, refresh=False)
        self.loss_sums.zero_()
        self.norm_sums.zero_()
        self.steps = 0

    def state_dict(self) -> dict[str, Any]:
        """This rank's open window: what a state saved between log lines needs for the next line to be the same."""
        return {"loss_sums": self.loss_sums.cpu(), "norm_sums": self.norm_sums.cpu(), "steps": self.steps,
                "seconds": time.perf_counter() - self.started}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sums.copy_(state["loss_sums"])
        self.norm_sums.copy_(state["norm_sums"])
        self.steps = state["steps"]
        self.started = time.perf_counter() - state["seconds"]

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
    parts = run.parts
    meter = StepMeter(run)
    state = train_state.resume(run, meter)
    if state.step == 0:  # the start: best/ until a step beats it (a resumed run has its figures in the state)
        evaluate_and_keep_best(run, state, epoch=0)
    stop_flag = distributed.AnyRankFlag(ctx)
    bar = None
    if ctx.is_main and progress_shown(config.progress):
        from tqdm.auto import tqdm

        bar = tqdm(total=run.total_steps, initial=state.step, desc="train", unit="step", mininterval=1.0)
    parts.model.train()
    started = time.perf_counter()
    with StopRequest() as sigterm:
        while state.step < run.total_steps:
            step = state.step + 1  # 1-based: the step being taken
            if config.remine_every and step > 1 and (step - 1) % config.remine_every == 0:
                refresh_negatives(run, step - 1)  # at the step's start, not the last one's end: a stop stays quick
            for t, task in enumerate(parts.tasks):  # NLI, then STS
                batch = task.rank_batch(task.sampler.next_batch(), ctx)  # the global batch, this rank's share of it
                if task.name == "nli" and config.nli_mini_batch_size:  # GradCache: same gradient, less memory
                    loss = cached_nli_backward(run, task, batch, config.nli_mini_batch_size)
                else:
                    with run.autocast():
                        loss = task_loss(parts.model, task, batch, ctx, parts.encoder.pad_id, run.pad_multiple,
                                         run.objective, parts.guide)
                    run.backward(loss)
                meter.add_loss(t, loss, step)
                if config.optimizer == "per_task":  # the reference: each objective updates right after its backward
                    meter.add_norm(t, update(parts.parameters, parts.optimizers[t], parts.schedulers[t], parts.scaler,
                                             config.max_grad_norm))
            if config.optimizer == "joint":  # the gradients of both objectives have added up
                meter.add_norm(None, update(parts.parameters, parts.optimizers[0], parts.schedulers[0], parts.scaler,
                                            config.max_grad_norm))
            state.step = step
            meter.steps += 1
            if bar is not None:
                bar.update(1)

            # a SIGTERM: this step ends the run on every rank alike (module docstring; no device sync)
            stop = stop_flag.exchange(sigterm.received)
            epoch_end = step % run.steps_per_epoch == 0 or step == run.total_steps
            evaluate_now = step % config.eval_steps == 0 or epoch_end
            save_now = step % config.save_steps == 0 or epoch_end
            if step % config.logging_steps == 0 or evaluate_now or save_now:
                meter.flush(step, bar, state.last_saved_step)  # host sync: loss values and the non-finite check
            elif stop:
                meter.check_finite(state.last_saved_step)  # the state to be saved must be good; the window stays open
            if evaluate_now:
                evaluate_and_keep_best(run, state, epoch=run.epoch_of(step))
            if save_now or (stop and state.last_saved_step != step):
                train_state.save(run, state, meter)
            if stop:  # every rank stops here, the state of this step saved: --resume goes on exactly
                raise TrainingStopped(stopped_message(run, step))
            meter.restart_clock()
        stop_flag.close()
    if bar is not None:
        bar.close()
    return finish(run, state, train_seconds=time.perf_counter() - started)  # steps, evaluations and saves


def refresh_negatives(run: Run, step: int) -> None:
    """--remine_every: the in-batch rows' negatives mined again with the weights of `step` (remine.py; rank 0 mines,
    every rank gets its columns). Done before step + 1 rather than at the end of `step`, so that a state saved at
    `step` (a stop included) holds the negatives before the refresh and --resume refreshes them the same way."""
    config, task = run.config, next(t for t in run.parts.tasks if t.name == "nli")
    settings = settings_from_options(config.remine_options, config.seed)
    done = refresh(task, run.parts.encoder, task.remine_pool, settings, run.prompts, config.eval_batch_size, run.ctx,
                   step)
    distributed.print0(run.ctx, done.line())


class StopRequest:
    """SIGTERM, as schedulers send it before they kill (SLURM, Kubernetes, preemptible instances), and
    as torchrun's agent forwards it to every worker: while the loop runs, it only sets `received`;
    the loop reads it at the end of each step, where the ranks agree on the stop (module docstring)."""

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
