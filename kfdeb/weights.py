"""Where a model's files come from, how its tensors are read, and the check that they fit the model.

Folders and hub ids (`resolve_model_dir`): a local folder is used as it is (a training run's
folder stands for its `best/` model); anything else that looks like a hub id is downloaded the
way it is published: first the configs and tokenizer files (`*.json`, `*.txt`, `*.model`, never
code), which say where the encoder lives (modules.json) and whether kfdeb can use the model at
all; then, from the repo's file list, only the weights it will read: `model.safetensors` (or its
shards) when the repo has them, else `pytorch_model.bin` (or its shards). huggingface_hub does
the transfers, so HF_ENDPOINT, HF_HOME / HF_HUB_CACHE, tokens and HF_HUB_OFFLINE apply.

Reading (`read_state_dict`): safetensors cannot run code when read; a pickled `.bin` (repos
published before safetensors, like kakaobank/kf-deberta-base) is unpickled with
`torch.load(weights_only=True)`, which admits tensors, containers and numbers only: a pickle that
would run code is refused with a one-line error, never run. transformers gets the tensors, never
a file of its own to open.

Fitting (`load_transformer`): the tensors read are matched with the parameters of the encoder
class the config names, and nothing is left to chance:
- the keys may carry a prefix: the model class's own (`deberta.`, `bert.`: a pretraining
  checkpoint) or any other one that maps *every* parameter name (`model.`, `0.auto_model.`);
  two prefixes that each would are ambiguous and refused, naming both;
- a parameter the sentence embedding depends on that the checkpoint lacks, or whose shape
  differs, stops the load with one line naming the first few and how many (it would start from
  random values, and evaluation or training would go on with garbage figures);
- what the embedding never uses (BERT's pooler when it is missing, set to zero so that every run
  saves the same files; heads of a pretraining or classification checkpoint in the file) is named
  in one note on stderr and left aside.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
from pathlib import Path
from typing import Collection

import torch

from kfdeb.errors import UserInputError, first_line
from kfdeb.files import read_json
from kfdeb.st_folder import encoder_dir

BEST_DIR = "best"  # where a training run keeps its best model (run.py); its folder stands for it
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# What a hub download fetches before the weights, at any depth: configs (the encoder's, the
# sentence-transformers modules', shard indexes) and tokenizer files (tokenizer.json, vocab.txt,
# sentencepiece *.model). Never *.py: kfdeb does not run a repo's code.
_HUB_CONFIG_FILES = ["*.json", "*.txt", "*.model"]
# Weight files, in order of preference, each whole or sharded (NAME.index.json lists the shards)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SHOWN = 3  # tensors named in a one-line message


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local folder for `name_or_path`: the folder itself, or a hub id's downloaded snapshot."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserInputError(f"{path}: not a model folder (it is a file)")
        return run_model_dir(path)
    text = str(name_or_path)
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise UserInputError(f"{path}: no such model folder")
    try:
        return _download_from_hub(text)
    except UserInputError:
        raise
    except Exception as err:  # any hub failure (offline, unknown id, gated) is the user's to fix
        raise UserInputError(
            f"{text}: not a local folder, and the Hugging Face hub could not provide it ({first_line(err, 160)}); "
            "pass a local model folder"
        ) from None


def run_model_dir(folder: Path) -> Path:
    """A training run's folder stands for its best model (`best/`, see run.py); any other folder for itself."""
    if not (folder / "config.json").exists() and not (folder / "modules.json").exists() \
            and (folder / BEST_DIR / "config.json").exists():
        return folder / BEST_DIR
    return folder


def weight_files(names: Collection[str], folder: Path) -> list[str]:
    """Which of the files `names` of an encoder folder hold its weights, as transformers would choose them.

    `model.safetensors`, else its index and the shards it lists, else the same for
    `pytorch_model.bin`; [] if none. `folder` is where the indexes are read (the local folder, or
    the snapshot a hub repo's configs were downloaded to).
    """
    for single in WEIGHT_FILES:
        if single in names:
            return [single]
        index = f"{single}.index.json"
        if index in names:
            return [index, *_shards(folder / index, single)]
    return []


