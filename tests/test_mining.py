"""Hard-negative mining (kfdeb/mining.py, mine.py) against sentence-transformers' mine_hard_negatives."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import run_main
from kfdeb.mining import MiningSettings, mine_hard_negatives
from kfdeb.model import load_encoder
from kfdeb.readers import read_nli

import sentence_transformers as st  # noqa: E402  (the [test] extra: the reference is always there in CI)

# The reference release these tests assert the behaviour of (pyproject's [test] extra pins the range). 6.3 changed
# mine_hard_negatives: an anchor whose text is in the corpus is never its own negative. A failure names the release.
REFERENCE = f"sentence-transformers {st.__version__}'s mine_hard_negatives (kfdeb follows 6.3's semantics)"


@pytest.fixture(scope="module")
def pairs(bundled_dir):
    """Premise -> entailment pairs of the bundled XNLI dev file, some premises with two entailments."""
    found = [(p, h) for p, h, label in read_nli(bundled_dir / "KorNLI" / "xnli.dev.ko.tsv").pairs if label == "entailment"]
    return found[:150] + [(found[0][0], found[1][1]), (found[2][0], found[3][1])]  # two anchors with 2 positives


@pytest.fixture(scope="module")
def models(tiny_bert):
    reference = st.SentenceTransformer(str(tiny_bert), device="cpu")
    reference.max_seq_length = 64
    return load_encoder(tiny_bert, max_seq_length=64), reference


def reference_rows(reference, pairs, corpus=None, **options):
    from datasets import Dataset

    dataset = Dataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]})
    options.setdefault("verbose", False)
    mined = st.util.mine_hard_negatives(dataset, reference, corpus=corpus, batch_size=32, **options)
    return [tuple(row[column] for column in mined.column_names) for row in mined]


CASES = {
    "top triplets": {},
    "n-tuples": {"output_format": "n-tuple", "num_negatives": 4},
    "range_min": {"range_min": 3, "num_negatives": 2},
    "range_max": {"range_max": 5, "num_negatives": 3, "output_format": "n-tuple"},
    "absolute margin": {"absolute_margin": 0.02, "output_format": "n-tuple"},
    "relative margin": {"relative_margin": 0.05},
    "max_score": {"max_score": 0.965, "output_format": "n-tuple"},  # the tiny BERT's negatives: 0.950 .. 0.972 (10-90%)
    "min_score": {"min_score": 0.96},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_same_negatives_as_mine_hard_negatives(models, pairs, case):
    """The top strategy on the same model and pairs: the same rows in the same order, for each option and filter;
    every filter is set so that it removes candidates on this data (and some rows lose negatives)."""
    ours, reference = models
    options = CASES[case]
    mined = mine_hard_negatives(ours, pairs, settings=MiningSettings(**options))
    expected = reference_rows(reference, pairs, **options)
    assert mined.rows == expected, REFERENCE
    assert mined.columns == (("anchor", "positive", "negative") if options.get("output_format") != "n-tuple" else
                             ("anchor", "positive", *(f"negative_{i}" for i in range(1, options.get("num_negatives", 3) + 1))))
    for name in ("absolute_margin", "relative_margin", "max_score", "min_score"):
        if name in options:
            assert mined.skipped.get(name, 0) > 0, name  # the filter acted
    if case in ("absolute margin", "relative margin", "min_score"):
        assert mined.missing > 0  # rows without enough negatives: dropped or shortened, as the reference does


def test_an_anchors_own_positives_are_never_its_negatives_and_a_corpus_file_adds_texts(models, pairs, tmp_path):
    ours, reference = models
    extra = [f"추가 문장 {i} 입니다" for i in range(20)]
    mined = mine_hard_negatives(ours, pairs, corpus=extra, settings=MiningSettings(num_negatives=5))
    assert mined.corpus == len(set(extra) | {p for _, p in pairs})
    own = {}
    for anchor, positive in pairs:
        own.setdefault(anchor, set()).add(positive)
    assert all(negative not in own[anchor] for anchor, _, negative in mined.rows)
    assert mined.rows == reference_rows(reference, pairs, corpus=extra, num_negatives=5), REFERENCE
    randomly = mine_hard_negatives(ours, pairs, settings=MiningSettings(sampling_strategy="random", range_max=20, seed=1))
    again = mine_hard_negatives(ours, pairs, settings=MiningSettings(sampling_strategy="random", range_max=20, seed=1))
    assert randomly.rows == again.rows != mined.rows  # seeded
    assert all(negative not in own[anchor] for anchor, _, negative in randomly.rows)


def test_an_anchor_is_never_its_own_negative(models, pairs):
    """The corpus holds the anchors too (as when mining a collection against itself): the anchor's own text, its
    nearest document, is never offered as its negative, and the next candidate takes its place (ST 6.3)."""
    ours, reference = models
    anchors = list(dict.fromkeys(anchor for anchor, _ in pairs))
    for options in ({"num_negatives": 3}, {"output_format": "n-tuple", "num_negatives": 2, "range_max": 4}):
        mined = mine_hard_negatives(ours, pairs, corpus=anchors, settings=MiningSettings(**options))
        assert mined.rows and all(anchor not in row[2:] for row in mined.rows for anchor in row[:1])
        assert mined.rows == reference_rows(reference, pairs, corpus=anchors, **options), REFERENCE


def test_mine_py_writes_rows_train_py_reads_and_the_summary(models, pairs, tiny_bert, tmp_path):
    source = tmp_path / "pairs.csv"
    with open(source, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["anchor", "positive"])
        writer.writerows(pairs)
    output = tmp_path / "mined.jsonl"
    result = run_main("mine.py", tiny_bert, "--pairs", source, "--output", output, "--output_format", "n-tuple",
                      "--min_score", "0.95", "--progress", "false")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        expected = reference_rows(models[1], pairs, output_format="n-tuple", min_score=0.95, verbose=True)
    assert 0 < len(rows) < len(pairs)  # some rows dropped for want of negatives
    assert [tuple(row.values()) for row in rows] == expected and list(rows[0]) == [
        "anchor", "positive", "negative_1", "negative_2", "negative_3"]
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["Metric", "Positive", "Negative", "Difference"]
    assert lines[1].split()[:3] == ["Count", f"{len(pairs):,}", f"{3 * len(rows):,}"]
    assert any(line.startswith("Skipped") and "min_score of 0.95" in line for line in lines)
    skipped = [line for line in lines if line.startswith("Skipped")]  # the count and its share, as the reference says
    assert skipped == [line for line in printed.getvalue().splitlines() if line.startswith("Skipped")], REFERENCE
    assert any(line.startswith("Could not find enough negatives for") for line in lines)
    # the n-tuples train: one objective's rows, anchor against all positives and negatives of the batch
    from kfdeb.readers import IN_BATCH_KINDS, read_own_file

    assert read_own_file(output, IN_BATCH_KINDS, "--nli_train_files").kind == "tuple"


@pytest.mark.parametrize("args, message", [
    (["--num_negatives", "0"], "--num_negatives 0: must be at least 1"),
    (["--range_min", "5", "--range_max", "5"], "--range_min 5 must be smaller than --range_max 5"),
    (["--sampling_strategy", "best"], "--sampling_strategy 'best': expected top or random"),
    (["--output_format", "labeled-pair"], "--output_format 'labeled-pair': expected triplet or n-tuple"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, message):
    result = run_main("mine.py", "unused-model", "--pairs", tmp_path / "p.csv", "--output", tmp_path / "o.jsonl", *args)
    assert result.returncode == 2 and result.stderr == f"error: {message}\n"


def test_bad_input_names_file_and_line(tmp_path):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text('anchor,positive\n가,나\n다,"라\n', encoding="utf-8")
    result = run_main("mine.py", "unused-model", "--pairs", pairs, "--output", tmp_path / "o.jsonl")
    assert result.returncode == 2 and result.stderr.startswith(f"error: {pairs}:3: positive: quoted field not closed")
    pairs.write_text("anchor,positive\n가,나\n", encoding="utf-8")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("문장 하나\n\n문장 셋\n", encoding="utf-8")
    result = run_main("mine.py", "unused-model", "--pairs", pairs, "--corpus", corpus, "--output", tmp_path / "o.jsonl")
    assert result.returncode == 2 and result.stderr == f"error: {corpus}:2: text: empty line\n"
    result = run_main("mine.py", "unused-model", "--pairs", pairs, "--output", tmp_path / "o.parquet")
    assert result.returncode == 2 and "o.parquet: --output: unknown format '.parquet'" in result.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_an_onnx_export_mines_the_same_negatives(models, pairs, tiny_bert, tmp_path):
    import shutil

    import kfdeb
    from kfdeb import cli

    folder = shutil.copytree(tiny_bert, tmp_path / "model")
    assert cli.export_main([str(folder), "--max_seq_length", "64"]) == 0
    graph = kfdeb.load(folder / "onnx" / "model.onnx")
    assert mine_hard_negatives(graph, pairs).rows == mine_hard_negatives(models[0], pairs).rows
