"""The training loop (kfdeb/loop.py): one step and a whole run against sentence-transformers, outputs, resume, NaN."""

from __future__ import annotations

import copy
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_main, run_script, sigterm_during_step
from kfdeb import distributed, train_state
from kfdeb.config import resolve
from kfdeb.batching import nli_triplets
from kfdeb.readers import read_nli, read_sts
from kfdeb.loop import task_loss, train, update
from kfdeb.tasks import build_tasks, examples_in_memory
from kfdeb.model import load_encoder
from kfdeb.optim import build_adamw, build_scheduler, warmup_linear


def small_config(model, data, out, **overrides):
    values = {"model_name_or_path": str(model), "data_dir": str(data), "nli_train_glob": "KorNLI/*.train.ko.tsv",
              "nli_batch_size": 16, "sts_batch_size": 8, "max_seq_length": 64, "max_steps": 12, "eval_steps": 6,
              "save_steps": 6, "logging_steps": 3, "learning_rate": 1e-4, "output_dir": str(out), "progress": False}
    return resolve({**values, **overrides})


def test_one_step_equals_sentence_transformers(tiny_deberta, small_data):
    """Same weights, same batches: losses, gradients and post-AdamW parameters of both objectives agree."""
    import sentence_transformers as st
    from sentence_transformers import InputExample
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss, MultipleNegativesRankingLoss

    triplets = nli_triplets(read_nli(small_data / "KorNLI" / "small.train.ko.tsv").pairs, seed=0)[:16]
    pairs = read_sts(small_data / "KorSTS" / "sts-train.tsv")[:8]
    config = small_config(tiny_deberta, small_data, "unused", nli_batch_size=16, sts_batch_size=8)
    ctx = distributed.Context(0, 0, 1, torch.device("cpu"))
    encoder = load_encoder(tiny_deberta, max_seq_length=64)
    examples = {"nli": (triplets, None),
                "sts": ([(p.sentence1, p.sentence2) for p in pairs], np.array([p.label for p in pairs], dtype=np.float32))}
    tasks = build_tasks(config, examples_in_memory(examples), encoder, ctx)

    reference = st.SentenceTransformer(str(tiny_deberta), device="cpu")
    reference.max_seq_length = 64
    reference_losses = {"nli": MultipleNegativesRankingLoss(reference, scale=20.0), "sts": CosineSimilarityLoss(reference)}
    reference_batches = {"nli": [InputExample(texts=list(t)) for t in triplets],
                         "sts": [InputExample(texts=[p.sentence1, p.sentence2], label=p.label) for p in pairs]}
    lr, decay = 1e-3, 0.01
    for task in tasks:  # NLI then STS, each followed by its own AdamW step, as in the loop
        ours_optimizer = build_adamw(encoder.named_parameters(), lr, decay, fused=True)
        batch = task.rank_batch(list(range(len(examples[task.name][0]))), ctx)
        ours_loss = task_loss(encoder, task, batch, ctx, encoder.pad_id, 1)
        ours_loss.backward()
        ours_grads = {n: p.grad.clone() for n, p in encoder.transformer.named_parameters()}

        loss_model = reference_losses[task.name]
        features, labels = reference.smart_batching_collate(reference_batches[task.name])
        theirs_loss = loss_model(features, labels)
        theirs_loss.backward()
        assert ours_loss.item() == pytest.approx(theirs_loss.item(), abs=1e-5), task.name
        theirs_params = dict(reference[0].auto_model.named_parameters())
        for name, grad in ours_grads.items():
            torch.testing.assert_close(grad, theirs_params[name].grad, rtol=0, atol=1e-5, msg=f"{task.name} {name}")

        # Adam's first step is lr * g / (|g| + eps): a gradient entry near eps turns float noise of 1e-9
        # into an lr-sized difference, so the optimiser is checked on identical gradients.
        for name, grad in ours_grads.items():
            theirs_params[name].grad.copy_(grad)
        no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight"]
        named = list(loss_model.named_parameters())
        theirs_optimizer = torch.optim.AdamW(
            [{"params": [p for n, p in named if not any(k in n for k in no_decay)], "weight_decay": decay},
             {"params": [p for n, p in named if any(k in n for k in no_decay)], "weight_decay": 0.0}], lr=lr)
        torch.nn.utils.clip_grad_norm_(loss_model.parameters(), 1.0)
        theirs_optimizer.step()
        theirs_optimizer.zero_grad()
        update(list(encoder.parameters()), ours_optimizer, build_scheduler(ours_optimizer, 0, 10), None, 1.0)
        for name, param in encoder.transformer.named_parameters():
            torch.testing.assert_close(param, theirs_params[name], rtol=0, atol=1e-6, msg=f"{task.name} {name}")


