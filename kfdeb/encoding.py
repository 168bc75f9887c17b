"""Encoding sentences in batches, for any engine that embeds padded token ids (PyTorch's, ONNX's), and prompts.

`encode_in_length_order` streams the sentences in windows: each window is tokenized, grouped by
length into batches that pad little (batching.length_sorted_chunks), embedded, and written into the
output at its sentences' places. `Prompts` gives an engine sentence-transformers' prompt handling:
named prompts prepended to the text, `encode_query`, `encode_document`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kfdeb.batching import length_sorted_chunks
from kfdeb.errors import UserInputError

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
    each window is tokenized, grouped by length into batches that pad little (batching.length_sorted_chunks,
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

        bar = tqdm(total=len(sentences), desc="encode", unit="sentence", leave=False)  # gone once done
    for start in range(0, len(sentences), window):
        part = sentences[start : start + window]
        chunk_ids, chunk_masks, restore = length_sorted_chunks(engine.tokenize(part), batch_size, engine.pad_id)
        sorted_rows = []
        for ids, mask in zip(chunk_ids, chunk_masks):
            sorted_rows.append(embed(ids, mask)[:, :width].float().cpu())
            if bar is not None:  # batch by batch: a window can take minutes
                bar.update(len(ids))
        embeddings[start : start + len(part)] = torch.cat(sorted_rows)[restore]
    if bar is not None:
        bar.close()
    if normalize:
        embeddings = F.normalize(embeddings, dim=-1)
    return embeddings.numpy() if convert_to_numpy else embeddings


QUERY_PROMPT_NAMES, DOCUMENT_PROMPT_NAMES = ("query",), ("document", "passage", "corpus")  # as sentence-transformers


class Prompts:
    """A model's named prompts (text prepended before tokenization), as sentence-transformers keeps them in
    config_sentence_transformers.json: `encode(..., prompt_name=..., prompt=...)`, `encode_query` (the prompt
    named query) and `encode_document` (document, else passage, else corpus); shared by SentenceEncoder and
    the ONNX encoder."""

    prompts: dict[str, str]
    default_prompt_name: str | None

    def prompt_text(self, prompt_name: str | None = None, prompt: str | None = None) -> str:
        if prompt is not None:
            return prompt
        name = prompt_name if prompt_name is not None else self.default_prompt_name
        if name is None:
            return ""
        if name not in self.prompts:
            raise UserInputError(f"prompt_name {name!r}: the model's prompts are "
                                 f"{', '.join(self.prompts) or 'none'} (config_sentence_transformers.json)")
        return self.prompts[name]

    def role_prompt(self, role: str) -> str:
        """The model's own prompt for queries ("query") or documents ("document"), "" when it has none."""
        names = QUERY_PROMPT_NAMES if role == "query" else DOCUMENT_PROMPT_NAMES
        return next((self.prompts[name] for name in names if name in self.prompts), "")

    def encode_query(self, sentences: str | Sequence[str], **kwargs: Any) -> torch.Tensor | np.ndarray:
        if "prompt" not in kwargs and "prompt_name" not in kwargs:
            kwargs["prompt"] = self.role_prompt("query")
        return self.encode(sentences, **kwargs)

    def encode_document(self, sentences: str | Sequence[str], **kwargs: Any) -> torch.Tensor | np.ndarray:
        if "prompt" not in kwargs and "prompt_name" not in kwargs:
            kwargs["prompt"] = self.role_prompt("document")
        return self.encode(sentences, **kwargs)


def with_prompt(sentences: str | Sequence[str], prompt: str) -> str | Sequence[str]:
    if not prompt:
        return sentences
    return prompt + sentences if isinstance(sentences, str) else [prompt + s for s in sentences]
