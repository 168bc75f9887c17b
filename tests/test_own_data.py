"""Your own data through a run (kfdeb/tasks.py, loop.py, train.py): own files instead of or beside KorNLU.

The example files under examples/data/ are the inputs, so they are proven to work as documented.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import REPO, run_main, sigterm_during_step
from kfdeb import distributed
from kfdeb.config import resolve
from kfdeb.errors import UserInputError
from kfdeb.loop import task_loss, train
from kfdeb.model import load_encoder
from kfdeb.tasks import build_tasks, examples_in_memory, read_sts_split, read_task_data

EXAMPLES = REPO / "examples" / "data"
CPU = distributed.Context(0, 0, 1, torch.device("cpu"))


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def jsonl_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def own_config(model, out, **overrides):
    values = {"model_name_or_path": str(model), "data_dir": str(out / "no-kor-nlu-here"), "max_seq_length": 64,
              "nli_batch_size": 8, "sts_batch_size": 8, "max_steps": 4, "eval_steps": 2, "save_steps": 4,
              "logging_steps": 2, "learning_rate": 1e-4, "output_dir": str(out), "progress": False}
    return resolve({**values, **overrides})


def test_a_kornlu_file_given_by_path_reads_as_from_data_dir_and_mixes_with_own_triplets(small_data, tmp_path):
    kornli, korsts = small_data / "KorNLI" / "small.train.ko.tsv", small_data / "KorSTS" / "sts-train.tsv"
    from_dir = read_task_data(own_config("m", tmp_path, data_dir=str(small_data), nli_train_glob="KorNLI/*.train.ko.tsv"),
                              small_data, CPU)
    by_path = read_task_data(own_config("m", tmp_path, nli_train_files=str(kornli), sts_train_file=str(korsts)),
                             tmp_path / "nowhere", CPU)
    assert by_path["nli"][0] == from_dir["nli"][0]  # the same triplets of the recipe
    assert by_path["sts"][0] == from_dir["sts"][0]
    np.testing.assert_array_equal(by_path["sts"][1], from_dir["sts"][1])

    mixed = read_task_data(own_config("m", tmp_path, tasks="nli", nli_train_files=f"{kornli},{EXAMPLES / 'triplets.csv'}"),
                           tmp_path / "nowhere", CPU)
    given = [(row["anchor"], row["positive"], row["negative"]) for row in csv_rows(EXAMPLES / "triplets.csv")]
    assert given[2][0] == "원/달러 환율이 1,400원을 넘어섰다." and given[3][0] == '회사는 "올해 배당을 늘리겠다"고 밝혔다.'
    assert [tuple(t) for t in mixed["nli"][0]] == [tuple(t) for t in from_dir["nli"][0]] + given


def test_a_missing_dev_file_says_which_flag_gives_one(tmp_path):
    config = own_config("m", tmp_path, sts_train_file=str(EXAMPLES / "sts_train.tsv"))
    with pytest.raises(UserInputError) as err:
        read_sts_split(config, tmp_path / "nowhere", "dev")
    assert str(err.value).startswith(f"{tmp_path / 'nowhere' / 'KorSTS' / 'sts-dev.tsv'}: KorSTS dev file not found")
    assert str(err.value).endswith("or pass --sts_dev_file with a file of scored pairs: sentence1, sentence2, score)")


def test_pair_rows_batch_without_duplicates_and_score_against_the_positives_only(tiny_deberta, tmp_path):
    """Anchor-positive rows: the same loss as sentence-transformers' MultipleNegativesRankingLoss on 2-text examples."""
    from sentence_transformers import InputExample, SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    pairs = [(row["anchor"], row["positive"]) for row in jsonl_rows(EXAMPLES / "faq_pairs.jsonl")]
    config = own_config(tiny_deberta, tmp_path, tasks="nli", nli_train_files=str(EXAMPLES / "faq_pairs.jsonl"))
    examples = read_task_data(config, tmp_path / "nowhere", CPU)
    assert examples["nli"][0] == pairs
    encoder = load_encoder(tiny_deberta, max_seq_length=64)
    (task,) = build_tasks(config, examples_in_memory(examples), encoder, CPU)
    assert task.rows.shape == (24, 2) and len(task.sampler) == 3
    batch = task.sampler.next_batch()
    texts = [pairs[i] for i in batch]
    assert len(batch) == 8 and len({t.strip().lower() for pair in texts for t in pair}) == 16

    ours = task_loss(encoder, task, task.rank_batch(batch, CPU), CPU, encoder.pad_id, 1)
    reference = SentenceTransformer(str(tiny_deberta), device="cpu")
    reference.max_seq_length = 64
    features, labels = reference.smart_batching_collate([InputExample(texts=list(pair)) for pair in texts])
    theirs = MultipleNegativesRankingLoss(reference, scale=20.0)(features, labels)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)


