"""A run's resumable training state: what it holds, how it is written atomically, how every rank gets it back.

What a state holds (`state_dict` and `load_state_dict`, side by side, the same keys in the same
order): the run's parts (run.Parts: model weights, each optimizer's moments, each scheduler, the
grad scaler (fp16), each sampler's position), the run's `TrainingState` (step, best dev score and
step, the step-0 dev figures, length of metrics.jsonl), the config (a --resume with another value
of a key that changes the computation is refused; config.RESUMABLE lists the others), the world size; and, as parts of their own, every
rank's RNG streams (Python, NumPy, torch CPU, its own CUDA device) and its open logging window
(the loss and gradient-norm sums since the last log line: not empty only in a state saved at a
SIGTERM between log lines), gathered to rank 0.

How it is written: a state is a nested structure (dicts, lists, numbers, strings, tensors, numpy
arrays) split into `NAME.safetensors` (every tensor and array, under a numbered key) and `NAME.json`
(everything else, with {"__tensor__": key} where a tensor was): nothing is pickled, so reading a
state never runs code. It goes to `state/step-NNNNNNNN.tmp-*`, its files synced, is renamed to
`state/step-NNNNNNNN` (files.publish_folder), and only then does `state/LATEST` (written and
renamed the same way) name it. A run killed at any instant leaves LATEST naming a complete state;
older states and stray temporaries are removed after the switch, and stray temporaries (a save
killed midway) also before a new one starts.

Who writes and reads: global rank 0 alone (`save`), after gathering the other ranks' RNG states
through the process group; on --resume rank 0 reads the state and broadcasts it (`resume`), so
no rank but 0 touches the folder and nodes need no shared filesystem.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from kfdeb import distributed
from kfdeb.config import RESUMABLE, TrainConfig
from kfdeb.errors import UserInputError
from kfdeb.files import publish_folder, write_text

if TYPE_CHECKING:
    from kfdeb.loop import StepMeter

STATE_DIR = "state"
LATEST = "LATEST"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainingState:
    """Where a run stands, besides weights, optimizers and samplers (run.Parts): what changes as it trains."""

    step: int = 0  # the last step taken (0: none)
    best_score: float = -math.inf
    best_step: int = -1
    metrics_bytes: int = 0  # length of metrics.jsonl when this state was saved
    # the step-0 dev evaluation (the start every later step must beat) and the best evaluation after it, for the
    # run's last line (run_evaluation.finish) when no step beat the start
    start_figures: dict = field(default_factory=dict)
    best_trained_score: float = -math.inf
    best_trained_step: int = -1
    # this process's own account, never saved: a resumed run starts them again
    last_saved_step: int = -1  # the step of the newest committed state (-1: none)
    eval_seconds: float = 0.0  # dev evaluations and best-model saves, for throughput figures

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "best_score": self.best_score, "best_step": self.best_step,
                "metrics_bytes": self.metrics_bytes, "start_figures": dict(self.start_figures),
                "best_trained_score": self.best_trained_score, "best_trained_step": self.best_trained_step}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        fresh = TrainingState()  # a key a state saved by an older kfdeb lacks had its default then
        for key in self.state_dict():
            setattr(self, key, saved.get(key, getattr(fresh, key)))
        self.last_saved_step = self.step  # the state just read is the newest committed one


class Resumable(Protocol):
    """What `save` and `resume` read of a run (run.Run), named here so that this module imports nothing above it."""

    config: TrainConfig
    ctx: distributed.Context
    output_dir: Path
    parts: Any  # run.Parts: state_dict() and load_state_dict(), and guide_sha256
    log: MetricsLog


class MetricsLog:
    """metrics.jsonl, appended by the main rank; emptied at the start, truncated to the saved length on resume."""

    def __init__(self, path: Path, ctx: distributed.Context):
        self.path, self.ctx = path, ctx

    def start(self, keep_bytes: int | None) -> None:
        """Empty the file (None: a run from step 0), or keep its first `keep_bytes` (a resumed run's)."""
        if self.ctx.is_main:
            if keep_bytes is None:
                self.path.write_text("", encoding="utf-8")
            else:
                with open(self.path, "ab") as handle:
                    handle.truncate(keep_bytes)

    def write(self, **row: Any) -> None:
        if self.ctx.is_main:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0


def rng_state(device: torch.device) -> dict[str, Any]:
    """This rank's generators: Python, NumPy, torch CPU and (on a GPU) its own device's only."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":  # not get_rng_state_all: a resume on a box with fewer GPUs must work
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def state_dict(run: Resumable, state: TrainingState) -> dict[str, Any]:
    """The run's "train" part (rank-independent: every rank holds the same values)."""
    return {
        **run.parts.state_dict(),  # model, optimizers, schedulers, scaler, samplers
        "progress": state.state_dict(),  # "progress": the key states have always had
        "config": run.config.to_dict(),
        "world_size": run.ctx.world_size,
        # --guide_model: not saved (self is re-made from the starting weights); its weights' digest, so that a
        # resume whose --model_name_or_path (or guide path) no longer holds them is refused (_read_saved)
        "guide_sha256": run.parts.guide_sha256 or None,
    }


def load_state_dict(run: Resumable, state: TrainingState, saved: dict[str, Any]) -> None:
    """`state_dict`'s inverse, key by key."""
    run.parts.load_state_dict(saved)
    state.load_state_dict(saved["progress"])
    # "config" and "guide_sha256": checked by rank 0 when it read the state (_read_saved), before it sent anything


def _check_config(config: TrainConfig, saved: dict[str, Any]) -> None:
    # a key the saved config lacks (saved by an older kfdeb) had its default value then
    was = {**TrainConfig().to_dict(), **saved}
    changed = [k for k, v in config.to_dict().items() if k not in RESUMABLE and was[k] != v]
    if changed:
        key = changed[0]
        raise UserInputError(f"--resume: {key} is {getattr(config, key)!r} but the saved run used {was[key]!r}")


def weights_sha256(module: torch.nn.Module) -> str:
    """A digest of a module's weights (names, dtypes, shapes, values): what a guide model was."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_guide(run: Resumable, saved: str | None) -> None:
    now = run.parts.guide_sha256
    if saved and now and saved != now:
        config = run.config
        where = (f"{config.model_name_or_path} no longer holds the weights this run started from"
                 if config.guide_model == "self" else f"{config.guide_model} holds other weights than when the run began")
        raise UserInputError(f"--resume: --guide_model {config.guide_model}: {where} (sha256 {saved[:12]} then, "
                             f"{now[:12]} now); put that model back, or start a new run")


def save(run: Resumable, state: TrainingState, meter: StepMeter) -> None:
    """Resumable state of this step, committed atomically by rank 0, every rank's RNG and logging window in it."""
    ctx = run.ctx
    own = {**rng_state(ctx.device), "window": meter.state_dict()}
    rank_states = distributed.gather_objects(ctx, own)  # sync: every rank is at this step
    if ctx.is_main:
        state.metrics_bytes = run.log.size()
        scratch = begin(run.output_dir, state.step)
        for rank, rank_state in enumerate(rank_states):
            write_part(scratch, f"rank-{rank}", rank_state)
        write_part(scratch, "train", state_dict(run, state))
        commit(scratch, state.step)
    # no barrier: the other ranks go on and wait for rank 0 in the next step's gradient all-reduce
    # (bounded by --dist_timeout); none of them reads the state
    state.last_saved_step = state.step


def resume(run: Resumable, meter: StepMeter) -> TrainingState:
    """Step 0, or with --resume the latest state: rank 0 reads it and sends every rank its share."""
    ctx = run.ctx
    if run.config.resume:
        _check_rank0_holds_the_state(run)
    tensors: dict[str, torch.Tensor] = {}
    found = distributed.main_only(ctx, lambda: _read_saved(run, tensors)) if run.config.resume else None
    if found is None:
        if run.config.resume:
            distributed.print0(ctx, f"no saved state in {run.output_dir / STATE_DIR}: starting at step 0")
        run.log.start(None)
        return TrainingState()
    folder, skeleton = found
    saved = join(skeleton, distributed.broadcast_tensors(ctx, tensors if ctx.is_main else None))
    state = TrainingState()
    load_state_dict(run, state, saved["train"])
    ranks = saved["ranks"]
    if ctx.rank < len(ranks) and ranks[ctx.rank] is not None:
        set_rng_state(ranks[ctx.rank], ctx.device)
        # a window continues only where every rank has its own (a state without one was saved at a log line: empty)
        if "window" in ranks[ctx.rank] and len(ranks) == ctx.world_size:
            meter.load_state_dict(ranks[ctx.rank]["window"])
    else:  # resumed with more ranks than saved: dropout masks differ from an uninterrupted run
        distributed.print0(ctx, f"note: saved with {saved['train']['world_size']} ranks; new ranks start fresh RNG streams")
    run.log.start(state.metrics_bytes)
    distributed.print0(ctx, f"resumed from {folder} at step {state.step}")
    return state


def _read_saved(run: Resumable, tensors: dict[str, torch.Tensor]) -> tuple[str, Any] | None:
    """Rank 0: the latest state's folder and its skeleton (`split`); its tensors go into `tensors`."""
    folder = latest(run.output_dir)
    if folder is None:
        return None
    saved = read_part(folder, "train")
    _check_config(run.config, saved["config"])  # refused here, before anything is sent
    _check_guide(run, saved.get("guide_sha256"))
    ranks = [read_part(folder, f"rank-{r}") if (folder / f"rank-{r}.json").exists() else None
             for r in range(saved["world_size"])]
    skeleton, found = split({"train": saved, "ranks": ranks})
    tensors.update(found)
    return str(folder), skeleton


def _check_rank0_holds_the_state(run: Resumable) -> None:
    """Without a shared disk, only the node that ran rank 0 has the state: it must be rank 0 again."""
    if not run.ctx.distributed:
        return
    found = latest(run.output_dir)  # each rank looks at its own disk (read-only)
    seen = distributed.gather_objects(run.ctx, (socket.gethostname(), found.name if found else None))
    if seen[0][1] is None:
        holders = [(rank, host) for rank, (host, state) in enumerate(seen) if state is not None]
        if holders:
            rank, host = holders[0]
            raise UserInputError(
                f"--resume: global rank 0 (on {seen[0][0]}) finds no saved state in {run.output_dir}, but rank {rank} "
                f"(on {host}) does: start the job so that rank 0 runs on {host} (static rendezvous: --node_rank 0 "
                "there), or put --output_dir on storage every node sees"
            )


# the folder protocol and the pickle-free format (module docstring) -----------------------------------



def split(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(a JSON-able skeleton, its tensors by key): a nested state taken apart (see module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    return _encode(state, tensors), tensors


def join(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The nested state that `split` took apart."""
    return _decode(skeleton, tensors)


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value).copy())
        return {"__ndarray__": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"__dict__": {k: _encode(v, tensors) for k, v in value.items()}}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, tensors) for v in value]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a training state")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__ndarray__" in value:
            return tensors[value["__ndarray__"]].numpy()
        if "__dict__" in value:
            return {k: _decode(v, tensors) for k, v in value["__dict__"].items()}
        if "__items__" in value:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
    return value


def write_part(folder: Path, name: str, state: Any) -> None:
    """Write `name.json` + `name.safetensors` for `state` into `folder`."""
    encoded, tensors = split(state)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(encoded), encoding="utf-8")


def read_part(folder: Path, name: str) -> Any:
    tensors = load_file(str(folder / f"{name}.safetensors"))
    return join(json.loads((folder / f"{name}.json").read_text(encoding="utf-8")), tensors)


def begin(output_dir: str | os.PathLike, step: int) -> Path:
    """A fresh temporary folder for the state of `step`; stray ones of killed saves are removed first."""
    root = Path(output_dir) / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stray in root.glob("step-*.tmp-*"):
        shutil.rmtree(stray, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"step-{step:08d}.tmp-", dir=root))


def commit(scratch: Path, step: int) -> Path:
    """Make the state in `scratch` the latest, atomically; drop older states and stray temporaries."""
    root = scratch.parent
    final = root / f"step-{step:08d}"
    if final.exists():  # a resumed run repeating a step it had already saved
        shutil.rmtree(final)
    publish_folder(scratch, final)  # its files synced to disk before the rename (files.py)
    write_text(root / LATEST, final.name + "\n")
    for entry in root.iterdir():
        if entry.name not in (final.name, LATEST):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
    return final


def latest(output_dir: str | os.PathLike) -> Path | None:
    """The folder LATEST names, or None when no state was committed."""
    pointer = Path(output_dir) / STATE_DIR / LATEST
    if not pointer.is_file():
        return None
    folder = pointer.parent / pointer.read_text(encoding="utf-8").strip()
    return folder if folder.is_dir() else None
