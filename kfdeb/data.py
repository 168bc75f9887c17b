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

Your own data (`read_own_file`): files by path, the format by extension, the row kind by the
columns (.tsv, .csv header) or keys (.jsonl, every object):
- .tsv: as KorNLU above. .csv: RFC 4180 (header row, `,` separator, `"`-quoted fields with `""`
  for a quote, line breaks allowed inside quotes; a `"` inside an unquoted field or after a closing
  quote is an error). .jsonl: one JSON object a line; other keys are ignored.
- sentence1, sentence2, gold_label: NLI pairs (the triplets of the recipe, as KorNLI);
  anchor, positive, negative: triplets as they are; anchor, positive: pairs (in-batch negatives
  without a hard negative); sentence1, sentence2, score: scored pairs, label = score / score_max.
- The in-batch negatives objective takes NLI pairs, triplets and pairs (`in_batch_examples`): the
  recipe triplets of all NLI pairs, then the given triplets in file order; or pairs alone (a row
  kind the loss cannot mix with triplets). The STS objective and evaluation take scored pairs.
Same strictness as KorNLU: UTF-8 (BOM accepted), LF or CRLF, every problem `file:line: field: problem`.

Samplers (pure index arithmetic, state = two integers, so resume is exact):
- `NoDuplicatesBatches`: the legacy NoDuplicatesDataLoader. A read pointer walks a permutation;
  an example whose normalised text (strip().lower()) is already in the batch being built is
  passed over (it comes back on a later pass); when the pointer wraps, the next pass uses a
  fresh permutation. len = floor(N / batch_size) full batches. Pass p's permutation is a pure
  function of (seed, p), so a position is (pass, pointer). The normalised texts are compared as
  integer ids (examples x columns): numbered from the texts, or read from the token cache
  (`from_keys`, token_cache.py), which numbers them the same way.
- `ShuffledBatches`: a DataLoader(shuffle=True, drop_last=False): pass p is a permutation of
  (seed, p) cut into ceil(N / batch_size) batches, the last one possibly short.
"""

from __future__ import annotations

import glob
import itertools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

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
    label: float  # score / score_max (5 for KorSTS), in [0, 1]


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
            yield line_no, _table_row(path, line_no, header, fields, "tab-separated")
        if header is None:
            raise UserInputError(f"{path}:1: header: file is empty")


def _table_row(path: str, line_no: int, header: list[str], fields: list[str], separated: str) -> dict[str, str]:
    """{column: field} of a .tsv or .csv data row, which must have as many fields as the header."""
    if fields == [""]:
        raise UserInputError(f"{path}:{line_no}: empty line (expected {len(header)} {separated} fields)")
    if len(fields) != len(header):
        where = header[len(fields)] if len(fields) < len(header) else f"field {len(header) + 1}"
        raise UserInputError(f"{path}:{line_no}: {where}: expected {len(header)} {separated} fields, found {len(fields)}")
    return dict(zip(header, fields))


def _field_text(path: str, line_no: int, row: dict[str, Any], column: str) -> str:
    value = row[column]
    if not isinstance(value, str):  # a .jsonl value that is a number, null, list or object
        raise UserInputError(f"{path}:{line_no}: {column}: expected a string, got {json.dumps(value, ensure_ascii=False)}")
    return value


def _sentence(path: str, line_no: int, row: dict[str, Any], column: str) -> str:
    text = _field_text(path, line_no, row, column).strip()
    if not text:
        raise UserInputError(f"{path}:{line_no}: {column}: empty sentence")
    return text


def scored_pairs_from_rows(path: str | os.PathLike, rows: Iterable[tuple[int, dict[str, Any]]],
                           score_max: float) -> list[StsPair]:
    """Pairs with label = score / score_max (score must be a number in 0..score_max)."""
    pairs = []
    for line_no, row in rows:
        value = row["score"]
        shown = repr(value) if isinstance(value, str) else json.dumps(value)
        try:
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):  # .jsonl true, null, [...]
                raise ValueError
            score = float(value)
        except ValueError:
            raise UserInputError(f"{path}:{line_no}: score: not a number: {shown}") from None
        if not 0.0 <= score <= score_max:  # also rejects nan
            raise UserInputError(f"{path}:{line_no}: score: {shown} is outside 0..{score_max:g}")
        pairs.append(StsPair(_sentence(path, line_no, row, "sentence1"), _sentence(path, line_no, row, "sentence2"),
                             score / score_max))
    if not pairs:
        raise UserInputError(f"{path}:2: score: no data rows")
    return pairs


def read_sts(path: str | os.PathLike) -> list[StsPair]:
    """KorSTS pairs; label = score / 5 (score must be a number in 0..5)."""
    return scored_pairs_from_rows(path, read_tsv(path, STS_COLUMNS), 5.0)


@dataclass
class NliPairs:
    pairs: list[tuple[str, str, str]]  # (sentence1, sentence2, gold_label)
    skipped_no_consensus: int


def read_nli(path: str | os.PathLike) -> NliPairs:
    """KorNLI pairs with their gold label; gold_label "-" (no consensus) rows are counted, not used."""
    return nli_pairs_from_rows(path, read_tsv(path, NLI_COLUMNS))


def nli_pairs_from_rows(path: str | os.PathLike, rows: Iterable[tuple[int, dict[str, Any]]]) -> NliPairs:
    """NLI pairs of (line number, row) items, as `read_nli` reads them from a KorNLI file."""
    pairs, skipped = [], 0
    for line_no, row in rows:
        label = _field_text(path, line_no, row, "gold_label").strip()
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
        ids: dict[str, int] = {}
        self._start(np.array([[ids.setdefault(t.strip().lower(), len(ids)) for t in example] for example in texts],
                             dtype=np.int64), batch_size, seed)

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
            raise UserInputError(f"only {len(keys)} NLI triplets, fewer than one batch of {batch_size}")
        self.keys = keys  # only which keys are equal matters, not their values
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
            keys = self.keys[index].tolist()
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


# Your own data: .tsv, .csv and .jsonl files of NLI pairs, triplets, pairs and scored pairs ----------

OWN_FORMATS = (".tsv", ".csv", ".jsonl")
ROW_KINDS: dict[str, tuple[str, ...]] = {  # a kind's columns (.tsv, .csv) or keys (.jsonl)
    "nli": NLI_COLUMNS,
    "triplet": ("anchor", "positive", "negative"),
    "pair": ("anchor", "positive"),
    "scored": ("sentence1", "sentence2", "score"),
}
ROW_KIND_NAMES = {"nli": "NLI pairs", "triplet": "triplets", "pair": "anchor-positive pairs", "scored": "scored pairs"}
IN_BATCH_KINDS = ("nli", "triplet", "pair")  # in this order: a triplet file also has a pair's columns
SCORED_KINDS = ("scored",)
# .csv: a quoted field (`""` is a quote inside it; unrolled so an unclosed quote fails in linear time)
# and an unquoted one (up to the next separator, quote or line end)
_CSV_QUOTED = re.compile(r'"([^"]*(?:""[^"]*)*)"')
_CSV_PLAIN = re.compile(r'[^,"\r\n]*')


@dataclass
class OwnFile:
    """One of the user's files, read: its row kind and its rows."""

    path: str
    kind: str  # a key of ROW_KINDS
    rows: list  # nli: (sentence1, sentence2, gold_label); triplet: Triplet; pair: (anchor, positive); scored: StsPair
    skipped_no_consensus: int = 0  # nli: gold_label "-" rows, counted and not used


