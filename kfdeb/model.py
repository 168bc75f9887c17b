"""The sentence encoder: a transformers encoder, our masked mean pooling, encode, and the checkpoint format.

embedding(s) = mean of the encoder's last hidden states over the tokens of s (see pooling.py),
optionally L2-normalised (models whose sentence-transformers folder ends in a Normalize module).
Text is tokenized once into id lists truncated to max_seq_length ([CLS] ... [SEP] included);
batches are padded to their own longest row, never to max_seq_length.

DeBERTa-v2 encoders get the windowed disentangled-attention bias of deberta.py (same results,
less work). `load_encoder` opens a kfdeb checkpoint, any Hugging Face encoder folder, a
sentence-transformers folder (st_folder.py) or a hub id; weights.py finds, reads and checks the
weights.

Checkpoint format (what `save` writes; `SentenceTransformer(dir)` and `AutoModel.from_pretrained(dir)`
open it unchanged; weights are safetensors only, so loading never unpickles):
    config.json, model.safetensors, tokenizer files        the Hugging Face encoder
    modules.json, sentence_bert_config.json,                the sentence-transformers layout (st_folder.py)
    1_Pooling/config.json (mean tokens)
    kfdeb.json                                              our metadata: config, metrics, step
Every file is written to a scratch folder first and renamed into place (files.py), weights before
kfdeb.json, so a reader (or a run killed mid-save) never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kfdeb import deberta
from kfdeb.batching import length_sorted_chunks, pad_batch
from kfdeb.errors import UserInputError, first_line
from kfdeb.files import json_text, publish_files, read_json
from kfdeb.pooling import masked_mean_pool
from kfdeb.st_folder import read_layout, write_layout
from kfdeb.weights import load_transformer, resolve_model_dir

DEFAULT_MAX_SEQ_LENGTH = 256
KFDEB_METADATA = "kfdeb.json"

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
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sentence embeddings of one padded batch, or of several (lists of tensors), rows concatenated.

        Several batches in one call let DDP see one forward per objective while each length
        group is padded on its own (data.length_sorted_chunks).
        """
        if isinstance(input_ids, (list, tuple)):
            return torch.cat([self(ids, mask) for ids, mask in zip(input_ids, attention_mask)])
        # token_type_ids: None everywhere but the ONNX export (whose graph takes them where the
        # model has segments): single sentences are all segment 0, BERT-style models' default,
        # and DeBERTa-v2 with type_vocab_size 0 has no segment embedding at all.
        segments = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask, **segments).last_hidden_state
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
            write_layout(scratch, self.dimension, self.max_seq_length, self.do_lower_case, self.normalize)
            # the metadata given, over what this model was loaded with; self.metadata stays as it was
            (scratch / KFDEB_METADATA).write_text(json_text({"format": "kfdeb/1", **self.metadata, **(metadata or {})}),
                                                 encoding="utf-8")
            # weights after the configs and kfdeb.json last: a reader that sees the new metadata
            # also sees the weights it describes.
            publish_files(scratch, path, order=lambda p: (p.name == KFDEB_METADATA, p.suffix == ".safetensors"))
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
    layout = read_layout(folder)
    transformer_dir = layout.transformer_dir
    metadata = read_json(folder / KFDEB_METADATA) if (folder / KFDEB_METADATA).exists() else {}
    if not (transformer_dir / "config.json").exists():
        raise UserInputError(
            f"{folder}: not a model folder (no config.json); expected a kfdeb checkpoint, "
            "a Hugging Face encoder folder or a sentence-transformers folder"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(transformer_dir))
    except (OSError, ValueError, KeyError) as err:
        raise UserInputError(f"{transformer_dir}: cannot load the tokenizer ({first_line(err)})") from None
    transformer = load_transformer(transformer_dir)
    if transformer.config.model_type == "deberta-v2":
        deberta.install(transformer)  # same maths, only the relative positions a batch can use
    saved_length = layout.max_seq_length
    tokenizer_length = getattr(tokenizer, "model_max_length", None)
    if saved_length is None and layout.is_sentence_transformers and isinstance(tokenizer_length, int) \
            and tokenizer_length < 10**6:  # transformers' "no limit" is 1e30
        saved_length = tokenizer_length  # newer sentence-transformers save the length here, not in sentence_bert_config
    length = max_seq_length or saved_length or DEFAULT_MAX_SEQ_LENGTH
    model_limit = getattr(transformer.config, "max_position_embeddings", None)
    if getattr(transformer.config, "position_biased_input", True) and model_limit and length > model_limit:
        length = model_limit  # absolute position embeddings end there; relative attention has no limit
    encoder = SentenceEncoder(transformer, tokenizer, int(length), layout.normalize, layout.do_lower_case, metadata)
    if device is not None:
        encoder.to(device)
    return encoder
