"""PyTorch fp32 vs ONNX fp32 vs ONNX int8 for one model: KorSTS figures, agreement, speed, size.

    python bench/onnx_figures.py CKPT [--output DIR] [--split test] [--rounds 3]

Exports CKPT with kfdeb.onnx.export (fp32 with its built-in check, plus int8), then encodes every
distinct sentence of the KorSTS split with each engine in turn, `--rounds` times, alternating
engines (never two at once: on a 2-core machine they would stall each other). Prints one markdown
table: the 8 KorSTS figures of each engine (from the first round's embeddings, through
kfdeb.evaluation.evaluate_sts, as evaluate.py computes them), the per-sentence cosine between each
engine's embeddings and PyTorch fp32's (mean / min), sentences/s over the rounds (best / median /
worst) and the file size. On a shared 2-core machine a busy neighbour stalls torch's threads
(10x slower rounds were seen): the best round is the closest to an idle machine; report the spread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness import sts_rounds  # noqa: E402
from kfdeb.cli import quiet_third_party  # noqa: E402
from kfdeb.readers import BUNDLED_DATA_DIR, read_sts  # noqa: E402
from kfdeb.evaluation import table_row  # noqa: E402
from kfdeb.readers import sts_path  # noqa: E402
from kfdeb.metrics import FIGURE_KEYS  # noqa: E402
from kfdeb.model import load_encoder  # noqa: E402
from kfdeb.onnx import OnnxEncoder, export  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt")
    parser.add_argument("--output", default=None, help="folder for model.onnx / model.int8.onnx (default: CKPT/onnx)")
    parser.add_argument("--data_dir", default=str(BUNDLED_DATA_DIR))
    parser.add_argument("--split", default="test", choices=["dev", "test"])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    quiet_third_party()
    pairs = read_sts(sts_path(args.data_dir, args.split))
    encoder = load_encoder(args.ckpt, device="cpu")
    output = Path(args.output or Path(args.ckpt) / "onnx") / "model.onnx"
    result = export(encoder, output, quantize="int8")
    engines = {"PyTorch fp32": encoder, "ONNX fp32": OnnxEncoder.load(result.paths["fp32"]),
               "ONNX int8": OnnxEncoder.load(result.paths["int8"])}
    sizes = {"ONNX fp32": result.paths["fp32"].stat().st_size, "ONNX int8": result.paths["int8"].stat().st_size}
    for engine in engines.values():  # warm-up: allocations, thread pools
        engine.encode([p.sentence1 for p in pairs[:64]], batch_size=args.batch_size)
    speeds, figures, vectors, sentences = sts_rounds(engines, pairs, args.batch_size, args.rounds)
    diffs = result.max_abs_diff["fp32"]
    print(f"{args.ckpt}: {sentences} distinct KorSTS {args.split} sentences, batch {args.batch_size}, "
          f"{args.rounds} rounds; check: max abs diff fp32 ONNX vs PyTorch "
          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    print("| Engine | " + " | ".join(FIGURE_KEYS) + " | cosine to PyTorch fp32 (mean / min) "
          "| sentences/s best / median / worst | file MB |")
    print("|---" * (len(FIGURE_KEYS) + 4) + "|")
    for name in engines:
        cosine = F.cosine_similarity(torch.as_tensor(vectors[name]), torch.as_tensor(vectors["PyTorch fp32"]), dim=-1)
        speed = speeds[name]
        size = f"{sizes[name] / 1e6:.1f}" if name in sizes else "-"
        print(table_row(name, figures[name])
              + f" {cosine.mean():.5f} / {cosine.min():.5f} | {max(speed):.1f} / {statistics.median(speed):.1f} "
              f"/ {min(speed):.1f} | {size} |")


if __name__ == "__main__":
    main()
