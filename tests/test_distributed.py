"""Data parallelism (gloo on CPU, loopback only): N ranks learn what one process learns."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import REPO
from launch import ENV, descendants, free_port, kill_trees, start, torchrun, wait_all
from kfdeb import checkpoint
from kfdeb.losses import cosine_mse_loss, in_batch_negatives_loss

def _gathered_loss_worker(rank: int, world: int, port: int, inputs: dict, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = inputs["anchors"].shape[0] // world
        local = {k: v[rank * b:(rank + 1) * b].clone().requires_grad_() for k, v in inputs.items() if k != "labels"}
        nli = in_batch_negatives_loss(local["anchors"], local["positives"], local["negatives"])
        sts = cosine_mse_loss(local["anchors"], local["positives"], inputs["labels"][rank * b:(rank + 1) * b],
                              global_batch_size=inputs["anchors"].shape[0])
        (nli + sts).backward()
        results[rank] = {"loss": (nli + sts).item(), **{k: v.grad for k, v in local.items()}}
    finally:
        dist.destroy_process_group()


def test_gathered_losses_equal_the_single_process_loss_and_gradients():
    generator = torch.Generator().manual_seed(0)
    inputs = {k: torch.randn(8, 6, dtype=torch.float64, generator=generator) for k in ("anchors", "positives", "negatives")}
    inputs["labels"] = torch.rand(8, dtype=torch.float64, generator=generator)
    single = {k: v.clone().requires_grad_() for k, v in inputs.items() if k != "labels"}
    loss = in_batch_negatives_loss(single["anchors"], single["positives"], single["negatives"]) + \
        cosine_mse_loss(single["anchors"], single["positives"], inputs["labels"])
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
        for name in ("anchors", "positives", "negatives"):
            # the rank's input gradient is W x the single-process one; DDP's averaging divides it back
            expected = single[name].grad[rank * 4:(rank + 1) * 4]
            torch.testing.assert_close(result[name] / world, expected, rtol=0, atol=1e-12, msg=f"rank {rank} {name}")


def _sts_objectives_worker(rank: int, world: int, port: int, inputs: dict, results: dict) -> None:
    from kfdeb.data import shard
    from kfdeb.loop import sts_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
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


def test_sts_objectives_over_two_ranks_equal_the_single_process():
    """CoSENT and AnglE compare the pairs of the whole global batch (gathered), also with shards of
    3 + 2 pairs and with a rank whose shard is empty (a placeholder pair that counts for nothing);
    Matryoshka on top. The logged loss (mean over ranks) and the input gradients (x W, then DDP's
    average) are the single process's."""
    from kfdeb.loop import sts_loss
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


@pytest.fixture(scope="module")
def ddp_data(distinct_sts_data, tmp_path_factory) -> Path:
    """distinct_sts_data (no pair of identical sentences: see there) with a 21-pair STS train:
    batches of 4 end in a 1-pair batch that one of two ranks lacks."""
    root = tmp_path_factory.mktemp("ddp-data") / "data"
    shutil.copytree(distinct_sts_data, root)
    sts_train = root / "KorSTS" / "sts-train.tsv"
    sts_train.write_text("".join(sts_train.read_text(encoding="utf-8").splitlines(keepends=True)[:22]), encoding="utf-8")
    return root


def train_args(model, data, out, *extra) -> list[str]:
    return [str(REPO / "train.py"), "--model_name_or_path", str(model), "--data_dir", str(data),
            "--nli_train_glob", "KorNLI/*.train.ko.tsv", "--nli_batch_size", "16", "--sts_batch_size", "4",
            "--max_seq_length", "64", "--max_steps", "12", "--eval_steps", "4", "--save_steps", "4",
            "--logging_steps", "1", "--learning_rate", "1e-4", "--device", "cpu", "--output_dir", str(out),
            "--progress", "false", *extra]


def losses_and_weights(out: Path):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {(r["step"], r["task"]): (r["loss"], r["grad_norm"]) for r in rows if "task" in r}
    return losses, checkpoint.read_part(checkpoint.latest(out), "train")["model"]


