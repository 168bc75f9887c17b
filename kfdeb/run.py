"""A training run, set up and persisted: everything the loop (loop.py) reads or leaves behind.

- Choices: the device (distributed.resolve_device), the autocast dtype (`amp_dtype_for`), the
  seeds: the data order and the NLI triplets depend on `seed` alone, so every rank draws the same
  global batches; dropout draws from `seed + rank`, so ranks draw different masks, as one
  process over the whole batch would.
- Data: each objective's examples and their token ids (`task_examples`, `build_tasks`), from the
  token cache (token_cache.py: built once per node by its local rank 0 while the node's other ranks
  wait, then memory-mapped by every rank; a cache hit parses and tokenizes nothing), or with
  --no_cache read and tokenized in memory by every rank (`read_task_data`); and each one's sampler.
- State: resumable state every save_steps (`save_state`, `start_or_resume`), the best model after
  each dev evaluation (`evaluate_and_keep_best`), the final dev/test figures (`finish`).

Output folder (written by global rank 0 alone; nodes need no shared filesystem):

    OUTPUT_DIR/best/        the best model: the folder to publish or push (checkpoint format of
                            model.py, plus README.md, the model card)
    OUTPUT_DIR/state/       resumable training state (checkpoint.py; ~3.7 GB at base size)
    OUTPUT_DIR/metrics.jsonl, curves.png, train_config.json

What other ranks need from that folder (the state on --resume, the best weights at the end)
reaches them through the process group (distributed.main_only, distributed.broadcast_tensors).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from kfdeb import checkpoint, distributed, token_cache
from kfdeb.config import BUNDLED, TINY_MODEL, TrainConfig
from kfdeb.data import (
    BUNDLED_DATA_DIR, IN_BATCH_KINDS, ROW_KIND_NAMES, NoDuplicatesBatches, ShuffledBatches, StsPair, expand_file_list,
    find_nli_files, in_batch_examples, nli_triplets_of_files, read_nli, read_own_file, read_scored_file, read_sts,
)
from kfdeb.errors import UserInputError
from kfdeb.losses import Objective
from kfdeb.token_cache import Examples, TokenTable
from kfdeb.evaluation import TABLE_HEADER, StsResult, best_score, evaluate_sts, sts_path, table_row
from kfdeb.model import SentenceEncoder, load_encoder
from kfdeb.optim import build_adamw, build_scheduler, warmup_steps_for
from kfdeb.report import plot_curves, public_config, write_model_card
from kfdeb.weights import BEST_DIR

# keys that may change between a run and its --resume (how it runs, not what it computes)
RESUMABLE_CHANGES = {"resume", "output_dir", "output_prefix", "batch_size", "progress", "logging_steps", "eval_batch_size", "device",
                     "dist_timeout", "config", "preset", "save_steps", "overwrite_output_dir", "hub_model_id",
                     "cache_dir", "no_cache"}


@dataclass
class Task:
    """One objective's training examples as token ids, and its sampler."""

    name: str  # "nli" or "sts"
    rows: np.ndarray  # N x columns: indices into `sequences` (NLI: anchor, positive[, negative]; STS: pair)
    sequences: TokenTable  # token ids of every distinct text (sequences[i]: text i's)
    labels: np.ndarray | None  # STS: score / score_max
    sampler: NoDuplicatesBatches | ShuffledBatches
    batch_size: int


@dataclass
class Progress:
    """Everything besides weights and optimizers that a resumed run must get back."""

    step: int = 0
    best_score: float = -math.inf
    best_step: int = -1
    metrics_bytes: int = 0  # length of metrics.jsonl when this state was saved


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
    log: MetricsLog | None = None
    last_saved_step: int = -1  # the step of the newest committed state (-1: none)
    eval_seconds: float = 0.0  # dev evaluations and best-model saves, for throughput figures
    objective: Objective = Objective()  # the STS loss and the Matryoshka widths (losses.py)

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


