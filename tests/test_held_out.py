"""Held-out retrieval sets (kfdeb/held_out.py): --ir_dev_fraction's split and the bundled chatbot sets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from kfdeb.held_out import chatbot_sets, group_rows, hold_out, retrieval_set
from kfdeb.ir_data import read_ir_data

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "data"


def faq_rows(seed: int = 0) -> list[tuple[str, str]]:
    """FAQ-shaped pairs: answers with 1 to 6 questions, a few questions with two answers."""
    draw = random.Random(seed)
    rows = [(f"q{a}-{i}", f"a{a}") for a in range(60) for i in range(draw.randint(1, 6))]
    rows += [(f"q{a}-0", f"a{a + 1}") for a in range(0, 60, 10)]  # links answers a and a+1 through a question
    draw.shuffle(rows)
    return rows


def components(rows) -> list[set[int]]:
    """Connected components of rows linked by a shared text, by a naive search (independent of group_rows)."""
    left, found = set(range(len(rows))), []
    while left:
        stack, group = [left.pop()], set()
        while stack:
            i = stack.pop()
            group.add(i)
            linked = {j for j in left if {rows[j][0], rows[j][1]} & {rows[i][0], rows[i][1]}}
            left -= linked
            stack += linked
        found.append(group)
    return found


def test_groups_are_the_rows_linked_by_a_shared_anchor_or_positive():
    rows = faq_rows()
    groups = group_rows(rows)
    assert sorted(sorted(g) for g in components(rows)) == sorted(
        sorted(i for i, g in enumerate(groups) if g == number) for number in set(groups))


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_a_split_keeps_groups_whole_honours_the_fraction_within_one_group_and_depends_on_the_seed_only(fraction):
    rows = faq_rows()
    training, held = hold_out(rows, fraction, seed=7)
    assert sorted(training + held) == list(range(len(rows))) and not set(training) & set(held)
    train_texts = {text for i in training for text in rows[i][:2]}
    assert not train_texts & {text for i in held for text in rows[i][:2]}  # no question or answer on both sides
    largest = max(len(g) for g in components(rows))
    assert fraction * len(rows) <= len(held) < fraction * len(rows) + largest
    assert hold_out(rows, fraction, seed=7) == (training, held)
    shuffled = list(rows)
    random.Random(1).shuffle(shuffled)  # the same rows in another order: the same rows held out
    again = hold_out(shuffled, fraction, seed=7)[1]
    assert sorted(shuffled[i] for i in again) == sorted(rows[i] for i in held)
    assert sorted(rows[i] for i in hold_out(rows, fraction, seed=8)[1]) != sorted(rows[i] for i in held)


def test_held_out_anchors_search_every_distinct_positive():
    rows = faq_rows()
    _, held = hold_out(rows, 0.2, seed=3)
    data = retrieval_set("faq", rows, held)
    assert sorted(data.corpus.values()) == sorted({positive for _, positive in rows})
    found = {(data.queries[q], data.corpus[d]) for q, docs in data.relevant.items() for d in docs}
    assert found == {rows[i] for i in held}


def test_the_shipped_chatbot_files_are_what_chatbot_sets_builds_from_their_union():
    test = read_ir_data("kfdeb:chatbot-test", "test")
    read = lambda path: [tuple(json.loads(line).values()) for line in path.read_text(encoding="utf-8").splitlines()]
    dev, train = read(EXAMPLES / "dev_pairs.jsonl"), read(EXAMPLES / "chatbot_train_pairs.jsonl")
    test_pairs = [(test.queries[q], test.corpus[d]) for q, docs in test.relevant.items() for d in docs]
    built_test, built_dev, built_train = chatbot_sets(test_pairs + dev + train)
    assert (built_dev, built_train) == (dev, train)
    assert (test.queries, test.corpus, test.relevant) == (built_test.queries, built_test.corpus, built_test.relevant)
    # test questions search among every answer of the data, the trained ones included
    assert set(test.corpus.values()) == {a for _, a in test_pairs + dev + train}
    sides = [{t for pair in pairs for t in pair} for pairs in (test_pairs, dev, train)]
    assert not sides[0] & sides[1] and not sides[0] & sides[2] and not sides[1] & sides[2]
    assert len(test_pairs) / (len(test_pairs) + len(dev) + len(train)) == pytest.approx(0.2, abs=0.01)
    assert (REPO / "kfdeb" / "bundled" / "retrieval" / "chatbot-test" / "LICENSE").read_text().lstrip().startswith("The MIT License")
    assert (EXAMPLES / "LICENSE-chatbot-data").read_text().lstrip().startswith("The MIT License")