def test_a_whole_run_equals_old_fit_fed_the_same_batches(tiny_deberta, distinct_sts_data, tmp_path):
    """The real loop over 2 epochs (warmup, decay, both objectives with their own AdamW, clipping,
    the samplers' second pass) against sentence-transformers' `old_fit` given kfdeb's own batches,
    dropout off. Nothing is drawn at random, so every step's losses and the final weights must agree
    to float rounding: a slip in any step would compound. (bench/train_vs_reference.py --no_dropout
    does the same on all-MiniLM-L6-v2 over 78 steps.) With the STS pairs of identical sentences left
    in, Adam moves one rare token's embedding row by 2.2e-5 (see distinct_sts_data)."""
    import sentence_transformers as st
    from sentence_transformers import InputExample
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss, MultipleNegativesRankingLoss

    from kfdeb.batching import NoDuplicatesBatches, ShuffledBatches, nli_triplets_of_files

    out = tmp_path / "kfdeb"
    config = small_config(tiny_deberta, distinct_sts_data, out, max_steps=0, num_epochs=2, eval_steps=10**6,
                          save_steps=10**6, logging_steps=1)
    summary = train(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ours = {task: [r["loss"] for r in rows if r.get("task") == task] for task in ("nli", "sts")}

    triplets = nli_triplets_of_files([read_nli(distinct_sts_data / "KorNLI" / "small.train.ko.tsv").pairs], config.seed)
    pairs = read_sts(distinct_sts_data / "KorSTS" / "sts-train.tsv")

    class SameBatches:  # one pass per iter(), the position carried over, as old_fit's loaders do
        def __init__(self, examples, sampler):
            self.examples, self.sampler, self.collate_fn = examples, sampler, None

        def __len__(self):
            return len(self.sampler)

        def __iter__(self):
            for _ in range(len(self)):
                yield self.collate_fn([self.examples[i] for i in self.sampler.next_batch()])

    nli = SameBatches([InputExample(texts=list(t)) for t in triplets], NoDuplicatesBatches(triplets, 16, config.seed))
    sts = SameBatches([InputExample(texts=[p.sentence1, p.sentence2], label=p.label) for p in pairs],
                      ShuffledBatches(len(pairs), 8, config.seed))
    per_epoch = min(len(nli), len(sts))
    assert summary["total_steps"] == 2 * per_epoch and [len(v) for v in ours.values()] == [2 * per_epoch] * 2
    reference = st.SentenceTransformer(str(tiny_deberta), device="cpu")
    reference.max_seq_length = 64
    theirs = {"nli": [], "sts": []}

    def recording(loss_module, sink):  # old_fit keeps no losses
        forward = loss_module.forward

        def forward_and_record(*inputs, **kwargs):
            sink.append(forward(*inputs, **kwargs))
            return sink[-1]

        loss_module.forward = forward_and_record
        return loss_module

    reference.old_fit(train_objectives=[(nli, recording(MultipleNegativesRankingLoss(reference), theirs["nli"])),
                                        (sts, recording(CosineSimilarityLoss(reference), theirs["sts"]))],
                      epochs=2, steps_per_epoch=per_epoch, warmup_steps=math.ceil(0.1 * 2 * per_epoch),
                      optimizer_params={"lr": 1e-4}, show_progress_bar=False)
    for task in ours:
        np.testing.assert_allclose(ours[task], [v.item() for v in theirs[task]], rtol=0, atol=1e-5, err_msg=task)
    final = train_state.read_part(train_state.latest(out), "train")["model"]
    for name, value in reference[0].auto_model.state_dict().items():
        # rows of rare tokens: a tiny, noisy gradient seen a few times, normalised by Adam (measured 2.7e-6,
        # lr 1e-4); every other weight agrees within 1.2e-7
        tolerance = 1e-5 if name == "embeddings.word_embeddings.weight" else 1e-6
        torch.testing.assert_close(final["transformer." + name], value, rtol=0, atol=tolerance, msg=name)


def test_short_run_writes_every_output(tiny_deberta, small_data, tmp_path):
    out = tmp_path / "run"
    summary = train(small_config(tiny_deberta, small_data, out))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "task" in r]
    assert [(r["step"], r["task"]) for r in train_rows] == [(s, t) for s in (3, 6, 9, 12) for t in ("nli", "sts")]
    for row in train_rows:  # lr after `step` scheduler steps: base * warmup_linear(step), warmup ceil(1.2) = 2
        assert row["lr"] == pytest.approx(1e-4 * warmup_linear(row["step"], 2, 12), rel=1e-9)
        assert np.isfinite(row["loss"]) and row["grad_norm"] > 0 and row["examples_per_s"] > 0
    dev = [r for r in rows if r.get("split") == "dev"]
    assert [r["step"] for r in dev] == [0, 6, 12]  # step 0: the start, the best until a step beats it
    best = max(dev, key=lambda r: r["score"])
    assert summary["best_step"] == best["step"]
    assert rows[-1]["split"] == "test" and rows[-1]["best_step"] == best["step"]

    metadata = json.loads((out / "best" / "kfdeb.json").read_text())
    assert metadata["best_step"] == best["step"] and metadata["test"] == summary["test"]
    assert metadata["dev"]["cosine_spearman"] == pytest.approx(best["cosine_spearman"], abs=1e-3)
    assert json.loads((out / "train_config.json").read_text())["max_steps"] == 12
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "best" / "README.md").read_text()
    assert card.startswith("---\nlanguage:\n- ko\n") and f"{summary['test']['cosine_spearman']:.2f}" in card
    # publishable: the snippets name the model by its folder name, and no local path is in the card
    assert 'SentenceTransformer("run")' in card and str(tmp_path) not in card
    # and none in kfdeb.json either: local folders by their names (train_config.json, outside best/, has the paths)
    assert str(tmp_path) not in (out / "best" / "kfdeb.json").read_text()
    assert metadata["config"]["output_dir"] == "run" and metadata["base_model"] == Path(str(tiny_deberta)).name
    assert json.loads((out / "train_config.json").read_text())["output_dir"] == str(out)
    # no training state: push best/ as it is (transformers 4.x also writes special_tokens_map.json)
    assert sorted(p.name for p in (out / "best").iterdir() if p.name != "special_tokens_map.json") == sorted(
        ["README.md", "config.json", "model.safetensors", "modules.json", "sentence_bert_config.json", "1_Pooling",
         "kfdeb.json", "tokenizer.json", "tokenizer_config.json"])
    assert train_state.latest(out).name == "step-00000012"
    import sentence_transformers as st
    reloaded = st.SentenceTransformer(str(out / "best"), device="cpu").encode(["문장 하나"])
    np.testing.assert_allclose(reloaded, load_encoder(out).encode(["문장 하나"], convert_to_numpy=True), atol=1e-5)


