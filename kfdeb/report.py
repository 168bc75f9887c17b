"""What a run leaves for people: the loss / dev-Spearman plot and the model card (README.md).

The model card is publishable as is: YAML front matter for the Hugging Face hub, what the model
is, the recipe and config that trained it, the KorSTS dev/test figures of the run, how to use it
from kfdeb, sentence-transformers and plain transformers, and the data licence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kfdeb.config import BUNDLED, TINY_MODEL, TrainConfig
from kfdeb.evaluation import TABLE_HEADER, table_row
from kfdeb.files import write_file, write_text
from kfdeb.retrieval import TABLE_HEADER as IR_TABLE_HEADER
from kfdeb.retrieval import ir_table_row


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    """Training loss per objective, dev cosine Spearman (and retrieval nDCG@10) against the step, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    figure, (loss_axis, dev_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for task in sorted({r["task"] for r in rows if "task" in r}):
        points = [(r["step"], r["loss"]) for r in rows if r.get("task") == task]
        loss_axis.plot(*zip(*points), label=f"{task} loss")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("training loss")
    dev = [(r["step"], r["cosine_spearman"]) for r in rows if r.get("split") == "dev" and "dim" not in r
           and "cosine_spearman" in r]
    if dev:
        dev_axis.plot(*zip(*dev), marker="o", label="dev cosine Spearman")
    for dim in sorted({r["dim"] for r in rows if r.get("split") == "dev" and "dim" in r}, reverse=True):  # Matryoshka
        points = [(r["step"], r["cosine_spearman"]) for r in rows if r.get("split") == "dev" and r.get("dim") == dim
                  and "cosine_spearman" in r]
        if points:
            dev_axis.plot(*zip(*points), marker=".", linestyle="--", label=f"{dim} dims")
    retrieval = [(r["step"], r["ndcg@10"]) for r in rows if r.get("split") == "dev" and "dim" not in r and "ndcg@10" in r]
    if retrieval:  # --ir_dev_data: on the same x100 scale
        dev_axis.plot(*zip(*retrieval), marker="s", label="dev retrieval nDCG@10")
    dev_axis.set_xlabel("step")
    dev_axis.set_ylabel("dev figure (x100)" if retrieval else "KorSTS dev cosine Spearman (x100)")
    for axis in (loss_axis, dev_axis):
        if axis.lines:
            axis.legend()
    figure.tight_layout()
    write_file(png_path, lambda handle: figure.savefig(handle, format="png", dpi=100))
    plt.close(figure)


_NLI_TEXTS = {"mnrl": "KorNLI triplets with in-batch negatives (MultipleNegativesRankingLoss)",
              "mnrl_symmetric": "KorNLI triplets with in-batch negatives both ways (MultipleNegativesSymmetricRankingLoss)",
              "gist": "KorNLI triplets with guide-masked in-batch negatives (GISTEmbedLoss)"}
_STS_TEXTS = {"cosine": "KorSTS cosine regression (CosineSimilarityLoss)",
              "cosent": "KorSTS pairs ranked by score (CoSENTLoss)",
              "angle": "KorSTS pairs ranked by score on the angle similarity (AnglELoss)"}


def recipe_text(config: TrainConfig) -> str:
    """The objectives of the run, in the names sentence-transformers users know."""
    nli = _NLI_TEXTS[config.nli_loss]
    if config.scale != 20.0:  # the recipe's and sentence-transformers' default goes unsaid
        nli = nli[:-1] + f", scale {config.scale:g})"
    parts = {"nli": nli, "sts": _STS_TEXTS[config.sts_loss]}
    text = " and ".join(parts[t] for t in config.task_list)
    if len(config.task_list) == 2:
        text = "multitask: " + text + ", one batch of each per step"
    if config.matryoshka_dim_list:
        text += f", each summed over the Matryoshka widths {', '.join(map(str, config.matryoshka_dim_list))} (MatryoshkaLoss)"
    return text


def model_name(config: TrainConfig) -> str:
    """What the card calls the model: --hub_model_id, else the run folder's name (never a local path)."""
    return config.hub_model_id or config.run_dir.resolve().name


def _selection(config: TrainConfig, summary: dict[str, Any]) -> str:
    """Which weights the model is: the best checkpoint and what selected it, or the final weights."""
    if config.metric_for_best == "auto":  # no dev data
        return f"the final weights (step {summary['total_steps']}; no dev data selected a checkpoint)"
    start = " (the starting weights: no step beat them)" if summary["best_step"] == 0 else ""
    return (f"the best checkpoint (step {summary['best_step']} of {summary['total_steps']}{start}, selected on dev "
            f"{config.metric_for_best})")


def _korsts_section(name: str, config: TrainConfig, summary: dict[str, Any]) -> str:
    """The KorSTS table, for the splits the run evaluated on KorSTS (or own scored pairs)."""
    rows = [table_row(f"{name} ({split})", summary[split]) for split in ("dev", "test") if "cosine_spearman" in summary[split]]
    if not rows:
        return f"\nFigures of {_selection(config, summary)}.\n"
    return f"""
## KorSTS

Pearson and Spearman correlation (x100) of each similarity with the gold scores; {_selection(config, summary)}.

{TABLE_HEADER}
""" + "\n".join(rows) + "\n"


def _retrieval_section(name: str, config: TrainConfig, summary: dict[str, Any]) -> str:
    """The retrieval table (--ir_dev_data / --ir_test_data) beside the KorSTS one."""
    rows = [ir_table_row(f"{name} ({_local_name(source)}, {split})", summary[which])
            for which, source, split in (("dev", config.ir_dev_data or ("ir_dev_split" if config.ir_dev_fraction else ""),
                                          config.ir_dev_split if config.ir_dev_data else "dev"),
                                         ("test", config.ir_test_data, config.ir_test_split))
            if source and "ndcg@10" in summary[which]]
    if not rows:
        return ""
    return f"""
## Retrieval

Cosine similarity, exact search over the whole corpus; nDCG@10, MRR@10, MAP@100 and Recall@k as trec_eval
(and mteb) define them, x100 (a query without a relevant document is left out).

{IR_TABLE_HEADER}
""" + "\n".join(rows) + "\n"


def _matryoshka_section(name: str, config: TrainConfig, summary: dict[str, Any]) -> str:
    """The per-width KorSTS table of a Matryoshka model, and how to use a narrower embedding."""
    if "test_by_dim" not in summary:
        return ""
    dims = config.matryoshka_dim_list
    rows = "\n".join(table_row(f"{name} ({split}, {dim} dims)", summary[f"{split}_by_dim"][str(dim)])
                     for split in ("dev", "test") for dim in dims if "cosine_spearman" in summary[f"{split}_by_dim"][str(dim)])
    return f"""
### Matryoshka widths

Trained with Matryoshka representation learning at widths {", ".join(map(str, dims))} (weights
{", ".join(f"{w:g}" for w in config.matryoshka_weight_list)}): the first d coordinates of an embedding are an embedding
of their own. The same checkpoint, embeddings truncated to d:

{TABLE_HEADER}
{rows}

`kfdeb.load("{name}").encode(sentences, dim={dims[-1]})`, or
`SentenceTransformer("{name}", truncate_dim={dims[-1]})`, gives the {dims[-1]}-dimensional embeddings.
"""


def _local_name(value: str) -> str:
    """A local path by its last component (a folder's or file's name); anything else (a hub id) as it is."""
    return Path(value).name if value and Path(value).exists() else value


def public_config(config: TrainConfig) -> dict[str, Any]:
    """The run's config with every local path reduced to its folder or file name, for what gets published
    (best/kfdeb.json, the model card); train_config.json, outside best/, keeps the full paths."""
    settings = config.to_dict()
    settings["model_name_or_path"] = _local_name(config.model_name_or_path)
    settings["data_dir"] = ("bundled KorNLU files (KorSTS, XNLI dev/test)" if config.data_dir == BUNDLED
                            else Path(config.data_dir).name)
    for key in ("output_dir", "cache_dir", "config"):
        settings[key] = Path(settings[key]).name if settings[key] else settings[key]
    if config.guide_model not in ("", "self"):  # a local guide by its folder name, as the base model
        settings["guide_model"] = _local_name(config.guide_model)
    for key in ("ir_dev_data", "ir_test_data"):  # a folder or file by its name; kfdeb:korsts-dev as it is
        settings[key] = _local_name(settings[key])
    for key in ("nli_train_files", "sts_train_file", "sts_dev_file", "sts_test_file"):  # own files: their names
        settings[key] = ",".join(Path(entry.strip()).name for entry in settings[key].split(",") if entry.strip())
    return settings


def write_model_card(model_dir: Path, config: TrainConfig, summary: dict[str, Any]) -> Path:
    """README.md in the model folder `model_dir`; its snippets load the model by `model_name(config)`."""
    name = model_name(config)
    # a local base model or data folder is named by its folder name: a public card holds no local paths
    base = _local_name(config.model_name_or_path)
    base_line = f"base_model: {base}\n" if base != TINY_MODEL and not Path(config.model_name_or_path).exists() else ""
    # the hub's dataset tags only for the objectives that trained on KorNLU files
    own_training_files = {"nli": config.nli_train_files, "sts": config.sts_train_file}
    datasets = [{"nli": "kor_nli", "sts": "kor_sts"}[t] for t in config.task_list if not own_training_files[t]]
    datasets_yaml = "datasets:\n" + "".join(f"- {d}\n" for d in datasets) if datasets else ""
    # what the run computed, not how or where it ran
    private = ("progress", "config", "resume", "overwrite_output_dir", "output_dir", "output_prefix", "hub_model_id",
               "device", "cache_dir", "no_cache")
    settings = {k: v for k, v in public_config(config).items() if k not in private}
    tiny_note = ("\n> This model comes from the offline smoke preset: a tiny DeBERTa-v2 with random initial "
                 "weights trained for a few hundred steps. It proves the pipeline, not quality.\n"
                 if base == TINY_MODEL else "")
    card = f"""---
language:
- ko
library_name: sentence-transformers
pipeline_tag: sentence-similarity
tags:
- sentence-transformers
- sentence-similarity
- feature-extraction
- kfdeb
{datasets_yaml}{base_line}---

# {name}

A Korean sentence-embedding model: `{base}` fine-tuned with kfdeb on {recipe_text(config)}.
Sentences become {summary.get('dimension', 'fixed-size')} vectors (mean of the token embeddings);
similar meanings give a high cosine similarity, for semantic search, clustering and deduplication.
{tiny_note}{_korsts_section(name, config, summary)}{_retrieval_section(name, config, summary)}{_matryoshka_section(name, config, summary)}
## Usage

kfdeb:

```python
import kfdeb

model = kfdeb.load("{name}")
embeddings = model.encode(["안녕하세요?", "한국어 문장 임베딩을 위한 모델입니다."], normalize=True)
```

sentence-transformers:

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{name}")
embeddings = model.encode(["안녕하세요?", "한국어 문장 임베딩을 위한 모델입니다."])
```

transformers with mean pooling:

```python
import torch
from transformers import AutoModel, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{name}")
model = AutoModel.from_pretrained("{name}")
batch = tokenizer(["안녕하세요?", "한국어 문장 임베딩을 위한 모델입니다."], padding=True, truncation=True,
                  max_length={summary.get("max_seq_length") or config.max_seq_length}, return_tensors="pt")
with torch.no_grad():
    tokens = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
mask = batch["attention_mask"].unsqueeze(-1).float()
embeddings = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
```

## Training

Recipe of upskyy/kf-deberta-multitask and jhgan00/ko-sentence-transformers (sentence-transformers
v2 `fit`), reimplemented in kfdeb: AdamW (weight decay except bias and LayerNorm), linear warmup
then linear decay, gradient-norm clipping, best checkpoint on KorSTS dev. Config of this run:

```json
{json.dumps(settings, indent=2, ensure_ascii=False)}
```

## Data and licence

Trained on KorNLI and KorSTS (Ham et al., 2020, "KorNLI and KorSTS: New Benchmark Datasets for
Korean Natural Language Understanding", github.com/kakaobrain/kor-nlu-datasets), released under
CC BY-SA 4.0. Check the base model's licence before publishing.
"""
    path = model_dir / "README.md"
    write_text(path, card)
    return path
