"""Exact cosine top-k search of query embeddings against a corpus, in bounded memory.

score(q, c) = q.c / (|q| |c|). For each query the k corpus rows of highest score, best first;
ties keep the lower corpus index first. The corpus is scanned in chunks of `corpus_chunk` rows
and the queries in batches of `query_batch`, merging each chunk's best k into a running best k,
so memory is query_batch x (corpus_chunk + k) scores, never queries x corpus: a 1M x 768 corpus
is searched without a 1M-column score matrix. k larger than the corpus is clamped to the corpus
size (every row is returned, ranked).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _as_matrix(x: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(x)
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be a matrix (rows of embeddings), got shape {tuple(tensor.shape)}")
    return tensor.float()


def top_k(
    query_embeddings: np.ndarray | torch.Tensor,
    corpus_embeddings: np.ndarray | torch.Tensor,
    k: int = 10,
    query_batch: int = 256,
    corpus_chunk: int = 65536,
    normalized: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices), each queries x min(k, corpus size): cosine scores and corpus row numbers.

    normalized=True: the rows are unit vectors already (the caller normalised them once), so the
    cosine is the dot product and no chunk is normalised again for every batch of queries."""
    queries = _as_matrix(query_embeddings, "query_embeddings")
    corpus = _as_matrix(corpus_embeddings, "corpus_embeddings")
    if queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"queries have dimension {queries.shape[1]} but the corpus has {corpus.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(k, corpus.shape[0])
    all_scores, all_indices = [], []
    for q_start in range(0, queries.shape[0], query_batch):
        q = queries[q_start : q_start + query_batch].to(corpus.device)
        q = q if normalized else F.normalize(q, dim=-1)
        best_scores = torch.empty((q.shape[0], 0), device=corpus.device)
        best_indices = torch.empty((q.shape[0], 0), dtype=torch.long, device=corpus.device)
        for c_start in range(0, corpus.shape[0], corpus_chunk):
            chunk = corpus[c_start : c_start + corpus_chunk]
            chunk = chunk if normalized else F.normalize(chunk, dim=-1)
            scores = q @ chunk.T
            indices = torch.arange(c_start, c_start + chunk.shape[0], device=corpus.device).expand_as(scores)
            # running best (lower indices) first, so the stable sort keeps lower indices ahead on ties
            scores = torch.cat([best_scores, scores], dim=1)
            indices = torch.cat([best_indices, indices], dim=1)
            order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
            best_scores, best_indices = scores.gather(1, order), indices.gather(1, order)
        all_scores.append(best_scores)
        all_indices.append(best_indices)
    return torch.cat(all_scores), torch.cat(all_indices)
