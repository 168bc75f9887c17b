"""Running an exported graph: the interface every kfdeb ONNX export has, and `OnnxEncoder`, which runs one.

The graph (onnx.py writes it) takes input_ids and attention_mask (B x L, int64), and token_type_ids
for models with segment embeddings; it returns sentence_embedding (B x H) and last_hidden_state
(B x L x H), the names Hugging Face's exports use. Beside it: the tokenizer and kfdeb_onnx.json
(max_seq_length, lowercasing, normalize, pad id), from which `OnnxEncoder` tokenizes exactly as the
PyTorch encoder does and `encode`s with the same streaming, length-sorted batches (model.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from kfdeb.errors import UserInputError, first_line
from kfdeb.files import read_json
from kfdeb.encoding import Prompts, encode_in_length_order, sentence_transformers_options, with_prompt
from kfdeb.model import SentenceEncoder
from kfdeb.onnx_quantize import require

INPUT_NAMES = ("input_ids", "attention_mask")  # every graph's; plus TOKEN_TYPES for models with segments
TOKEN_TYPES = "token_type_ids"
OUTPUT_NAMES = ("sentence_embedding", "last_hidden_state")
METADATA_FILE = "kfdeb_onnx.json"


def feed(names: Sequence[str], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, np.ndarray]:
    """onnxruntime's inputs for a padded batch: every sentence is segment 0."""
    values = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
    if TOKEN_TYPES in names:
        values[TOKEN_TYPES] = np.zeros_like(values["input_ids"])
    return values


def open_session(path: str | os.PathLike, providers: Sequence[str] | None = None):
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: fp16 graphs log a warning per node CPU cannot constant-fold
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types
        raise UserInputError(f"{path}: onnxruntime cannot open it ({first_line(err)})") from None


def onnx_dtype(dtype: str | torch.dtype | None) -> str:
    """Why an ONNX encoder computes in float32 for `dtype` (kfdeb.load's or encode's), or a one-line error:
    a graph computes in the dtype it was exported in (export.py --fp16 writes a float16 one)."""
    if dtype in (None, "float32", torch.float32):
        return "asked for" if dtype is not None else "the default"
    if dtype == "auto":
        return "auto: an ONNX graph computes in the dtype it was exported in"
    name = str(dtype).removeprefix("torch.")
    raise UserInputError(f"dtype {name}: an ONNX graph computes in the dtype it was exported in; use float32 "
                         "or auto (export.py --fp16 writes a float16 graph)")


class OnnxEncoder(Prompts):
    """Runs an exported graph with onnxruntime: `encode` behaves like SentenceEncoder.encode."""

    # the very same truncation, special tokens and lowercasing as the PyTorch encoder
    tokenize = SentenceEncoder.tokenize

    def __init__(self, session: Any, tokenizer: Any, max_seq_length: int, do_lower_case: bool, pad_id: int,
                 dimension: int, path: Path, normalize: bool = False, prompts: dict[str, str] | None = None,
                 default_prompt_name: str | None = None):
        self.session = session
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.do_lower_case = do_lower_case
        self.pad_id = pad_id
        self.dimension = dimension
        self.path = path
        self.normalize = normalize  # the graph ends in a Normalize: a truncated embedding is re-normalised
        self.prompts = dict(prompts or {})  # the PyTorch model's, recorded in kfdeb_onnx.json
        self.default_prompt_name = default_prompt_name
        self.inference_dtype, self.dtype_reason = torch.float32, "the default"  # as SentenceEncoder's

    @classmethod
    def load(cls, path: str | os.PathLike, max_seq_length: int | None = None,
             providers: Sequence[str] | None = None, dtype: str | torch.dtype | None = None) -> "OnnxEncoder":
        """Open a graph written by export.py; its tokenizer and kfdeb_onnx.json lie beside it.
        dtype: float32 or auto only (onnx_dtype)."""
        reason = onnx_dtype(dtype)
        path = Path(path).expanduser()
        if not path.is_file():
            # export.py on a run folder writes into its best/ (the model): point there when that is where it is
            beside_best = path.parent.parent / "best" / path.parent.name / path.name
            hint = f"; export.py writes a run's graph into its best/ folder: {beside_best}" if beside_best.is_file() else ""
            raise UserInputError(f"{path}: no such ONNX file{hint}")
        if not (path.parent / METADATA_FILE).is_file():
            raise UserInputError(
                f"{path}: no {METADATA_FILE} beside it; kfdeb reads graphs written by export.py "
                "(it stores the tokenizer and its settings next to the .onnx)"
            )
        meta = read_json(path.parent / METADATA_FILE)
        if not isinstance(meta, dict) or meta.get("format") != "kfdeb-onnx/1":
            raise UserInputError(f"{path.parent / METADATA_FILE}: not written by this kfdeb (expected format kfdeb-onnx/1)")
        session = open_session(path, providers)
        inputs, outputs = {i.name for i in session.get_inputs()}, {o.name for o in session.get_outputs()}
        if not set(INPUT_NAMES) <= inputs <= {*INPUT_NAMES, TOKEN_TYPES} or "sentence_embedding" not in outputs:
            raise UserInputError(f"{path}: expected inputs {', '.join(INPUT_NAMES)} [, {TOKEN_TYPES}] "
                                 "and output sentence_embedding")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent))
        except (OSError, ValueError, KeyError) as err:
            raise UserInputError(f"{path.parent}: cannot load the tokenizer ({first_line(err)})") from None
        length = max_seq_length or meta["max_seq_length"]
        if meta.get("length_limit"):
            length = min(length, meta["length_limit"])
        encoder = cls(session, tokenizer, int(length), bool(meta["do_lower_case"]), int(meta["pad_token_id"]),
                      int(meta["dimension"]), path, bool(meta.get("normalize", False)), meta.get("prompts"),
                      meta.get("default_prompt_name"))
        encoder.dtype_reason = reason
        return encoder

    @property
    def device_name(self) -> str:
        return f"onnxruntime {self.session.get_providers()[0]}"

    def _embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        names = [i.name for i in self.session.get_inputs()]
        return torch.from_numpy(self.session.run(["sentence_embedding"], feed(names, input_ids, attention_mask))[0])

    def encode(
        self,
        sentences: str | Sequence[str],
        batch_size: int = 32,
        normalize: bool = False,
        device: str | None = None,
        convert_to_numpy: bool = False,
        show_progress: bool = False,
        dim: int | None = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
        dtype: str | torch.dtype | None = None,
        **sentence_transformers_names: Any,
    ) -> torch.Tensor | np.ndarray:
        """float32 embeddings (N x H, or N x dim) in input order, batched and streamed as SentenceEncoder.encode,
        prompts included. device is accepted for the same signature; the session's providers decide where it runs;
        dtype float32 or auto only (onnx_dtype).
        """
        onnx_dtype(dtype)
        normalize, convert_to_numpy, show_progress, dim = sentence_transformers_options(
            normalize, convert_to_numpy, show_progress, dim, **sentence_transformers_names)
        sentences = with_prompt(sentences, self.prompt_text(prompt_name, prompt))
        return encode_in_length_order(self, self._embed, sentences, batch_size, normalize, convert_to_numpy,
                                      show_progress, dim=dim)
