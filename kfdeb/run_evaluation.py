"""A run's evaluations: on dev, each keeping the best model, the start (step 0) included (`evaluate_and_keep_best`);
at the end (`finish`), the best model's dev and test figures, its kfdeb.json, the model card, the plot, the comparison
with the start. The start and the length best/ keeps: keep_best.py; the run itself: run.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from kfdeb import distributed
from kfdeb.config import TrainConfig
from kfdeb.evaluation import TABLE_HEADER, StsResult, best_score, sts_set_line, table_row
from kfdeb.flags import progress_shown
from kfdeb.keep_best import at_length, evaluate, figures_by_dim, start_comparison
from kfdeb.model import load_encoder
from kfdeb.report import plot_curves, public_config, write_model_card
from kfdeb.retrieval import TABLE_HEADER as IR_TABLE_HEADER
from kfdeb.retrieval import ir_set_line, ir_table_row
from kfdeb.run import EvalSplit, Run
from kfdeb.train_state import TrainingState


def announce_evaluation(run: Run, split: EvalSplit) -> bool:
    """One line before an evaluation starts (`evaluating dev: KorSTS dev, 2,888 sentences; ...`); returns
    whether its encodes draw progress bars (--progress)."""
    own_file = getattr(run.config, f"sts_{split.name}_file")
    sets = [sts_set_line(Path(own_file).name if own_file else f"KorSTS {split.name}", split.pairs)]
    sets += [ir_set_line(split.ir)] if split.ir is not None else []
    say(run, f"evaluating {split.name}: " + "; ".join(sets))
    return progress_shown(run.config.progress)


def evaluate_split(run: Run, split: EvalSplit, progress: bool) -> StsResult:
    """`split`'s figures for the encoder as it is now, at every Matryoshka width, sharded over the ranks."""
    return evaluate(run.parts.encoder, split.pairs, run.ctx, run.config.eval_batch_size, run.objective.matryoshka_dims,
                    split.ir, run.prompts, progress)


def say(run: Run, message: str) -> None:
    if run.ctx.is_main:  # through tqdm, so the progress bar is redrawn below the message
        from tqdm.auto import tqdm

        tqdm.write(message)


def best_metadata(config: TrainConfig, step: int, **figures: Any) -> dict[str, Any]:
    """best/kfdeb.json: the whole of it, written anew at every save (never merged into an earlier one,
    so a resumed run writes the same keys as an uninterrupted one); local paths by their names only."""
    config_values = public_config(config)
    return {"base_model": config_values["model_name_or_path"], "step": step, **figures, "config": config_values}


def evaluate_and_keep_best(run: Run, state: TrainingState, epoch: int) -> None:
    """Evaluate on dev; save best/ when the selection figure beats the best so far. Step 0 (before any update)
    is evaluated too: the starting model is the first best, so best/ never holds a model worse than the start."""
    if run.dev.empty:
        return
    started = time.perf_counter()
    encoder, dims = run.parts.encoder, run.objective.matryoshka_dims
    progress = announce_evaluation(run, run.dev)
    with at_length(encoder, run.saved_max_seq_length):
        result = evaluate_split(run, run.dev, progress)
    # Matryoshka: selected at the first width listed (jhgan00's choice), the full one when it is listed first
    selected = result.figures_at(dims[0] if dims else None)
    score = best_score(selected, run.config.metric_for_best)
    improved = score > state.best_score  # NaN never improves; every rank has the same figures
    if state.step == 0:
        state.start_figures = dict(selected)
    elif score > state.best_trained_score:
        state.best_trained_score, state.best_trained_step = score, state.step
    if improved:
        state.best_score, state.best_step = score, state.step
        if run.ctx.is_main:  # the others go on and wait for rank 0 at their next collective
            with at_length(encoder, run.saved_max_seq_length):
                encoder.save(run.best_dir, best_metadata(run.config, state.step, dev=result.figures,
                                                          max_seq_length=run.saved_max_seq_length,
                                                          **({"dev_by_dim": figures_by_dim(result)} if dims else {})))
    run.log.write(step=state.step, epoch=epoch, split="dev", score=score, best=improved, **result.figures)
    for dim in dims:  # one row per width; the row above is the full embedding's
        run.log.write(step=state.step, epoch=epoch, split="dev", dim=dim, **result.by_dim[dim])
    if run.ctx.is_main:
        plot_curves(run.output_dir / "metrics.jsonl", run.output_dir / "curves.png")  # ~0.5 s: only with new dev points
    best = "best" if improved else f"best {state.best_score:.2f} at step {state.best_step}"
    widths = (f" at width {dims[0]}; cosine Spearman by width: "
              + ", ".join(f"{d} {result.by_dim[d]['cosine_spearman']:.2f}" for d in dims)) if dims and run.dev.pairs else ""
    ir = f", nDCG@10 {result.figures['ndcg@10']:.2f}" if run.dev.ir is not None and "ndcg@10" not in run.config.metric_for_best else ""
    when = f"step {state.step}" + (" (the start, before any update)" if state.step == 0 else "")
    say(run, f"{when}: dev {run.config.metric_for_best} {score:.2f}{widths}{ir} ({best})")
    state.eval_seconds += time.perf_counter() - started