def _decoded_text(path: str) -> str:
    """The whole file as text: UTF-8, a leading BOM removed; a bad byte is reported with its line."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise UserInputError(f"{path}: cannot open ({err.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_no, line_start = data.count(b"\n", 0, err.start) + 1, data.rfind(b"\n", 0, err.start) + 1
        raise UserInputError(
            f"{path}:{line_no}: not valid UTF-8 (byte {err.start - line_start}: {data[err.start:err.start + 1]!r})"
        ) from None
    return text.removeprefix("\ufeff")


def read_csv(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (first line of the record, {column: field}) for every data row of an RFC 4180 CSV file."""
    path = str(path)
    text = _decoded_text(path)
    header: list[str] | None = None
    line_no, pos, end = 1, 0, len(text)
    while pos < end:
        first_line, fields = line_no, []
        while True:  # one field per turn, then what ends it: a separator, a line end or the end of the file
            if header is None:
                column = "header"
            else:
                column = header[len(fields)] if len(fields) < len(header) else f"field {len(fields) + 1}"
            quoted = text.startswith('"', pos)
            match = (_CSV_QUOTED if quoted else _CSV_PLAIN).match(text, pos)
            # a quoted field followed by a quote: the pattern fell back from `""` pairs because no
            # closing quote came before the end of the file
            if match is None or (quoted and text.startswith('"', match.end())):
                raise UserInputError(f"{path}:{line_no}: {column}: quoted field not closed before the end of the "
                                     "file (a quote inside a quoted field is written \"\")")
            fields.append(match.group(1).replace('""', '"') if quoted else match.group(0))
            line_no += match.group(0).count("\n")
            pos = match.end()
            if pos == end:
                break
            if text[pos] == ",":
                pos += 1
                continue
            if text.startswith("\n", pos) or text.startswith("\r\n", pos):
                pos += 1 if text[pos] == "\n" else 2
                line_no += 1
                break
            if quoted:
                problem = f"{text[pos]!r} after the closing quote (expected a comma or the end of the line)"
            elif text[pos] == '"':
                problem = "a quote inside an unquoted field (quote the whole field and write the quote as \"\")"
            else:
                problem = "a carriage return that does not end the line"
            raise UserInputError(f"{path}:{line_no}: {column}: {problem}")
        if header is None:
            header = fields
            continue
        yield first_line, _table_row(path, first_line, header, fields, "comma-separated")
    if header is None:
        raise UserInputError(f"{path}:1: header: file is empty")


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for every line of a JSON Lines file; each line must be one object."""
    path = str(path)
    lines = _decoded_text(path).split("\n")
    if lines[-1] == "":  # the newline that ends the last line
        lines.pop()
    for line_no, line in enumerate(lines, start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            raise UserInputError(f"{path}:{line_no}: empty line (expected one JSON object)")
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserInputError(f"{path}:{line_no}: json: not valid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(value, dict):
            raise UserInputError(f"{path}:{line_no}: json: expected an object {{...}}, got {type(value).__name__}")
        yield line_no, value


def _row_kind(path: str, line_no: int, names: Sequence[str], kinds: Sequence[str], flag: str, where: str) -> str:
    """The first of `kinds` whose columns are all in `names`; otherwise an error saying what the file holds."""
    for kind in kinds:
        if all(column in names for column in ROW_KINDS[kind]):
            return kind
    described = [f"{ROW_KIND_NAMES[k]} ({', '.join(ROW_KINDS[k])})" for k in kinds]
    takes = " or ".join(filter(None, [", ".join(described[:-1]), described[-1]]))
    other = next((k for k in ROW_KINDS if all(column in names for column in ROW_KINDS[k])), None)
    holds = (f"{ROW_KIND_NAMES[other]} ({', '.join(ROW_KINDS[other])})" if other is not None
             else f"{', '.join(names) or 'nothing'}, no row kind")
    raise UserInputError(f"{path}:{line_no}: {where}: {holds}, but {flag} takes {takes}")


def read_own_file(path: str | os.PathLike, kinds: Sequence[str], flag: str, score_max: float = 5.0) -> OwnFile:
    """One of the user's files (module docstring): its format by extension, its row kind among `kinds`.

    `flag` names the option that gave the file, for messages; `score_max` scales scored pairs.
    """
    path = str(path)
    suffix = Path(path).suffix.lower()
    if suffix not in OWN_FORMATS:
        raise UserInputError(f"{path}: {flag}: unknown format {suffix or '(no extension)'!r} "
                             f"(expected {', '.join(OWN_FORMATS)})")
    rows: Iterator[tuple[int, dict[str, Any]]] = (
        read_tsv(path, ()) if suffix == ".tsv" else read_csv(path) if suffix == ".csv" else read_jsonl(path))
    first = next(rows, None)
    if first is None:
        raise UserInputError(f"{path}:{1 if suffix == '.jsonl' else 2}: no data rows")
    if suffix == ".jsonl":  # the first object's keys say what the file holds; a header does in .tsv and .csv
        kind = _row_kind(path, first[0], list(first[1]), kinds, flag, "keys")
    else:
        kind = _row_kind(path, 1, list(first[1]), kinds, flag, "header")
    columns = ROW_KINDS[kind]

    def complete(items: Iterable[tuple[int, dict[str, Any]]]) -> Iterator[tuple[int, dict[str, Any]]]:
        for line_no, row in items:  # .jsonl: every object must have the kind's keys (a header guarantees them)
            missing = next((column for column in columns if column not in row), None)
            if missing is not None:
                raise UserInputError(f"{path}:{line_no}: {missing}: missing key (the file holds {ROW_KIND_NAMES[kind]}: "
                                     f"{', '.join(columns)})")
            yield line_no, row

    items = complete(itertools.chain([first], rows))
    if kind == "nli":
        read = nli_pairs_from_rows(path, items)
        return OwnFile(path, kind, read.pairs, read.skipped_no_consensus)
    if kind == "scored":
        return OwnFile(path, kind, scored_pairs_from_rows(path, items, score_max))
    texts = [tuple(_sentence(path, line_no, row, column) for column in columns) for line_no, row in items]
    return OwnFile(path, kind, [Triplet(*t) for t in texts] if kind == "triplet" else texts)


def read_scored_file(path: str | os.PathLike, flag: str, score_max: float = 5.0) -> list[StsPair]:
    """A scored-pair file (sentence1, sentence2, score) in any own format; label = score / score_max."""
    return read_own_file(path, SCORED_KINDS, flag, score_max).rows


def expand_file_list(spec: str, flag: str) -> list[Path]:
    """Comma-separated paths or globs, in the order given (a glob's matches sorted); a file named twice is read once."""
    files: dict[Path, Path] = {}
    for entry in (part.strip() for part in spec.split(",")):
        if not entry:
            continue
        if any(char in entry for char in "*?["):
            matches = sorted(glob.glob(entry, recursive=True))
            if not matches:
                raise UserInputError(f"{entry}: {flag}: no file matches")
        else:
            matches = [entry]
        for match in matches:
            files.setdefault(Path(match).resolve(), Path(match))
    if not files:
        raise UserInputError(f"{flag} {spec!r}: names no file")
    return list(files.values())


def in_batch_examples(files: Sequence[OwnFile], seed: int, flag: str, scope: str = "per_file") -> list[tuple[str, ...]]:
    """The in-batch negatives objective's rows: triplets (recipe of the NLI pairs, `scope` as in
    nli_triplets_of_files, then the given ones) or pairs."""
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
    recipe = nli_triplets_of_files([f.rows for f in files if f.kind == "nli"], seed, scope)
    return recipe + [t for f in files if f.kind == "triplet" for t in f.rows]