def test_a_run_on_recipe_and_given_triplets_from_own_files(tiny_deberta, tmp_path):
    """NLI pairs (.jsonl) and triplets (.csv) in one objective; dev and test on own scored pairs (.jsonl)."""
    nli = tmp_path / "nli.jsonl"
    nli.write_text("".join(json.dumps({"sentence1": f"전제 {i}", "sentence2": f"{label} 문장 {i}", "gold_label": label},
                                      ensure_ascii=False) + "\n"
                           for i in range(8) for label in ("entailment", "contradiction")), encoding="utf-8")
    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join(json.dumps({"sentence1": row["sentence1"], "sentence2": row["sentence2"],
                                          "score": float(row["score"])}, ensure_ascii=False) + "\n"
                              for row in csv_rows(EXAMPLES / "sts_test.csv")), encoding="utf-8")
    out = tmp_path / "run"
    summary = train(own_config(tiny_deberta, out, tasks="nli", nli_train_files=f"{nli},{EXAMPLES / 'triplets.csv'}",
                               sts_dev_file=str(scored), sts_test_file=str(scored), nli_batch_size=16))
    # 8 premises with one entailment and one contradiction each: 16 recipe triplets, then the 16 given ones
    assert summary["total_steps"] == 4 and np.isfinite(summary["test"]["cosine_spearman"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["task"]) for r in rows if "task" in r] == [(2, "nli"), (4, "nli")]
    assert all(np.isfinite(r["loss"]) for r in rows if "task" in r)
    assert summary["dev"] == summary["test"]  # the same file: dev and test read the same pairs


def test_end_to_end_own_pairs_and_scored_pairs_evaluated_on_an_own_test_file(tiny_deberta, tmp_path):
    out = tmp_path / "own"
    summary = train(own_config(tiny_deberta, out, nli_train_files=str(EXAMPLES / "faq_pairs.jsonl"),
                               sts_train_file=str(EXAMPLES / "sts_train.tsv"), sts_dev_file=str(EXAMPLES / "sts_train.tsv"),
                               sts_test_file=str(EXAMPLES / "sts_test.csv"), max_steps=3, eval_steps=3,
                               logging_steps=3, save_steps=3))
    # 24 pairs and 24 scored pairs, batches of 8: an epoch of 3 steps
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["task"]) for r in rows if "task" in r] == [(3, "nli"), (3, "sts")]
    assert [r["step"] for r in rows if r.get("split") == "dev"] == [0, 3] and summary["best_step"] == 3

    # the test figures, recomputed from the best model and the file as Python's csv module reads it
    test = csv_rows(EXAMPLES / "sts_test.csv")
    best = load_encoder(out)
    first = best.encode([r["sentence1"] for r in test], convert_to_numpy=True)
    second = best.encode([r["sentence2"] for r in test], convert_to_numpy=True)
    cosine = (first * second).sum(1) / np.linalg.norm(first, axis=1) / np.linalg.norm(second, axis=1)
    gold = [float(r["score"]) for r in test]
    assert summary["test"]["cosine_pearson"] == pytest.approx(100 * stats.pearsonr(cosine, gold)[0], abs=1e-3)
    assert summary["test"]["cosine_spearman"] == pytest.approx(100 * stats.spearmanr(cosine, gold)[0], abs=1e-3)

    card = (out / "best" / "README.md").read_text()
    assert str(REPO) not in card and str(tmp_path) not in card  # own files are named by their names only
    assert '"nli_train_files": "faq_pairs.jsonl"' in card and "kor_nli" not in card and "kor_sts" not in card


