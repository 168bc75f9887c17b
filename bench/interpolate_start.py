"""Weight-space interpolation between the starting model and a fine-tuned one (issue 34's cross-domain loss).

WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022): for alpha in [0, 1],

    theta(alpha) = (1 - alpha) * theta_start + alpha * theta_tuned        (every floating-point tensor)

alpha = 0 is the starting model, alpha = 1 the fine-tuned one. The paper finds the in-between points keep most of
the in-domain gain while giving back much of what fine-tuning cost off-domain. This bench asks whether that holds
for e5 fine-tuned on the chatbot pairs (which loses 3-4 nDCG@10 on xnli-test): each alpha's weights are written to
OUT/alpha<alpha>/ and scored by bench/retriever_recipe.py's `figures` (chatbot-test, xnli-test, KorSTS test), alone
on the machine. Nothing here is chosen on test: the table is a measurement. merge.py (kfdeb/merge.py) is the
user's tool: the same mix, alpha chosen on dev sets.

    python bench/interpolate_start.py --start /work/bench-models/e5-small-... \
        --tuned output/retriever-recipe/e5-chatbot-preset-seed42/final --alphas 0.5 0.7 --out output/interpolate
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from harness import cpu_model, git_commit
from retriever_recipe import figures

from kfdeb import cli
from kfdeb.merge import mix
from kfdeb.model import load_encoder


def interpolate(start: Path, tuned: Path, alpha: float, out: Path) -> None:
    """Writes theta(alpha) as a model folder: the tuned folder's files (config, tokenizer, prompts) and weights mixed
    by kfdeb.merge.mix (what merge.py writes, without its choice on dev)."""
    tuned_encoder = load_encoder(tuned, device="cpu")
    start_weights = load_encoder(start, device="cpu").state_dict()
    tuned_encoder.load_state_dict(mix(start_weights, tuned_encoder.state_dict(), alpha))
    tuned_encoder.save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", required=True, help="the starting model's folder")
    parser.add_argument("--tuned", required=True, help="the fine-tuned model's folder")
    parser.add_argument("--alphas", nargs="+", type=float, default=[0.5])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if any(not 0 <= alpha <= 1 for alpha in args.alphas):
        parser.error(f"--alphas: {args.alphas} has a value outside [0, 1]")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for alpha in args.alphas:  # a JSON that exists is not measured again
        if not (out / f"alpha{alpha:g}.json").exists():
            started = time.perf_counter()
            interpolate(Path(args.start), Path(args.tuned), alpha, out / f"alpha{alpha:g}")
            result = {"start": args.start, "tuned": args.tuned, "alpha": alpha, "commit": git_commit(), "cpu": cpu_model(),
                      "figures": figures(out / f"alpha{alpha:g}", args.device)}
            (out / f"alpha{alpha:g}.json").write_text(json.dumps(result))
            print(f"alpha {alpha:g}: {time.perf_counter() - started:.0f} s", flush=True)
    print("| alpha | chatbot-test nDCG@10 | chatbot-test R@1 | xnli-test nDCG@10 | KorSTS test cos Spearman |")
    print("|---|---|---|---|---|")
    for result in sorted((json.loads(p.read_text()) for p in out.glob("alpha*.json")), key=lambda r: r["alpha"]):
        found = result["figures"]
        print(f"| {result['alpha']:g} | {found['chatbot-test']['ndcg@10']:.2f} | {found['chatbot-test']['recall@1']:.2f} | "
              f"{found['xnli-test']['ndcg@10']:.2f} | {found['korsts_test']['cosine_spearman']:.2f} |")


if __name__ == "__main__":
    cli.execute(main)
