"""The training loop: the reference multitask recipe, one step at a time.

One step = for each objective in order (NLI, then STS): the next global batch, this rank's
slice, one forward over all of its columns, the loss, backward, and with the per_task
optimizer (the reference) that objective's own clip + AdamW + scheduler step: two updates a step.
With --optimizer joint the gradients of both losses add up and one update follows.
steps per epoch = the shortest objective's batches; the samplers keep their position across
epochs. Dev evaluation every eval_steps and at each epoch end keeps the best model in
output_dir; resumable state is written every save_steps and at each epoch end; the best model is
evaluated on KorSTS test at the end.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from kfdeb import checkpoint, distributed
from kfdeb.config import BUNDLED, TINY_MODEL, TrainConfig
from kfdeb.data import (
    BUNDLED_DATA_DIR, NoDuplicatesBatches, ShuffledBatches, find_nli_files, length_sorted_chunks, nli_triplets_of_files,
    read_nli, read_sts, shard,
)
from kfdeb.errors import UserInputError
from kfdeb.evaluation import TABLE_HEADER, StsResult, best_score, evaluate_sts, sts_path, table_row
from kfdeb.losses import cosine_mse_loss, in_batch_negatives_loss
from kfdeb.model import SentenceEncoder, load_encoder
from kfdeb.optim import build_adamw, build_scheduler, warmup_steps_for
from kfdeb.report import plot_curves, write_model_card

# keys that may change between a run and its --resume (how it runs, not what it computes)
RESUMABLE_CHANGES = {"resume", "output_dir", "progress", "logging_steps", "eval_batch_size", "device",
                     "dist_timeout", "config", "preset", "save_steps", "overwrite_output_dir"}


@dataclass
class Task:
    """One objective's training examples as token ids, and its sampler."""

    name: str  # "nli" or "sts"
    rows: np.ndarray  # N x columns: indices into `sequences` (NLI: anchor, positive, negative; STS: pair)
    sequences: list[list[int]]  # token ids of every distinct text
    labels: np.ndarray | None  # STS: score / 5
    sampler: NoDuplicatesBatches | ShuffledBatches
    batch_size: int


@dataclass
class Progress:
    """Everything besides weights and optimizers that a resumed run must get back."""

    step: int = 0
    best_score: float = -math.inf
    best_step: int = -1
    metrics_bytes: int = 0  # length of metrics.jsonl when this state was saved


def _tokenize_all(encoder: SentenceEncoder, texts: Sequence[str]) -> tuple[list[list[int]], dict[str, int]]:
    distinct = list(dict.fromkeys(texts))
    sequences: list[list[int]] = []
    for start in range(0, len(distinct), 10000):  # chunks keep the fast tokenizer's memory flat
        sequences += encoder.tokenize(distinct[start : start + 10000])
    return sequences, {text: i for i, text in enumerate(distinct)}


def read_task_data(config: TrainConfig, data_dir: Path, ctx: distributed.Context) -> dict[str, tuple[list, np.ndarray | None]]:
    """Each objective's examples as texts (NLI: triplets; STS: sentence pairs) and labels (STS only).

    Read before the model loads, so a bad file fails in a second, not after a model download.
    """
    examples: dict[str, tuple[list, np.ndarray | None]] = {}
    for name in config.task_list:
        batch_size = config.nli_batch_size if name == "nli" else config.sts_batch_size
        if batch_size % ctx.world_size:
            raise UserInputError(
                f"--{name}_batch_size {batch_size} is the global batch and must divide by the world size {ctx.world_size}"
            )
        if name == "nli":
            pairs_per_file = []
            for path in find_nli_files(data_dir, config.nli_train_glob):
                read = read_nli(path)
                pairs_per_file.append(read.pairs)
                distributed.print0(ctx, f"read {len(read.pairs)} NLI pairs from {path}"
                                   + (f" ({read.skipped_no_consensus} with gold label '-', not used)" if read.skipped_no_consensus else ""))
            examples[name] = (nli_triplets_of_files(pairs_per_file, config.seed, config.nli_triplet_scope), None)
        else:
            sts = read_sts(sts_path(data_dir, "train"))
            examples[name] = ([(p.sentence1, p.sentence2) for p in sts], np.array([p.label for p in sts], dtype=np.float32))
    return examples