def amp_dtype_for(amp: str, device_type: str, cuda_capability: tuple[int, int] | None) -> torch.dtype | None:
    """The autocast dtype for `--amp` on this device (None: full fp32).

    auto: bf16 on GPUs with native bf16 (compute capability 8.0 and up: A100, H100, RTX 30xx+);
    fp16 with a GradScaler on older GPUs (V100, T4), which only emulate bf16 (slowly) and where
    the reference trained with fp16; none on CPU, where bf16 pays only with avx512_bf16/AMX.
    """
    if amp == "auto":
        if device_type != "cuda":
            return None
        return torch.bfloat16 if cuda_capability is not None and cuda_capability >= (8, 0) else torch.float16
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def describe_amp(amp: str, dtype: torch.dtype | None, cuda_capability: tuple[int, int] | None) -> str:
    """The startup line's words for the precision chosen, and why."""
    name = {None: "none (fp32)", torch.bfloat16: "bf16", torch.float16: "fp16 with GradScaler"}[dtype]
    if amp != "auto":
        return f"{name} (--amp {amp})"
    if cuda_capability is None:
        return f"{name} (auto: not a GPU)"
    native = "native bf16" if cuda_capability >= (8, 0) else "no native bf16"
    return f"{name} (auto: GPU compute capability {cuda_capability[0]}.{cuda_capability[1]}, {native})"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


def rng_state(device: torch.device) -> dict[str, Any]:
    """This rank's generators: Python, NumPy, torch CPU and (on a GPU) its own device's only."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":  # not get_rng_state_all: a resume on a box with fewer GPUs must work
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def read_sts_split(config: TrainConfig, data_dir: Path, split: str) -> list[StsPair]:
    """Scored pairs of `split` (train, dev, test): the --sts_{split}_file if given, else data_dir's KorSTS file."""
    flag = f"--sts_{split}_file"
    own = getattr(config, flag[2:])
    if own:
        return read_scored_file(own, flag, config.score_max)
    return read_sts(sts_path(data_dir, split, instead=flag))


def read_own_in_batch_rows(config: TrainConfig, ctx: distributed.Context) -> list[tuple[str, ...]]:
    """The --nli_train_files: triplets (recipe of the NLI pairs, then the given ones) or anchor-positive pairs."""
    files = [read_own_file(path, IN_BATCH_KINDS, "--nli_train_files")
             for path in expand_file_list(config.nli_train_files, "--nli_train_files")]
    for file in files:
        distributed.print0(ctx, f"read {len(file.rows)} {ROW_KIND_NAMES[file.kind]} from {file.path}"
                           + (f" ({file.skipped_no_consensus} with gold label '-', not used)" if file.skipped_no_consensus else ""))
    return in_batch_examples(files, config.seed, "--nli_train_files", config.nli_triplet_scope)


def _check_batch_size(config: TrainConfig, name: str, ctx: distributed.Context) -> None:
    batch_size = config.nli_batch_size if name == "nli" else config.sts_batch_size
    if batch_size % ctx.world_size:
        raise UserInputError(
            f"--{name}_batch_size {batch_size} is the global batch and must divide by the world size {ctx.world_size}"
        )


def read_task_texts(config: TrainConfig, data_dir: Path, ctx: distributed.Context, name: str) -> tuple[list, np.ndarray | None]:
    """One objective's examples as texts (NLI: triplets or pairs; STS: sentence pairs) and labels (STS only)."""
    if name == "nli" and config.nli_train_files:
        return read_own_in_batch_rows(config, ctx), None
    if name == "nli":
        pairs_per_file = []
        for path in find_nli_files(data_dir, config.nli_train_glob):
            read = read_nli(path)
            pairs_per_file.append(read.pairs)
            distributed.print0(ctx, f"read {len(read.pairs)} NLI pairs from {path}"
                               + (f" ({read.skipped_no_consensus} with gold label '-', not used)" if read.skipped_no_consensus else ""))
        return nli_triplets_of_files(pairs_per_file, config.seed, config.nli_triplet_scope), None
    sts = read_sts_split(config, data_dir, "train")
    return [(p.sentence1, p.sentence2) for p in sts], np.array([p.label for p in sts], dtype=np.float32)


