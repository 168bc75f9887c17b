"""The token cache (kfdeb/token_cache.py, its use in kfdeb/tasks.py): same run as without it, keyed, never half-used."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from kfdeb import distributed, token_cache, train_state
from kfdeb.config import BUNDLED, TINY_MODEL, resolve
from kfdeb.batching import NoDuplicatesBatches, ShuffledBatches
from kfdeb.readers import BUNDLED_DATA_DIR
from kfdeb.loop import train
from kfdeb.model import SentenceEncoder, load_encoder
from kfdeb.tasks import build_tasks, examples_in_memory, examples_key, read_task_data, task_examples
from launch import ENV, start, torchrun, wait_all

CPU = distributed.Context(0, 0, 1, torch.device("cpu"))


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory, bundled_dir) -> dict[str, str]:
    """40-pair dev and test files: the cache is about the training files, and evaluating the bundled
    dev and test files would take most of each run's time."""
    folder = tmp_path_factory.mktemp("eval")
    files = {}
    for split in ("dev", "test"):
        lines = (bundled_dir / "KorSTS" / f"sts-{split}.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
        (folder / f"{split}.tsv").write_text("".join(lines[:41]), encoding="utf-8")
        files[f"sts_{split}_file"] = str(folder / f"{split}.tsv")
    return files


def bundled_config(model, out, cache_dir, **overrides):
    """Training on the bundled XNLI + KorSTS train files."""
    values = {"model_name_or_path": str(model), "data_dir": BUNDLED, "nli_train_glob": "KorNLI/xnli.*.ko.tsv",
              "nli_batch_size": 16, "sts_batch_size": 8, "max_seq_length": 64, "max_steps": 3, "eval_steps": 3,
              "save_steps": 3, "logging_steps": 1, "learning_rate": 1e-4, "output_dir": str(out), "progress": False,
              "cache_dir": str(cache_dir)}
    return resolve({**values, **overrides})


def recorded_run(config, monkeypatch):
    """train(config) with every global batch the samplers hand out recorded: (batches, losses, final weights)."""
    batches = []
    for sampler in (NoDuplicatesBatches, ShuffledBatches):
        def recording(self, _next=sampler.next_batch):
            batch = _next(self)
            batches.append((type(self).__name__, batch))
            return batch
        monkeypatch.setattr(sampler, "next_batch", recording)
    train(config)
    monkeypatch.undo()
    out = Path(config.output_dir)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["task"], r["loss"], r["grad_norm"]) for r in rows if "task" in r]
    return batches, losses, train_state.read_part(train_state.latest(out), "train")["model"]


def test_cached_runs_equal_the_uncached_run_and_the_second_is_a_hit(tiny_deberta, eval_files, tmp_path, monkeypatch,
                                                                   capsys):
    cache = tmp_path / "cache"
    expected = recorded_run(bundled_config(tiny_deberta, tmp_path / "plain", cache, no_cache=True, **eval_files),
                            monkeypatch)
    assert not cache.exists()  # --no_cache writes nothing
    built = recorded_run(bundled_config(tiny_deberta, tmp_path / "built", cache, **eval_files), monkeypatch)
    assert "building the token cache" in capsys.readouterr().out

    def never(*args, **kwargs):
        raise AssertionError("a cache hit read a training file or tokenized")

    # a hit parses no training file and tokenizes nothing (dev/test files are read as always)
    monkeypatch.setattr("kfdeb.tasks.read_task_texts", never)
    monkeypatch.setattr(token_cache.TokenTable, "from_tokenizer", never)
    monkeypatch.setattr(SentenceEncoder, "bulk_tokenizer", never)
    hit = recorded_run(bundled_config(tiny_deberta, tmp_path / "hit", cache, **eval_files), monkeypatch)
    said = capsys.readouterr().out
    assert "building the token cache" not in said
    assert said.count("from the token cache (hit)") == 4  # NLI and STS: examples and token ids

    batches, losses, weights = expected
    assert len(batches) == 6 and len(losses) == 6  # 3 steps x (NLI, STS)
    for other_batches, other_losses, other_weights in (built, hit):
        assert other_batches == batches
        assert other_losses == losses  # exactly: the same token ids in the same batches
        assert other_weights.keys() == weights.keys()
        for name, tensor in weights.items():
            assert torch.equal(other_weights[name], tensor), name