def assert_same_training(reference: Path, other: Path) -> None:
    expected_losses, expected_weights = losses_and_weights(reference)
    losses, weights = losses_and_weights(other)
    assert sorted(losses) == sorted(expected_losses) and len(losses) == 24  # 12 steps x (NLI, STS)
    for key, (loss, grad_norm) in expected_losses.items():
        assert losses[key][0] == pytest.approx(loss, abs=1e-5), key
        # Adam's step does not see a gradient's scale; the clipped norm does: a mis-scaled DDP loss shows here
        assert losses[key][1] == pytest.approx(grad_norm, rel=1e-4), key
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def single_process_run(tiny_deberta, ddp_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "out"
    result = subprocess.run([sys.executable, *train_args(tiny_deberta, ddp_data, out)], capture_output=True,
                            text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr
    return out


MATRYOSHKA_COSENT = ["--matryoshka_dims", "64,16", "--matryoshka_weights", "1,0.5", "--sts_loss", "cosent"]


@pytest.mark.parametrize("extra", [[], ["--nli_mini_batch_size", "3"], MATRYOSHKA_COSENT],
                         ids=["plain", "gradcache", "matryoshka-cosent"])
def test_two_ranks_give_the_single_process_losses_and_weights(tiny_deberta, ddp_data, single_process_run, tmp_path,
                                                              extra):
    """With GradCache each rank embeds its 8 triplets 3, 3, 2 at a time; with Matryoshka + CoSENT both
    objectives gather across ranks at every width: still the single process's run."""
    reference = single_process_run
    if extra == MATRYOSHKA_COSENT:
        reference = tmp_path / "single"
        single = subprocess.run([sys.executable, *train_args(tiny_deberta, ddp_data, reference, *extra)],
                                capture_output=True, text=True, timeout=300, env=ENV)
        assert single.returncode == 0, single.stderr[-3000:]
    out = tmp_path / "ddp"
    [(status, stdout, stderr)] = wait_all([start(torchrun(*train_args(tiny_deberta, ddp_data, out, *extra)))], tmp_path)
    assert status == 0, stderr[-3000:]
    assert "2 process(es)" in stdout and stdout.count("best model (step") == 1  # rank 0 talks
    assert_same_training(reference, out)


def two_nodes(outputs: list[Path], *extra: str, model, data, port: int | None = None) -> list[subprocess.Popen]:
    """Two torchrun agents on 127.0.0.1 (one rank each), each with its own --output_dir, as on two
    machines that share no disk: node 0's folder gets the run, node 1's is never written."""
    port = port or free_port()
    return [start(torchrun(*train_args(model, data, out, *extra), nproc=1, nnodes=2, node_rank=rank, port=port))
            for rank, out in enumerate(outputs)]


def test_two_nodes_without_a_shared_disk_match_the_single_process(tiny_deberta, ddp_data, single_process_run, tmp_path):
    outputs = [tmp_path / "node0", tmp_path / "node1"]
    for status, _, stderr in wait_all(two_nodes(outputs, model=tiny_deberta, data=ddp_data), tmp_path):
        assert status == 0, stderr[-3000:]
    assert_same_training(single_process_run, outputs[0])
    assert (outputs[0] / "best" / "model.safetensors").exists()
    assert not outputs[1].exists()  # rank 0 alone writes; the final evaluation read nothing on node 1
    # each rank its own dropout stream (seed + rank), both saved; the data order is global
    ranks = [checkpoint.read_part(checkpoint.latest(outputs[0]), f"rank-{r}")["torch"] for r in (0, 1)]
    assert not torch.equal(ranks[0], ranks[1])


def test_a_killed_rank_ends_the_job_within_a_minute(tiny_deberta, ddp_data, tmp_path):
    out = tmp_path / "killed"
    launcher = subprocess.Popen(torchrun(*train_args(tiny_deberta, ddp_data, out, "--max_steps", "100000",
                                                      "--eval_steps", "100000", "--save_steps", "100000")),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and launcher.poll() is None:  # wait until both ranks are training
        metrics = out / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count("\n") >= 4:
            break
        time.sleep(0.2)
    workers = descendants(launcher.pid)
    assert launcher.poll() is None and len(workers) == 2
    os.kill(max(workers), signal.SIGKILL)  # one rank dies, as on an OOM kill
    killed_at = time.time()
    launcher.wait(timeout=90)
    assert launcher.returncode != 0
    assert time.time() - killed_at < 60
    for pid in workers:  # no orphan left behind
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]


def test_two_nodes_killed_mid_save_resume_to_the_single_process_result(tiny_deberta, ddp_data, single_process_run,
                                                                       tmp_path):
    """Both nodes SIGKILLed mid-run, a save left half-written, then `--resume` on both: the run ends
    where one process ends, with rank 0's disk alone holding the state."""
    outputs = [tmp_path / "node0", tmp_path / "node1"]
    nodes = two_nodes(outputs, model=tiny_deberta, data=ddp_data)
    deadline = time.time() + 120
    while time.time() < deadline and all(node.poll() is None for node in nodes):
        state = checkpoint.latest(outputs[0])
        if state is not None and int(state.name.split("-")[1]) >= 4:
            # the ranks and their agents at once, as a lost cluster (torchrun starts each rank
            # in a session of its own, so killing the agent's process group would leave them running)
            kill_trees(nodes)
            break
        time.sleep(0.01)
    for status, _, _ in wait_all(nodes, tmp_path / "killed", timeout=60):
        assert status == -signal.SIGKILL
    saved_at = int(checkpoint.latest(outputs[0]).name.split("-")[1])
    assert saved_at < 12
    # what a kill during the next save leaves: a scratch folder of the step the resumed run saves again
    stray = outputs[0] / "state" / f"step-{saved_at + 4:08d}.tmp-killed"
    stray.mkdir()
    (stray / "train.safetensors").write_bytes(b"half a file")

    # without --resume, rank 0's refusal reaches both nodes at once (no wait for a timeout)
    refused = wait_all(two_nodes(outputs, model=tiny_deberta, data=ddp_data), tmp_path / "refused", timeout=120)
    for status, _, stderr in refused:
        assert status != 0 and "holds a previous run's state; pass --resume" in stderr

    resumed = wait_all(two_nodes(outputs, "--resume", model=tiny_deberta, data=ddp_data), tmp_path / "resumed")
    for status, _, stderr in resumed:
        assert status == 0, stderr[-3000:]
    assert "resumed from" in resumed[0][1]
    assert not stray.exists()
    assert_same_training(single_process_run, outputs[0])
    assert not outputs[1].exists()


def _nan_agreement_worker(rank: int, world: int, port: int, results: dict) -> None:
    from types import SimpleNamespace

    from kfdeb import distributed
    from kfdeb.loop import StepMeter

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ctx = distributed.Context(rank, rank, world, torch.device("cpu"))
        tasks = [SimpleNamespace(name="nli", batch_size=4), SimpleNamespace(name="sts", batch_size=4)]
        run = SimpleNamespace(ctx=ctx, tasks=tasks, output_dir=Path("out"), last_saved_step=6)
        meter = StepMeter(run)
        meter.add_loss(0, torch.tensor(1.0), step=7)
        # only rank 1's STS shard goes non-finite, at step 8
        meter.add_loss(1, torch.tensor(float("nan") if rank == 1 else 1.0), step=8)
        try:
            meter.flush(8, None)
            results[rank] = "no error"
        except FloatingPointError as err:
            results[rank] = str(err)
    finally:
        dist.destroy_process_group()


def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_the_same_message():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_nan_agreement_worker, args=(2, free_port(), results), nprocs=2, start_method="spawn")
        results = dict(results)
    assert results[0] == results[1]
    assert results[0].startswith("the sts loss is not finite at step 8; training stopped and the last good state "
                                 "(step-00000006) stays in out/state")


def test_a_torchrun_worker_leaves_without_the_interpreter_teardown_where_gloo_aborted():
    """cli.exit_process: under torchrun (WORLD_SIZE > 1) the process leaves with os._exit after flushing, so no
    process-group thread can be caught releasing a collective's tensors inside the interpreter's teardown
    (SIGABRT after a successful run; its agent then skips the exit barrier and the other node waits 300 s).
    One process: a normal exit, teardown included."""
    code = ("import atexit, sys; from kfdeb import cli; atexit.register(lambda: print('teardown ran'));"
            "print('flushed', end=''); sys.stderr.write('err'); cli.exit_process(3)")
    for world, teardown in (("2", False), ("1", True)):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                                env={**ENV, "WORLD_SIZE": world})
        assert result.returncode == 3 and result.stdout.startswith("flushed") and result.stderr == "err"
        assert ("teardown ran" in result.stdout) == teardown, world
