"""The checks of a resolved TrainConfig: values, combinations, --metric_for_best, the in-batch levers, Matryoshka.

Each wrong value or combination is a one-line UserInputError naming the flag (exit status 2), raised before
anything is read or loaded. Kept apart from config.py, which declares the knobs; this module says what values
they may take together.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from kfdeb.errors import UserInputError
from kfdeb.ir_metrics import IR_KEYS
from kfdeb.mining import settings_from_options

if TYPE_CHECKING:
    from kfdeb.config import TrainConfig

TASKS = ("nli", "sts")
METRICS_FOR_BEST = (
    "max_spearman",
    "cosine_spearman", "cosine_pearson", "euclidean_spearman", "euclidean_pearson",
    "manhattan_spearman", "manhattan_pearson", "dot_spearman", "dot_pearson",
)


def validate(config: TrainConfig) -> None:
    """Every value of a resolved config checked, each wrong one a one-line error naming its flag."""
    tasks = config.task_list
    if not tasks or any(t not in TASKS for t in tasks) or len(set(tasks)) != len(tasks):
        raise UserInputError(f"--tasks {config.tasks!r}: expected nli, sts or nli,sts")
    if config.batch_size < 0:
        raise UserInputError(f"--batch_size {config.batch_size}: must be at least 1")
    if "/" in config.output_prefix or config.output_prefix in (".", ".."):
        raise UserInputError(f"--output_prefix {config.output_prefix!r}: a folder-name prefix, without '/'")
    for name in ("max_seq_length", "nli_batch_size", "sts_batch_size", "eval_batch_size", "num_epochs",
                 "eval_steps", "save_steps", "logging_steps", "dist_timeout"):
        if getattr(config, name) < 1:
            raise UserInputError(f"--{name} {getattr(config, name)}: must be at least 1")
    if min(config.max_steps, config.pad_to_multiple_of, config.nli_mini_batch_size, config.save_max_seq_length) < 0:
        raise UserInputError("--max_steps, --pad_to_multiple_of, --nli_mini_batch_size, --save_max_seq_length must be >= 0")
    if not 0.0 < config.score_max < float("inf"):
        raise UserInputError(f"--score_max {config.score_max}: must be a positive number")
    if not 0.0 <= config.warmup_ratio <= 1.0:
        raise UserInputError(f"--warmup_ratio {config.warmup_ratio}: must be in [0, 1]")
    if config.learning_rate <= 0 or config.weight_decay < 0 or config.max_grad_norm <= 0:
        raise UserInputError("--learning_rate and --max_grad_norm must be > 0, --weight_decay >= 0")
    _validate_in_batch_loss(config)
    fraction = config.ir_dev_fraction
    if fraction and not (0.0 < fraction < 1.0 and "nli" in config.task_list and config.nli_train_files
                         and not config.ir_dev_data):
        raise UserInputError(f"--ir_dev_fraction {fraction}: a fraction (0 < F < 1) of the --nli_train_files rows, held "
                             "out as the only retrieval dev set (not with --ir_dev_data)")
    _validate_matryoshka(config)
    _validate_metric_for_best(config)
    if config.remine_every < 0 or (config.remine_every and "nli" not in config.task_list):
        raise UserInputError(f"--remine_every {config.remine_every}: a number of steps (0: off), with the nli objective")
    if config.remine_options and not config.remine_every:
        raise UserInputError("--remine_options: set --remine_every too (the options of its mining)")
    settings_from_options(config.remine_options, config.seed)  # each wrong option: its one-line error now
    for spec in dataclasses.fields(config):
        name, choices = spec.name, spec.metadata["choices"]
        allowed = choices + (("",) if name == "preset" else ())  # "": no preset
        if choices and getattr(config, name) not in allowed:
            raise UserInputError(f"--{name} {getattr(config, name)!r}: expected one of {', '.join(choices)}")


def positive_numbers(flag: str, text: str, kind: type = int) -> list:
    """A comma-separated list of positive numbers (--matryoshka_dims, evaluate.py --dims); "" is []."""
    try:
        values = [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise UserInputError(f"--{flag} {text!r}: expected comma-separated {kind.__name__}s") from None
    if text.strip() and not values or any(not v > 0 for v in values):
        raise UserInputError(f"--{flag} {text!r}: every value must be > 0")
    return values


def _validate_metric_for_best(config: TrainConfig) -> None:
    """A KorSTS figure, a retrieval figure (which needs --ir_dev_data), or KorSTS + retrieval."""
    metric = config.metric_for_best
    if metric == "auto":  # left by resolve only where the run has no dev data
        return
    parts = metric.split("+")
    sts = [p for p in parts if p in METRICS_FOR_BEST]
    retrieval = [p for p in parts if p in IR_KEYS]
    if len(sts) + len(retrieval) != len(parts) or len(parts) > 2 or len(parts) == 2 and len(sts) != 1:
        raise UserInputError(f"--metric_for_best {metric!r}: expected one of {', '.join(METRICS_FOR_BEST + IR_KEYS)}, "
                             "or a KorSTS figure + a retrieval figure (e.g. cosine_spearman+ndcg@10)")
    if retrieval and not config.ir_dev_data and not config.ir_dev_fraction:
        raise UserInputError(f"--metric_for_best {metric}: a retrieval figure needs --ir_dev_data or --ir_dev_fraction")


def _validate_in_batch_loss(config: TrainConfig) -> None:
    if not 0.0 < config.scale < float("inf"):
        raise UserInputError(f"--scale {config.scale}: must be a positive number (1 / temperature)")
    if config.gist_margin != config.gist_margin or abs(config.gist_margin) == float("inf"):
        raise UserInputError(f"--gist_margin {config.gist_margin}: must be a finite number")
    if config.nli_loss == "gist" and not config.guide_model:
        raise UserInputError("--nli_loss gist: needs --guide_model (a model folder or hub id, or self: a frozen "
                             "copy of the starting weights)")
    if config.guide_model and config.nli_loss != "gist":
        raise UserInputError(f"--guide_model {config.guide_model}: only --nli_loss gist uses a guide (the loss is "
                             f"{config.nli_loss})")
    if config.nli_loss != "mnrl" and "nli" not in config.task_list:
        raise UserInputError(f"--nli_loss {config.nli_loss}: the in-batch objective is not trained "
                             f"(--tasks {config.tasks})")


def _validate_matryoshka(config: TrainConfig) -> None:
    """Widths: positive integers, largest first, no repeats; weights: one positive number per width.
    Whether the largest is the model's own width is checked once the model is loaded (run.setup)."""
    numbers = positive_numbers
    dims = numbers("matryoshka_dims", config.matryoshka_dims, int)
    weights = numbers("matryoshka_weights", config.matryoshka_weights, float)
    if any(later >= earlier for earlier, later in zip(dims, dims[1:])):
        raise UserInputError(f"--matryoshka_dims {config.matryoshka_dims}: list the widths largest first, each once")
    if weights and len(weights) != len(dims):
        raise UserInputError(f"--matryoshka_weights {config.matryoshka_weights}: one weight per --matryoshka_dims width "
                             f"({len(dims)}), got {len(weights)}")
