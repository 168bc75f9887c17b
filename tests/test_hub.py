"""Hub ids end to end: evaluate.py, train.py and kfdeb.load against a stand-in hub (tests/hub_server.py).

The repos are built here from the tiny models, in the layouts models are published in: a replica
of kakaobank/kf-deberta-base's file list (pickled pytorch_model.bin, BertTokenizer files, no
safetensors) served under that id, so `train.py` with its default model is the user's real
path; sentence-transformers repos (as SentenceTransformer.save writes them, and the older
layout with the encoder in 0_Transformer/ as a .bin); repos with both safetensors and .bin,
single and sharded; and a .bin whose pickle runs code when unpickled. Scripts run as
subprocesses with HF_ENDPOINT at the server and a fresh HF_HOME each, so nothing but 127.0.0.1
is reached, and the server's request log says what was fetched.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, write_sentence_transformers_layout
from hub_server import HubServer
from kfdeb.errors import UserInputError
from kfdeb.evaluation import TABLE_HEADER, evaluate_split
from kfdeb.metrics import FIGURE_KEYS
from kfdeb.model import load_encoder

KF = "kakaobank/kf-deberta-base"
KF_FILES = ["config.json", "pytorch_model.bin", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
            "vocab.txt"]
ST = "hub-test/sentence-transformers"
ST_OLD = "hub-test/sentence-transformers-bin-subfolder"
BOTH = "hub-test/safetensors-and-bin"
SHARDED_BOTH = "hub-test/sharded-safetensors-and-bin"
SHARDED_BIN = "hub-test/sharded-bin"
MALICIOUS = "hub-test/malicious-pickle"
MISSING_LAYER = "hub-test/st-missing-a-layer"
SENTENCES = ["비행기가 이륙하고 있다.", "한 남자가 큰 플루트를 연주하고 있다.", "고양이"]


class RunsCode:
    """Unpickled, this writes the marker file: what a hostile pytorch_model.bin could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('the pickle ran')",)


def encoder_copy(tiny_deberta: Path, folder: Path, weights: str = "safetensors") -> Path:
    """The tiny encoder's files in `folder`, its weights as model.safetensors, pytorch_model.bin or both."""
    shutil.copytree(tiny_deberta, folder)
    if weights in ("bin", "both"):
        torch.save(load_file(tiny_deberta / "model.safetensors"), folder / "pytorch_model.bin")
    if weights == "bin":
        (folder / "model.safetensors").unlink()
    return folder


def shard(tiny_deberta: Path, folder: Path, kind: str) -> None:
    """The tiny encoder's weights as two shards plus index, as save_pretrained shards large models."""
    tensors = load_file(tiny_deberta / "model.safetensors")
    names = sorted(tensors)
    parts = [names[: len(names) // 2], names[len(names) // 2:]]
    stem, suffix = ("model", "safetensors") if kind == "safetensors" else ("pytorch_model", "bin")
    weight_map = {}
    for i, part in enumerate(parts, 1):
        file_name = f"{stem}-{i:05d}-of-{len(parts):05d}.{suffix}"
        chunk = {name: tensors[name].clone() for name in part}
        if kind == "safetensors":
            from safetensors.torch import save_file

            save_file(chunk, folder / file_name, metadata={"format": "pt"})
        else:
            torch.save(chunk, folder / file_name)
        weight_map.update({name: file_name for name in part})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": weight_map}
    (folder / f"{stem}.{suffix}.index.json").write_text(json.dumps(index))


def kf_deberta_replica(tiny_deberta: Path, folder: Path) -> Path:
    """kf-deberta-base's file list around the tiny model: a pickled state dict and BertTokenizer files."""
    import transformers
    from transformers import AutoTokenizer, BertTokenizer, BertTokenizerFast

    folder.mkdir(parents=True)
    (folder / "config.json").write_bytes((tiny_deberta / "config.json").read_bytes())
    # keys as a DebertaV2ForMaskedLM pretraining checkpoint holds them: prefixed, with a head AutoModel drops
    state = {f"deberta.{name}": tensor for name, tensor in load_file(tiny_deberta / "model.safetensors").items()}
    state["lm_predictions.lm_head.bias"] = torch.zeros(3)
    torch.save(state, folder / "pytorch_model.bin")
    vocab = AutoTokenizer.from_pretrained(tiny_deberta).get_vocab()
    (folder / "vocab.txt").write_text("".join(f"{token}\n" for token in sorted(vocab, key=vocab.get)), encoding="utf-8")
    # tokenizer.json, tokenizer_config.json (class BertTokenizer); transformers 5 builds it from a
    # vocabulary, 4.x's fast class from vocab.txt (the slow 4.x class writes no tokenizer.json)
    if int(transformers.__version__.split(".")[0]) >= 5:
        BertTokenizer(vocab=vocab, do_lower_case=False).save_pretrained(folder)
    else:
        BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=False).save_pretrained(folder)
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]", "sep_token": "[SEP]", "unk_token": "[UNK]"}))
    assert sorted(p.name for p in folder.iterdir()) == KF_FILES
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "BertTokenizer" and config["do_lower_case"] is False
    return folder


