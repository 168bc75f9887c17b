"""Each objective's data for a run: its examples read (or taken from the token cache), token ids, sampler.

- Reading (`read_task_texts`): NLI triplets of the recipe from KorNLI files or own files, or own
  anchor-positive pairs, less the rows --ir_dev_fraction holds out as the retrieval dev set
  (`held_out_dev_set`, held_out.py); STS scored pairs; KorSTS dev/test only where the run
  evaluates them (`read_sts_split`); each batch size checked against the world size (batch sizes
  are global).
- The token cache (token_cache.py): `examples_key` says what an objective's examples depend on
  (its files' fingerprints, the reader, the settings that change the rows); `task_examples` takes
  them from the cache, built on a miss by each node's local rank 0 while the node's other ranks
  wait, then memory-mapped by every rank; `task_tokens` does the same for their token ids. With
  --no_cache every rank reads and tokenizes in memory (`read_task_data`).
- `build_tasks`: each objective's rows, token ids and sampler (NLI: no duplicates; STS: shuffled),
  both drawing from `seed` alone, so every rank draws the same global batches; `Task.rank_batch`:
  a global batch as one rank trains on it (`Batch`).
- `check_nodes_agree`: before the first step, every rank's data (`data_fingerprint`) must equal
  rank 0's: nodes without a shared disk read their own copies.
"""

from __future__ import annotations

import json
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kfdeb import distributed, token_cache
from kfdeb.batching import NoDuplicatesBatches, ShuffledBatches, in_batch_examples, nli_triplets_of_files, shard
from kfdeb.config import TrainConfig, korsts_from_data_dir
from kfdeb.errors import UserInputError
from kfdeb.held_out import hold_out, retrieval_set
from kfdeb.ir_data import IrData, source_files, write_beir
from kfdeb.model import SentenceEncoder
from kfdeb.readers import (
    IN_BATCH_KINDS, ROW_KIND_NAMES, StsPair, expand_file_list, find_nli_files, read_nli, read_own_file,
    read_scored_file, read_sts, sts_path,
)
from kfdeb.token_cache import Examples, TokenTable

IR_DEV_SPLIT_DIR = "ir_dev_split"  # the run folder's copy of the --ir_dev_fraction dev set (BEIR, split dev)


@dataclass(frozen=True)
class Batch:
    """One objective's global batch, as this rank trains on it."""

    indices: list[int]  # the global batch: example numbers, as the sampler drew them
    rows: np.ndarray  # this rank's share (b x columns of text ids): the examples it embeds
    labels: torch.Tensor | None  # STS: this rank's scores / score_max (b), on the device
    keys: torch.Tensor | None  # NLI: the global batch's normalised-text ids (columns x B), on the device
    # this rank got no example (a short last STS batch with fewer pairs than ranks): it embeds one that counts
    # for nothing, so that every rank still joins DDP's gradient reduction (and the ranking loss's gather)
    placeholder: bool = False

    @property
    def size(self) -> int:
        """Examples in the global batch (the losses scale by it: losses.py)."""
        return len(self.indices)


@dataclass
class Task:
    """One objective's training examples as token ids, and its sampler."""

    name: str  # "nli" or "sts"
    rows: np.ndarray  # N x columns: text ids (NLI: anchor, positive, negative_1..n; STS: the pair)
    sequences: TokenTable  # token ids of every distinct text (sequences[i]: text i's), with the document prompt
    labels: np.ndarray | None  # STS: score / score_max
    sampler: NoDuplicatesBatches | ShuffledBatches
    batch_size: int
    anchor_sequences: TokenTable | None = None  # the anchors' ids with the query prompt, when it differs
    keys: np.ndarray | None = None  # NLI: N x columns normalised-text ids (the sampler's), for the loss's masks
    # --guide_model with a tokenizer of its own: the same (prompted) texts in its ids (None: the model's ids)
    guide_sequences: TokenTable | None = None
    guide_anchor_sequences: TokenTable | None = None
    texts: Any = None  # NLI: the distinct texts by text id (what --remine_every mines over: remine.py)
    remine_pool: Any = None  # --remine_every: remine.Pool, what every refresh mines over (None: off)
    negatives_refreshed: bool = False  # --remine_every replaced the negative columns: the state keeps them

    def token_ids(self, rows: np.ndarray, guide: bool = False) -> list[np.ndarray]:
        """The token ids of every text of `rows` (examples x columns), column by column (anchors first); guide:
        in the guide model's ids."""
        sequences, anchors = self.sequences, self.anchor_sequences
        if guide and self.guide_sequences is not None:
            sequences, anchors = self.guide_sequences, self.guide_anchor_sequences
        tables = [anchors or sequences] + [sequences] * (rows.shape[1] - 1)
        return [tables[column][i] for column in range(rows.shape[1]) for i in rows[:, column]]

    def rank_batch(self, indices: list[int], ctx: distributed.Context) -> Batch:
        """The global batch `indices` as this rank trains on it: its shard of the rows, its labels, the batch's keys
        (what the in-batch losses mask shared positives by)."""
        local = shard(indices, ctx.rank, ctx.world_size)
        placeholder = not local
        if placeholder:
            local = indices[:1]
        labels = keys = None
        if self.labels is not None:
            labels = torch.from_numpy(self.labels[local]).to(ctx.device, non_blocking=True)
        if self.keys is not None:
            keys = torch.from_numpy(np.ascontiguousarray(self.keys[indices].T)).to(ctx.device, torch.long, non_blocking=True)
        return Batch(indices, self.rows[local], labels, keys, placeholder)