def read_task_data(config: TrainConfig, data_dir: Path, ctx: distributed.Context) -> dict[str, tuple[list, np.ndarray | None]]:
    """Each objective's examples as texts and labels (`read_task_texts`), all read now: --no_cache's path."""
    examples = {}
    for name in config.task_list:
        _check_batch_size(config, name, ctx)
        examples[name] = read_task_texts(config, data_dir, ctx, name)
    return examples


def examples_in_memory(texts: dict[str, tuple[list, np.ndarray | None]]) -> dict[str, Examples]:
    """`read_task_data`'s texts as integer examples, held in memory (no token cache)."""
    return {name: Examples.from_texts(rows, labels, with_keys=name == "nli") for name, (rows, labels) in texts.items()}


def cache_dir(config: TrainConfig) -> Path:
    return Path(config.cache_dir) if config.cache_dir else token_cache.default_cache_dir()


def examples_key(config: TrainConfig, data_dir: Path, name: str) -> dict[str, Any]:
    """What one objective's examples depend on: its input files (token_cache.file_fingerprint), the
    reader, and the settings that change its rows. Computing it reads nothing but the files' bytes."""
    if name == "nli":
        own = bool(config.nli_train_files)
        files = (expand_file_list(config.nli_train_files, "--nli_train_files") if own
                 else find_nli_files(data_dir, config.nli_train_glob))
        settings = {"seed": config.seed, "nli_triplet_scope": config.nli_triplet_scope}
    else:
        own = bool(config.sts_train_file)
        files = [config.sts_train_file if own else sts_path(data_dir, "train", instead="--sts_train_file")]
        settings = {"score_max": config.score_max if own else 5.0}
    return {"format": token_cache.FORMAT_VERSION, "task": name, "reader": "own" if own else "kornlu",
            "files": [token_cache.file_fingerprint(path) for path in files], **settings}


def _open_built(ctx: distributed.Context, folder: Path, key: dict[str, Any]) -> None:
    """After each node's local rank 0 built `folder`: it must be there for this rank too."""
    if not token_cache.is_complete(folder, key):
        raise UserInputError(f"{folder}: token cache not found on rank {ctx.rank} after its node's local rank 0 "
                             "built it (did an input file change meanwhile?); run again, or pass --no_cache")


def _cache_note(ctx: distributed.Context, what: str, folder: Path, key: dict[str, Any]) -> None:
    """Each node's builder says so before a build (a full KorNLI build takes a minute)."""
    if not token_cache.is_complete(folder, key):
        print(f"building the token cache ({what}) in {folder} on {socket.gethostname()} (rank {ctx.rank})", flush=True)


def task_examples(config: TrainConfig, data_dir: Path, ctx: distributed.Context,
                  keys: dict[str, dict[str, Any]] | None = None) -> dict[str, Examples]:
    """Each objective's examples: from the token cache (built on a miss by each node's local rank 0,
    which reads the files as `read_task_texts` does), or with --no_cache read in memory by every rank.

    Called before the model loads, so a bad file fails in a second, not after a model download.
    """
    if config.no_cache:
        return examples_in_memory(read_task_data(config, data_dir, ctx))
    examples = {}
    for name in config.task_list:
        _check_batch_size(config, name, ctx)
        key = keys[name] if keys else examples_key(config, data_dir, name)  # setup passes the keys it computed
        folder = token_cache.examples_folder(cache_dir(config), name, key)

        def build() -> Examples:  # on a cache miss only
            return examples_in_memory({name: read_task_texts(config, data_dir, ctx, name)})[name]

        def work() -> bool:  # each node's local rank 0, within this iteration
            _cache_note(ctx, f"{name.upper()} examples", folder, key)
            return token_cache.ensure_examples(folder, key, build)

        built = distributed.each_node_first(ctx, work)
        _open_built(ctx, folder, key)
        examples[name] = token_cache.open_examples(folder)
        distributed.print0(ctx, f"{name.upper()}: examples {'built' if built else 'from the token cache (hit)'}: {folder}")
    return examples


