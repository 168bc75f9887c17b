"""Triplets, random streams, samplers and collate (kfdeb/batching.py) against the reference's own procedures."""

from __future__ import annotations

import csv
import itertools
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from kfdeb import distributed
from kfdeb.batching import (
    STREAM_NLI_BATCHES, STREAM_STS_BATCHES, STREAM_TRIPLETS, NoDuplicatesBatches, ShuffledBatches, nli_triplets, pad_batch,
    random_stream, shard,
)
from kfdeb.config import resolve
from kfdeb.errors import UserInputError
from kfdeb.readers import read_nli
from kfdeb.tasks import read_task_data
from test_readers import write, write_own

def _partners(pairs):
    table: dict[str, dict[str, set]] = {}
    for a, b, label in pairs:
        table.setdefault(a, {}).setdefault(label, set()).add(b)
        table.setdefault(b, {}).setdefault(label, set()).add(a)
    return table


def test_nli_triplets_follow_the_reference_recipe(bundled_dir):
    pairs = read_nli(bundled_dir / "KorNLI" / "xnli.dev.ko.tsv").pairs
    triplets = nli_triplets(pairs, seed=3)
    table = _partners(pairs)
    qualifying = [s for s, by in table.items() if by.get("entailment") and by.get("contradiction")]
    assert len(triplets) == 2 * len(qualifying)
    for first, second in zip(triplets[0::2], triplets[1::2]):
        s = first.anchor
        assert second.positive == s  # (s, e, c) then (e', s, c')
        assert first.positive in table[s]["entailment"] and second.anchor in table[s]["entailment"]
        assert first.negative in table[s]["contradiction"] and second.negative in table[s]["contradiction"]
    assert [t.anchor for t in triplets[0::2]] == qualifying  # first-seen order, as the reference's dict
    assert nli_triplets(pairs, seed=3) == triplets
    # XNLI gives each premise one partner per label; with several, the seed picks among them
    many = [("s", f"e{i}", "entailment") for i in range(20)] + [("s", f"c{i}", "contradiction") for i in range(20)]
    draws = {tuple(nli_triplets(many, seed)[0]) for seed in range(10)}
    assert len(draws) > 5 and nli_triplets(many, 7) == nli_triplets(many, 7)


def reference_kor_nli_samples(path, choice):
    """The seed repository's `load_kor_nli_samples` (jhgan00/ko-sentence-transformers, data_util.py), transcribed:
    csv.DictReader, both directions into sets per label, two triplets per qualifying sentence."""
    data = {}
    with open(path, encoding="utf-8") as handle:
        for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            first, second = row["sentence1"].strip(), row["sentence2"].strip()
            for sent1, sent2 in ((first, second), (second, first)):
                data.setdefault(sent1, {"contradiction": set(), "entailment": set(), "neutral": set()})
                data[sent1][row["gold_label"]].add(sent2)
    samples = []
    for sent1, others in data.items():
        if others["entailment"] and others["contradiction"]:
            samples.append((sent1, choice(others["entailment"]), choice(others["contradiction"])))
            samples.append((choice(others["entailment"]), sent1, choice(others["contradiction"])))
    return samples


def only(options):
    assert len(options) == 1, options  # the cases below give each sentence one partner per label in each file
    return next(iter(options))


def nli_examples(data_dir, **overrides):
    config = resolve({"data_dir": str(data_dir), "tasks": "nli", **overrides})
    return read_task_data(config, Path(data_dir), distributed.Context(0, 0, 1, torch.device("cpu")))["nli"][0]


