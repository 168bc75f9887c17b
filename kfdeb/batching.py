"""Batching: the NLI triplets of the reference recipe, random streams, samplers, shards and padding.

Triplets (`nli_triplets`), built over one set of NLI pairs at a time. Both directions of every pair
are added to a partner table: partners[s][label] for s in {sentence1, sentence2}. Every sentence s
with at least one entailment and one contradiction partner yields
    (s, e1, c1) and (e2, s, c2),   e ~ U(entailment partners), c ~ U(contradiction partners),
drawn in that order. With several training files the reference (`load_kor_nli_samples` per file,
lists concatenated) builds the triplets file by file: a sentence found in two files is an anchor in
each, with that file's partners only. That is the default (scope "per_file"); scope "union" builds
one table over all files' pairs instead (one pair of triplets per sentence, partners pooled). Files
are taken in sorted order and one generator serves them all, as the reference's one `random` stream
does. `in_batch_examples` gives the in-batch objective's rows from own files: the recipe triplets of
all NLI pairs, then the given triplets in file order; or pairs alone (a row kind the loss cannot
mix with triplets).

Random streams: every draw of the data pipeline (triplet partners; each sampler pass's
permutation) comes from `random_stream(seed, stream, pass)`, a generator of its own. numpy's
SeedSequence pads short entropy with zeros, so default_rng(s), default_rng([s]) and
default_rng([s, 0]) are one and the same stream; spawn keys are kept apart from the entropy, so
no two (seed, stream, pass) share one, within a run or across seeds.

Text ids (`number_texts`, the one place texts are numbered; the token cache stores what it
returns): the distinct texts of the examples, numbered in order of first appearance; and for the
no-duplicates sampler, the ids of their normalised forms (strip().lower()).

Samplers (pure index arithmetic, state = two integers, so resume is exact):
- `NoDuplicatesBatches`: the legacy NoDuplicatesDataLoader, with one relaxation. A read pointer walks
  a permutation; an example with a normalised text already in the batch being built is passed over
  (it comes back on a later pass); when the pointer wraps, the next pass uses a fresh permutation.
  len = floor(N / batch_size) full batches. Pass p's permutation is a pure function of (seed, p),
  so a position is (pass, pointer). The normalised texts are compared as integer ids.
  The relaxation: a row's positive may be another row's positive (column 1 against column 1 only;
  anchors and negatives stay unique, and no positive may be another row's anchor or negative).
  FAQ data has many questions for one answer: the legacy rule passed over a question whose answer
  was already in the batch (at large batches, much of a popular answer's questions, every pass),
  and stopped with "cannot fill" when the data had fewer distinct answers than a batch has rows.
  The in-batch losses mask such shared positives instead (losses.py: rows that share a positive are
  never negatives of each other), so the repeats cost no false negatives. Data without repeated
  positives get exactly the legacy batches (the recipe's triplets rarely repeat one: 2 of XNLI
  dev's 1,660 rows share a positive). sentence-transformers' NoDuplicatesBatchSampler keeps every
  value of a batch unique (positives too), defers conflicting rows within a pass and yields short
  batches at a pass's end; its MultipleNegativesRankingLoss masks nothing (a repeated positive
  would be a negative), its GISTEmbedLoss only what the guide scores above the positive.
- `ShuffledBatches`: a DataLoader(shuffle=True, drop_last=False): pass p is a permutation of
  (seed, p) cut into ceil(N / batch_size) batches, the last one possibly short.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from kfdeb.errors import UserInputError
from kfdeb.readers import NLI_LABELS, ROW_KIND_NAMES, OwnFile, Triplet

NLI_TRIPLET_SCOPES = ("per_file", "union")  # nli_triplets_of_files
STREAM_TRIPLETS, STREAM_NLI_BATCHES, STREAM_STS_BATCHES = 0, 1, 2  # random_stream's `stream`


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


def in_batch_examples(files: Sequence[OwnFile], seed: int, flag: str, scope: str = "per_file") -> list[tuple[str, ...]]:
    """The in-batch negatives objective's rows: (anchor, positive, negative_1 .. negative_n) with one n for
    all (the recipe triplets of the NLI pairs, `scope` as in nli_triplets_of_files, then the given triplets and
    n-tuples in file order: n = 1 for triplets), or anchor-positive pairs alone (n = 0)."""
    pair_files = [f for f in files if f.kind == "pair"]
    triplet_files = [f for f in files if f.kind != "pair"]
    if pair_files and triplet_files:
        raise UserInputError(
            f"{flag}: {pair_files[0].path} holds anchor-positive pairs but {triplet_files[0].path} holds "
            f"{ROW_KIND_NAMES[triplet_files[0].kind]} (triplets for the loss): one objective's rows must all be "
            "pairs or all be triplets; train on them in separate runs, or add a negative column to the pairs"
        )
    if pair_files:
        return [row for f in pair_files for row in f.rows]
    widths = {f.path: (3 if f.kind == "nli" else len(f.rows[0])) for f in triplet_files}
    if len(set(widths.values())) > 1:
        ordered = sorted(widths.items(), key=lambda item: item[1])
        (first, n), (other, m) = ordered[0], ordered[-1]
        raise UserInputError(f"{flag}: {first} gives {n - 2} negative(s) a row but {other} gives {m - 2}: one "
                             "objective's rows must all have the same number of negatives")
    recipe = nli_triplets_of_files([f.rows for f in files if f.kind == "nli"], seed, scope)
    return recipe + [tuple(t) for f in files if f.kind in ("triplet", "tuple") for t in f.rows]


def number_texts(examples: Sequence[Sequence[str]]) -> tuple[np.ndarray, list[str]]:
    """(rows: examples x columns int32 text ids, texts: the distinct texts by id), ids in order of first appearance."""
    columns = len(examples[0]) if len(examples) else 0
    index: dict[str, int] = {}
    rows = np.fromiter((index.setdefault(text, len(index)) for example in examples for text in example),
                       dtype=np.int32, count=len(examples) * columns).reshape(len(examples), columns)
    return rows, list(index)


def normalised_keys(rows: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    """rows' text ids mapped to ids of the normalised texts (strip().lower()): what NoDuplicatesBatches keeps apart."""
    normalised: dict[str, int] = {}
    key_of_text = np.fromiter((normalised.setdefault(text.strip().lower(), len(normalised)) for text in texts),
                              dtype=np.int32, count=len(texts))
    return key_of_text[rows]