def _file_digests(fingerprints: list[dict[str, Any]]) -> list[tuple[str, int, str]]:
    """Files as the nodes compare them: by name, size and content (paths and times differ between machines)."""
    return [(Path(f["path"]).name, f["size"], f["sha256"]) for f in fingerprints]


def data_fingerprint(config: TrainConfig, data_dir: Path, keys: dict[str, dict[str, Any]], tasks: list,
                     encoder: SentenceEncoder) -> dict[str, Any]:
    """What every rank must have built alike: each objective's input files, settings and row count, the
    dev and test files, and the tokenizer."""
    found: dict[str, Any] = {}
    for task in tasks:
        key = keys[task.name]
        found[f"{task.name} training files"] = _file_digests(key["files"])
        found[f"{task.name} settings"] = {k: v for k, v in key.items() if k != "files"}
        found[f"{task.name} examples"] = len(task.rows)
    for split in ("dev", "test"):
        own = getattr(config, f"sts_{split}_file")
        path = own or sts_path(data_dir, split, instead=f"--sts_{split}_file")
        found[f"{split} file"] = _file_digests([token_cache.file_fingerprint(path)])
    found["tokenizer"] = token_cache.tokenizer_fingerprint(encoder.tokenizer, encoder.do_lower_case,
                                                          encoder.max_seq_length)["sha256"]
    return found


def _describe(value: Any) -> str:
    if isinstance(value, list) and value and isinstance(value[0], tuple):
        return ", ".join(f"{name} ({size} bytes, sha256 {digest[:12]})" for name, size, digest in value)
    return json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value


def check_nodes_agree(ctx: distributed.Context, mine: dict[str, Any]) -> None:
    """Every rank's data fingerprint equals rank 0's, or every rank stops now with one line naming the
    first difference: nodes without a shared disk read their own copies, and copies that differ would
    give them other batch counts and schedules, and collectives that stop matching (a hang until
    --dist_timeout) instead of an error."""
    if not ctx.distributed:
        return
    everyone = distributed.gather_objects(ctx, (socket.gethostname(), mine))  # one collective, before the first step
    host0, reference = everyone[0]
    for rank, (host, theirs) in enumerate(everyone[1:], start=1):
        for what, expected in reference.items():
            if theirs.get(what) != expected:
                raise UserInputError(
                    f"the nodes' data differ: rank {rank} on {host} has {what} {_describe(theirs.get(what))}, but rank 0 "
                    f"on {host0} has {_describe(expected)}; give every node the same files (and tokenizer)"
                )


def task_tokens(name: str, examples: Examples, encoder: SentenceEncoder, ctx: distributed.Context) -> TokenTable:
    """Token ids of the examples' distinct texts: from the token cache beside the examples (built on a
    miss by each node's local rank 0 with the fast tokenizer's threads), or tokenized in memory."""
    if examples.folder is None:  # --no_cache: tokenized here, by every rank
        return TokenTable.from_tokenizer(examples.texts, encoder.tokenize)
    key = token_cache.tokenizer_fingerprint(encoder.tokenizer, encoder.do_lower_case, encoder.max_seq_length)
    folder = token_cache.tokens_folder(examples.folder, key)

    def work() -> bool:
        _cache_note(ctx, f"{name.upper()} token ids", folder, key)
        return token_cache.ensure_tokens(folder, key, examples.texts, encoder.bulk_tokenizer)

    built = distributed.each_node_first(ctx, work)
    _open_built(ctx, folder, key)
    distributed.print0(ctx, f"{name.upper()}: token ids {'built' if built else 'from the token cache (hit)'}: {folder}")
    return token_cache.open_tokens(folder)


