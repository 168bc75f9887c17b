"""A training run, set up: everything the loop (loop.py) reads, and what it leaves for people at the end.

Top to bottom: the `Run` type; `setup`, which makes the run's choices and builds its parts in
dependency order (output folder, data, model, seeds, tasks, optimizers, schedules); the dev
evaluation that keeps the best model, the start (step 0) included (`evaluate_and_keep_best`); `finish`
(the best model's dev and test figures, its kfdeb.json, the model card, the plot, the comparison with
the start). Each objective's data: tasks.py; the resumable state: train_state.py; the start and the
length best/ keeps: keep_best.py.

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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from kfdeb import distributed, train_state
from kfdeb.amp import amp_dtype_for, describe_amp
from kfdeb.config import BUNDLED, TINY_MODEL, TrainConfig
from kfdeb.errors import UserInputError
from kfdeb.evaluation import TABLE_HEADER, best_score, sts_set_line, table_row
from kfdeb.flags import progress_shown
from kfdeb.inference_dtype import describe_dtype, resolve_dtype
from kfdeb.ir_data import IrData, read_ir_data, trained_on
from kfdeb.keep_best import (at_length, describe_saved_length, evaluate, figures_by_dim, saved_max_seq_length,
                              start_comparison)
from kfdeb.losses import Objective
from kfdeb.model import SentenceEncoder, load_encoder
from kfdeb.optim import build_adamw, build_scheduler, warmup_steps_for
from kfdeb.readers import BUNDLED_DATA_DIR
from kfdeb.retrieval import TABLE_HEADER as IR_TABLE_HEADER
from kfdeb.retrieval import ir_set_line, ir_table_row
from kfdeb.report import plot_curves, public_config, write_model_card
from kfdeb.tasks import (
    Task, build_tasks, check_nodes_agree, data_fingerprint, examples_key, held_out_dev_set, read_sts_split, task_examples,
)
from kfdeb.weights import BEST_DIR


@dataclass
class Run:
    """A training run, set up: what the loop and its helpers read."""

    config: TrainConfig
    ctx: distributed.Context
    output_dir: Path  # meaningful on rank 0 only: other ranks never touch their output_dir
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
    dev_ir: IrData | None = None  # --ir_dev_data: retrieval evaluated beside KorSTS dev
    test_ir: IrData | None = None  # --ir_test_data
    prompts: tuple[str, str] = ("", "")  # (query, document): the in-batch objective's and retrieval's
    log: train_state.MetricsLog | None = None
    last_saved_step: int = -1  # the step of the newest committed state (-1: none)
    eval_seconds: float = 0.0  # dev evaluations and best-model saves, for throughput figures
    objective: Objective = Objective()  # the STS loss, the Matryoshka widths, the in-batch loss (losses.py)
    guide: SentenceEncoder | None = None  # --guide_model (gist): frozen, eval mode, never saved
    guide_sha256: str = ""  # its weights' digest, kept in the state (a resume needs the same guide)
    saved_max_seq_length: int = 0  # the limit best/ keeps and evaluations run at (keep_best.py; 0: training's)

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]

    @property
    def best_dir(self) -> Path:
        return self.output_dir / BEST_DIR

    def autocast(self):
        # bf16/fp16 for the encoder's matmuls; pooling and losses switch autocast off and run in fp32
        return torch.autocast(self.ctx.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()


def setup(config: TrainConfig, ctx: distributed.Context) -> Run:
    """Read and tokenize the data, load the encoder, build optimizers and schedules."""
    output_dir = _prepare_output(config, ctx)
    data_dir = BUNDLED_DATA_DIR if config.data_dir == BUNDLED else Path(config.data_dir)
    keys = {name: examples_key(config, data_dir, name) for name in config.task_list}
    examples = task_examples(config, data_dir, ctx, keys)
    dev_pairs, test_pairs = read_sts_split(config, data_dir, "dev"), read_sts_split(config, data_dir, "test")
    check_retrieval_sets_unseen(config, keys)
    dev_ir = read_ir_data(config.ir_dev_data, config.ir_dev_split, "--ir_dev_data") if config.ir_dev_data else None
    if config.ir_dev_fraction:  # held out of the training files, and saved beside the run for evaluate.py
        dev_ir = held_out_dev_set(config, ctx, output_dir)
    test_ir = read_ir_data(config.ir_test_data, config.ir_test_split, "--ir_test_data") if config.ir_test_data else None
    if not dev_pairs and dev_ir is None:
        distributed.print0(ctx, "no dev data (no KorSTS dev, --sts_dev_file, --ir_dev_data or --ir_dev_fraction): "
                                f"{BEST_DIR}/ keeps the final weights")
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
    check_nodes_agree(ctx, data_fingerprint(config, data_dir, keys, tasks, encoder))
    objective = Objective(config.sts_loss, config.matryoshka_dim_list, config.matryoshka_weight_list, config.nli_loss,
                          config.scale, config.gist_margin_strategy, config.gist_margin, config.gist_contrast_anchors,
                          config.gist_contrast_positives)
    check_matryoshka_dims(objective.matryoshka_dims, encoder.dimension, ctx)
    steps_per_epoch = min(len(task.sampler) for task in tasks)
    total_steps = config.max_steps or steps_per_epoch * config.num_epochs
    warmup_steps = warmup_steps_for(total_steps, config.warmup_ratio)
    model: torch.nn.Module = encoder
    if ctx.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            encoder, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            broadcast_buffers=False,  # the encoder's buffers (position ids) never change: no broadcast each forward
        )
    optimizers = [build_adamw(encoder.named_parameters(), config.learning_rate, config.weight_decay, fused=True)
                  for _ in (tasks if config.optimizer == "per_task" else [None])]
    capability = torch.cuda.get_device_capability(ctx.device) if ctx.device.type == "cuda" else None
    amp_dtype = amp_dtype_for(config.amp, ctx.device.type, capability)
    run = Run(
        config, ctx, output_dir, encoder, model, tasks, optimizers,
        schedulers=[build_scheduler(o, warmup_steps, total_steps) for o in optimizers],
        scaler=torch.amp.GradScaler(ctx.device.type) if amp_dtype == torch.float16 else None,
        amp_dtype=amp_dtype,
        pad_multiple=config.pad_to_multiple_of or (8 if ctx.device.type == "cuda" else 1),  # tensor-core tiles
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, dev_pairs=dev_pairs, test_pairs=test_pairs,
        dev_ir=dev_ir, test_ir=test_ir, prompts=prompts, objective=objective, guide=guide,
        guide_sha256=train_state.weights_sha256(guide) if guide is not None else "", saved_max_seq_length=saved_length,
    )
    distributed.print0(ctx, f"{total_steps} steps ({steps_per_epoch} per epoch), warmup {warmup_steps}, "
                       f"{ctx.world_size} process(es) on {ctx.device}, amp {describe_amp(config.amp, amp_dtype, capability)}, "
                       f"evaluations in {describe_dtype(encoder.inference_dtype, eval_dtype_reason, '--eval_dtype')}")
    return run


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
        folder = output_dir / "init-tiny-deberta"
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


def announce_evaluation(run: Run, split: str, pairs: list, ir: IrData | None) -> bool:
    """One line before an evaluation starts (`evaluating dev: KorSTS dev, 2,888 sentences; ...`); returns
    whether its encodes draw progress bars (--progress)."""
    own_file = getattr(run.config, f"sts_{split}_file")
    sets = [sts_set_line(Path(own_file).name if own_file else f"KorSTS {split}", pairs)]
    sets += [ir_set_line(ir)] if ir is not None else []
    say(run, f"evaluating {split}: " + "; ".join(sets))
    return progress_shown(run.config.progress)


def say(run: Run, message: str) -> None:
    if run.ctx.is_main:  # through tqdm, so the progress bar is redrawn below the message
        from tqdm.auto import tqdm

        tqdm.write(message)


def best_metadata(config: TrainConfig, step: int, **figures: Any) -> dict[str, Any]:
    """best/kfdeb.json: the whole of it, written anew at every save (never merged into an earlier one,
    so a resumed run writes the same keys as an uninterrupted one); local paths by their names only."""
    config_values = public_config(config)
    return {"base_model": config_values["model_name_or_path"], "step": step, **figures, "config": config_values}


def evaluate_and_keep_best(run: Run, position: train_state.Position, epoch: int) -> None:
    """Evaluate on dev; save best/ when the selection figure beats the best so far. Step 0 (before any update)
    is evaluated too: the starting model is the first best, so best/ never holds a model worse than the start."""
    if not run.dev_pairs and run.dev_ir is None:
        return
    started = time.perf_counter()
    dims = run.objective.matryoshka_dims
    progress = announce_evaluation(run, "dev", run.dev_pairs, run.dev_ir)
    with at_length(run.encoder, run.saved_max_seq_length):
        result = evaluate(run.encoder, run.dev_pairs, run.ctx, run.config.eval_batch_size, dims, run.dev_ir, run.prompts,
                          progress)
    # Matryoshka: selected at the first width listed (jhgan00's choice), the full one when it is listed first
    selected = result.figures_at(dims[0] if dims else None)
    score = best_score(selected, run.config.metric_for_best)
    improved = score > position.best_score  # NaN never improves; every rank has the same figures
    if position.step == 0:
        position.start_figures = dict(selected)
    elif score > position.best_trained_score:
        position.best_trained_score, position.best_trained_step = score, position.step
    if improved:
        position.best_score, position.best_step = score, position.step
        if run.ctx.is_main:  # the others go on and wait for rank 0 at their next collective
            with at_length(run.encoder, run.saved_max_seq_length):
                run.encoder.save(run.best_dir, best_metadata(run.config, position.step, dev=result.figures,
                                                              max_seq_length=run.saved_max_seq_length,
                                                              **({"dev_by_dim": figures_by_dim(result)} if dims else {})))
    run.log.write(step=position.step, epoch=epoch, split="dev", score=score, best=improved, **result.figures)
    for dim in dims:  # one row per width; the row above is the full embedding's
        run.log.write(step=position.step, epoch=epoch, split="dev", dim=dim, **result.by_dim[dim])
    if run.ctx.is_main:
        plot_curves(run.output_dir / "metrics.jsonl", run.output_dir / "curves.png")  # ~0.5 s: only with new dev points
    best = "best" if improved else f"best {position.best_score:.2f} at step {position.best_step}"
    widths = (f" at width {dims[0]}; cosine Spearman by width: "
              + ", ".join(f"{d} {result.by_dim[d]['cosine_spearman']:.2f}" for d in dims)) if dims and run.dev_pairs else ""
    ir = f", nDCG@10 {result.figures['ndcg@10']:.2f}" if run.dev_ir is not None and "ndcg@10" not in run.config.metric_for_best else ""
    when = f"step {position.step}" + (" (the start, before any update)" if position.step == 0 else "")
    say(run, f"{when}: dev {run.config.metric_for_best} {score:.2f}{widths}{ir} ({best})")
    run.eval_seconds += time.perf_counter() - started


def _load_best_weights(run: Run) -> None:
    """Every rank's encoder gets the best model's weights, read from rank 0's disk only."""
    weights: dict[str, torch.Tensor] = {}

    def read() -> None:
        weights.update(load_encoder(run.best_dir, device="cpu").state_dict())

    distributed.main_only(run.ctx, read)
    run.encoder.load_state_dict(distributed.broadcast_tensors(run.ctx, weights if run.ctx.is_main else None))