def test_triplets_are_built_file_by_file_as_the_reference_script_does(tmp_path, bundled_dir):
    """training_multi-task.py: `load_kor_nli_samples` per training file, lists concatenated. A sentence
    found in two files is an anchor in each, with that file's partners; scope union pools them."""
    header = "sentence1\tsentence2\tgold_label\n"
    write(tmp_path / "KorNLI" / "a.train.ko.tsv", header + "공유\t참1\tentailment\n공유\t거짓1\tcontradiction\n"
          "공유\t중립1\tneutral\n갑\t참2\tentailment\n갑\t거짓2\tcontradiction\n")
    write(tmp_path / "KorNLI" / "b.train.ko.tsv", header + "공유\t참3\tentailment\n공유\t거짓3\tcontradiction\n"
          "을\t참4\tentailment\n을\t거짓4\tcontradiction\n")
    files = sorted((tmp_path / "KorNLI").glob("*.train.ko.tsv"))
    expected = [t for path in files for t in reference_kor_nli_samples(path, only)]
    assert nli_examples(tmp_path) == expected and len(expected) == 8
    union = nli_examples(tmp_path, nli_triplet_scope="union")
    assert len(union) == 6 and [t for t in union if t.anchor == "공유"] == [union[0]]
    assert union[0].positive in {"참1", "참3"} and union[0].negative in {"거짓1", "거짓3"}

    # the bundled XNLI dev + test: each premise has one partner per label within its file, so the
    # reference's triplets are fixed; two sentences are in both files, one of them a premise
    xnli = dict(data_dir=bundled_dir, nli_train_glob="KorNLI/xnli.*.ko.tsv")
    expected = [t for name in ("xnli.dev.ko.tsv", "xnli.test.ko.tsv")
                for t in reference_kor_nli_samples(bundled_dir / "KorNLI" / name, only)]
    assert nli_examples(**xnli) == expected and len(expected) == 5000
    assert len(nli_examples(**xnli, nli_triplet_scope="union")) == 4998


def test_every_draw_has_its_own_random_stream():
    """numpy pads short seeds with zeros: default_rng(s) and default_rng([s, 0]) are one stream. Triplet
    draws, NLI passes and STS passes of one run, and those of neighbouring seeds, must not share one."""
    assert (np.random.default_rng(5).permutation(50) == np.random.default_rng([5, 0]).permutation(50)).all()
    firsts = {}
    for seed in range(12):
        for stream in (STREAM_TRIPLETS, STREAM_NLI_BATCHES, STREAM_STS_BATCHES):
            for pass_index in range(4):
                firsts[seed, stream, pass_index] = tuple(random_stream(seed, stream, pass_index).integers(2**62, size=2))
    assert len(set(firsts.values())) == len(firsts)

    # what the samplers draw: with distinct texts nothing is passed over, so a pass's batches are its permutation
    n, batch_size = 96, 8
    texts = [(f"a{i}", f"p{i}", f"n{i}") for i in range(n)]
    orders = {}
    for seed in range(6):
        nli, sts = NoDuplicatesBatches(texts, batch_size, seed), ShuffledBatches(n, batch_size, seed)
        for pass_index in range(3):
            orders["nli", seed, pass_index] = [i for _ in range(len(nli)) for i in nli.next_batch()]
            orders["sts", seed, pass_index] = [i for _ in range(len(sts)) for i in sts.next_batch()]
    assert all(sorted(order) == list(range(n)) for order in orders.values())
    keys = list(orders)
    for i, first in enumerate(keys):
        for second in keys[i + 1:]:  # independent permutations: rank correlation ~ N(0, 1/95)
            rho = np.corrcoef(orders[first], orders[second])[0, 1]
            assert abs(rho) < 0.45, (first, second, rho)
    many = [("s", f"e{i}", "entailment") for i in range(50)] + [("s", f"c{i}", "contradiction") for i in range(50)]
    assert nli_triplets(many, 3) == nli_triplets(many, random_stream(3, STREAM_TRIPLETS))


def legacy_no_duplicates(keys, batch_size, permutations, num_batches, positives_may_repeat=False):
    """The legacy NoDuplicatesDataLoader's loop, transcribed, with the permutations given; keys: each example's
    normalised texts in column order. positives_may_repeat: kfdeb's relaxation, a positive (column 1) may be
    another example's positive, nothing else may repeat."""
    order, pointer, passes, batches = permutations(0), 0, 0, []
    for _ in range(num_batches):
        batch, seen, positives = [], set(), set()
        while len(batch) < batch_size:
            example = keys[order[pointer]]
            if positives_may_repeat:
                others = [k for column, k in enumerate(example) if column != 1]
                clash = example[1] in seen or any(k in seen or k in positives for k in others)
            else:
                clash = any(k in seen or k in positives for k in example)
            if not clash:
                batch.append(order[pointer])
                if positives_may_repeat:
                    positives.add(example[1])
                    seen.update(others)
                else:
                    seen.update(example)
            pointer += 1
            if pointer >= len(order):
                pointer, passes = 0, passes + 1
                order = permutations(passes)
        batches.append(batch)
    return batches