def build_tasks(config: TrainConfig, examples: dict[str, Examples], encoder: SentenceEncoder,
                ctx: distributed.Context) -> list[Task]:
    """Each objective's token ids (`task_tokens`) and sampler."""
    tasks = []
    for name, data in examples.items():
        batch_size = config.nli_batch_size if name == "nli" else config.sts_batch_size
        rows = data.rows
        if name == "nli":
            sampler: NoDuplicatesBatches | ShuffledBatches = NoDuplicatesBatches.from_keys(data.keys, batch_size, config.seed)
        else:  # its own random stream (data.random_stream): independent of the NLI sampler's
            sampler = ShuffledBatches(len(rows), batch_size, config.seed)
        tasks.append(Task(name, rows, task_tokens(name, data, encoder, ctx), data.labels, sampler, batch_size))
        distributed.print0(ctx, f"{name.upper()}: {len(rows)} {'triplets' if rows.shape[1] == 3 else 'pairs'}, "
                           f"{len(sampler)} batches of {batch_size}")
    return tasks


def _prepare_output(config: TrainConfig, ctx: distributed.Context) -> Path:
    output_dir = config.run_dir

    def prepare() -> None:  # rank 0: the only process that touches the output folder
        has_run = checkpoint.latest(output_dir) is not None
        if has_run and not config.resume:
            if not config.overwrite_output_dir:
                raise UserInputError(
                    f"{output_dir}: holds a previous run's state; pass --resume to continue it, "
                    "--overwrite_output_dir to start over, or another --output_dir"
                )
            for previous in (checkpoint.STATE_DIR, BEST_DIR):
                shutil.rmtree(output_dir / previous, ignore_errors=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")

    distributed.main_only(ctx, prepare)  # a refusal stops every rank with rank 0's message
    if config.output_prefix:  # the folder is derived: say where the run goes
        distributed.print0(ctx, f"run folder (--output_prefix {config.output_prefix}): {output_dir}")
    return output_dir


def _load_start_model(config: TrainConfig, output_dir: Path, ctx: distributed.Context) -> SentenceEncoder:
    if config.model_name_or_path != TINY_MODEL:
        return load_encoder(config.model_name_or_path, max_seq_length=config.max_seq_length, device=ctx.device)
    from kfdeb.tiny import build_tiny_deberta

    if ctx.is_main:  # kept beside the run, so the run's folder says what it started from
        folder = output_dir / "init-tiny-deberta"
        if not (folder / "config.json").exists():
            build_tiny_deberta(folder, seed=config.seed)
        return load_encoder(folder, max_seq_length=config.max_seq_length, device=ctx.device)
    # other ranks build the same model in a scratch folder of their own (no shared disk);
    # DDP copies rank 0's weights to every rank anyway
    with tempfile.TemporaryDirectory(prefix="kfdeb-tiny-") as scratch:
        build_tiny_deberta(scratch, seed=config.seed)
        return load_encoder(scratch, max_seq_length=config.max_seq_length, device=ctx.device)


def setup(config: TrainConfig, ctx: distributed.Context) -> Run:
    """Read and tokenize the data, load the encoder, build optimizers and schedules."""
    output_dir = _prepare_output(config, ctx)
    data_dir = BUNDLED_DATA_DIR if config.data_dir == BUNDLED else Path(config.data_dir)
    keys = {name: examples_key(config, data_dir, name) for name in config.task_list}
    examples = task_examples(config, data_dir, ctx, keys)
    dev_pairs, test_pairs = read_sts_split(config, data_dir, "dev"), read_sts_split(config, data_dir, "test")
    encoder = _load_start_model(config, output_dir, ctx)
    encoder.metadata = {}  # a checkpoint's own kfdeb.json describes that run, not this one (best_metadata does)
    # after the model is built (building a tiny model reseeds torch): dropout streams differ per rank
    seed_everything(config.seed + ctx.rank)
    frozen = encoder.freeze_unused_parameters()
    if frozen:
        distributed.print0(ctx, f"not trained (the sentence embedding does not use them): {', '.join(frozen)}")
    tasks = build_tasks(config, examples, encoder, ctx)
    check_nodes_agree(ctx, data_fingerprint(config, data_dir, keys, tasks, encoder))
    objective = Objective(config.sts_loss, config.matryoshka_dim_list, config.matryoshka_weight_list)
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
        objective=objective,
    )
    distributed.print0(ctx, f"{total_steps} steps ({steps_per_epoch} per epoch), warmup {warmup_steps}, "
                       f"{ctx.world_size} process(es) on {ctx.device}, amp {describe_amp(config.amp, amp_dtype, capability)}")
    return run