def test_cached_examples_and_token_ids_are_the_in_memory_ones(tiny_deberta, tmp_path):
    """Text ids, token ids (the fast batch path against `tokenize`), labels, and the batches of the
    no-duplicates sampler built from the cached keys against one built from the texts."""
    config = bundled_config(tiny_deberta, tmp_path / "out", tmp_path / "cache", max_seq_length=24)
    encoder = load_encoder(tiny_deberta, max_seq_length=24)  # short: truncation matters on many sentences
    texts = read_task_data(config, BUNDLED_DATA_DIR, CPU)
    plain = build_tasks(config, examples_in_memory(texts), encoder, CPU)
    cached = build_tasks(config, task_examples(config, BUNDLED_DATA_DIR, CPU), encoder, CPU)
    assert isinstance(cached[0].rows, np.memmap) and isinstance(cached[0].sequences.ids, np.memmap)
    for ours, theirs in zip(cached, plain):
        np.testing.assert_array_equal(ours.rows, theirs.rows)
        assert len(ours.sequences) == len(theirs.sequences) > 5000
        np.testing.assert_array_equal(ours.sequences.ids, theirs.sequences.ids)
        np.testing.assert_array_equal(ours.sequences.offsets, theirs.sequences.offsets)
        if ours.labels is not None:
            np.testing.assert_array_equal(ours.labels, theirs.labels)
    assert cached[0].sequences.offsets[-1] > 0 and max(np.diff(cached[0].sequences.offsets)) == 24
    from_texts = NoDuplicatesBatches(texts["nli"][0], config.nli_batch_size, config.seed)
    for _ in range(len(from_texts) + 5):  # into the second pass
        assert cached[0].sampler.next_batch() == from_texts.next_batch()
    assert cached[0].sampler.state_dict() == from_texts.state_dict()


@pytest.fixture
def own_data(small_data, tmp_path) -> Path:
    root = tmp_path / "data"
    for part in ("KorNLI", "KorSTS"):
        (root / part).mkdir(parents=True)
        for file in (small_data / part).iterdir():
            (root / part / file.name).write_bytes(file.read_bytes())
    return root


def folders(config, data_dir, encoder) -> dict[str, tuple[Path, Path, bool]]:
    """Per objective: (examples folder, token ids folder, whether the token ids were built now)."""
    examples = task_examples(config, data_dir, CPU)
    key = token_cache.tokenizer_fingerprint(encoder.tokenizer, encoder.do_lower_case, encoder.max_seq_length)
    found = {}
    for name, data in examples.items():
        tokens = token_cache.tokens_folder(data.folder, key)
        found[name] = (data.folder, tokens, not token_cache.is_complete(tokens, key))
    build_tasks(config, examples, encoder, CPU)
    assert all(token_cache.is_complete(tokens, key) for _, tokens, _ in found.values())
    return found


