"""The encoder and checkpoint format (kfdeb/model.py) against sentence-transformers and transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_sentence_transformers_layout
from kfdeb.readers import read_sts
from kfdeb.errors import UserInputError
from kfdeb.evaluation import evaluate_sts
from kfdeb.metrics import sts_figures
from kfdeb.model import load_encoder

import sentence_transformers as st  # noqa: E402  (the [test] extra: the reference is always there in CI)

SENTENCES = ["비행기가 이륙하고 있다.", "한 남자가 큰 플루트를 연주하고 있다.", "고양이", "",
             "남자가 피자에 치즈를 뿌리고 있다. " * 40]  # an empty one and one past max_seq_length


@pytest.mark.parametrize("fixture", ["tiny_deberta", "tiny_bert", "tiny_xlmr"])
def test_embeddings_equal_sentence_transformers(request, fixture):
    folder = request.getfixturevalue(fixture)
    ours = load_encoder(folder, max_seq_length=64).encode(SENTENCES, batch_size=2, convert_to_numpy=True)
    reference = st.SentenceTransformer(str(folder), device="cpu")
    reference.max_seq_length = 64
    np.testing.assert_allclose(ours, reference.encode(SENTENCES, batch_size=2), rtol=0, atol=1e-5)


def reference_figures(model, pairs):
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    evaluator = EmbeddingSimilarityEvaluator([p.sentence1 for p in pairs], [p.sentence2 for p in pairs],
                                             [p.label for p in pairs], batch_size=64,
                                             similarity_fn_names=["cosine", "euclidean", "manhattan", "dot"])
    result = evaluator(model)
    return {f"{sim}_{corr}": 100 * result[f"{corr}_{sim}"]
            for sim in ("cosine", "euclidean", "manhattan", "dot") for corr in ("pearson", "spearman")}


def test_korsts_figures_equal_the_reference_evaluator(tiny_deberta, bundled_dir):
    """Same embeddings: the 8 figures agree to 1e-9. Same model: Pearson to 1e-4 points, Spearman to 5e-4.

    Why Spearman is looser end to end: KorSTS test has 8 pairs of identical sentences (gold 4.2 to
    5) whose cosines are 1 +- 1 ulp; float32 noise of ~1e-7 between two engines reorders them,
    which moves Spearman by up to ~3e-4 points on this random tiny model.
    """
    pairs = read_sts(bundled_dir / "KorSTS" / "sts-test.tsv")
    model = st.SentenceTransformer(str(tiny_deberta), device="cpu")
    reference = reference_figures(model, pairs)

    # the reference's own column embeddings through our similarities and correlations
    first = model.encode([p.sentence1 for p in pairs], batch_size=64)
    second = model.encode([p.sentence2 for p in pairs], batch_size=64)
    same = sts_figures(first, second, np.array([p.label for p in pairs]))
    assert max(abs(same[k] - reference[k]) for k in same) < 1e-9
    ours = evaluate_sts(load_encoder(tiny_deberta), pairs, batch_size=64).figures
    for key, value in ours.items():
        assert value == pytest.approx(reference[key], abs=1e-4 if key.endswith("pearson") else 5e-4), key


def test_encode_keeps_input_order_and_equals_one_by_one(tiny_deberta):
    encoder = load_encoder(tiny_deberta)
    batched = encoder.encode(SENTENCES, batch_size=3)
    single = torch.cat([encoder.encode([s]) for s in SENTENCES])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
    normalised = encoder.encode(SENTENCES, normalize=True, convert_to_numpy=True)
    np.testing.assert_allclose(np.linalg.norm(normalised, axis=1), 1.0, atol=1e-6)
    assert encoder.encode([]).shape == (0, encoder.dimension)
    single = encoder.encode(SENTENCES[1])  # a string, as in sentence-transformers: one vector
    assert single.shape == (encoder.dimension,)
    torch.testing.assert_close(single, batched[1], rtol=0, atol=1e-5)


def test_encode_streams_the_corpus_window_by_window(tiny_deberta):
    """Windows of 4 sentences: tokenized 4 at a time, and the same embeddings as one window."""
    from kfdeb.model import encode_in_length_order

    encoder = load_encoder(tiny_deberta).eval()
    corpus = [f"{i}번 문장: {s}" for i, s in enumerate(SENTENCES * 3)]  # 15 sentences
    tokenized = []
    tokenize = encoder.tokenize

    class Spy:
        pad_id, dimension = encoder.pad_id, encoder.dimension

        def tokenize(self, sentences):
            tokenized.append(len(sentences))
            return tokenize(sentences)

    with torch.inference_mode():
        streamed = encode_in_length_order(Spy(), encoder, corpus, 2, False, False, False, window=4)
        whole = encode_in_length_order(Spy(), encoder, corpus, 2, False, False, False, window=100)
    assert tokenized == [4, 4, 4, 3, 15]  # never more than one window of token ids at a time
    torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(streamed, torch.cat([encoder.encode([s]) for s in corpus]), rtol=0, atol=1e-5)


def test_checkpoint_opens_in_sentence_transformers_and_automodel(tiny_deberta, tmp_path):
    from transformers import AutoModel

    encoder = load_encoder(tiny_deberta, max_seq_length=48)
    out = encoder.save(tmp_path / "ckpt", {"step": 7})
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert {"config.json", "model.safetensors", "modules.json", "sentence_bert_config.json",
            "1_Pooling/config.json", "kfdeb.json"} <= set(files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))] and not list(out.glob(".kfdeb-tmp-*"))
    assert json.loads((out / "kfdeb.json").read_text())["step"] == 7
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 48
    reference = st.SentenceTransformer(str(out), device="cpu")
    assert reference.max_seq_length == 48
    np.testing.assert_allclose(encoder.encode(SENTENCES, convert_to_numpy=True), reference.encode(SENTENCES), atol=1e-5)
    plain = AutoModel.from_pretrained(out)
    for (name, ours), (_, theirs) in zip(encoder.transformer.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(ours, theirs), name
    reloaded = load_encoder(out)
    assert reloaded.max_seq_length == 48 and reloaded.metadata["step"] == 7


def test_sentence_transformers_folders_with_normalize_and_subfolder(tiny_deberta, tmp_path):
    folder = tmp_path / "st"
    shutil.copytree(tiny_deberta, folder / "0_Transformer")
    write_sentence_transformers_layout(folder, max_seq_length=32)
    encoder = load_encoder(folder)
    assert encoder.normalize and encoder.max_seq_length == 32
    reference = st.SentenceTransformer(str(folder), device="cpu")
    np.testing.assert_allclose(encoder.encode(SENTENCES, convert_to_numpy=True), reference.encode(SENTENCES), atol=1e-5)


def cls_folder(source: Path, folder: Path, normalize: bool = True) -> Path:
    """A sentence-transformers folder pooling the first token (+ Normalize), as BGE-m3-ko and KURE-v1 are."""
    shutil.copytree(source, folder)
    hidden = json.loads((folder / "config.json").read_text())["hidden_size"]
    (folder / "1_Pooling").mkdir(exist_ok=True)  # a source in sentence-transformers' layout has one already
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": hidden,
                                                                  "pooling_mode_cls_token": True}))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    return folder


def test_cls_pooling_equals_sentence_transformers_and_survives_save(tiny_deberta, tmp_path):
    folder = cls_folder(tiny_deberta, tmp_path / "cls")
    encoder = load_encoder(folder, max_seq_length=64)
    assert encoder.pooling == "cls" and encoder.normalize
    reference = st.SentenceTransformer(str(folder), device="cpu")
    reference.max_seq_length = 64
    ours = encoder.encode(SENTENCES, batch_size=2, convert_to_numpy=True)
    np.testing.assert_allclose(ours, reference.encode(SENTENCES, batch_size=2), rtol=0, atol=1e-5)
    mean = load_encoder(tiny_deberta, max_seq_length=64).encode(SENTENCES, convert_to_numpy=True, normalize=True)
    assert np.abs(ours - mean).max() > 1e-2  # it is another pooling
    saved = encoder.save(tmp_path / "saved")
    assert json.loads((saved / "1_Pooling" / "config.json").read_text())["pooling_mode_cls_token"] is True
    np.testing.assert_allclose(st.SentenceTransformer(str(saved), device="cpu").encode(SENTENCES), ours, rtol=0, atol=1e-5)
    # a plain Hugging Face folder: --pooling cls chooses; a sentence-transformers folder keeps its own
    plain = load_encoder(tiny_deberta, max_seq_length=64, pooling="cls")
    np.testing.assert_allclose(plain.encode(SENTENCES, convert_to_numpy=True, normalize=True), ours, rtol=0, atol=1e-5)
    with pytest.raises(UserInputError, match="pooling mean asked for, but the folder's Pooling module pools by cls"):
        load_encoder(folder, pooling="mean")


@pytest.mark.parametrize("mode", ["max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken"])
def test_other_poolings_and_non_models_are_refused(tiny_deberta, tmp_path, mode):
    folder = cls_folder(tiny_deberta, tmp_path / "other", normalize=False)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64,
                                                                  f"pooling_mode_{mode}": True}))
    with pytest.raises(UserInputError, match=f"pooling {mode} is not supported: kfdeb pools by the mean"):
        load_encoder(folder)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 64, "pooling_mode": "max"}))
    with pytest.raises(UserInputError, match="pooling max is not supported"):
        load_encoder(folder)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True, "include_prompt": False}))
    with pytest.raises(UserInputError, match="include_prompt false .* is not supported"):
        load_encoder(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserInputError, match="not a model folder \\(no config.json\\)"):
        load_encoder(empty)
    with pytest.raises(UserInputError, match="no such model folder"):
        load_encoder(tmp_path / "missing")


def test_encode_takes_sentence_transformers_names_with_their_meanings(tiny_deberta):
    """What a sentence-transformers user types gives what SentenceTransformer.encode gives."""
    import kfdeb

    ours = kfdeb.load(tiny_deberta, max_seq_length=64)
    reference = st.SentenceTransformer(str(tiny_deberta), device="cpu")
    reference.max_seq_length = 64
    for kwargs in ({}, {"normalize_embeddings": True}, {"convert_to_tensor": True}, {"show_progress_bar": False}):
        got = ours.encode(SENTENCES[:3], convert_to_numpy=True, **kwargs)
        expected = reference.encode(SENTENCES[:3], **kwargs)
        assert type(got) is type(expected), kwargs  # numpy, or a tensor with convert_to_tensor
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=0, atol=1e-5, err_msg=str(kwargs))
    single, reference_single = ours.encode(SENTENCES[0], convert_to_numpy=True), reference.encode(SENTENCES[0])
    assert single.shape == reference_single.shape == (ours.dimension,)
    np.testing.assert_allclose(single, reference_single, rtol=0, atol=1e-5)
    assert ours.device.type == "cpu"  # kfdeb.load's default: cuda where there is one, as in sentence-transformers