def test_train_cli_stops_on_a_bad_own_file_with_one_line(tiny_deberta, tmp_path):
    bad = tmp_path / "faq.csv"
    bad.write_text('anchor,positive\n"환불 문의,환불은 어떻게 하나요?\n', encoding="utf-8")
    result = run_main("train.py", "--model_name_or_path", tiny_deberta, "--nli_train_files", f"{tmp_path}/*.csv",
                        "--sts_train_file", EXAMPLES / "sts_train.tsv", "--output_dir", tmp_path / "out",
                        "--progress", "false")
    assert result.returncode == 2
    assert result.stderr == (f"error: {bad}:2: anchor: quoted field not closed before the end of the file "
                             '(a quote inside a quoted field is written "")\n')


@pytest.fixture(scope="module")
def tuples_file(tmp_path_factory, bundled_dir):
    """XNLI dev premises, each with its entailment as positive and three other hypotheses as negatives, in
    mine.py's n-tuple columns (anchor, positive, negative_1 .. negative_3)."""
    from kfdeb.readers import read_nli

    pairs = read_nli(bundled_dir / "KorNLI" / "xnli.dev.ko.tsv").pairs
    entail = {p: h for p, h, label in pairs if label == "entailment"}
    hypotheses = list(dict.fromkeys(h for _, h, _ in pairs))
    rows = [{"anchor": premise, "positive": positive,
             **{f"negative_{k}": hypotheses[(i * 7 + k * 13) % len(hypotheses)] for k in (1, 2, 3)}}
            for i, (premise, positive) in enumerate(list(entail.items())[:200])]
    path = tmp_path_factory.mktemp("tuples") / "mined.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def test_n_tuples_train_with_gradcache_matryoshka_prompts_cache_and_resume(tiny_deberta, tuples_file, tmp_path,
                                                                         monkeypatch):
    """(anchor, positive, negative_1 .. negative_3) rows: each anchor against every positive and negative of the
    batch. GradCache gives the plain run's losses and weights; the token cache the in-memory run's; a run stopped
    by SIGTERM during step 4 and resumed ends as the uninterrupted one, bit for bit; the prompts reach
    the saved model."""
    from kfdeb.errors import TrainingStopped
    from kfdeb.train_state import latest, read_part

    settings = dict(nli_train_files=str(tuples_file), tasks="nli", nli_batch_size=8, max_steps=6, eval_steps=3,
                    save_steps=6, logging_steps=1, matryoshka_dims="64,16", query_prompt="질문: ",
                    document_prompt="문서: ", sts_dev_file=str(EXAMPLES / "sts_test.csv"),
                    sts_test_file=str(EXAMPLES / "sts_test.csv"), cache_dir=str(tmp_path / "cache"))
    runs = {}
    for name, extra in (("plain", {}), ("gradcache", {"nli_mini_batch_size": 3}), ("no_cache", {"no_cache": True})):
        train(own_config(tiny_deberta, tmp_path / name, **settings, **extra))
        runs[name] = read_part(latest(tmp_path / name), "train")["model"], \
            [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    rows, columns = read_task_data(own_config(tiny_deberta, tmp_path / "x", **settings), tmp_path, CPU)["nli"][0], 5
    assert len(rows) == 200 and {len(row) for row in rows} == {columns}
    for name in ("gradcache", "no_cache"):
        for key, tensor in runs["plain"][0].items():
            torch.testing.assert_close(runs[name][0][key], tensor, rtol=0, atol=1e-5, msg=f"{name} {key}")
    losses = lambda metrics: [row["loss"] for row in metrics if "loss" in row]  # noqa: E731
    assert losses(runs["gradcache"][1]) == pytest.approx(losses(runs["plain"][1]), abs=1e-5)
    assert losses(runs["no_cache"][1]) == losses(runs["plain"][1])  # the same tokens, the same arithmetic

    sigterm_during_step(monkeypatch, 4)  # one process: it stops at the end of that step
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM at step 4 of 6"):
        train(own_config(tiny_deberta, tmp_path / "stopped", **settings))
    monkeypatch.undo()
    train(own_config(tiny_deberta, tmp_path / "stopped", **settings, resume=True))
    resumed = read_part(latest(tmp_path / "stopped"), "train")["model"]
    for key, tensor in runs["plain"][0].items():
        assert torch.equal(resumed[key], tensor), key
    saved = json.loads((tmp_path / "plain" / "best" / "config_sentence_transformers.json").read_text())
    assert saved["prompts"] == {"query": "질문: ", "document": "문서: "}


def test_faq_shaped_pairs_train_with_the_levers_and_resume_as_one_run(tiny_deberta, tmp_path, monkeypatch):
    """Many questions for one answer (20 of 30 questions share it: more than half of a batch of 8; 3 answers in
    all, fewer than a batch, where the legacy no-duplicates rule could not fill one) train with gist (guide: a
    frozen copy of the starting weights), --scale, Matryoshka and GradCache; stopped at step 4 and resumed, the
    run ends with the uninterrupted run's weights; a resume whose starting model changed meanwhile is refused (the
    guide is made again from it). Neither the state nor best/ holds the guide."""
    import shutil

    from safetensors.torch import load_file, save_file

    import kfdeb.loop
    from kfdeb import train_state
    from kfdeb.errors import TrainingStopped

    start = tmp_path / "start"
    shutil.copytree(tiny_deberta, start)

    faq = tmp_path / "faq.jsonl"
    faq.write_text("".join(json.dumps({"anchor": f"질문 {i} 은 무엇인가요", "positive": f"답변 {0 if i < 20 else 1 + i % 2}"},
                                      ensure_ascii=False) + "\n" for i in range(30)), encoding="utf-8")
    settings = dict(tasks="nli", nli_train_files=str(faq), sts_dev_file=str(EXAMPLES / "sts_train.tsv"),
                    sts_test_file=str(EXAMPLES / "sts_test.csv"), nli_loss="gist", guide_model="self", scale=50.0,
                    matryoshka_dims="64,16", nli_mini_batch_size=3, max_steps=6, eval_steps=3, save_steps=6)
    straight = train(own_config(start, tmp_path / "straight", **settings))
    with monkeypatch.context() as patched:
        sigterm_during_step(patched, 4)
        with pytest.raises(TrainingStopped, match="at step 4 of 6"):
            train(own_config(start, tmp_path / "stopped", **settings))
    weights = start / "model.safetensors"
    original = weights.read_bytes()
    changed = load_file(weights)
    name = next(iter(changed))
    changed[name] = changed[name] + 1.0
    save_file(changed, weights, metadata={"format": "pt"})
    with pytest.raises(UserInputError, match=f"--guide_model self: {start} no longer holds the weights this run started"):
        train(own_config(start, tmp_path / "stopped", **settings, resume=True))
    weights.write_bytes(original)
    resumed = train(own_config(start, tmp_path / "stopped", **settings, resume=True))
    assert resumed["test"] == straight["test"]
    straight_state = train_state.read_part(train_state.latest(tmp_path / "straight"), "train")
    stopped_state = train_state.read_part(train_state.latest(tmp_path / "stopped"), "train")
    for name, tensor in straight_state["model"].items():
        assert torch.equal(stopped_state["model"][name], tensor), name
    encoder_keys = set(load_encoder(start).state_dict())
    assert set(straight_state["model"]) == encoder_keys  # the trained model only; the guide is recorded by its digest:
    assert straight_state["guide_sha256"] == train_state.weights_sha256(load_encoder(start))  # the starting weights
    assert set(load_encoder(tmp_path / "straight" / "best").state_dict()) == encoder_keys
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows if "task" in r)
    # the card and kfdeb.json say which loss, scale and guide trained it
    assert "guide-masked in-batch negatives (GISTEmbedLoss, scale 50)" in (tmp_path / "straight" / "best" / "README.md").read_text()
    published = json.loads((tmp_path / "straight" / "best" / "kfdeb.json").read_text())["config"]
    assert (published["nli_loss"], published["guide_model"], published["scale"]) == ("gist", "self", 50.0)