def test_a_changed_file_tokenizer_or_length_is_another_key(tiny_deberta, own_data, tmp_path):
    cache = tmp_path / "cache"
    config = bundled_config(tiny_deberta, tmp_path / "out", cache, data_dir=str(own_data),
                            nli_train_glob="KorNLI/*.train.ko.tsv")
    encoder = load_encoder(tiny_deberta, max_seq_length=64)
    nli = own_data / "KorNLI" / "small.train.ko.tsv"
    first = task_examples(config, own_data, CPU)
    again = task_examples(config, own_data, CPU)
    assert {n: e.folder for n, e in again.items()} == {n: e.folder for n, e in first.items()}

    os.utime(nli, ns=(nli.stat().st_atime_ns, nli.stat().st_mtime_ns + 10**9))  # touched
    touched = task_examples(config, own_data, CPU)
    assert touched["nli"].folder != first["nli"].folder and touched["sts"].folder == first["sts"].folder

    # same size, same times, other content: only the hash sees it
    stat, data = nli.stat(), nli.read_bytes()
    edited = data.replace(b"\tentailment\n", b"\tneutral   \n", 1)  # a label changes, the size does not
    assert len(edited) == len(data) and edited != data
    nli.write_bytes(edited)
    os.utime(nli, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = task_examples(config, own_data, CPU)
    assert changed["nli"].folder not in (first["nli"].folder, touched["nli"].folder)
    assert task_examples(bundled_config(tiny_deberta, tmp_path / "out", cache, data_dir=str(own_data),
                                        nli_train_glob="KorNLI/*.train.ko.tsv", seed=7),
                         own_data, CPU)["nli"].folder != changed["nli"].folder  # other triplets

    base = folders(config, own_data, encoder)
    assert all(built for _, _, built in base.values())
    assert all(not built for _, _, built in folders(config, own_data, encoder).values())  # a hit
    shorter = folders(config, own_data, load_encoder(tiny_deberta, max_seq_length=16))
    for name, (examples, tokens, built) in shorter.items():
        assert examples == base[name][0] and tokens != base[name][1] and built
        assert max(np.diff(token_cache.open_tokens(tokens).offsets)) == 16

    # another vocabulary: the same tokenizer with one token renamed
    other = load_encoder(tiny_deberta, max_seq_length=64)
    pipeline = json.loads(other.tokenizer.backend_tokenizer.to_str())
    vocab = pipeline["model"]["vocab"]
    renamed = next(token for token, index in vocab.items() if index > 100 and not token.startswith("##"))
    vocab["없던토큰"] = vocab.pop(renamed)
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    other.tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(pipeline)),
                                              pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    revocabbed = folders(config, own_data, other)
    for name, (examples, tokens, built) in revocabbed.items():
        assert examples == base[name][0] and tokens not in (base[name][1], shorter[name][1]) and built
    # the tokenizer is keyed by what it does, not where it was loaded from: a copy elsewhere hits
    copy = tmp_path / "copy"
    encoder.tokenizer.save_pretrained(copy)
    (copy / "config.json").write_bytes((tiny_deberta / "config.json").read_bytes())
    (copy / "model.safetensors").write_bytes((tiny_deberta / "model.safetensors").read_bytes())
    assert all(not built for _, _, built in folders(config, own_data, load_encoder(copy, max_seq_length=64)).values())


def dead_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(finished.stdout)


def test_a_half_written_cache_is_never_used_and_the_next_run_builds_a_good_one(tiny_deberta, own_data, tmp_path):
    cache = tmp_path / "cache"
    config = bundled_config(tiny_deberta, tmp_path / "out", cache, data_dir=str(own_data),
                            nli_train_glob="KorNLI/*.train.ko.tsv", tasks="nli")
    encoder = load_encoder(tiny_deberta, max_seq_length=64)
    expected = build_tasks(config, examples_in_memory(read_task_data(config, own_data, CPU)), encoder, CPU)[0]
    key = examples_key(config, own_data, "nli")
    final = token_cache.examples_folder(cache, "nli", key)
    # what a kill leaves: a scratch folder of a process that is gone, and (never written by kfdeb,
    # but possible by hand) the final folder with part of its files and no marker
    stale = cache / f"{token_cache.SCRATCH_PREFIX}{socket.gethostname()}@{dead_pid()}@{final.name}"
    stale.mkdir(parents=True)
    np.save(stale / "rows.npy", np.zeros((3, 3), dtype=np.int32))
    final.mkdir()
    np.save(final / "rows.npy", np.zeros((3, 3), dtype=np.int32))
    (final / "key.json").write_text(json.dumps(key))  # the right key, but no COMPLETE marker
    (task,) = build_tasks(config, task_examples(config, own_data, CPU), encoder, CPU)
    assert not stale.exists() and token_cache.is_complete(final, key)
    np.testing.assert_array_equal(task.rows, expected.rows)
    np.testing.assert_array_equal(task.sequences.ids, expected.sequences.ids)