def check_matryoshka_dims(dims: Sequence[int], dimension: int, ctx: distributed.Context) -> None:
    """The widths must fit the model; leaving its own width out trains the full embedding only
    through its prefixes, which jhgan00's scripts and sentence-transformers allow with a warning."""
    if dims and dims[0] > dimension:
        raise UserInputError(f"--matryoshka_dims {dims[0]}: wider than the model's {dimension}-dimensional embedding")
    if dims and dims[0] != dimension:
        distributed.print0(ctx, f"warning: --matryoshka_dims leaves out the model's own width {dimension}: the full "
                                f"embedding is not trained as such (list {dimension} first to train it)")


def evaluate(encoder: SentenceEncoder, pairs: list, ctx: distributed.Context, batch_size: int,
             dims: Sequence[int] = ()) -> StsResult:
    """KorSTS figures (and those of each width in `dims`); with several ranks each encodes every
    W-th sentence and all get all figures."""

    class Sharded:
        def encode(self, sentences: Sequence[str], batch_size: int = 64, convert_to_numpy: bool = True) -> np.ndarray:
            mine = encoder.encode(list(sentences)[ctx.rank :: ctx.world_size], batch_size=batch_size, convert_to_numpy=True)
            return distributed.gather_strided(ctx, mine, len(sentences))

    return evaluate_sts(Sharded(), pairs, batch_size, dims)


def _by_dim(result: StsResult) -> dict[str, dict[str, float]]:
    return {str(dim): figures for dim, figures in result.by_dim.items()}  # JSON keys are strings


def say(run: Run, message: str) -> None:
    if run.ctx.is_main:  # through tqdm, so the progress bar is redrawn below the message
        from tqdm.auto import tqdm

        tqdm.write(message)


def best_metadata(config: TrainConfig, step: int, **figures: Any) -> dict[str, Any]:
    """best/kfdeb.json: the whole of it, written anew at every save (never merged into an earlier one,
    so a resumed run writes the same keys as an uninterrupted one); local paths by their names only."""
    config_values = public_config(config)
    return {"base_model": config_values["model_name_or_path"], "step": step, **figures, "config": config_values}


def evaluate_and_keep_best(run: Run, progress: Progress, epoch: int) -> None:
    started = time.perf_counter()
    dims = run.objective.matryoshka_dims
    result = evaluate(run.encoder, run.dev_pairs, run.ctx, run.config.eval_batch_size, dims)
    # Matryoshka: selected at the first width listed (jhgan00's choice), the full one when it is listed first
    score = best_score(result.figures_at(dims[0] if dims else None), run.config.metric_for_best)
    improved = score > progress.best_score  # NaN never improves; every rank has the same figures
    if improved:
        progress.best_score, progress.best_step = score, progress.step
        if run.ctx.is_main:  # the others go on and wait for rank 0 at their next collective
            run.encoder.save(run.best_dir, best_metadata(run.config, progress.step, dev=result.figures,
                                                          **({"dev_by_dim": _by_dim(result)} if dims else {})))
    run.log.write(step=progress.step, epoch=epoch, split="dev", score=score, best=improved, **result.figures)
    for dim in dims:  # one row per width; the row above is the full embedding's
        run.log.write(step=progress.step, epoch=epoch, split="dev", dim=dim, **result.by_dim[dim])
    if run.ctx.is_main:
        plot_curves(run.output_dir / "metrics.jsonl", run.output_dir / "curves.png")  # ~0.5 s: only with new dev points
    best = "best" if improved else f"best {progress.best_score:.2f} at step {progress.best_step}"
    widths = (f" at width {dims[0]}; cosine Spearman by width: "
              + ", ".join(f"{d} {result.by_dim[d]['cosine_spearman']:.2f}" for d in dims)) if dims else ""
    say(run, f"step {progress.step}: dev {run.config.metric_for_best} {score:.2f}{widths} ({best})")
    run.eval_seconds += time.perf_counter() - started