def build_tasks(config: TrainConfig, examples: dict[str, tuple[list, np.ndarray | None]], encoder: SentenceEncoder,
                ctx: distributed.Context) -> list[Task]:
    """Tokenize every distinct text once and set up each objective's sampler."""
    tasks = []
    for name, (texts, labels) in examples.items():
        batch_size = config.nli_batch_size if name == "nli" else config.sts_batch_size
        sequences, index = _tokenize_all(encoder, [t for example in texts for t in example])
        rows = np.array([[index[t] for t in example] for example in texts], dtype=np.int64)
        if name == "nli":
            sampler: NoDuplicatesBatches | ShuffledBatches = NoDuplicatesBatches(texts, batch_size, config.seed)
        else:  # its own random stream (data.random_stream): independent of the NLI sampler's
            sampler = ShuffledBatches(len(texts), batch_size, config.seed)
        tasks.append(Task(name, rows, sequences, labels, sampler, batch_size))
        distributed.print0(ctx, f"{name.upper()}: {len(texts)} {'triplets' if name == 'nli' else 'pairs'}, "
                           f"{len(sampler)} batches of {batch_size}")
    return tasks


def task_loss(model: torch.nn.Module, task: Task, batch: list[int], ctx: distributed.Context,
              pad_id: int, pad_to_multiple_of: int) -> torch.Tensor:
    """This rank's share of the objective's loss on the global `batch` (losses.py explains the scaling)."""
    local = shard(batch, ctx.rank, ctx.world_size)
    weight = 1.0
    if not local:  # a short last STS batch with fewer pairs than ranks: run one pair at weight 0
        local, weight = batch[:1], 0.0  # so every rank still joins DDP's gradient reduction
    rows = task.rows[local]
    # all columns (anchors, positives, negatives) in one forward call, regrouped by length into
    # as many chunks as there are columns (less padding than per column or one block); listed
    # column-major so the embeddings reshape to columns x batch x hidden
    chunk_ids, chunk_masks, restore = length_sorted_chunks(
        [task.sequences[i] for i in rows.T.reshape(-1)], len(local), pad_id, pad_to_multiple_of)
    embeddings = model([ids.to(ctx.device, non_blocking=True) for ids in chunk_ids],
                       [mask.to(ctx.device, non_blocking=True) for mask in chunk_masks])
    columns = embeddings[restore.to(ctx.device, non_blocking=True)].view(rows.shape[1], len(local), -1)
    if task.name == "nli":
        return in_batch_negatives_loss(columns[0], columns[1], columns[2])
    labels = torch.from_numpy(task.labels[local]).to(ctx.device, non_blocking=True)
    return weight * cosine_mse_loss(columns[0], columns[1], labels, global_batch_size=len(batch))


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


def evaluate(encoder: SentenceEncoder, pairs: list, ctx: distributed.Context, batch_size: int) -> StsResult:
    """KorSTS figures; with several ranks each encodes every W-th sentence and all get all figures."""

    class Sharded:
        def encode(self, sentences: Sequence[str], batch_size: int = 64, convert_to_numpy: bool = True) -> np.ndarray:
            mine = encoder.encode(list(sentences)[ctx.rank :: ctx.world_size], batch_size=batch_size, convert_to_numpy=True)
            return distributed.gather_strided(ctx, mine, len(sentences))

    return evaluate_sts(Sharded(), pairs, batch_size)


class MetricsLog:
    """metrics.jsonl, appended by the main rank; truncated to the saved length on resume."""

    def __init__(self, path: Path, ctx: distributed.Context, keep_bytes: int | None):
        self.path, self.ctx = path, ctx
        if ctx.is_main:
            if keep_bytes is None:
                path.write_text("", encoding="utf-8")
            else:
                with open(path, "ab") as handle:
                    handle.truncate(keep_bytes)

    def write(self, **row: Any) -> None:
        if self.ctx.is_main:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0


