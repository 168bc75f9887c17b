"""KorNLU data: strict TSV readers, the NLI triplets of the reference recipe, samplers, collate.

Files (github.com/kakaobrain/kor-nlu-datasets, CC BY-SA 4.0) are tab-separated with a header
row and no quoting: a `"` is an ordinary character (csv.QUOTE_NONE). A UTF-8 BOM and CRLF line
ends are accepted; anything else that is wrong stops the run with `file:line: field: problem`.

- KorSTS (genre filename year id score sentence1 sentence2) -> pairs with label = score / 5.
- KorNLI (sentence1 sentence2 gold_label) -> triplets, built over one set of pairs at a time.
  Both directions of every pair are added to a partner table: partners[s][label] for s in
  {sentence1, sentence2}. Every sentence s with at least one entailment and one contradiction
  partner yields
      (s, e1, c1) and (e2, s, c2),   e ~ U(entailment partners), c ~ U(contradiction partners),
  drawn in that order. With several training files the reference (`load_kor_nli_samples` per
  file, lists concatenated) builds the triplets file by file: a sentence found in two files is an
  anchor in each, with that file's partners only. That is the default (scope "per_file"); scope
  "union" builds one table over all files' pairs instead (one pair of triplets per sentence,
  partners pooled). Files are taken in sorted order and one generator serves them all, as the
  reference's one `random` stream does. SNLI marks pairs without annotator consensus with
  gold_label "-": they carry no label, are not used, and are counted (never dropped silently).

Random streams: every draw of the data pipeline (triplet partners; each sampler pass's
permutation) comes from `random_stream(seed, stream, pass)`, a generator of its own. numpy's
SeedSequence pads short entropy with zeros, so default_rng(s), default_rng([s]) and
default_rng([s, 0]) are one and the same stream; spawn keys are kept apart from the entropy, so
no two (seed, stream, pass) share one, within a run or across seeds.

Samplers (pure index arithmetic, state = two integers, so resume is exact):
- `NoDuplicatesBatches`: the legacy NoDuplicatesDataLoader. A read pointer walks a permutation;
  an example whose normalised text (strip().lower()) is already in the batch being built is
  passed over (it comes back on a later pass); when the pointer wraps, the next pass uses a
  fresh permutation. len = floor(N / batch_size) full batches. Pass p's permutation is a pure
  function of (seed, p), so a position is (pass, pointer).
- `ShuffledBatches`: a DataLoader(shuffle=True, drop_last=False): pass p is a permutation of
  (seed, p) cut into ceil(N / batch_size) batches, the last one possibly short.
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch

from kfdeb.config import NLI_TRIPLET_SCOPES
from kfdeb.errors import UserInputError

BUNDLED_DATA_DIR = Path(__file__).resolve().parent / "bundled" / "kor-nlu"
STS_COLUMNS = ("score", "sentence1", "sentence2")
NLI_COLUMNS = ("sentence1", "sentence2", "gold_label")
NLI_LABELS = ("entailment", "neutral", "contradiction")
NLI_NO_CONSENSUS = "-"
STREAM_TRIPLETS, STREAM_NLI_BATCHES, STREAM_STS_BATCHES = 0, 1, 2  # random_stream's `stream`
KORNLU_CLONE = "git clone https://github.com/kakaobrain/kor-nlu-datasets"


class StsPair(NamedTuple):
    sentence1: str
    sentence2: str
    label: float  # score / 5, in [0, 1]


class Triplet(NamedTuple):
    anchor: str
    positive: str
    negative: str


def read_tsv(path: str | os.PathLike, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, {column: field}) for every data row; header names locate the columns."""
    path = str(path)
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise UserInputError(f"{path}: cannot open ({err.strerror})") from None
    with handle:
        header: list[str] | None = None
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserInputError(
                    f"{path}:{line_no}: not valid UTF-8 (byte {err.start}: {raw[err.start:err.start + 1]!r})"
                ) from None
            if line_no == 1 and line.startswith("\ufeff"):
                line = line[1:]
            line = line.rstrip("\n").rstrip("\r")
            fields = line.split("\t")
            if header is None:
                header = fields
                missing = [name for name in required if name not in header]
                if missing:
                    raise UserInputError(
                        f"{path}:1: header: missing column {missing[0]!r} (header has {', '.join(header)})"
                    )
                continue
            if line == "" and fields == [""]:
                raise UserInputError(f"{path}:{line_no}: empty line (expected {len(header)} tab-separated fields)")
            if len(fields) != len(header):
                where = header[len(fields)] if len(fields) < len(header) else f"field {len(header) + 1}"
                raise UserInputError(
                    f"{path}:{line_no}: {where}: expected {len(header)} tab-separated fields, found {len(fields)}"
                )
            yield line_no, dict(zip(header, fields))
        if header is None:
            raise UserInputError(f"{path}:1: header: file is empty")


