"""Data parallelism (gloo on CPU, loopback only): N ranks learn what one process learns."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launch import ENV, assert_same_training, free_port, losses_and_weights, start, torchrun, train_args, wait_all
from kfdeb import train_state
from kfdeb.losses import cosine_mse_loss, in_batch_negatives_loss


def join_group(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", WORLD_SIZE=str(world),
                      RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def leave() -> None:
    """End a worker as kfdeb's torchrun workers end (cli.exit_process): without the interpreter teardown,
    where a process-group thread still holding a finished collective's tensors aborts the process."""
    from kfdeb.cli import exit_process

    exit_process(0)


def _gathered_loss_worker(rank: int, world: int, port: int, inputs: dict, results: dict) -> None:
    join_group(rank, world, port)
    try:
        b = inputs["anchors"].shape[0] // world
        local = {k: v[..., rank * b:(rank + 1) * b, :].clone().requires_grad_() for k, v in inputs.items()
                 if k not in ("labels", "keys", "guide")}
        nli = in_batch_negatives_loss(local["anchors"], local["positives"], local["negatives"])
        sts = cosine_mse_loss(local["anchors"], local["positives"], inputs["labels"][rank * b:(rank + 1) * b],
                              global_batch_size=inputs["anchors"].shape[0])
        tuples = in_batch_negatives_loss(local["anchors"], local["positives"], local["tuple_negatives"])
        levers = in_batch_levers(local["anchors"], local["positives"], local["negatives"],
                                 inputs["guide"][:, rank * b:(rank + 1) * b], inputs["keys"])
        (nli + sts + tuples + levers).backward()
        results[rank] = {"loss": (nli + sts + tuples + levers).item(), **{k: v.grad for k, v in local.items()}}
    finally:
        dist.destroy_process_group()
    leave()


def in_batch_levers(anchors, positives, negatives, guide, keys):
    """--scale, mnrl_symmetric and gist (guide-masked, both contrast blocks, a margin), each with the masks of
    shared positives, summed: the gathers of every one of them must make W ranks one process."""
    from kfdeb.losses import Objective, nli_loss

    columns = torch.stack([anchors, positives, negatives])
    return sum(nli_loss(columns, Objective(**options), keys, guide) for options in (
        {"scale": 50.0}, {"nli_loss": "mnrl_symmetric"}, {"nli_loss": "gist", "gist_margin": 0.05}))


def test_gathered_losses_equal_the_single_process_loss_and_gradients():
    generator = torch.Generator().manual_seed(0)
    inputs = {k: torch.randn(8, 6, dtype=torch.float64, generator=generator) for k in ("anchors", "positives", "negatives")}
    inputs["labels"] = torch.rand(8, dtype=torch.float64, generator=generator)
    inputs["tuple_negatives"] = torch.randn(3, 8, 6, dtype=torch.float64, generator=generator)  # n-tuples, n = 3
    inputs["positives"][6] = inputs["positives"][1]  # rows 1 (rank 0) and 6 (rank 1) share a positive text
    inputs["keys"] = torch.tensor([list(range(8)), [10, 11, 12, 13, 14, 15, 11, 17], list(range(20, 28))])
    inputs["guide"] = torch.stack([inputs[k] for k in ("anchors", "positives", "negatives")]) \
        + 0.5 * torch.randn(3, 8, 6, dtype=torch.float64, generator=generator)
    single = {k: v.clone().requires_grad_() for k, v in inputs.items() if k not in ("labels", "keys", "guide")}
    loss = in_batch_negatives_loss(single["anchors"], single["positives"], single["negatives"]) + \
        cosine_mse_loss(single["anchors"], single["positives"], inputs["labels"]) + \
        in_batch_negatives_loss(single["anchors"], single["positives"], single["tuple_negatives"]) + \
        in_batch_levers(single["anchors"], single["positives"], single["negatives"], inputs["guide"], inputs["keys"])
    loss.backward()
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_gathered_loss_worker, args=(world, free_port(), inputs, results), nprocs=world,
                           start_method="spawn")
        results = dict(results)
    # each rank's loss is its share: their mean is the global loss
    assert sum(r["loss"] for r in results.values()) / world == pytest.approx(loss.item(), abs=1e-12)
    for rank, result in results.items():
        for name in ("anchors", "positives", "negatives", "tuple_negatives"):
            # the rank's input gradient is W x the single-process one; DDP's averaging divides it back
            expected = single[name].grad[..., rank * 4:(rank + 1) * 4, :]
            torch.testing.assert_close(result[name] / world, expected, rtol=0, atol=1e-12, msg=f"rank {rank} {name}")


