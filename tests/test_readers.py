"""The file readers (kfdeb/readers.py): KorNLU and own files, strictly; and the CLI's handling of bad data."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_main
from kfdeb.errors import UserInputError
from kfdeb.readers import find_nli_files, read_nli, read_sts

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
    from kfdeb.readers import IN_BATCH_KINDS, SCORED_KINDS, StsPair, Triplet, read_own_file

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
    from kfdeb.readers import StsPair, read_scored_file

    path = write(tmp_path / "s.jsonl", '{"id": 7, "sentence1": "가", "sentence2": "나", "score": 4}\n'
                                       '{"sentence2": "라", "score": 2.5, "sentence1": "다", "note": null}\n')
    assert read_scored_file(path, "--sts_train_file") == [StsPair("가", "나", 0.8), StsPair("다", "라", 0.5)]


def test_csv_reader_agrees_with_pythons_csv_module(tmp_path):
    import csv

    from kfdeb.readers import read_csv

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
IN_BATCH_TAKES = ("--flag takes NLI pairs (sentence1, sentence2, gold_label), n-tuples (anchor, positive, negative_1 "
                  ".. negative_n), triplets (anchor, positive, negative) or anchor-positive pairs (anchor, positive)")
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
    # a missing comma: Python 3.10-3.13 word it alike (3.13 words a trailing comma differently)
    "jsonl not json": ("t.jsonl", '{"anchor": "가", "positive": "나"}\n{"anchor": "다" "positive": "라"}\n', "in_batch",
                       ":2: json: not valid JSON (Expecting ',' delimiter, column 16)"),
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
    from kfdeb.readers import IN_BATCH_KINDS, SCORED_KINDS, read_own_file

    name, content, kinds, message = OWN_BAD[case]
    path = write(tmp_path / name, content)
    with pytest.raises(UserInputError) as err:
        read_own_file(path, SCORED_KINDS if kinds == "scored" else IN_BATCH_KINDS, "--flag", score_max=1.0)
    assert str(err.value) == f"{path}{message}"


def test_file_lists_keep_their_order_expand_globs_and_read_a_file_once(tmp_path):
    from kfdeb.readers import expand_file_list

    for name in ("b.csv", "a.jsonl", "c.tsv"):
        write(tmp_path / "own" / name, "")
    spec = f"{tmp_path}/own/c.tsv, {tmp_path}/own/*.*,,{tmp_path}/own/a.jsonl"
    assert expand_file_list(spec, "--nli_train_files") == [tmp_path / "own" / n for n in ("c.tsv", "a.jsonl", "b.csv")]
    with pytest.raises(UserInputError, match=r"/own/\*\.xls: --nli_train_files: no file matches"):
        expand_file_list(f"{tmp_path}/own/*.xls", "--nli_train_files")
    with pytest.raises(UserInputError, match="--nli_train_files ' , ': names no file"):
        expand_file_list(" , ", "--nli_train_files")


# Korean text as Windows saves it: CP949 (EUC-KR's superset) bytes, made by Python's codec
CP949_FILES = {
    "tsv": ("pairs.tsv", "anchor\tpositive\n고양이가 잔다\t고양이가 자고 있다\n개가 짖는다\t개가 소리친다\n", 2),
    "csv": ("pairs.csv", 'anchor,positive\n고양이가 잔다,"고양이가 자고, 있다"\n', 2),
    "jsonl": ("pairs.jsonl", '{"anchor": "a", "positive": "b"}\n{"anchor": "고양이가 잔다", "positive": "자고 있다"}\n', 2),
    "txt corpus": ("corpus.txt", "first line in ASCII\n고양이가 잔다\n개가 짖는다\n", 2),
    "korsts": ("KorSTS/sts-test.tsv", f"{STS_HEADER}\nx\ty\t2012\t1\t3.5\t비행기가 이륙한다\t비행기가 뜬다\n", 2),
}


def read_any(path: Path) -> None:
    from kfdeb.ir_data import read_texts
    from kfdeb.readers import IN_BATCH_KINDS, read_own_file

    if path.suffix == ".txt":
        read_texts(path)
    elif path.parent.name == "KorSTS":
        read_sts(path)
    else:
        read_own_file(path, IN_BATCH_KINDS, "--nli_train_files")


@pytest.mark.parametrize("case", sorted(CP949_FILES))
def test_a_cp949_file_is_named_with_the_command_that_converts_it(tmp_path, case):
    name, text, bad_line = CP949_FILES[case]
    path = write(tmp_path / name, text.encode("cp949"))
    with pytest.raises(UserInputError) as err:
        read_any(path)
    converted = path.with_name(f"{path.stem}.utf8{path.suffix}")
    assert str(err.value) == (f"{path}:{bad_line}: not UTF-8: the file looks CP949/EUC-KR encoded (Windows Korean); "
                              f"convert it: iconv -f cp949 -t utf-8 {path} > {converted}")
    # the command's result, as Python's codec converts it, reads
    converted.write_bytes(path.read_bytes().decode("cp949").encode("utf-8"))
    read_any(converted)


def test_a_file_mixing_utf8_and_cp949_lines_is_refused_at_its_first_cp949_line(tmp_path):
    utf8 = "anchor\tpositive\n고양이가 잔다\t고양이가 자고 있다\n".encode("utf-8")
    cp949 = "개가 짖는다\t개가 소리친다\n".encode("cp949")
    path = write(tmp_path / "mixed.tsv", utf8 + cp949 + "새가 난다\t새가 날아간다\n".encode("utf-8"))
    with pytest.raises(UserInputError) as err:
        read_any(path)
    assert str(err.value) == (f"{path}:3: not valid UTF-8 (byte 0: {cp949[:1]!r}): the file mixes encodings "
                              "(line 2 is UTF-8, line 3 CP949/EUC-KR); save every line as UTF-8")
    first_cp949 = write(tmp_path / "mixed.jsonl", '{"anchor": "개가 짖는다", "positive": "짖는다"}\n'.encode("cp949")
                        + '{"anchor": "고양이", "positive": "잔다"}\n'.encode("utf-8"))
    with pytest.raises(UserInputError, match=r"mixed\.jsonl:1: not valid UTF-8 .*: the file mixes encodings "
                                             r"\(line 2 is UTF-8, line 1 CP949/EUC-KR\)"):
        read_any(first_cp949)


def test_bytes_neither_utf8_nor_cp949_keep_the_bad_byte_message(tmp_path):
    latin1 = "anchor\tpositive\ncafé\tcrème brûlée\n".encode("latin-1")
    with pytest.raises(UnicodeDecodeError):
        latin1.decode("cp949")
    path = write(tmp_path / "latin1.tsv", latin1)
    with pytest.raises(UserInputError) as err:
        read_any(path)
    assert str(err.value) == f"{path}:2: not valid UTF-8 (byte 3: b'\\xe9')"


def test_evaluate_cli_names_a_cp949_file_in_one_line(tmp_path):
    path = write(tmp_path / "scored.csv", "sentence1,sentence2,score\n비행기가 이륙한다,비행기가 뜬다,4.2\n".encode("cp949"))
    result = run_main("evaluate.py", "unused-model", "--data_file", path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"error: {path}:2: not UTF-8: the file looks CP949/EUC-KR encoded (Windows Korean); "
                             f"convert it: iconv -f cp949 -t utf-8 {path} > {tmp_path / 'scored.utf8.csv'}\n")