def _sentence(path: str, line_no: int, row: dict[str, str], column: str) -> str:
    text = row[column].strip()
    if not text:
        raise UserInputError(f"{path}:{line_no}: {column}: empty sentence")
    return text


def read_sts(path: str | os.PathLike) -> list[StsPair]:
    """KorSTS pairs; label = score / 5 (score must be a number in 0..5)."""
    pairs = []
    for line_no, row in read_tsv(path, STS_COLUMNS):
        try:
            score = float(row["score"])
        except ValueError:
            raise UserInputError(f"{path}:{line_no}: score: not a number: {row['score']!r}") from None
        if not 0.0 <= score <= 5.0:  # also rejects nan
            raise UserInputError(f"{path}:{line_no}: score: {row['score']!r} is outside 0..5")
        pairs.append(
            StsPair(_sentence(path, line_no, row, "sentence1"), _sentence(path, line_no, row, "sentence2"), score / 5.0)
        )
    if not pairs:
        raise UserInputError(f"{path}:2: score: no data rows")
    return pairs


@dataclass
class NliPairs:
    pairs: list[tuple[str, str, str]]  # (sentence1, sentence2, gold_label)
    skipped_no_consensus: int


def read_nli(path: str | os.PathLike) -> NliPairs:
    """KorNLI pairs with their gold label; gold_label "-" (no consensus) rows are counted, not used."""
    pairs, skipped = [], 0
    for line_no, row in read_tsv(path, NLI_COLUMNS):
        label = row["gold_label"].strip()
        if label == NLI_NO_CONSENSUS:
            skipped += 1
            continue
        if label not in NLI_LABELS:
            raise UserInputError(
                f"{path}:{line_no}: gold_label: unknown label {row['gold_label']!r} (expected one of {', '.join(NLI_LABELS)})"
            )
        pairs.append((_sentence(path, line_no, row, "sentence1"), _sentence(path, line_no, row, "sentence2"), label))
    return NliPairs(pairs, skipped)


def find_nli_files(data_dir: str | os.PathLike, pattern: str) -> list[Path]:
    """The KorNLI training files matching `pattern` under `data_dir`, sorted; none found is an error."""
    files = sorted(Path(p) for p in glob.glob(str(Path(data_dir) / pattern)))
    if not files:
        raise UserInputError(
            f"{Path(data_dir) / pattern}: no KorNLI training file matches; get them with `{KORNLU_CLONE}` "
            f"and pass --data_dir, or use the bundled ones: --data_dir {BUNDLED_DATA_DIR} --nli_train_glob 'KorNLI/xnli.*.ko.tsv'"
        )
    return files


def random_stream(seed: int, stream: int, pass_index: int = 0) -> np.random.Generator:
    """The generator of one kind of draw (STREAM_*) in one pass, for a run seeded with `seed`."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, pass_index)))


def nli_triplets(pairs: Sequence[tuple[str, str, str]], seed: int | np.random.Generator) -> list[Triplet]:
    """(anchor, entailment, contradiction) triplets of one set of pairs (see the module docstring).

    `seed`: a run seed (its triplet stream is used) or a generator to draw from and advance.
    """
    # dicts as ordered sets: the draws below depend on partner order, and set order depends on
    # PYTHONHASHSEED, so the reference's own triplets were not reproducible; ours are.
    partners: dict[str, dict[str, dict[str, None]]] = {}
    for first, second, label in pairs:
        for sentence, partner in ((first, second), (second, first)):
            partners.setdefault(sentence, {name: {} for name in NLI_LABELS})[label][partner] = None
    rng = seed if isinstance(seed, np.random.Generator) else random_stream(seed, STREAM_TRIPLETS)

    def draw(options: dict[str, None]) -> str:
        keys = list(options)
        return keys[int(rng.integers(len(keys)))]

    triplets = []
    for sentence, by_label in partners.items():
        entailments, contradictions = by_label["entailment"], by_label["contradiction"]
        if entailments and contradictions:
            triplets.append(Triplet(sentence, draw(entailments), draw(contradictions)))
            triplets.append(Triplet(draw(entailments), sentence, draw(contradictions)))
    return triplets


def nli_triplets_of_files(pairs_per_file: Sequence[Sequence[tuple[str, str, str]]], seed: int,
                          scope: str = "per_file") -> list[Triplet]:
    """The triplets of several files' pairs: file by file, concatenated (per_file), or over their union."""
    rng = random_stream(seed, STREAM_TRIPLETS)
    if scope == "per_file":
        return [t for pairs in pairs_per_file for t in nli_triplets(pairs, rng)]
    if scope == "union":
        return nli_triplets([p for pairs in pairs_per_file for p in pairs], rng)
    raise ValueError(f"scope must be one of {NLI_TRIPLET_SCOPES}, not {scope!r}")


