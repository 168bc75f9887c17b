"""TrainConfig: every knob of a training run, its command-line flags, presets and config files.

Precedence, lowest to highest: the dataclass defaults (the reference multitask recipe), the
`--preset`, the `--config FILE` (JSON or YAML with the same keys), then flags given on the
command line. The resolved config is written to the output dir, so a run says what it ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from kfdeb.batching import NLI_TRIPLET_SCOPES
from kfdeb.errors import UserInputError, first_line
from kfdeb.ir_metrics import IR_KEYS
from kfdeb.losses import STS_LOSSES

TINY_MODEL = "kfdeb:tiny-deberta"  # build a random tiny DeBERTa-v2 offline (kfdeb/tiny.py)
BUNDLED = "kfdeb:bundled"  # the KorNLU files shipped inside the package (kfdeb/bundled/kor-nlu)
TASKS = ("nli", "sts")
METRICS_FOR_BEST = (
    "max_spearman",
    "cosine_spearman", "cosine_pearson", "euclidean_spearman", "euclidean_pearson",
    "manhattan_spearman", "manhattan_pearson", "dot_spearman", "dot_pearson",
)


def knob(default: Any, help: str, resumable: bool = False, choices: Sequence[str] = ()) -> Any:
    """A TrainConfig field with everything about it in one place: its default, its --help text, whether
    it may change between a run and its --resume (how a run goes, not what it computes), its choices."""
    return field(default=default, metadata={"help": help, "resumable": resumable, "choices": tuple(choices)})


@dataclass
class TrainConfig:
    # what to train (flag names as in the reference training scripts)
    model_name_or_path: str = knob(
        "kakaobank/kf-deberta-base", f"encoder to fine-tune: local folder or hub id ({TINY_MODEL}: tiny random DeBERTa-v2)")
    data_dir: str = knob("kor-nlu-datasets", f"kor-nlu-datasets clone ({BUNDLED}: the files shipped with kfdeb)")
    nli_train_glob: str = knob("KorNLI/*train.ko.tsv", "KorNLI training files, relative to data_dir")
    # your own files (.tsv, .csv, .jsonl; readers.py): each one given replaces what data_dir would give
    nli_train_files: str = knob(
        "", "your own training files for the in-batch negatives (nli) objective instead of data_dir/nli_train_glob: "
            "comma-separated paths or globs, .tsv/.csv/.jsonl, each of NLI pairs (sentence1, sentence2, gold_label), "
            "triplets (anchor, positive, negative) or pairs (anchor, positive); pairs cannot be mixed with the others")
    sts_train_file: str = knob("", "your own scored pairs (sentence1, sentence2, score; .tsv/.csv/.jsonl) for the sts "
                                   "objective instead of data_dir's KorSTS train")
    sts_dev_file: str = knob("", "your own scored pairs for dev evaluation (best checkpoint) instead of KorSTS dev")
    sts_test_file: str = knob("", "your own scored pairs for the final test evaluation instead of KorSTS test")
    score_max: float = knob(5.0, "the highest score of the --sts_*_file files: label = score / score_max, a score "
                                 "outside 0..score_max is an error (KorSTS files under data_dir are always 0..5)")
    tasks: str = knob("nli,sts", "comma-separated objectives: nli, sts or nli,sts")
    nli_triplet_scope: str = knob(
        "per_file", "per_file (reference: triplets built file by file, then concatenated) or union (one partner "
                    "table over all files: a sentence in several files is an anchor once)", choices=NLI_TRIPLET_SCOPES)
    max_seq_length: int = knob(256, "tokens per sentence in training, [CLS]/[SEP] included")
    save_max_seq_length: int = knob(0, "the limit the saved model keeps, at which dev/test evaluations run (0: the longer of "
                                       "--max_seq_length and the start model's own, as sentence-transformers reads it)")
    nli_batch_size: int = knob(64, "global batch of the in-batch negatives (nli) objective, whatever the number of GPUs")
    sts_batch_size: int = knob(8, "global batch of the sts objective, whatever the number of GPUs")
    batch_size: int = knob(
        0, "the flag of the reference's single-objective scripts (training_nli.py, training_sts.py): the global batch "
           "size of the one objective of --tasks (with --preset nli: --nli_batch_size; with --preset sts: "
           "--sts_batch_size); refused with both objectives (0: unset)", resumable=True)
    nli_mini_batch_size: int = knob(
        0, "GradCache: embed each rank's NLI batch this many triplets at a time, for the exact gradient of a large "
           "--nli_batch_size at the memory of a small one (0: off)")
    num_epochs: int = knob(10, "epochs; an epoch is the shorter objective's batch count")
    max_steps: int = knob(0, "stop after this many steps (0: num_epochs); the schedule spans them")
    learning_rate: float = knob(2e-5, "AdamW's learning rate, after linear warmup, then linear decay to 0")
    warmup_ratio: float = knob(0.1, "warmup over ceil(ratio x steps) steps")
    weight_decay: float = knob(0.01, "AdamW weight decay, except bias and LayerNorm parameters")
    max_grad_norm: float = knob(1.0, "gradient-norm clipping")
    optimizer: str = knob("per_task", "per_task (reference: one AdamW + schedule per objective, 2 updates a step) "
                                      "or joint (one AdamW over the summed losses)", choices=("per_task", "joint"))
    seed: int = knob(42, "seeds the triplets, every sampler pass and dropout (each rank: seed + rank)")
    query_prompt: str = knob(
        "auto", "text prepended to the anchors of the in-batch negatives (nli) objective and to the queries of "
                "retrieval evaluation (auto: the model's own prompt named query, as e5's 'query: '; \"\": none); "
                "the trained model keeps it, for encode_query. KorSTS pairs get no prompt, in training and evaluation, "
                "as sentence-transformers' STS evaluator encodes them")
    document_prompt: str = knob(
        "auto", "text prepended to the positives and negatives of the in-batch objective and to the documents of "
                "retrieval evaluation (auto: the model's own prompt named document or passage; \"\": none)")
    pooling: str = knob("auto", "mean or cls: the pooling of a plain Hugging Face model (auto: mean, the reference's); "
                                "a sentence-transformers folder pools as its Pooling module says",
                        choices=("auto", "mean", "cls"))
    # what the objectives optimise beyond the reference recipe (losses.py)
    sts_loss: str = knob(
        "cosine", "loss of the sts objective: cosine (MSE between cosine and score / 5, the reference), cosent "
                  "(CoSENT ranking loss, scale 20) or angle (AnglE: the same ranking loss on the angle similarity)",
        choices=STS_LOSSES)
    matryoshka_dims: str = knob(
        "", "Matryoshka (MRL): comma-separated embedding widths, largest first, e.g. 768,512,256,128,64,32; both "
            "objectives sum their loss over these prefixes of the embedding (one forward); dev evaluation reports "
            "every width and selects the best checkpoint at the first")
    matryoshka_weights: str = knob("", "comma-separated weight of each --matryoshka_dims width (default: 1 each)")
    # evaluation and outputs
    eval_steps: int = knob(1000, "dev evaluation every N steps (and at each epoch end)")
    eval_batch_size: int = knob(64, "sentences per batch when evaluating", resumable=True)
    metric_for_best: str = knob(
        "auto", "dev figure that selects the best checkpoint (with --matryoshka_dims: at the first width): "
                f"{', '.join(METRICS_FOR_BEST)}; with retrieval dev data a retrieval figure ({', '.join(IR_KEYS)}) or "
                "the mean of a KorSTS and a retrieval figure, e.g. cosine_spearman+ndcg@10 (auto: max_spearman where "
                "KorSTS dev is evaluated, else ndcg@10 with retrieval dev data, else none: the final weights are kept)")
    ir_dev_data: str = knob(
        "", "retrieval evaluated beside KorSTS at every dev evaluation: a BEIR folder (corpus.jsonl, queries.jsonl, "
            "qrels/SPLIT.tsv) or a .tsv/.csv/.jsonl file of anchor, positive pairs; kfdeb:korsts-dev is the bundled "
            "KorSTS dev paraphrase set")
    ir_dev_split: str = knob("dev", "the qrels split of a BEIR --ir_dev_data")
    ir_dev_fraction: float = knob(0.0, "hold out this fraction of the --nli_train_files rows (whole groups sharing an anchor "
                                       "or a positive; seeded) as the retrieval dev set, saved in ir_dev_split/ (0: off)")
    ir_test_data: str = knob("", "retrieval evaluated beside KorSTS on the best model at the end (kfdeb:korsts-test: "
                                 "the bundled KorSTS test paraphrase set)")
    ir_test_split: str = knob("test", "the qrels split of a BEIR --ir_test_data")
    output_dir: str = knob("output", "where the run's folder is (best/, state/, metrics.jsonl, curves.png)",
                           resumable=True)
    output_prefix: str = knob(
        "", "as the reference training scripts: the run's folder becomes output_dir/<prefix><model_name_or_path "
            "with / as ->, e.g. --output_prefix kor_multi_ with the default model gives "
            "output/kor_multi_kakaobank-kf-deberta-base. The reference also appended a timestamp; kfdeb does not, "
            "so the same command line finds its own run again with --resume (\"\": the run's folder is output_dir "
            "itself)", resumable=True)
    hub_model_id: str = knob("", "name of the model in its model card's usage snippets, e.g. "
                                 "user/kf-deberta-multitask (default: the output folder's name)", resumable=True)
    save_steps: int = knob(1000, "write resumable state every N steps (and at each epoch end)", resumable=True)
    logging_steps: int = knob(10, "log losses every N steps; also the most steps a SIGTERM waits before the run "
                                  "saves and stops", resumable=True)
    resume: bool = knob(False, "continue from the run folder's state/ (starts at step 0 when there is none)",
                        resumable=True)
    overwrite_output_dir: bool = knob(False, "start over in an output_dir that holds a previous run", resumable=True)
    # how it runs (not part of the maths)
    device: str = knob("auto", "auto (cuda:LOCAL_RANK if CUDA is available, else cpu), cpu, cuda (this rank's GPU), "
                               "cuda:N (one process)", resumable=True)
    amp: str = knob("auto", "autocast dtype: auto (bf16 on GPUs with native bf16, fp16 + GradScaler on older GPUs, "
                            "none on CPU), none, bf16, fp16 (GradScaler)", choices=("auto", "none", "bf16", "fp16"))
    pad_to_multiple_of: int = knob(0, "pad batches to a multiple of N tokens (0: 8 on GPU, 1 on CPU)")
    dist_timeout: int = knob(
        1800, "seconds a rank waits in a collective (e.g. while rank 0 saves a checkpoint) before the job fails; a "
              "rank that dies ends the job within seconds whatever this is", resumable=True)
    cache_dir: str = knob(
        "", "token cache folder: each objective's examples and token ids, built by the first run (one process per "
            "node) and memory-mapped by later runs and every rank; delete it to clear it (\"\": "
            "$XDG_CACHE_HOME/kfdeb, else ~/.cache/kfdeb)", resumable=True)
    no_cache: bool = knob(False, "no token cache: read and tokenize the training files in memory, in every run and rank",
                          resumable=True)
    progress: bool = knob(True, "show a progress bar", resumable=True)
    preset: str = knob("", "named defaults: multitask, nli, sts, smoke", resumable=True,
                       choices=("multitask", "nli", "sts", "smoke"))
    config: str = knob("", "JSON or YAML file of the same keys (command-line flags win)", resumable=True)

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
              "ir_dev_data": "kfdeb:korsts-dev", "ir_test_data": "kfdeb:korsts-test",
              "output_dir": "output/smoke", "overwrite_output_dir": True, "seed": 42},
}

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# what may change between a run and its --resume: how it goes, not what it computes (train_state.py checks)
RESUMABLE = frozenset(name for name, spec in _FIELDS.items() if spec.metadata["resumable"])
assert set(_FIELDS["preset"].metadata["choices"]) == set(PRESETS), "--preset's choices are the presets"


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
    for name, spec in _FIELDS.items():
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"{spec.metadata['help']} (default: {spec.default!r})"}
        if isinstance(spec.default, bool):
            kwargs.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
        else:
            kwargs["type"] = type(spec.default)
        if spec.metadata["choices"]:
            kwargs["choices"] = list(spec.metadata["choices"])
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
    if config.metric_for_best == "auto":
        config.metric_for_best = default_metric_for_best(config)
    validate(config)
    return config


def korsts_from_data_dir(config: TrainConfig) -> bool:
    """Whether data_dir's KorSTS dev and test files are evaluated (for the splits no --sts_*_file gives): in the
    reference recipes (the sts objective, or NLI from data_dir), and when --metric_for_best names a KorSTS figure
    and no --sts_dev_file gives one. A run on own in-batch files alone evaluates only the dev data it is given."""
    named = any(part in METRICS_FOR_BEST for part in config.metric_for_best.split("+"))
    return "sts" in config.task_list or not config.nli_train_files or (named and not config.sts_dev_file)


def default_metric_for_best(config: TrainConfig) -> str:
    """--metric_for_best auto: max_spearman (the reference's) when KorSTS dev is evaluated, ndcg@10 with retrieval
    dev data alone, "auto" (nothing selects: the final weights are kept) with no dev data."""
    if config.sts_dev_file or korsts_from_data_dir(config):
        return "max_spearman"
    return "ndcg@10" if config.ir_dev_data or config.ir_dev_fraction else "auto"


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
    if min(config.max_steps, config.pad_to_multiple_of, config.nli_mini_batch_size, config.save_max_seq_length) < 0:
        raise UserInputError("--max_steps, --pad_to_multiple_of, --nli_mini_batch_size, --save_max_seq_length must be >= 0")
    if not 0.0 < config.score_max < float("inf"):
        raise UserInputError(f"--score_max {config.score_max}: must be a positive number")
    if not 0.0 <= config.warmup_ratio <= 1.0:
        raise UserInputError(f"--warmup_ratio {config.warmup_ratio}: must be in [0, 1]")
    if config.learning_rate <= 0 or config.weight_decay < 0 or config.max_grad_norm <= 0:
        raise UserInputError("--learning_rate and --max_grad_norm must be > 0, --weight_decay >= 0")
    fraction = config.ir_dev_fraction
    if fraction and not (0.0 < fraction < 1.0 and "nli" in config.task_list and config.nli_train_files
                         and not config.ir_dev_data):
        raise UserInputError(f"--ir_dev_fraction {fraction}: a fraction (0 < F < 1) of the --nli_train_files rows, held "
                             "out as the only retrieval dev set (not with --ir_dev_data)")
    _validate_matryoshka(config)
    _validate_metric_for_best(config)
    for name, spec in _FIELDS.items():
        choices = spec.metadata["choices"]
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


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    return resolve(vars(args))
