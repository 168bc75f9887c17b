"""export.py and kfdeb/onnx.py: one ONNX graph per tiny model, checked against PyTorch on onnxruntime."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import kfdeb
import kfdeb.onnx as kfdeb_onnx
from conftest import run_script
from kfdeb.batching import pad_batch
from kfdeb.readers import read_sts
from kfdeb.errors import UserInputError
from kfdeb.evaluation import evaluate_split
from kfdeb.metrics import FIGURE_KEYS
from kfdeb.model import load_encoder
from kfdeb.onnx import INPUT_NAMES, OUTPUT_NAMES, OnnxEncoder, export

import onnx  # noqa: E402  (kfdeb.onnx imports them only when used; the [test] extra installs them)
assert __import__("onnxruntime")  # fail here, not mid-test, when the [onnx] extra is missing

# lengths 2 .. max_seq_length (the long one is truncated), the empty one is [CLS] [SEP] only
SENTENCES = ["비행기가 이륙하고 있다.", "고양이", "", "한 남자가 큰 플루트를 연주하고 있다.",
             "남자가 피자에 치즈를 뿌리고 있다. " * 40, "A man is slicing a tomato.", "세 명의 아이들이 공원에서 축구를 하고 있다.",
             "?", "여자가 양파를 썰고 있다. 그리고 남자는 노래를 부른다."]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_deberta, tiny_bert, tiny_xlmr):
    """Each tiny model exported once (DeBERTa-v2 also as int8 and fp16): name -> (folder, encoder, result)."""
    graphs = {}
    for name, folder, variants in [("deberta", tiny_deberta, {"quantize": "int8", "fp16": True}),
                                   ("bert", tiny_bert, {}), ("xlmr", tiny_xlmr, {})]:
        encoder = load_encoder(folder, max_seq_length=64)
        result = export(encoder, tmp_path_factory.mktemp(f"onnx-{name}") / "model.onnx", **variants)
        graphs[name] = (folder, encoder, result)
    return graphs


@pytest.mark.parametrize("name", ["deberta", "bert", "xlmr"])
def test_fp32_graph_equals_pytorch_on_new_shapes_with_padding(exported, name):
    _, encoder, result = exported[name]
    assert max(result.max_abs_diff["fp32"].values()) < 1e-4  # the built-in check ran and passed
    onnx_encoder = OnnxEncoder.load(result.paths["fp32"])
    for batch_size in (1, 4, 7):  # the export example was 2 sentences
        ours = onnx_encoder.encode(SENTENCES, batch_size=batch_size, convert_to_numpy=True)
        reference = encoder.encode(SENTENCES, batch_size=batch_size, convert_to_numpy=True)
        np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4)
    # token states too, straight from the session, on one padded batch
    input_ids, attention_mask = pad_batch(encoder.tokenize(SENTENCES), encoder.pad_id)
    assert input_ids.shape[1] == 64 and attention_mask.sum(1).min() < 64  # rows of padding
    names = [i.name for i in onnx_encoder.session.get_inputs()]
    sentence, tokens = onnx_encoder.session.run(list(OUTPUT_NAMES), kfdeb_onnx.feed(names, input_ids, attention_mask))
    with torch.inference_mode():
        hidden = encoder.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        np.testing.assert_allclose(sentence, encoder(input_ids, attention_mask).numpy(), rtol=0, atol=1e-4)
    real = attention_mask.numpy()[..., None].astype(bool)
    assert np.abs(np.where(real, tokens - hidden.numpy(), 0)).max() < 1e-4


@pytest.mark.parametrize("name", ["deberta", "bert", "xlmr"])
def test_graph_passes_the_checker_with_the_documented_interface(exported, name):
    folder = exported[name][2].paths["fp32"].parent
    for path in exported[name][2].paths.values():
        onnx.checker.check_model(str(path))
    graph = onnx.load(str(exported[name][2].paths["fp32"])).graph
    # Hugging Face's export conventions: BERT (segment embeddings) takes token_type_ids, DeBERTa-v2 (none) does not
    expected_inputs = INPUT_NAMES + (("token_type_ids",) if name == "bert" else ())
    assert tuple(i.name for i in graph.input) == expected_inputs
    assert tuple(o.name for o in graph.output) == OUTPUT_NAMES == ("sentence_embedding", "last_hidden_state")
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}
    assert all(dims[i] == ["batch", "sequence"] for i in expected_inputs) and dims["sentence_embedding"][0] == "batch"
    assert dims["last_hidden_state"][:2] == ["batch", "sequence"]
    meta = json.loads((folder / kfdeb_onnx.METADATA_FILE).read_text())
    assert meta["inputs"] == list(expected_inputs) and meta["outputs"] == list(OUTPUT_NAMES)
    assert meta["max_seq_length"] == 64 and meta["do_lower_case"] is False
    assert meta["normalize"] is (name == "xlmr")  # the e5-like folder ends in Normalize
    if name == "xlmr":  # its positions start at padding_idx + 1: 64 tokens in a 66-row table
        assert meta["length_limit"] == 64 and meta["prompts"] == {"query": "query: ", "document": "passage: "}
    assert (folder / "tokenizer.json").is_file()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no scratch left


def test_onnx_encoder_mirrors_encode(exported):
    _, encoder, result = exported["deberta"]
    model = kfdeb.load(result.paths["fp32"])  # the package-level loader dispatches on .onnx
    assert isinstance(model, OnnxEncoder) and model.dimension == encoder.dimension == 64
    assert model.max_seq_length == 64 and model.device_name == "onnxruntime CPUExecutionProvider"
    vectors = model.encode(SENTENCES, batch_size=3)
    assert isinstance(vectors, torch.Tensor) and vectors.dtype == torch.float32 and vectors.shape == (len(SENTENCES), 64)
    one_by_one = torch.cat([model.encode([s]) for s in SENTENCES])  # input order restored
    torch.testing.assert_close(vectors, one_by_one, rtol=0, atol=1e-5)
    unit = model.encode(SENTENCES, normalize=True, convert_to_numpy=True)
    assert isinstance(unit, np.ndarray) and np.allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-5)
    assert model.encode([]).shape == (0, 64)
    single = model.encode("한 문장")  # a string, as in sentence-transformers: one vector
    assert single.shape == (64,)
    torch.testing.assert_close(single, model.encode(["한 문장"])[0], rtol=0, atol=1e-6)
    assert OnnxEncoder.load(result.paths["fp32"], max_seq_length=8).max_seq_length == 8
    # Matryoshka widths: the prefixes, re-normalised when normalising (as the PyTorch encoder)
    torch.testing.assert_close(model.encode(SENTENCES, dim=16), vectors[:, :16], rtol=0, atol=0)
    narrow = model.encode(SENTENCES, truncate_dim=16, normalize_embeddings=True)
    torch.testing.assert_close(narrow, torch.nn.functional.normalize(vectors[:, :16], dim=-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(narrow, encoder.encode(SENTENCES, dim=16, normalize=True), rtol=0, atol=1e-5)
    with pytest.raises(UserInputError, match="dim=65: expected 1 to the model's embedding width 64"):
        model.encode(SENTENCES, dim=65)


def test_int8_and_fp16_agree_with_pytorch(exported, bundled_dir):
    _, encoder, result = exported["deberta"]
    paths = result.paths
    assert paths["int8"].name == "model.int8.onnx" and paths["fp16"].name == "model.fp16.onnx"
    assert paths["int8"].stat().st_size < paths["fp32"].stat().st_size  # MatMul weights in 1 byte, tables fp32
    assert result.max_abs_diff["fp16"]["sentence_embedding"] < 1e-2
    pairs = read_sts(bundled_dir / "KorSTS" / "sts-test.tsv")[:100]
    sentences = [s for p in pairs for s in (p.sentence1, p.sentence2)]
    rows = {row.name: row for row in kfdeb_onnx.compare(encoder, paths, sentences)}
    assert rows["ONNX fp32"].cosine_min > 0.99999
    assert rows["ONNX int8"].cosine_mean >= 0.99  # measured 0.9999 on this random tiny model
    # the default settings: u8 weights; the embedding tables and layer 0's FFN output projection fp32
    graph = onnx.load(str(paths["int8"])).graph
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    float_matmuls = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in initializers
                     and initializers[n.input[1]].dtype == np.float32]
    assert [name.split("encoder/")[-1] for name in float_matmuls] == ["layer.0/output/dense/MatMul"]
    assert {v.dtype for v in initializers.values() if v.dtype.kind in "iu" and v.dtype.itemsize == 1} == {np.dtype(np.uint8)}
    assert {v.dtype for k, v in initializers.items() if "word_embeddings" in k} == {np.dtype(np.float32)}
    assert rows["ONNX fp16"].cosine_mean >= 0.999
    assert all(row.sentences_per_second > 0 for row in rows.values())


EXPECTED_ROLES = {
    "deberta": {"attention/self/query_proj", "attention/self/key_proj", "attention/self/value_proj",
                "attention/output/dense", "intermediate/dense", "output/dense"},
    "bert": {"attention/self/query", "attention/self/key", "attention/self/value",
             "attention/output/dense", "intermediate/dense", "output/dense"},
}
EXPECTED_ROLES["xlmr"] = EXPECTED_ROLES["bert"]  # XLM-R's layers are BERT's


@pytest.mark.parametrize("name", ["deberta", "bert", "xlmr"])
def test_int8_settings_rewrite_what_they_name(exported, name, tmp_path, capsys):
    """The exporter's node names carry each weight's layer and role, and Int8Settings acts on exactly those."""
    _, encoder, result = exported[name]
    matmuls = kfdeb_onnx.quantizable_matmuls(result.paths["fp32"])
    layers = encoder.transformer.config.num_hidden_layers
    in_layers = [m for m in matmuls if m.layer is not None]
    assert {(m.layer, m.role) for m in in_layers} == {(i, r) for i in range(layers) for r in EXPECTED_ROLES[name]}
    kept = matmuls[0].name  # one node by its full name, and one role in every layer
    settings = kfdeb_onnx.Int8Settings(weight_type="S8", reduce_range=True, embeddings=False, keep_fp32=("output/dense", kept))
    target = tmp_path / "model.int8.onnx"
    kfdeb_onnx.quantize_int8(result.paths["fp32"], target, settings)
    graph = onnx.load(str(target)).graph
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    float_matmuls = {n.name for n in graph.node if n.op_type == "MatMul"
                     and initializers.get(n.input[1], np.zeros(0)).dtype == np.float32}
    assert float_matmuls == {m.name for m in matmuls if m.role == "output/dense" or m.name == kept}
    quantized = [v for v in initializers.values() if v.dtype == np.int8 and v.ndim == 2]  # weights, not zero points
    assert len(quantized) == len(matmuls) - len(float_matmuls)  # no Gather table among them: embeddings fp32
    assert max(int(np.abs(v.astype(int)).max()) for v in quantized) == 64  # reduce_range: 7-bit symmetric weights
    assert {v.dtype for k, v in initializers.items() if "word_embeddings" in k} == {np.dtype(np.float32)}
    unknown = kfdeb_onnx.Int8Settings(keep_fp32=("layer/nothing",))
    with pytest.raises(UserInputError, match="keep_fp32 'layer/nothing': no MatMul"):
        kfdeb_onnx.quantize_int8(result.paths["fp32"], tmp_path / "x.onnx", unknown)
    assert not (tmp_path / "x.onnx").exists()
    capsys.readouterr()
    kfdeb_onnx.quantize_int8(result.paths["fp32"], tmp_path / "x.onnx", unknown, strict=False)  # warns, goes on
    assert "warning: keep_fp32 'layer/nothing': no MatMul" in capsys.readouterr().err
    graph = onnx.load(str(tmp_path / "x.onnx")).graph
    assert not any(n.op_type == "MatMul" and n.input[1] in {t.name for t in graph.initializer} for n in graph.node)


def test_export_int8_weights_s8_keeps_the_default_exclusions(tiny_deberta, tmp_path, capsys):
    """export.py --quantize int8 --int8_weights s8: signed 8-bit weights, the rest of the default settings."""
    from kfdeb import cli

    output = tmp_path / "onnx" / "model.onnx"
    assert cli.export_main([str(tiny_deberta), "--output", str(output), "--quantize", "int8", "--int8_weights", "s8",
                            "--no-check"]) == 0
    out = capsys.readouterr().out
    assert ("note: this CPU has no VNNI" in out) == (kfdeb_onnx.cpu_has_vnni() is False)
    graph = onnx.load(str(tmp_path / "onnx" / "model.int8.onnx")).graph
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    weights = {n.name: initializers[n.input[1]] for n in graph.node
               if n.op_type in ("MatMul", "MatMulInteger") and n.input[1] in initializers}
    assert [name.split("encoder/")[-1] for name, w in weights.items() if w.dtype == np.float32] == \
        ["layer.0/output/dense/MatMul"]
    quantized = [w for w in weights.values() if w.dtype != np.float32]
    assert quantized and {w.dtype for w in quantized} == {np.dtype(np.int8)}
    assert max(int(np.abs(w.astype(int)).max()) for w in quantized) == 127  # 8-bit symmetric, not reduce_range
    assert {v.dtype for k, v in initializers.items() if "word_embeddings" in k} == {np.dtype(np.float32)}


@pytest.mark.parametrize("text, expected", [
    ("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n", True),   # AVX512-VNNI (Cascade Lake, Zen 4)
    ("flags\t\t: fpu avx2 avx_vnni\n", True),                                 # AVX-VNNI (Alder Lake)
    ("flags\t\t: fpu avx2 avx512f avx512vnni_like\n", False),                 # a flag only containing the name
    ("processor\t: 0\nflags\t\t: fpu avx2 fma\n", False),                    # AVX2 only (Zen 2/3)
    ("processor\t: 0\nFeatures\t: fp asimd asimddp\n", None),                 # aarch64: no x86 flags line
])
def test_cpu_has_vnni_reads_the_flags_line(tmp_path, text, expected):
    (tmp_path / "cpuinfo").write_text(text)
    assert kfdeb_onnx.cpu_has_vnni(tmp_path / "cpuinfo") is expected
    assert kfdeb_onnx.cpu_has_vnni(tmp_path / "missing") is None


def test_evaluate_reads_onnx_with_the_checkpoint_figures(exported, tmp_path, bundled_dir):
    folder, _, result = exported["deberta"]
    data_dir = tmp_path / "data"  # the first 400 KorSTS dev pairs: the same comparison in a quarter of the time
    (data_dir / "KorSTS").mkdir(parents=True)
    lines = (bundled_dir / "KorSTS" / "sts-dev.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (data_dir / "KorSTS" / "sts-dev.tsv").write_text("".join(lines[:401]), encoding="utf-8")
    run = run_script("evaluate.py", result.paths["fp32"], "--split", "dev", "--data_dir", data_dir,
                     "--json", tmp_path / "onnx.json")
    assert run.returncode == 0, run.stderr
    assert "onnxruntime CPUExecutionProvider" in run.stdout
    assert f"| {result.paths['fp32'].parent.name}/model.onnx (dev) |" in run.stdout
    figures = json.loads((tmp_path / "onnx.json").read_text())
    # what `evaluate.py CKPT --split dev --json` writes, computed in-process (the same functions)
    reference = evaluate_split(load_encoder(folder, max_seq_length=64), data_dir, "dev").figures
    assert tuple(figures) == FIGURE_KEYS
    assert max(abs(figures[k] - reference[k]) for k in FIGURE_KEYS) < 0.1  # seen: ~1e-4


def test_export_bad_input_is_one_line_and_writes_nothing(tiny_deberta, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("no model here")
    run = run_script("export.py", tmp_path)  # the script as a user runs it
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("error: ") and "not a model folder" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == [tmp_path / "notes.txt"]  # no onnx/ folder, nothing half-written

    from kfdeb import cli

    for args, message in [(["--opset", "9"], "--opset 9: not supported (use 14 to 20"),
                          (["--quantize", "int4"], "--quantize int4: only int8"),
                          (["--int8_weights", "s8"], "--int8_weights s8: only with --quantize int8"),
                          (["--output", tmp_path / "out" / "model.bin"], "must end in .onnx")]:
        with pytest.raises(SystemExit) as exit_status:  # cli.execute: the same path as export.py, in-process
            cli.execute(lambda: cli.export_main([str(tiny_deberta), "--output", str(tmp_path / "out" / "model.onnx"),
                                             *map(str, args)]))
        err = capsys.readouterr().err
        assert exit_status.value.code == 2 and err.startswith("error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()


def test_failed_export_or_check_leaves_nothing_and_stale_variants_go(exported, tmp_path, monkeypatch):
    _, encoder, _ = exported["bert"]
    existing = tmp_path / "existing"
    existing.mkdir()

    def broken_export(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator foo\nmore detail")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(UserInputError, match=r"ONNX export failed at opset 17 \(Unsupported: ONNX export of operator foo\)$"):
        export(encoder, tmp_path / "new" / "model.onnx")
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()

    def failed_check(path, *args, **kwargs):
        raise UserInputError(f"{path}: differs")

    monkeypatch.setattr(kfdeb_onnx, "verify", failed_check)
    with pytest.raises(UserInputError, match="differs"):
        export(encoder, existing / "model.onnx")
    assert list(existing.iterdir()) == []
    (existing / "model.int8.onnx").write_bytes(b"an older export's")  # would no longer match model.onnx
    encoder.train()
    export(encoder, existing / "model.onnx", check=False)
    assert encoder.training  # the caller's mode is kept
    assert sorted(p.name for p in existing.glob("*.onnx")) == ["model.onnx"]
    encoder.eval()
    with pytest.raises(UserInputError, match="--opset 21: not supported"):
        export(encoder, existing / "model.onnx", opset=21)
    with pytest.raises(UserInputError, match="must end in .onnx"):
        export(encoder, existing / "model.bin")


def test_missing_onnxruntime_and_foreign_onnx_files_are_one_line_errors(exported, tmp_path, monkeypatch):
    (tmp_path / "model.onnx").write_bytes(exported["bert"][2].paths["fp32"].read_bytes())
    with pytest.raises(UserInputError, match="no kfdeb_onnx.json beside it"):
        OnnxEncoder.load(tmp_path / "model.onnx")
    with pytest.raises(UserInputError, match="no such ONNX file"):
        OnnxEncoder.load(tmp_path / "missing.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without the extra sees
    with pytest.raises(UserInputError, match=r'onnxruntime is not installed; .*pip install "\.\[onnx\]"'):
        OnnxEncoder.load(exported["bert"][2].paths["fp32"])


def test_cls_pooling_is_inside_the_graph(tiny_deberta, tmp_path):
    """A CLS-pooled model (first token, as BGE-m3-ko and KURE-v1) exports with its pooling in the graph."""
    from test_model import cls_folder

    folder = cls_folder(tiny_deberta, tmp_path / "cls")
    encoder = load_encoder(folder, max_seq_length=64)
    result = export(encoder, folder / "onnx" / "model.onnx")
    graph = OnnxEncoder.load(result.paths["fp32"])
    np.testing.assert_allclose(graph.encode(SENTENCES, convert_to_numpy=True),
                               encoder.encode(SENTENCES, convert_to_numpy=True), rtol=0, atol=1e-5)
    assert json.loads((folder / "onnx" / kfdeb_onnx.METADATA_FILE).read_text())["pooling"] == "cls"


def test_a_graph_looked_for_beside_best_names_where_export_wrote_it(tmp_path):
    """`export.py output/` writes output/best/onnx/model.onnx; asking for output/onnx/model.onnx says so."""
    (tmp_path / "best" / "onnx").mkdir(parents=True)
    (tmp_path / "best" / "onnx" / "model.onnx").write_bytes(b"")
    with pytest.raises(UserInputError) as raised:
        OnnxEncoder.load(tmp_path / "onnx" / "model.onnx")
    assert str(raised.value) == (f"{tmp_path / 'onnx' / 'model.onnx'}: no such ONNX file; export.py writes a run's graph "
                                 f"into its best/ folder: {tmp_path / 'best' / 'onnx' / 'model.onnx'}")
    with pytest.raises(UserInputError, match=r"model.onnx: no such ONNX file$"):
        OnnxEncoder.load(tmp_path / "elsewhere" / "model.onnx")
