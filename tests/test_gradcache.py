"""GradCache (kfdeb/gradcache.py): the cached step's gradient is the full-batch gradient of the same masks."""

from __future__ import annotations

import json

import pytest
import torch

from kfdeb import distributed, train_state
from kfdeb.config import resolve
from kfdeb.loop import cached_nli_backward, embed_columns, train
from kfdeb.losses import in_batch_negatives_loss
from kfdeb.run import setup


def nli_run(model, data, out, **overrides):
    values = {"model_name_or_path": str(model), "data_dir": str(data), "nli_train_glob": "KorNLI/*.train.ko.tsv",
              "tasks": "nli", "nli_batch_size": 16, "max_seq_length": 64, "output_dir": str(out), "progress": False}
    return setup(resolve({**values, **overrides}), distributed.Context(0, 0, 1, torch.device("cpu")))


@pytest.mark.parametrize("mini_batch_size", [5, 16])  # 5, 5, 5, 1: the last mini-batch smaller; 16: one
def test_cached_gradient_equals_the_full_batch_gradient_under_the_same_dropout_masks(
        tiny_deberta_dropout, small_data, tmp_path, mini_batch_size):
    run = nli_run(tiny_deberta_dropout, small_data, tmp_path / "run")
    run.parts.encoder.double()  # float64: the two computations agree to summation order, ~1e-12
    run.parts.encoder.train()
    task = run.parts.tasks[0]
    indices = task.sampler.next_batch()
    batch = task.rank_batch(indices, run.ctx)
    parameters = [p for p in run.parts.encoder.parameters() if p.requires_grad]

    torch.manual_seed(7)
    cached_loss = cached_nli_backward(run, task, batch, mini_batch_size)
    cached = [p.grad.clone() for p in parameters]
    after_cached = torch.get_rng_state()
    run.parts.encoder.zero_grad(set_to_none=True)

    # the reference: one autograd graph over the whole batch, each mini-batch embedded from the
    # random state the cached step started it with (the same order of draws from the same seed)
    torch.manual_seed(7)
    rows = task.rows[indices]
    columns = torch.cat([embed_columns(run.parts.encoder, task, rows[start:start + mini_batch_size], run.ctx, run.parts.encoder.pad_id, 1)
                         for start in range(0, len(rows), mini_batch_size)], dim=1)
    full_loss = in_batch_negatives_loss(columns[0], columns[1], columns[2])
    full_loss.backward()
    assert torch.equal(torch.get_rng_state(), after_cached)  # the generator goes on as after one embedding

    assert cached_loss.item() == pytest.approx(full_loss.item(), abs=1e-12)
    assert any(g.abs().max() > 0 for g in cached)
    for param, grad in zip(parameters, cached):
        torch.testing.assert_close(grad, param.grad, rtol=0, atol=1e-10)

    # the masks matter: another draw gives another gradient, so the equality above is not trivial
    run.parts.encoder.zero_grad(set_to_none=True)
    torch.manual_seed(8)
    cached_nli_backward(run, task, batch, mini_batch_size)
    assert max((p.grad - g).abs().max().item() for p, g in zip(parameters, cached)) > 1e-6


def test_a_short_run_with_gradcache_ends_with_the_same_losses_and_weights(tiny_deberta, small_data, tmp_path,
                                                                          monkeypatch):
    """Dropout 0, both objectives, per-task AdamW, 6 steps: GradCache changes memory, not results.

    In float64: in float32 the two runs differ by summation order (~1e-7), and Adam turns that
    into steps of ~lr on gradient entries near its eps, which would hide what is compared here.
    """
    import kfdeb.run
    import kfdeb.run_evaluation

    load_encoder = kfdeb.run.load_encoder
    for module in (kfdeb.run, kfdeb.run_evaluation):  # the start model, and the best one read back at the end
        monkeypatch.setattr(module, "load_encoder", lambda *args, **kwargs: load_encoder(*args, **kwargs).double())
    results = []
    for name, mini in (("plain", 0), ("cached", 3)):
        out = tmp_path / name
        values = {"model_name_or_path": str(tiny_deberta), "data_dir": str(small_data),
                  "nli_train_glob": "KorNLI/*.train.ko.tsv", "nli_batch_size": 16, "sts_batch_size": 8,
                  "max_seq_length": 64, "max_steps": 6, "eval_steps": 6, "save_steps": 6, "logging_steps": 1,
                  "learning_rate": 1e-4, "output_dir": str(out), "progress": False, "nli_mini_batch_size": mini}
        summary = train(resolve(values))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        results.append(({(r["step"], r["task"]): (r["loss"], r["grad_norm"]) for r in rows if "task" in r},
                        train_state.read_part(train_state.latest(out), "train")["model"], summary))
    (plain_log, plain_weights, plain), (cached_log, cached_weights, cached) = results
    assert plain_log.keys() == cached_log.keys() and len(plain_log) == 12
    for key, (loss, grad_norm) in plain_log.items():
        assert cached_log[key][0] == pytest.approx(loss, rel=1e-6), key  # logged through float32 sums
        assert cached_log[key][1] == pytest.approx(grad_norm, rel=1e-6), key
    for name, tensor in plain_weights.items():
        assert tensor.dtype == torch.float64
        torch.testing.assert_close(cached_weights[name], tensor, rtol=0, atol=1e-9, msg=name)
    assert cached["test"]["cosine_spearman"] == pytest.approx(plain["test"]["cosine_spearman"], abs=1e-6)


