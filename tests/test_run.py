"""Run setup (kfdeb/run.py): device and precision choices, seeds, the output folder."""

from __future__ import annotations

import pytest
import torch

from kfdeb.distributed import Context, resolve_device
from kfdeb.errors import UserInputError
from kfdeb.amp import amp_dtype_for, describe_amp

V100, T4, A100, H100 = (7, 0), (7, 5), (8, 0), (9, 0)


@pytest.mark.parametrize("amp, device, capability, expected", [
    ("auto", "cuda", H100, torch.bfloat16),
    ("auto", "cuda", A100, torch.bfloat16),
    ("auto", "cuda", T4, torch.float16),  # emulated bf16 only: fp16 + GradScaler, as the reference trained
    ("auto", "cuda", V100, torch.float16),
    ("auto", "cpu", None, None),
    ("none", "cuda", H100, None),
    ("bf16", "cpu", None, torch.bfloat16),  # asked for: honoured, even where it is slow
    ("fp16", "cuda", H100, torch.float16),
    ("bf16", "cuda", V100, torch.bfloat16),
])
def test_amp_dtype_for_each_device(amp, device, capability, expected):
    assert amp_dtype_for(amp, device, capability) is expected


def test_the_startup_line_says_which_precision_and_why():
    assert describe_amp("auto", torch.bfloat16, H100) == "bf16 (auto: GPU compute capability 9.0, native bf16)"
    assert describe_amp("auto", torch.float16, T4) == \
        "fp16 with GradScaler (auto: GPU compute capability 7.5, no native bf16)"
    assert describe_amp("auto", None, None) == "none (fp32) (auto: not a GPU)"
    assert describe_amp("bf16", torch.bfloat16, None) == "bf16 (--amp bf16)"


@pytest.mark.parametrize("requested, local_rank, world, cuda, expected", [
    ("auto", 0, 1, False, "cpu"),
    ("auto", 3, 8, True, "cuda:3"),
    ("cuda", 0, 1, True, "cuda:0"),  # one process: GPU 0, not torch.device("cuda") without an index
    ("cuda", 5, 8, True, "cuda:5"),  # under torchrun: this rank's GPU
    ("cuda:1", 0, 1, True, "cuda:1"),
    ("cpu", 1, 2, True, "cpu"),
])
def test_resolve_device(requested, local_rank, world, cuda, expected):
    assert resolve_device(requested, local_rank, world, cuda) == expected


@pytest.mark.parametrize("requested, world, cuda, message", [
    ("cuda", 1, False, "CUDA is not available"),
    ("cuda:1", 2, True, "names one GPU, but 2 processes run"),
    ("tpu", 1, False, "expected auto, cpu, cuda or cuda:N"),
])
def test_resolve_device_refuses_what_cannot_work(requested, world, cuda, message):
    with pytest.raises(UserInputError, match=message):
        resolve_device(requested, 0, world, cuda)


CPU_CONTEXT = Context(0, 0, 1, torch.device("cpu"))


def test_matryoshka_widths_must_fit_the_model_and_a_missing_full_width_warns(capsys):
    from kfdeb.run import check_matryoshka_dims

    with pytest.raises(UserInputError, match="--matryoshka_dims 1024: wider than the model's 768-dimensional embedding"):
        check_matryoshka_dims((1024, 256), 768, CPU_CONTEXT)
    check_matryoshka_dims((768, 256), 768, CPU_CONTEXT)
    assert capsys.readouterr().out == ""
    check_matryoshka_dims((512, 256), 768, CPU_CONTEXT)
    assert "leaves out the model's own width 768" in capsys.readouterr().out


# never worse than the start: the step-0 evaluation, keep-best against it, the last line ---------------------------

FAQ = "examples/data/faq_pairs.jsonl"


def retrieval_run(model, out, **overrides):
    """An own-pairs run with retrieval dev data and no KorSTS anywhere (data_dir names no folder)."""
    from conftest import REPO
    from kfdeb.config import resolve

    values = {"model_name_or_path": str(model), "data_dir": str(out / "no-kor-nlu-here"), "tasks": "nli",
              "nli_train_files": str(REPO / FAQ), "max_seq_length": 32, "nli_batch_size": 8, "max_steps": 6,
              "eval_steps": 3, "save_steps": 3, "logging_steps": 3, "learning_rate": 1e-3, "output_dir": str(out),
              "progress": False, "no_cache": True}
    return resolve({**values, **overrides})


