"""What keep-best measures the trained model against, and at which length: the start (step 0) and the saved limit.

- The start: the dev evaluation at step 0, before any update, is the first best
  (run_evaluation.evaluate_and_keep_best), so a step must beat the starting weights to replace them in best/;
  `start_comparison` is the run's last line: by how much the best beat the start on each headline dev figure, or
  that no step did and best/ holds the start.
- The length: `--max_seq_length` is what training truncates to (shorter is faster); best/ keeps
  `saved_max_seq_length`: --save_max_seq_length, else the longer of the training length and the start model's own
  limit (model.own_max_seq_length: sentence_bert_config.json, else the tokenizer's model_max_length capped by the
  position embeddings, as sentence-transformers reads a folder). Dev and test evaluations run at that limit
  (`at_length`), so the figures are what evaluate.py gives best/.
- The evaluation itself (`evaluate`): KorSTS and retrieval figures of the model, sharded over the ranks.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np

from kfdeb import distributed

from kfdeb.config import TrainConfig
from kfdeb.evaluation import StsResult, best_score, evaluate_sts
from kfdeb.ir_data import IrData
from kfdeb.model import SentenceEncoder
from kfdeb.retrieval import evaluate_retrieval
from kfdeb.train_state import TrainingState
from kfdeb.weights import BEST_DIR


def saved_max_seq_length(config: TrainConfig, encoder: SentenceEncoder) -> int:
    """The inference limit best/ keeps (module docstring); `encoder` as loaded for training."""
    if config.save_max_seq_length:
        return config.save_max_seq_length
    return max(encoder.max_seq_length, encoder.own_max_seq_length or 0)


def describe_saved_length(config: TrainConfig, encoder: SentenceEncoder, saved: int) -> str:
    """The startup line that says which limit the saved model keeps, and why."""
    own = f"the start model's own is {encoder.own_max_seq_length}" if encoder.own_max_seq_length else \
        "the start model sets none"
    if config.save_max_seq_length:
        why = f"--save_max_seq_length; {own}"
    elif saved == encoder.max_seq_length:
        why = f"the training length; {own}"
    else:
        why = "the start model's own"
    return (f"max_seq_length: training at {encoder.max_seq_length} tokens; {BEST_DIR}/ keeps {saved} ({why}), "
            "and dev and test evaluations run at it")


@contextlib.contextmanager
def at_length(encoder: SentenceEncoder, length: int) -> Iterator[None]:
    """The encoder at `length` while it is evaluated or saved, back at the training length after (the training
    batches were tokenized once, before the first step, at that length)."""
    training = encoder.max_seq_length
    encoder.max_seq_length = length or training
    try:
        yield
    finally:
        encoder.max_seq_length = training


def headline_figures(metric: str, figures: dict[str, float]) -> list[str]:
    """The dev figures the last line compares with the start: the selection figure, then cosine Spearman (KorSTS)
    and nDCG@10 (retrieval) where evaluated and not already named."""
    return [metric] + [key for key in ("cosine_spearman", "ndcg@10") if key in figures and key not in metric.split("+")]


def start_comparison(metric: str, state: TrainingState, best: dict[str, float]) -> str:
    """One line: how much the best (dev figures `best`) beat the start on each headline figure, or that no step did."""
    start = state.start_figures

    def value(figures: dict[str, float], key: str) -> float:
        return best_score(figures, key) if key == metric else figures[key]

    if state.best_step == 0:
        trained = (f", best step {state.best_trained_step} {state.best_trained_score:.2f}"
                   if state.best_trained_step > 0 else "")
        return (f"no step beat the start on dev {metric} (start {value(start, metric):.2f}{trained}): "
                f"{BEST_DIR}/ holds the starting weights")
    parts = [f"{key} {value(best, key):.2f} (start {value(start, key):.2f}, {value(best, key) - value(start, key):+.2f})"
             for key in headline_figures(metric, best)]
    return f"best: step {state.best_step}, dev " + "; ".join(parts)


def evaluate(encoder: SentenceEncoder, pairs: list, ctx: distributed.Context, batch_size: int,
             dims: Sequence[int] = (), ir: IrData | None = None, prompts: tuple[str, str] = ("", ""),
             progress: bool = False) -> StsResult:
    """KorSTS figures (none without `pairs`), with `ir` the retrieval figures too (one dict: their keys differ), and
    those of each width in `dims`; with several ranks each encodes every W-th text and all get all figures.
    progress: rank 0 draws a bar for each encode."""

    class Sharded:
        def encode(self, sentences: Sequence[str], batch_size: int = 64, convert_to_numpy: bool = True,
                   prompt: str | None = None, show_progress: bool = False) -> np.ndarray:
            mine = encoder.encode(list(sentences)[ctx.rank :: ctx.world_size], batch_size=batch_size,
                                  convert_to_numpy=True, prompt=prompt, show_progress=show_progress and ctx.is_main)
            return distributed.gather_strided(ctx, mine, len(sentences))

    result = evaluate_sts(Sharded(), pairs, batch_size, dims, show_progress=progress) if pairs else StsResult(
        {}, 0, 0.0, {d: {} for d in dims})
    if ir is not None:  # queries and documents with the run's prompts (the model's own by default)
        retrieval = evaluate_retrieval(Sharded(), ir, batch_size, dims, *prompts, show_progress=progress)
        result.figures.update(retrieval.figures)
        for dim in dims:
            result.by_dim[dim].update(retrieval.by_dim[dim])
    return result


def figures_by_dim(result: StsResult) -> dict[str, dict[str, float]]:
    return {str(dim): figures for dim, figures in result.by_dim.items()}  # JSON keys are strings