def test_a_guide_model_with_its_own_tokenizer_reads_the_batch_prompted_texts(tiny_deberta, tiny_xlmr, tmp_path):
    """--guide_model PATH (an XLM-R with another tokenizer and pad id) embeds the batch's texts, prompts included,
    in its own token ids: the step's loss is GIST's on the model's and the guide's own encodings of those texts."""
    from kfdeb.losses import gist_loss
    from kfdeb.run import setup

    faq = tmp_path / "faq.jsonl"
    rows = [(f"질문 {i} 은 무엇인가요", f"답변 {i % 5} 입니다") for i in range(24)]
    faq.write_text("".join(json.dumps({"anchor": a, "positive": p}, ensure_ascii=False) + "\n" for a, p in rows),
                   encoding="utf-8")
    config = own_config(tiny_deberta, tmp_path / "run", tasks="nli", nli_train_files=str(faq), sts_dev_file=str(
        EXAMPLES / "sts_train.tsv"), sts_test_file=str(EXAMPLES / "sts_test.csv"), nli_loss="gist",
        guide_model=str(tiny_xlmr), query_prompt="질문: ",
        document_prompt="문서: ", no_cache=True)
    run = setup(config, CPU)
    (task,) = run.parts.tasks
    encoder, guide = run.parts.encoder, run.parts.guide
    assert task.guide_sequences is not None and guide.pad_id == 1 != encoder.pad_id
    batch = task.rank_batch(task.sampler.next_batch(), CPU)
    ours = task_loss(encoder, task, batch, CPU, encoder.pad_id, 1, run.objective, guide)
    anchors, positives = [rows[i][0] for i in batch.indices], [rows[i][1] for i in batch.indices]
    model, guide = load_encoder(tiny_deberta, max_seq_length=64), load_encoder(tiny_xlmr, max_seq_length=64)
    columns = [model.encode(anchors, prompt="질문: "), model.encode(positives, prompt="문서: ")]
    guide_columns = [guide.encode(anchors, prompt="질문: "), guide.encode(positives, prompt="문서: ")]
    ids = {text: i for i, text in enumerate(dict.fromkeys(t for row in rows for t in row))}
    keys = torch.tensor([[ids[a] for a in anchors], [ids[p] for p in positives]])
    assert torch.equal(keys[1][:, None] == keys[1][None, :],
                       batch.keys[1][:, None] == batch.keys[1][None, :])  # the same texts share keys
    expected = gist_loss(columns, guide_columns, config.scale, keys=keys)
    assert ours.item() == pytest.approx(expected.item(), abs=1e-5)
    assert len(set(positives)) < len(positives)  # the batch holds shared positives: the masks were used


