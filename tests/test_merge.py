"""merge.py (kfdeb/merge.py): WiSE-FT's weight mix against a float64 formula on the saved files, the choice rule on
hand-worked cases, the whole command against evaluate.py on the folder it writes, and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import run_main
from kfdeb.errors import UserInputError
from kfdeb.merge import choose, mix, start_of_run


def test_mix_is_the_float64_formula_and_its_ends_are_the_two_models():
    generator = torch.Generator().manual_seed(1)
    start = {"w": torch.randn(7, 5, generator=generator), "b": torch.randn(5, generator=generator),
             "ids": torch.arange(9)}
    tuned = {"w": torch.randn(7, 5, generator=generator), "b": torch.randn(5, generator=generator),
             "ids": torch.arange(9)}
    for alpha in (0.0, 0.3, 0.7, 1.0):
        mixed = mix(start, tuned, alpha)
        for name in ("w", "b"):
            naive = ((1 - alpha) * start[name].numpy().astype(np.float64)
                     + alpha * tuned[name].numpy().astype(np.float64)).astype(np.float32)
            assert mixed[name].dtype == torch.float32 and np.array_equal(mixed[name].numpy(), naive)
        assert torch.equal(mixed["ids"], tuned["ids"])
    assert all(torch.equal(mix(start, tuned, 0.0)[n], start[n]) and torch.equal(mix(start, tuned, 1.0)[n], tuned[n])
               for n in start)
    with pytest.raises(UserInputError, match="different parameters \\(extra\\): not the same architecture"):
        mix(start, {**tuned, "extra": torch.zeros(1)}, 0.5)
    with pytest.raises(UserInputError, match="^w: shape \\(7, 5\\) in the start, \\(5, 7\\) in the fine-tuned"):
        mix(start, {**tuned, "w": tuned["w"].T.contiguous()}, 0.5)
    with pytest.raises(UserInputError, match="^ids: an integer buffer differs"):
        mix(start, {**tuned, "ids": torch.arange(9) + 1}, 0.5)


def test_the_choice_is_the_best_mean_gain_among_the_alphas_that_lose_on_no_set():
    gains = {0.0: [0.0, 0.0], 0.3: [2.0, 0.0], 0.5: [3.0, -0.5], 1.0: [5.0, -3.0]}
    assert choose(gains, tolerance=0.0) == 0.3  # 0.5 and 1 lose on the second set
    assert choose(gains, tolerance=1.0) == 0.5  # mean 1.25 over 0.3's 1.0; 1 still loses 3
    assert choose(gains, tolerance=5.0) == 0.5  # 1's mean (1.0) is below 0.5's
    assert choose({0.0: [0.0], 0.2: [1.0], 0.4: [1.0]}, 0.0) == 0.2  # a tie goes to the smaller alpha
    assert choose({0.0: [0.0, 0.0], 0.5: [4.0, -0.1], 1.0: [-1.0, 2.0]}, 0.0) == 0.0  # every mix loses somewhere


def test_the_start_of_a_run_is_read_from_its_config(tmp_path):
    (tmp_path / "best").mkdir()
    (tmp_path / "train_config.json").write_text(json.dumps({"model_name_or_path": "intfloat/multilingual-e5-small"}))
    assert start_of_run(str(tmp_path)) == start_of_run(str(tmp_path / "best")) == "intfloat/multilingual-e5-small"
    assert start_of_run(str(tmp_path / "best" / "nothing")) is None
    (tmp_path / "train_config.json").write_text(json.dumps({"model_name_or_path": "kfdeb:tiny-deberta"}))
    assert start_of_run(str(tmp_path / "best")) == str(tmp_path / "init-tiny-deberta")  # what the run built


@pytest.fixture(scope="module")
def dev_files(tmp_path_factory, bundled_dir) -> list[Path]:
    """Two relevant-pairs dev sets: the KorSTS dev pairs scored 4 or more, split in halves."""
    from kfdeb.readers import read_sts

    pairs = [(p.sentence1, p.sentence2) for p in read_sts(bundled_dir / "KorSTS" / "sts-dev.tsv") if p.label >= 0.8]
    folder = tmp_path_factory.mktemp("merge-dev")
    files = [folder / "first.jsonl", folder / "second.jsonl"]
    for path, part in zip(files, (pairs[:120], pairs[120:240])):
        path.write_text("".join(json.dumps({"anchor": a, "positive": b}, ensure_ascii=False) + "\n" for a, b in part),
                        encoding="utf-8")
    return files


@pytest.fixture(scope="module")
def tuned_model(tmp_path_factory, tiny_deberta) -> Path:
    """The tiny model with every weight moved (seeded noise): a stand-in for a fine-tuned copy."""
    from kfdeb.model import load_encoder

    encoder = load_encoder(tiny_deberta, device="cpu")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return encoder.save(tmp_path_factory.mktemp("merge-tuned") / "model")


def evaluate_figure(model: Path, dev: Path, tmp_path: Path) -> float:
    result = run_main("evaluate.py", model, "--ir_data", dev, "--json", tmp_path / "figures.json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return json.loads((tmp_path / "figures.json").read_text())["ndcg@10"]


def test_merge_writes_the_chosen_mix_and_its_dev_figures_are_evaluate_pys(tiny_deberta, tuned_model, dev_files,
                                                                          tmp_path):
    output = tmp_path / "merged"
    result = run_main("merge.py", tuned_model, "--start", tiny_deberta, "--ir_dev_data", *dev_files,
                      "--alphas", "0.5", "1", "--output", output, "--device", "cpu", "--tolerance", "100")
    assert result.returncode == 0, result.stderr
    record = json.loads((output / "kfdeb.json").read_text())["merge"]
    figures = {float(alpha): by_set for alpha, by_set in record["dev_figures"].items()}
    assert sorted(figures) == [0.0, 0.5, 1.0] and record["tolerance"] == 100
    chosen = record["alpha"]
    means = {alpha: np.mean(np.subtract(by_set, figures[0.0])) for alpha, by_set in figures.items()}
    assert means[chosen] == max(means.values())  # a tolerance of 100 points makes every alpha eligible
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 0") or line.startswith("| 1")]
    assert [row.split(" | ")[0] for row in rows] == ["| 0", "| 0.5", "| 1"]
    # the figures merge.py chose on are what evaluate.py computes on the folder it wrote, set by set
    for dev, figure in zip(dev_files, figures[chosen]):
        assert evaluate_figure(output, dev, tmp_path) == pytest.approx(figure, abs=1e-9)
    # and the weights are the mix of the two folders' files, computed here in float64
    start, tuned, merged = (load_file(str(folder / "model.safetensors")) for folder in (tiny_deberta, tuned_model,
                                                                                          output))
    assert merged.keys() == tuned.keys() and start.keys() == tuned.keys()
    for name, value in merged.items():
        if np.issubdtype(value.dtype, np.floating):
            expected = ((1 - chosen) * start[name].astype(np.float64) + chosen * tuned[name].astype(np.float64))
            assert np.array_equal(value, expected.astype(value.dtype)), name
        else:
            assert np.array_equal(value, tuned[name]), name
    assert f"chose alpha {chosen:g}" in result.stdout or chosen == 0.0


def test_a_mix_that_never_beats_the_start_ships_the_start_and_says_so(tiny_deberta, dev_files, tmp_path):
    """The fine-tuned model is the start itself: no alpha gains, the tie goes to alpha 0."""
    output = tmp_path / "merged"
    result = run_main("merge.py", tiny_deberta, "--start", tiny_deberta, "--ir_dev_data", dev_files[0],
                      "--alphas", "1", "--output", output, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (f"no mix beat the start on the dev sets (within --tolerance 0): {output} "
                                              "holds the starting weights")
    assert json.loads((output / "kfdeb.json").read_text())["merge"]["alpha"] == 0.0
    start, merged = (load_file(str(folder / "model.safetensors")) for folder in (tiny_deberta, output))
    assert all(np.array_equal(merged[name], start[name]) for name in start)


def test_user_mistakes_are_one_line_and_exit_2(tiny_deberta, tiny_bert, dev_files, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    cases = [
        (["--start", tiny_deberta, "--ir_dev_data", dev_files[0], "--output", taken],
         f"error: {taken}: --output: exists and is not an empty folder; choose a new one"),
        (["--ir_dev_data", dev_files[0], "--output", tmp_path / "new"],
         f"error: {tiny_deberta}: no train_config.json names the model it started from; pass --start"),
        (["--start", tiny_deberta, "--ir_dev_data", tmp_path / "missing.jsonl", "--output", tmp_path / "new"],
         f"error: {tmp_path / 'missing.jsonl'}: --ir_dev_data: no such folder or file"),
        (["--start", tiny_bert, "--ir_dev_data", dev_files[0], "--output", tmp_path / "new"], "not the same architecture"),
        (["--start", tiny_deberta, "--ir_dev_data", dev_files[0], "--output", tmp_path / "new", "--alphas", "0"],
         "--alphas: every value must be in (0, 1]; got 0"),
    ]
    for args, message in cases:
        result = run_main("merge.py", tiny_deberta, *args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
    assert not (tmp_path / "new").exists()  # nothing half-written