def _shards(index_path: Path, single: str) -> list[str]:
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    suffix = Path(single).suffix
    # plain file names next to the index, of the indexed kind: nothing outside the folder is read
    if not isinstance(weight_map, dict) or not weight_map or not all(
        isinstance(name, str) and name.endswith(suffix) and "/" not in name and "\\" not in name
        for name in weight_map.values()
    ):
        raise UserInputError(f"{index_path}: expected a weight_map of parameter names to {suffix} files beside it")
    return sorted(set(weight_map.values()))


def _download_from_hub(repo_id: str) -> Path:
    """The cached snapshot of hub repo `repo_id` with its configs, tokenizer files and the encoder's weights."""
    from huggingface_hub import HfApi, snapshot_download

    # Configs first (module docstring). Offline, this serves the cache or raises.
    folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_CONFIG_FILES))
    commit = folder.name  # snapshots/<commit>: the weights must come from the same commit
    transformer_dir = encoder_dir(folder)
    try:
        repo_files = HfApi().list_repo_files(repo_id, revision=commit)
    except Exception as err:  # offline or unreachable: what the cache holds, if it holds weights
        cached = weight_files(os.listdir(transformer_dir), transformer_dir)
        if cached and all((transformer_dir / name).is_file() for name in cached):
            return folder
        raise UserInputError(
            f"{repo_id}: the hub could not list the repo's files ({first_line(err, 160)}) "
            "and no weights of it are cached"
        ) from None
    relative = transformer_dir.relative_to(folder).as_posix()
    prefix = "" if relative == "." else f"{relative}/"
    names = {f[len(prefix):] for f in repo_files if f.startswith(prefix) and "/" not in f[len(prefix):]}
    weights = [prefix + name for name in weight_files(names, transformer_dir) if not name.endswith(".index.json")]
    if not weights:
        raise UserInputError(
            f"{repo_id}: the hub repo has no model.safetensors or pytorch_model.bin{f' in {prefix}' if prefix else ''}; "
            "kfdeb reads PyTorch weights only"
        )
    snapshot_download(repo_id, revision=commit, allow_patterns=weights)
    return folder


def read_pickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickled `pytorch_model*.bin`, unpickled with `torch.load(weights_only=True)`.

    weights_only admits tensors, containers and numbers only, so a pickle that would import or
    call anything else (run code) is refused before any of it runs.
    """
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # the weights-only unpickler met something it does not admit
        _, _, detail = str(err).partition("WeightsUnpickler error:")
        # torch's own advice (allowlist the global, or weights_only=False) is what must not be done here
        reason = detail.strip().split(" Please use")[0].splitlines()[0] if detail.strip() else first_line(err)
        raise UserInputError(
            f"{path}: refused: not a plain state dict of tensors ({reason}); kfdeb never runs code from a pickle"
        ) from None
    except Exception as err:  # truncated, not a pickle, not a torch file: whatever torch.load trips on
        raise UserInputError(f"{path}: unreadable PyTorch weights ({type(err).__name__}: {first_line(err)})") from None
    if not isinstance(state_dict, dict) or not all(
        isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in state_dict.items()
    ):
        raise UserInputError(f"{path}: not a state dict (parameter names to tensors)")
    return state_dict


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # truncated or not a safetensors file
        raise UserInputError(f"{path}: unreadable safetensors ({first_line(err)})") from None


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the encoder folder's weights (whole or sharded, safetensors preferred)."""
    files = weight_files(os.listdir(folder), folder)
    if not files:
        raise UserInputError(f"{folder}: no model.safetensors or pytorch_model.bin (whole or sharded): "
                             "kfdeb reads PyTorch weights only")
    state_dict: dict[str, torch.Tensor] = {}
    for name in files:
        if name.endswith(".index.json"):
            continue
        if not (folder / name).is_file():
            raise UserInputError(f"{folder / name}: listed by {files[0]} but missing")
        read = _read_safetensors if name.endswith(".safetensors") else read_pickled_state_dict
        state_dict.update(read(folder / name))
    return state_dict


