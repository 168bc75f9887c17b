"""Prompts (kfdeb/encoding.py): read from a model folder, applied as sentence-transformers applies them, kept."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kfdeb.errors import UserInputError
from kfdeb.model import load_encoder

import sentence_transformers as st  # noqa: E402  (the [test] extra: the reference is always there in CI)

SENTENCES = ["카드를 잃어버렸어요", "분실 신고는 앱에서 할 수 있습니다", "대출 금리"]
E5_PROMPTS = {"query": "query: ", "document": "passage: "}


@pytest.fixture
def prompted(tiny_bert, tmp_path):
    """The tiny BERT with e5's prompts, saved by sentence-transformers itself (config_sentence_transformers.json)."""
    folder = tmp_path / "prompted"
    st.SentenceTransformer(str(tiny_bert), device="cpu", prompts=E5_PROMPTS).save(str(folder))
    return folder


def test_encode_query_and_document_equal_sentence_transformers(prompted, tmp_path):
    ours = load_encoder(prompted, max_seq_length=64)
    reference = st.SentenceTransformer(str(prompted), device="cpu")
    reference.max_seq_length = 64
    assert ours.prompts == E5_PROMPTS
    for method in ("encode_query", "encode_document"):
        np.testing.assert_allclose(getattr(ours, method)(SENTENCES, convert_to_numpy=True),
                                   getattr(reference, method)(SENTENCES), rtol=0, atol=1e-5, err_msg=method)
    np.testing.assert_allclose(ours.encode(SENTENCES, prompt_name="query", convert_to_numpy=True),
                               reference.encode(SENTENCES, prompt_name="query"), rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours.encode(SENTENCES, prompt="질문: ", convert_to_numpy=True),
                               reference.encode(SENTENCES, prompt="질문: "), rtol=0, atol=1e-5)
    plain = ours.encode(SENTENCES, convert_to_numpy=True)  # no default_prompt_name: no prompt
    np.testing.assert_allclose(plain, reference.encode(SENTENCES), rtol=0, atol=1e-5)
    assert np.abs(plain - ours.encode_query(SENTENCES, convert_to_numpy=True)).max() > 1e-3
    with pytest.raises(UserInputError, match="prompt_name 'instruction': the model's prompts are document, query"):
        ours.encode(SENTENCES, prompt_name="instruction")
    # a folder kfdeb saves keeps the prompts where sentence-transformers reads them
    saved = ours.save(tmp_path / "saved")
    assert json.loads((saved / "config_sentence_transformers.json").read_text())["prompts"] == E5_PROMPTS
    again = st.SentenceTransformer(str(saved), device="cpu")
    np.testing.assert_allclose(again.encode_query(SENTENCES), ours.encode_query(SENTENCES, convert_to_numpy=True),
                               rtol=0, atol=1e-5)


def test_a_default_prompt_name_applies_to_plain_encode(prompted):
    config = json.loads((prompted / "config_sentence_transformers.json").read_text())
    (prompted / "config_sentence_transformers.json").write_text(json.dumps({**config, "default_prompt_name": "query"}))
    ours = load_encoder(prompted, max_seq_length=64)
    reference = st.SentenceTransformer(str(prompted), device="cpu")
    reference.max_seq_length = 64
    np.testing.assert_allclose(ours.encode(SENTENCES, convert_to_numpy=True), reference.encode(SENTENCES),
                               rtol=0, atol=1e-5)
    (prompted / "config_sentence_transformers.json").write_text(json.dumps({**config, "default_prompt_name": "title"}))
    with pytest.raises(UserInputError, match="default_prompt_name: 'title' is not one of the prompts"):
        load_encoder(prompted)


def test_the_onnx_encoder_applies_the_same_prompts(prompted):
    import kfdeb
    from kfdeb import cli

    assert cli.export_main([str(prompted), "--max_seq_length", "64"]) == 0
    graph = kfdeb.load(prompted / "onnx" / "model.onnx")
    ours = load_encoder(prompted, max_seq_length=64)
    assert graph.prompts == E5_PROMPTS
    np.testing.assert_allclose(graph.encode_query(SENTENCES, convert_to_numpy=True),
                               ours.encode_query(SENTENCES, convert_to_numpy=True), rtol=0, atol=1e-5)
    np.testing.assert_allclose(graph.encode_document(SENTENCES, convert_to_numpy=True),
                               ours.encode_document(SENTENCES, convert_to_numpy=True), rtol=0, atol=1e-5)