def _permutation(n: int, seed: int, stream: int, pass_index: int) -> np.ndarray:
    return random_stream(seed, stream, pass_index).permutation(n)


class NoDuplicatesBatches:
    """Batches of example indices with no normalised text twice in a batch, positives excepted (module docstring)."""

    def __init__(self, texts: Sequence[Sequence[str]], batch_size: int, seed: int):
        self._start(normalised_keys(*number_texts(texts)), batch_size, seed)

    @classmethod
    def from_keys(cls, keys: np.ndarray, batch_size: int, seed: int) -> "NoDuplicatesBatches":
        """The sampler of examples whose texts are given as integer ids of their normalised forms
        (examples x columns, e.g. memory-mapped from the token cache): the batches of the texts."""
        sampler = cls.__new__(cls)
        sampler._start(keys, batch_size, seed)
        return sampler

    def _start(self, keys: np.ndarray, batch_size: int, seed: int) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if len(keys) < batch_size:
            raise UserInputError(f"only {len(keys)} in-batch rows (NLI triplets or own pairs/n-tuples), fewer than "
                                 f"one batch of {batch_size}")
        self.keys = keys  # only which keys are equal matters, not their values
        self.batch_size, self.seed = batch_size, seed
        self.pass_index, self.pointer = 0, 0
        self._order = _permutation(len(self.keys), seed, STREAM_NLI_BATCHES, 0)

    def __len__(self) -> int:
        return len(self.keys) // self.batch_size

    def next_batch(self) -> list[int]:
        batch: list[int] = []
        positives: set[int] = set()  # the batch's positives: may repeat as positives (module docstring)
        others: set[int] = set()  # its anchors and negatives: never repeat
        visited = 0
        while len(batch) < self.batch_size:
            index = int(self._order[self.pointer])
            keys = self.keys[index].tolist()
            positive, rest = keys[1], keys[:1] + keys[2:]
            if positive not in others and others.isdisjoint(rest) and positives.isdisjoint(rest):
                batch.append(index)
                positives.add(positive)
                others.update(rest)
            self.pointer += 1
            visited += 1
            if self.pointer == len(self._order):
                self.pass_index, self.pointer = self.pass_index + 1, 0
                self._order = _permutation(len(self.keys), self.seed, STREAM_NLI_BATCHES, self.pass_index)
            if visited > 2 * len(self.keys) + self.batch_size:
                raise UserInputError(
                    f"cannot fill an NLI batch of {self.batch_size} without repeating a sentence (only positives "
                    f"may repeat): the {len(self.keys)} rows (NLI triplets or own pairs/n-tuples) have too few "
                    f"distinct texts; lower --nli_batch_size"
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