def test_joint_steps_are_one_adamw_update_on_the_summed_loss(tiny_deberta, distinct_sts_data, tmp_path):
    """--optimizer joint, two steps: the weights are those of sentence-transformers' two losses added up, one
    clip of the summed gradient and one AdamW step per step (lr by hand: warmup 0, linear decay), and the logged
    gradient norm is the summed gradient's. Two steps, because Adam's first step, g / (|g| + eps), hides how
    the gradient was scaled or clipped; the second step's ratio of moments does not."""
    import sentence_transformers as st
    from sentence_transformers import InputExample
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss, MultipleNegativesRankingLoss

    from kfdeb.batching import NoDuplicatesBatches, ShuffledBatches, nli_triplets_of_files

    out, lr = tmp_path / "joint", 1e-4
    config = small_config(tiny_deberta, distinct_sts_data, out, optimizer="joint", max_steps=2, eval_steps=2,
                          save_steps=2, logging_steps=1, warmup_ratio=0.0, learning_rate=lr)
    train(config)
    saved = train_state.read_part(train_state.latest(out), "train")
    assert len(saved["optimizers"]) == len(saved["schedulers"]) == 1
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    # the batches the loop's samplers give (what they are is tested elsewhere; here only what is done with them)
    triplets = nli_triplets_of_files([read_nli(distinct_sts_data / "KorNLI" / "small.train.ko.tsv").pairs], config.seed)
    pairs = read_sts(distinct_sts_data / "KorSTS" / "sts-train.tsv")
    nli_batches = NoDuplicatesBatches(triplets, 16, config.seed)
    sts_batches = ShuffledBatches(len(pairs), 8, config.seed)
    reference = st.SentenceTransformer(str(tiny_deberta), device="cpu")
    reference.max_seq_length = 64
    nli_loss, sts_loss = MultipleNegativesRankingLoss(reference, scale=20.0), CosineSimilarityLoss(reference)
    named = list(reference[0].auto_model.named_parameters())
    no_decay = ("bias", "LayerNorm.bias", "LayerNorm.weight")
    decay = [p for n, p in named if not any(k in n for k in no_decay)]
    exempt = [p for n, p in named if any(k in n for k in no_decay)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": exempt, "weight_decay": 0.0}],
                                  lr=lr)
    for step in (1, 2):
        nli = reference.smart_batching_collate([InputExample(texts=list(triplets[i]))
                                                for i in nli_batches.next_batch()])
        sts = reference.smart_batching_collate([InputExample(texts=[pairs[i].sentence1, pairs[i].sentence2],
                                                             label=pairs[i].label) for i in sts_batches.next_batch()])
        (nli_loss(*nli) + sts_loss(*sts)).backward()
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0).item()
        for group in optimizer.param_groups:
            group["lr"] = lr * (2 - (step - 1)) / 2  # after t scheduler steps: lr (T - t) / T
        optimizer.step()
        optimizer.zero_grad()
        for row in (r for r in logged if r.get("step") == step and "task" in r):  # one norm, logged for both tasks
            assert row["grad_norm"] == pytest.approx(norm, rel=1e-4), row
    for name, value in reference[0].auto_model.state_dict().items():
        torch.testing.assert_close(saved["model"]["transformer." + name], value, rtol=0, atol=1e-6, msg=name)


def test_bf16_autocast_run(tiny_deberta, small_data, tmp_path):
    bf16 = train(small_config(tiny_deberta, small_data, tmp_path / "bf16", amp="bf16", max_steps=4,
                              eval_steps=4, save_steps=4, logging_steps=2))
    assert np.isfinite(bf16["test"]["cosine_spearman"])


