"""The sentence encoder: a transformers encoder, our pooling, prompts, encode, and the checkpoint format.

embedding(s) = mean of the encoder's last hidden states over the tokens of s, or the first token's
state (CLS pooling, as a sentence-transformers folder declares it; pooling.py), optionally
L2-normalised (models whose sentence-transformers folder ends in a Normalize module). A prompt
(`Prompts`: "query: ", "passage: ") is text prepended to s. Text is tokenized once into id lists
truncated to max_seq_length ([CLS] ... [SEP] included); batches are padded to their own longest
row, never to max_seq_length.

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
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kfdeb import deberta
from kfdeb.batching import pad_batch
from kfdeb.cpu_linear import onednn_linears
from kfdeb.encoding import Prompts, encode_in_length_order, sentence_transformers_options, with_prompt
from kfdeb.errors import UserInputError, first_line
from kfdeb.files import json_text, publish_files, read_json
from kfdeb.inference_dtype import computing_in, resolve_dtype
from kfdeb.pooling import first_token_pool, masked_mean_pool
from kfdeb.st_folder import read_layout, write_layout
from kfdeb.weights import load_transformer, resolve_model_dir

DEFAULT_MAX_SEQ_LENGTH = 256
KFDEB_METADATA = "kfdeb.json"

_MODE_LOCK = threading.Lock()  # guards the process-wide or model-wide settings encode changes (below)
_TF32_USERS: list = [0, None]  # encodes on CUDA running, the precision setting they found


@contextlib.contextmanager
def tf32_matmuls(device: torch.device):
    """TF32 for float32 matrix products on CUDA (Ampere and later: ~8x the fp32 rate, 10-bit mantissa inputs).

    Used for inference only (evaluation, encode): embeddings move by ~1e-3 relative, far below
    what moves a KorSTS figure. Training keeps the user's global setting (full fp32 by default),
    since its fp32 parts are the ones that need the precision. The setting is the process's: it is
    set by the first of the blocks running at once and restored by the last (as eval_mode), so that
    one thread's exit does not take TF32 away from another's encode.
    """
    if device.type != "cuda":
        yield
        return
    with _MODE_LOCK:
        if _TF32_USERS[0] == 0:
            _TF32_USERS[1] = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("high")
        _TF32_USERS[0] += 1
    try:
        yield
    finally:
        with _MODE_LOCK:
            _TF32_USERS[0] -= 1
            if _TF32_USERS[0] == 0:
                torch.set_float32_matmul_precision(_TF32_USERS[1])


_EVAL_USERS: dict[int, tuple[int, list[torch.nn.Module]]] = {}  # id(model) -> (encodes running, modules to restore)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """model (all its modules) in eval mode within the block; on leaving, the modules that were in
    training mode return to it, once the last of the blocks running at once on this model leaves.

    The training flags are state shared by every thread using the model: setting them on entry and
    restoring what each entry found let one thread's exit put the model back in training mode (dropout
    on) while another thread was still encoding (kfdeb/cpu_linear.py's docstring tells the sequence).
    Counting the blocks open on a model, under a lock, leaves the flags alone while any is open, and a
    model already in eval mode (kfdeb.load's, a served one) is never written to at all.
    """
    with _MODE_LOCK:
        users, training = _EVAL_USERS.get(id(model), (0, []))
        if users == 0:
            training = [module for module in model.modules() if module.training]
            for module in training:
                module.training = False
        _EVAL_USERS[id(model)] = (users + 1, training)
    try:
        yield
    finally:
        with _MODE_LOCK:
            users, training = _EVAL_USERS.pop(id(model))
            if users > 1:
                _EVAL_USERS[id(model)] = (users - 1, training)
            else:
                for module in training:
                    module.training = True


class SentenceEncoder(torch.nn.Module, Prompts):
    """Encoder + pooling (mean or first token). Call with padded ids; `encode` takes raw sentences."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        tokenizer: Any,
        max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
        normalize: bool = False,
        do_lower_case: bool = False,
        metadata: dict | None = None,
        pooling: str = "mean",
        prompts: dict[str, str] | None = None,
        default_prompt_name: str | None = None,
    ):
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.normalize = normalize
        self.do_lower_case = do_lower_case
        self.metadata = metadata or {}
        self.pooling = pooling  # "mean" or "cls"
        self.prompts = dict(prompts or {})
        self.default_prompt_name = default_prompt_name
        if tokenizer.pad_token_id is None:
            raise UserInputError("the tokenizer has no padding token; kfdeb pads batches and needs one")
        self.pad_id = int(tokenizer.pad_token_id)
        # what encode computes in when not told (kfdeb.load's dtype; inference_dtype.py), and why
        self.inference_dtype, self.dtype_reason = torch.float32, "the default"
        # the limit the loaded folder gives itself (load_encoder: own_max_seq_length), whatever max_seq_length was asked
        self.own_max_seq_length: int | None = None

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
        group is padded on its own (batching.length_sorted_chunks).
        """
        if isinstance(input_ids, (list, tuple)):
            return torch.cat([self(ids, mask) for ids, mask in zip(input_ids, attention_mask)])
        # token_type_ids: None everywhere but the ONNX export (whose graph takes them where the
        # model has segments): single sentences are all segment 0, BERT-style models' default,
        # and DeBERTa-v2 with type_vocab_size 0 has no segment embedding at all.
        segments = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask, **segments).last_hidden_state
        embeddings = first_token_pool(hidden) if self.pooling == "cls" else masked_mean_pool(hidden, attention_mask)
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
        prompt_name: str | None = None,
        prompt: str | None = None,
        dtype: str | torch.dtype | None = None,
        **sentence_transformers_names: Any,
    ) -> torch.Tensor | np.ndarray:
        """float32 embeddings (N x H, or N x dim) in input order (see encode_in_length_order), without autograd.

        prompt (or the model's prompt named prompt_name, or its default_prompt_name) is prepended to
        every sentence. dtype: what the encoder computes in, float32, bfloat16, float16 or auto
        (inference_dtype.py; default: self.inference_dtype, kfdeb.load's dtype); the embeddings are float32
        whatever it is. Also takes sentence-transformers' names: normalize_embeddings, show_progress_bar,
        convert_to_tensor (a tensor even with convert_to_numpy=True), truncate_dim (= dim).
        Threads may encode with one model at the same time: each gets what it would get alone.
        """
        normalize, convert_to_numpy, show_progress, dim = sentence_transformers_options(
            normalize, convert_to_numpy, show_progress, dim, **sentence_transformers_names)
        sentences = with_prompt(sentences, self.prompt_text(prompt_name, prompt))
        if device is not None:
            self.to(device)
        device = self.device
        compute_dtype = self.inference_dtype if dtype is None else resolve_dtype(dtype, device)[0]

        def embed(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            # the casts: under computing_in (below) each product of the encoder casts its inputs to
            # compute_dtype (autocast); pooling.py widens the token states to float32, so self(...) returns
            # float32 embeddings, normalised in float32; what follows (encode_in_length_order's rows,
            # similarity, search) is float32
            rows = self(ids.to(device, non_blocking=True), mask.to(device, non_blocking=True))
            if compute_dtype == torch.float16 and not torch.isfinite(rows).all():
                raise UserInputError("dtype float16: the encoder's activations overflowed float16's range "
                                     "(inf/NaN embeddings); use bfloat16 or float32")
            return rows

        # CPU float32: oneDNN's GEMM for the linear layers (kfdeb/cpu_linear.py); CUDA: TF32 (tf32_matmuls);
        # bf16/fp16: one autocast context for the whole call, which caches its casts of the weights, so they
        # are cast once, not per batch; it caches them under no_grad only (torch 2.13: under inference_mode
        # every batch casts them again), hence no_grad there.
        # Grad modes, autocast and onednn_linears are local to the calling thread; eval_mode and
        # tf32_matmuls change shared settings and count the encodes running (their docstrings).
        no_grad = torch.inference_mode() if compute_dtype == torch.float32 else torch.no_grad()
        with eval_mode(self), no_grad, tf32_matmuls(device), onednn_linears(self), computing_in(compute_dtype, device):
            return encode_in_length_order(self, embed, sentences, batch_size, normalize, convert_to_numpy,
                                          show_progress, dim=dim)

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
            write_layout(scratch, self.dimension, self.max_seq_length, self.do_lower_case, self.normalize,
                         self.pooling, self.prompts, self.default_prompt_name)
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


def position_limit(transformer: torch.nn.Module) -> int:
    """The longest input the absolute position embeddings cover. RoBERTa and XLM-R number positions from
    padding_idx + 1 (their embeddings module has a `padding_idx`), so max_position_embeddings 514 holds 512."""
    table = int(getattr(transformer.config, "max_position_embeddings", 0) or 10**9)
    offset = getattr(getattr(transformer, "embeddings", None), "padding_idx", None)
    return table - (offset + 1) if isinstance(offset, int) else table


def load_encoder(
    name_or_path: str | os.PathLike,
    max_seq_length: int | None = None,
    device: str | torch.device | None = None,
    pooling: str | None = None,
) -> SentenceEncoder:
    """Open a kfdeb checkpoint, HF encoder folder, sentence-transformers folder or hub id.

    pooling: "mean" or "cls" for a plain Hugging Face folder (default mean); a sentence-transformers
    folder pools as its Pooling module says, and asking it for another pooling is an error."""
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
    if getattr(transformer.config, "position_biased_input", True):  # relative attention (DeBERTa-v2) has no limit
        length = min(length, position_limit(transformer))
    own_length = own_max_seq_length(layout.max_seq_length, tokenizer, transformer)
    if pooling is not None and layout.is_sentence_transformers and pooling != layout.pooling:
        raise UserInputError(f"{folder}: pooling {pooling} asked for, but the folder's Pooling module pools by "
                             f"{layout.pooling}; --pooling chooses for a plain Hugging Face model only")
    encoder = SentenceEncoder(transformer, tokenizer, int(length), layout.normalize, layout.do_lower_case, metadata,
                              pooling or layout.pooling, layout.prompts, layout.default_prompt_name)
    encoder.own_max_seq_length = own_length
    if device is not None:
        encoder.to(device)
    return encoder


def own_max_seq_length(declared: int | None, tokenizer: Any, transformer: torch.nn.Module) -> int | None:
    """The inference limit a model folder gives itself, as sentence-transformers reads it: `declared`
    (sentence_bert_config.json's max_seq_length), else the tokenizer's model_max_length capped by the
    config's max_position_embeddings, else max_position_embeddings; each capped, for absolute positions,
    at what the position table covers (position_limit). None when nothing says."""
    if declared:
        return int(declared)
    limits = [value for value in (getattr(tokenizer, "model_max_length", None),
                                  getattr(transformer.config, "max_position_embeddings", None))
              if isinstance(value, int) and 0 < value < 10**6]  # transformers' "no limit" is 1e30
    if getattr(transformer.config, "position_biased_input", True):
        limits.append(position_limit(transformer))
    return min(limits) if limits and min(limits) < 10**6 else None
