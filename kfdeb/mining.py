"""Hard-negative mining with the semantics and option names of sentence-transformers' `util.mine_hard_negatives`.

For (anchor, positive) pairs and a corpus (the distinct positives, or given texts with the
positives added), with every text embedded once and normalised (queries with the query prompt,
the corpus with the document prompt), and s(q, d) = cos(q, d):

1. Queries are the distinct anchors; a query's positives are the distinct positives of its rows.
   P = the largest number of rows an anchor has (its duplicates counted, as the reference counts).
2. range_max, when not given: range_min + num_negatives + P, or range_min + 10 * num_negatives + P
   with a margin or max_score. Each query keeps its top range_max + P + 1 documents (exact search,
   search.top_k), fewer when the corpus is smaller: P + 1 extra for the candidates step 3 excludes.
3. Its own positives are never candidates, nor the query's own text when the corpus holds it (an
   anchor is never its own negative: sentence-transformers 6.3's rule; 6.2 could offer it). With absolute_margin m, a candidate d is dropped when
   s(q, d) + m > s_min, with relative_margin r when s(q, d) > s_min - |s_min| r, s_min the query's
   lowest positive score (its hardest positive); then max_score drops s > max, min_score s < min.
4. The top range_max survivors (by score); the first range_min of them are skipped; then "top" keeps
   the first num_negatives, "random" samples num_negatives among the survivors (a generator seeded
   with --seed), sorted by score.
5. Output: "triplet": one (anchor, positive, negative) row per query, positive and negative found
   (fewer negatives: fewer rows); "n-tuple": one (anchor, positive, negative_1 .. negative_n) row per
   query and positive, dropped when it lacks n negatives. The dropped and the missing are counted.

The summary is the reference's: count, mean, median, std, min, quartiles and max of the positive
scores, the negative scores and their differences; how many candidates each filter removed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from kfdeb.errors import UserInputError
from kfdeb.files import write_text
from kfdeb.search import top_k

SAMPLING_STRATEGIES = ("top", "random")
OUTPUT_FORMATS = ("triplet", "n-tuple")


@dataclass(frozen=True)
class MiningSettings:
    range_min: int = 0
    range_max: int | None = None
    max_score: float | None = None
    min_score: float | None = None
    absolute_margin: float | None = None
    relative_margin: float | None = None
    num_negatives: int = 3
    sampling_strategy: str = "top"
    output_format: str = "triplet"
    seed: int = 42  # the "random" strategy's generator

    def resolved_range_max(self, max_positives: int) -> int:
        """range_max as given, or the reference's default for these settings (module docstring, 2)."""
        if self.range_max is not None:
            return self.range_max
        filtered = self.absolute_margin is not None or self.relative_margin is not None or self.max_score is not None
        return self.range_min + (10 * self.num_negatives if filtered else self.num_negatives) + max_positives

    def check(self, max_positives: int = 1) -> None:
        """The reference's checks, as one-line errors naming the option."""
        if self.num_negatives < 1:
            raise UserInputError(f"--num_negatives {self.num_negatives}: must be at least 1")
        if self.sampling_strategy not in SAMPLING_STRATEGIES:
            raise UserInputError(f"--sampling_strategy {self.sampling_strategy!r}: expected top or random")
        if self.output_format not in OUTPUT_FORMATS:
            raise UserInputError(f"--output_format {self.output_format!r}: expected triplet or n-tuple")
        range_max = self.resolved_range_max(max_positives)
        if self.range_min < 0:
            raise UserInputError(f"--range_min {self.range_min}: must be at least 0")
        if self.range_min >= range_max:
            raise UserInputError(f"--range_min {self.range_min} must be smaller than --range_max {range_max}")
        if self.num_negatives > range_max - self.range_min:
            raise UserInputError(f"--num_negatives {self.num_negatives}: only {range_max - self.range_min} candidates "
                                 f"remain after skipping --range_min {self.range_min} of --range_max {range_max}")


REFRESH_OPTIONS = ("range_min", "range_max", "max_score", "min_score", "absolute_margin", "relative_margin",
                   "sampling_strategy")  # what --remine_options may set: the rows fix num_negatives and the format


def settings_from_options(text: str, seed: int, flag: str = "--remine_options") -> MiningSettings:
    """MiningSettings from "range_min=10,absolute_margin=0.1" (mine.py's option names); each wrong key or value
    a one-line error naming the flag."""
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in REFRESH_OPTIONS or not value.strip():
            raise UserInputError(f"{flag} {item!r}: expected NAME=VALUE with NAME one of {', '.join(REFRESH_OPTIONS)}")
        kind = str if name == "sampling_strategy" else int if name.startswith("range") else float
        try:
            values[name] = kind(value.strip())
        except ValueError:
            raise UserInputError(f"{flag} {item!r}: {name} takes {'an integer' if kind is int else 'a number'}") from None
    settings = MiningSettings(**values, num_negatives=1, output_format="n-tuple", seed=seed)
    settings.check()
    return settings