def weights(folder) -> dict[str, torch.Tensor]:
    from kfdeb.model import load_encoder

    return load_encoder(folder, device="cpu").state_dict()


def dev_rows(out) -> list[dict]:
    import json

    return [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if row.get("split") == "dev"]


def test_a_run_that_never_beats_the_start_keeps_the_starting_weights_and_says_so_even_resumed(
        tiny_deberta, tmp_path, capsys, monkeypatch):
    """The dev set is one the start already solves: each query's relevant document is its own text (nDCG@10 100 for
    any weights), so no step can beat step 0. Stopped at step 3 and resumed, the run still compares with step 0."""
    import json

    from kfdeb import train_state
    from kfdeb.errors import TrainingStopped
    from kfdeb.loop import train

    from conftest import REPO, sigterm_during_step

    pairs = [json.loads(line) for line in (REPO / FAQ).read_text(encoding="utf-8").splitlines()]
    beir = tmp_path / "identity"
    (beir / "qrels").mkdir(parents=True)
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": p["anchor"]}, ensure_ascii=False) + "\n"
                                                for i, p in enumerate(pairs)), encoding="utf-8")
    documents = [p["anchor"] for p in pairs] + [p["positive"] for p in pairs]
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": t}, ensure_ascii=False) + "\n"
                                               for i, t in enumerate(documents)), encoding="utf-8")
    (beir / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(len(pairs))))
    out = tmp_path / "run"
    with monkeypatch.context() as patched:
        sigterm_during_step(patched, 3)
        with pytest.raises(TrainingStopped, match="at step 3 of 6"):
            train(retrieval_run(tiny_deberta, out, ir_dev_data=str(beir)))
    capsys.readouterr()
    summary = train(retrieval_run(tiny_deberta, out, ir_dev_data=str(beir), resume=True))
    printed = capsys.readouterr().out
    assert [(r["step"], r["ndcg@10"]) for r in dev_rows(out)] == [(0, 100.0), (3, 100.0), (6, 100.0)]
    assert summary["best_step"] == 0
    assert ("no step beat the start on dev ndcg@10 (start 100.00, best step 3 100.00): best/ holds the starting weights"
            in printed.splitlines())
    start, best = weights(tiny_deberta), weights(out / "best")
    assert start.keys() == best.keys() and all(torch.equal(start[k], best[k]) for k in start)
    trained = train_state.read_part(train_state.latest(out), "train")["model"]
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # the run did train: the start was kept
    assert json.loads((out / "best" / "kfdeb.json").read_text())["best_step"] == 0


def test_a_run_that_beats_the_start_keeps_the_trained_weights_and_says_by_how_much(tiny_deberta, tmp_path, capsys):
    """Retrieval-only (no KorSTS file anywhere): trained on the dev pairs themselves, nDCG@10 rises above step 0's."""
    from conftest import REPO
    from kfdeb.loop import train

    out = tmp_path / "run"
    config = retrieval_run(tiny_deberta, out, ir_dev_data=str(REPO / FAQ))
    assert config.metric_for_best == "ndcg@10"  # auto, with retrieval dev data only
    summary = train(config)
    rows = {r["step"]: r for r in dev_rows(out)}
    assert sorted(rows) == [0, 3, 6]
    best = max((3, 6), key=lambda step: rows[step]["ndcg@10"])
    assert rows[best]["ndcg@10"] > rows[0]["ndcg@10"] and summary["best_step"] == best
    gain = rows[best]["ndcg@10"] - rows[0]["ndcg@10"]
    assert (f"best: step {best}, dev ndcg@10 {rows[best]['ndcg@10']:.2f} (start {rows[0]['ndcg@10']:.2f}, {gain:+.2f})"
            in capsys.readouterr().out.splitlines())
    start, kept = weights(tiny_deberta), weights(out / "best")
    assert any(not torch.equal(start[k], kept[k]) for k in start)


