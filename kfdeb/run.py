"""A training run, set up: everything the loop (loop.py) reads.

Top to bottom: the types, `Parts` (what training runs and updates, with its state_dict and
load_state_dict), `EvalSplit` (what dev and test evaluate), `Run` (the parts, the evaluation sets and
the choices setup made); `setup`, which makes the run's choices and builds its parts in dependency
order (output folder, data, model, seeds, tasks, optimizers, schedules). What changes as the run
trains: train_state.TrainingState; each objective's data: tasks.py; the run's evaluations:
run_evaluation.py; the length best/ keeps: keep_best.py.

- Choices: the device (distributed.resolve_device), the autocast dtype (`amp_dtype_for`), the
  seeds: the data order and the NLI triplets depend on `seed` alone, so every rank draws the same
  global batches; dropout draws from `seed + rank`, so ranks draw different masks, as one
  process over the whole batch would.

Output folder (written by global rank 0 alone; nodes need no shared filesystem):

    RUN_DIR/best/           the best model: the folder to publish or push (checkpoint format of
                            model.py, plus README.md, the model card)
    RUN_DIR/state/          resumable training state (train_state.py; ~3.7 GB at base size)
    RUN_DIR/metrics.jsonl, curves.png, train_config.json

What other ranks need from that folder (the state on --resume, the best weights at the end)
reaches them through the process group (distributed.main_only, distributed.broadcast_tensors).
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from kfdeb import distributed, train_state
from kfdeb.amp import amp_dtype_for, describe_amp
from kfdeb.config import BUNDLED, TINY_MODEL, TINY_START_DIR, TrainConfig
from kfdeb.errors import UserInputError
from kfdeb.inference_dtype import describe_dtype, resolve_dtype
from kfdeb.ir_data import IrData, read_ir_data, trained_on
from kfdeb.keep_best import describe_saved_length, saved_max_seq_length
from kfdeb.losses import Objective
from kfdeb.model import SentenceEncoder, load_encoder
from kfdeb.optim import build_adamw, build_scheduler, warmup_steps_for
from kfdeb.readers import BUNDLED_DATA_DIR, StsPair
from kfdeb.remine import apply_negatives, pool_of
from kfdeb.tasks import (
    Task, build_tasks, check_nodes_agree, data_fingerprint, examples_key, held_out_dev_set, read_sts_split, task_examples,
)
from kfdeb.weights import BEST_DIR


@dataclass
class Parts:
    """What training runs and updates, built in dependency order (`setup`, `build_parts`): the encoder, the guide, each
    objective's data and sampler, the model the loop calls, the optimizers and schedules, the fp16 scaler. Their
    state, besides the TrainingState, is what a resumed run gets back: `state_dict` and `load_state_dict`."""

    encoder: SentenceEncoder  # the module whose weights are trained and saved
    guide: SentenceEncoder | None  # --guide_model (gist): frozen, eval mode, never saved
    guide_sha256: str  # its weights' digest, kept in the state (a resume needs the same guide)
    tasks: list[Task]  # each objective's token ids and sampler, in training order (NLI, then STS)
    model: torch.nn.Module  # what the loop calls: the encoder, or DDP around it
    optimizers: list[torch.optim.Optimizer]  # per_task: one per task, in task order; joint: one
    schedulers: list[Any]
    scaler: torch.amp.GradScaler | None  # fp16 only

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def state_dict(self) -> dict[str, Any]:
        state = {
            "model": self.encoder.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "samplers": {t.name: t.sampler.state_dict() for t in self.tasks},
        }
        refreshed = {t.name: torch.from_numpy(np.ascontiguousarray(t.rows[:, 2:])) for t in self.tasks
                     if t.negatives_refreshed}
        if refreshed:  # --remine_every's negative columns (remine.py); a state before the first refresh has none
            state["negatives"] = refreshed
        return state

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.encoder.load_state_dict(saved["model"])
        for optimizer, optimizer_state in zip(self.optimizers, saved["optimizers"]):
            optimizer.load_state_dict(optimizer_state)
        for scheduler, scheduler_state in zip(self.schedulers, saved["schedulers"]):
            scheduler.load_state_dict(scheduler_state)
        if self.scaler is not None and saved["scaler"] is not None:
            self.scaler.load_state_dict(saved["scaler"])
        for task in self.tasks:
            task.sampler.load_state_dict(saved["samplers"][task.name])
            if task.name in saved.get("negatives", {}):
                apply_negatives(task, saved["negatives"][task.name].numpy(), task.remine_pool)


@dataclass(frozen=True)
class EvalSplit:
    """What one split is evaluated on: scored pairs (KorSTS, or --sts_*_file) and a retrieval set, either may lack."""

    name: str  # "dev" or "test"
    pairs: list[StsPair]
    ir: IrData | None = None  # --ir_dev_data / --ir_dev_fraction, --ir_test_data

    @property
    def empty(self) -> bool:
        return not self.pairs and self.ir is None


@dataclass
class Run:
    """A training run, set up: where it runs, its parts, what it evaluates, the choices setup made. What changes as
    it trains is the parts' tensors and positions, and train_state.TrainingState."""

    config: TrainConfig
    ctx: distributed.Context
    output_dir: Path  # meaningful on rank 0 only: other ranks never touch their output_dir
    parts: Parts
    dev: EvalSplit
    test: EvalSplit
    log: train_state.MetricsLog  # metrics.jsonl, emptied or truncated by train_state.resume
    objective: Objective  # the STS loss, the Matryoshka widths, the in-batch loss (losses.py)
    prompts: tuple[str, str]  # (query, document): the in-batch objective's and retrieval's
    amp_dtype: torch.dtype | None
    pad_multiple: int
    steps_per_epoch: int
    total_steps: int
    saved_max_seq_length: int  # the limit best/ keeps and evaluations run at (keep_best.py)

    @property
    def best_dir(self) -> Path:
        return self.output_dir / BEST_DIR

    def epoch_of(self, step: int) -> int:
        """The 0-based epoch a (1-based) step belongs to."""
        return (step - 1) // self.steps_per_epoch

    def autocast(self):
        # bf16/fp16 for the encoder's matmuls; pooling and losses switch autocast off and run in fp32
        return torch.autocast(self.ctx.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        (self.parts.scaler.scale(loss) if self.parts.scaler is not None else loss).backward()


def setup(config: TrainConfig, ctx: distributed.Context) -> Run:
    """The run's choices and parts, in dependency order: the output folder; the data (before the model loads, so a
    bad file fails in a second); the encoder and the guide; the seeds; the tasks; the steps; the optimizers."""
    output_dir = _prepare_output(config, ctx)
    data_dir = BUNDLED_DATA_DIR if config.data_dir == BUNDLED else Path(config.data_dir)
    keys = {name: examples_key(config, data_dir, name) for name in config.task_list}
    examples = task_examples(config, data_dir, ctx, keys)
    dev, test = read_evaluation_sets(config, ctx, data_dir, output_dir, keys)
    encoder = _load_start_model(config, output_dir, ctx)
    encoder.metadata = {}  # a checkpoint's own kfdeb.json describes that run, not this one (best_metadata does)
    # what the dev and final evaluations encode in (encode's default); training's forward follows --amp
    encoder.inference_dtype, eval_dtype_reason = resolve_dtype(config.eval_dtype, ctx.device)
    guide = load_guide(config, encoder, ctx)
    saved_length = saved_max_seq_length(config, encoder)
    distributed.print0(ctx, describe_saved_length(config, encoder, saved_length))
    # after the model is built (building a tiny model reseeds torch): dropout streams differ per rank
    seed_everything(config.seed + ctx.rank)
    frozen = encoder.freeze_unused_parameters()
    if frozen:
        distributed.print0(ctx, f"not trained (the sentence embedding does not use them): {', '.join(frozen)}")
    prompts = run_prompts(config, encoder)
    tasks = build_tasks(config, examples, encoder, ctx, prompts, guide if config.guide_model != "self" else None)
    for task in tasks if config.remine_every else []:  # the in-batch rows as read: what each refresh mines over
        if task.name == "nli":
            task.remine_pool = pool_of(task.rows, task.keys, len(task.texts))
    check_nodes_agree(ctx, data_fingerprint(config, data_dir, keys, tasks, encoder))
    objective = Objective(config.sts_loss, config.matryoshka_dim_list, config.matryoshka_weight_list, config.nli_loss,
                          config.scale, config.gist_margin_strategy, config.gist_margin, config.gist_contrast_anchors,
                          config.gist_contrast_positives)
    check_matryoshka_dims(objective.matryoshka_dims, encoder.dimension, ctx)
    steps_per_epoch = min(len(task.sampler) for task in tasks)
    total_steps = config.max_steps or steps_per_epoch * config.num_epochs
    warmup_steps = warmup_steps_for(total_steps, config.warmup_ratio)
    capability = torch.cuda.get_device_capability(ctx.device) if ctx.device.type == "cuda" else None
    amp_dtype = amp_dtype_for(config.amp, ctx.device.type, capability)
    parts = build_parts(config, ctx, encoder, guide, tasks, warmup_steps, total_steps, amp_dtype)
    run = Run(
        config, ctx, output_dir, parts, dev, test, train_state.MetricsLog(output_dir / train_state.METRICS_FILE, ctx),
        objective, prompts, amp_dtype,
        pad_multiple=config.pad_to_multiple_of or (8 if ctx.device.type == "cuda" else 1),  # tensor-core tiles
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, saved_max_seq_length=saved_length,
    )
    distributed.print0(ctx, f"{total_steps} steps ({steps_per_epoch} per epoch), warmup {warmup_steps}, "
                       f"{ctx.world_size} process(es) on {ctx.device}, amp {describe_amp(config.amp, amp_dtype, capability)}, "
                       f"evaluations in {describe_dtype(encoder.inference_dtype, eval_dtype_reason, '--eval_dtype')}")
    return run


def build_parts(config: TrainConfig, ctx: distributed.Context, encoder: SentenceEncoder, guide: SentenceEncoder | None,
                tasks: list[Task], warmup_steps: int, total_steps: int, amp_dtype: torch.dtype | None) -> Parts:
    """What the loop steps through, over the loaded encoder and the tasks: DDP around the encoder (several ranks),
    the optimizers (one per task, or one) and their schedules, the fp16 scaler."""
    model: torch.nn.Module = encoder
    if ctx.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            encoder, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            broadcast_buffers=False,  # the encoder's buffers (position ids) never change: no broadcast each forward
        )
    optimizers = [build_adamw(encoder.named_parameters(), config.learning_rate, config.weight_decay, fused=True)
                  for _ in (tasks if config.optimizer == "per_task" else [None])]
    return Parts(encoder, guide, train_state.weights_sha256(guide) if guide is not None else "", tasks, model,
                 optimizers, schedulers=[build_scheduler(o, warmup_steps, total_steps) for o in optimizers],
                 scaler=torch.amp.GradScaler(ctx.device.type) if amp_dtype == torch.float16 else None)


