"""The fine-tuned model mixed back with its start (WiSE-FT), the mix chosen on dev sets: merge.py.

Fine-tuning on one domain moves the whole embedding space. Measured on multilingual-e5-small (bench/RESULTS.md):
the chatbot FAQ pairs raise their own held-out nDCG@10 by 3.6 points and cost 3.4 on a general set (xnli-test),
and keep-best cannot see a loss on a set it does not evaluate. WiSE-FT (Wortsman et al., "Robust fine-tuning of
zero-shot models", CVPR 2022) mixes the two weight sets,

    theta(alpha) = (1 - alpha) * theta_start + alpha * theta_tuned      (every floating-point tensor, in float64)

alpha 0 is the start, alpha 1 the fine-tuned model; the points between keep much of the gain and give back much of
the loss. Integer buffers (position ids) must be equal in both; names and shapes must match (the same architecture).

The choice, on dev sets only (yours and a general one, e.g. kfdeb:xnli-dev; never a test set): each alpha of the
grid is scored by nDCG@10 on every set, as `evaluate.py --ir_data` computes it, with the model's prompts;
gain(alpha, set) = its figure - the start's figure on that set. Eligible: the alphas whose gain is >= -tolerance on
every set (alpha 0 always is). Chosen: the eligible alpha of the highest mean gain over the sets, the smaller alpha
on a tie. When that is alpha 0, the output holds the starting weights and the last line says so. The output folder
is the fine-tuned folder's model (tokenizer, prompts, inference length) with the chosen weights, and its kfdeb.json
records start, tuned, alpha and every dev figure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from kfdeb.config import TINY_MODEL, TINY_START_DIR
from kfdeb.errors import UserInputError
from kfdeb.flags import FlagParser, add_progress_flag, progress_shown
from kfdeb.ir_data import read_ir_data
from kfdeb.model import load_encoder
from kfdeb.retrieval import evaluate_retrieval
from kfdeb.weights import resolve_model_dir

DEFAULT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(1, 11))  # 0.1 .. 1; alpha 0 (the start) is always scored
FIGURE = "ndcg@10"


def mix(start: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """theta(alpha) (module docstring), each tensor in the fine-tuned weights' dtype."""
    if start.keys() != tuned.keys():
        differing = sorted(start.keys() ^ tuned.keys())
        raise UserInputError(f"the start and the fine-tuned model have different parameters ({', '.join(differing[:3])}"
                             f"{' ...' if len(differing) > 3 else ''}): not the same architecture")
    mixed = {}
    for name, value in tuned.items():
        if start[name].shape != value.shape:
            raise UserInputError(f"{name}: shape {tuple(start[name].shape)} in the start, {tuple(value.shape)} in the "
                                 "fine-tuned model: not the same architecture")
        if value.is_floating_point():
            mixed[name] = ((1 - alpha) * start[name].double() + alpha * value.double()).to(value.dtype)
        elif torch.equal(value, start[name]):
            mixed[name] = value
        else:
            raise UserInputError(f"{name}: an integer buffer differs between the start and the fine-tuned model")
    return mixed


def choose(gains: dict[float, list[float]], tolerance: float) -> float:
    """The alpha the module docstring chooses; `gains` maps each alpha (0 among them) to its gain on each dev set."""
    eligible = [alpha for alpha, by_set in gains.items() if min(by_set) >= -tolerance]
    return max(sorted(eligible), key=lambda alpha: sum(gains[alpha]) / len(gains[alpha]))  # max keeps the first