def _sts_objectives_worker(rank: int, world: int, port: int, inputs: dict, results: dict) -> None:
    from kfdeb.batching import shard
    from kfdeb.losses import sts_loss

    join_group(rank, world, port)
    try:
        for key, (objective, size) in inputs["cases"].items():
            batch = list(range(size))
            local = shard(batch, rank, world)
            placeholder = not local
            rows = batch[:1] if placeholder else local
            columns = inputs["columns"][:, rows].clone().requires_grad_()
            loss = sts_loss(columns, inputs["labels"][rows], size, objective, placeholder)
            loss.backward()
            results[(rank, key)] = {"loss": loss.item(), "rows": [] if placeholder else rows, "grad": columns.grad}
    finally:
        dist.destroy_process_group()
    leave()


def test_sts_objectives_over_two_ranks_equal_the_single_process():
    """CoSENT and AnglE compare the pairs of the whole global batch (gathered), also with shards of
    3 + 2 pairs and with a rank whose shard is empty (a placeholder pair that counts for nothing);
    Matryoshka on top. The logged loss (mean over ranks) and the input gradients (x W, then DDP's
    average) are the single process's."""
    from kfdeb.losses import sts_loss
    from kfdeb.losses import Objective

    generator = torch.Generator().manual_seed(1)
    columns = torch.randn(2, 8, 6, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 6, (8,), generator=generator).double() / 5
    mrl = {"matryoshka_dims": (6, 4, 2), "matryoshka_weights": (1.0, 0.5, 0.25)}
    cases = {f"{loss}-{'mrl' if dims else 'full'}-{size}": (Objective(loss, **(mrl if dims else {})), size)
             for loss in ("cosine", "cosent", "angle") for dims in (False, True) for size in (8, 5, 1)}
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_sts_objectives_worker, args=(world, free_port(), {"cases": cases, "columns": columns,
                                                                             "labels": labels}, results),
                           nprocs=world, start_method="spawn")
        results = dict(results)
    for key, (objective, size) in cases.items():
        single = columns[:, :size].clone().requires_grad_()
        loss = sts_loss(single, labels[:size], size, objective)
        loss.backward()
        assert sum(results[(rank, key)]["loss"] for rank in range(world)) / world == pytest.approx(loss.item(), abs=1e-12), key
        for rank in range(world):
            result = results[(rank, key)]
            if result["rows"]:
                torch.testing.assert_close(result["grad"] / world, single.grad[:, result["rows"]], rtol=0, atol=1e-12,
                                           msg=f"{key} rank {rank}")
            else:  # the placeholder pair: no gradient at all
                assert not result["grad"].any(), key


MATRYOSHKA_COSENT = ["--matryoshka_dims", "64,16", "--matryoshka_weights", "1,0.5", "--sts_loss", "cosent",
                     # and the in-batch levers, with GradCache: GIST guided by a frozen copy of the starting weights
                     "--nli_loss", "gist", "--guide_model", "self", "--scale", "50", "--nli_mini_batch_size", "3"]


def two_ranks(model, data, out: Path, log_dir: Path, *extra: str) -> str:
    """train_args' run on one torchrun agent with two ranks; its stdout."""
    [(status, stdout, stderr)] = wait_all([start(torchrun(*train_args(model, data, out, *extra)))], log_dir)
    assert status == 0, stderr[-3000:]
    return stdout


