"""Held-out retrieval sets split from training pairs: `--ir_dev_fraction` and the bundled chatbot sets.

Rows are (anchor, positive, negative_1 .. negative_n). Two rows are one group when they share an
anchor or a positive text, transitively (union-find over the texts): every question of an answer
(FAQ data: many questions per answer) and every answer of a question fall in one group, so a
held-out positive is never a training positive and a held-out anchor never a training anchor.
Negatives do not link rows (a held-out positive may be a training row's negative: it is not
taught as anyone's answer there).

Which groups: the groups in a canonical order (by their smallest text, so the split does not
depend on the order of the rows), permuted by numpy's default_rng(seed), taken in that order
until the held-out rows reach fraction x rows: the count exceeds the target by less than one
group's rows.

The retrieval set of the held-out rows (`retrieval_set`): queries the held-out anchors, each
relevant to its held-out positives (grade 1); the corpus is every distinct positive of all rows,
training ones included. A held-out question then searches among all answers, as it will once the
model serves: with only the held-out answers the task would be easier and would not count the
confusions with trained answers.

The bundled chatbot sets (`chatbot_sets`): Chatbot_data_for_Korean's question -> answer rows
(duplicates dropped), a 20% test split (kfdeb:chatbot-test: test questions searching all distinct
answers), then a 5% slice of the rest as dev pairs (examples/data/dev_pairs.jsonl), the remainder
the training pairs (examples/data/chatbot_train_pairs.jsonl); bench/build_chatbot_sets.py writes them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kfdeb.ir_data import IrData

CHATBOT_SEED = 20181  # the chatbot sets' split (the data's v1.0, 2018)
CHATBOT_TEST_FRACTION, CHATBOT_DEV_FRACTION = 0.2, 0.05


def group_rows(rows: Sequence[Sequence[str]]) -> list[int]:
    """Each row's group number: rows sharing an anchor or a positive text, transitively."""
    parent: dict[str, str] = {}

    def root(text: str) -> str:
        parent.setdefault(text, text)
        while parent[text] != text:
            parent[text] = parent[parent[text]]  # path halving
            text = parent[text]
        return text

    for row in rows:
        a, p = root(row[0]), root(row[1])
        if a != p:
            parent[max(a, p)] = min(a, p)  # the smaller text is the root: the same roots whatever the row order
    smallest: dict[str, str] = {}
    for row in rows:
        r = root(row[0])
        smallest[r] = min(smallest.get(r, r), row[0], row[1])
    order = {r: i for i, r in enumerate(sorted(smallest, key=smallest.get))}
    return [order[root(row[0])] for row in rows]


def hold_out(rows: Sequence[Sequence[str]], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training row indices, held-out row indices), both ascending (module docstring)."""
    groups = group_rows(rows)
    sizes = np.bincount(groups, minlength=max(groups, default=-1) + 1)
    target = fraction * len(rows)
    chosen: set[int] = set()
    held = 0
    for group in np.random.default_rng(seed).permutation(len(sizes)):
        if held >= target:
            break
        chosen.add(int(group))
        held += int(sizes[group])
    training = [i for i, g in enumerate(groups) if g not in chosen]
    held_out = [i for i, g in enumerate(groups) if g in chosen]
    return training, held_out


def retrieval_set(name: str, rows: Sequence[Sequence[str]], held_out: Sequence[int]) -> IrData:
    """Queries the held-out anchors, corpus every distinct positive of `rows`, relevant the held-out positives."""
    document_ids = {text: f"d{i}" for i, text in enumerate(dict.fromkeys(row[1] for row in rows), 1)}
    query_ids: dict[str, str] = {}
    relevant: dict[str, dict[str, int]] = {}
    for i in held_out:
        anchor, positive = rows[i][0], rows[i][1]
        q = query_ids.setdefault(anchor, f"q{len(query_ids) + 1}")
        relevant.setdefault(q, {})[document_ids[positive]] = 1
    return IrData(name, {q: text for text, q in query_ids.items()}, {d: text for text, d in document_ids.items()},
                  relevant)


def chatbot_sets(pairs: Sequence[tuple[str, str]]) -> tuple[IrData, list[tuple[str, str]], list[tuple[str, str]]]:
    """(the test retrieval set, the dev pairs, the training pairs) of question -> answer `pairs` (module docstring).
    The pairs are deduplicated and sorted first, so the result depends on the set of pairs only."""
    rows = sorted(set(pairs))
    rest, test = hold_out(rows, CHATBOT_TEST_FRACTION, CHATBOT_SEED)
    remaining = [rows[i] for i in rest]
    training, dev = hold_out(remaining, CHATBOT_DEV_FRACTION / (1 - CHATBOT_TEST_FRACTION), CHATBOT_SEED + 1)
    return (retrieval_set("chatbot", rows, test), [remaining[i] for i in dev], [remaining[i] for i in training])