@dataclass
class Run:
    """A training run, set up: what the loop and its helpers read."""

    config: TrainConfig
    ctx: distributed.Context
    output_dir: Path
    encoder: SentenceEncoder  # the module whose weights are trained and saved
    model: torch.nn.Module  # what the loop calls: the encoder, or DDP around it
    tasks: list[Task]
    optimizers: list[torch.optim.Optimizer]  # per_task: one per task, in task order; joint: one
    schedulers: list[Any]
    scaler: torch.amp.GradScaler | None  # fp16 only
    amp_dtype: torch.dtype | None
    pad_multiple: int
    steps_per_epoch: int
    total_steps: int
    dev_pairs: list
    test_pairs: list
    log: MetricsLog | None = None
    eval_seconds: float = 0.0  # dev evaluations and best-model saves, for throughput figures

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def autocast(self):
        # bf16/fp16 for the encoder's matmuls; pooling and losses upcast to fp32 themselves
        return torch.autocast(self.ctx.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()


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

    def add_norm(self, task_indices: Sequence[int], norm: torch.Tensor) -> None:
        self.norm_sums[list(task_indices)] += norm

    def flush(self, step: int, bar: Any) -> None:
        run = self.run
        bad = [(s, run.tasks[i].name) for i, s in enumerate(self.first_bad_step.tolist()) if s >= 0]
        if bad:
            at, name = min(bad)
            last = checkpoint.latest(run.output_dir)
            kept = f"the last good state ({last.name}) stays in {last.parent}" if last else "no state had been saved yet"
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

    def restart_clock(self) -> None:
        """Examples/s counts training only: evaluation and saving happen off the clock."""
        if self.steps == 0:
            self.started = time.perf_counter()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(run: Run, progress: Progress) -> None:
    """Resumable state of this step, committed atomically (checkpoint.py). Every rank adds its RNG."""
    ctx = run.ctx
    progress.metrics_bytes = run.log.size()
    scratch = checkpoint.begin(run.output_dir, progress.step) if ctx.is_main else None
    distributed.barrier(ctx)  # the folder exists before the other ranks write into it
    scratch = scratch or checkpoint.pending(run.output_dir, progress.step)
    checkpoint.write_part(scratch, f"rank-{ctx.rank}", rng_state())
    distributed.barrier(ctx)  # every rank's RNG is on disk before the commit
    if ctx.is_main:
        checkpoint.write_part(scratch, "train", {
            "model": run.encoder.state_dict(),
            "optimizers": [o.state_dict() for o in run.optimizers],
            "schedulers": [s.state_dict() for s in run.schedulers],
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
            "samplers": {t.name: t.sampler.state_dict() for t in run.tasks},
            "progress": dict(progress.__dict__),
            "config": run.config.to_dict(),
            "world_size": ctx.world_size,
        })
        checkpoint.commit(scratch, progress.step)
    distributed.barrier(ctx)  # nobody runs ahead of a state that is not committed yet


def load_state(run: Run, folder: Path) -> Progress:
    saved = checkpoint.read_part(folder, "train")
    changed = [k for k, v in run.config.to_dict().items() if k not in RESUMABLE_CHANGES and saved["config"].get(k) != v]
    if changed:
        key = changed[0]
        raise UserInputError(f"--resume: {key} is {getattr(run.config, key)!r} but the saved run used {saved['config'][key]!r}")
    run.encoder.load_state_dict(saved["model"])
    for optimizer, state in zip(run.optimizers, saved["optimizers"]):
        optimizer.load_state_dict(state)
    for scheduler, state in zip(run.schedulers, saved["schedulers"]):
        scheduler.load_state_dict(state)
    if run.scaler is not None and saved["scaler"] is not None:
        run.scaler.load_state_dict(saved["scaler"])
    for task in run.tasks:
        task.sampler.load_state_dict(saved["samplers"][task.name])
    rank_file = f"rank-{run.ctx.rank}"
    if (folder / f"{rank_file}.json").exists():
        set_rng_state(checkpoint.read_part(folder, rank_file))
    else:  # resumed with more ranks than saved: dropout masks differ from an uninterrupted run
        distributed.print0(run.ctx, f"note: saved with {saved['world_size']} ranks; new ranks start fresh RNG streams")
    return Progress(**saved["progress"])


def evaluate_and_keep_best(run: Run, progress: Progress, epoch: int) -> None:
    started = time.perf_counter()
    result = evaluate(run.encoder, run.dev_pairs, run.ctx, run.config.eval_batch_size)
    score = best_score(result.figures, run.config.metric_for_best)
    improved = score > progress.best_score  # NaN never improves
    if improved:
        progress.best_score, progress.best_step = score, progress.step
        if run.ctx.is_main:
            run.encoder.save(run.output_dir, {"base_model": run.config.model_name_or_path, "step": progress.step,
                                              "dev": result.figures, "config": run.config.to_dict()})
    run.log.write(step=progress.step, epoch=epoch, split="dev", score=score, best=improved, **result.figures)
    if run.ctx.is_main:
        plot_curves(run.output_dir / "metrics.jsonl", run.output_dir / "curves.png")  # ~0.5 s: only with new dev points
    best = "best" if improved else f"best {progress.best_score:.2f} at step {progress.best_step}"
    _say(run, f"step {progress.step}: dev {run.config.metric_for_best} {score:.2f} ({best})")
    distributed.barrier(run.ctx)  # the best model is on disk before anyone moves on
    run.eval_seconds += time.perf_counter() - started


def _say(run: Run, message: str) -> None:
    if run.ctx.is_main:  # through tqdm, so the progress bar is redrawn below the message
        from tqdm.auto import tqdm

        tqdm.write(message)


def _prepare_output(config: TrainConfig, ctx: distributed.Context) -> Path:
    output_dir = Path(config.output_dir)
    if ctx.is_main:
        has_run = checkpoint.latest(output_dir) is not None
        if has_run and not config.resume:
            if not config.overwrite_output_dir:
                raise UserInputError(
                    f"{output_dir}: holds a previous run's state; pass --resume to continue it, "
                    "--overwrite_output_dir to start over, or another --output_dir"
                )
            shutil.rmtree(output_dir / checkpoint.STATE_DIR)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
    distributed.barrier(ctx)
    return output_dir


def _model_source(config: TrainConfig, output_dir: Path, ctx: distributed.Context) -> str:
    if config.model_name_or_path != TINY_MODEL:
        return config.model_name_or_path
    from kfdeb.tiny import build_tiny_deberta

    folder = output_dir / "init-tiny-deberta"
    if ctx.is_main and not (folder / "config.json").exists():
        build_tiny_deberta(folder, seed=config.seed)
    distributed.barrier(ctx)
    return str(folder)


def _amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    if config.amp == "auto":
        supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if supported else None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.amp]