def save_state(run: Run, progress: Progress) -> None:
    """Resumable state of this step, committed atomically by rank 0 (checkpoint.py), every rank's RNG in it."""
    ctx = run.ctx
    rng_states = distributed.gather_objects(ctx, rng_state(ctx.device))  # sync: every rank is at this step
    if ctx.is_main:
        progress.metrics_bytes = run.log.size()
        scratch = checkpoint.begin(run.output_dir, progress.step)
        for rank, state in enumerate(rng_states):
            checkpoint.write_part(scratch, f"rank-{rank}", state)
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
    # no barrier: the other ranks go on and wait for rank 0 in the next step's gradient all-reduce
    # (bounded by --dist_timeout); none of them reads the state
    run.last_saved_step = progress.step


def _read_saved_state(run: Run, tensors: dict[str, torch.Tensor]) -> tuple[str, Any] | None:
    """Rank 0: the latest state's folder and its skeleton (checkpoint.split); its tensors go into `tensors`."""
    folder = checkpoint.latest(run.output_dir)
    if folder is None:
        return None
    saved = checkpoint.read_part(folder, "train")
    # a key the saved config lacks (saved by an older kfdeb) had its default value then
    was = {**TrainConfig().to_dict(), **saved["config"]}
    changed = [k for k, v in run.config.to_dict().items() if k not in RESUMABLE_CHANGES and was[k] != v]
    if changed:
        key = changed[0]
        raise UserInputError(f"--resume: {key} is {getattr(run.config, key)!r} but the saved run used {was[key]!r}")
    ranks = [checkpoint.read_part(folder, f"rank-{r}") if (folder / f"rank-{r}.json").exists() else None
             for r in range(saved["world_size"])]
    skeleton, found = checkpoint.split({"train": saved, "ranks": ranks})
    tensors.update(found)
    return str(folder), skeleton


def _check_rank0_holds_the_state(run: Run) -> None:
    """Without a shared disk, only the node that ran rank 0 has the state: it must be rank 0 again."""
    if not run.ctx.distributed:
        return
    latest = checkpoint.latest(run.output_dir)  # each rank looks at its own disk (read-only)
    seen = distributed.gather_objects(run.ctx, (socket.gethostname(), latest.name if latest else None))
    if seen[0][1] is None:
        holders = [(rank, host) for rank, (host, state) in enumerate(seen) if state is not None]
        if holders:
            rank, host = holders[0]
            raise UserInputError(
                f"--resume: global rank 0 (on {seen[0][0]}) finds no saved state in {run.output_dir}, but rank {rank} "
                f"(on {host}) does: start the job so that rank 0 runs on {host} (static rendezvous: --node_rank 0 "
                "there), or put --output_dir on storage every node sees"
            )


