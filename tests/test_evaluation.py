"""evaluate.py and kfdeb/evaluation.py end to end on a tiny model."""

from __future__ import annotations

import json

import pytest

from conftest import run_script
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
    result = run_script("evaluate.py", ckpt)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_best_score_selection():
    figures = {key: float(i) for i, key in enumerate(FIGURE_KEYS)}
    assert best_score(figures, "max_spearman") == figures["dot_spearman"]
    assert best_score(figures, "cosine_spearman") == 1.0
    figures["dot_spearman"] = float("nan")
    assert best_score(figures, "max_spearman") == figures["manhattan_spearman"]