def test_ir_dev_fraction_holds_out_whole_answers_trains_on_the_rest_and_writes_the_dev_set(tiny_deberta, tmp_path):
    """FAQ-shaped pairs (chatbot questions, several per answer): the held-out rows are the dev set's queries, written
    to the run folder as a BEIR folder evaluate.py reads; the objective trains on the other rows only."""
    from kfdeb.held_out import hold_out
    from kfdeb.ir_data import read_ir_data

    pairs = jsonl_rows(EXAMPLES / "chatbot_train_pairs.jsonl")[:160]
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    out = tmp_path / "run"
    config = own_config(tiny_deberta, out, tasks="nli", nli_train_files=str(source), ir_dev_fraction=0.25,
                        max_steps=2, eval_steps=2, seed=5)
    assert config.metric_for_best == "ndcg@10"
    rows = [(p["anchor"], p["positive"]) for p in pairs]
    training, held = hold_out(rows, 0.25, seed=5)
    trained, _ = read_task_data(config, tmp_path, CPU)["nli"]
    assert sorted(trained) == sorted(rows[i] for i in training) and len(held) >= 0.25 * len(rows)
    summary = train(config)
    written = read_ir_data(out / "ir_dev_split", "dev")
    expected = {(a, p) for a, p in (rows[i] for i in held)}
    assert {(written.queries[q], written.corpus[d]) for q, docs in written.relevant.items() for d in docs} == expected
    assert set(written.corpus.values()) == {p for _, p in rows}  # held-out questions search every answer
    assert summary["dev"]["ndcg@10"] >= 0 and "## Retrieval" in (out / "best" / "README.md").read_text()


@pytest.mark.parametrize("values", [
    {"ir_dev_fraction": 1.0, "tasks": "nli", "nli_train_files": "pairs.jsonl"},
    {"ir_dev_fraction": -0.1, "tasks": "nli", "nli_train_files": "pairs.jsonl"},
    {"ir_dev_fraction": 0.1},  # KorNLI from data_dir: no own rows to hold out
    {"ir_dev_fraction": 0.1, "tasks": "nli", "nli_train_files": "pairs.jsonl", "ir_dev_data": "dev.jsonl"},
])
def test_ir_dev_fraction_is_refused_where_it_cannot_hold_out_own_rows(values):
    with pytest.raises(UserInputError, match="--ir_dev_fraction .*: a fraction \\(0 < F < 1\\) of the --nli_train_files"):
        resolve(values)