def _load_best_weights(run: Run) -> None:
    """Every rank's encoder gets the best model's weights, read from rank 0's disk only."""
    weights: dict[str, torch.Tensor] = {}

    def read() -> None:
        weights.update(load_encoder(run.best_dir, device="cpu").state_dict())

    distributed.main_only(run.ctx, read)
    run.parts.encoder.load_state_dict(distributed.broadcast_tensors(run.ctx, weights if run.ctx.is_main else None))


def finish(run: Run, state: TrainingState, train_seconds: float) -> dict[str, Any]:
    """Evaluate the best checkpoint on dev and test; write its metadata, the model card, the plot; compare with the start."""
    ctx, encoder = run.ctx, run.parts.encoder
    if state.best_step >= 0:
        _load_best_weights(run)
    # else no dev data (setup said so), or every evaluation was NaN: keep the last weights
    dims = run.objective.matryoshka_dims
    encoder.max_seq_length = run.saved_max_seq_length or encoder.max_seq_length  # training is over (keep_best.py)
    progress = announce_evaluation(run, run.dev)
    dev = evaluate_split(run, run.dev, progress)
    announce_evaluation(run, run.test)
    test = evaluate_split(run, run.test, progress)
    summary = {"best_step": state.best_step, "total_steps": run.total_steps, "dimension": encoder.dimension,
               "max_seq_length": run.saved_max_seq_length, "train_seconds": train_seconds,
               "eval_seconds": state.eval_seconds, "dev": dev.figures, "test": test.figures}
    if state.start_figures:
        summary["dev_start"] = state.start_figures
    if dims:
        summary.update(dev_by_dim=figures_by_dim(dev), test_by_dim=figures_by_dim(test))
    if ctx.is_main:
        run.log.write(step=state.step, split="test", best_step=state.best_step, **test.figures)
        for dim in dims:
            run.log.write(step=state.step, split="test", dim=dim, best_step=state.best_step, **test.by_dim[dim])
        best_step = state.best_step if state.best_step >= 0 else state.step
        encoder.save(run.best_dir, best_metadata(
            run.config, best_step, best_step=state.best_step, max_seq_length=run.saved_max_seq_length,
            dev=dev.figures, test=test.figures,
            **{key: summary[key] for key in ("dev_start", "dev_by_dim", "test_by_dim") if key in summary}))
        write_model_card(run.best_dir, run.config, summary)
        plot_curves(run.output_dir / "metrics.jsonl", run.output_dir / "curves.png")
        name = run.output_dir.resolve().name
        print(f"best model (step {state.best_step}) in {run.best_dir}", flush=True)
        korsts = [(split, result) for split, result in (("dev", dev), ("test", test)) if "cosine_spearman" in result.figures]
        if korsts:
            rows = [table_row(f"{name} ({split})", result.figures) for split, result in korsts]
            rows += [table_row(f"{name} ({split}, {dim} dims)", result.by_dim[dim]) for split, result in korsts for dim in dims]
            print(f"{TABLE_HEADER}\n" + "\n".join(rows), flush=True)
        retrieval = [(f"{data.name}", result.figures) for data, result in ((run.dev.ir, dev), (run.test.ir, test)) if data]
        if retrieval:
            print(IR_TABLE_HEADER + "\n" + "\n".join(ir_table_row(f"{name} ({which})", figures)
                                                     for which, figures in retrieval), flush=True)
        if state.start_figures and state.best_step >= 0:
            print(start_comparison(run.config.metric_for_best, state, dev.figures_at(dims[0] if dims else None)),
                  flush=True)
    # every rank leaves together: none tears the process group down while rank 0 still writes
    distributed.barrier(ctx)
    return summary
