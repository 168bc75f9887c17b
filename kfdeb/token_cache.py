"""Token cache: each objective's training examples as integer arrays on disk, memory-mapped by every rank.

Reading KorNLI train (942,854 pairs), building its 628,568 triplets and tokenizing them into
Python lists takes ~2 minutes and ~1.9 GB per process, and every rank of every run paid it. The
cache pays it once per node and input: the first run writes the arrays below, later runs (another
learning rate, output dir, `--resume`, every rank of a torchrun job) only hash the input files
and `np.load(mmap_mode="r")` them: no file is parsed, nothing is tokenized, and the ranks of one
node share the arrays' pages through the page cache.

Two levels, because they depend on different things and the first must be known before the model
loads (a bad file still fails before a model download):

    CACHE_DIR/examples-v1-<task>-<digest>/    one objective's examples; key: the input files
                                              (path, size, mtime_ns, sha256), the reader, and what
                                              changes the rows (seed, triplet scope, score_max)
        rows.npy      N x C int32   text ids of each example's columns (anchor, positive[, negative];
                                    STS: sentence1, sentence2); text ids number the distinct texts
                                    in order of first appearance, as the in-memory path does
        keys.npy      N x C int32   (in-batch negatives only) the ids of the normalised texts
                                    (strip().lower()) that NoDuplicatesBatches keeps apart in a batch
        labels.npy    N float32     (STS only) score / score_max
        text_bytes.npy, text_offsets.npy   every distinct text, UTF-8, flat uint8 + int64 offsets
        key.json, COMPLETE
        tokens-v1-<digest>/                   token ids of those texts; key: the tokenizer (its
                                              serialized pipeline: vocabulary, normalizer, special
                                              tokens), do_lower_case, max_seq_length, library versions
            token_ids.npy (int32, flat), token_offsets.npy (int64, len + 1), key.json, COMPLETE

A folder's name is a digest of its key (FORMAT_VERSION included): a changed input, tokenizer or
setting is another folder, and an old one stays until deleted (delete CACHE_DIR to clear it all).
A folder is used only when COMPLETE exists and key.json equals the key. It is written in a scratch
folder `.scratch@HOST@PID@NAME` beside it, COMPLETE last, files fsynced, then renamed into place
(atomic: files.publish_folder): a build killed at any instant leaves a scratch folder, never a half-written cache, and
the next build on that host removes scratch folders whose process is gone. Two processes that
build the same folder at once (two jobs, or nodes sharing one cache dir) both finish; the first
rename wins and the other's scratch is dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from kfdeb.batching import normalised_keys, number_texts
from kfdeb.errors import UserInputError
from kfdeb.files import publish_folder

FORMAT_VERSION = 1
COMPLETE = "COMPLETE"
SCRATCH_PREFIX = ".scratch@"
TOKENIZE_CHUNK = 10_000  # texts per tokenizer call: the tokenizer's output lists stay small


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/kfdeb, else ~/.cache/kfdeb: one cache for every run on the machine."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kfdeb"


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """What identifies an input file's content: absolute path, size, mtime_ns and a sha256 of every byte.

    The full hash costs ~0.3 s for KorNLI train's 263 MB (a small part of what the cache saves) and,
    unlike size + mtime, also sees an edit that keeps both (a copy with preserved times).
    """
    path = str(path)
    try:
        with open(path, "rb") as handle:
            stat = os.fstat(handle.fileno())
            digest = hashlib.sha256()
            # 1 MiB at a time (hashlib.file_digest does the same, but exists from Python 3.11 only)
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise UserInputError(f"{path}: cannot open ({err.strerror})") from None
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}


def tokenizer_fingerprint(tokenizer: Any, do_lower_case: bool, max_seq_length: int) -> dict[str, Any]:
    """What decides the token ids of a text: the tokenizer's whole pipeline, lowercasing, truncation.

    A fast tokenizer's serialized form holds its vocabulary, normalizer, pre-tokenizer, special
    tokens and post-processor, whatever folder it was loaded from; a tokenizer without one is
    identified by its class, vocabulary and special tokens. The library versions are part of it:
    a new release may tokenize differently.
    """
    import tokenizers
    import transformers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = backend.to_str()
    else:
        pipeline = json.dumps([sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]),
                               tokenizer.all_special_tokens], ensure_ascii=False)
    return {"class": type(tokenizer).__name__, "sha256": hashlib.sha256(pipeline.encode("utf-8")).hexdigest(),
            "do_lower_case": bool(do_lower_case), "max_seq_length": int(max_seq_length),
            "truncation_side": getattr(tokenizer, "truncation_side", "right"),
            "tokenizers": tokenizers.__version__, "transformers": transformers.__version__}


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:20]


def examples_folder(cache_dir: str | os.PathLike, task: str, key: dict[str, Any]) -> Path:
    return Path(cache_dir) / f"examples-v{FORMAT_VERSION}-{task}-{_digest(key)}"


def tokens_folder(examples: str | os.PathLike, key: dict[str, Any]) -> Path:
    return Path(examples) / f"tokens-v{FORMAT_VERSION}-{_digest(key)}"


class TextTable:
    """Distinct texts as one flat UTF-8 byte array + offsets; a slice decodes to a list of str."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self.data, self.offsets = data, offsets

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> "TextTable":
        encoded = [text.encode("utf-8") for text in texts]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, span: slice) -> list[str]:
        start, stop, _ = span.indices(len(self))
        ends = self.offsets[start : stop + 1] - self.offsets[start]
        raw = self.data[self.offsets[start] : self.offsets[stop]].tobytes()
        return [raw[a:b].decode("utf-8") for a, b in zip(ends[:-1].tolist(), ends[1:].tolist())]


