"""kfdeb: multitask fine-tuning of Korean sentence encoders on KorNLI + KorSTS, in plain PyTorch.

    import kfdeb
    model = kfdeb.load("output/")                 # kfdeb checkpoint, HF or sentence-transformers folder, .onnx
    vectors = model.encode(["문장 하나", "문장 둘"], normalize=True)
    scores, indices = kfdeb.top_k(query_vectors, corpus_vectors, k=5)
"""

from __future__ import annotations

import os

from kfdeb.errors import UserInputError
from kfdeb.search import top_k

__version__ = "0.1.0"
__all__ = ["load", "top_k", "UserInputError", "__version__"]


def load(path: str | os.PathLike, device: str | None = None, max_seq_length: int | None = None,
         dtype: str | None = None):
    """An encoder with `.encode(sentences, batch_size=32, normalize=False, ...)` for any model kfdeb reads.

    `path`: a kfdeb output dir, a Hugging Face encoder folder, a sentence-transformers folder (mean
    pooling), a hub id (where the hub is reachable), or an exported `.onnx` file (its tokenizer
    next to it). device: default cuda when available, else cpu (ONNX: onnxruntime's CPU provider).
    dtype: what encode computes in by default, "float32" (the default), "bfloat16", "float16" or "auto"
    (bfloat16 where the GPU or CPU runs it natively, else float32: kfdeb/inference_dtype.py); the
    embeddings are float32 whatever it is. The model's `dtype_reason` says why (e.g. "auto: the CPU has
    amx_bf16"). An ONNX graph computes in float32 only.
    """
    if str(path).endswith(".onnx"):
        from kfdeb.onnx_runtime import OnnxEncoder

        return OnnxEncoder.load(path, max_seq_length=max_seq_length, dtype=dtype)
    import torch

    from kfdeb.inference_dtype import resolve_dtype
    from kfdeb.model import load_encoder

    # like sentence-transformers and evaluate.py: the GPU when there is one
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    resolve_dtype(dtype or "float32", "cpu")  # a bad name fails before the model loads
    encoder = load_encoder(path, max_seq_length=max_seq_length, device=device)
    encoder.inference_dtype, encoder.dtype_reason = resolve_dtype(dtype or "float32", encoder.device)
    return encoder