def _permutation(n: int, seed: int, stream: int, pass_index: int) -> np.ndarray:
    return random_stream(seed, stream, pass_index).permutation(n)


class NoDuplicatesBatches:
    """Batches of example indices with no normalised text twice in a batch (see module docstring)."""

    def __init__(self, texts: Sequence[Sequence[str]], batch_size: int, seed: int):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if len(texts) < batch_size:
            raise UserInputError(f"only {len(texts)} NLI triplets, fewer than one batch of {batch_size}")
        ids: dict[str, int] = {}
        self.keys = [tuple(ids.setdefault(t.strip().lower(), len(ids)) for t in example) for example in texts]
        self.batch_size, self.seed = batch_size, seed
        self.pass_index, self.pointer = 0, 0
        self._order = _permutation(len(self.keys), seed, STREAM_NLI_BATCHES, 0)

    def __len__(self) -> int:
        return len(self.keys) // self.batch_size

    def next_batch(self) -> list[int]:
        batch: list[int] = []
        in_batch: set[int] = set()
        visited = 0
        while len(batch) < self.batch_size:
            index = int(self._order[self.pointer])
            keys = self.keys[index]
            if in_batch.isdisjoint(keys):
                batch.append(index)
                in_batch.update(keys)
            self.pointer += 1
            visited += 1
            if self.pointer == len(self._order):
                self.pass_index, self.pointer = self.pass_index + 1, 0
                self._order = _permutation(len(self.keys), self.seed, STREAM_NLI_BATCHES, self.pass_index)
            if visited > 2 * len(self.keys) + self.batch_size:
                raise UserInputError(
                    f"cannot fill an NLI batch of {self.batch_size} without repeating a sentence: the "
                    f"{len(self.keys)} triplets have too few distinct texts; lower --nli_batch_size"
                )
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"pass_index": self.pass_index, "pointer": self.pointer}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pass_index, self.pointer = int(state["pass_index"]), int(state["pointer"])
        self._order = _permutation(len(self.keys), self.seed, STREAM_NLI_BATCHES, self.pass_index)


class ShuffledBatches:
    """Shuffled batches of example indices, last batch of a pass possibly short (see module docstring)."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if num_examples < 1:
            raise UserInputError("no STS training pairs")
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.pass_index, self.batch_index = 0, 0
        self._order = _permutation(num_examples, seed, STREAM_STS_BATCHES, 0)

    def __len__(self) -> int:
        return math.ceil(self.num_examples / self.batch_size)

    def next_batch(self) -> list[int]:
        start = self.batch_index * self.batch_size
        batch = [int(i) for i in self._order[start : start + self.batch_size]]
        self.batch_index += 1
        if self.batch_index == len(self):
            self.load_state_dict({"pass_index": self.pass_index + 1, "batch_index": 0})
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"pass_index": self.pass_index, "batch_index": self.batch_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pass_index, self.batch_index = int(state["pass_index"]), int(state["batch_index"])
        self._order = _permutation(self.num_examples, self.seed, STREAM_STS_BATCHES, self.pass_index)


def shard(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s contiguous slice of a global batch; sizes differ by at most one (short last batches)."""
    base, extra = divmod(len(batch), world_size)
    start = rank * base + min(rank, extra)
    return list(batch[start : start + base + (rank < extra)])


def length_sorted_chunks(
    sequences: Sequence[Sequence[int]], chunk_size: int, pad_id: int, pad_to_multiple_of: int = 1
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Split sequences into chunks of similar length, longest first, each padded on its own.

    Returns (input_ids per chunk, attention_mask per chunk, restore): concatenating the chunks'
    rows and indexing with `restore` gives back the input order. A sentence's embedding does not
    depend on what else is in its batch, so grouping by length changes no result, only how much
    padding is computed (a training batch of 3 x 64 NLI sentences pads ~40% less than one padded
    block, and attention's cost grows with the square of the padded length).
    """
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))  # longest first
    chunks = [pad_batch([sequences[i] for i in order[start : start + chunk_size]], pad_id, pad_to_multiple_of)
              for start in range(0, len(order), chunk_size)]
    restore = torch.empty(len(order), dtype=torch.long)
    restore[torch.as_tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return [ids for ids, _ in chunks], [mask for _, mask in chunks], restore


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, pad_to_multiple_of: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token-id lists to the longest one (rounded up to a multiple): (input_ids, attention_mask)."""
    longest = max((len(s) for s in sequences), default=1)
    width = -(-max(longest, 1) // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask
