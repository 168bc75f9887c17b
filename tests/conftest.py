"""Shared fixtures: tiny models built offline (nothing is downloaded), the bundled data, helpers."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one thread per process: the suite runs in pytest-xdist workers, one per core, and every run a test
# compares with another runs with the same thread count (set before torch is first imported)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# the token cache's default home (and every other XDG cache) in a folder of this session, set at
# import so that the environments tests copy for their subprocesses have it too: no test writes
# into the real ~/.cache
TEST_CACHE_HOME = tempfile.mkdtemp(prefix="kfdeb-test-cache-")
os.environ["XDG_CACHE_HOME"] = TEST_CACHE_HOME
# removed at interpreter exit, not by a session fixture: pytest-xdist's controller imports this file
# (and makes a folder) but runs no fixtures, so a fixture left one empty folder in /tmp per run
atexit.register(shutil.rmtree, TEST_CACHE_HOME, ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def seeded_global_generators():
    """Every test starts from the same global torch / numpy / random state. Without this a test that draws from a
    global generator got whatever the tests before it in its xdist worker left, so its inputs (and whether a
    tolerance held) depended on the order the workers ran the files in: a CI failure on 3.12 came from that.

    numpy and torch are seeded where they are installed: the suite's environments have both (`.[test]`); .ci/run's
    README-blocks step runs tests/readme_blocks.py from a venv holding only pytest (the blocks install kfdeb
    themselves, in their own processes), and no test there draws from either generator."""
    import importlib.util
    import random

    random.seed(0)
    if importlib.util.find_spec("numpy") is not None:
        import numpy as np

        np.random.seed(0)
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.manual_seed(0)


def pytest_report_header(config):
    """The reference releases this run compares kfdeb with, named at the top of every run's output: when a new
    release inside pyproject's [test] ranges changes behaviour, the failing run says which release it had."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("sentence-transformers", "transformers", "torch", "pytrec-eval-terrier", "onnxruntime"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return "references: " + ", ".join(found)


@pytest.fixture(scope="session")
def tiny_deberta(tmp_path_factory) -> Path:
    """A random-weight tiny DeBERTa-v2 (kf-deberta options, small sizes, no dropout) + WordPiece tokenizer."""
    from kfdeb.tiny import build_tiny_deberta

    return build_tiny_deberta(tmp_path_factory.mktemp("tiny-deberta"), seed=0, dropout=0.0)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, tiny_deberta) -> Path:
    """A random-weight tiny BERT (absolute positions, token types) sharing the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(tiny_deberta)
    torch.manual_seed(1)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    from kfdeb.readers import BUNDLED_DATA_DIR

    return BUNDLED_DATA_DIR


SCRIPT_MAINS = {"train.py": "train_main", "evaluate.py": "evaluate_main", "export.py": "export_main", "mine.py": "mine_main",
                "merge.py": "merge_main"}


def run_main(script: str, *args: str) -> subprocess.CompletedProcess:
    """What `python SCRIPT ARGS` does, in this process: the script's main under cli.execute (one-line errors,
    exit statuses), its stdout and stderr captured. For checks of messages and statuses, where a new
    interpreter would only add a second of imports; run_script runs the real process."""
    import contextlib
    import io

    from kfdeb import cli

    out, err = io.StringIO(), io.StringIO()
    main = getattr(cli, SCRIPT_MAINS[script])
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.execute(lambda: main([str(arg) for arg in args]))
            status = 0
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
    return subprocess.CompletedProcess([script, *map(str, args)], status, out.getvalue(), err.getvalue())


def run_script(script: str, *args: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one of the top-level scripts the way a user does; capture its output."""
    return subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})},
    )


