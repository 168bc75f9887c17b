"""Retrieval evaluation (kfdeb/retrieval.py, ir_data.py, evaluate.py --ir_data) against sentence-transformers."""

from __future__ import annotations

import json

import pytest

from conftest import run_main
from kfdeb.ir_data import BUNDLED_RETRIEVAL_DIR, IrData, korsts_paraphrase_set, read_beir, read_ir_data
from kfdeb.ir_metrics import IR_KEYS, trec_order
from kfdeb.model import load_encoder
from kfdeb.readers import BUNDLED_DATA_DIR, read_sts
from kfdeb.retrieval import TABLE_HEADER, encode_texts, evaluate_retrieval, search, unit_rows

import sentence_transformers as st  # noqa: E402  (the [test] extra: the reference is always there in CI)

KORSTS_DEV = BUNDLED_RETRIEVAL_DIR / "korsts-dev"


@pytest.fixture(scope="module")
def encoder(tiny_bert):
    return load_encoder(tiny_bert, max_seq_length=64)


def st_figures(model_folder, data: IrData) -> dict[str, float]:
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    model = st.SentenceTransformer(str(model_folder), device="cpu")
    model.max_seq_length = 64
    evaluator = InformationRetrievalEvaluator(
        data.queries, data.corpus, {q: set(grades) for q, grades in data.relevant.items()},
        mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[1], precision_recall_at_k=[1, 5, 10, 100], map_at_k=[100],
        write_csv=False, score_functions={"cosine": st.util.cos_sim}, main_score_function="cosine")
    found = evaluator(model)
    return {key: 100 * found[f"cosine_{key}"] for key in IR_KEYS}


def test_figures_equal_sentence_transformers_information_retrieval_evaluator(tiny_bert, encoder):
    """Binary grades and at most 100 relevant documents a query: where the definitions agree (ir_metrics.py),
    every figure agrees; the bundled KorSTS dev set, the tiny model."""
    data = read_beir(KORSTS_DEV, "dev")
    assert max(len(grades) for grades in data.relevant.values()) <= 100
    ours = evaluate_retrieval(encoder, data, batch_size=32)
    reference = st_figures(tiny_bert, data)
    for key in IR_KEYS:
        assert ours.figures[key] == pytest.approx(reference[key], abs=1e-4), key
    assert (ours.queries, ours.documents) == (len(data.queries), len(data.corpus)) == (261, 1459)


def test_duplicates_are_encoded_once_and_searched_under_every_id(encoder):
    data = IrData("dup", {"q1": "고양이가 잔다", "q2": "고양이가 잔다"},
                  {"a": "고양이가 자고 있다", "b": "고양이가 자고 있다", "c": "비행기가 이륙한다"},
                  {"q1": {"b": 1}, "q2": {"a": 1, "c": 2}})
    result = evaluate_retrieval(encoder, data)
    assert result.texts_encoded == 3  # two document texts and one query text
    assert result.figures["recall@5"] == 100.0  # every id searched
    # a and b share one embedding: equal scores, which trec_eval's order ranks by id, b before a
    corpus = unit_rows(encode_texts(encoder, ["고양이가 자고 있다", "고양이가 자고 있다", "비행기가 이륙한다"], 8))
    run = search(data, corpus, unit_rows(encode_texts(encoder, ["고양이가 잔다"] * 2, 8)))
    assert run["q1"]["a"] == run["q1"]["b"]
    order = trec_order(run["q1"])
    assert order.index("b") == order.index("a") - 1


def test_matryoshka_widths_are_searched_from_one_encoding(encoder):
    data = read_beir(KORSTS_DEV, "dev")
    result = evaluate_retrieval(encoder, data, dims=(48, 16))
    assert result.by_dim[48] == pytest.approx(result.figures, abs=1e-9)  # the full width is the model's own
    assert result.by_dim[16] != pytest.approx(result.figures, abs=1e-3)