@pytest.fixture(scope="module")
def two_rank_run(tiny_deberta, ddp_data, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("two-ranks") / "out"
    return out, two_ranks(tiny_deberta, ddp_data, out, out.parent)


@pytest.mark.parametrize("extra", [[], ["--nli_mini_batch_size", "3"], MATRYOSHKA_COSENT],
                         ids=["plain", "gradcache", "matryoshka-cosent-gist"])
def test_two_ranks_give_the_single_process_losses_and_weights(tiny_deberta, ddp_data, single_process_run, two_rank_run,
                                                              tmp_path, extra):
    """With GradCache each rank embeds its 8 triplets 3, 3, 2 at a time; with Matryoshka + CoSENT both
    objectives gather across ranks at every width, GIST its guide's embeddings too: still the single process's
    run."""
    reference = single_process_run
    if not extra:
        out, stdout = two_rank_run
        assert "2 process(es)" in stdout and stdout.count("best model (step") == 1  # rank 0 talks
        assert_same_training(reference, out)
        return
    if extra == MATRYOSHKA_COSENT:
        reference = tmp_path / "single"
        single = subprocess.run([sys.executable, *train_args(tiny_deberta, ddp_data, reference, *extra)],
                                capture_output=True, text=True, timeout=300, env=ENV)
        assert single.returncode == 0, single.stderr[-3000:]
    out = tmp_path / "ddp"
    stdout = two_ranks(tiny_deberta, ddp_data, out, tmp_path, *extra)
    assert "2 process(es)" in stdout and stdout.count("best model (step") == 1  # rank 0 talks
    assert_same_training(reference, out)


def test_sigterm_to_torchrun_stops_both_ranks_one_step_later_and_resume_gives_the_uninterrupted_run(
        tiny_deberta, ddp_data, tmp_path):
    """--logging_steps 1000 (longer than the run), SIGTERM to the torchrun agent while both ranks are in step 3:
    the agent forwards it, the ranks agree to stop at the end of step 4 at the latest (their flags are exchanged
    one step late, with no sync added to the steps), not at a log line; rank 0 saves, both exit 143; the same
    command with --resume ends as the uninterrupted two-rank run, bit for bit."""
    # and the hard negatives re-mined before steps 3, 5, ... (remine.py): rank 0 mines, both ranks take its columns
    extra = ("--logging_steps", "1000", "--save_steps", "1000", "--eval_steps", "1000", "--remine_every", "2")
    straight = tmp_path / "straight"
    assert two_ranks(tiny_deberta, ddp_data, straight, tmp_path / "straight-logs", *extra).count(
        "hard negatives re-mined") == 5  # before steps 3, 5, 7, 9, 11 of 12, said once (rank 0)
    out = tmp_path / "terminated"
    agent = start(torchrun(str(Path(__file__).parent / "pause_for_sigterm.py"), "3",
                           *train_args(tiny_deberta, ddp_data, out, *extra)))
    paused, seen = 0, []
    for line in agent.stdout:  # both ranks' lines come through the agent
        seen.append(line)
        paused += line.startswith("paused in step 3")
        if paused == 2:
            break
    assert paused == 2, f"the run ended before both ranks paused in step 3; its stdout:\n{''.join(seen)}"
    agent.send_signal(signal.SIGTERM)
    [(status, stdout, stderr)] = wait_all([agent], tmp_path / "terminated-logs")
    assert status != 0 and stdout.count("exit status 143") == 2  # the agent's own status: 1, after its SIGTERM
    step = int(train_state.latest(out).name.split("-")[1])
    assert 3 <= step <= 4  # within one step of the step the signal arrived in
    logged = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert step not in logged  # not a log line: each rank's open window is in the state
    assert stderr.count("error: stopped by SIGTERM") == 1  # rank 0 says it, once
    assert f"error: stopped by SIGTERM at step {step} of 12: the training state is saved in {out}/state/" \
           f"step-{step:08d}; continue with (under torchrun: the same torchrun command): python " in stderr
    stdout = two_ranks(tiny_deberta, ddp_data, out, tmp_path / "resumed-logs", *extra, "--resume")
    assert f"resumed from {out}/state/step-{step:08d} at step {step}" in stdout
    expected_losses, expected_weights = losses_and_weights(straight)
    losses, weights = losses_and_weights(out)
    assert losses == expected_losses and len(losses) >= 2
    for name, tensor in expected_weights.items():
        assert torch.equal(weights[name], tensor), name


def _any_rank_flag_worker(rank: int, world: int, port: int, results: dict) -> None:
    from kfdeb import distributed

    join_group(rank, world, port)
    try:
        flag = distributed.AnyRankFlag(distributed.Context(rank, rank, world, torch.device("cpu")))
        # rank 1 alone raises the flag at its third exchange (and keeps it raised, as a SIGTERM handler leaves it)
        seen = []
        for exchange in range(1, 7):  # as the loop: an exchange at each step's end, until the ranks agree to stop
            seen.append(flag.exchange(rank == 1 and exchange >= 3))
            if seen[-1]:
                break
        flag.close()
        results[rank] = seen
    finally:
        dist.destroy_process_group()
    leave()


def test_a_flag_raised_on_one_rank_reaches_every_rank_at_the_next_exchange():
    """What makes the ranks stop at the same step after a SIGTERM that reached one of them (loop.py)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_any_rank_flag_worker, args=(2, free_port(), results), nprocs=2, start_method="spawn")
        results = dict(results)
    assert results[0] == results[1] == [False, False, False, True]  # seen by both at the fourth exchange


def _nan_agreement_worker(rank: int, world: int, port: int, results: dict) -> None:
    from types import SimpleNamespace

    from kfdeb import distributed
    from kfdeb.loop import StepMeter

    join_group(rank, world, port)
    try:
        ctx = distributed.Context(rank, rank, world, torch.device("cpu"))
        tasks = [SimpleNamespace(name="nli", batch_size=4), SimpleNamespace(name="sts", batch_size=4)]
        run = SimpleNamespace(ctx=ctx, parts=SimpleNamespace(tasks=tasks), output_dir=Path("out"))
        meter = StepMeter(run)
        meter.add_loss(0, torch.tensor(1.0), step=7)
        # only rank 1's STS shard goes non-finite, at step 8
        meter.add_loss(1, torch.tensor(float("nan") if rank == 1 else 1.0), step=8)
        try:
            meter.flush(8, None, last_saved_step=6)
            results[rank] = "no error"
        except FloatingPointError as err:
            results[rank] = str(err)
    finally:
        dist.destroy_process_group()
    leave()


def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_the_same_message():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_nan_agreement_worker, args=(2, free_port(), results), nprocs=2, start_method="spawn")
        results = dict(results)
    assert results[0] == results[1]
    assert results[0].startswith("the sts loss is not finite at step 8; training stopped and the last good state "
                                 "(step-00000006) stays in out/state")