def start_of_run(tuned: str) -> str | None:
    """The model a kfdeb run started from (train_config.json in the run folder, or beside best/), if any; a run from
    kfdeb:tiny-deberta kept the random weights it built in its folder."""
    for folder in (Path(tuned), Path(tuned).parent):
        config = folder / "train_config.json"
        if config.is_file():
            start = json.loads(config.read_text(encoding="utf-8")).get("model_name_or_path") or None
            return str(folder / TINY_START_DIR) if start == TINY_MODEL else start
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = FlagParser(
        prog="merge.py",
        description="Mix a fine-tuned model with the model it started from (WiSE-FT: (1 - alpha) start + alpha "
                    "fine-tuned, every weight), alpha chosen on dev retrieval sets: the best mean nDCG@10 gain over "
                    "the start among the alphas that lose on no set. Give your own dev set and a general one (e.g. "
                    "kfdeb:xnli-dev) to keep the gain on yours without the loss elsewhere.")
    parser.add_argument("tuned", help="the fine-tuned model: a kfdeb run folder (its best/) or a model folder")
    parser.add_argument("--start", default=None, help="the model fine-tuning started from (default: the run's "
                        "--model_name_or_path, from train_config.json in the run folder)")
    parser.add_argument("--ir_dev_data", nargs="+", required=True, metavar="DIR|FILE",
                        help="one or more dev retrieval sets: BEIR folders, .tsv/.csv/.jsonl files of anchor, positive "
                             "pairs, or bundled sets (kfdeb:xnli-dev, kfdeb:korsts-dev); each weighs the same")
    parser.add_argument("--ir_dev_split", default="dev", help="the qrels split of BEIR folders (default: dev)")
    parser.add_argument("--alphas", nargs="+", type=float, default=list(DEFAULT_ALPHAS),
                        help="the weights of the fine-tuned model to try, in (0, 1] (default: 0.1 0.2 ... 1); "
                             "0, the start, is always scored")
    parser.add_argument("--tolerance", type=float, default=0.0,
                        help="how many nDCG@10 points (x100) below the start a dev set may fall (default: 0)")
    parser.add_argument("--output", required=True, metavar="DIR", help="where the chosen model goes (a new folder)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    add_progress_flag(parser)
    args = parser.parse_args(argv)
    if any(not 0 < alpha <= 1 for alpha in args.alphas):
        parser.error(f"--alphas: every value must be in (0, 1]; got {' '.join(f'{a:g}' for a in args.alphas)}")
    if args.tolerance < 0:
        parser.error("--tolerance must be 0 or more")
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserInputError(f"{output}: --output: exists and is not an empty folder; choose a new one")
    start = args.start or start_of_run(args.tuned)
    if start is None:
        raise UserInputError(f"{args.tuned}: no train_config.json names the model it started from; pass --start")
    # bad files fail before any model loads
    dev_sets = [read_ir_data(source, args.ir_dev_split, "--ir_dev_data") for source in args.ir_dev_data]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = load_encoder(args.tuned, device=device)
    tuned = {name: value.detach().to("cpu", copy=True) for name, value in encoder.state_dict().items()}
    start_weights = {name: value.cpu() for name, value in load_encoder(start, device="cpu").state_dict().items()}
    mix(start_weights, tuned, 1.0)  # another architecture fails here, before any line of output
    progress = progress_shown(args.progress)
    tuned_dir = resolve_model_dir(args.tuned)
    print(f"mixing {tuned_dir} with its start {start}; dev {FIGURE} on "
          + ", ".join(data.name for data in dev_sets), file=sys.stderr)

    def figures(alpha: float) -> list[float]:
        encoder.load_state_dict(mix(start_weights, tuned, alpha))
        return [evaluate_retrieval(encoder, data, args.batch_size, show_progress=progress).figures[FIGURE]
                for data in dev_sets]

    alphas = [0.0] + sorted(set(args.alphas))
    found: dict[float, list[float]] = {}
    gains: dict[float, list[float]] = {}
    print(f"| alpha | " + " | ".join(f"{data.name} {FIGURE}" for data in dev_sets) + " | mean gain over the start |")
    print("|---" * (len(dev_sets) + 2) + "|")
    for alpha in alphas:
        found[alpha] = figures(alpha)
        gains[alpha] = [f - s for f, s in zip(found[alpha], found[0.0])]
        mean_gain = round(sum(gains[alpha]) / len(dev_sets), 2) + 0.0  # + 0.0: no "-0.00"
        print(f"| {alpha:g} | " + " | ".join(f"{figure:.2f}" for figure in found[alpha]) + f" | {mean_gain:+.2f} |",
              flush=True)
    chosen = choose(gains, args.tolerance)
    encoder.load_state_dict(mix(start_weights, tuned, chosen))
    record = {"start": str(start), "tuned": str(tuned_dir), "alpha": chosen,
              "tolerance": args.tolerance, "dev_sets": [data.name for data in dev_sets],
              "dev_figures": {f"{alpha:g}": by_set for alpha, by_set in found.items()}, "figure": FIGURE}
    encoder.save(output, metadata={"merge": record})
    if chosen == 0.0:
        print(f"no mix beat the start on the dev sets (within --tolerance {args.tolerance:g}): {output} holds the "
              "starting weights")
    else:
        print(f"chose alpha {chosen:g}: dev {FIGURE} " + "; ".join(
            f"{data.name} {f:.2f} (start {s:.2f}, {f - s:+.2f})" for data, f, s in zip(dev_sets, found[chosen],
                                                                                        found[0.0]))
              + f"; wrote {output}")
    return 0