def setup(config: TrainConfig, ctx: distributed.Context) -> Run:
    """Read and tokenize the data, load the encoder, build optimizers and schedules."""
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    output_dir = _prepare_output(config, ctx)
    data_dir = BUNDLED_DATA_DIR if config.data_dir == BUNDLED else Path(config.data_dir)
    examples = read_task_data(config, data_dir, ctx)
    dev_pairs, test_pairs = read_sts(sts_path(data_dir, "dev")), read_sts(sts_path(data_dir, "test"))
    encoder = load_encoder(_model_source(config, output_dir, ctx), max_seq_length=config.max_seq_length, device=ctx.device)
    encoder.metadata = {"base_model": config.model_name_or_path}
    frozen = encoder.freeze_unused_parameters()
    if frozen:
        distributed.print0(ctx, f"not trained (the sentence embedding does not use them): {', '.join(frozen)}")
    tasks = build_tasks(config, examples, encoder, ctx)
    steps_per_epoch = min(len(task.sampler) for task in tasks)
    total_steps = config.max_steps or steps_per_epoch * config.num_epochs
    warmup_steps = warmup_steps_for(total_steps, config.warmup_ratio)
    model: torch.nn.Module = encoder
    if ctx.distributed:
        model = torch.nn.parallel.DistributedDataParallel(encoder, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    optimizers = [build_adamw(encoder.named_parameters(), config.learning_rate, config.weight_decay, fused=True)
                  for _ in (tasks if config.optimizer == "per_task" else [None])]
    amp_dtype = _amp_dtype(config, ctx.device)
    run = Run(
        config, ctx, output_dir, encoder, model, tasks, optimizers,
        schedulers=[build_scheduler(o, warmup_steps, total_steps) for o in optimizers],
        scaler=torch.amp.GradScaler(ctx.device.type) if amp_dtype == torch.float16 else None,
        amp_dtype=amp_dtype,
        pad_multiple=config.pad_to_multiple_of or (8 if ctx.device.type == "cuda" else 1),  # tensor-core tiles
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, dev_pairs=dev_pairs, test_pairs=test_pairs,
    )
    distributed.print0(ctx, f"{total_steps} steps ({steps_per_epoch} per epoch), warmup {warmup_steps}, "
                       f"{ctx.world_size} process(es) on {ctx.device}, amp {amp_dtype or 'none'}")
    return run


def start_or_resume(run: Run) -> Progress:
    saved = checkpoint.latest(run.output_dir) if run.config.resume else None
    progress = load_state(run, saved) if saved is not None else Progress()
    if saved is not None:
        distributed.print0(run.ctx, f"resumed from {saved} at step {progress.step}")
    elif run.config.resume:
        distributed.print0(run.ctx, f"no saved state in {run.output_dir / checkpoint.STATE_DIR}: starting at step 0")
    run.log = MetricsLog(run.output_dir / "metrics.jsonl", run.ctx, progress.metrics_bytes if saved else None)
    return progress


def finish(run: Run, progress: Progress, train_seconds: float) -> dict[str, Any]:
    """Evaluate the best checkpoint on dev and test; write its metadata, the model card, the plot."""
    ctx, output_dir = run.ctx, run.output_dir
    if progress.best_step < 0 and ctx.is_main:  # every evaluation was NaN: keep the last weights
        run.encoder.save(output_dir, {"base_model": run.config.model_name_or_path, "step": progress.step})
    distributed.barrier(ctx)
    best = load_encoder(output_dir, device=ctx.device)
    dev = evaluate(best, run.dev_pairs, ctx, run.config.eval_batch_size)
    test = evaluate(best, run.test_pairs, ctx, run.config.eval_batch_size)
    summary = {"best_step": progress.best_step, "total_steps": run.total_steps, "dimension": best.dimension,
               "train_seconds": train_seconds, "eval_seconds": run.eval_seconds, "dev": dev.figures, "test": test.figures}
    if ctx.is_main:
        run.log.write(step=progress.step, split="test", best_step=progress.best_step, **test.figures)
        best.save(output_dir, {"dev": dev.figures, "test": test.figures, "best_step": progress.best_step})
        write_model_card(output_dir, run.config, summary)
        plot_curves(output_dir / "metrics.jsonl", output_dir / "curves.png")
        name = output_dir.resolve().name
        print(f"best model (step {progress.best_step}) in {output_dir}\n{TABLE_HEADER}\n"
              f"{table_row(f'{name} (dev)', dev.figures)}\n{table_row(f'{name} (test)', test.figures)}", flush=True)
    distributed.barrier(ctx)
    return summary


def train(config: TrainConfig) -> dict[str, Any]:
    """Run `config` (in a torchrun process group if launched by torchrun); returns the summary."""
    ctx = distributed.setup(config.device, config.dist_timeout)
    try:
        return _train(config, ctx)
    finally:
        distributed.cleanup()


def _train(config: TrainConfig, ctx: distributed.Context) -> dict[str, Any]:
    run = setup(config, ctx)
    progress = start_or_resume(run)
    meter = StepMeter(run)
    bar = None
    if config.progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=run.total_steps, initial=progress.step, desc="train", unit="step", mininterval=1.0)
    run.model.train()
    started = time.perf_counter()
    while progress.step < run.total_steps:
        step = progress.step + 1  # 1-based: the step being taken
        for t, task in enumerate(run.tasks):  # NLI, then STS
            batch = task.sampler.next_batch()  # the global batch; task_loss takes this rank's slice
            with run.autocast():
                loss = task_loss(run.model, task, batch, ctx, run.encoder.pad_id, run.pad_multiple)
            run.backward(loss)
            meter.add_loss(t, loss, step)
            if config.optimizer == "per_task":  # the reference: each objective updates right after its backward
                meter.add_norm([t], update(run.parameters, run.optimizers[t], run.schedulers[t], run.scaler, config.max_grad_norm))
        if config.optimizer == "joint":  # the gradients of both objectives have added up
            meter.add_norm(range(len(run.tasks)), update(run.parameters, run.optimizers[0], run.schedulers[0], run.scaler, config.max_grad_norm))
        progress.step = step
        meter.steps += 1
        if bar is not None:
            bar.update(1)

        epoch_end = step % run.steps_per_epoch == 0 or step == run.total_steps
        evaluate_now = step % config.eval_steps == 0 or epoch_end
        save_now = step % config.save_steps == 0 or epoch_end
        if step % config.logging_steps == 0 or evaluate_now or save_now:
            meter.flush(step, bar)  # host sync: loss values, and the non-finite check
        if evaluate_now:
            evaluate_and_keep_best(run, progress, epoch=(step - 1) // run.steps_per_epoch)
        if save_now:
            save_state(run, progress)
        meter.restart_clock()
    if bar is not None:
        bar.close()
    return finish(run, progress, train_seconds=time.perf_counter() - started)  # steps, evaluations and saves