@dataclass
class Mined:
    columns: tuple[str, ...]
    rows: list[tuple[str, ...]]
    positive_scores: np.ndarray  # one per (query, positive)
    negative_scores: np.ndarray  # every negative kept in the output
    differences: np.ndarray  # positive score - negative score, per output negative
    skipped: dict[str, int] = field(default_factory=dict)  # filter -> candidates it removed
    missing: int = 0  # rows the output lacks for want of negatives
    possible: int = 0  # rows the output would have with every negative found
    queries: int = 0
    corpus: int = 0
    skipped_shares: dict[str, float] = field(default_factory=dict)  # filter -> share of the candidates it saw


def mine_hard_negatives(encoder: Any, pairs: Sequence[tuple[str, str]], corpus: Sequence[str] | None = None,
                        settings: MiningSettings = MiningSettings(), query_prompt: str = "", corpus_prompt: str = "",
                        batch_size: int = 32, show_progress: bool = False) -> Mined:
    """Negatives for each (anchor, positive) pair (module docstring); encoder: anything with `encode`."""
    counts: dict[str, int] = {}
    for anchor, _ in pairs:
        counts[anchor] = counts.get(anchor, 0) + 1
    max_positives = max(counts.values())
    settings.check(max_positives)
    range_max = settings.resolved_range_max(max_positives)
    documents = list(dict.fromkeys(list(corpus or []) + [positive for _, positive in pairs]))
    document_row = {text: i for i, text in enumerate(documents)}
    queries = list(dict.fromkeys(anchor for anchor, _ in pairs))
    positives: list[list[int]] = [[] for _ in queries]
    query_row = {text: i for i, text in enumerate(queries)}
    for anchor, positive in pairs:
        found = positives[query_row[anchor]]
        if document_row[positive] not in found:
            found.append(document_row[positive])

    def embed(texts: list[str], prompt: str) -> torch.Tensor:
        vectors = encoder.encode([prompt + t for t in texts], batch_size=batch_size, convert_to_numpy=True, prompt="",
                                 show_progress=show_progress)
        return torch.nn.functional.normalize(torch.as_tensor(np.asarray(vectors, dtype=np.float32)), dim=-1)

    document_vectors, query_vectors = embed(documents, corpus_prompt), embed(queries, query_prompt)
    candidates = range_max + max_positives + 1  # the +1: room for the query's own text (module docstring, 3)
    k = min(candidates, len(documents))
    scores, indices = top_k(query_vectors, document_vectors, k=k, normalized=True)
    if k < candidates:  # pad to the reference's width with nothing
        missing = candidates - k
        scores = torch.cat([scores, scores.new_full((len(queries), missing), -math.inf)], dim=1)
        indices = torch.cat([indices, indices.new_full((len(queries), missing), -1)], dim=1)
    positive_scores = [[float(query_vectors[q] @ document_vectors[d]) for d in positives[q]] for q in range(len(queries))]
    for q, own in enumerate(positives):
        scores[q, torch.isin(indices[q], torch.tensor(own))] = -math.inf  # a query's positives are not negatives
        if queries[q] in document_row:  # nor is the query's own text
            scores[q, indices[q] == document_row[queries[q]]] = -math.inf
    scores[indices == -1] = -math.inf
    skipped: dict[str, int] = {}
    shares: dict[str, float] = {}
    lowest = torch.tensor([min(p) for p in positive_scores], dtype=scores.dtype)[:, None]  # the hardest positive
    filters = [("absolute_margin", settings.absolute_margin, lambda m: scores + m > lowest),
               ("relative_margin", settings.relative_margin, lambda m: scores > lowest - lowest.abs() * m),
               ("max_score", settings.max_score, lambda m: scores > m),
               ("min_score", settings.min_score, lambda m: scores < m)]
    considered = scores.numel()  # the reference's denominator of each filter's share: the margins reduce it
    for name, value, removes in filters:
        if value is not None:
            removed = removes(value) & torch.isfinite(scores)
            scores[removed] = -math.inf
            if int(removed.sum()):
                skipped[name] = int(removed.sum())
                shares[name] = skipped[name] / considered
                considered -= skipped[name] if name.endswith("margin") else 0
    # the top range_max survivors, best first (a stable sort: equal scores keep the search's order)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :range_max]
    scores, indices = scores.gather(1, order)[:, settings.range_min:], indices.gather(1, order)[:, settings.range_min:]
    if settings.sampling_strategy == "top":
        scores, indices = scores[:, :settings.num_negatives], indices[:, :settings.num_negatives]
    else:
        rng = random.Random(settings.seed)
        options = torch.isfinite(scores).sum(1).clamp(min=settings.num_negatives).tolist()
        picked = torch.tensor([sorted(rng.sample(range(n), k=settings.num_negatives)) for n in options])
        scores, indices = scores.gather(1, picked), indices.gather(1, picked)
    mined = _rows(queries, documents, positives, positive_scores, scores, indices, settings, skipped)
    mined.skipped_shares = shares
    return mined