def read_evaluation_sets(config: TrainConfig, ctx: distributed.Context, data_dir: Path, output_dir: Path,
                         keys: dict[str, dict[str, Any]]) -> tuple[EvalSplit, EvalSplit]:
    """Dev and test: KorSTS (or --sts_*_file) pairs where the run evaluates them, retrieval sets where given; a
    retrieval set built from a file the run trains on is refused (`check_retrieval_sets_unseen`)."""
    dev_pairs, test_pairs = read_sts_split(config, data_dir, "dev"), read_sts_split(config, data_dir, "test")
    check_retrieval_sets_unseen(config, keys)
    dev_ir = read_ir_data(config.ir_dev_data, config.ir_dev_split, "--ir_dev_data") if config.ir_dev_data else None
    if config.ir_dev_fraction:  # held out of the training files, and saved beside the run for evaluate.py
        dev_ir = held_out_dev_set(config, ctx, output_dir)
    test_ir = read_ir_data(config.ir_test_data, config.ir_test_split, "--ir_test_data") if config.ir_test_data else None
    if not dev_pairs and dev_ir is None:
        distributed.print0(ctx, "no dev data (no KorSTS dev, --sts_dev_file, --ir_dev_data or --ir_dev_fraction): "
                                f"{BEST_DIR}/ keeps the final weights")
    return EvalSplit("dev", dev_pairs, dev_ir), EvalSplit("test", test_pairs, test_ir)


