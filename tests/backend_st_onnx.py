"""kfdeb's ONNX export opened by sentence-transformers' ONNX backend (optimum), the way users serve it.

Not part of the default suite: it needs `pip install "sentence-transformers[onnx]"`, which pins
transformers 4.x (optimum-onnx) and so lives in a venv of its own. `.ci/run` builds that venv and
runs this file there, by name, together with kfdeb's loading and export tests:

    python -m pytest -q tests/backend_st_onnx.py

`SentenceTransformer(folder, backend="onnx")` reads `folder/onnx/model.onnx` (where export.py
writes it by default), feeds it what its tokenizer returns (token_type_ids included where the
graph declares them), takes the output named `last_hidden_state` and pools it with its own
Pooling (and Normalize) modules. Its embeddings must equal those of the same folder on
sentence-transformers' PyTorch backend and kfdeb's, to 1e-5.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import write_sentence_transformers_layout
from kfdeb import cli
from kfdeb.model import load_encoder

import optimum.onnxruntime  # noqa: E402,F401  (an ImportError outside that venv: this file is run there only)
import sentence_transformers as st  # noqa: E402

SENTENCES = ["비행기가 이륙하고 있다.", "한 남자가 큰 플루트를 연주하고 있다.", "고양이", "",
             "남자가 피자에 치즈를 뿌리고 있다. " * 40, "A man is playing a flute."]


def exported_folder(source, tmp_path, normalize: bool):
    """A copy of `source` exported by export.py into its own onnx/model.onnx; optionally the
    sentence-transformers 1.x layout with a Normalize module (all-MiniLM-L6-v2's)."""
    if normalize == "cls":  # the first token pooled, then Normalize (BGE-m3-ko's, KURE-v1's layout)
        from test_model import cls_folder

        folder = cls_folder(source, tmp_path / "model")
    elif normalize:
        folder = tmp_path / "model"
        shutil.copytree(source, folder / "0_Transformer")
        write_sentence_transformers_layout(folder, max_seq_length=64)
    else:
        folder = tmp_path / "model"
        shutil.copytree(source, folder)
    assert cli.export_main([str(folder), "--max_seq_length", "64"]) == 0
    assert (folder / "onnx" / "model.onnx").is_file()
    return folder


@pytest.mark.parametrize("normalize", [False, True, "cls"], ids=["mean", "mean-normalize", "cls-normalize"])
@pytest.mark.parametrize("fixture", ["tiny_deberta", "tiny_bert", "tiny_xlmr"])
def test_sentence_transformers_onnx_backend_equals_pytorch(request, fixture, normalize, tmp_path):
    folder = exported_folder(request.getfixturevalue(fixture), tmp_path, normalize)
    served = st.SentenceTransformer(str(folder), backend="onnx", device="cpu")
    reference = st.SentenceTransformer(str(folder), device="cpu")
    for model in (served, reference):
        model.max_seq_length = 64
    onnx_vectors = served.encode(SENTENCES, batch_size=4)
    torch_vectors = reference.encode(SENTENCES, batch_size=4)
    ours = load_encoder(folder, max_seq_length=64).encode(SENTENCES, batch_size=4, convert_to_numpy=True)
    difference = float(np.abs(onnx_vectors - torch_vectors).max())
    print(f"{fixture} normalize={normalize}: max |ONNX backend - PyTorch| {difference:.2e}, "
          f"|kfdeb - PyTorch| {float(np.abs(ours - torch_vectors).max()):.2e}")
    assert difference <= 1e-5
    np.testing.assert_allclose(ours, torch_vectors, rtol=0, atol=1e-5)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(onnx_vectors, axis=1), 1.0, atol=1e-5)