def finish(run: Run, position: train_state.Position, train_seconds: float) -> dict[str, Any]:
    """Evaluate the best checkpoint on dev and test; write its metadata, the model card, the plot; compare with the start."""
    ctx = run.ctx
    if position.best_step >= 0:
        _load_best_weights(run)
    # else no dev data (setup said so), or every evaluation was NaN: keep the last weights
    dims = run.objective.matryoshka_dims
    run.encoder.max_seq_length = run.saved_max_seq_length or run.encoder.max_seq_length  # training is over (keep_best.py)
    progress = announce_evaluation(run, "dev", run.dev_pairs, run.dev_ir)
    dev = evaluate(run.encoder, run.dev_pairs, ctx, run.config.eval_batch_size, dims, run.dev_ir, run.prompts, progress)
    announce_evaluation(run, "test", run.test_pairs, run.test_ir)
    test = evaluate(run.encoder, run.test_pairs, ctx, run.config.eval_batch_size, dims, run.test_ir, run.prompts,
                    progress)
    summary = {"best_step": position.best_step, "total_steps": run.total_steps, "dimension": run.encoder.dimension,
               "max_seq_length": run.saved_max_seq_length, "train_seconds": train_seconds,
               "eval_seconds": run.eval_seconds, "dev": dev.figures, "test": test.figures}
    if position.start_figures:
        summary["dev_start"] = position.start_figures
    if dims:
        summary.update(dev_by_dim=figures_by_dim(dev), test_by_dim=figures_by_dim(test))
    if ctx.is_main:
        run.log.write(step=position.step, split="test", best_step=position.best_step, **test.figures)
        for dim in dims:
            run.log.write(step=position.step, split="test", dim=dim, best_step=position.best_step, **test.by_dim[dim])
        best_step = position.best_step if position.best_step >= 0 else position.step
        run.encoder.save(run.best_dir, best_metadata(
            run.config, best_step, best_step=position.best_step, max_seq_length=run.saved_max_seq_length,
            dev=dev.figures, test=test.figures,
            **{key: summary[key] for key in ("dev_start", "dev_by_dim", "test_by_dim") if key in summary}))
        write_model_card(run.best_dir, run.config, summary)
        plot_curves(run.output_dir / "metrics.jsonl", run.output_dir / "curves.png")
        name = run.output_dir.resolve().name
        print(f"best model (step {position.best_step}) in {run.best_dir}", flush=True)
        korsts = [(split, result) for split, result in (("dev", dev), ("test", test)) if "cosine_spearman" in result.figures]
        if korsts:
            rows = [table_row(f"{name} ({split})", result.figures) for split, result in korsts]
            rows += [table_row(f"{name} ({split}, {dim} dims)", result.by_dim[dim]) for split, result in korsts for dim in dims]
            print(f"{TABLE_HEADER}\n" + "\n".join(rows), flush=True)
        retrieval = [(f"{data.name}", result.figures) for data, result in ((run.dev_ir, dev), (run.test_ir, test)) if data]
        if retrieval:
            print(IR_TABLE_HEADER + "\n" + "\n".join(ir_table_row(f"{name} ({which})", figures)
                                                     for which, figures in retrieval), flush=True)
        if position.start_figures and position.best_step >= 0:
            print(start_comparison(run.config.metric_for_best, position, dev.figures_at(dims[0] if dims else None)),
                  flush=True)
    # every rank leaves together: none tears the process group down while rank 0 still writes
    distributed.barrier(ctx)
    return summary