def test_an_fp16_overflow_skips_the_update_and_its_schedule_step_and_halves_the_scale():
    """update() under a GradScaler (the CPU one: what an fp16 run on CPU builds, run.py): an inf in the scaled
    gradients leaves the weights and the optimizer untouched, the learning rate where it was, the scale halved;
    the next finite gradient makes exactly torch.optim.AdamW's step on the unscaled, clipped gradient."""
    torch.manual_seed(0)
    model, x = torch.nn.Linear(4, 3), torch.randn(5, 4)
    named = list(model.named_parameters())
    optimizer = build_adamw(named, lr=1e-2, weight_decay=0.01, fused=True)
    scheduler = build_scheduler(optimizer, 0, 10)  # no warmup: lr 1e-2 (10 - t) / 10 after t scheduler steps
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    before = copy.deepcopy(model)

    scaler.scale(model(x).square().mean()).backward()
    model.weight.grad[1, 2] = float("inf")  # what an fp16 overflow leaves in a gradient
    update(list(model.parameters()), optimizer, scheduler, scaler, 1.0)
    for (name, param), (_, old) in zip(named, before.named_parameters()):
        assert torch.equal(param, old) and param.grad is None, name
    for state in optimizer.state.values():  # fused AdamW, told of the inf, counts no step and moves no moment
        assert state["step"] == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    assert optimizer.param_groups[0]["lr"] == 1e-2 and scaler.get_scale() == 2.0**15

    scaler.scale(model(x).square().mean()).backward()
    update(list(model.parameters()), optimizer, scheduler, scaler, 1.0)
    reference = torch.optim.AdamW([{"params": [before.weight], "weight_decay": 0.01},
                                   {"params": [before.bias], "weight_decay": 0.0}], lr=1e-2)
    before(x).square().mean().backward()
    torch.nn.utils.clip_grad_norm_(before.parameters(), 1.0)
    reference.step()
    for (name, param), (_, expected) in zip(named, before.named_parameters()):
        torch.testing.assert_close(param, expected, rtol=0, atol=1e-7, msg=name)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 9 / 10, rel=1e-12)
    assert scaler.get_scale() == 2.0**15  # it grows back only after 2000 good steps


def test_an_fp16_run_does_not_advance_the_schedule_of_an_overflowed_update(tiny_deberta, small_data, tmp_path,
                                                                            monkeypatch):
    """The loop's fp16 path: the run's GradScaler sees the overflow (a gradient set to inf in the first NLI update),
    halves its scale once, and the NLI schedule counts one step fewer than the STS one; the logged learning rates
    are the warmup-linear ones of those counts."""
    import kfdeb.loop

    updates = []  # (objective's optimizer, whether the scaled gradients held an inf or NaN), as seen here
    real_update = kfdeb.loop.update

    def poisoning_update(parameters, optimizer, scheduler, scaler, max_grad_norm):
        if not updates:
            parameters[0].grad.view(-1)[0] = float("inf")
        updates.append((optimizer, not all(torch.isfinite(p.grad).all() for p in parameters if p.grad is not None)))
        return real_update(parameters, optimizer, scheduler, scaler, max_grad_norm)

    monkeypatch.setattr(kfdeb.loop, "update", poisoning_update)
    out = tmp_path / "fp16"
    # fp16 autocast on a CPU without fp16 units is slow: two small steps are enough to go through the scaler
    train(small_config(tiny_deberta, small_data, out, amp="fp16", max_steps=2, eval_steps=2, save_steps=2,
                       logging_steps=1, nli_batch_size=8, warmup_ratio=0.5))
    saved = train_state.read_part(train_state.latest(out), "train")
    nli_optimizer = updates[0][0]
    overflowed = [sum(bad for o, bad in updates if (o is nli_optimizer) == is_nli) for is_nli in (True, False)]
    assert len(updates) == 4 and overflowed[0] >= 1  # per_task: an NLI and an STS update a step
    assert saved["scaler"]["scale"] == 2.0**16 * 0.5 ** sum(overflowed)
    good = [2 - bad for bad in overflowed]  # scheduler steps taken: NLI, STS
    assert [scheduler["last_epoch"] for scheduler in saved["schedulers"]] == good
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = {row["task"]: row["lr"] for row in rows if row.get("step") == 2 and "task" in row}
    # warmup ceil(0.5 x 2) = 1 of 2 steps: lr 1e-4 x f(t) after t scheduler steps
    assert last == {"nli": pytest.approx(1e-4 * warmup_linear(good[0], 1, 2)),
                    "sts": pytest.approx(1e-4 * warmup_linear(good[1], 1, 2))}


def train_command(model, data, out, *extra):
    return [sys.executable, str(REPO / "train.py"), "--model_name_or_path", str(model), "--data_dir", str(data),
            "--nli_train_glob", "KorNLI/*.train.ko.tsv", "--nli_batch_size", "16", "--max_seq_length", "64",
            "--max_steps", "24", "--eval_steps", "10", "--save_steps", "3", "--logging_steps", "2",
            "--learning_rate", "5e-4", "--output_dir", str(out), "--progress", "false", *extra]


def final_state(out: Path):
    saved = train_state.read_part(train_state.latest(out), "train")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("examples_per_s", None)  # a timing, not a result
    return saved, rows


@pytest.fixture(scope="module")
def straight_run(tiny_deberta_dropout, small_data, tmp_path_factory) -> Path:
    """train_command's run, uninterrupted: what every interrupted and resumed run must end as."""
    out = tmp_path_factory.mktemp("straight") / "out"
    reference = subprocess.run(train_command(tiny_deberta_dropout, small_data, out), capture_output=True, text=True,
                               timeout=300)
    assert reference.returncode == 0, reference.stderr
    return out


