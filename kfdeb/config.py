"""TrainConfig: every knob of a training run, its command-line flags, presets and config files.

Precedence, lowest to highest: the dataclass defaults (the reference multitask recipe), the
`--preset`, the `--config FILE` (JSON or YAML with the same keys), then flags given on the
command line. The resolved config is written to the output dir, so a run says what it ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from kfdeb.errors import UserInputError, first_line

TINY_MODEL = "kfdeb:tiny-deberta"  # build a random tiny DeBERTa-v2 offline (kfdeb/tiny.py)
BUNDLED = "kfdeb:bundled"  # the KorNLU files shipped inside the package (kfdeb/bundled/kor-nlu)
TASKS = ("nli", "sts")
NLI_TRIPLET_SCOPES = ("per_file", "union")  # data.nli_triplets_of_files
METRICS_FOR_BEST = (
    "max_spearman",
    "cosine_spearman", "cosine_pearson", "euclidean_spearman", "euclidean_pearson",
    "manhattan_spearman", "manhattan_pearson", "dot_spearman", "dot_pearson",
)


@dataclass
class TrainConfig:
    # what to train (flag names as in the reference training scripts)
    model_name_or_path: str = "kakaobank/kf-deberta-base"
    data_dir: str = "kor-nlu-datasets"
    nli_train_glob: str = "KorNLI/*train.ko.tsv"
    # your own files (.tsv, .csv, .jsonl; data.py): each one given replaces what data_dir would give
    nli_train_files: str = ""  # comma-separated paths or globs: NLI pairs, triplets or anchor-positive pairs
    sts_train_file: str = ""  # scored pairs (sentence1, sentence2, score)
    sts_dev_file: str = ""
    sts_test_file: str = ""
    score_max: float = 5.0  # labels of the scored-pair files above = score / score_max
    tasks: str = "nli,sts"
    nli_triplet_scope: str = "per_file"  # per_file: triplets file by file, concatenated (the reference); union: over all files
    max_seq_length: int = 256
    nli_batch_size: int = 64
    sts_batch_size: int = 8
    batch_size: int = 0  # the reference's training_nli.py / training_sts.py flag: the one objective's batch size (0: unset)
    nli_mini_batch_size: int = 0  # > 0: GradCache, embed the NLI batch this many triplets at a time (same gradient)
    num_epochs: int = 10
    max_steps: int = 0  # > 0: stop there, and the schedule spans max_steps
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    optimizer: str = "per_task"  # per_task: one AdamW per objective (the reference); joint: one over the summed losses
    seed: int = 42
    # what the objectives optimise beyond the reference recipe (losses.py)
    sts_loss: str = "cosine"  # cosine: MSE of the cosine (the reference); cosent or angle: ranking losses
    matryoshka_dims: str = ""  # comma-separated widths, largest first: the loss summed over these prefixes (MRL)
    matryoshka_weights: str = ""  # comma-separated, one per width (default: 1 each)
    # evaluation and outputs
    eval_steps: int = 1000
    eval_batch_size: int = 64
    metric_for_best: str = "max_spearman"
    output_dir: str = "output"
    output_prefix: str = ""  # as the reference scripts: the run lives in output_dir/<prefix><model id, / as -> (no timestamp)
    hub_model_id: str = ""  # the name the model card's usage snippets use (default: the output folder's name)
    save_steps: int = 1000  # resumable-state interval in steps (also written at every epoch end)
    logging_steps: int = 10
    resume: bool = False
    overwrite_output_dir: bool = False
    # how it runs (not part of the maths)
    device: str = "auto"  # auto: cuda:<local rank> when available, else cpu
    amp: str = "auto"  # auto: bf16 on GPUs with native bf16, fp16 + GradScaler on older ones, none on CPU
    pad_to_multiple_of: int = 0  # 0: 8 on GPU (tensor-core tiles), 1 on CPU
    dist_timeout: int = 1800  # seconds a rank waits in a collective (e.g. for rank 0's checkpoint save) before the job fails
    cache_dir: str = ""  # the token cache (token_cache.py); "": $XDG_CACHE_HOME/kfdeb, else ~/.cache/kfdeb
    no_cache: bool = False  # read and tokenize the training files in memory, every run (no token cache)
    progress: bool = True
    preset: str = ""
    config: str = ""

    @property
    def run_dir(self) -> Path:
        """The run's folder: output_dir, or with --output_prefix the reference scripts' subfolder of it (no timestamp)."""
        if not self.output_prefix:
            return Path(self.output_dir)
        return Path(self.output_dir) / (self.output_prefix + self.model_name_or_path.strip("/").replace("/", "-"))

    @property
    def task_list(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]

    @property
    def matryoshka_dim_list(self) -> tuple[int, ...]:
        """--matryoshka_dims as integers (validate() has checked them); () when not given."""
        return tuple(int(d) for d in self.matryoshka_dims.split(",") if d.strip())

    @property
    def matryoshka_weight_list(self) -> tuple[float, ...]:
        """--matryoshka_weights as floats, 1.0 for each width when not given."""
        weights = tuple(float(w) for w in self.matryoshka_weights.split(",") if w.strip())
        return weights or (1.0,) * len(self.matryoshka_dim_list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # the published multitask recipe (kf-deberta-multitask, ko-sroberta-multitask)
    "multitask": {"tasks": "nli,sts", "max_seq_length": 256, "nli_batch_size": 64, "sts_batch_size": 8,
                  "num_epochs": 10, "seed": 42},
    # training_nli.py: NLI only
    "nli": {"tasks": "nli", "nli_batch_size": 64, "num_epochs": 1, "max_seq_length": 128, "seed": 777,
            "warmup_ratio": 0.1},
    # training_sts.py: STS only
    "sts": {"tasks": "sts", "sts_batch_size": 8, "num_epochs": 5, "max_seq_length": 128, "seed": 777},
    # offline pipeline check: tiny random DeBERTa-v2 on the bundled files, a few hundred steps.
    # It proves the pipeline runs end to end, not model quality.
    "smoke": {"model_name_or_path": TINY_MODEL, "data_dir": BUNDLED, "nli_train_glob": "KorNLI/xnli.*.ko.tsv",
              "tasks": "nli,sts", "max_seq_length": 64, "nli_batch_size": 32, "sts_batch_size": 8,
              "num_epochs": 2, "learning_rate": 1e-3, "eval_steps": 100, "save_steps": 100,
              "output_dir": "output/smoke", "overwrite_output_dir": True, "seed": 42},
}

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HELP = {
    "model_name_or_path": f"encoder to fine-tune: local folder or hub id ({TINY_MODEL}: tiny random DeBERTa-v2)",
    "data_dir": f"kor-nlu-datasets clone ({BUNDLED}: the files shipped with kfdeb)",
    "nli_train_glob": "KorNLI training files, relative to data_dir",
    "nli_train_files": "your own training files for the in-batch negatives (nli) objective instead of "
                       "data_dir/nli_train_glob: comma-separated paths or globs, .tsv/.csv/.jsonl, each of NLI pairs "
                       "(sentence1, sentence2, gold_label), triplets (anchor, positive, negative) or pairs "
                       "(anchor, positive); pairs cannot be mixed with the others",
    "sts_train_file": "your own scored pairs (sentence1, sentence2, score; .tsv/.csv/.jsonl) for the sts objective "
                      "instead of data_dir's KorSTS train",
    "sts_dev_file": "your own scored pairs for dev evaluation (best checkpoint) instead of KorSTS dev",
    "sts_test_file": "your own scored pairs for the final test evaluation instead of KorSTS test",
    "score_max": "the highest score of the --sts_*_file files: label = score / score_max, a score outside "
                 "0..score_max is an error (KorSTS files under data_dir are always 0..5)",
    "tasks": "comma-separated objectives: nli, sts or nli,sts",
    "batch_size": "the flag of the reference's single-objective scripts (training_nli.py, training_sts.py): the "
                  "global batch size of the one objective of --tasks (with --preset nli: --nli_batch_size; with "
                  "--preset sts: --sts_batch_size); refused with both objectives (0: unset)",
    "output_prefix": "as the reference training scripts: the run's folder becomes "
                     "output_dir/<prefix><model_name_or_path with / as ->, e.g. --output_prefix kor_multi_ with the "
                     "default model gives output/kor_multi_kakaobank-kf-deberta-base. The reference also appended a "
                     "timestamp; kfdeb does not, so the same command line finds its own run again with --resume "
                     "(\"\": the run's folder is output_dir itself)",
    "nli_mini_batch_size": "GradCache: embed each rank's NLI batch this many triplets at a time, for the exact "
                           "gradient of a large --nli_batch_size at the memory of a small one (0: off)",
    "nli_triplet_scope": "per_file (reference: triplets built file by file, then concatenated) or union "
                         "(one partner table over all files: a sentence in several files is an anchor once)",
    "max_steps": "stop after this many steps (0: num_epochs); the schedule spans them",
    "optimizer": "per_task (reference: one AdamW + schedule per objective, 2 updates a step) or joint",
    "metric_for_best": "dev figure that selects the best checkpoint (with --matryoshka_dims: at the first width)",
    "sts_loss": "loss of the sts objective: cosine (MSE between cosine and score / 5, the reference), cosent "
                "(CoSENT ranking loss, scale 20) or angle (AnglE: the same ranking loss on the angle similarity)",
    "matryoshka_dims": "Matryoshka (MRL): comma-separated embedding widths, largest first, e.g. 768,512,256,128,64,32; "
                       "both objectives sum their loss over these prefixes of the embedding (one forward); dev "
                       "evaluation reports every width and selects the best checkpoint at the first",
    "matryoshka_weights": "comma-separated weight of each --matryoshka_dims width (default: 1 each)",
    "save_steps": "write resumable state every N steps",
    "resume": "continue from output_dir/state (starts at step 0 when there is none)",
    "overwrite_output_dir": "start over in an output_dir that holds a previous run",
    "amp": "autocast dtype: auto (bf16 on GPUs with native bf16, fp16 + GradScaler on older GPUs, none on CPU), "
           "none, bf16, fp16 (GradScaler)",
    "pad_to_multiple_of": "pad batches to a multiple of N tokens (0: 8 on GPU, 1 on CPU)",
    "dist_timeout": "seconds a rank waits in a collective (e.g. while rank 0 saves a checkpoint) before the job "
                    "fails; a rank that dies ends the job within seconds whatever this is",
    "hub_model_id": "name of the model in its model card's usage snippets, e.g. user/kf-deberta-multitask "
                    "(default: the output folder's name)",
    "cache_dir": "token cache folder: each objective's examples and token ids, built by the first run (one "
                 "process per node) and memory-mapped by later runs and every rank; delete it to clear it "
                 "(\"\": $XDG_CACHE_HOME/kfdeb, else ~/.cache/kfdeb)",
    "no_cache": "no token cache: read and tokenize the training files in memory, in every run and rank",
    "device": "auto (cuda:LOCAL_RANK if CUDA is available, else cpu), cpu, cuda (this rank's GPU), cuda:N (one process)",
    "preset": f"named defaults: {', '.join(PRESETS)}",
    "config": "JSON or YAML file of the same keys (command-line flags win)",
}
_CHOICES = {
    "nli_triplet_scope": NLI_TRIPLET_SCOPES,
    "optimizer": ("per_task", "joint"),
    "sts_loss": ("cosine", "cosent", "angle"),
    "amp": ("auto", "none", "bf16", "fp16"),
    "metric_for_best": METRICS_FOR_BEST,
    "preset": ("",) + tuple(PRESETS),  # "": no preset
}


def _parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Multitask fine-tuning of a sentence encoder on KorNLI + KorSTS (kfdeb).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = TrainConfig()
    for name, spec in _FIELDS.items():
        default = getattr(defaults, name)
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": _HELP.get(name, " ") + f" (default: {default!r})"}
        if isinstance(default, bool):
            kwargs.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
        else:
            kwargs["type"] = type(default)
        if name in _CHOICES:
            kwargs["choices"] = [choice for choice in _CHOICES[name] if choice]
        parser.add_argument(f"--{name}", **kwargs)
    return parser


def _coerce(name: str, value: Any, source: str) -> Any:
    expected = type(getattr(TrainConfig(), name))
    if expected is bool and isinstance(value, bool):
        return value
    if expected is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if expected is str and isinstance(value, str):
        return value
    if name in ("matryoshka_dims", "matryoshka_weights") and isinstance(value, list):  # YAML/JSON lists
        return ",".join(str(item) for item in value)
    raise UserInputError(f"{source}: {name}: expected {expected.__name__}, got {value!r}")


def read_config_file(path: str) -> dict[str, Any]:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserInputError(f"{file}: cannot read config file ({err})") from None
    try:
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as err:  # yaml and json raise their own error types; both mean a malformed file
        kind = "YAML" if file.suffix.lower() in (".yaml", ".yml") else "JSON"
        raise UserInputError(f"{file}: not valid {kind} ({first_line(err)})") from None
    if not isinstance(values, dict):
        raise UserInputError(f"{file}: expected a mapping of config keys")
    unknown = [key for key in values if key not in _FIELDS or key == "config"]
    if unknown:
        raise UserInputError(f"{file}: {unknown[0]}: unknown config key")
    return {key: _coerce(key, value, str(file)) for key, value in values.items()}


def resolve(overrides: dict[str, Any]) -> TrainConfig:
    """Defaults < preset < config file < explicit overrides (e.g. command-line flags)."""
    file_values = read_config_file(overrides["config"]) if overrides.get("config") else {}
    preset = overrides.get("preset") or file_values.get("preset") or ""
    values = {**PRESETS.get(preset, {}), **file_values, **overrides}  # an unknown preset fails in validate
    unknown = [key for key in values if key not in _FIELDS]
    if unknown:
        raise UserInputError(f"{unknown[0]}: unknown config key")
    if values.get("batch_size"):
        values.update(_single_objective_batch_size(values, {**file_values, **overrides}))
    config = TrainConfig(**values)
    validate(config)
    return config


def _single_objective_batch_size(values: dict[str, Any], given: dict[str, Any]) -> dict[str, int]:
    """--batch_size as training_nli.py / training_sts.py mean it: the batch of the one objective trained."""
    tasks = [t.strip() for t in str(values.get("tasks", TrainConfig.tasks)).split(",") if t.strip()]
    size = values["batch_size"]
    if len(tasks) != 1 or tasks[0] not in TASKS:
        raise UserInputError(f"--batch_size {size}: the batch size of a single-objective run (--preset nli or sts, "
                             "as training_nli.py / training_sts.py); with both objectives give --nli_batch_size "
                             "and --sts_batch_size")
    key = f"{tasks[0]}_batch_size"
    if key in given and given[key] != size:
        raise UserInputError(f"--batch_size {size} and --{key} {given[key]} name the same batch; give one of them")
    return {key: size}


def validate(config: TrainConfig) -> None:
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
    if config.max_steps < 0 or config.pad_to_multiple_of < 0 or config.nli_mini_batch_size < 0:
        raise UserInputError("--max_steps, --pad_to_multiple_of and --nli_mini_batch_size must be >= 0")
    if not 0.0 < config.score_max < float("inf"):
        raise UserInputError(f"--score_max {config.score_max}: must be a positive number")
    if not 0.0 <= config.warmup_ratio <= 1.0:
        raise UserInputError(f"--warmup_ratio {config.warmup_ratio}: must be in [0, 1]")
    if config.learning_rate <= 0 or config.weight_decay < 0 or config.max_grad_norm <= 0:
        raise UserInputError("--learning_rate and --max_grad_norm must be > 0, --weight_decay >= 0")
    _validate_matryoshka(config)
    for name, choices in _CHOICES.items():
        if getattr(config, name) not in choices:
            raise UserInputError(f"--{name} {getattr(config, name)!r}: expected one of {', '.join(c for c in choices if c)}")


def _validate_matryoshka(config: TrainConfig) -> None:
    """Widths: positive integers, largest first, no repeats; weights: one positive number per width.
    Whether the largest is the model's own width is checked once the model is loaded (run.setup)."""
    def numbers(flag: str, text: str, kind: type) -> list:
        try:
            values = [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise UserInputError(f"--{flag} {text!r}: expected comma-separated {kind.__name__}s") from None
        if text.strip() and not values or any(not v > 0 for v in values):
            raise UserInputError(f"--{flag} {text!r}: every value must be > 0")
        return values

    dims = numbers("matryoshka_dims", config.matryoshka_dims, int)
    weights = numbers("matryoshka_weights", config.matryoshka_weights, float)
    if any(later >= earlier for earlier, later in zip(dims, dims[1:])):
        raise UserInputError(f"--matryoshka_dims {config.matryoshka_dims}: list the widths largest first, each once")
    if weights and len(weights) != len(dims):
        raise UserInputError(f"--matryoshka_weights {config.matryoshka_weights}: one weight per --matryoshka_dims width "
                             f"({len(dims)}), got {len(weights)}")


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    return resolve(vars(args))