def read_sts_split(config: TrainConfig, data_dir: Path, split: str) -> list[StsPair]:
    """Scored pairs of `split` (train, dev, test): the --sts_{split}_file if given, else data_dir's KorSTS file,
    which a run on own in-batch files alone evaluates only when asked (config.korsts_from_data_dir): else none."""
    flag = f"--sts_{split}_file"
    own = getattr(config, flag[2:])
    if own:
        return read_scored_file(own, flag, config.score_max)
    if split != "train" and not korsts_from_data_dir(config):
        return []
    return read_sts(sts_path(data_dir, split, instead=flag))


def all_own_in_batch_rows(config: TrainConfig, ctx: distributed.Context, quiet: bool = False) -> list[tuple[str, ...]]:
    """The --nli_train_files: triplets (recipe of the NLI pairs, then the given ones) or anchor-positive pairs."""
    files = [read_own_file(path, IN_BATCH_KINDS, "--nli_train_files")
             for path in expand_file_list(config.nli_train_files, "--nli_train_files")]
    for file in files if not quiet else ():
        distributed.print0(ctx, f"read {len(file.rows)} {ROW_KIND_NAMES[file.kind]} from {file.path}"
                           + (f" ({file.skipped_no_consensus} with gold label '-', not used)" if file.skipped_no_consensus else ""))
    return in_batch_examples(files, config.seed, "--nli_train_files", config.nli_triplet_scope)


def read_own_in_batch_rows(config: TrainConfig, ctx: distributed.Context) -> list[tuple[str, ...]]:
    """The rows the in-batch objective trains on: all of the --nli_train_files' rows, less the --ir_dev_fraction
    held out (held_out.py)."""
    rows = all_own_in_batch_rows(config, ctx)
    if not config.ir_dev_fraction:
        return rows
    training, held = hold_out(rows, config.ir_dev_fraction, config.seed)
    distributed.print0(ctx, f"--ir_dev_fraction {config.ir_dev_fraction}: {len(held)} of {len(rows)} rows held out "
                            "as the retrieval dev set")
    return [rows[i] for i in training]


def held_out_dev_set(config: TrainConfig, ctx: distributed.Context, output_dir: Path) -> IrData:
    """--ir_dev_fraction's retrieval dev set: the held-out anchors searching every distinct positive (held_out.py),
    written by rank 0 to output_dir/ir_dev_split/ (BEIR, split dev). Read here from the files again: the training
    rows may come from the token cache."""
    rows = all_own_in_batch_rows(config, ctx, quiet=True)
    _, held = hold_out(rows, config.ir_dev_fraction, config.seed)
    data = retrieval_set(f"{IR_DEV_SPLIT_DIR} (dev)", rows, held)

    def write() -> None:
        shutil.rmtree(output_dir / IR_DEV_SPLIT_DIR, ignore_errors=True)
        write_beir(data, output_dir / IR_DEV_SPLIT_DIR, "dev")

    distributed.main_only(ctx, write)
    return data


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
        if own and config.ir_dev_fraction:  # other rows (the key of a run without it stays as it was)
            settings["ir_dev_fraction"] = config.ir_dev_fraction
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