def test_sigkill_and_resume_give_the_uninterrupted_result(tiny_deberta_dropout, small_data, straight_run, tmp_path):
    """Killed by SIGKILL at whatever instant (possibly mid-save) and resumed: same weights and metrics."""
    out = tmp_path / "killed"
    process = subprocess.Popen(train_command(tiny_deberta_dropout, small_data, out), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        state = train_state.latest(out)
        if state is not None and int(state.name.split("-")[1]) >= 8:  # past an evaluation and a few saves
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert process.wait(timeout=60) == -signal.SIGKILL, process.stderr.read().decode()
    killed_at = int(train_state.latest(out).name.split("-")[1])
    assert killed_at < 24
    train_state.read_part(train_state.latest(out), "train")  # whatever instant it died, the latest state loads
    resumed = subprocess.run(train_command(tiny_deberta_dropout, small_data, out, "--resume"),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    expected, expected_rows = final_state(straight_run)
    got, got_rows = final_state(out)
    assert got["progress"]["step"] == expected["progress"]["step"] == 24
    for name, tensor in expected["model"].items():
        torch.testing.assert_close(got["model"][name], tensor, rtol=0, atol=1e-6, msg=name)
    assert got_rows == expected_rows
    assert (out / "best" / "model.safetensors").read_bytes() == (straight_run / "best" / "model.safetensors").read_bytes()


# log lines and saves only at the evaluations (steps 10, 20) and the end; the hard negatives re-mined before steps
# 5, 9, 13, 17 and 21 (remine.py): the state saved at step 5 holds the first refresh's, --resume goes on from them
SIGTERM_FLAGS = ("--logging_steps", "1000", "--save_steps", "1000", "--remine_every", "4")


def test_sigterm_stops_at_the_end_of_its_step_and_resume_gives_the_uninterrupted_run_bit_for_bit(
        tiny_deberta_dropout, small_data, tmp_path):
    """--logging_steps 1000 (longer than the run), SIGTERM in step 5: the process stops at the end of step 5, not
    at a log line, saves that step's state (its half-open logging window in it), exits 143 naming the state and
    the --resume command; resumed, it ends with the uninterrupted run's weights, metrics and best/kfdeb.json."""
    straight = tmp_path / "straight"
    reference = subprocess.run(train_command(tiny_deberta_dropout, small_data, straight, *SIGTERM_FLAGS),
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr
    refreshed = [line for line in reference.stdout.splitlines() if "hard negatives re-mined" in line]
    assert [line.split(":")[0] for line in refreshed] == ["step 4", "step 8", "step 12", "step 16", "step 20"]
    assert all(not line.split(": ")[1].startswith("0 of") for line in refreshed[:1])  # the negatives did change
    out = tmp_path / "terminated"
    command = train_command(tiny_deberta_dropout, small_data, out, *SIGTERM_FLAGS)
    process = subprocess.Popen([sys.executable, str(REPO / "tests" / "pause_for_sigterm.py"), "5", *command[1:]],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:  # run's own lines, then the pause in step 5
        if line.startswith("paused in step 5"):
            break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    step = int(train_state.latest(out).name.split("-")[1])
    assert step == 5  # the step the signal arrived in: one process stops at its end
    logged = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 5 not in logged  # not a log line: the state carries the open window
    assert stderr.strip().splitlines()[-1] == (
        f"error: stopped by SIGTERM at step {step} of 24: the training state is saved in {out}/state/"
        f"step-{step:08d}; continue with: python {shlex.join(command[1:])} --resume")
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out}/state/step-{step:08d} at step {step}" in resumed.stdout
    assert "step 8: hard negatives re-mined" in resumed.stdout
    expected, expected_rows = final_state(straight)
    got, got_rows = final_state(out)
    assert got["progress"]["step"] == 24
    for name, tensor in expected["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    assert torch.equal(got["negatives"]["nli"], expected["negatives"]["nli"])  # the last refresh's, in the state
    assert got_rows == expected_rows and [r["step"] for r in got_rows if "task" in r][:2] == [10, 10]
    assert (out / "best" / "model.safetensors").read_bytes() == (straight / "best" / "model.safetensors").read_bytes()
    metadata = [json.loads((folder / "best" / "kfdeb.json").read_text()) for folder in (straight, out)]
    assert sorted(metadata[1]) == sorted(metadata[0]) and metadata[1]["step"] == metadata[0]["step"]
    how = ("output_dir", "resume")  # where and how it ran, not what it computed
    assert {k: v for k, v in metadata[1]["config"].items() if k not in how} == \
        {k: v for k, v in metadata[0]["config"].items() if k not in how}


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_state(tiny_deberta, small_data, tmp_path):
    out = tmp_path / "nan"
    result = run_main("train.py", "--model_name_or_path", tiny_deberta, "--data_dir", small_data,
                        "--nli_train_glob", "KorNLI/*.train.ko.tsv", "--nli_batch_size", "16", "--max_steps", "40",
                        "--save_steps", "1", "--eval_steps", "100", "--learning_rate", "1e4", "--warmup_ratio", "0.5",
                        "--max_grad_norm", "1e30", "--output_dir", out, "--progress", "false")
    assert result.returncode == 1
    message = result.stderr.strip()
    assert message.startswith("error: the ") and " loss is not finite at step " in message and len(message.splitlines()) == 1
    bad_step = int(message.split(" loss is not finite at step ")[1].split(";")[0])
    last = train_state.latest(out)
    assert last.name == f"step-{bad_step - 1:08d}" and last.name in message
    saved = train_state.read_part(last, "train")
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_output_dir_with_a_previous_run_needs_resume_or_overwrite(tiny_deberta, small_data, tmp_path):
    out = tmp_path / "twice"
    train(small_config(tiny_deberta, small_data, out, max_steps=2, eval_steps=2, save_steps=2))
    result = run_main("train.py", "--model_name_or_path", tiny_deberta, "--data_dir", small_data,
                        "--nli_train_glob", "KorNLI/*.train.ko.tsv", "--output_dir", out, "--progress", "false")
    assert result.returncode == 2
    assert "holds a previous run's state; pass --resume to continue it, --overwrite_output_dir" in result.stderr
    missing = run_main("train.py", "--model_name_or_path", tiny_deberta, "--data_dir", tmp_path / "nowhere",
                         "--output_dir", tmp_path / "x", "--progress", "false")
    assert missing.returncode == 2 and "git clone https://github.com/kakaobrain/kor-nlu-datasets" in missing.stderr


@pytest.mark.parametrize("task", ["nli", "sts"])
def test_single_task_recipes_train_and_evaluate(tiny_deberta, small_data, tmp_path, task):
    out = tmp_path / task
    summary = train(small_config(tiny_deberta, small_data, out, tasks=task, max_steps=0, num_epochs=1,
                                 eval_steps=1000, save_steps=1000, logging_steps=10))
    if task == "nli":
        triplets = nli_triplets(read_nli(small_data / "KorNLI" / "small.train.ko.tsv").pairs, seed=42)
        expected_steps = len(triplets) // 16  # full no-duplicate batches
    else:
        expected_steps = -(-len(read_sts(small_data / "KorSTS" / "sts-train.tsv")) // 8)  # last batch short
    assert summary["total_steps"] == expected_steps
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["task"] for r in rows if "task" in r} == {task}
    assert [r["step"] for r in rows if r.get("split") == "dev"] == [0, expected_steps]  # the start, the epoch end
    assert json.loads((out / "train_config.json").read_text())["tasks"] == task
    assert np.isfinite(summary["test"]["cosine_spearman"])


def test_a_bf16_step_feeds_the_losses_float32(tiny_deberta, small_data, monkeypatch):
    """Under bf16 autocast the encoder runs in bf16, but pooling hands the losses float32 and they stay in it."""
    from conftest import RecordOps

    import kfdeb.losses

    config = small_config(tiny_deberta, small_data, "unused")
    ctx = distributed.Context(0, 0, 1, torch.device("cpu"))
    encoder = load_encoder(tiny_deberta, max_seq_length=64)
    triplets = nli_triplets(read_nli(small_data / "KorNLI" / "small.train.ko.tsv").pairs, seed=0)[:16]
    pairs = read_sts(small_data / "KorSTS" / "sts-train.tsv")[:8]
    tasks = build_tasks(config, examples_in_memory({"nli": (triplets, None), "sts": (
        [(p.sentence1, p.sentence2) for p in pairs], np.array([p.label for p in pairs], dtype=np.float32))}), encoder, ctx)
    seen = {}

    def spy(name, loss_function):
        def wrapped(*tensors, **kwargs):
            with RecordOps() as ops:
                loss = loss_function(*tensors, **kwargs)
            seen[name] = ({t.dtype for t in tensors}, ops.floating_dtypes(), loss.dtype)
            return loss
        return wrapped

    monkeypatch.setattr(kfdeb.losses, "in_batch_negatives_loss", spy("nli", kfdeb.losses.in_batch_negatives_loss))
    monkeypatch.setattr(kfdeb.losses, "cosine_mse_loss", spy("sts", kfdeb.losses.cosine_mse_loss))
    with RecordOps() as step:
        for task in tasks:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = task_loss(encoder, task, task.rank_batch(list(range(8)), ctx), ctx, encoder.pad_id, 1)
            loss.backward()
    assert any(torch.bfloat16 in inputs for name, inputs, _ in step.calls if name == "addmm")  # the encoder: bf16
    for name in ("nli", "sts"):
        assert seen[name] == ({torch.float32}, {torch.float32}, torch.float32), name


def test_step_meter_reads_nothing_back_during_a_step(tiny_deberta, small_data, tmp_path):
    """add_loss / add_norm stay on the device: no read-back, no index tensor built from a Python list."""
    from conftest import RecordOps

    from kfdeb.loop import StepMeter
    from kfdeb.run import setup

    config = small_config(tiny_deberta, small_data, tmp_path / "meter")
    run = setup(config, distributed.Context(0, 0, 1, torch.device("cpu")))
    meter = StepMeter(run)
    loss, norm = torch.tensor(0.5), torch.tensor(2.0)
    with RecordOps() as ops:
        meter.add_loss(0, loss, step=1)
        meter.add_norm(0, norm)  # per_task
        meter.add_norm(None, norm)  # joint: every task
    forbidden = {"_local_scalar_dense", "lift_fresh", "index_put_", "_index_put_impl_"}
    assert not forbidden & set(ops.names()), ops.names()
    assert meter.norm_sums.tolist() == [4.0, 2.0] and meter.loss_sums.tolist() == [0.5, 0.0]


def test_the_same_run_twice_gives_the_same_losses_and_weights(small_data, tmp_path):
    """Fresh output dirs, the tiny model built inside each run, dropout on: bitwise equal results."""
    runs = [tmp_path / "first", tmp_path / "second"]
    for out in runs:
        train(small_config("kfdeb:tiny-deberta", small_data, out, max_steps=6, eval_steps=6, save_steps=6, logging_steps=1))
    first, second = runs
    assert json.loads((first / "init-tiny-deberta" / "config.json").read_text())["hidden_dropout_prob"] == 0.1
    for path in ("init-tiny-deberta/tokenizer.json", "init-tiny-deberta/model.safetensors", "best/model.safetensors"):
        assert (first / path).read_bytes() == (second / path).read_bytes(), path
    (_, first_rows), (_, second_rows) = final_state(first), final_state(second)
    losses = [r["loss"] for r in first_rows if "loss" in r]
    assert len(losses) == 12 and losses == [r["loss"] for r in second_rows if "loss" in r]  # every step, both objectives
    assert first_rows == second_rows  # learning rates, gradient norms, dev and test figures too


def test_a_single_full_matryoshka_width_trains_the_plain_model_bit_for_bit(tiny_deberta, small_data, tmp_path):
    """MRL at the model's own width (64) with weight 1 is the plain recipe: same losses, same weights."""
    plain = train(small_config(tiny_deberta, small_data, tmp_path / "plain", max_steps=4, eval_steps=4, save_steps=4,
                               logging_steps=1))
    mrl = train(small_config(tiny_deberta, small_data, tmp_path / "mrl", max_steps=4, eval_steps=4, save_steps=4,
                             logging_steps=1, matryoshka_dims="64"))
    (plain_state, plain_rows), (mrl_state, mrl_rows) = final_state(tmp_path / "plain"), final_state(tmp_path / "mrl")
    assert [r["loss"] for r in plain_rows if "loss" in r] == [r["loss"] for r in mrl_rows if "loss" in r]
    for name, tensor in plain_state["model"].items():
        assert torch.equal(mrl_state["model"][name], tensor), name
    assert mrl["test_by_dim"]["64"] == plain["test"]


def test_matryoshka_run_reports_every_width_and_selects_at_the_first(tiny_deberta, small_data, tmp_path, capsys):
    """Widths 32, 16, 8 of a 64-wide model with CoSENT: dev rows per width, the best step chosen on
    width 32, the card's per-width table; evaluate.py --dims, sentence-transformers' truncate_dim and
    encode(dim=) all give those widths' embeddings and figures."""
    from kfdeb.evaluation import best_score, evaluate_sts

    out = tmp_path / "mrl"
    summary = train(small_config(tiny_deberta, small_data, out, max_steps=9, eval_steps=3, save_steps=9,
                                 matryoshka_dims="32,16,8", matryoshka_weights="1,0.5,0.5", sts_loss="cosent"))
    assert "leaves out the model's own width 64" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dev = [r for r in rows if r.get("split") == "dev"]
    assert [(r["step"], r.get("dim")) for r in dev] == [(s, d) for s in (0, 3, 6, 9) for d in (None, 32, 16, 8)]
    at_32 = {r["step"]: r for r in dev if r.get("dim") == 32}
    for row in dev:
        if "score" in row:  # the selection score is width 32's max Spearman, not the full embedding's
            assert row["score"] == best_score(at_32[row["step"]], "max_spearman")
    assert summary["best_step"] == max(at_32, key=lambda step: best_score(at_32[step], "max_spearman"))
    metadata = json.loads((out / "best" / "kfdeb.json").read_text())
    assert metadata["test_by_dim"] == summary["test_by_dim"] and sorted(metadata["test_by_dim"]) == ["16", "32", "8"]
    card = (out / "best" / "README.md").read_text()
    assert "### Matryoshka widths" in card and "CoSENTLoss" in card and "MatryoshkaLoss" in card
    assert f"| mrl (test, 8 dims) | {summary['test_by_dim']['8']['cosine_pearson']:.2f} |" in card

    figures = tmp_path / "dims.json"
    result = run_script("evaluate.py", str(out), "--data_dir", str(small_data), "--dims", "32,8", "--json", str(figures))
    assert result.returncode == 0, result.stderr
    assert "| mrl (test, 32 dims) |" in result.stdout and "| mrl (test, 8 dims) |" in result.stdout
    by_dim = json.loads(figures.read_text())
    for dim in ("32", "8"):
        for key, value in summary["test_by_dim"][dim].items():
            assert by_dim[dim][key] == pytest.approx(value, abs=1e-4), (dim, key)

    import sentence_transformers as st
    from kfdeb.readers import read_sts
    reference = st.SentenceTransformer(str(out / "best"), device="cpu", truncate_dim=8)
    pairs = read_sts(small_data / "KorSTS" / "sts-test.tsv")
    for key, value in evaluate_sts(reference, pairs).figures.items():
        assert value == pytest.approx(by_dim["8"][key], abs=1e-3), key

    encoder = load_encoder(out)
    sentences = ["문장 하나", "두 번째 문장입니다"]
    full = encoder.encode(sentences, convert_to_numpy=True)
    np.testing.assert_array_equal(encoder.encode(sentences, dim=8, convert_to_numpy=True), full[:, :8])
    unit = encoder.encode(sentences, dim=8, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(unit, full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(reference.encode(sentences), full[:, :8], atol=1e-5)
    assert encoder.encode(sentences[0], truncate_dim=16).shape == (16,)


def test_a_reference_command_line_runs_and_resumes_in_its_prefixed_folder(tiny_deberta, small_data, tmp_path, capsys):
    """training_nli.py's flags (--batch_size, --output_prefix) as the reference scripts take them: the run goes to
    output_dir/kor_nli_<model id>, and the same command with --resume finds it again (no timestamp)."""
    from kfdeb.config import parse_args

    args = ["--preset", "nli", "--model_name_or_path", str(tiny_deberta), "--data_dir", str(small_data),
            "--nli_train_glob", "KorNLI/*.train.ko.tsv", "--batch_size", "16", "--max_seq_length", "64",
            "--output_dir", str(tmp_path), "--output_prefix", "kor_nli_", "--max_steps", "4", "--eval_steps", "2",
            "--save_steps", "2", "--learning_rate", "1e-4", "--progress", "false"]
    train(parse_args(args))
    folder = tmp_path / ("kor_nli_" + str(tiny_deberta).strip("/").replace("/", "-"))
    assert f"run folder (--output_prefix kor_nli_): {folder}" in capsys.readouterr().out
    assert (folder / "best" / "model.safetensors").is_file() and train_state.latest(folder).name == "step-00000004"
    assert json.loads((folder / "train_config.json").read_text())["nli_batch_size"] == 16
    first = json.loads((folder / "best" / "kfdeb.json").read_text())
    train(parse_args(args + ["--resume"]))
    assert f"resumed from {folder / 'state' / 'step-00000004'} at step 4" in capsys.readouterr().out
    # resumed with nothing left to train, the final kfdeb.json still says which step and config it is
    again = json.loads((folder / "best" / "kfdeb.json").read_text())
    assert sorted(again) == sorted(first) and again["step"] == first["step"] and again["config"]["nli_batch_size"] == 16


def test_xlm_r_trains_resumes_evaluates_and_exports(tiny_xlmr, small_data, tmp_path, monkeypatch):
    """The e5 architecture end to end (XLM-R: <pad> = 1, positions from padding_idx + 1, e5's prompts): a run
    stopped at step 4 and resumed ends as the uninterrupted one, bit for bit; the best model keeps the prompts,
    evaluates as evaluate.py does and exports to a graph that agrees with PyTorch."""
    from kfdeb.errors import TrainingStopped
    from kfdeb.retrieval import evaluate_retrieval
    from kfdeb.ir_data import read_ir_data

    settings = dict(max_steps=6, eval_steps=3, save_steps=6, logging_steps=1, ir_dev_data="kfdeb:korsts-dev",
                    nli_batch_size=8)
    straight = train(small_config(tiny_xlmr, small_data, tmp_path / "straight", **settings))
    sigterm_during_step(monkeypatch, 4)  # one process: it stops at the end of that step
    with pytest.raises(TrainingStopped, match="at step 4 of 6"):
        train(small_config(tiny_xlmr, small_data, tmp_path / "stopped", **settings))
    monkeypatch.undo()
    resumed = train(small_config(tiny_xlmr, small_data, tmp_path / "stopped", **settings, resume=True))
    assert resumed["test"] == straight["test"] and resumed["dev"]["ndcg@10"] == straight["dev"]["ndcg@10"]
    for name, tensor in train_state.read_part(train_state.latest(tmp_path / "straight"), "train")["model"].items():
        assert torch.equal(train_state.read_part(train_state.latest(tmp_path / "stopped"), "train")["model"][name],
                           tensor), name
    best = tmp_path / "straight" / "best"
    model = load_encoder(best)
    assert model.prompts == {"query": "query: ", "document": "passage: "} and model.pad_id == 1 and model.normalize
    direct = evaluate_retrieval(model, read_ir_data("kfdeb:korsts-dev", "dev"))
    assert direct.figures["ndcg@10"] == pytest.approx(straight["dev"]["ndcg@10"], abs=1e-6)
    result = run_main("export.py", best)
    assert result.returncode == 0, result.stderr
    import kfdeb

    graph = kfdeb.load(best / "onnx" / "model.onnx")
    sentences = ["한 남자가 플루트를 연주한다.", "고양이가 잔다. " * 30]
    np.testing.assert_allclose(graph.encode_query(sentences, convert_to_numpy=True),
                               model.encode_query(sentences, convert_to_numpy=True), rtol=0, atol=1e-5)