def sentence_transformers_repo(tiny_deberta: Path, folder: Path) -> Path:
    """Transformer + mean Pooling + Normalize, written by sentence-transformers itself."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    transformer = Transformer(str(tiny_deberta), max_seq_length=48)
    pooling = Pooling(transformer.get_embedding_dimension(), "mean")
    SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu").save(str(folder))
    return folder


def old_sentence_transformers_repo(tiny_deberta: Path, folder: Path) -> Path:
    """The sentence-transformers 1.x layout, the encoder in 0_Transformer/ with a pickled .bin."""
    encoder_copy(tiny_deberta, folder / "0_Transformer", weights="bin")
    return write_sentence_transformers_layout(folder, max_seq_length=40)


@pytest.fixture(scope="module")
def marker(tmp_path_factory) -> Path:
    """Where the hostile pickle writes if anything unpickles it."""
    return tmp_path_factory.mktemp("pickle-marker") / "the-pickle-ran"


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_deberta, marker) -> dict[str, Path]:
    """Repo id -> the local folder the stand-in hub serves under it."""
    root = tmp_path_factory.mktemp("hub-repos")
    malicious = encoder_copy(tiny_deberta, root / "malicious", weights="bin")
    state = load_file(tiny_deberta / "model.safetensors")
    torch.save({**state, "encoder.rel_embeddings.weight": RunsCode(marker)}, malicious / "pytorch_model.bin")
    sharded_both = encoder_copy(tiny_deberta, root / "sharded-both")
    (sharded_both / "model.safetensors").unlink()
    shard(tiny_deberta, sharded_both, "safetensors")
    shard(tiny_deberta, sharded_both, "bin")
    missing = old_sentence_transformers_repo(tiny_deberta, root / "missing-layer")
    torch.save({k: v for k, v in state.items() if not k.startswith("encoder.layer.1.")},
               missing / "0_Transformer" / "pytorch_model.bin")
    sharded_bin = encoder_copy(tiny_deberta, root / "sharded-bin", weights="bin")
    (sharded_bin / "pytorch_model.bin").unlink()
    shard(tiny_deberta, sharded_bin, "bin")
    return {
        KF: kf_deberta_replica(tiny_deberta, root / "kf-deberta-base"),
        ST: sentence_transformers_repo(tiny_deberta, root / "st"),
        ST_OLD: old_sentence_transformers_repo(tiny_deberta, root / "st-old"),
        BOTH: encoder_copy(tiny_deberta, root / "both", weights="both"),
        SHARDED_BOTH: sharded_both,
        SHARDED_BIN: sharded_bin,
        MALICIOUS: malicious,
        MISSING_LAYER: missing,
    }


@pytest.fixture(scope="module")
def hub(sources):
    server = HubServer(sources).start()
    yield server
    server.stop()


@pytest.fixture
def hub_env(hub, tmp_path) -> dict[str, str]:
    """The environment of a user pointed at the stand-in hub: online, a fresh HF_HOME, no Xet, no proxy."""
    hub.clear()
    home = tmp_path / "hf-home"
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_")) and name.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    return {**env, "HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}


def run(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess:
    """python ARGS from the repository root (so this worktree's kfdeb is the one imported)."""
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=240, cwd=REPO, env=env)


