"""Retrieval evaluation: encode a corpus and its queries, search exactly, score the ranking (ir_metrics.py).

score(q, d) = cos(e_q, e_d). Every distinct document text and every distinct query text is encoded
once (documents with the same text share an embedding, and both ids stay in the corpus), in the
encoder's streaming windows; the embeddings are normalised once, in place, and `search.top_k` scans
the corpus in chunks for each batch of queries, keeping the best DEPTH (100) documents of each.
Memory: the corpus embeddings (N x H float32: 1M documents x 768 = 3.1 GB, x 384 = 1.5 GB), one
window's token ids, and one batch of queries' scores against one chunk; the corpus texts and ids
themselves (about 1 GB of Python strings for a million short passages).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from kfdeb.errors import UserInputError
from kfdeb.ir_data import IrData
from kfdeb.ir_metrics import DEPTH, IR_KEYS, ir_figures
from kfdeb.search import top_k

TABLE_HEADER = ("| Model | nDCG@10 | MRR@10 | MAP@100 | Recall@1 | Recall@5 | Recall@10 | Recall@100 |\n"
                "|---|---|---|---|---|---|---|---|")


class Encoder(Protocol):
    def encode(self, sentences: Sequence[str], batch_size: int = ..., convert_to_numpy: bool = ...,
               prompt: str | None = ...) -> Any: ...


@dataclass
class IrResult:
    figures: dict[str, float]  # IR_KEYS -> value x 100, of the full embedding
    queries: int  # queries evaluated
    documents: int  # documents searched
    texts_encoded: int  # distinct query and document texts
    seconds: float  # encoding and search
    by_dim: dict[int, dict[str, float]] = field(default_factory=dict)  # the figures of each truncated width asked for


def encode_texts(encoder: Encoder, texts: Sequence[str], batch_size: int, show_progress: bool = False) -> np.ndarray:
    """The texts as they are: prompt="" keeps a model's default_prompt_name out (the caller prepended its own)."""
    progress = {"show_progress": True} if show_progress else {}  # asked of the encoder only when wanted
    return np.asarray(encoder.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, prompt="", **progress),
                      dtype=np.float32)


def unit_rows(embeddings: np.ndarray, dim: int | None = None) -> np.ndarray:
    """The rows' first `dim` coordinates (all: None) scaled to unit length; in place when the whole width is kept."""
    rows = np.ascontiguousarray(embeddings[:, :dim]) if dim is not None else embeddings
    rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    return rows


def search(data: IrData, corpus: np.ndarray, queries: np.ndarray, depth: int = DEPTH) -> dict[str, dict[str, float]]:
    """Each query's top `depth` documents with their cosines; corpus and queries: unit rows, in data's id order."""
    document_ids = list(data.corpus)
    scores, indices = top_k(queries, corpus, k=depth, normalized=True)
    return {q: dict(zip((document_ids[i] for i in found), values))
            for q, found, values in zip(data.queries, indices.tolist(), scores.tolist())}


def model_prompts(encoder: Any) -> tuple[str, str]:
    """The encoder's own query and document prompts (e5's "query: ", "passage: "), "" where it has none."""
    role_prompt = getattr(encoder, "role_prompt", None)
    return (role_prompt("query"), role_prompt("document")) if role_prompt else ("", "")


def evaluate_retrieval(encoder: Encoder, data: IrData, batch_size: int = 64, dims: Sequence[int] = (),
                       query_prompt: str | None = None, document_prompt: str | None = None,
                       show_progress: bool = False) -> IrResult:
    """The retrieval figures of `encoder` on `data` (module docstring), and of the embeddings' first d
    coordinates for each d of `dims` (Matryoshka: encoded once, as evaluation.evaluate_sts does).

    Queries get `query_prompt` and documents `document_prompt` prepended (None: the model's own prompts,
    as sentence-transformers' encode_query / encode_document apply them); show_progress: the encoder draws its bars."""
    started = time.perf_counter()
    own_query, own_document = model_prompts(encoder)
    query_prompt = own_query if query_prompt is None else query_prompt
    document_prompt = own_document if document_prompt is None else document_prompt
    distinct = list(dict.fromkeys(data.corpus.values()))
    query_texts = list(dict.fromkeys(data.queries.values()))
    corpus = encode_texts(encoder, [document_prompt + text for text in distinct], batch_size, show_progress)
    queries = encode_texts(encoder, [query_prompt + text for text in query_texts], batch_size, show_progress)
    if len(distinct) < len(data.corpus):  # a text under several ids: each id gets its row
        row = {text: i for i, text in enumerate(distinct)}
        corpus = corpus[np.fromiter((row[text] for text in data.corpus.values()), dtype=np.int64, count=len(data.corpus))]
    query_row = {text: i for i, text in enumerate(query_texts)}
    queries = queries[[query_row[text] for text in data.queries.values()]]  # a copy: the query order of data
    too_wide = [d for d in dims if d > corpus.shape[1]]
    if too_wide:
        raise UserInputError(f"--dims {too_wide[0]}: wider than the model's {corpus.shape[1]}-dimensional embedding")
    by_dim = {dim: ir_figures(search(data, unit_rows(corpus, dim), unit_rows(queries, dim)), data.relevant)
              for dim in dims}
    figures = ir_figures(search(data, unit_rows(corpus), unit_rows(queries)), data.relevant)  # last: in place
    return IrResult(figures, len(data.queries), len(data.corpus), len(distinct) + len(query_texts),
                    time.perf_counter() - started, by_dim)


def ir_set_line(data: IrData) -> str:
    """What a retrieval evaluation is about to search, for the line announcing it."""
    return f"{data.name}, {len(data.queries):,} queries over {len(data.corpus):,} documents"


def ir_table_row(name: str, figures: dict[str, float]) -> str:
    """One row of the retrieval markdown table, figures with 2 decimals."""
    return "| " + " | ".join([name] + [f"{figures[key]:.2f}" for key in IR_KEYS]) + " |"
