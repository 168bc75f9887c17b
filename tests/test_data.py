"""Readers, triplets, samplers and collate (kfdeb/data.py), and the CLI's handling of bad data."""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_main
from kfdeb import distributed
from kfdeb.config import resolve
from kfdeb.data import (
    STREAM_NLI_BATCHES, STREAM_STS_BATCHES, STREAM_TRIPLETS, NoDuplicatesBatches, ShuffledBatches, find_nli_files,
    nli_triplets, pad_batch, random_stream, read_nli, read_sts, shard,
)
from kfdeb.errors import UserInputError
from kfdeb.run import read_task_data

STS_HEADER = "genre\tfilename\tyear\tid\tscore\tsentence1\tsentence2"


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def test_bundled_korsts_reads_completely(bundled_dir):
    train = read_sts(bundled_dir / "KorSTS" / "sts-train.tsv")
    assert len(train) == 5749
    assert train[0].sentence1 == "비행기가 이륙하고 있다." and train[0].label == 1.0
    assert train[1].label == pytest.approx(3.8 / 5)
    assert len(read_sts(bundled_dir / "KorSTS" / "sts-dev.tsv")) == 1500
    assert len(read_sts(bundled_dir / "KorSTS" / "sts-test.tsv")) == 1379
    nli = read_nli(bundled_dir / "KorNLI" / "xnli.dev.ko.tsv")
    assert len(nli.pairs) == 2490 and nli.skipped_no_consensus == 0


def test_bom_crlf_and_quotes_are_accepted(tmp_path):
    rows = [STS_HEADER, 'a\tb\t2012\t1\t2.5\t그가 "안녕\t 둘째 문장 ', "a\tb\t2012\t2\t0\t셋\t넷"]
    plain = read_sts(write(tmp_path / "plain.tsv", "\n".join(rows) + "\n"))
    windows = read_sts(write(tmp_path / "windows.tsv", b"\xef\xbb\xbf" + "\r\n".join(rows).encode() + b"\r\n"))
    assert plain == windows
    assert plain[0].sentence1 == '그가 "안녕'  # a lone quote is an ordinary character (QUOTE_NONE)
    assert plain[0].sentence2 == "둘째 문장" and plain[0].label == 0.5


BAD_STS = {
    "wrong column count": ("a\tb\t2012\t1\t2.5\t문장", ":2: sentence2: expected 7 tab-separated fields, found 6"),
    "non-numeric score": ("a\tb\t2012\t1\tfive\t문장\t문장", ":2: score: not a number: 'five'"),
    "score above 5": ("a\tb\t2012\t1\t5.5\t문장\t문장", ":2: score: '5.5' is outside 0..5"),
    "negative score": ("a\tb\t2012\t1\t-1\t문장\t문장", ":2: score: '-1' is outside 0..5"),
    "nan score": ("a\tb\t2012\t1\tnan\t문장\t문장", ":2: score: 'nan' is outside 0..5"),
    "empty sentence": ("a\tb\t2012\t1\t3\t   \t문장", ":2: sentence1: empty sentence"),
}


@pytest.mark.parametrize("case", sorted(BAD_STS))
def test_bad_sts_rows_name_file_line_and_field(tmp_path, case):
    row, message = BAD_STS[case]
    path = write(tmp_path / "KorSTS" / "sts-test.tsv", f"{STS_HEADER}\n{row}\n")
    with pytest.raises(UserInputError) as err:
        read_sts(path)
    assert str(err.value) == f"{path}{message}"


def test_missing_header_column_and_bad_utf8(tmp_path):
    no_score = write(tmp_path / "a.tsv", "genre\tfilename\tyear\tid\tsentence1\tsentence2\nx\ty\t1\t2\t문장\t문장\n")
    with pytest.raises(UserInputError, match=r"a\.tsv:1: header: missing column 'score'"):
        read_sts(no_score)
    latin1 = write(tmp_path / "b.tsv", STS_HEADER.encode() + b"\na\tb\t2012\t1\t2\tcaf\xe9\tx\n")
    with pytest.raises(UserInputError, match=r"b\.tsv:2: not valid UTF-8"):
        read_sts(latin1)
    with pytest.raises(UserInputError, match=r"c\.tsv: cannot open"):
        read_sts(tmp_path / "c.tsv")