LOAD_EACH = """
import json, sys
import kfdeb
from safetensors.torch import save_file
out, report = sys.argv[1], {}
for i, repo_id in enumerate(sys.argv[2:]):
    try:
        encoder = kfdeb.load(repo_id)
    except kfdeb.UserInputError as err:
        report[repo_id] = {"error": str(err)}
        continue
    save_file({k: v.contiguous() for k, v in encoder.transformer.state_dict().items()}, f"{out}/{i}.safetensors")
    report[repo_id] = {"weights": f"{out}/{i}.safetensors", "normalize": encoder.normalize,
                       "max_seq_length": encoder.max_seq_length,
                       "embeddings": encoder.encode(%r, convert_to_numpy=True).tolist()}
print(json.dumps(report))
""" % (SENTENCES,)


def test_hub_repos_load_as_published_and_fetch_only_the_weights_they_use(hub, hub_env, sources, tiny_deberta, tmp_path):
    from sentence_transformers import SentenceTransformer

    repo_ids = [KF, ST, ST_OLD, BOTH, SHARDED_BOTH, SHARDED_BIN, "hub-test/no-such-repo"]
    result = run(hub_env, "-c", LOAD_EACH, tmp_path, *repo_ids)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    source = load_file(tiny_deberta / "model.safetensors")
    for repo_id in repo_ids[:-1]:
        loaded = load_file(report[repo_id]["weights"])
        assert sorted(loaded) == sorted(source), repo_id
        for name, tensor in source.items():
            assert torch.equal(loaded[name], tensor), f"{repo_id}: {name}"
    assert "not a local folder, and the Hugging Face hub could not provide it" in report["hub-test/no-such-repo"]["error"]

    # what each repo's layout says: sentence-transformers modules and lengths honoured
    assert report[ST]["normalize"] and report[ST]["max_seq_length"] == 48
    assert report[ST_OLD]["normalize"] and report[ST_OLD]["max_seq_length"] == 40
    assert not report[KF]["normalize"]
    reference = SentenceTransformer(str(sources[ST]), device="cpu").encode(SENTENCES)
    assert torch.allclose(torch.tensor(report[ST]["embeddings"]), torch.from_numpy(reference), atol=1e-5)

    # what was fetched: the weights the loader reads, never the pickle beside safetensors
    weights = {repo_id: sorted({f for f in hub.touched(repo_id) if f.endswith((".bin", ".safetensors"))}) for repo_id in repo_ids}
    assert weights[KF] == ["pytorch_model.bin"]
    assert weights[ST] == ["model.safetensors"]
    assert weights[ST_OLD] == ["0_Transformer/pytorch_model.bin"]
    assert weights[BOTH] == ["model.safetensors"]
    assert weights[SHARDED_BOTH] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert weights[SHARDED_BIN] == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    assert not [path for _, path in hub.requests if path.endswith(".py")]


def test_a_pickle_that_runs_code_is_refused_and_never_run(hub, hub_env, sources, marker, small_data):
    result = run(hub_env, REPO / "evaluate.py", MALICIOUS, "--data_dir", small_data, "--split", "dev")
    assert result.returncode == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert message.startswith("error: ") and "/pytorch_model.bin: refused: not a plain state dict of tensors" in message
    assert "Unsupported global" in message and "kfdeb never runs code from a pickle" in message
    assert "pytorch_model.bin" in hub.downloaded(MALICIOUS)  # it was fetched, and read, and refused
    assert not marker.exists()

    # a local folder with only pytorch_model.bin goes through the same reader
    with pytest.raises(UserInputError, match=r"malicious/pytorch_model\.bin: refused: not a plain state dict"):
        load_encoder(sources[MALICIOUS])
    assert not marker.exists()
    # and the file is live: unpickled without weights_only, it runs (so the two checks above can fail)
    torch.load(sources[MALICIOUS] / "pytorch_model.bin", weights_only=False)
    assert marker.read_text() == "the pickle ran"
    marker.unlink()