class TokenTable:
    """Token ids of every distinct text: one flat int32 array + int64 offsets (text i: ids[offsets[i]:offsets[i+1]]).

    Stands where a list of token-id lists stood: `table[i]` is text i's ids (a small writable copy,
    which torch takes without complaint, unlike a read-only memory map), `len(table)` the number of texts.
    """

    def __init__(self, ids: np.ndarray, offsets: np.ndarray):
        self.ids, self.offsets = ids, offsets

    @classmethod
    def from_tokenizer(cls, texts: Sequence[str], tokenize: Callable[[list[str]], Sequence[Sequence[int]]]) -> "TokenTable":
        """Tokenize `texts` (a list or a TextTable) TOKENIZE_CHUNK at a time into flat arrays."""
        id_chunks, length_chunks = [], []
        for start in range(0, len(texts), TOKENIZE_CHUNK):
            sequences = tokenize(list(texts[start : start + TOKENIZE_CHUNK]))
            lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
            id_chunks.append(np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int32, count=int(lengths.sum())))
            length_chunks.append(lengths)
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        if length_chunks:
            np.cumsum(np.concatenate(length_chunks), out=offsets[1:])
        return cls(np.concatenate(id_chunks) if id_chunks else np.zeros(0, dtype=np.int32), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        return np.array(self.ids[self.offsets[index] : self.offsets[index + 1]])


@dataclass
class Examples:
    """One objective's examples as integer arrays (memory-mapped when they come from the cache)."""

    rows: np.ndarray  # N x C int32: text ids of each example's columns
    keys: np.ndarray | None  # N x C int32: normalised-text ids for NoDuplicatesBatches (in-batch negatives only)
    labels: np.ndarray | None  # N float32 (STS only)
    texts: TextTable | Sequence[str]  # the distinct texts, by text id
    folder: Path | None = None  # the cache folder they were opened from (None: built in memory)

    @classmethod
    def from_texts(cls, examples: Sequence[Sequence[str]], labels: np.ndarray | None, with_keys: bool) -> "Examples":
        """The examples as text ids (batching.number_texts); with_keys: the normalised texts' ids too."""
        rows, texts = number_texts(examples)
        return cls(rows, normalised_keys(rows, texts) if with_keys else None, labels, texts)


def _save(folder: Path, name: str, array: np.ndarray) -> None:
    np.save(folder / f"{name}.npy", array)  # synced with the rest of the folder before its rename (files.py)


def _load(folder: Path, name: str) -> np.ndarray | None:
    path = folder / f"{name}.npy"
    return np.load(path, mmap_mode="r") if path.exists() else None


def is_complete(folder: Path, key: dict[str, Any]) -> bool:
    """Whether `folder` is a finished cache entry of `key` (its marker written, its key the same)."""
    try:
        return (folder / COMPLETE).exists() and json.loads((folder / "key.json").read_text(encoding="utf-8")) == key
    except (OSError, ValueError):
        return False


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def clear_stale_scratch(parent: Path) -> list[Path]:
    """Remove this host's scratch folders in `parent` whose building process is gone; return them.

    Another host's scratch folders (a cache dir on shared storage) are left alone: from here there
    is no telling whether their process still runs.
    """
    removed = []
    host = socket.gethostname()
    for entry in parent.glob(f"{SCRATCH_PREFIX}*"):
        parts = entry.name[len(SCRATCH_PREFIX):].split("@")
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and _process_gone(int(parts[1])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def ensure(folder: Path, key: dict[str, Any], write: Callable[[Path], dict[str, Any]]) -> bool:
    """Make `folder` a complete cache entry of `key`, calling `write(scratch)` if it is not one yet.

    Returns whether it was built here. `write` fills the scratch folder and returns a summary
    kept in COMPLETE. See the module docstring for the scratch-and-rename protocol.
    """
    if is_complete(folder, key):
        return False
    parent = folder.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        clear_stale_scratch(parent)
        if folder.exists():
            if is_complete(folder, key):  # another process (a node sharing this disk) finished it meanwhile
                return False
            shutil.rmtree(folder)  # not written by this protocol (no marker, another key): never used
        scratch = parent / f"{SCRATCH_PREFIX}{socket.gethostname()}@{os.getpid()}@{folder.name}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
    except OSError as err:
        raise UserInputError(f"{parent}: cannot write the token cache ({err.strerror}); pass --cache_dir "
                             "with a writable folder, or --no_cache") from None
    try:
        summary = write(scratch)
        (scratch / "key.json").write_text(json.dumps(key, indent=1), encoding="utf-8")
        (scratch / COMPLETE).write_text(json.dumps(summary), encoding="utf-8")
        try:
            publish_folder(scratch, folder)  # every file synced, then one rename (files.py)
        except OSError:
            if not is_complete(folder, key):  # no other process got there first: a real failure
                raise
            shutil.rmtree(scratch, ignore_errors=True)
            return False
    except OSError as err:
        shutil.rmtree(scratch, ignore_errors=True)
        raise UserInputError(f"{scratch}: cannot write the token cache ({err.strerror}); pass --cache_dir "
                             "with a writable folder, or --no_cache") from None
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return True


def ensure_examples(folder: Path, key: dict[str, Any], build: Callable[[], Examples]) -> bool:
    """The examples level: `build()` (reads the input files) runs only when `folder` is not complete."""

    def write(scratch: Path) -> dict[str, Any]:
        examples = build()
        texts = examples.texts if isinstance(examples.texts, TextTable) else TextTable.from_texts(examples.texts)
        _save(scratch, "rows", examples.rows)
        for name, array in (("keys", examples.keys), ("labels", examples.labels)):
            if array is not None:
                _save(scratch, name, array)
        _save(scratch, "text_bytes", texts.data)
        _save(scratch, "text_offsets", texts.offsets)
        return {"examples": len(examples.rows), "texts": len(texts)}

    return ensure(folder, key, write)


def open_examples(folder: Path) -> Examples:
    return Examples(_load(folder, "rows"), _load(folder, "keys"), _load(folder, "labels"),
                    TextTable(_load(folder, "text_bytes"), _load(folder, "text_offsets")), folder)


@contextlib.contextmanager
def tokenizer_parallelism() -> Iterator[None]:
    """The fast tokenizer's own threads on, for the duration of a cache build (kfdeb's scripts turn
    them off by default; nothing forks while the build runs), then the previous setting back."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def ensure_tokens(folder: Path, key: dict[str, Any], texts: Sequence[str],
                  tokenizer: Callable[[], Callable[[list[str]], Sequence[Sequence[int]]]]) -> bool:
    """The tokens level: only when `folder` is not complete, `tokenizer()` (set up only then)
    tokenizes `texts` in chunks, with the fast tokenizer's threads."""

    def write(scratch: Path) -> dict[str, Any]:
        with tokenizer_parallelism():
            table = TokenTable.from_tokenizer(texts, tokenizer())
        _save(scratch, "token_ids", table.ids)
        _save(scratch, "token_offsets", table.offsets)
        return {"texts": len(table), "tokens": len(table.ids)}

    return ensure(folder, key, write)


def open_tokens(folder: Path) -> TokenTable:
    return TokenTable(_load(folder, "token_ids"), _load(folder, "token_offsets"))
