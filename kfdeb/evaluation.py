"""KorSTS evaluation: embed every distinct sentence once, then the 8 figures of metrics.py.

The reference evaluator encodes sentence1 and sentence2 columns separately (a sentence that
occurs in several pairs is encoded several times); embeddings do not depend on what else is in
the batch, so encoding each distinct sentence once gives the same figures with less work.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from kfdeb.readers import StsPair, read_sts, sts_path
from kfdeb.errors import UserInputError
from kfdeb.metrics import FIGURE_KEYS, SIMILARITIES, sts_figures

TABLE_HEADER = (
    "| Model | Cosine Pearson | Cosine Spearman | Euclidean Pearson | Euclidean Spearman "
    "| Manhattan Pearson | Manhattan Spearman | Dot Pearson | Dot Spearman |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


class Encoder(Protocol):
    def encode(self, sentences: Sequence[str], batch_size: int = ..., convert_to_numpy: bool = ...): ...


@dataclass
class StsResult:
    figures: dict[str, float]  # FIGURE_KEYS -> value x 100, of the full embedding
    sentences: int  # distinct sentences encoded
    seconds: float  # encoding wall time
    by_dim: dict[int, dict[str, float]] = field(default_factory=dict)  # the figures of each truncated width asked for

    def figures_at(self, dim: int | None) -> dict[str, float]:
        """The figures of the first `dim` coordinates (None: the full embedding)."""
        return self.figures if dim is None else self.by_dim[dim]

    @property
    def sentences_per_second(self) -> float:
        return self.sentences / self.seconds if self.seconds > 0 else float("inf")


def distinct_sentences(pairs: Sequence[StsPair]) -> list[str]:
    """Every sentence of the pairs once, in order of first appearance: what gets encoded."""
    return list(dict.fromkeys(s for pair in pairs for s in (pair.sentence1, pair.sentence2)))


def pair_embeddings(encoder: Encoder, pairs: Sequence[StsPair], batch_size: int = 64,
                    show_progress: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """(embeddings of each pair's sentence1, of its sentence2, the number of sentences encoded):
    every distinct sentence is encoded once, in float32."""
    distinct = distinct_sentences(pairs)
    progress = {"show_progress": True} if show_progress else {}  # asked of the encoder only when wanted
    embeddings = np.asarray(encoder.encode(distinct, batch_size=batch_size, convert_to_numpy=True, **progress),
                            dtype=np.float32)
    row = {sentence: i for i, sentence in enumerate(distinct)}
    return embeddings[[row[p.sentence1] for p in pairs]], embeddings[[row[p.sentence2] for p in pairs]], len(distinct)


def evaluate_sts(encoder: Encoder, pairs: Sequence[StsPair], batch_size: int = 64, dims: Sequence[int] = (),
                 show_progress: bool = False) -> StsResult:
    """The 8 figures of the embeddings, and of their first d coordinates for each d of `dims`
    (Matryoshka: the sentences are encoded once; truncation as sentence-transformers' truncate_dim);
    show_progress: the encoder draws its progress bar."""
    start = time.perf_counter()
    first, second, encoded = pair_embeddings(encoder, pairs, batch_size, show_progress)
    seconds = time.perf_counter() - start
    too_wide = [d for d in dims if d > first.shape[1]]
    if too_wide:
        raise UserInputError(f"--dims {too_wide[0]}: wider than the model's {first.shape[1]}-dimensional embedding")
    gold = np.array([p.label for p in pairs], dtype=np.float64)
    by_dim = {dim: sts_figures(first[:, :dim], second[:, :dim], gold) for dim in dims}
    return StsResult(sts_figures(first, second, gold), encoded, seconds, by_dim)


def evaluate_split(encoder: Encoder, data_dir: str | os.PathLike, split: str, batch_size: int = 64,
                   dims: Sequence[int] = ()) -> StsResult:
    return evaluate_sts(encoder, read_sts(sts_path(data_dir, split)), batch_size, dims)


def sts_set_line(name: str, pairs: Sequence[StsPair]) -> str:
    """What an STS evaluation is about to encode, for the line announcing it: `KorSTS dev, 2,888 sentences`."""
    return f"{name}, {len(distinct_sentences(pairs)):,} sentences"


def table_row(name: str, figures: dict[str, float]) -> str:
    """One row of the KorSTS markdown table, figures with 2 decimals."""
    return "| " + " | ".join([name] + [f"{figures[key]:.2f}" for key in FIGURE_KEYS]) + " |"


def best_score(figures: dict[str, float], metric: str) -> float:
    """The figure that selects the best checkpoint: one of FIGURE_KEYS, max_spearman (the largest of the
    four Spearman figures, what the reference's evaluator returned), a retrieval figure (ir_metrics.IR_KEYS),
    or `A+B`, the mean of two of these (e.g. cosine_spearman+ndcg@10: a checkpoint good at both)."""
    if "+" in metric:
        parts = [best_score(figures, part) for part in metric.split("+")]
        return sum(parts) / len(parts)
    if metric == "max_spearman":
        defined = [figures[f"{sim}_spearman"] for sim in SIMILARITIES if not np.isnan(figures[f"{sim}_spearman"])]
        return max(defined, default=float("nan"))
    return figures[metric]