def _map_prefix(state_dict: dict[str, torch.Tensor], expected: set[str], base_prefix: str,
                where: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's keys with a prefix that maps every expected name removed (module docstring)."""
    keys = set(state_dict)
    if expected <= keys or {f"{base_prefix}.{name}" for name in expected} <= keys:
        return state_dict  # as the class saves it, or its pretraining checkpoint's: transformers maps those
    candidates = {key[: len(key) - len(name)] for key in keys for name in expected
                  if key.endswith("." + name) or key == name}
    covering = sorted(p for p in candidates if p and all(p + name in keys for name in expected))
    if len(covering) > 1:
        raise UserInputError(f"{where}: the weights hold the encoder's parameters under several prefixes "
                             f"({', '.join(covering)}): ambiguous; save the encoder alone")
    if not covering:
        return state_dict  # what is missing is reported from the loading info
    prefix = covering[0]
    return {key[len(prefix):] if key.startswith(prefix) else key: value for key, value in state_dict.items()}


def _used_by_embedding(model: torch.nn.Module, names: Collection[str]) -> set[str]:
    """Which of the parameters `names` the mean of the last hidden states depends on (a gradient probe)."""
    params = dict(model.named_parameters())
    probed = [name for name in names if name in params]
    if not probed:
        return set()
    ids = torch.tensor([[min(5, model.config.vocab_size - 1)] * 4])
    was_training = model.training
    model.eval()
    with torch.enable_grad():
        output = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.mean()
        grads = torch.autograd.grad(output, [params[n] for n in probed], allow_unused=True)
    model.train(was_training)
    return {name for name, grad in zip(probed, grads) if grad is not None}


def _named(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def note(message: str) -> None:
    """One informational line on stderr, from rank 0 only under torchrun."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"note: {message}", file=sys.stderr, flush=True)


def load_transformer(folder: Path) -> torch.nn.Module:
    """The transformers encoder in `folder` in float32, its weights read as published and checked (docstring)."""
    from transformers import MODEL_MAPPING, AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as err:
        raise UserInputError(f"{folder / 'config.json'}: cannot read the model config ({first_line(err)})") from None
    if type(config) not in MODEL_MAPPING:
        raise UserInputError(f"{folder / 'config.json'}: model type {config.model_type!r} has no transformers encoder class")
    model_class = MODEL_MAPPING[type(config)]
    state_dict = read_state_dict(folder)
    with torch.device("meta"):  # the class's parameter names, without allocating them
        expected = set(model_class(config).state_dict())
    state_dict = _map_prefix(state_dict, expected, model_class.base_model_prefix, folder)
    try:  # no path: transformers gets the tensors only, never a file of its own to open
        model, info = model_class.from_pretrained(None, config=config, state_dict=state_dict, dtype=torch.float32,
                                                  output_loading_info=True)
    except (RuntimeError, ValueError) as err:  # e.g. a shape that differs, under older transformers
        raise UserInputError(f"{folder}: the weights do not fit {model_class.__name__} ({first_line(err)})") from None
    mismatched = [str(entry[0] if isinstance(entry, (tuple, list)) else entry) for entry in info.get("mismatched_keys", [])]
    if mismatched:
        raise UserInputError(f"{folder}: {len(mismatched)} tensors of the weights have other shapes than "
                             f"{model_class.__name__}'s ({_named(sorted(mismatched))}); is config.json the weights' own?")
    missing = sorted(info.get("missing_keys", []))
    used = _used_by_embedding(model, missing) if missing else set()
    lacking = [name for name in missing if name in used]
    if lacking:
        found = sorted(state_dict)
        raise UserInputError(
            f"{folder}: the weights lack {len(lacking)} of {model_class.__name__}'s tensors that the sentence "
            f"embedding uses ({_named(lacking)}); they would start from random values. The file holds "
            f"{len(found)} tensors ({_named(found)}): is it a checkpoint of this architecture, saved whole?"
        )
    unused = [name for name in missing if name not in used]
    if unused:  # zeros, not transformers' random initialisation: the same files from every run that saves them
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for name in unused:
                if name in parameters:
                    parameters[name].zero_()
        note(f"{folder}: not in the weights, and not used by the sentence embedding: {_named(unused)} (set to zero)")
    unexpected = sorted(info.get("unexpected_keys", []))
    if unexpected:
        note(f"{folder}: {len(unexpected)} tensors of the weights are not part of the encoder and not used: "
             f"{_named(unexpected)}")
    return model