def start_or_resume(run: Run) -> Progress:
    """Step 0, or with --resume the latest state: rank 0 reads it and sends every rank its share."""
    ctx = run.ctx
    if run.config.resume:
        _check_rank0_holds_the_state(run)
    tensors: dict[str, torch.Tensor] = {}
    found = distributed.main_only(ctx, lambda: _read_saved_state(run, tensors)) if run.config.resume else None
    if found is None:
        if run.config.resume:
            distributed.print0(ctx, f"no saved state in {run.output_dir / checkpoint.STATE_DIR}: starting at step 0")
        run.log = MetricsLog(run.output_dir / "metrics.jsonl", ctx, None)
        return Progress()
    folder, skeleton = found
    state = checkpoint.join(skeleton, distributed.broadcast_tensors(ctx, tensors if ctx.is_main else None))
    saved = state["train"]
    run.encoder.load_state_dict(saved["model"])
    for optimizer, optimizer_state in zip(run.optimizers, saved["optimizers"]):
        optimizer.load_state_dict(optimizer_state)
    for scheduler, scheduler_state in zip(run.schedulers, saved["schedulers"]):
        scheduler.load_state_dict(scheduler_state)
    if run.scaler is not None and saved["scaler"] is not None:
        run.scaler.load_state_dict(saved["scaler"])
    for task in run.tasks:
        task.sampler.load_state_dict(saved["samplers"][task.name])
    ranks = state["ranks"]
    if ctx.rank < len(ranks) and ranks[ctx.rank] is not None:
        set_rng_state(ranks[ctx.rank], ctx.device)
    else:  # resumed with more ranks than saved: dropout masks differ from an uninterrupted run
        distributed.print0(ctx, f"note: saved with {saved['world_size']} ranks; new ranks start fresh RNG streams")
    progress = Progress(**saved["progress"])
    run.last_saved_step = progress.step
    run.log = MetricsLog(run.output_dir / "metrics.jsonl", ctx, progress.metrics_bytes)
    distributed.print0(ctx, f"resumed from {folder} at step {progress.step}")
    return progress


def _load_best_weights(run: Run) -> None:
    """Every rank's encoder gets the best model's weights, read from rank 0's disk only."""
    weights: dict[str, torch.Tensor] = {}

    def read() -> None:
        weights.update(load_encoder(run.best_dir, device="cpu").state_dict())

    distributed.main_only(run.ctx, read)
    run.encoder.load_state_dict(distributed.broadcast_tensors(run.ctx, weights if run.ctx.is_main else None))


def finish(run: Run, progress: Progress, train_seconds: float) -> dict[str, Any]:
    """Evaluate the best checkpoint on dev and test; write its metadata, the model card, the plot."""
    ctx = run.ctx
    if progress.best_step >= 0:
        _load_best_weights(run)
    elif ctx.is_main:  # every evaluation was NaN: keep the last weights
        run.encoder.save(run.best_dir, best_metadata(run.config, progress.step))
    dims = run.objective.matryoshka_dims
    dev = evaluate(run.encoder, run.dev_pairs, ctx, run.config.eval_batch_size, dims)
    test = evaluate(run.encoder, run.test_pairs, ctx, run.config.eval_batch_size, dims)
    summary = {"best_step": progress.best_step, "total_steps": run.total_steps, "dimension": run.encoder.dimension,
               "train_seconds": train_seconds, "eval_seconds": run.eval_seconds, "dev": dev.figures, "test": test.figures}
    if dims:
        summary.update(dev_by_dim=_by_dim(dev), test_by_dim=_by_dim(test))
    if ctx.is_main:
        run.log.write(step=progress.step, split="test", best_step=progress.best_step, **test.figures)
        for dim in dims:
            run.log.write(step=progress.step, split="test", dim=dim, best_step=progress.best_step, **test.by_dim[dim])
        best_step = progress.best_step if progress.best_step >= 0 else progress.step
        run.encoder.save(run.best_dir, best_metadata(
            run.config, best_step, best_step=progress.best_step, dev=dev.figures, test=test.figures,
            **{key: summary[key] for key in ("dev_by_dim", "test_by_dim") if key in summary}))
        write_model_card(run.best_dir, run.config, summary)
        plot_curves(run.output_dir / "metrics.jsonl", run.output_dir / "curves.png")
        name = run.output_dir.resolve().name
        rows = [table_row(f"{name} ({split})", result.figures) for split, result in (("dev", dev), ("test", test))]
        rows += [table_row(f"{name} ({split}, {dim} dims)", result.by_dim[dim])
                 for split, result in (("dev", dev), ("test", test)) for dim in dims]
        print(f"best model (step {progress.best_step}) in {run.best_dir}\n{TABLE_HEADER}\n" + "\n".join(rows), flush=True)
    # every rank leaves together: none tears the process group down while rank 0 still writes
    distributed.barrier(ctx)
    return summary