def test_the_bundled_sets_are_what_the_documented_recipe_builds():
    for split in ("dev", "test"):
        built = korsts_paraphrase_set(read_sts(BUNDLED_DATA_DIR / "KorSTS" / f"sts-{split}.tsv"))
        shipped = read_beir(BUNDLED_RETRIEVAL_DIR / f"korsts-{split}", split)
        assert (shipped.queries, shipped.corpus, shipped.relevant) == (built.queries, built.corpus, built.relevant)
    pairs = read_sts(BUNDLED_DATA_DIR / "KorSTS" / "sts-dev.tsv")
    sure = {p.sentence1 for p in pairs if p.label * 5 >= 4}
    assert set(shipped.corpus.values()) == {p.sentence2 for p in read_sts(BUNDLED_DATA_DIR / "KorSTS" / "sts-test.tsv")}
    assert set(korsts_paraphrase_set(pairs).queries.values()) == sure


def test_evaluate_ir_data_prints_the_table_and_writes_json(tiny_bert, encoder, tmp_path):
    result = run_main("evaluate.py", tiny_bert, "--ir_data", KORSTS_DEV, "--split", "dev", "--json",
                      tmp_path / "ir.json", "--name", "tiny", "--max_seq_length", "64")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert "\n".join(lines[:2]) == TABLE_HEADER and lines[2].startswith("| tiny (korsts-dev (dev)) | ")
    assert "261 queries over 1459 documents" in lines[3]
    figures = json.loads((tmp_path / "ir.json").read_text())
    assert tuple(figures) == IR_KEYS
    direct = evaluate_retrieval(encoder, read_beir(KORSTS_DEV, "dev")).figures
    assert figures == pytest.approx(direct, abs=1e-9)


def test_a_pairs_file_is_a_retrieval_set(tmp_path, encoder):
    path = tmp_path / "faq.csv"
    path.write_text("query,document\n카드 분실,카드를 잃어버렸어요\n카드 분실,분실 신고 방법\n대출 금리,금리가 얼마인가요\n"
                    "환전,분실 신고 방법\n", encoding="utf-8")
    data = read_ir_data(path)
    assert list(data.queries.values()) == ["카드 분실", "대출 금리", "환전"]
    assert list(data.corpus.values()) == ["카드를 잃어버렸어요", "분실 신고 방법", "금리가 얼마인가요"]
    assert data.relevant == {"q1": {"d1": 1, "d2": 1}, "q2": {"d3": 1}, "q3": {"d2": 1}}
    assert set(evaluate_retrieval(encoder, data).figures) == set(IR_KEYS)
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"anchor": "가", "positive": "나"}\n', encoding="utf-8")
    assert read_ir_data(jsonl).relevant == {"q1": {"d1": 1}}


def beir(folder, corpus, queries, qrels, split="test"):
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(corpus, encoding="utf-8")
    (folder / "queries.jsonl").write_text(queries, encoding="utf-8")
    (folder / "qrels" / f"{split}.tsv").write_text(qrels, encoding="utf-8")
    return folder