def test_no_duplicates_sampler_matches_the_legacy_loop_and_has_no_duplicates():
    rng = random.Random(0)
    vocabulary = [f"문장 {i}" for i in range(60)]
    texts = [tuple(rng.choice(vocabulary) for _ in range(3)) for _ in range(200)]
    texts[5] = (" 문장 1", "문장 1 ".upper(), "다른")  # duplicates after strip().lower()
    sampler = NoDuplicatesBatches(texts, batch_size=8, seed=11)
    assert len(sampler) == 200 // 8
    ours = [sampler.next_batch() for _ in range(10 * len(sampler))]
    keys = [tuple(t.strip().lower() for t in example) for example in texts]
    permutations = lambda p: list(random_stream(11, STREAM_NLI_BATCHES, p).permutation(200))  # noqa: E731
    assert ours == legacy_no_duplicates(keys, 8, permutations, len(ours), positives_may_repeat=True)
    assert ours != legacy_no_duplicates(keys, 8, permutations, len(ours))  # positives do repeat here
    for batch in ours:
        assert len(batch) == 8
        for i, j in itertools.combinations(batch, 2):  # two rows share no text, except one positive as the positive
            rest = set(keys[i][:1] + keys[i][2:] + keys[j][:1] + keys[j][2:])
            shared = {keys[i][1]} if keys[i][1] == keys[j][1] and keys[i][1] not in rest else set()
            assert set(keys[i]) & set(keys[j]) == shared
    # coverage: examples passed over come back on later passes; an example whose own texts
    # repeat (5) is still drawn, as in the reference (it only checks against the batch so far)
    assert set(i for b in ours for i in b) == set(range(200))

    # without repeated positives the batches are exactly the legacy loader's
    unique_positives = [(a, f"p{i}", n) for i, (a, _, n) in enumerate(texts)]
    sampler = NoDuplicatesBatches(unique_positives, batch_size=8, seed=11)
    keys = [tuple(t.strip().lower() for t in example) for example in unique_positives]
    legacy = legacy_no_duplicates(keys, 8, permutations, 3 * len(sampler))
    assert [sampler.next_batch() for _ in range(3 * len(sampler))] == legacy


def test_faq_shaped_rows_fill_any_batch_and_repeat_only_positives():
    """Many questions per answer (one answer shared by more rows than half the batch): the legacy rule cannot fill
    a batch of 8 from 3 answers; with positives free to repeat every batch is full, and no anchor repeats."""
    rows = [(f"질문 {i}", f"답변 {i % 3}") for i in range(40)]
    sampler = NoDuplicatesBatches(rows, 8, seed=0)
    keys = [tuple(t.lower() for t in row) for row in rows]
    permutations = lambda p: list(random_stream(0, STREAM_NLI_BATCHES, p).permutation(40))  # noqa: E731
    with pytest.raises(IndexError):  # the legacy loop never fills one: it runs off its pass bound here
        legacy_no_duplicates(keys, 8, lambda p: permutations(p) if p < 3 else [], 1)
    batches = [sampler.next_batch() for _ in range(4 * len(sampler))]
    assert all(len(b) == 8 and len({rows[i][0] for i in b}) == 8 for b in batches)
    assert max(sum(rows[i][1] == "답변 0" for i in b) for b in batches) > 4
    assert sorted(i for b in batches[:len(sampler)] for i in b) == list(range(40))  # a pass is the permutation


def test_no_duplicates_sampler_is_deterministic_and_resumes_exactly():
    texts = [(f"a{i}", f"b{i % 50}", f"c{i}") for i in range(300)]
    first = NoDuplicatesBatches(texts, 16, seed=1)
    second = NoDuplicatesBatches(texts, 16, seed=1)
    other = NoDuplicatesBatches(texts, 16, seed=2)
    run = [first.next_batch() for _ in range(40)]
    assert run == [second.next_batch() for _ in range(40)]
    assert run != [other.next_batch() for _ in range(40)]
    restarted = NoDuplicatesBatches(texts, 16, seed=1)
    for _ in range(23):
        restarted.next_batch()
    state = restarted.state_dict()
    resumed = NoDuplicatesBatches(texts, 16, seed=1)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(17)] == run[23:]