def test_a_run_without_dev_data_keeps_the_final_weights_and_says_so_in_one_line(tiny_deberta, tmp_path, capsys):
    import json

    from kfdeb import train_state
    from kfdeb.loop import train

    out = tmp_path / "run"
    summary = train(retrieval_run(tiny_deberta, out, max_steps=3))
    lines = capsys.readouterr().out.splitlines()
    assert ("no dev data (no KorSTS dev, --sts_dev_file, --ir_dev_data or --ir_dev_fraction): best/ keeps the final "
            "weights") in lines
    assert dev_rows(out) == [] and summary["best_step"] == -1 and summary["dev"] == {} and summary["test"] == {}
    final = train_state.read_part(train_state.latest(out), "train")["model"]
    kept = weights(out / "best")
    assert all(torch.equal(final[k], kept[k]) for k in kept)
    assert json.loads((out / "best" / "kfdeb.json").read_text())["step"] == 3
    assert "the final weights (step 3; no dev data selected a checkpoint)" in (out / "best" / "README.md").read_text()


@pytest.mark.parametrize("given, expected", [
    ({}, "max_spearman"),  # the reference recipe: KorSTS dev
    ({"tasks": "nli"}, "max_spearman"),  # training_nli.py: KorNLI from data_dir, KorSTS dev
    ({"tasks": "nli", "nli_train_files": FAQ, "ir_dev_data": "dev.jsonl"}, "ndcg@10"),
    ({"tasks": "nli", "nli_train_files": FAQ, "ir_dev_fraction": 0.1}, "ndcg@10"),
    ({"tasks": "nli", "nli_train_files": FAQ, "sts_dev_file": "scored.csv", "ir_dev_data": "d.jsonl"}, "max_spearman"),
    ({"tasks": "nli", "nli_train_files": FAQ}, "auto"),  # no dev data: nothing selects
    ({"tasks": "nli", "nli_train_files": FAQ, "metric_for_best": "cosine_spearman"}, "cosine_spearman"),
])
def test_metric_for_best_auto(given, expected):
    from kfdeb.config import korsts_from_data_dir, resolve

    config = resolve(given)
    assert config.metric_for_best == expected
    # an own-pairs run reads data_dir's KorSTS only when a KorSTS figure selects (or the recipe trains on it)
    assert korsts_from_data_dir(config) == (expected in ("max_spearman", "cosine_spearman") and not config.sts_dev_file)


def test_a_korsts_figure_asked_of_an_own_pairs_run_without_the_files_names_the_offline_fix(tiny_deberta, tmp_path):
    from conftest import REPO, run_main

    result = run_main("train.py", "--model_name_or_path", tiny_deberta, "--tasks", "nli", "--nli_train_files", REPO / FAQ,
                      "--metric_for_best", "cosine_spearman", "--data_dir", tmp_path / "nowhere",
                      "--output_dir", tmp_path / "run", "--progress", "false")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: {tmp_path / 'nowhere' / 'KorSTS' / 'sts-dev.tsv'}: KorSTS dev file not found")
    assert "--data_dir kfdeb:bundled" in result.stderr


# the training length is not the model's length -----------------------------------------------------------------

def test_best_keeps_the_start_model_s_own_max_seq_length_unless_told(tiny_deberta, tmp_path, capsys):
    """A start folder whose sentence_bert_config.json says 128, trained at 32: best/ reads 128 (sentence-transformers
    and kfdeb alike); --save_max_seq_length 48 keeps 48."""
    import json
    import shutil

    from sentence_transformers import SentenceTransformer

    from kfdeb.loop import train
    from kfdeb.model import load_encoder

    start = tmp_path / "start"
    shutil.copytree(tiny_deberta, start)
    (start / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    for saved, flag in ((128, 0), (48, 48)):
        out = tmp_path / f"run-{saved}"
        train(retrieval_run(start, out, max_steps=1, save_max_seq_length=flag))
        assert json.loads((out / "best" / "sentence_bert_config.json").read_text())["max_seq_length"] == saved
        assert json.loads((out / "best" / "kfdeb.json").read_text())["max_seq_length"] == saved
        assert SentenceTransformer(str(out / "best"), device="cpu").max_seq_length == saved
        assert load_encoder(out / "best").max_seq_length == saved
        why = "the start model's own" if not flag else "--save_max_seq_length; the start model's own is 128"
        assert (f"max_seq_length: training at 32 tokens; best/ keeps {saved} ({why}), and dev and test evaluations "
                "run at it") in capsys.readouterr().out.splitlines()