def load_guide(config: TrainConfig, encoder: SentenceEncoder, ctx: distributed.Context) -> SentenceEncoder | None:
    """--guide_model: self is a copy of `encoder` as loaded (the starting weights: made before --resume loads the
    trained ones, so a resumed run gets the same guide back; nothing of it is saved); else the model at that path.
    Frozen and in eval mode (no dropout): it costs one forward of the batch a step and no optimizer state."""
    if not config.guide_model:
        return None
    if config.guide_model == "self":
        guide = copy.deepcopy(encoder)
    else:
        pooling = None if config.pooling == "auto" else config.pooling
        guide = load_encoder(config.guide_model, max_seq_length=config.max_seq_length, device=ctx.device,
                             pooling=pooling)
    guide.requires_grad_(False)
    guide.eval()
    what = "a frozen copy of the starting weights" if config.guide_model == "self" else config.guide_model
    distributed.print0(ctx, f"GIST guide: {what} ({guide.dimension} dims, eval mode, no gradient)")
    return guide


def check_matryoshka_dims(dims: Sequence[int], dimension: int, ctx: distributed.Context) -> None:
    """The widths must fit the model; leaving its own width out trains the full embedding only
    through its prefixes, which jhgan00's scripts and sentence-transformers allow with a warning."""
    if dims and dims[0] > dimension:
        raise UserInputError(f"--matryoshka_dims {dims[0]}: wider than the model's {dimension}-dimensional embedding")
    if dims and dims[0] != dimension:
        distributed.print0(ctx, f"warning: --matryoshka_dims leaves out the model's own width {dimension}: the full "
                                f"embedding is not trained as such (list {dimension} first to train it)")


