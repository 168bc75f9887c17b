"""TrainConfig (kfdeb/config.py): reference defaults, presets, config files, precedence, validation."""

from __future__ import annotations

import json

import pytest

from kfdeb.config import parse_args, resolve
from kfdeb.errors import UserInputError


def test_defaults_are_the_reference_multitask_recipe():
    config = parse_args([])
    assert (config.model_name_or_path, config.data_dir, config.max_seq_length, config.nli_batch_size,
            config.sts_batch_size, config.num_epochs, config.eval_steps, config.learning_rate, config.warmup_ratio,
            config.weight_decay, config.max_grad_norm, config.output_dir, config.seed, config.optimizer, config.tasks) == (
        "kakaobank/kf-deberta-base", "kor-nlu-datasets", 256, 64, 8, 10, 1000, 2e-5, 0.1, 0.01, 1.0, "output", 42,
        "per_task", "nli,sts")


@pytest.mark.parametrize("preset,expected", [
    ("multitask", {"tasks": "nli,sts", "max_seq_length": 256, "nli_batch_size": 64, "sts_batch_size": 8, "num_epochs": 10, "seed": 42}),
    ("nli", {"tasks": "nli", "nli_batch_size": 64, "num_epochs": 1, "max_seq_length": 128, "seed": 777, "warmup_ratio": 0.1}),
    ("sts", {"tasks": "sts", "sts_batch_size": 8, "num_epochs": 5, "max_seq_length": 128, "seed": 777}),
    ("smoke", {"model_name_or_path": "kfdeb:tiny-deberta", "data_dir": "kfdeb:bundled", "nli_train_glob": "KorNLI/xnli.*.ko.tsv"}),
])
def test_presets_resolve_to_their_recipes(preset, expected):
    config = parse_args(["--preset", preset])
    assert {key: getattr(config, key) for key in expected} == expected
    assert config.preset == preset


def test_precedence_defaults_preset_file_flags(tmp_path):
    (tmp_path / "run.yaml").write_text("preset: nli\nnum_epochs: 3\nlearning_rate: 5.0e-5\nseed: 1\n")
    (tmp_path / "run.json").write_text(json.dumps({"num_epochs": 4, "amp": "bf16"}))
    from_yaml = parse_args(["--config", str(tmp_path / "run.yaml"), "--seed", "9"])
    assert (from_yaml.tasks, from_yaml.max_seq_length) == ("nli", 128)  # the file's preset
    assert (from_yaml.num_epochs, from_yaml.learning_rate) == (3, 5e-5)  # the file over the preset
    assert from_yaml.seed == 9  # the flag over the file
    from_json = parse_args(["--preset", "sts", "--config", str(tmp_path / "run.json"), "--resume"])
    assert (from_json.tasks, from_json.num_epochs, from_json.amp, from_json.resume) == ("sts", 4, "bf16", True)