GOOD_CORPUS = '{"_id": "d1", "title": "제목", "text": "본문"}\n{"_id": 2, "text": "두 번째"}\n'
GOOD_QUERIES = '{"_id": "q1", "text": "질문"}\n'
GOOD_QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\t2\t0\n"
BAD = {  # what differs from a good folder, and the message after the file's path
    "malformed json": ({"corpus": '{"_id": "d1", "text": "본문"}\n{"_id": "d2" "text": "x"}\n'}, "corpus.jsonl",
                       ":2: json: not valid JSON (Expecting ',' delimiter, column 14)"),
    "missing _id": ({"queries": '{"text": "질문"}\n'}, "queries.jsonl", ":1: _id: missing key"),
    "missing text": ({"corpus": '{"_id": "d1", "title": "제목"}\n'}, "corpus.jsonl", ":1: text: missing key"),
    "duplicate id": ({"corpus": GOOD_CORPUS + '{"_id": "d1", "text": "또"}\n'}, "corpus.jsonl",
                     ":3: _id: 'd1' given twice (first on line 1)"),
    "empty text": ({"queries": '{"_id": "q1", "text": " "}\n'}, "queries.jsonl", ":1: text: empty text"),
    "unknown query": ({"qrels": GOOD_QRELS + "q9\td1\t1\n"}, "qrels/test.tsv", ":4: query-id: 'q9' is not in queries.jsonl"),
    "unknown document": ({"qrels": GOOD_QRELS + "q1\td9\t1\n"}, "qrels/test.tsv",
                         ":4: corpus-id: 'd9' is not in corpus.jsonl"),
    "no positive grade": ({"qrels": "query-id\tcorpus-id\tscore\nq1\td1\t0\n"}, "qrels/test.tsv",
                          ":2: score: no grade above 0: no query has a relevant document"),
    "grade not an integer": ({"qrels": "query-id\tcorpus-id\tscore\nq1\td1\thigh\n"}, "qrels/test.tsv",
                             ":2: score: not an integer grade: 'high'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_retrieval_data_names_file_line_and_field(tmp_path, case):
    change, file_name, message = BAD[case]
    folder = beir(tmp_path / "set", change.get("corpus", GOOD_CORPUS), change.get("queries", GOOD_QUERIES),
                  change.get("qrels", GOOD_QRELS))
    result = run_main("evaluate.py", "unused-model", "--ir_data", folder)
    assert result.returncode == 2 and result.stdout == ""  # before the model is looked for
    assert result.stderr == f"error: {folder / file_name}{message}\n"


def test_a_folder_without_the_split_names_the_splits_it_has(tmp_path):
    folder = beir(tmp_path / "set", GOOD_CORPUS, GOOD_QUERIES, GOOD_QRELS, split="dev")
    (folder / "qrels" / "train.tsv").write_text(GOOD_QRELS, encoding="utf-8")
    result = run_main("evaluate.py", "unused-model", "--ir_data", folder)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {folder}/qrels/test.tsv: no split 'test' (the folder has dev, train)")
    good = read_beir(folder, "dev")
    assert good.corpus == {"d1": "제목 본문", "2": "두 번째"} and good.relevant == {"q1": {"d1": 2}}


def test_retrieval_during_training_selects_on_a_mean_and_reaches_metrics_card_and_kfdeb_json(tiny_deberta, small_data,
                                                                                            tmp_path):
    """--ir_dev_data / --ir_test_data: evaluated with KorSTS at every dev evaluation and at the end; the best
    checkpoint chosen on cosine_spearman+ndcg@10 (their mean); every output carries the figures."""
    from kfdeb.config import resolve
    from kfdeb.evaluation import best_score
    from kfdeb.loop import train

    out = tmp_path / "run"
    config = resolve({"model_name_or_path": str(tiny_deberta), "data_dir": str(small_data),
                      "nli_train_glob": "KorNLI/*.train.ko.tsv", "nli_batch_size": 16, "sts_batch_size": 8,
                      "max_seq_length": 64, "max_steps": 6, "eval_steps": 2, "save_steps": 6, "learning_rate": 1e-3,
                      "output_dir": str(out), "progress": False, "ir_dev_data": "kfdeb:korsts-dev",
                      "ir_test_data": str(BUNDLED_RETRIEVAL_DIR / "korsts-test"),
                      "metric_for_best": "cosine_spearman+ndcg@10"})
    summary = train(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dev = [r for r in rows if r.get("split") == "dev"]
    assert [r["step"] for r in dev] == [0, 2, 4, 6] and all(set(IR_KEYS) <= set(r) for r in dev)
    for row in dev:
        assert row["score"] == pytest.approx((row["cosine_spearman"] + row["ndcg@10"]) / 2)
    best = max(dev, key=lambda r: r["score"])
    assert summary["best_step"] == best["step"] and best_score(best, config.metric_for_best) == best["score"]
    test = rows[-1]
    assert test["split"] == "test" and set(IR_KEYS) <= set(test) and summary["test"]["ndcg@10"] == test["ndcg@10"]
    metadata = json.loads((out / "best" / "kfdeb.json").read_text())
    assert metadata["test"]["recall@100"] == test["recall@100"] and metadata["config"]["ir_test_data"] == "korsts-test"
    card = (out / "best" / "README.md").read_text()
    assert "## Retrieval" in card and f"{test['ndcg@10']:.2f}" in card and str(tmp_path) not in card
    # the same figures as evaluate.py gives the best model
    direct = evaluate_retrieval(load_encoder(out / "best"), read_beir(BUNDLED_RETRIEVAL_DIR / "korsts-test", "test"))
    assert direct.figures == pytest.approx({k: test[k] for k in IR_KEYS}, abs=1e-6)


def test_metric_for_best_is_checked_when_the_config_resolves():
    from kfdeb.config import resolve
    from kfdeb.errors import UserInputError

    with pytest.raises(UserInputError, match="--metric_for_best ndcg@10: a retrieval figure needs --ir_dev_data"):
        resolve({"metric_for_best": "ndcg@10"})
    with pytest.raises(UserInputError, match="'ndcg@10\\+mrr@10': expected one of max_spearman"):
        resolve({"metric_for_best": "ndcg@10+mrr@10", "ir_dev_data": "x"})
    assert resolve({"metric_for_best": "ndcg@10+max_spearman", "ir_dev_data": "x"}).metric_for_best == "ndcg@10+max_spearman"


def test_the_xnli_set_is_the_documented_recipe_and_a_run_cannot_train_on_its_source(tiny_deberta, tmp_path):
    from kfdeb.config import resolve
    from kfdeb.errors import UserInputError
    from kfdeb.ir_data import xnli_entailment_set
    from kfdeb.loop import train
    from kfdeb.readers import read_nli

    for split, sizes in (("test", (1670, 5009)), ("dev", (830, 2489))):  # xnli-dev: a general set for merge.py
        pairs = read_nli(BUNDLED_DATA_DIR / "KorNLI" / f"xnli.{split}.ko.tsv").pairs
        built, shipped = xnli_entailment_set(pairs), read_ir_data(f"kfdeb:xnli-{split}", split)
        assert (shipped.queries, shipped.corpus, shipped.relevant) == (built.queries, built.corpus, built.relevant)
        assert (len(shipped.queries), len(shipped.corpus)) == sizes
        entailed = {(p, h) for p, h, label in pairs if label == "entailment"}
        assert all((shipped.queries[q], shipped.corpus[d]) in entailed for q, docs in shipped.relevant.items()
                   for d in docs)
    values = {"model_name_or_path": str(tiny_deberta), "data_dir": "kfdeb:bundled", "max_steps": 2,
              "output_dir": str(tmp_path / "run"), "progress": False, "ir_test_data": "kfdeb:xnli-test"}
    with pytest.raises(UserInputError, match="--ir_test_data kfdeb:xnli-test is built from KorNLI/xnli.test.ko.tsv, "
                                             "which this run trains on"):
        train(resolve({**values, "nli_train_glob": "KorNLI/xnli.*.ko.tsv"}))
    with pytest.raises(UserInputError, match="--ir_dev_data kfdeb:xnli-dev is built from KorNLI/xnli.dev.ko.tsv, "
                                             "which this run trains on"):
        train(resolve({**values, "ir_test_data": "", "ir_dev_data": "kfdeb:xnli-dev",
                       "nli_train_glob": "KorNLI/xnli.dev.ko.tsv"}))
    with pytest.raises(UserInputError, match="--ir_dev_data kfdeb:korsts-dev is built from KorSTS/sts-dev.tsv"):
        train(resolve({**values, "ir_test_data": "", "ir_dev_data": "kfdeb:korsts-dev", "tasks": "sts",
                       "sts_train_file": str(BUNDLED_DATA_DIR / "KorSTS" / "sts-dev.tsv")}))