def _rows(queries: list[str], documents: list[str], positives: list[list[int]], positive_scores: list[list[float]],
          scores: torch.Tensor, indices: torch.Tensor, settings: MiningSettings, skipped: dict[str, int]) -> Mined:
    """The output rows of one of OUTPUT_FORMATS, and the figures of the summary."""
    n = settings.num_negatives
    rows, kept_negatives, differences, possible = [], [], [], 0
    for q, query in enumerate(queries):
        found = [(documents[int(d)], float(s)) for d, s in zip(indices[q], scores[q]) if math.isfinite(s)]
        for positive, positive_score in zip(positives[q], positive_scores[q]):
            if settings.output_format == "triplet":
                possible += n
                rows += [(query, documents[positive], negative) for negative, _ in found]
                kept = [s for _, s in found]
            else:
                possible += 1
                kept = [s for _, s in found] if len(found) == n else []
                if kept:
                    rows.append((query, documents[positive], *(negative for negative, _ in found)))
            kept_negatives += kept
            differences += [positive_score - s for s in kept]
    columns = ("anchor", "positive", "negative") if settings.output_format == "triplet" else \
        ("anchor", "positive", *(f"negative_{i}" for i in range(1, n + 1)))
    return Mined(columns, rows, np.array([s for scores in positive_scores for s in scores]), np.array(kept_negatives),
                 np.array(differences), skipped, possible - len(rows), possible, len(queries), len(documents))


def summary(mined: Mined, settings: MiningSettings) -> str:
    """The reference's report: the score statistics, each filter's removals, the rows it could not fill."""
    def stats(values: np.ndarray) -> list[str]:
        if not len(values):
            return ["0", *["-"] * 8]
        lower_median = np.sort(values)[(len(values) - 1) // 2]  # torch.median's, as the reference prints it
        return [f"{len(values):,}", *(f"{v:.4f}" for v in (
            values.mean(), lower_median, values.std(ddof=1) if len(values) > 1 else 0.0, values.min(),
            *np.quantile(values, [0.25, 0.5, 0.75]), values.max()))]

    columns = [stats(mined.positive_scores), stats(mined.negative_scores), stats(mined.differences)]
    lines = [f"{'Metric':<6} {'Positive':>14} {'Negative':>14} {'Difference':>14}"]
    for i, name in enumerate(("Count", "Mean", "Median", "Std", "Min", "25%", "50%", "75%", "Max")):
        lines.append(f"{name:<6} {columns[0][i]:>14} {columns[1][i]:>14} {'' if i == 0 else columns[2][i]:>14}")
    for name, count in mined.skipped.items():
        share = mined.skipped_shares.get(name, 0.0)
        lines.append(f"Skipped {count:,} potential negatives ({share:.2%}) due to the {name} of {getattr(settings, name)}.")
    if mined.missing:
        lines.append(f"Could not find enough negatives for {mined.missing} samples "
                     f"({mined.missing / mined.possible:.2%}): the output has {len(mined.rows):,} rows.")
    return "\n".join(lines)


def write_rows(path: Path, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """The rows in the own-data format of `path`'s extension (.jsonl, .csv, .tsv), written whole or not at all."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        text = "".join(json.dumps(dict(zip(columns, row)), ensure_ascii=False) + "\n" for row in rows)
    elif suffix == ".csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        text = buffer.getvalue()
    elif suffix == ".tsv":
        bad = next((text for row in rows for text in row if "\t" in text or "\n" in text or "\r" in text), None)
        if bad is not None:
            raise UserInputError(f"{path}: a text holds a tab or a line break, which .tsv cannot carry ({bad[:40]!r}); "
                                 "write .jsonl or .csv")
        text = "\t".join(columns) + "\n" + "".join("\t".join(row) + "\n" for row in rows)
    else:
        raise UserInputError(f"{path}: --output: unknown format {suffix or '(no extension)'!r} (expected .jsonl, .csv, .tsv)")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)