@pytest.mark.parametrize("content,message", [
    ("nonsense: 1\n", "nonsense: unknown config key"),
    ("num_epochs: many\n", "num_epochs: expected int, got 'many'"),
    ("[1, 2]\n", "expected a mapping of config keys"),
    ("num_epochs: [\n", "not valid YAML"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(UserInputError) as err:
        parse_args(["--config", str(path)])
    assert str(err.value).startswith(str(path)) and message in str(err.value)


@pytest.mark.parametrize("overrides,message", [
    ({"tasks": "nli,qa"}, "--tasks 'nli,qa'"),
    ({"nli_batch_size": 0}, "--nli_batch_size 0: must be at least 1"),
    ({"warmup_ratio": 1.5}, "--warmup_ratio 1.5"),
    ({"preset": "bogus"}, "--preset 'bogus': expected one of multitask, nli, sts, smoke"),
    ({"score_max": 0.0}, "--score_max 0.0: must be a positive number"),
    ({"matryoshka_dims": "256,768"}, "--matryoshka_dims 256,768: list the widths largest first, each once"),
    ({"matryoshka_dims": "768,256,256"}, "list the widths largest first, each once"),
    ({"matryoshka_dims": "768,half"}, "--matryoshka_dims '768,half': expected comma-separated ints"),
    ({"matryoshka_dims": "768,0"}, "--matryoshka_dims '768,0': every value must be > 0"),
    ({"matryoshka_dims": "768,256", "matryoshka_weights": "1"}, "--matryoshka_weights 1: one weight per --matryoshka_dims width"),
    ({"matryoshka_dims": "768", "matryoshka_weights": "-1"}, "--matryoshka_weights '-1': every value must be > 0"),
    ({"sts_loss": "triplet"}, "--sts_loss 'triplet': expected one of cosine, cosent, angle"),
    ({"nli_loss": "infonce"}, "--nli_loss 'infonce': expected one of mnrl, mnrl_symmetric, gist"),
    ({"scale": 0.0}, "--scale 0.0: must be a positive number"),
    ({"scale": float("nan")}, "--scale nan: must be a positive number"),
    ({"nli_loss": "gist"}, "--nli_loss gist: needs --guide_model"),
    ({"guide_model": "self"}, "--guide_model self: only --nli_loss gist uses a guide"),
    ({"nli_loss": "gist", "guide_model": "self", "gist_margin_strategy": "percent"},
     "--gist_margin_strategy 'percent': expected one of absolute, relative"),
    ({"nli_loss": "gist", "guide_model": "self", "gist_margin": float("inf")}, "--gist_margin inf: must be a finite"),
    ({"nli_loss": "mnrl_symmetric", "tasks": "sts"}, "--nli_loss mnrl_symmetric: the in-batch objective is not trained"),
])
def test_invalid_values_are_refused(overrides, message):
    with pytest.raises(UserInputError, match=message.replace("(", r"\(")):
        resolve(overrides)


def test_matryoshka_flags_as_in_jhgan00s_scripts(tmp_path):
    config = parse_args(["--matryoshka_dims", "768, 512,256,128,64,32", "--sts_loss", "angle"])
    assert config.matryoshka_dim_list == (768, 512, 256, 128, 64, 32)
    assert config.matryoshka_weight_list == (1.0,) * 6 and config.sts_loss == "angle"
    (tmp_path / "run.yaml").write_text("matryoshka_dims: [768, 256]\nmatryoshka_weights: [1, 0.5]\n")  # YAML lists too
    from_yaml = parse_args(["--config", str(tmp_path / "run.yaml")])
    assert (from_yaml.matryoshka_dim_list, from_yaml.matryoshka_weight_list) == ((768, 256), (1.0, 0.5))
    assert parse_args([]).matryoshka_dim_list == () and parse_args([]).sts_loss == "cosine"  # the reference recipe


SEED_FLAGS = {  # every flag of the reference training scripts (upskyy/kf-deberta-multitask, jhgan00/ko-sentence-transformers)
    "training_multi_task.py": ["--model_name_or_path", "m/x", "--max_seq_length", "256", "--nli_batch_size", "64",
                               "--sts_batch_size", "8", "--num_epochs", "10", "--eval_steps", "1000",
                               "--learning_rate", "2e-5", "--output_dir", "output", "--output_prefix", "kor_multi_",
                               "--seed", "42", "--matryoshka_dims", "768,512", "--matryoshka_weights", "1,1"],
    "training_nli.py": ["--preset", "nli", "--model_name_or_path", "m/x", "--max_seq_length", "128", "--batch_size", "32",
                        "--num_epochs", "1", "--eval_steps", "1000", "--learning_rate", "2e-5", "--output_dir", "output",
                        "--output_prefix", "kor_nli_", "--seed", "777", "--matryoshka_dims", "768"],
    "training_sts.py": ["--preset", "sts", "--model_name_or_path", "m/x", "--max_seq_length", "128", "--batch_size", "16",
                        "--num_epochs", "5", "--eval_steps", "1000", "--learning_rate", "2e-5", "--output_dir", "output",
                        "--output_prefix", "kor_sts_", "--seed", "777"],
}


@pytest.mark.parametrize("script", SEED_FLAGS)
def test_the_reference_scripts_flags_keep_their_meaning(script):
    config = parse_args(SEED_FLAGS[script])
    prefix = {"training_multi_task.py": "kor_multi_", "training_nli.py": "kor_nli_", "training_sts.py": "kor_sts_"}[script]
    # the reference's output_dir/<prefix><model id, / as -> without its timestamp, so --resume finds it again
    assert str(config.run_dir) == f"output/{prefix}m-x"
    if script == "training_nli.py":  # --batch_size: the batch of the one objective the script trains
        assert (config.task_list, config.nli_batch_size) == (["nli"], 32)
    if script == "training_sts.py":
        assert (config.task_list, config.sts_batch_size) == (["sts"], 16)
    assert parse_args(["--output_dir", "out"]).run_dir.as_posix() == "out"  # no prefix: the folder itself


@pytest.mark.parametrize("args,message", [
    (["--batch_size", "32"], "--batch_size 32: the batch size of a single-objective run"),
    (["--preset", "nli", "--batch_size", "32", "--nli_batch_size", "16"],
     "--batch_size 32 and --nli_batch_size 16 name the same batch; give one of them"),
    (["--output_prefix", "a/b"], "--output_prefix 'a/b': a folder-name prefix, without '/'"),
])
def test_seed_flags_refuse_what_has_no_meaning(args, message):
    with pytest.raises(UserInputError, match=message):
        parse_args(args)


def help_sections(monkeypatch) -> dict[str, str]:
    """train.py --help (wide, so no flag wraps) as {section title: its text}."""
    from kfdeb.config import build_parser

    monkeypatch.setenv("COLUMNS", "250")
    sections = {}
    for block in build_parser().format_help().split("\n\n"):
        title, _, body = block.partition(":\n")
        sections[title] = body
    return sections


def test_every_field_names_its_help_section():
    """A new TrainConfig field needs its group= (one of GROUPS): a field without one fails here, by name."""
    import dataclasses

    from kfdeb.config import GROUPS, TrainConfig

    ungrouped = [f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("group") not in GROUPS]
    assert not ungrouped, f"give these TrainConfig fields a group= (one of {', '.join(GROUPS)}): {ungrouped}"


def test_help_is_sectioned_by_concern_with_one_default_each(monkeypatch):
    import dataclasses

    from kfdeb.config import GROUPS, TrainConfig

    sections = help_sections(monkeypatch)
    assert [title for title in sections if title in GROUPS.values()] == list(GROUPS.values())  # in this order
    assert sections["options"].strip().startswith("-h, --help") and "\n  --" not in sections["options"]
    for spec in dataclasses.fields(TrainConfig):
        text = sections[GROUPS[spec.metadata["group"]]]
        entries = (" ".join(entry.split()) for entry in ("\n" + text).split("\n  --"))  # a flag's lines, joined
        [line] = [entry for entry in entries if entry.startswith(f"{spec.name} ")]
        assert line.count("(default:") <= 1, line
        if spec.default == "":
            assert "(default: )" not in line and "(default: '')" not in line, line
        elif "default:" not in spec.metadata["help"]:
            shown = str(spec.default).lower() if isinstance(spec.default, bool) else str(spec.default)
            assert line.endswith(f"(default: {shown})"), line
    assert "(default: '')" not in "".join(sections.values())


def test_help_lists_what_each_preset_sets(monkeypatch):
    from kfdeb.config import PRESETS

    text = help_sections(monkeypatch)["presets (--preset NAME sets these; --config and flags override them)"]
    blocks: dict[str, str] = {}
    for line in text.splitlines():  # a preset's first line is indented by 2, what follows by 4
        if line.startswith("  ") and not line.startswith("    "):
            name = line.split(":")[0].strip()
        blocks[name] = blocks.get(name, "") + line
    assert set(blocks) == set(PRESETS)
    for name, values in PRESETS.items():
        flags = " ".join(blocks[name].split())
        for key, value in values.items():
            assert f"--{key} {str(value).lower() if isinstance(value, bool) else value}" in flags, (name, key)


def test_flags_spelled_with_dashes_are_the_underscore_flags():
    spelled = parse_args(["--learning-rate", "1e-4", "--max-seq-length=32", "--overwrite-output-dir",
                          "--metric-for-best", "cosine_spearman", "--nli-batch-size", "16"])
    assert spelled == parse_args(["--learning_rate", "1e-4", "--max_seq_length", "32", "--overwrite_output_dir",
                                  "--metric_for_best", "cosine_spearman", "--nli_batch_size", "16"])
    assert (spelled.learning_rate, spelled.max_seq_length, spelled.overwrite_output_dir) == (1e-4, 32, True)


@pytest.mark.parametrize("given,expected", [([], "auto"), (["--progress"], "true"), (["--progress", "false"], "false"),
                                            (["--progress", "auto"], "auto"), (["--progress=no"], "false")])
def test_progress_takes_auto_true_false(given, expected, tmp_path):
    assert parse_args(given).progress == expected
    (tmp_path / "run.yaml").write_text("progress: false\n")  # the bool config files held before
    assert parse_args(["--config", str(tmp_path / "run.yaml"), *given]).progress == (expected if given else "false")
    assert resolve({"progress": True}).progress == "true"


def test_in_batch_levers_flags_and_resume():
    """--scale, --nli_loss, --guide_model and GIST's options change what a run computes: a --resume must keep them."""
    from kfdeb.config import RESUMABLE

    config = parse_args(["--tasks", "nli", "--nli_loss", "gist", "--guide_model", "self", "--scale", "100",
                         "--gist_margin_strategy", "relative", "--gist_margin", "0.05", "--gist_contrast_anchors", "false"])
    assert (config.nli_loss, config.guide_model, config.scale, config.gist_margin_strategy, config.gist_margin,
            config.gist_contrast_anchors, config.gist_contrast_positives) == ("gist", "self", 100.0, "relative", 0.05,
                                                                              False, True)
    assert parse_args([]).scale == 20.0 and parse_args([]).nli_loss == "mnrl"  # the recipe's
    levers = {"nli_loss", "scale", "guide_model", "gist_margin_strategy", "gist_margin", "gist_contrast_anchors",
              "gist_contrast_positives"}
    assert not levers & RESUMABLE
