"""The sentence encoder: a transformers encoder, our masked mean pooling, and the checkpoint format.

embedding(s) = mean of the encoder's last hidden states over the tokens of s (see pooling.py),
optionally L2-normalised (models whose sentence-transformers folder ends in a Normalize module).
Text is tokenized once into id lists truncated to max_seq_length ([CLS] ... [SEP] included);
batches are padded to their own longest row, never to max_seq_length.

DeBERTa-v2 encoders get the windowed disentangled-attention bias of deberta.py (same results,
less work). Loads: a kfdeb checkpoint, any Hugging Face encoder folder, a sentence-transformers folder (v2
layout, mean pooling; other poolings are refused), or a hub id.

Weights are read as they are published. A folder (or hub repo) with `model.safetensors` (or its
sharded index) is read from those; one with only `pytorch_model.bin` (or its sharded index), like
kakaobank/kf-deberta-base, is unpickled here with `torch.load(weights_only=True)`, which admits
tensors, containers and numbers only: a pickle that would run code is refused with a one-line
error, never run, and transformers is handed the tensors, never the file. A hub id downloads the
configs and tokenizer files first, then lists the repo's files and fetches only the weights it
will read: the safetensors where the repo has both. huggingface_hub does the transfers, so
HF_ENDPOINT, HF_HOME / HF_HUB_CACHE, tokens and HF_HUB_OFFLINE (the cache only) apply.

Checkpoint format (what `save` writes; `SentenceTransformer(dir)` and `AutoModel.from_pretrained(dir)`
open it unchanged; weights are safetensors only, so loading never unpickles):
    config.json, model.safetensors, tokenizer files        the Hugging Face encoder
    modules.json, sentence_bert_config.json,                the sentence-transformers v2 layout
    1_Pooling/config.json (mean tokens)
    kfdeb.json                                              our metadata: config, metrics, step
Every file is written to a scratch folder first and renamed into place, weights before
kfdeb.json, so a reader (or a run killed mid-save) never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kfdeb import deberta
from kfdeb.data import length_sorted_chunks, pad_batch
from kfdeb.errors import UserInputError, first_line
from kfdeb.pooling import masked_mean_pool

DEFAULT_MAX_SEQ_LENGTH = 256
KFDEB_METADATA = "kfdeb.json"
RUN_BEST_DIR = "best"  # where a training run keeps its best model (run.py)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# What a hub download fetches before the weights, at any depth: configs (the encoder's, the
# sentence-transformers modules', shard indexes) and tokenizer files (tokenizer.json, vocab.txt,
# sentencepiece *.model). Never *.py: kfdeb does not run a repo's code.
_HUB_CONFIG_FILES = ["*.json", "*.txt", "*.model"]
# Weight files, in order of preference, each whole or sharded (NAME.index.json lists the shards):
# safetensors cannot run code when read; a pickled .bin is for repos published before
# safetensors existed, and is read with weights_only=True.
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserInputError(f"{path}: unreadable JSON ({err})") from None


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local folder for `name_or_path`: the folder itself, or a hub id's downloaded snapshot."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserInputError(f"{path}: not a model folder (it is a file)")
        return run_model_dir(path)
    text = str(name_or_path)
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise UserInputError(f"{path}: no such model folder")
    try:
        return _download_from_hub(text)
    except UserInputError:
        raise
    except Exception as err:  # any hub failure (offline, unknown id, gated) is the user's to fix
        raise UserInputError(
            f"{text}: not a local folder, and the Hugging Face hub could not provide it ({first_line(err, 160)}); "
            "pass a local model folder"
        ) from None


def run_model_dir(folder: Path) -> Path:
    """A training run's folder stands for its best model (`best/`, see run.py); any other folder for itself."""
    if not (folder / "config.json").exists() and not (folder / "modules.json").exists() \
            and (folder / RUN_BEST_DIR / "config.json").exists():
        return folder / RUN_BEST_DIR
    return folder