def test_a_repo_missing_a_layer_is_refused_before_evaluation(hub, hub_env, small_data):
    """weights.py's check on the hub path: the reported case (a sentence-transformers repo whose weights lack a
    layer) stops with one line and exit 2 instead of figures computed with a random layer."""
    result = run(hub_env, REPO / "evaluate.py", MISSING_LAYER, "--data_dir", small_data, "--split", "dev")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "0_Transformer: the weights lack " in result.stderr and "DebertaV2Model's" in result.stderr
    assert "| Model |" not in result.stdout


def test_local_bin_only_folder_loads_the_exact_weights(tiny_deberta, tmp_path):
    folder = encoder_copy(tiny_deberta, tmp_path / "bin-only", weights="bin")
    loaded = load_encoder(folder).transformer.state_dict()
    for name, tensor in load_file(tiny_deberta / "model.safetensors").items():
        assert torch.equal(loaded[name], tensor), name
    torch.save({"weight": [1, 2]}, folder / "pytorch_model.bin")  # a pickle of no tensors: not a state dict
    with pytest.raises(UserInputError, match=r"pytorch_model\.bin: not a state dict"):
        load_encoder(folder)
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(UserInputError, match=r"pytorch_model\.bin: refused: .*\(Unsupported operand 110\)"):
        load_encoder(folder)
    torch.save(load_file(tiny_deberta / "model.safetensors"), folder / "pytorch_model.bin")
    whole = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(whole[: len(whole) // 2])  # a download cut short
    with pytest.raises(UserInputError, match=r"pytorch_model\.bin: unreadable PyTorch weights \(RuntimeError: "):
        load_encoder(folder)


def test_train_default_model_downloads_it_as_published_then_evaluate_reads_it_offline(hub, hub_env, small_data,
                                                                                   tiny_deberta, tmp_path):
    """`python train.py` with no model flag: kakaobank/kf-deberta-base as published (a pickled .bin only)."""
    out = tmp_path / "run"
    result = run(hub_env, REPO / "train.py", "--data_dir", small_data, "--nli_train_glob", "KorNLI/small.train.ko.tsv",
                 "--max_steps", "2", "--max_seq_length", "32", "--nli_batch_size", "16", "--sts_batch_size", "8",
                 "--eval_steps", "2", "--save_steps", "2", "--output_dir", out, "--progress", "false")
    assert result.returncode == 0, result.stderr
    assert sorted(hub.downloaded(KF)) == KF_FILES  # every file, each once: the .bin is the only weights there are
    assert json.loads((out / "best" / "kfdeb.json").read_text())["base_model"] == KF
    written = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    assert "best/model.safetensors" in written
    assert not [p for p in written if p.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))], written

    hub.clear()
    offline = {**hub_env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = run(offline, REPO / "evaluate.py", KF, "--data_dir", small_data, "--split", "dev", "--json", tmp_path / "kf.json")
    assert result.returncode == 0, result.stderr
    assert hub.requests == []  # HF_HUB_OFFLINE: the cache the training run filled, nothing else
    lines = result.stdout.strip().splitlines()
    assert "\n".join(lines[:2]) == TABLE_HEADER and lines[2].startswith("| kf-deberta-base (dev) | ")
    figures = json.loads((tmp_path / "kf.json").read_text())
    # the source weights and tokenizer give the same figures: what came from the hub is what was published
    direct = evaluate_split(load_encoder(tiny_deberta), small_data, "dev", batch_size=64).figures
    assert tuple(figures) == FIGURE_KEYS and figures == pytest.approx(direct, abs=1e-9)
