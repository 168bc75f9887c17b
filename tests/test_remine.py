"""Hard negatives re-mined during training (kfdeb/remine.py) against sentence-transformers' mine_hard_negatives."""

from __future__ import annotations

import numpy as np
import pytest

from kfdeb.batching import NoDuplicatesBatches, normalised_keys, number_texts
from kfdeb.errors import UserInputError
from kfdeb.mining import MiningSettings
from kfdeb.model import load_encoder
from kfdeb.readers import read_nli
from kfdeb.remine import apply_negatives, pool_of, remined_negatives

import sentence_transformers as st  # noqa: E402  (the [test] extra: the reference is always there in CI)

REFERENCE = f"sentence-transformers {st.__version__}'s mine_hard_negatives"


@pytest.fixture(scope="module")
def triplets(bundled_dir):
    """(premise, entailment, contradiction) rows of the bundled XNLI dev file, two premises with two entailments."""
    by_premise: dict[str, dict[str, str]] = {}
    for premise, hypothesis, label in read_nli(bundled_dir / "KorNLI" / "xnli.dev.ko.tsv").pairs:
        by_premise.setdefault(premise, {}).setdefault(label, hypothesis)
    rows = [(p, h["entailment"], h["contradiction"]) for p, h in by_premise.items()
            if "entailment" in h and "contradiction" in h][:120]
    return rows + [(rows[0][0], rows[1][1], rows[0][2]), (rows[2][0], rows[3][1], rows[2][2])]


@pytest.fixture(scope="module")
def models(tiny_bert):
    reference = st.SentenceTransformer(str(tiny_bert), device="cpu")
    reference.max_seq_length = 64
    return load_encoder(tiny_bert, max_seq_length=64), reference


def reference_negatives(reference, rows: list[tuple[str, ...]], k: int, **options) -> dict[tuple[str, str], list[str]]:
    from datasets import Dataset

    dataset = Dataset.from_dict({"anchor": [r[0] for r in rows], "positive": [r[1] for r in rows]})
    corpus = list(dict.fromkeys(text for r in rows for text in r[2:]))
    mined = st.util.mine_hard_negatives(dataset, reference, corpus=corpus, batch_size=32, num_negatives=k,
                                        output_format="n-tuple", verbose=False, **options)
    return {(row["anchor"], row["positive"]): [row[f"negative_{i}"] for i in range(1, k + 1)] for row in mined}


@pytest.mark.parametrize("options", [{}, {"range_min": 2}, {"absolute_margin": 0.02}], ids=["top", "range_min", "margin"])
def test_each_row_takes_the_references_negatives_or_keeps_its_own(models, triplets, options):
    """Every row's new negatives are those sentence-transformers mines for its (anchor, positive) over the rows'
    positive and negative texts; a row the reference leaves without k negatives keeps its old ones."""
    ours, reference = models
    rows, texts = number_texts(triplets)
    pool = pool_of(rows, normalised_keys(rows, texts), len(texts))
    negatives, found = remined_negatives(ours, rows, texts, pool.corpus, MiningSettings(**options), ("", ""),
                                         batch_size=32)
    expected = reference_negatives(reference, triplets, 1, **options)
    assert found == sum((a, p) in expected for a, p, _ in triplets)
    for row, (anchor, positive, old) in enumerate(triplets):
        assert [texts[i] for i in negatives[row]] == expected.get((anchor, positive), [old]), REFERENCE
    assert (negatives != rows[:, 2:]).any()  # the test says something: negatives did change
    if "absolute_margin" in options:
        assert found < len(triplets)  # and some rows kept theirs


def test_new_negatives_keep_the_no_duplicates_rule_and_the_keys(models, triplets):
    """After the refresh the sampler reads the new keys: no batch holds a text twice (positives excepted), and
    each text id keeps its normalised-text key."""
    ours, _ = models
    rows, texts = number_texts(triplets)
    keys = normalised_keys(rows, texts)

    class Task:  # the fields apply_negatives touches
        pass

    task = Task()
    task.rows, task.keys = rows, keys
    task.sampler = NoDuplicatesBatches.from_keys(keys, 16, seed=0)
    pool = pool_of(rows, keys, len(texts))
    negatives, _ = remined_negatives(ours, rows, texts, pool.corpus, MiningSettings(), ("", ""), batch_size=32)
    apply_negatives(task, negatives, pool)
    assert np.array_equal(task.rows[:, 2:], negatives) and np.array_equal(task.rows[:, :2], rows[:, :2])
    assert np.array_equal(task.keys, normalised_keys(task.rows, texts))
    for _ in range(len(task.sampler)):
        batch = task.sampler.next_batch()
        others = [key for row in batch for key in (task.keys[row, 0], *task.keys[row, 2:])]
        positives = {task.keys[row, 1] for row in batch}
        assert len(others) == len(set(others)) and positives.isdisjoint(others)


def test_pairs_have_no_negatives_to_refresh():
    with pytest.raises(UserInputError, match="--remine_every needs rows with negatives"):
        pool_of(np.zeros((4, 2), dtype=np.int32), np.zeros((4, 2), dtype=np.int32), 1)
