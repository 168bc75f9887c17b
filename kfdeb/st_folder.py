"""The sentence-transformers model folder: what kfdeb reads from one, and the layout it writes.

Read (`read_layout`): a plain Hugging Face encoder folder is Transformer + mean pooling. A
sentence-transformers folder lists its modules in `modules.json`:
    Transformer  the encoder's folder ("" or e.g. 0_Transformer/), with sentence_bert_config.json
                 (max_seq_length, do_lower_case)
    Pooling      NAME/config.json: `pooling_mode_mean_tokens: true` or `pooling_mode_cls_token: true`
                 (v2 layout, one boolean per mode; none set means mean), or `"pooling_mode": "mean"` /
                 `"cls"` (v3+); `include_prompt: false` (prompt tokens left out of the mean) is refused
    Normalize    unit-length embeddings
and, beside modules.json, config_sentence_transformers.json: its `prompts` ({"query": "query: ",
"document": "passage: "}) and `default_prompt_name`. Any other module, or another pooling mode
(max, weighted mean, last token, mean_sqrt_len), is refused with a one-line error naming it.

Written (`write_layout`, what SentenceEncoder.save puts beside config.json and the weights):
    modules.json                [Transformer at "", Pooling at 1_Pooling (+ Normalize at 2_Normalize)]
    sentence_bert_config.json   {"max_seq_length": ..., "do_lower_case": ...}
    1_Pooling/config.json       word_embedding_dimension and the v2 booleans (mean or CLS token)
    config_sentence_transformers.json   the prompts, when the model has any
which `SentenceTransformer(folder)` opens as the same model, and `AutoModel.from_pretrained(folder)`
as the bare encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kfdeb.errors import UserInputError
from kfdeb.files import json_text, read_json

POOLING_DIR, NORMALIZE_DIR = "1_Pooling", "2_Normalize"
PROMPTS_FILE = "config_sentence_transformers.json"
POOLINGS = {"mean_tokens": "mean", "mean": "mean", "cls_token": "cls", "cls": "cls"}  # a mode's names -> ours


@dataclass(frozen=True)
class Layout:
    transformer_dir: Path  # where config.json, the weights and the tokenizer are
    pooling: str = "mean"
    normalize: bool = False
    max_seq_length: int | None = None  # sentence_bert_config.json's, if it says
    do_lower_case: bool = False
    is_sentence_transformers: bool = False  # a modules.json was read
    prompts: dict[str, str] = field(default_factory=dict)  # name -> text prepended before tokenization
    default_prompt_name: str | None = None


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
    prompts, default_prompt_name = _prompts(folder / PROMPTS_FILE)
    return Layout(transformer_dir, pooling, normalize, max_seq_length, do_lower_case, is_st, prompts, default_prompt_name)


def _prompts(path: Path) -> tuple[dict[str, str], str | None]:
    if not path.exists():
        return {}, None
    config = read_json(path)
    prompts = config.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise UserInputError(f"{path}: prompts: expected an object of prompt names to texts")
    default = config.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise UserInputError(f"{path}: default_prompt_name: {default!r} is not one of the prompts ({', '.join(prompts)})")
    return dict(prompts), default


def _pooling_mode(config_path: Path) -> str:
    config = read_json(config_path)
    modes = config.get("pooling_mode")
    if modes is None:  # the v2 layout: one boolean per mode; none set means mean
        modes = [k[len("pooling_mode_"):] for k, v in config.items() if k.startswith("pooling_mode_") and v]
        modes = modes or ["mean_tokens"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1 or modes[0] not in POOLINGS:
        raise UserInputError(
            f"{config_path}: pooling {'+'.join(modes)} is not supported: kfdeb pools by the mean of the tokens "
            "(pooling_mode_mean_tokens) or the first token (pooling_mode_cls_token)"
        )
    if config.get("include_prompt", True) is False:
        raise UserInputError(f"{config_path}: include_prompt false (prompt tokens left out of the pooling) is not "
                             "supported: kfdeb pools over every token, the prompt's included")
    return POOLINGS[modes[0]]


def write_layout(folder: Path, dimension: int, max_seq_length: int, do_lower_case: bool, normalize: bool,
                 pooling: str = "mean", prompts: dict[str, str] | None = None, default_prompt_name: str | None = None) -> None:
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
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    }), encoding="utf-8")
    if prompts:  # read by SentenceTransformer(folder).encode_query / encode_document, and by kfdeb
        (folder / PROMPTS_FILE).write_text(json_text({"prompts": prompts, "default_prompt_name": default_prompt_name,
                                                      "similarity_fn_name": "cosine"}), encoding="utf-8")
