"""evaluate.py and kfdeb/evaluation.py end to end on a tiny model."""

from __future__ import annotations

import json

import pytest

from conftest import run_main, run_script
from kfdeb.evaluation import TABLE_HEADER, best_score, evaluate_split
from kfdeb.metrics import FIGURE_KEYS
from kfdeb.model import load_encoder


def test_evaluate_prints_the_table_row_and_writes_json(tiny_deberta, tmp_path, small_data):
    result = run_script("evaluate.py", tiny_deberta, "--data_dir", small_data, "--split", "dev", "--batch_size", "32",
                        "--json", tmp_path / "figures.json", "--name", "tiny")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert "\n".join(lines[:2]) == TABLE_HEADER
    assert lines[2].startswith("| tiny (dev) | ") and lines[2].count("|") == 10
    assert "sentences/s" in lines[3]
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert tuple(figures) == FIGURE_KEYS
    direct = evaluate_split(load_encoder(tiny_deberta), small_data, "dev", batch_size=32).figures
    for key in FIGURE_KEYS:
        assert figures[key] == pytest.approx(direct[key], abs=1e-9)
        assert f"{figures[key]:.2f}" in lines[2]


@pytest.mark.parametrize("ckpt,message", [("no/such/folder", "no such model folder"),
                                          ("tests", "not a model folder (no config.json)")])
def test_evaluate_rejects_missing_or_non_model_folders(ckpt, message):
    result = run_main("evaluate.py", ckpt)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_best_score_selection():
    figures = {key: float(i) for i, key in enumerate(FIGURE_KEYS)}
    assert best_score(figures, "max_spearman") == figures["dot_spearman"]
    assert best_score(figures, "cosine_spearman") == 1.0
    figures["dot_spearman"] = float("nan")
    assert best_score(figures, "max_spearman") == figures["manhattan_spearman"]


def test_evaluate_data_file_scores_own_pairs(tiny_deberta, tmp_path):
    import csv

    import numpy as np
    from scipy import stats

    from conftest import REPO

    data_file = REPO / "examples" / "data" / "sts_test.csv"
    result = run_main("evaluate.py", tiny_deberta, "--data_file", data_file, "--json", tmp_path / "figures.json",
                        "--name", "tiny")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[2].startswith("| tiny (sts_test.csv) | ")
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert tuple(figures) == FIGURE_KEYS
    with open(data_file, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    encoder = load_encoder(tiny_deberta)
    first = encoder.encode([r["sentence1"] for r in rows], convert_to_numpy=True)
    second = encoder.encode([r["sentence2"] for r in rows], convert_to_numpy=True)
    gold = [float(r["score"]) for r in rows]
    manhattan = -np.abs(first - second).sum(1)
    dot = (first * second).sum(1)
    assert figures["manhattan_spearman"] == pytest.approx(100 * stats.spearmanr(manhattan, gold)[0], abs=1e-3)
    assert figures["dot_pearson"] == pytest.approx(100 * stats.pearsonr(dot, gold)[0], abs=1e-3)


def test_evaluate_data_file_rejects_a_bad_line_with_one_line(tiny_deberta, tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"sentence1": "가", "sentence2": "나", "score": 4}\n{"sentence1": "다", "sentence2": "라" "score": 1}\n',
                    encoding="utf-8")
    result = run_main("evaluate.py", tiny_deberta, "--data_file", path)
    assert result.returncode == 2
    assert result.stderr == f"error: {path}:2: json: not valid JSON (Expecting ',' delimiter, column 37)\n"