def data_fingerprint(config: TrainConfig, data_dir: Path, keys: dict[str, dict[str, Any]], tasks: list[Task],
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
        if own or korsts_from_data_dir(config):
            path = own or sts_path(data_dir, split, instead=f"--sts_{split}_file")
            found[f"{split} file"] = _file_digests([token_cache.file_fingerprint(path)])
    for which in ("dev", "test"):  # retrieval sets, evaluated sharded over the ranks like KorSTS
        source = getattr(config, f"ir_{which}_data")
        if source:
            files = source_files(source, getattr(config, f"ir_{which}_split"))
            found[f"retrieval {which} files"] = _file_digests([token_cache.file_fingerprint(path) for path in files])
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


def task_tokens(name: str, examples: Examples, encoder: SentenceEncoder, ctx: distributed.Context,
                prompt: str = "") -> TokenTable:
    """Token ids of the examples' distinct texts, `prompt` prepended to each: from the token cache beside the
    examples (built on a miss by each node's local rank 0 with the fast tokenizer's threads), or tokenized in
    memory."""
    if examples.folder is None:  # --no_cache: tokenized here, by every rank
        return TokenTable.from_tokenizer(examples.texts, prompted(encoder.tokenize, prompt))
    key = token_cache.tokenizer_fingerprint(encoder.tokenizer, encoder.do_lower_case, encoder.max_seq_length)
    if prompt:  # another text, other ids (the key without a prompt is the one kfdeb always used)
        key["prompt"] = prompt
    folder = token_cache.tokens_folder(examples.folder, key)

    def work() -> bool:
        _cache_note(ctx, f"{name.upper()} token ids", folder, key)
        return token_cache.ensure_tokens(folder, key, examples.texts, lambda: prompted(encoder.bulk_tokenizer(), prompt))

    built = distributed.each_node_first(ctx, work)
    _open_built(ctx, folder, key)
    distributed.print0(ctx, f"{name.upper()}: token ids {'built' if built else 'from the token cache (hit)'}: {folder}")
    return token_cache.open_tokens(folder)


def prompted(tokenize: Any, prompt: str) -> Any:
    return tokenize if not prompt else (lambda texts: tokenize([prompt + text for text in texts]))


def build_tasks(config: TrainConfig, examples: dict[str, Examples], encoder: SentenceEncoder,
                ctx: distributed.Context, prompts: tuple[str, str] = ("", ""),
                guide: SentenceEncoder | None = None) -> list[Task]:
    """Each objective's token ids (`task_tokens`; the in-batch objective's anchors with the query prompt, its
    other columns with the document prompt) and sampler. The samplers compare the texts without prompts.
    A `guide` (--guide_model PATH; self shares the model's ids) gets the in-batch texts in its own ids too (the
    same prompted texts, as the reference's guide reads the training batch's; the token cache keeps them beside
    the model's, under its tokenizer's fingerprint)."""
    tasks = []
    for name, data in examples.items():
        batch_size = config.nli_batch_size if name == "nli" else config.sts_batch_size
        rows = data.rows
        query_prompt, document_prompt = prompts if name == "nli" else ("", "")  # KorSTS pairs: no prompt
        if name == "nli":
            sampler: NoDuplicatesBatches | ShuffledBatches = NoDuplicatesBatches.from_keys(data.keys, batch_size, config.seed)
        else:  # its own random stream (data.random_stream): independent of the NLI sampler's
            sampler = ShuffledBatches(len(rows), batch_size, config.seed)
        sequences = task_tokens(name, data, encoder, ctx, document_prompt)
        anchors = task_tokens(name, data, encoder, ctx, query_prompt) if query_prompt != document_prompt else None
        task = Task(name, rows, sequences, data.labels, sampler, batch_size, anchors,
                    keys=data.keys if name == "nli" else None, texts=data.texts if name == "nli" else None)
        if name == "nli" and guide is not None:
            task.guide_sequences = task_tokens(name, data, guide, ctx, document_prompt)
            task.guide_anchor_sequences = (task_tokens(name, data, guide, ctx, query_prompt)
                                           if query_prompt != document_prompt else None)
        tasks.append(task)
        what = {2: "pairs", 3: "triplets"}.get(rows.shape[1], f"{rows.shape[1]}-tuples")
        distributed.print0(ctx, f"{name.upper()}: {len(rows)} {what}, {len(sampler)} batches of {batch_size}")
    return tasks