def test_under_fp16_autocast_the_grad_scaler_reaches_the_cached_gradient(tiny_deberta, small_data, tmp_path):
    """fp16 + GradScaler: the cached step's gradients carry the loss scale exactly as the plain step's do."""
    from kfdeb.loop import task_loss

    run = nli_run(tiny_deberta, small_data, tmp_path / "fp16", amp="fp16", nli_batch_size=8)
    assert run.parts.scaler is not None and run.parts.scaler.get_scale() == 65536.0
    task = run.parts.tasks[0]
    indices = task.sampler.next_batch()
    batch = task.rank_batch(indices, run.ctx)
    parameters = [p for p in run.parts.encoder.parameters() if p.requires_grad]
    cached_loss = cached_nli_backward(run, task, batch, 3)
    cached = torch.cat([p.grad.flatten() for p in parameters])
    run.parts.encoder.zero_grad(set_to_none=True)
    with run.autocast():
        plain_loss = task_loss(run.parts.model, task, batch, run.ctx, run.parts.encoder.pad_id, 1)
    run.backward(plain_loss)
    plain = torch.cat([p.grad.flatten() for p in parameters])
    assert cached_loss.item() == pytest.approx(plain_loss.item(), rel=1e-2)  # fp16 encoders, other groupings
    assert plain.norm() > 1.0  # scaled by 65536: the true gradient norm of this loss is far below 1
    assert (cached - plain).norm() / plain.norm() < 0.02


@pytest.mark.parametrize("overrides", [{"nli_loss": "mnrl_symmetric", "scale": 50.0},
                                       {"nli_loss": "gist", "guide_model": "self", "gist_margin": 0.01}])
def test_cached_gradient_of_the_levers_equals_the_plain_step(tiny_deberta, small_data, tmp_path, monkeypatch, overrides):
    """mnrl_symmetric and gist (guide: a frozen copy of the starting weights) under GradCache: the plain step's loss
    and gradient, float64 (dropout 0); the guide embeds each text of the batch once, without gradient."""
    import kfdeb.run
    from kfdeb.loop import task_loss

    load_encoder = kfdeb.run.load_encoder
    monkeypatch.setattr(kfdeb.run, "load_encoder", lambda *args, **kwargs: load_encoder(*args, **kwargs).double())
    run = nli_run(tiny_deberta, small_data, tmp_path / "run", **overrides)
    task = run.parts.tasks[0]
    indices = task.sampler.next_batch()
    batch = task.rank_batch(indices, run.ctx)
    with torch.no_grad():  # the run has moved away from its start: the guide must still be the starting weights
        for parameter in run.parts.encoder.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    embedded = []
    if run.parts.guide is not None:
        assert not run.parts.guide.training and not any(p.requires_grad for p in run.parts.guide.parameters())
        forward = run.parts.guide.forward
        monkeypatch.setattr(run.parts.guide, "forward", lambda ids, masks: embedded.append(  # a call per length group
            sum(len(i) for i in ids) if isinstance(ids, list) else 0) or forward(ids, masks))
    parameters = [p for p in run.parts.encoder.parameters() if p.requires_grad]
    cached_loss = cached_nli_backward(run, task, batch, 5)
    cached = [p.grad.clone() for p in parameters]
    if run.parts.guide is not None:
        assert sum(embedded) == 3 * batch.size  # anchors, positives, negatives: each once
        starting = load_encoder(tiny_deberta).double().state_dict()
        for name, tensor in run.parts.guide.state_dict().items():
            assert torch.equal(tensor, starting[name]), name
    run.parts.encoder.zero_grad(set_to_none=True)
    plain_loss = task_loss(run.parts.model, task, batch, run.ctx, run.parts.encoder.pad_id, 1, run.objective,
                           run.parts.guide)
    plain_loss.backward()
    assert cached_loss.item() == pytest.approx(plain_loss.item(), abs=1e-12)
    for param, grad in zip(parameters, cached):
        torch.testing.assert_close(grad, param.grad, rtol=0, atol=1e-10)
    # the lever changed the loss: the plain mnrl of the same batch is another figure
    assert plain_loss.item() != pytest.approx(
        task_loss(run.parts.model, task, batch, run.ctx, run.parts.encoder.pad_id, 1).item(), rel=1e-4)
