"""The command line every script shares (kfdeb/flags.py, kfdeb/cli.py): one-line flag errors with the nearest
flags, dash spellings, one --progress, and progress output that never floods a log with carriage returns."""

from __future__ import annotations

import io

import pytest

from conftest import run_main, run_script
from kfdeb.readers import read_tsv

SCRIPT_ARGS = {"train.py": [], "evaluate.py": ["model"], "mine.py": ["model", "--pairs", "p.jsonl", "--output", "o.jsonl"],
               "export.py": ["model"], "merge.py": ["model", "--ir_dev_data", "d.jsonl", "--output", "o"]}


@pytest.mark.parametrize("script,typo,meant", [
    ("train.py", "--learnin_rate", "--learning_rate"),
    ("train.py", "--lerning-rate", "--learning_rate"),
    ("evaluate.py", "--bach_size", "--batch_size"),
    ("mine.py", "--num_negativs", "--num_negatives"),
    ("export.py", "--quantise", "--quantize"),
    ("merge.py", "--tolerence", "--tolerance"),
])
def test_an_unknown_flag_is_one_line_naming_the_nearest(script, typo, meant):
    result = run_main(script, *SCRIPT_ARGS[script], typo, "1")
    assert result.returncode == 2
    assert result.stderr == f"error: unrecognized argument {typo} (did you mean {meant}?)\n"


def test_unknown_flags_without_a_near_one_and_stray_values():
    result = run_main("train.py", "--zzz", "--learning_rate", "1e-4", "value", "--tasks=nli", "--nli-bach-size=8")
    assert (result.returncode, result.stderr) == (
        2, "error: unrecognized arguments --zzz, --nli-bach-size (did you mean --nli_batch_size or "
           "--nli_mini_batch_size?)\n")
    value = run_main("train.py", "1e-4")
    assert value.stderr == "error: unrecognized argument '1e-4' (a value without its flag?)\n"


def test_the_real_process_exits_2_with_one_line():
    """Python's own argparse (3.12+ suggests on some errors, 3.10 never) is not what answers: the same line."""
    result = run_script("train.py", "--learnin_rate", "1e-4", timeout=120)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "error: unrecognized argument --learnin_rate (did you mean --learning_rate?)\n"


def test_other_flag_mistakes_are_one_line_too():
    result = run_main("evaluate.py", "model", "--data_file", "a.csv", "--ir_data", "b")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ")
    assert "usage:" not in result.stderr


def test_dash_spellings_reach_the_underscore_flags(tmp_path):
    # export.py's --no-check of earlier releases is --no_check: the model folder is what fails, not the flag
    old = run_main("export.py", tmp_path / "nowhere", "--no-check", "--max-seq-length", "16")
    assert old.returncode == 2 and "unrecognized" not in old.stderr and "nowhere" in old.stderr
    evaluate = run_main("evaluate.py", tmp_path / "nowhere", "--batch-size", "0")
    assert evaluate.stderr == "error: --batch_size must be at least 1\n"  # the value reached --batch_size


@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "mine.py", "merge.py"])
def test_progress_takes_the_same_values_on_every_script(script):
    result = run_main(script, *SCRIPT_ARGS[script], "--progress", "sometimes")
    assert result.returncode == 2
    assert result.stderr == "error: argument --progress: expected auto, true, false, got 'sometimes'\n"


def test_progress_auto_is_a_bar_only_on_a_terminal():
    from kfdeb.flags import progress_shown

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert progress_shown("auto", Terminal()) and not progress_shown("auto", io.StringIO())
    assert progress_shown("true", io.StringIO()) and not progress_shown("false", Terminal())


def distinct_sentences_in(path) -> int:
    """The distinct sentences of a KorSTS file, counted from its columns."""
    return len({row[column] for _, row in read_tsv(path, ("sentence1", "sentence2")) for column in ("sentence1", "sentence2")})


def test_evaluate_announces_its_set_and_draws_no_bar_into_a_file(tiny_deberta, small_data):
    result = run_main("evaluate.py", tiny_deberta, "--data_dir", small_data, "--split", "dev")  # --progress auto
    assert result.returncode == 0, result.stderr
    sentences = distinct_sentences_in(small_data / "KorSTS" / "sts-dev.tsv")
    assert result.stderr == f"evaluating KorSTS dev, {sentences:,} sentences\n"  # stderr is not a terminal: no bar
    assert "\r" not in result.stdout + result.stderr
    forced = run_main("evaluate.py", tiny_deberta, "--data_dir", small_data, "--split", "dev", "--progress", "true")
    assert forced.returncode == 0 and "\r" in forced.stderr and "encode" in forced.stderr  # a bar, when asked for


def test_training_announces_each_evaluation_without_carriage_returns(tiny_deberta, small_data, tmp_path):
    result = run_main("train.py", "--model_name_or_path", tiny_deberta, "--data_dir", small_data,
                      "--nli_train_glob", "KorNLI/*.train.ko.tsv", "--nli_batch_size", "16", "--max_seq_length", "32",
                      "--max_steps", "2", "--eval_steps", "2", "--save_steps", "2", "--ir_test_data", "kfdeb:korsts-test",
                      "--output_dir", tmp_path / "out")  # --progress auto, and stdout and stderr are no terminal
    assert result.returncode == 0, result.stderr
    dev = distinct_sentences_in(small_data / "KorSTS" / "sts-dev.tsv")
    test = distinct_sentences_in(small_data / "KorSTS" / "sts-test.tsv")
    from kfdeb.ir_data import read_ir_data

    ir = read_ir_data("kfdeb:korsts-test", "test")
    lines = [line for line in result.stdout.splitlines() if line.startswith("evaluating ")]
    assert lines == [f"evaluating dev: KorSTS dev, {dev:,} sentences"] * 3 + [
        f"evaluating test: KorSTS test, {test:,} sentences; {ir.name}, {len(ir.queries):,} queries over "
        f"{len(ir.corpus):,} documents"]  # step 0's and step 2's evaluations, then the best model's dev and test
    assert "\r" not in result.stdout + result.stderr
