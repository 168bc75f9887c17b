"""Weights that do not fit the model (kfdeb/weights.py): refused before any training or evaluation, or mapped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_main, write_sentence_transformers_layout
from kfdeb.errors import UserInputError
from kfdeb.model import load_encoder

SENTENCES = ["비행기가 이륙하고 있다.", "한 남자가 큰 플루트를 연주하고 있다.", "고양이"]


def with_weights(source: Path, folder: Path, change) -> Path:
    """A copy of the encoder folder `source` whose model.safetensors is `change(tensors)`."""
    shutil.copytree(source, folder)
    save_file(change(load_file(source / "model.safetensors")), folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def without(prefix: str):
    return lambda tensors: {k: v for k, v in tensors.items() if not k.startswith(prefix)}


@pytest.fixture(scope="module")
def reference_embeddings(tiny_bert):
    return load_encoder(tiny_bert, max_seq_length=32).encode(SENTENCES, convert_to_numpy=True)


def test_a_missing_layer_is_refused_with_the_tensors_named(tiny_bert, tmp_path, capsys):
    folder = with_weights(tiny_bert, tmp_path / "no-layer-1", without("encoder.layer.1."))
    with pytest.raises(UserInputError) as err:
        load_encoder(folder)
    message = str(err.value)
    assert message.startswith(f"{folder}: the weights lack 16 of BertModel's ") and "\n" not in message
    assert "encoder.layer.1.attention.output.LayerNorm.bias, encoder.layer.1.attention.output.LayerNorm.weight, " \
           "encoder.layer.1.attention.output.dense.bias and 13 more" in message
    assert "they would start from random values" in message


@pytest.mark.parametrize("script", ["evaluate.py", "train.py"])
def test_the_scripts_stop_on_it_with_one_line_and_exit_2(tiny_bert, small_data, tmp_path, script):
    """A sentence-transformers folder (Normalize, 0_Transformer/) lacking a layer, as in the reported case."""
    folder = tmp_path / "st"
    with_weights(tiny_bert, folder / "0_Transformer", without("encoder.layer.1."))
    write_sentence_transformers_layout(folder, max_seq_length=32)
    args = ([folder, "--data_dir", small_data, "--split", "dev"] if script == "evaluate.py" else
            ["--model_name_or_path", folder, "--data_dir", small_data, "--nli_train_glob", "KorNLI/*.train.ko.tsv",
             "--max_steps", "2", "--output_dir", tmp_path / "out", "--progress", "false"])
    result = run_main(script, *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "0_Transformer: the weights lack 16 of BertModel's" in result.stderr
    assert not (tmp_path / "out" / "best").exists() and not (tmp_path / "out" / "state").exists()


def test_what_the_embedding_never_uses_is_named_and_left_aside(tiny_bert, tmp_path, capsys, reference_embeddings):
    """BERT's pooler missing, a pretraining head present: same embeddings, one note each."""
    def change(tensors):
        kept = {k: v for k, v in tensors.items() if not k.startswith("pooler.")}
        return {**kept, "cls.predictions.bias": torch.zeros(5), "cls.predictions.transform.dense.weight": torch.zeros(2, 2)}

    folder = with_weights(tiny_bert, tmp_path / "no-pooler", change)
    encoder = load_encoder(folder, max_seq_length=32)
    np.testing.assert_array_equal(encoder.encode(SENTENCES, convert_to_numpy=True), reference_embeddings)
    assert not encoder.transformer.pooler.dense.weight.any()  # deterministic: every run saves the same files
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [
        f"note: {folder}: not in the weights, and not used by the sentence embedding: pooler.dense.bias, "
        "pooler.dense.weight (set to zero)",
        f"note: {folder}: 2 tensors of the weights are not part of the encoder and not used: cls.predictions.bias, "
        "cls.predictions.transform.dense.weight"]


@pytest.mark.parametrize("prefix", ["model.", "0.auto_model.", "bert."])
def test_a_prefix_that_maps_every_parameter_is_removed(tiny_bert, tmp_path, reference_embeddings, prefix):
    folder = with_weights(tiny_bert, tmp_path / "prefixed", lambda t: {prefix + k: v for k, v in t.items()})
    encoder = load_encoder(folder, max_seq_length=32)
    np.testing.assert_array_equal(encoder.encode(SENTENCES, convert_to_numpy=True), reference_embeddings)


def test_two_prefixes_are_ambiguous_and_a_foreign_checkpoint_names_what_it_holds(tiny_bert, tmp_path):
    two = with_weights(tiny_bert, tmp_path / "two", lambda t: {**{"query_encoder." + k: v for k, v in t.items()},
                                                                **{"doc_encoder." + k: v.clone() for k, v in t.items()}})
    with pytest.raises(UserInputError, match=r"under several prefixes \(doc_encoder\., query_encoder\.\): ambiguous"):
        load_encoder(two)
    foreign = with_weights(tiny_bert, tmp_path / "foreign", lambda t: {"roberta.x." + k: v for k, v in t.items()
                                                                       if "layer.0." in k})
    with pytest.raises(UserInputError, match=r"The file holds 16 tensors \(roberta\.x\.encoder\.layer\.0\."):
        load_encoder(foreign)


def test_a_pickled_or_sharded_checkpoint_is_checked_the_same_way(tiny_bert, tmp_path):
    tensors = without("encoder.layer.0.")(load_file(tiny_bert / "model.safetensors"))
    pickled = shutil.copytree(tiny_bert, tmp_path / "bin")
    (pickled / "model.safetensors").unlink()
    torch.save(tensors, pickled / "pytorch_model.bin")
    with pytest.raises(UserInputError, match="the weights lack 16 of BertModel's"):
        load_encoder(pickled)
    sharded = shutil.copytree(tiny_bert, tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), 1):
        save_file({n: tensors[n] for n in part}, sharded / f"model-0000{i}-of-00002.safetensors")
    weight_map = {n: f"model-0000{1 + (n in names[len(names) // 2:])}-of-00002.safetensors" for n in names}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(UserInputError, match="the weights lack 16 of BertModel's"):
        load_encoder(sharded)


def test_weights_of_another_shape_are_refused(tiny_bert, tmp_path):
    folder = shutil.copytree(tiny_bert, tmp_path / "wider")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(UserInputError, match=r"wider: (4 tensors of the weights have other shapes|the weights do not fit)"):
        load_encoder(folder)
