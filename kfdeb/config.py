"""TrainConfig: every knob of a training run, its command-line flags, presets and config files.

Precedence, lowest to highest: the dataclass defaults (the reference multitask recipe), the
`--preset`, the `--config FILE` (JSON or YAML with the same keys), then flags given on the
command line. The resolved config is written to the output dir, so a run says what it ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from kfdeb.batching import NLI_TRIPLET_SCOPES
from kfdeb.config_checks import METRICS_FOR_BEST, TASKS, validate
from kfdeb.errors import UserInputError, first_line
from kfdeb.flags import PROGRESS_CHOICES, PROGRESS_HELP, FlagParser, add_field_flags, presets_help, progress_value
from kfdeb.ir_metrics import IR_KEYS
from kfdeb.losses import GIST_MARGIN_STRATEGIES, NLI_LOSSES, STS_LOSSES

TINY_MODEL = "kfdeb:tiny-deberta"  # build a random tiny DeBERTa-v2 offline (kfdeb/tiny.py)
TINY_START_DIR = "init-tiny-deberta"  # where a run from TINY_MODEL keeps the weights it built
BUNDLED = "kfdeb:bundled"  # the KorNLU files shipped inside the package (kfdeb/bundled/kor-nlu)


# --help's sections, in this order; every field names one of them (tests/test_config.py checks)
GROUPS = {"recipe": "preset and config file", "model": "model", "data": "data", "objectives": "objectives",
          "schedule": "schedule", "evaluation": "evaluation and selection", "distributed": "device and distributed",
          "output": "output and logging"}


def knob(default: Any, help: str, resumable: bool = False, choices: Sequence[str] = (), group: str = "") -> Any:
    """A TrainConfig field with everything about it in one place: its default, its --help text, whether
    it may change between a run and its --resume (how a run goes, not what it computes), its choices,
    and its section of --help (a key of GROUPS)."""
    return field(default=default, metadata={"help": help, "resumable": resumable, "choices": tuple(choices),
                                            "group": group})


@dataclass
class TrainConfig:
    # what to train (flag names as in the reference training scripts)
    model_name_or_path: str = knob(
        "kakaobank/kf-deberta-base", f"encoder to fine-tune: local folder or hub id ({TINY_MODEL}: tiny random DeBERTa-v2)",
        group="model")
    data_dir: str = knob("kor-nlu-datasets", f"kor-nlu-datasets clone ({BUNDLED}: the files shipped with kfdeb)",
                         group="data")
    nli_train_glob: str = knob("KorNLI/*train.ko.tsv", "KorNLI training files, relative to data_dir", group="data")
    # your own files (.tsv, .csv, .jsonl; readers.py): each one given replaces what data_dir would give
    nli_train_files: str = knob(
        "", "your own training files for the in-batch negatives (nli) objective instead of data_dir/nli_train_glob: "
            "comma-separated paths or globs, .tsv/.csv/.jsonl, each of NLI pairs (sentence1, sentence2, gold_label), "
            "triplets (anchor, positive, negative) or pairs (anchor, positive); pairs cannot be mixed with the others",
            group="data")
    sts_train_file: str = knob("", "your own scored pairs (sentence1, sentence2, score; .tsv/.csv/.jsonl) for the sts "
                                   "objective instead of data_dir's KorSTS train", group="data")
    sts_dev_file: str = knob("", "your own scored pairs for dev evaluation (best checkpoint) instead of KorSTS dev",
                             group="evaluation")
    sts_test_file: str = knob("", "your own scored pairs for the final test evaluation instead of KorSTS test",
                              group="evaluation")
    score_max: float = knob(5.0, "the highest score of the --sts_*_file files: label = score / score_max, a score "
                                 "outside 0..score_max is an error (KorSTS files under data_dir are always 0..5)",
                                 group="data")
    tasks: str = knob("nli,sts", "comma-separated objectives: nli, sts or nli,sts", group="objectives")
    nli_triplet_scope: str = knob(
        "per_file", "per_file (reference: triplets built file by file, then concatenated) or union (one partner "
                    "table over all files: a sentence in several files is an anchor once)", choices=NLI_TRIPLET_SCOPES,
                    group="data")
    max_seq_length: int = knob(256, "tokens per sentence in training, [CLS]/[SEP] included", group="model")
    save_max_seq_length: int = knob(0, "the limit the saved model keeps, at which dev/test evaluations run (0: the longer of "
                                       "--max_seq_length and the start model's own, as sentence-transformers reads it)",
                                    group="model")
    nli_batch_size: int = knob(64, "global batch of the in-batch negatives (nli) objective, whatever the number of GPUs",
                               group="objectives")
    sts_batch_size: int = knob(8, "global batch of the sts objective, whatever the number of GPUs", group="objectives")
    batch_size: int = knob(
        0, "the flag of the reference's single-objective scripts (training_nli.py, training_sts.py): the global batch "
           "size of the one objective of --tasks (with --preset nli: --nli_batch_size; with --preset sts: "
           "--sts_batch_size); refused with both objectives (0: unset)", resumable=True, group="objectives")
    nli_mini_batch_size: int = knob(
        0, "GradCache: embed each rank's NLI batch this many triplets at a time, for the exact gradient of a large "
           "--nli_batch_size at the memory of a small one (0: off)", group="objectives")
    num_epochs: int = knob(10, "epochs; an epoch is the shorter objective's batch count", group="schedule")
    max_steps: int = knob(0, "stop after this many steps (0: num_epochs); the schedule spans them", group="schedule")
    learning_rate: float = knob(2e-5, "AdamW's learning rate, after linear warmup, then linear decay to 0", group="schedule")
    warmup_ratio: float = knob(0.1, "warmup over ceil(ratio x steps) steps", group="schedule")
    weight_decay: float = knob(0.01, "AdamW weight decay, except bias and LayerNorm parameters", group="schedule")
    max_grad_norm: float = knob(1.0, "gradient-norm clipping", group="schedule")
    optimizer: str = knob("per_task", "per_task (reference: one AdamW + schedule per objective, 2 updates a step) "
                                      "or joint (one AdamW over the summed losses)", choices=("per_task", "joint"),
                                      group="schedule")
    seed: int = knob(42, "seeds the triplets, every sampler pass and dropout (each rank: seed + rank)", group="schedule")
    query_prompt: str = knob(
        "auto", "text prepended to the anchors of the in-batch negatives (nli) objective and to the queries of "
                "retrieval evaluation (auto: the model's own prompt named query, as e5's 'query: '; \"\": none); "
                "the trained model keeps it, for encode_query. KorSTS pairs get no prompt, in training and evaluation, "
                "as sentence-transformers' STS evaluator encodes them", group="model")
    document_prompt: str = knob(
        "auto", "text prepended to the positives and negatives of the in-batch objective and to the documents of "
                "retrieval evaluation (auto: the model's own prompt named document or passage; \"\": none)", group="model")
    pooling: str = knob("auto", "mean or cls: the pooling of a plain Hugging Face model (auto: mean, the reference's); "
                                "a sentence-transformers folder pools as its Pooling module says",
                        choices=("auto", "mean", "cls"), group="model")
    # what the objectives optimise beyond the reference recipe (losses.py)
    sts_loss: str = knob(
        "cosine", "loss of the sts objective: cosine (MSE between cosine and score / 5, the reference), cosent "
                  "(CoSENT ranking loss, scale 20) or angle (AnglE: the same ranking loss on the angle similarity)",
        choices=STS_LOSSES, group="objectives")
    nli_loss: str = knob(
        "mnrl", "loss of the in-batch negatives (nli) objective, as sentence-transformers names them: mnrl "
                "(MultipleNegativesRankingLoss, the reference), mnrl_symmetric (MultipleNegativesSymmetricRankingLoss: "
                "anchor -> positives and positive -> anchors, averaged) or gist (GISTEmbedLoss: --guide_model masks the "
                "in-batch candidates it scores above the true positive). In every one, rows that share a positive "
                "text are never negatives of each other", choices=NLI_LOSSES, group="objectives")
    scale: float = knob(20.0, "scale of the in-batch losses' cosines (1 / temperature): 20 is the reference recipe's "
                              "and sentence-transformers' default; e5 was trained at temperature 0.01 = scale 100",
                       group="objectives")
    guide_model: str = knob(
        "", "--nli_loss gist's guide: a model folder or hub id, or self: a frozen copy of the starting weights (the "
            "model before training; no second model file, no optimizer state, never saved: --resume makes it "
            "again from --model_name_or_path). Embeds the batch's texts once a step, in eval mode, without gradient",
        group="objectives")
    gist_margin_strategy: str = knob(
        "absolute", "GISTEmbedLoss's margin_strategy: absolute masks candidates the guide scores above "
                    "(positive - margin), relative above (positive - |positive| x margin)",
        choices=GIST_MARGIN_STRATEGIES, group="objectives")
    gist_margin: float = knob(0.0, "GISTEmbedLoss's margin (0: mask what the guide scores above the positive)",
                              group="objectives")
    gist_contrast_anchors: bool = knob(True, "GISTEmbedLoss's contrast_anchors: the batch's other anchors are "
                                             "candidates too (guide-masked)", group="objectives")
    gist_contrast_positives: bool = knob(True, "GISTEmbedLoss's contrast_positives: the positive against the "
                                               "batch's other positives is a term too (guide-masked)",
                                        group="objectives")
    matryoshka_dims: str = knob(
        "", "Matryoshka (MRL): comma-separated embedding widths, largest first, e.g. 768,512,256,128,64,32; both "
            "objectives sum their loss over these prefixes of the embedding (one forward); dev evaluation reports "
            "every width and selects the best checkpoint at the first", group="objectives")
    matryoshka_weights: str = knob("", "comma-separated weight of each --matryoshka_dims width (default: 1 each)",
                                   group="objectives")
    remine_every: int = knob(
        0, "re-mine the in-batch rows' negatives with the current weights every N steps (kfdeb/remine.py; rows with "
           "negatives, e.g. mine.py's output; rank 0 mines over the rows' positives and negatives; 0: off)",
        group="objectives")
    remine_options: str = knob("", "mine.py's options for --remine_every, e.g. range_min=10,absolute_margin=0.1 "
                                   "(range_min, range_max, max_score, min_score, absolute_margin, relative_margin, "
                                   "sampling_strategy)", group="objectives")
    # evaluation and outputs
    eval_steps: int = knob(1000, "dev evaluation every N steps (and at each epoch end)", group="evaluation")
    eval_batch_size: int = knob(64, "sentences per batch when evaluating", resumable=True, group="evaluation")
    eval_dtype: str = knob(
        "float32", "what the dev evaluations (and the final dev and test ones) encode in: float32 (the default, so "
                   "a run's figures are unchanged), bfloat16, float16, or auto (bfloat16 on a GPU with native bf16 or "
                   "a CPU with amx_bf16/avx512_bf16, else float32); pooling and similarity stay float32 "
                   "(kfdeb/inference_dtype.py); training's forward follows --amp",
        choices=("float32", "bfloat16", "float16", "auto"), group="evaluation")
    metric_for_best: str = knob(
        "auto", "dev figure that selects the best checkpoint (with --matryoshka_dims: at the first width): "
                f"{', '.join(METRICS_FOR_BEST)}; with retrieval dev data a retrieval figure ({', '.join(IR_KEYS)}) or "
                "the mean of a KorSTS and a retrieval figure, e.g. cosine_spearman+ndcg@10 (auto: max_spearman where "
                "KorSTS dev is evaluated, else ndcg@10 with retrieval dev data, else none: the final weights are kept)",
        group="evaluation")
    ir_dev_data: str = knob(
        "", "retrieval evaluated beside KorSTS at every dev evaluation: a BEIR folder (corpus.jsonl, queries.jsonl, "
            "qrels/SPLIT.tsv) or a .tsv/.csv/.jsonl file of anchor, positive pairs; kfdeb:korsts-dev is the bundled "
            "KorSTS dev paraphrase set", group="evaluation")
    ir_dev_split: str = knob("dev", "the qrels split of a BEIR --ir_dev_data", group="evaluation")
    ir_dev_fraction: float = knob(0.0, "hold out this fraction of the --nli_train_files rows (whole groups sharing an anchor "
                                       "or a positive; seeded) as the retrieval dev set, saved in ir_dev_split/ (0: off)",
                                      group="evaluation")
    ir_test_data: str = knob("", "retrieval evaluated beside KorSTS on the best model at the end (kfdeb:korsts-test: "
                                 "the bundled KorSTS test paraphrase set)", group="evaluation")
    ir_test_split: str = knob("test", "the qrels split of a BEIR --ir_test_data", group="evaluation")
    output_dir: str = knob("output", "where the run's folder is (best/, state/, metrics.jsonl, curves.png)",
                           resumable=True, group="output")
    output_prefix: str = knob(
        "", "as the reference training scripts: the run's folder becomes output_dir/<prefix><model_name_or_path "
            "with / as ->, e.g. --output_prefix kor_multi_ with the default model gives "
            "output/kor_multi_kakaobank-kf-deberta-base. The reference also appended a timestamp; kfdeb does not, "
            "so the same command line finds its own run again with --resume (\"\": the run's folder is output_dir "
            "itself)", resumable=True, group="output")
    hub_model_id: str = knob("", "name of the model in its model card's usage snippets, e.g. "
                                 "user/kf-deberta-multitask (default: the output folder's name)", resumable=True,
                                 group="output")
    save_steps: int = knob(1000, "write resumable state every N steps (and at each epoch end)", resumable=True,
                           group="output")
    logging_steps: int = knob(10, "log losses every N steps; also the most steps a SIGTERM waits before the run "
                                  "saves and stops", resumable=True, group="output")
    resume: bool = knob(False, "continue from the run folder's state/ (starts at step 0 when there is none)",
                        resumable=True, group="output")
    overwrite_output_dir: bool = knob(False, "start over in an output_dir that holds a previous run", resumable=True,
                                      group="output")
    # how it runs (not part of the maths)
    device: str = knob("auto", "auto (cuda:LOCAL_RANK if CUDA is available, else cpu), cpu, cuda (this rank's GPU), "
                               "cuda:N (one process)", resumable=True, group="distributed")
    amp: str = knob("auto", "autocast dtype: auto (bf16 on GPUs with native bf16, fp16 + GradScaler on older GPUs, "
                            "none on CPU), none, bf16, fp16 (GradScaler)", choices=("auto", "none", "bf16", "fp16"),
                            group="distributed")
    pad_to_multiple_of: int = knob(0, "pad batches to a multiple of N tokens (0: 8 on GPU, 1 on CPU)", group="distributed")
    dist_timeout: int = knob(
        1800, "seconds a rank waits in a collective (e.g. while rank 0 saves a checkpoint) before the job fails; a "
              "rank that dies ends the job within seconds whatever this is", resumable=True, group="distributed")
    cache_dir: str = knob(
        "", "token cache folder: each objective's examples and token ids, built by the first run (one process per "
            "node) and memory-mapped by later runs and every rank; delete it to clear it (\"\": "
            "$XDG_CACHE_HOME/kfdeb, else ~/.cache/kfdeb)", resumable=True, group="data")
    no_cache: bool = knob(False, "no token cache: read and tokenize the training files in memory, in every run and rank",
                          resumable=True, group="data")
    progress: str = knob("auto", PROGRESS_HELP, resumable=True, choices=PROGRESS_CHOICES, group="output")
    preset: str = knob("", "named defaults (what each sets: the end of --help)", resumable=True,
                       choices=("multitask", "nli", "sts", "smoke", "retriever"), group="recipe")
    config: str = knob("", "JSON or YAML file of the same keys (command-line flags win)", resumable=True, group="recipe")

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
    # fine-tuning a retriever on your own pairs (bench/retriever_recipe.py measured the levers on e5, chosen on dev):
    # the in-batch objective alone, selected on retrieval dev data (auto: ndcg@10), the start kept unless beaten
    "retriever": {"tasks": "nli", "nli_loss": "mnrl", "scale": 100.0, "nli_batch_size": 32, "num_epochs": 1,
                  "learning_rate": 2e-5, "warmup_ratio": 0.1, "max_seq_length": 128, "eval_steps": 50,
                  "metric_for_best": "auto"},
}

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# what may change between a run and its --resume: how it goes, not what it computes (train_state.py checks)
RESUMABLE = frozenset(name for name, spec in _FIELDS.items() if spec.metadata["resumable"])
assert set(_FIELDS["preset"].metadata["choices"]) == set(PRESETS), "--preset's choices are the presets"
PRESET_SUMMARIES = {  # what --help says of each preset, before the values it sets (listed from PRESETS)
    "multitask": "the published multitask recipe (kf-deberta-multitask, ko-sroberta-multitask)",
    "nli": "the reference's training_nli.py: the in-batch negatives objective alone",
    "sts": "the reference's training_sts.py: the sts objective alone",
    "smoke": "offline pipeline check (not model quality): a tiny random DeBERTa-v2 on the bundled files",
    "retriever": "fine-tuning for retrieval on your own pairs (give --nli_train_files and --ir_dev_data or "
                 "--ir_dev_fraction): the levers as measured on e5 (bench/RESULTS.md)",
}
assert set(PRESET_SUMMARIES) == set(PRESETS), "every preset has its summary"


def build_parser() -> argparse.ArgumentParser:
    """train.py's flags, one per TrainConfig field, in --help sections by the field's group (GROUPS)."""
    width = min(shutil.get_terminal_size().columns, 120) - 2
    parser = FlagParser(
        prog="train.py", usage="train.py [--preset NAME] [--config FILE] [--FLAG VALUE ...]",
        description=textwrap.fill(
            "Multitask fine-tuning of a sentence encoder on KorNLI + KorSTS (kfdeb). Precedence: defaults < --preset "
            "< --config FILE < flags; a flag may be spelled with dashes (--learning-rate).", width),
        epilog=presets_help(PRESETS, PRESET_SUMMARIES, width), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_field_flags(parser, _FIELDS.values(), GROUPS)
    return parser


def _coerce(name: str, value: Any, source: str) -> Any:
    if name == "progress":  # auto, true or false; a bool (what --progress was) means true or false
        return progress_value(value, f"{source}: progress")
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
    if "progress" in values:
        values["progress"] = progress_value(values["progress"], "--progress")
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


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    return resolve(vars(args))