def check_retrieval_sets_unseen(config: TrainConfig, keys: dict[str, dict[str, Any]]) -> None:
    """A bundled retrieval set built from a file the run trains on (kfdeb:xnli-test from xnli.test.ko.tsv) is
    refused: its figures would measure pairs the model was trained on, not retrieval."""
    training = {f["sha256"]: Path(f["path"]).name for key in keys.values() for f in key["files"]}
    for flag, source in (("--ir_dev_data", config.ir_dev_data), ("--ir_test_data", config.ir_test_data)):
        seen = trained_on(source, training) if source else None
        if seen:
            raise UserInputError(
                f"{flag} {source} is built from {seen[0]}, which this run trains on (as {seen[1]}): its retrieval "
                "figures would measure memorised pairs; train on other files (for XNLI: --nli_train_glob "
                "KorNLI/xnli.dev.ko.tsv)")


def run_prompts(config: TrainConfig, encoder: SentenceEncoder) -> tuple[str, str]:
    """The run's (query, document) prompts: --query_prompt / --document_prompt, "auto" being the model's own.
    The encoder keeps them under the names query and document, so the saved model applies them in
    encode_query / encode_document (and sentence-transformers' alike), and no other role prompt."""
    query = encoder.role_prompt("query") if config.query_prompt == "auto" else config.query_prompt
    document = encoder.role_prompt("document") if config.document_prompt == "auto" else config.document_prompt
    roles = ("query", "document", "passage", "corpus")
    encoder.prompts = {**{k: v for k, v in encoder.prompts.items() if k not in roles},
                       **({"query": query} if query else {}), **({"document": document} if document else {})}
    if encoder.default_prompt_name not in encoder.prompts:
        encoder.default_prompt_name = None
    return query, document


def _prepare_output(config: TrainConfig, ctx: distributed.Context) -> Path:
    output_dir = config.run_dir

    def prepare() -> None:  # rank 0: the only process that touches the output folder
        has_run = train_state.latest(output_dir) is not None
        if has_run and not config.resume:
            if not config.overwrite_output_dir:
                raise UserInputError(
                    f"{output_dir}: holds a previous run's state; pass --resume to continue it, "
                    "--overwrite_output_dir to start over, or another --output_dir"
                )
            for previous in (train_state.STATE_DIR, BEST_DIR):
                shutil.rmtree(output_dir / previous, ignore_errors=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")

    distributed.main_only(ctx, prepare)  # a refusal stops every rank with rank 0's message
    if config.output_prefix:  # the folder is derived: say where the run goes
        distributed.print0(ctx, f"run folder (--output_prefix {config.output_prefix}): {output_dir}")
    return output_dir


def _load_start_model(config: TrainConfig, output_dir: Path, ctx: distributed.Context) -> SentenceEncoder:
    pooling = None if config.pooling == "auto" else config.pooling
    if config.model_name_or_path != TINY_MODEL:
        return load_encoder(config.model_name_or_path, max_seq_length=config.max_seq_length, device=ctx.device,
                            pooling=pooling)
    from kfdeb.tiny import build_tiny_deberta

    if ctx.is_main:  # kept beside the run, so the run's folder says what it started from
        folder = output_dir / TINY_START_DIR
        if not (folder / "config.json").exists():
            build_tiny_deberta(folder, seed=config.seed)
        return load_encoder(folder, max_seq_length=config.max_seq_length, device=ctx.device, pooling=pooling)
    # other ranks build the same model in a scratch folder of their own (no shared disk);
    # DDP copies rank 0's weights to every rank anyway
    with tempfile.TemporaryDirectory(prefix="kfdeb-tiny-") as scratch:
        build_tiny_deberta(scratch, seed=config.seed)
        return load_encoder(scratch, max_seq_length=config.max_seq_length, device=ctx.device, pooling=pooling)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


