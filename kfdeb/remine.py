"""Hard negatives refreshed during training: `--remine_every N` (none of the reference trainers does it built in).

Negatives mined once, before training (mine.py), were the hardest for the *starting* weights; after some
updates the model has learnt to push those away and others have become its hardest. So after every N-th
step (not the last) the in-batch objective's rows (anchor, positive, negative_1 .. negative_k) get new
negatives, mined with the weights of that step exactly as mine.py mines (mining.py: sentence-transformers'
`mine_hard_negatives`, its options, n-tuple output with k negatives). The loop does it at the start of the
next step, not at the end of that one: a SIGTERM stop is not delayed by a mining, and a state saved at that
step holds the negatives before the refresh, which a resumed run then makes the same way.

- queries: the rows' distinct anchors, with the query prompt; corpus: every distinct text of the rows'
  positive and negative columns *as read* (Pool: the candidates do not shrink to the last refresh's picks),
  with the document prompt. The new negatives are therefore texts the run has already tokenized (ids of the
  task's own table): nothing is read or tokenized again;
- a query's own positives and its own text are never its negatives (mining.py's rules), and the filters
  (range_min, range_max, margins, max/min score) are the reference's;
- each row takes the k negatives mined for its (anchor, positive), best first; a row for which mining finds
  fewer than k keeps the ones it had (the log line counts them: a silent mix would hide a filter set too
  tight);
- the no-duplicates sampler reads the new negatives' keys (normalised-text ids), so every batch after the
  refresh still holds no text twice (positives excepted) and the loss's shared-positive masks stay right.

Every rank must draw the same global batches: rank 0 mines, and broadcasts the new negative columns (one
collective every N steps). The negative columns are part of the resumable state (run.Parts.state_dict), so
`--resume` goes on with the negatives of the last refresh, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from kfdeb import distributed
from kfdeb.errors import UserInputError
from kfdeb.mining import MiningSettings, mine_hard_negatives


@dataclass(frozen=True)
class Refreshed:
    """What one refresh did (its log line)."""

    step: int
    rows: int  # the objective's rows
    mined: int  # rows that got k negatives from this step's mining
    kept: int  # rows for which mining found fewer than k: their previous negatives stay
    changed: int  # rows whose negatives differ from before
    negatives: int  # k: negatives per row

    def line(self) -> str:
        return (f"step {self.step}: hard negatives re-mined with this step's weights (--remine_every): "
                f"{self.changed} of {self.rows} rows changed, {self.kept} kept their own (fewer than "
                f"{self.negatives} found)")


@dataclass(frozen=True)
class Pool:
    """What every refresh of a run mines over, fixed from the rows as read (so the candidates never shrink to
    the last refresh's picks): the corpus's text ids, and each text id's normalised-text key."""

    corpus: np.ndarray  # distinct text ids of the rows' positive and negative columns
    key_by_text: np.ndarray  # text id -> key (-1: a text no row holds)


def pool_of(rows: np.ndarray, keys: np.ndarray, num_texts: int) -> Pool:
    """The rows' Pool; also checks that they have negatives to refresh."""
    if rows.shape[1] < 3:
        raise UserInputError("--remine_every needs rows with negatives (anchor, positive, negative...): these are "
                             "pairs; mine them first with mine.py (its --output_format n-tuple), then train on its output")
    key_by_text = np.full(num_texts, -1, dtype=np.int32)
    key_by_text[np.asarray(rows)] = np.asarray(keys)
    return Pool(np.unique(np.asarray(rows[:, 1:])), key_by_text)


def remined_negatives(encoder: Any, rows: np.ndarray, texts: Sequence[str], corpus: np.ndarray,
                      settings: MiningSettings, prompts: tuple[str, str], batch_size: int) -> tuple[np.ndarray, int]:
    """(the new negative columns, N x k text ids; how many rows got k mined negatives) (module docstring).

    rows: N x (2 + k) text ids of `texts`; corpus: the text ids mined over (Pool.corpus); encoder: anything with
    mining.py's `encode`."""
    k = rows.shape[1] - 2
    # one text at a time, as a slice: the token cache's TextTable is indexed by spans
    text_of = {int(i): texts[int(i):int(i) + 1][0] for i in np.union1d(np.unique(rows[:, 0]), corpus)}
    id_of = {text: i for i, text in text_of.items()}
    pairs = [(text_of[int(a)], text_of[int(p)]) for a, p in rows[:, :2]]
    mined = mine_hard_negatives(encoder, pairs, [text_of[int(i)] for i in corpus], MiningSettings(
        range_min=settings.range_min, range_max=settings.range_max, max_score=settings.max_score,
        min_score=settings.min_score, absolute_margin=settings.absolute_margin,
        relative_margin=settings.relative_margin, num_negatives=k, sampling_strategy=settings.sampling_strategy,
        output_format="n-tuple", seed=settings.seed), query_prompt=prompts[0], corpus_prompt=prompts[1],
        batch_size=batch_size)
    negatives_of = {(anchor, positive): [id_of[text] for text in negatives]
                    for anchor, positive, *negatives in mined.rows}
    negatives = np.array(rows[:, 2:], dtype=np.int32)
    found = 0
    for row, pair in enumerate(pairs):
        if pair in negatives_of:
            negatives[row] = negatives_of[pair]
            found += 1
    return negatives, found


def apply_negatives(task: Any, negatives: np.ndarray, pool: Pool) -> None:
    """The task's rows, keys and sampler keys with these negative columns (copies: the token cache's arrays
    are read-only memory maps)."""
    task.rows = np.concatenate([np.asarray(task.rows[:, :2]), negatives.astype(np.int32)], axis=1)
    task.keys = pool.key_by_text[task.rows]
    task.sampler.keys = task.keys
    task.negatives_refreshed = True


def refresh(task: Any, encoder: Any, pool: Pool, settings: MiningSettings, prompts: tuple[str, str],
            batch_size: int, ctx: distributed.Context, step: int) -> Refreshed:
    """Rank 0 mines the new negatives with the encoder's current weights; every rank applies the same."""
    before = np.array(task.rows[:, 2:], dtype=np.int32)
    found = 0
    if ctx.is_main:
        negatives, found = remined_negatives(encoder, np.asarray(task.rows), task.texts, pool.corpus, settings,
                                             prompts, batch_size)
        shared = {"negatives": torch.from_numpy(negatives), "found": torch.tensor([found])}
    else:
        shared = None
    shared = distributed.broadcast_tensors(ctx, shared)  # every rank: rank 0's columns (module docstring)
    negatives, found = shared["negatives"].numpy().astype(np.int32), int(shared["found"][0])
    apply_negatives(task, negatives, pool)
    changed = int((negatives != before).any(axis=1).sum())
    return Refreshed(step, len(negatives), found, len(negatives) - found, changed, negatives.shape[1])