def test_a_build_killed_by_sigkill_is_not_used(tiny_deberta, own_data, tmp_path):
    """train.py SIGKILLed while it writes the token ids (its examples already complete)."""
    big = own_data / "KorNLI" / "small.train.ko.tsv"
    lines = big.read_text(encoding="utf-8").splitlines(keepends=True)
    # ~27k pairs, each sentence made distinct: a few seconds of tokenizing, a wide window to kill in
    big.write_text(lines[0] + "".join(f"{copy} {line.split(chr(9))[0]}\t{copy} {line.split(chr(9), 1)[1]}"
                                      for copy in range(30) for line in lines[1:]), encoding="utf-8")
    cache = tmp_path / "cache"
    args = ["--model_name_or_path", str(tiny_deberta), "--data_dir", str(own_data), "--nli_train_glob",
            "KorNLI/*.train.ko.tsv", "--tasks", "nli", "--max_seq_length", "64", "--max_steps", "2",
            "--output_dir", str(tmp_path / "out"), "--progress", "false", "--cache_dir", str(cache), "--device", "cpu"]
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env=ENV)
    deadline, scratch = time.time() + 120, []
    while time.time() < deadline and process.poll() is None and not scratch:
        scratch = list(cache.glob(f"examples-*/{token_cache.SCRATCH_PREFIX}*"))
        time.sleep(0.002)
    assert scratch and process.poll() is None, process.stderr.read().decode()[-2000:] if process.poll() is not None else ""
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    (examples,) = [p for p in cache.iterdir() if p.name.startswith("examples-")]
    assert token_cache.COMPLETE in os.listdir(examples)
    assert not [p for p in examples.iterdir() if p.name.startswith("tokens-")]  # never renamed into place
    assert [p for p in examples.iterdir() if p.name.startswith(token_cache.SCRATCH_PREFIX)]

    config = bundled_config(tiny_deberta, tmp_path / "out", cache, data_dir=str(own_data),
                            nli_train_glob="KorNLI/*.train.ko.tsv", tasks="nli")
    encoder = load_encoder(tiny_deberta, max_seq_length=64)
    (task,) = build_tasks(config, task_examples(config, own_data, CPU), encoder, CPU)
    assert not [p for p in examples.iterdir() if p.name.startswith(token_cache.SCRATCH_PREFIX)]
    texts = token_cache.open_examples(examples).texts
    assert len(task.sequences) == len(texts) > 20000
    for i in (0, 1, len(texts) // 2, len(texts) - 1):
        assert task.sequences[i].tolist() == encoder.tokenize(texts[i : i + 1])[0]


def test_two_ranks_share_one_build(eval_files, tmp_path):
    """With the tiny preset's model, which each rank builds in a folder of its own (no shared disk)."""
    cache = tmp_path / "cache"
    args = [str(REPO / "train.py"), "--model_name_or_path", TINY_MODEL, "--data_dir", BUNDLED,
            "--nli_train_glob", "KorNLI/xnli.*.ko.tsv", "--nli_batch_size", "16", "--sts_batch_size", "4",
            "--max_seq_length", "64", "--max_steps", "2", "--device", "cpu", "--output_dir", str(tmp_path / "out"),
            "--progress", "false", "--cache_dir", str(cache), "--sts_dev_file", eval_files["sts_dev_file"],
            "--sts_test_file", eval_files["sts_test_file"]]
    [(status, stdout, stderr)] = wait_all([start(torchrun(*args))], tmp_path)
    assert status == 0, stderr[-3000:]
    building = [line for line in stdout.splitlines() if line.startswith("building the token cache")]
    assert len(building) == 4 and all(line.endswith("(rank 0)") for line in building)  # 2 objectives x 2 levels
    assert "2 process(es)" in stdout
    assert sorted(p.name.split("-")[2] for p in cache.iterdir()) == ["nli", "sts"]  # nothing else, no scratch left