@contextlib.contextmanager
def tf32_matmuls(device: torch.device):
    """TF32 for float32 matrix products on CUDA (Ampere and later: ~8x the fp32 rate, 10-bit mantissa inputs).

    Used for inference only (evaluation, encode): embeddings move by ~1e-3 relative, far below
    what moves a KorSTS figure. Training keeps the user's global setting (full fp32 by default),
    since its fp32 parts are the ones that need the precision.
    """
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def weight_files(names: Collection[str], folder: Path) -> list[str]:
    """Which of the files `names` of an encoder folder hold its weights, as transformers would choose them.

    `model.safetensors`, else its index and the shards it lists, else the same for
    `pytorch_model.bin`; [] if none. `folder` is where the indexes are read (the local folder, or
    the snapshot a hub repo's configs were downloaded to).
    """
    for single in _WEIGHT_FILES:
        if single in names:
            return [single]
        index = f"{single}.index.json"
        if index in names:
            return [index, *_shards(folder / index, single)]
    return []


def _shards(index_path: Path, single: str) -> list[str]:
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    suffix = Path(single).suffix
    # plain file names next to the index, of the indexed kind: nothing outside the folder is read
    if not isinstance(weight_map, dict) or not weight_map or not all(
        isinstance(name, str) and name.endswith(suffix) and "/" not in name and "\\" not in name
        for name in weight_map.values()
    ):
        raise UserInputError(f"{index_path}: expected a weight_map of parameter names to {suffix} files beside it")
    return sorted(set(weight_map.values()))


def _download_from_hub(repo_id: str) -> Path:
    """The cached snapshot of hub repo `repo_id` with its configs, tokenizer files and the encoder's weights."""
    from huggingface_hub import HfApi, snapshot_download

    # Configs first: they say where the encoder lives (modules.json) and whether kfdeb can use
    # the model at all (pooling), before hundreds of MB of weights are fetched. Offline, this
    # serves the cache or raises.
    folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_CONFIG_FILES))
    commit = folder.name  # snapshots/<commit>: the weights must come from the same commit
    encoder_dir = _encoder_dir(folder)
    try:
        repo_files = HfApi().list_repo_files(repo_id, revision=commit)
    except Exception as err:  # offline or unreachable: what the cache holds, if it holds weights
        cached = weight_files(os.listdir(encoder_dir), encoder_dir)
        if cached and all((encoder_dir / name).is_file() for name in cached):
            return folder
        raise UserInputError(
            f"{repo_id}: the hub could not list the repo's files ({first_line(err, 160)}) "
            "and no weights of it are cached"
        ) from None
    relative = encoder_dir.relative_to(folder).as_posix()
    prefix = "" if relative == "." else f"{relative}/"
    names = {f[len(prefix):] for f in repo_files if f.startswith(prefix) and "/" not in f[len(prefix):]}
    weights = [prefix + name for name in weight_files(names, encoder_dir) if not name.endswith(".index.json")]
    if not weights:
        raise UserInputError(
            f"{repo_id}: the hub repo has no model.safetensors or pytorch_model.bin{f' in {prefix}' if prefix else ''}; "
            "kfdeb reads PyTorch weights only"
        )
    snapshot_download(repo_id, revision=commit, allow_patterns=weights)
    return folder


def _encoder_dir(folder: Path) -> Path:
    """Where the transformers encoder of a model folder lives (a sentence-transformers module may sit in a subfolder)."""
    if (folder / "modules.json").exists():
        return _sentence_transformers_layout(folder)["transformer_dir"]
    return folder