def test_nli_labels(tmp_path):
    header = "sentence1\tsentence2\tgold_label\n"
    ok = write(tmp_path / "ok.tsv", header + "가\t나\tentailment\n가\t다\t-\n가\t라\tcontradiction\n")
    read = read_nli(ok)
    assert read.pairs == [("가", "나", "entailment"), ("가", "라", "contradiction")]
    assert read.skipped_no_consensus == 1  # SNLI's "no consensus" rows are counted, not silently dropped
    bad = write(tmp_path / "bad.tsv", header + "가\t나\tentails\n")
    with pytest.raises(UserInputError, match=r"bad\.tsv:2: gold_label: unknown label 'entails'"):
        read_nli(bad)
    empty = write(tmp_path / "empty.tsv", header + "가\t\tneutral\n")
    with pytest.raises(UserInputError, match=r"empty\.tsv:2: sentence2: empty sentence"):
        read_nli(empty)
    with pytest.raises(UserInputError, match="git clone https://github.com/kakaobrain/kor-nlu-datasets"):
        find_nli_files(tmp_path, "KorNLI/*train.ko.tsv")


CLI_CASES = {
    "column count": ("a\tb\t2012\t1\t2.5\t문장", "sentence2: expected 7 tab-separated fields, found 6"),
    "score text": ("a\tb\t2012\t1\tfive\t문장\t문장", "score: not a number"),
    "score range": ("a\tb\t2012\t1\t9\t문장\t문장", "score: '9' is outside 0..5"),
    "empty sentence": ("a\tb\t2012\t1\t3\t\t문장", "sentence1: empty sentence"),
    "utf-8": (b"a\tb\t2012\t1\t3\t\xff\xfe\t\xc3", "not valid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_evaluate_cli_rejects_bad_korsts_with_one_line(tmp_path, tiny_deberta, case):
    row, message = CLI_CASES[case]
    body = STS_HEADER.encode() + b"\n" + (row if isinstance(row, bytes) else row.encode()) + b"\n"
    path = write(tmp_path / "KorSTS" / "sts-test.tsv", body)
    result = run_main("evaluate.py", tiny_deberta, "--data_dir", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line, no traceback
    assert result.stderr.startswith(f"error: {path}:2: ") and message in result.stderr


def test_train_cli_rejects_bad_nli_and_missing_header(tmp_path, tiny_deberta, bundled_dir):
    data = tmp_path / "data"
    write(data / "KorNLI" / "x.train.ko.tsv", "sentence1\tsentence2\tgold_label\n가\t나\tentailment\n가\t다\tmaybe\n")
    (data / "KorSTS").mkdir()
    for split in ("train", "dev", "test"):
        (data / "KorSTS" / f"sts-{split}.tsv").write_bytes((bundled_dir / "KorSTS" / f"sts-{split}.tsv").read_bytes())
    result = run_main("train.py", "--model_name_or_path", tiny_deberta, "--data_dir", data,
                        "--output_dir", tmp_path / "out", "--progress", "false")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: {data / 'KorNLI' / 'x.train.ko.tsv'}:3: gold_label: unknown label 'maybe' (expected one of entailment, neutral, contradiction)"
    write(data / "KorNLI" / "x.train.ko.tsv", "premise\thypothesis\tgold_label\n가\t나\tentailment\n")
    result = run_main("train.py", "--model_name_or_path", tiny_deberta, "--data_dir", data,
                        "--output_dir", tmp_path / "out", "--progress", "false")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("x.train.ko.tsv:1: header: missing column 'sentence1' (header has premise, hypothesis, gold_label)")


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


def legacy_no_duplicates(keys, batch_size, permutations, num_batches):
    """The legacy NoDuplicatesDataLoader's loop, transcribed, with the permutations given."""
    order, pointer, passes, batches = permutations(0), 0, 0, []
    for _ in range(num_batches):
        batch, seen = [], set()
        while len(batch) < batch_size:
            example = order[pointer]
            if not any(k in seen for k in keys[example]):
                batch.append(example)
                seen.update(keys[example])
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
    keys = [{t.strip().lower() for t in example} for example in texts]
    reference = legacy_no_duplicates(
        keys, 8, lambda p: list(random_stream(11, STREAM_NLI_BATCHES, p).permutation(200)), len(ours)
    )
    assert ours == reference
    for batch in ours:
        assert len(batch) == 8
        normalised = [t.strip().lower() for i in batch for t in set(x.strip().lower() for x in texts[i])]
        assert len(normalised) == len(set(normalised))
    # coverage: examples passed over come back on later passes; an example whose own texts
    # repeat (5) is still drawn, as in the reference (it only checks against the batch so far)
    assert set(i for b in ours for i in b) == set(range(200))


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
    from kfdeb.data import length_sorted_chunks

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

OWN_ROWS = {  # the same rows in every format; texts with a comma and a quote (literal in .tsv)
    "triplet": [{"anchor": '그는 "금리, 동결"이라 했다', "positive": "금리가 그대로다", "negative": "금리가 올랐다"},
                {"anchor": " 코스피 상승 ", "positive": "주가 올랐다", "negative": "주가 내렸다"}],
    "pair": [{"anchor": "카드 분실, 신고", "positive": "카드를 잃어버렸다"}, {"anchor": "이체 한도", "positive": "송금 한도"}],
    "nli": [{"sentence1": "P", "sentence2": "E", "gold_label": "entailment"},
            {"sentence1": "P", "sentence2": "N", "gold_label": "-"},
            {"sentence1": "P", "sentence2": "C", "gold_label": "contradiction"}],
    "scored": [{"sentence1": "금리 인상", "sentence2": "금리 올림", "score": "9.5"},
               {"sentence1": "환율, 급등", "sentence2": '"원화" 약세', "score": "0"}],
}


def write_own(path: Path, rows: list[dict], line_end: str = "\n") -> Path:
    """`rows` in the format of `path`'s extension, written by Python's csv / json modules (.tsv by hand)."""
    columns = list(rows[0])
    if path.suffix == ".csv":
        import csv
        import io

        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator=line_end)
        writer.writerow(columns)
        writer.writerows([row[c] for c in columns] for row in rows)
        text = buffer.getvalue()
    elif path.suffix == ".jsonl":
        import json

        text = "".join(json.dumps(row, ensure_ascii=False) + line_end for row in rows)
    else:
        text = "".join("\t".join(line) + line_end for line in [columns] + [[row[c] for c in columns] for row in rows])
    return write(path, text)


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
@pytest.mark.parametrize("kind", sorted(OWN_ROWS))
def test_own_files_give_the_same_rows_in_every_format(tmp_path, suffix, kind):
    from kfdeb.data import IN_BATCH_KINDS, SCORED_KINDS, StsPair, Triplet, read_own_file

    rows = OWN_ROWS[kind]
    plain = write_own(tmp_path / f"rows{suffix}", rows)
    kinds = SCORED_KINDS if kind == "scored" else IN_BATCH_KINDS
    read = read_own_file(plain, kinds, "--flag", score_max=10.0)
    assert read.kind == kind
    if kind == "triplet":
        assert read.rows == [Triplet('그는 "금리, 동결"이라 했다', "금리가 그대로다", "금리가 올랐다"),
                             Triplet("코스피 상승", "주가 올랐다", "주가 내렸다")]  # texts stripped, as KorNLU's
    elif kind == "pair":
        assert read.rows == [("카드 분실, 신고", "카드를 잃어버렸다"), ("이체 한도", "송금 한도")]
    elif kind == "nli":
        assert read.rows == [("P", "E", "entailment"), ("P", "C", "contradiction")] and read.skipped_no_consensus == 1
    else:
        assert read.rows == [StsPair("금리 인상", "금리 올림", 0.95), StsPair("환율, 급등", '"원화" 약세', 0.0)]
    windows = write(tmp_path / f"windows{suffix}", b"\xef\xbb\xbf" + plain.read_bytes().replace(b"\n", b"\r\n"))
    assert read_own_file(windows, kinds, "--flag", score_max=10.0).rows == read.rows  # BOM and CRLF accepted


def test_jsonl_numbers_as_scores_and_other_keys_ignored(tmp_path):
    from kfdeb.data import StsPair, read_scored_file

    path = write(tmp_path / "s.jsonl", '{"id": 7, "sentence1": "가", "sentence2": "나", "score": 4}\n'
                                       '{"sentence2": "라", "score": 2.5, "sentence1": "다", "note": null}\n')
    assert read_scored_file(path, "--sts_train_file") == [StsPair("가", "나", 0.8), StsPair("다", "라", 0.5)]


def test_csv_reader_agrees_with_pythons_csv_module(tmp_path):
    import csv

    from kfdeb.data import read_csv

    text = ('a,b,c\r\n'
            '"x, y","say ""hi""",plain\r\n'
            '"two\r\nlines",,"three\nlines"\n'  # line breaks inside quotes; an empty unquoted field
            '한국어,"",끝\n'  # an empty quoted field
            '"",z,"a ""quoted"" word, and more"')  # the last line without a line end
    path = write(tmp_path / "t.csv", text)
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, strict=True)
        header = next(reader)
        expected, first_line = [], reader.line_num + 1
        for record in reader:
            expected.append((first_line, dict(zip(header, record))))
            first_line = reader.line_num + 1
    assert list(read_csv(path)) == expected
    assert [line for line, _ in expected] == [2, 3, 6, 7]  # where each record starts


UNCLOSED = 'quoted field not closed before the end of the file (a quote inside a quoted field is written "")'
IN_BATCH_TAKES = ("--flag takes NLI pairs (sentence1, sentence2, gold_label), triplets (anchor, positive, negative) "
                  "or anchor-positive pairs (anchor, positive)")
OWN_BAD = {  # file name, content, kinds ("in_batch" or "scored"), the message after the path
    "csv unclosed quote": ("t.csv", 'anchor,positive\n가,"나\n다,라\n', "in_batch", f":2: positive: {UNCLOSED}"),
    "csv unclosed quote after a doubled one": ("t.csv", 'anchor,positive\n가,"나 ""다""\n', "in_batch",
                                               f":2: positive: {UNCLOSED}"),
    "csv text after closing quote": ("t.csv", 'anchor,positive\n"가" ,나\n', "in_batch",
                                     ":2: anchor: ' ' after the closing quote (expected a comma or the end of the line)"),
    "csv quote in unquoted field": ("t.csv", 'anchor,positive\n가,나 "다"\n', "in_batch",
                                    ':2: positive: a quote inside an unquoted field (quote the whole field and write '
                                    'the quote as "")'),
    "csv bare carriage return": ("t.csv", "anchor,positive\n가\r나,다\n", "in_batch",
                                 ":2: anchor: a carriage return that does not end the line"),
    "csv too few fields": ("t.csv", "anchor,positive,negative\n가,나,다\n라,마\n", "in_batch",
                           ":3: negative: expected 3 comma-separated fields, found 2"),
    "csv too many fields": ("t.csv", "sentence1,sentence2,score\n가,나,1,2\n", "scored",
                            ":2: field 4: expected 3 comma-separated fields, found 4"),
    "csv empty line": ("t.csv", "anchor,positive\n가,나\n\n다,라\n", "in_batch",
                       ":3: empty line (expected 2 comma-separated fields)"),
    "csv empty text": ("t.csv", 'anchor,positive\n가,"  "\n', "in_batch", ":2: positive: empty sentence"),
    "csv non-numeric score": ("t.csv", "sentence1,sentence2,score\n가,나,high\n", "scored",
                              ":2: score: not a number: 'high'"),
    "csv bad utf-8": ("t.csv", b"anchor,positive\n\xea\xb0\x80,\xb0\n", "in_batch",
                      ":2: not valid UTF-8 (byte 4: b'\\xb0')"),
    "csv header only": ("t.csv", "anchor,positive\n", "in_batch", ":2: no data rows"),
    "csv no known columns": ("t.csv", "query,answer\n가,나\n", "in_batch",
                             f":1: header: query, answer, no row kind, but {IN_BATCH_TAKES}"),
    "jsonl not json": ("t.jsonl", '{"anchor": "가", "positive": "나"}\n{"anchor": "다", "positive": "라",}\n', "in_batch",
                       ":2: json: not valid JSON (Expecting property name enclosed in double quotes, column 33)"),
    "jsonl not an object": ("t.jsonl", '{"anchor": "가", "positive": "나"}\n["다", "라"]\n', "in_batch",
                            ":2: json: expected an object {...}, got list"),
    "jsonl missing key": ("t.jsonl", '{"anchor": "가", "positive": "나", "negative": "다"}\n{"anchor": "라", "positive": "마"}\n',
                          "in_batch", ":2: negative: missing key (the file holds triplets: anchor, positive, negative)"),
    "jsonl empty line": ("t.jsonl", '{"anchor": "가", "positive": "나"}\n \n', "in_batch",
                         ":2: empty line (expected one JSON object)"),
    "jsonl empty text": ("t.jsonl", '{"anchor": "", "positive": "나"}\n', "in_batch", ":1: anchor: empty sentence"),
    "jsonl text not a string": ("t.jsonl", '{"anchor": "가", "positive": 3}\n', "in_batch",
                                ":1: positive: expected a string, got 3"),
    "jsonl non-numeric score": ("t.jsonl", '{"sentence1": "가", "sentence2": "나", "score": "high"}\n', "scored",
                                ":1: score: not a number: 'high'"),
    "jsonl boolean score": ("t.jsonl", '{"sentence1": "가", "sentence2": "나", "score": true}\n', "scored",
                            ":1: score: not a number: true"),
    "jsonl unknown gold label": ("t.jsonl", '{"sentence1": "가", "sentence2": "나", "gold_label": "yes"}\n', "in_batch",
                                 ":1: gold_label: unknown label 'yes' (expected one of entailment, neutral, contradiction)"),
    "tsv score above score_max": ("t.tsv", "sentence1\tsentence2\tscore\n가\t나\t1.5\n", "scored",
                                  ":2: score: '1.5' is outside 0..1"),
    "tsv negative score": ("t.tsv", "sentence1\tsentence2\tscore\n가\t나\t-0.5\n", "scored",
                           ":2: score: '-0.5' is outside 0..1"),
    "scored pairs for the in-batch objective": ("t.tsv", "sentence1\tsentence2\tscore\n가\t나\t1\n", "in_batch",
                                                f":1: header: scored pairs (sentence1, sentence2, score), but {IN_BATCH_TAKES}"),
    "triplets for the scored objective": ("t.jsonl", '{"anchor": "가", "positive": "나", "negative": "다"}\n', "scored",
                                          ":1: keys: triplets (anchor, positive, negative), but --flag takes scored pairs "
                                          "(sentence1, sentence2, score)"),
    "unknown extension": ("t.txt", "anchor,positive\n가,나\n", "in_batch",
                          ": --flag: unknown format '.txt' (expected .tsv, .csv, .jsonl)"),
}


@pytest.mark.parametrize("case", sorted(OWN_BAD))
def test_bad_own_files_name_file_line_and_field(tmp_path, case):
    from kfdeb.data import IN_BATCH_KINDS, SCORED_KINDS, read_own_file

    name, content, kinds, message = OWN_BAD[case]
    path = write(tmp_path / name, content)
    with pytest.raises(UserInputError) as err:
        read_own_file(path, SCORED_KINDS if kinds == "scored" else IN_BATCH_KINDS, "--flag", score_max=1.0)
    assert str(err.value) == f"{path}{message}"


def test_file_lists_keep_their_order_expand_globs_and_read_a_file_once(tmp_path):
    from kfdeb.data import expand_file_list

    for name in ("b.csv", "a.jsonl", "c.tsv"):
        write(tmp_path / "own" / name, "")
    spec = f"{tmp_path}/own/c.tsv, {tmp_path}/own/*.*,,{tmp_path}/own/a.jsonl"
    assert expand_file_list(spec, "--nli_train_files") == [tmp_path / "own" / n for n in ("c.tsv", "a.jsonl", "b.csv")]
    with pytest.raises(UserInputError, match=r"/own/\*\.xls: --nli_train_files: no file matches"):
        expand_file_list(f"{tmp_path}/own/*.xls", "--nli_train_files")
    with pytest.raises(UserInputError, match="--nli_train_files ' , ': names no file"):
        expand_file_list(" , ", "--nli_train_files")


def test_in_batch_rows_are_recipe_triplets_then_given_triplets_or_pairs_alone(tmp_path):
    from kfdeb.data import IN_BATCH_KINDS, Triplet, in_batch_examples, read_own_file

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