def test_no_duplicates_sampler_reports_an_impossible_batch():
    texts = [("같은", "문장", f"{i}") for i in range(10)]
    with pytest.raises(UserInputError, match="too few distinct texts"):
        NoDuplicatesBatches(texts, 4, seed=0).next_batch()


def test_shuffled_batches_cover_each_pass_and_keep_the_short_last_batch():
    sampler = ShuffledBatches(21, 8, seed=5)
    assert len(sampler) == math.ceil(21 / 8)
    for _ in range(3):
        batches = [sampler.next_batch() for _ in range(len(sampler))]
        assert [len(b) for b in batches] == [8, 8, 5]
        assert sorted(i for b in batches for i in b) == list(range(21))
    again = ShuffledBatches(21, 8, seed=5)
    assert [again.next_batch() for _ in range(3)] != [again.next_batch() for _ in range(3)]  # reshuffled per pass


def test_shard_and_pad_batch():
    batch = list(range(10))
    for world in (1, 2, 3, 4, 10, 12):
        parts = [shard(batch, r, world) for r in range(world)]
        assert [i for p in parts for i in p] == batch
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, pad_to_multiple_of=4)
    assert ids.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_length_sorted_chunks_pad_less_and_restore_the_order():
    from kfdeb.batching import length_sorted_chunks

    rng = random.Random(1)
    sequences = [[rng.randrange(1, 99) for _ in range(rng.randrange(1, 40))] for _ in range(30)]
    chunk_ids, chunk_masks, restore = length_sorted_chunks(sequences, 8, pad_id=0)
    assert [len(c) for c in chunk_ids] == [8, 8, 8, 6]
    widths = [ids.shape[1] for ids in chunk_ids]
    assert widths == sorted(widths, reverse=True)  # longest first: a batch too big for memory fails at once
    rows = [row[mask.bool()].tolist() for ids, masks in zip(chunk_ids, chunk_masks) for row, mask in zip(ids, masks)]
    assert [rows[i] for i in restore.tolist()] == sequences
    one_block = len(sequences) * max(map(len, sequences))
    assert sum(ids.numel() for ids in chunk_ids) < one_block


# Your own data: .tsv, .csv, .jsonl files of NLI pairs, triplets, pairs and scored pairs ---------------

def test_in_batch_rows_are_recipe_triplets_then_given_triplets_or_pairs_alone(tmp_path):
    from kfdeb.batching import in_batch_examples
    from kfdeb.readers import IN_BATCH_KINDS, Triplet, read_own_file

    # one entailment and one contradiction partner each: the recipe's draws have a single outcome
    nli = write_own(tmp_path / "nli.csv", [{"sentence1": "P", "sentence2": "E", "gold_label": "entailment"},
                                           {"sentence1": "P", "sentence2": "C", "gold_label": "contradiction"},
                                           {"sentence1": "Q", "sentence2": "F", "gold_label": "entailment"},
                                           {"sentence1": "Q", "sentence2": "D", "gold_label": "contradiction"}])
    triplets = write_own(tmp_path / "t.jsonl", [{"anchor": "A", "positive": "B", "negative": "N"}])
    pairs = write_own(tmp_path / "p.tsv", [{"anchor": "X", "positive": "Y"}])
    read = {path.name: read_own_file(path, IN_BATCH_KINDS, "--nli_train_files") for path in (nli, triplets, pairs)}
    assert in_batch_examples([read["t.jsonl"], read["nli.csv"]], seed=5, flag="--nli_train_files") == [
        Triplet("P", "E", "C"), Triplet("E", "P", "C"), Triplet("Q", "F", "D"), Triplet("F", "Q", "D"),
        Triplet("A", "B", "N")]
    assert in_batch_examples([read["p.tsv"], read["p.tsv"]], seed=5, flag="--nli_train_files") == [("X", "Y")] * 2
    with pytest.raises(UserInputError) as err:
        in_batch_examples([read["p.tsv"], read["nli.csv"]], seed=5, flag="--nli_train_files")
    assert str(err.value).startswith(f"--nli_train_files: {pairs} holds anchor-positive pairs but {nli} holds NLI pairs "
                                     "(triplets for the loss): one objective's rows must all be pairs or all be triplets")