def read_pickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickled `pytorch_model*.bin`, unpickled with `torch.load(weights_only=True)`.

    weights_only admits tensors, containers and numbers only, so a pickle that would import or
    call anything else (run code) is refused before any of it runs.
    """
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # the weights-only unpickler met something it does not admit
        _, _, detail = str(err).partition("WeightsUnpickler error:")
        # torch's own advice (allowlist the global, or weights_only=False) is what must not be done here
        reason = detail.strip().split(" Please use")[0].splitlines()[0] if detail.strip() else first_line(err)
        raise UserInputError(
            f"{path}: refused: not a plain state dict of tensors ({reason}); kfdeb never runs code from a pickle"
        ) from None
    except Exception as err:  # truncated, not a pickle, not a torch file: whatever torch.load trips on
        raise UserInputError(f"{path}: unreadable PyTorch weights ({type(err).__name__}: {first_line(err)})") from None
    if not isinstance(state_dict, dict) or not all(
        isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in state_dict.items()
    ):
        raise UserInputError(f"{path}: not a state dict (parameter names to tensors)")
    return state_dict


def _load_transformer(folder: Path) -> torch.nn.Module:
    """The transformers encoder in `folder` in float32, its weights read as published (module docstring)."""
    from transformers import MODEL_MAPPING, AutoConfig, AutoModel

    weights = weight_files(os.listdir(folder), folder)
    if not weights or weights[0].startswith("model.safetensors"):  # neither: transformers says what it looked for
        return AutoModel.from_pretrained(str(folder), dtype=torch.float32)
    config = AutoConfig.from_pretrained(str(folder))
    state_dict: dict[str, torch.Tensor] = {}
    for name in weights:
        if not name.endswith(".index.json"):
            state_dict.update(read_pickled_state_dict(folder / name))
    if type(config) not in MODEL_MAPPING:
        raise UserInputError(f"{folder / 'config.json'}: model type {config.model_type!r} has no transformers encoder class")
    # No path: transformers gets the tensors only, so it has no file of its own to unpickle.
    return MODEL_MAPPING[type(config)].from_pretrained(None, config=config, state_dict=state_dict, dtype=torch.float32)


def _sentence_transformers_layout(folder: Path) -> dict[str, Any]:
    """Where the encoder lives in a sentence-transformers folder, and its pooling settings."""
    modules = read_json(folder / "modules.json")
    if not isinstance(modules, list) or not modules:
        raise UserInputError(f"{folder / 'modules.json'}: expected a non-empty list of modules")
    layout: dict[str, Any] = {"transformer_dir": folder, "normalize": False, "pooling": None}
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        module_dir = folder / module.get("path", "")
        if kind == "Transformer":
            layout["transformer_dir"] = module_dir
        elif kind == "Pooling":
            layout["pooling"] = _pooling_mode(module_dir / "config.json")
        elif kind == "Normalize":
            layout["normalize"] = True
        else:
            raise UserInputError(
                f"{folder / 'modules.json'}: module {module.get('type')!r} is not supported "
                "(kfdeb models are Transformer + mean Pooling [+ Normalize])"
            )
    if layout["pooling"] is None:
        raise UserInputError(f"{folder / 'modules.json'}: no Pooling module")
    return layout


def _pooling_mode(config_path: Path) -> str:
    config = read_json(config_path)
    modes = config.get("pooling_mode")
    if modes is None:  # the v2 layout: one boolean per mode; none set means mean
        modes = [k[len("pooling_mode_"):] for k, v in config.items() if k.startswith("pooling_mode_") and v]
        modes = modes or ["mean_tokens"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if modes not in (["mean"], ["mean_tokens"]):
        raise UserInputError(
            f"{config_path}: pooling {'+'.join(modes)} is not supported: kfdeb models use mean pooling "
            "(pooling_mode_mean_tokens)"
        )
    return "mean"


def move_files_into(scratch: Path, folder: Path, order: Callable[[Path], Any]) -> None:
    """Move every file under `scratch` to the same place under `folder`, each by one atomic rename.

    Files go in ascending `order(relative path)`, so a reader never sees a file before those it
    depends on; the caller writes everything into `scratch` (a folder on the same filesystem) first.
    """
    files = sorted((p.relative_to(scratch) for p in scratch.rglob("*") if p.is_file()), key=lambda p: (order(p), p))
    for relative in files:
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        os.replace(scratch / relative, folder / relative)


ENCODE_WINDOW = 16384  # sentences tokenized and length-sorted at a time by encode


def sentence_transformers_options(normalize: bool, convert_to_numpy: bool, show_progress: bool, dim: int | None,
                                  normalize_embeddings: bool = False, show_progress_bar: bool | None = None,
                                  convert_to_tensor: bool = False, truncate_dim: int | None = None,
                                  ) -> tuple[bool, bool, bool, int | None]:
    """encode's (normalize, convert_to_numpy, show_progress, dim), given ours or sentence-transformers' names."""
    return (normalize or normalize_embeddings, convert_to_numpy and not convert_to_tensor,
            show_progress or bool(show_progress_bar), dim if dim is not None else truncate_dim)


def encode_in_length_order(
    engine: Any,
    embed: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sentences: str | Sequence[str],
    batch_size: int,
    normalize: bool,
    convert_to_numpy: bool,
    show_progress: bool,
    window: int = ENCODE_WINDOW,
    dim: int | None = None,
) -> torch.Tensor | np.ndarray:
    """float32 embeddings (N x H) of `sentences` in input order, for any engine that embeds padded batches.

    engine: has tokenize(sentences) -> id lists, pad_id and dimension (SentenceEncoder, OnnxEncoder);
    embed(input_ids, attention_mask) -> B x H. The sentences stream through in windows of `window`:
    each window is tokenized, grouped by length into batches that pad little (data.length_sorted_chunks,
    longest first so that a batch too big for memory fails at once), embedded, and written into the
    output at its sentences' places. Memory: the N x H output plus one window's token ids, so a
    million-sentence corpus never exists as token lists. A sentence's embedding does not depend on
    the other sentences of its batch, so the window changes no result, only the padding.
    A single string (as in sentence-transformers) gives one H vector.

    dim (Matryoshka): keep the first `dim` coordinates (N x dim). Truncation comes before
    normalisation, as in sentence-transformers' truncate_dim: with normalize, or with an engine whose
    embeddings are normalised (a Normalize module), the truncated vectors are re-normalised to unit
    length; otherwise they are the plain prefixes (what evaluate.py --dims scores).
    """
    if isinstance(sentences, str):
        return encode_in_length_order(engine, embed, [sentences], batch_size, normalize, convert_to_numpy,
                                      show_progress, window, dim)[0]
    width = engine.dimension
    if dim is not None:
        if not 0 < dim <= engine.dimension:
            raise UserInputError(f"dim={dim}: expected 1 to the model's embedding width {engine.dimension}")
        width, normalize = dim, normalize or getattr(engine, "normalize", False)
    sentences = sentences if isinstance(sentences, Sequence) else list(sentences)
    embeddings = torch.empty((len(sentences), width), dtype=torch.float32)
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sentences), desc="encode", unit="sentence")
    for start in range(0, len(sentences), window):
        part = sentences[start : start + window]
        chunk_ids, chunk_masks, restore = length_sorted_chunks(engine.tokenize(part), batch_size, engine.pad_id)
        sorted_rows = torch.cat([embed(ids, mask)[:, :width].float().cpu() for ids, mask in zip(chunk_ids, chunk_masks)])
        embeddings[start : start + len(part)] = sorted_rows[restore]
        if bar is not None:
            bar.update(len(part))
    if bar is not None:
        bar.close()
    if normalize:
        embeddings = F.normalize(embeddings, dim=-1)
    return embeddings.numpy() if convert_to_numpy else embeddings


class SentenceEncoder(torch.nn.Module):
    """Encoder + masked mean pooling. Call with padded ids; `encode` takes raw sentences."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        tokenizer: Any,
        max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
        normalize: bool = False,
        do_lower_case: bool = False,
        metadata: dict | None = None,
    ):
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.normalize = normalize
        self.do_lower_case = do_lower_case
        self.metadata = metadata or {}
        if tokenizer.pad_token_id is None:
            raise UserInputError("the tokenizer has no padding token; kfdeb pads batches and needs one")
        self.pad_id = int(tokenizer.pad_token_id)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dimension(self) -> int:
        return int(self.transformer.config.hidden_size)

    def tokenize(self, sentences: Sequence[str]) -> list[list[int]]:
        """Token ids per sentence, special tokens included, truncated to max_seq_length."""
        texts = [s.lower() for s in sentences] if self.do_lower_case else list(sentences)
        if not texts:
            return []
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_seq_length, add_special_tokens=True)
        return encoded["input_ids"]

    def bulk_tokenizer(self) -> Callable[[Sequence[str]], list[list[int]]]:
        """A function giving `tokenize`'s ids faster, for a whole training set (the token cache's build).

        With a fast tokenizer: its Rust batch encoder called directly, set up as `tokenize` sets it
        up (truncation to max_seq_length on the same side, special tokens, no padding), without the
        offsets, masks and Python-side wrapping transformers adds: ~1.7x faster, and multi-threaded
        when TOKENIZERS_PARALLELISM allows. Other tokenizers: `tokenize` itself.
        """
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_batch_fast"):
            return self.tokenize
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend.to_str())  # a copy: the shared tokenizer's settings stay as they are
        backend.enable_truncation(self.max_seq_length, direction=getattr(self.tokenizer, "truncation_side", "right"))
        backend.no_padding()
        lower = self.do_lower_case

        def tokenize(sentences: Sequence[str]) -> list[list[int]]:
            texts = [s.lower() for s in sentences] if lower else list(sentences)
            return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=True)]

        return tokenize

    def forward(
        self,
        input_ids: torch.Tensor | Sequence[torch.Tensor],
        attention_mask: torch.Tensor | Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """Sentence embeddings of one padded batch, or of several (lists of tensors), rows concatenated.

        Several batches in one call let DDP see one forward per objective while each length
        group is padded on its own (data.length_sorted_chunks).
        """
        if isinstance(input_ids, (list, tuple)):
            return torch.cat([self(ids, mask) for ids, mask in zip(input_ids, attention_mask)])
        # No token_type_ids: single sentences are all segment 0, which is what BERT-style models
        # default to, and DeBERTa-v2 with type_vocab_size 0 ignores them anyway.
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        embeddings = masked_mean_pool(hidden, attention_mask)
        return F.normalize(embeddings, dim=-1) if self.normalize else embeddings

    def freeze_unused_parameters(self) -> list[str]:
        """Stop training parameters the sentence embedding does not depend on (e.g. BERT's pooler).

        Found by one tiny forward/backward: a parameter outside the graph gets no gradient. The
        reference never updated them either (AdamW skips parameters without a gradient), and DDP
        needs every trained parameter to take part in each backward.
        """
        input_ids, attention_mask = pad_batch(self.tokenize(["probe"]), self.pad_id)
        was_training = self.training
        self.eval()  # no dropout: this probe must not draw from the RNG the training run will use
        self.zero_grad(set_to_none=True)
        self(input_ids.to(self.device), attention_mask.to(self.device)).sum().backward()
        self.train(was_training)
        unused = []
        for name, param in self.named_parameters():
            if param.requires_grad and param.grad is None:
                unused.append(name)
                param.requires_grad_(False)
            param.grad = None
        return unused

    def encode(
        self,
        sentences: str | Sequence[str],
        batch_size: int = 32,
        normalize: bool = False,
        device: str | torch.device | None = None,
        convert_to_numpy: bool = False,
        show_progress: bool = False,
        dim: int | None = None,
        **sentence_transformers_names: Any,
    ) -> torch.Tensor | np.ndarray:
        """float32 embeddings (N x H, or N x dim) in input order (see encode_in_length_order), under inference_mode.

        Also takes sentence-transformers' names: normalize_embeddings, show_progress_bar,
        convert_to_tensor (a tensor even with convert_to_numpy=True), truncate_dim (= dim).
        """
        normalize, convert_to_numpy, show_progress, dim = sentence_transformers_options(
            normalize, convert_to_numpy, show_progress, dim, **sentence_transformers_names)
        if device is not None:
            self.to(device)
        device = self.device
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode(), tf32_matmuls(device):
                return encode_in_length_order(
                    self, lambda ids, mask: self(ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)),
                    sentences, batch_size, normalize, convert_to_numpy, show_progress, dim=dim)
        finally:
            self.train(was_training)

    def save(self, path: str | os.PathLike, metadata: dict | None = None) -> Path:
        """Write the checkpoint format (module docstring) to `path`, each file atomically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob(".kfdeb-tmp-*"):  # scratch left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
        scratch = Path(tempfile.mkdtemp(prefix=".kfdeb-tmp-", dir=path))
        try:
            self.transformer.save_pretrained(scratch, safe_serialization=True)
            self.tokenizer.save_pretrained(scratch)
            modules = [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
            if self.normalize:
                modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
                (scratch / "2_Normalize").mkdir()
            _write_json(scratch / "modules.json", modules)
            _write_json(
                scratch / "sentence_bert_config.json",
                {"max_seq_length": self.max_seq_length, "do_lower_case": self.do_lower_case},
            )
            (scratch / "1_Pooling").mkdir()
            _write_json(
                scratch / "1_Pooling" / "config.json",
                {
                    "word_embedding_dimension": self.dimension,
                    "pooling_mode_cls_token": False,
                    "pooling_mode_mean_tokens": True,
                    "pooling_mode_max_tokens": False,
                    "pooling_mode_mean_sqrt_len_tokens": False,
                    "pooling_mode_weightedmean_tokens": False,
                    "pooling_mode_lasttoken": False,
                    "include_prompt": True,
                },
            )
            self.metadata = {**self.metadata, **(metadata or {})}
            _write_json(scratch / KFDEB_METADATA, {"format": "kfdeb/1", **self.metadata})
            # weights after the configs and kfdeb.json last: a reader that sees the new metadata
            # also sees the weights it describes.
            move_files_into(scratch, path, order=lambda p: (p.name == KFDEB_METADATA, p.suffix == ".safetensors"))
            if self.normalize:
                (path / "2_Normalize").mkdir(exist_ok=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return path


def load_encoder(
    name_or_path: str | os.PathLike,
    max_seq_length: int | None = None,
    device: str | torch.device | None = None,
) -> SentenceEncoder:
    """Open a kfdeb checkpoint, HF encoder folder, sentence-transformers folder or hub id."""
    from transformers import AutoTokenizer

    folder = resolve_model_dir(name_or_path)
    normalize, do_lower_case, saved_length, metadata = False, False, None, {}
    transformer_dir = folder
    if (folder / "modules.json").exists():
        layout = _sentence_transformers_layout(folder)
        transformer_dir, normalize = layout["transformer_dir"], layout["normalize"]
    if (transformer_dir / "sentence_bert_config.json").exists():
        st_config = read_json(transformer_dir / "sentence_bert_config.json")
        saved_length = st_config.get("max_seq_length")
        do_lower_case = bool(st_config.get("do_lower_case", False))
    if (folder / KFDEB_METADATA).exists():
        metadata = read_json(folder / KFDEB_METADATA)
    if not (transformer_dir / "config.json").exists():
        raise UserInputError(
            f"{folder}: not a model folder (no config.json); expected a kfdeb checkpoint, "
            "a Hugging Face encoder folder or a sentence-transformers folder"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(transformer_dir))
        transformer = _load_transformer(transformer_dir)
    except (OSError, ValueError, KeyError) as err:
        raise UserInputError(f"{transformer_dir}: cannot load the encoder ({first_line(err)})") from None
    if transformer.config.model_type == "deberta-v2":
        deberta.install(transformer)  # same maths, only the relative positions a batch can use
    tokenizer_length = getattr(tokenizer, "model_max_length", None)
    if saved_length is None and (folder / "modules.json").exists() and isinstance(tokenizer_length, int) \
            and tokenizer_length < 10**6:  # transformers' "no limit" is 1e30
        saved_length = tokenizer_length  # newer sentence-transformers save the length here, not in sentence_bert_config
    length = max_seq_length or saved_length or DEFAULT_MAX_SEQ_LENGTH
    model_limit = getattr(transformer.config, "max_position_embeddings", None)
    if getattr(transformer.config, "position_biased_input", True) and model_limit and length > model_limit:
        length = model_limit  # absolute position embeddings end there; relative attention has no limit
    encoder = SentenceEncoder(transformer, tokenizer, int(length), normalize, do_lower_case, metadata)
    if device is not None:
        encoder.to(device)
    return encoder