def write_sentence_transformers_layout(folder: Path, max_seq_length: int) -> Path:
    """The sentence-transformers 1.x layout around an encoder already in folder/0_Transformer.

    modules.json (Transformer in 0_Transformer/, mean Pooling, Normalize), 1_Pooling/config.json and
    0_Transformer/sentence_bert_config.json; no 2_Normalize/ folder, as on the hub (git keeps no empty folders).
    """
    import json

    (folder / "0_Transformer" / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, "pooling_mode_mean_tokens": True}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    return folder


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, bundled_dir) -> Path:
    """A kor-nlu-datasets-shaped folder cut from the bundled files, small enough for quick runs."""
    root = tmp_path_factory.mktemp("kor-nlu-small")
    cuts = {"KorNLI/xnli.dev.ko.tsv": ("KorNLI/small.train.ko.tsv", 901), "KorSTS/sts-train.tsv": ("KorSTS/sts-train.tsv", 401),
            "KorSTS/sts-dev.tsv": ("KorSTS/sts-dev.tsv", 201), "KorSTS/sts-test.tsv": ("KorSTS/sts-test.tsv", 201)}
    for source, (target, lines) in cuts.items():
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        text = (bundled_dir / source).read_text(encoding="utf-8").splitlines(keepends=True)[:lines]
        (root / target).write_text("".join(text), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def distinct_sts_data(small_data, tmp_path_factory) -> Path:
    """small_data without its 3 STS train pairs of identical sentences, for runs compared weight by weight.

    Their gradient is zero in exact arithmetic (cos(u, u) = 1 whatever u) but +-1e-9 in float32, with
    a sign that depends on how the batch was computed; Adam normalises that into a full +-lr step of
    the embedding rows of tokens seen only there, so any change of batching (more ranks, or another
    engine) moves those weights by ~lr. That is Adam's, not the engine's.
    """
    import shutil

    root = tmp_path_factory.mktemp("distinct-sts") / "data"
    shutil.copytree(small_data, root)
    sts_train = root / "KorSTS" / "sts-train.tsv"
    lines = sts_train.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.rstrip("\n").split("\t")[5] != line.rstrip("\n").split("\t")[6]]
    assert len(lines) - len(kept) == 3
    sts_train.write_text("".join(kept), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_deberta_dropout(tmp_path_factory, tiny_deberta) -> Path:
    """The tiny DeBERTa-v2 with dropout 0.1, for runs whose exactness depends on the RNG state."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("tiny-deberta-dropout") / "model"
    shutil.copytree(tiny_deberta, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


class RecordOps:
    """Every aten op run inside `with RecordOps() as ops:` with the dtypes of its tensor inputs and outputs.

    A TorchDispatchMode sees ops after autocast has cast their inputs, so it shows the precision
    each op really ran in, and every host read-back (aten._local_scalar_dense: .item(), .tolist(),
    a tensor in an `if`).
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        calls = self.calls = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                import torch
                from torch.utils._pytree import tree_leaves

                out = func(*args, **(kwargs or {}))
                dtypes = lambda tree: [t.dtype for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]  # noqa: E731
                calls.append((func.__name__.split(".")[0], dtypes((args, kwargs)), dtypes(out)))
                return out

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]

    def floating_dtypes(self) -> set:
        """The floating-point dtypes any op read or wrote."""
        return {d for _, inputs, outputs in self.calls for d in inputs + outputs if d.is_floating_point}


@pytest.fixture(scope="session")
def ddp_data(distinct_sts_data, tmp_path_factory) -> Path:
    """distinct_sts_data (no pair of identical sentences: see there) with a 21-pair STS train:
    batches of 4 end in a 1-pair batch that one of two ranks lacks."""
    root = tmp_path_factory.mktemp("ddp-data") / "data"
    shutil.copytree(distinct_sts_data, root)
    sts_train = root / "KorSTS" / "sts-train.tsv"
    sts_train.write_text("".join(sts_train.read_text(encoding="utf-8").splitlines(keepends=True)[:22]), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def single_process_run(tiny_deberta, ddp_data, tmp_path_factory) -> Path:
    """train_args' run in one process: what every data-parallel run of it must end as."""
    from launch import ENV, train_args

    out = tmp_path_factory.mktemp("single") / "out"
    result = subprocess.run([sys.executable, *train_args(tiny_deberta, ddp_data, out)], capture_output=True,
                            text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr
    return out


def xlmr_tokenizer():
    """An XLM-R-style tokenizer, deterministic: a Unigram model (sentencepiece's kind) whose pieces are the tiny
    vocabulary's words with and without the word-start mark, Metaspace, <s> X </s>, <pad> = 1 as in XLM-R."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from kfdeb.tiny import TINY_VOCAB

    words = [w for w in TINY_VOCAB.read_text(encoding="utf-8").splitlines() if not (w.startswith("[") and w.endswith("]"))]
    pieces = list(dict.fromkeys(piece for w in words for piece in ((w[2:],) if w.startswith("##") else ("▁" + w, w))))
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    vocab = [(s, 0.0) for s in specials] + [(p, -len(p) ** 0.5 - i * 1e-7) for i, p in enumerate(pieces)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=3))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", cls_token="<s>", sep_token="</s>", mask_token="<mask>",
                                   model_max_length=64)


@pytest.fixture(scope="session")
def tiny_xlmr(tmp_path_factory) -> Path:
    """A random-weight tiny XLM-R laid out as multilingual-e5-small is (the Korean-capable proxy of the benches):
    XLMRobertaModel (position ids from padding_idx + 1 = 2: 64 tokens in a 66-row table), mean pooling,
    Normalize, prompts "query: " / "passage: ", as a sentence-transformers folder."""
    import json

    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    folder = tmp_path_factory.mktemp("tiny-xlmr")
    tokenizer = xlmr_tokenizer()
    torch.manual_seed(2)
    config = XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=96, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1,
                              bos_token_id=0, eos_token_id=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    XLMRobertaModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 48,
                                                                  "pooling_mode_mean_tokens": True,
                                                                  "include_prompt": True}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: ", "document": "passage: "}, "default_prompt_name": None}))
    return folder


def sigterm_during_step(monkeypatch, step: int) -> None:
    """A SIGTERM received during `step` (after its first loss) of an in-process train(): the loop's own handler
    is called, as the signal would (no real signal: the test process must survive a handler not installed)."""
    import signal

    import kfdeb.loop

    requests = []
    enter, add_loss = kfdeb.loop.StopRequest.__enter__, kfdeb.loop.StepMeter.add_loss

    def recording_enter(self):
        requests.append(self)
        return enter(self)

    def signalling_add_loss(self, task_index, loss, at):
        add_loss(self, task_index, loss, at)
        if at == step and task_index == 0:
            requests[-1]._handle(signal.SIGTERM, None)

    monkeypatch.setattr(kfdeb.loop.StopRequest, "__enter__", recording_enter)
    monkeypatch.setattr(kfdeb.loop.StepMeter, "add_loss", signalling_add_loss)
