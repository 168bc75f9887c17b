"""The sentence-transformers model folder: what kfdeb reads from one, and the layout it writes.

Read (`read_layout`): a plain Hugging Face encoder folder is Transformer + mean pooling. A
sentence-transformers folder lists its modules in `modules.json`:
    Transformer  the encoder's folder ("" or e.g. 0_Transformer/), with sentence_bert_config.json
                 (max_seq_length, do_lower_case)
    Pooling      NAME/config.json: `pooling_mode_mean_tokens: true` (v2 layout, one boolean per
                 mode; none set means mean) or `"pooling_mode": "mean"` (v3+)
    Normalize    unit-length embeddings
Any other module, or another pooling mode, is refused with a one-line error naming it.

Written (`write_layout`, what SentenceEncoder.save puts beside config.json and the weights):
    modules.json                [Transformer at "", Pooling at 1_Pooling (+ Normalize at 2_Normalize)]
    sentence_bert_config.json   {"max_seq_length": ..., "do_lower_case": ...}
    1_Pooling/config.json       word_embedding_dimension and the v2 booleans (mean tokens)
which `SentenceTransformer(folder)` opens as the same model, and `AutoModel.from_pretrained(folder)`
as the bare encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kfdeb.errors import UserInputError
from kfdeb.files import json_text, read_json

POOLING_DIR, NORMALIZE_DIR = "1_Pooling", "2_Normalize"


@dataclass(frozen=True)
class Layout:
    transformer_dir: Path  # where config.json, the weights and the tokenizer are
    pooling: str = "mean"
    normalize: bool = False
    max_seq_length: int | None = None  # sentence_bert_config.json's, if it says
    do_lower_case: bool = False
    is_sentence_transformers: bool = False  # a modules.json was read


def encoder_dir(folder: Path) -> Path:
    """Where the transformers encoder of a model folder lives (a sentence-transformers module may sit in a subfolder)."""
    return read_layout(folder).transformer_dir


def read_layout(folder: Path) -> Layout:
    """The folder's modules (module docstring); a folder without modules.json is a plain encoder."""
    transformer_dir, pooling, normalize, is_st = folder, "mean", False, False
    if (folder / "modules.json").exists():
        is_st, pooling = True, None
        modules = read_json(folder / "modules.json")
        if not isinstance(modules, list) or not modules:
            raise UserInputError(f"{folder / 'modules.json'}: expected a non-empty list of modules")
        for module in modules:
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            module_dir = folder / module.get("path", "")
            if kind == "Transformer":
                transformer_dir = module_dir
            elif kind == "Pooling":
                pooling = _pooling_mode(module_dir / "config.json")
            elif kind == "Normalize":
                normalize = True
            else:
                raise UserInputError(
                    f"{folder / 'modules.json'}: module {module.get('type')!r} is not supported "
                    "(kfdeb models are Transformer + mean Pooling [+ Normalize])"
                )
        if pooling is None:
            raise UserInputError(f"{folder / 'modules.json'}: no Pooling module")
    max_seq_length, do_lower_case = None, False
    if (transformer_dir / "sentence_bert_config.json").exists():
        settings = read_json(transformer_dir / "sentence_bert_config.json")
        max_seq_length = settings.get("max_seq_length")
        do_lower_case = bool(settings.get("do_lower_case", False))
    return Layout(transformer_dir, pooling, normalize, max_seq_length, do_lower_case, is_st)


def _pooling_mode(config_path: Path) -> str:
    config = read_json(config_path)
    modes = config.get("pooling_mode")
    if modes is None:  # the v2 layout: one boolean per mode; none set means mean
        modes = [k[len("pooling_mode_"):] for k, v in config.items() if k.startswith("pooling_mode_") and v]
        modes = modes or ["mean_tokens"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if modes not in (["mean"], ["mean_tokens"]):
        raise UserInputError(
            f"{config_path}: pooling {'+'.join(modes)} is not supported: kfdeb models use mean pooling "
            "(pooling_mode_mean_tokens)"
        )
    return "mean"


def write_layout(folder: Path, dimension: int, max_seq_length: int, do_lower_case: bool, normalize: bool) -> None:
    """The sentence-transformers files of a model whose encoder files are (or will be) in `folder` itself."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": POOLING_DIR, "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": NORMALIZE_DIR, "type": "sentence_transformers.models.Normalize"})
        (folder / NORMALIZE_DIR).mkdir(exist_ok=True)
    (folder / "modules.json").write_text(json_text(modules), encoding="utf-8")
    (folder / "sentence_bert_config.json").write_text(
        json_text({"max_seq_length": max_seq_length, "do_lower_case": do_lower_case}), encoding="utf-8")
    (folder / POOLING_DIR).mkdir(exist_ok=True)
    (folder / POOLING_DIR / "config.json").write_text(json_text({
        "word_embedding_dimension": dimension,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    }), encoding="utf-8")
