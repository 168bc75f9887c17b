"""Which int8 quantisation keeps an exported encoder's figures: a sweep of onnxruntime's dynamic settings.

    python bench/int8_settings.py CKPT [--output DIR] [--rounds 3] [--skip_sweep]

Exports CKPT's fp32 graph (kfdeb.onnx.export), then quantises it with each candidate setting
(kfdeb.onnx.Int8Settings: per-tensor or per-channel weight scales, 8- or 7-bit (reduce_range)
weights, signed (S8) or unsigned (U8) weights, the embedding Gathers quantised or kept fp32, and
MatMuls kept fp32 by their role in the layer or by name). Every candidate is *chosen* on the
distinct KorSTS dev sentences, never on test: its per-sentence cosine to PyTorch fp32 (mean / min).

  stage 1  settings grid                      dev mean / min cosine of each setting
  stage 2  one role kept fp32, all layers     (Q, K, V, attention output, FFN in, FFN out)
  stage 3  one MatMul kept fp32 (the rest as the best stage-1 setting), ranked by the dev
           min-cosine gain; then the top 1, 2, 4, 8 kept fp32 together
  report   the finalists on KorSTS *test*: cosine Spearman vs fp32, mean / min cosine, and
           sentences/s of ONNX fp32 vs the int8 graph in alternating rounds (best / median)

Prints markdown tables. Run it alone: a busy neighbour stalls the 2 cores and the speeds mean nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness import Recorder, sts_rounds  # noqa: E402
from kfdeb.cli import quiet_third_party  # noqa: E402
from kfdeb.data import BUNDLED_DATA_DIR, read_sts  # noqa: E402
from kfdeb.evaluation import distinct_sentences, evaluate_sts, sts_path  # noqa: E402
from kfdeb.model import load_encoder  # noqa: E402
from kfdeb.onnx import Int8Settings, OnnxEncoder, export, quantize_int8, quantizable_matmuls  # noqa: E402


def agreement(vectors: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    cosine = F.cosine_similarity(torch.as_tensor(vectors).double(), torch.as_tensor(reference).double(), dim=-1)
    return float(cosine.mean()), float(cosine.min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt")
    parser.add_argument("--output", default=None, help="folder for the graphs (default: CKPT/onnx-int8-sweep)")
    parser.add_argument("--data_dir", default=str(BUNDLED_DATA_DIR))
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dev_sentences", type=int, default=0, help="the first N distinct dev sentences (0: all)")
    parser.add_argument("--base", default="", help="stage 1's setting that stages 2-3 start from (default: the best)")
    parser.add_argument("--stages", default="1,2,3,report", help="which stages to run (comma-separated)")
    args = parser.parse_args()
    quiet_third_party()
    torch.set_num_threads(2)
    encoder = load_encoder(args.ckpt, device="cpu")
    folder = Path(args.output or Path(args.ckpt) / "onnx-int8-sweep")
    fp32 = export(encoder, folder / "model.onnx").paths["fp32"]
    dev = distinct_sentences(read_sts(sts_path(args.data_dir, "dev")))[:args.dev_sentences or None]
    stages = set(args.stages.split(","))
    test_pairs = read_sts(sts_path(args.data_dir, "test"))
    reference_dev = encoder.encode(dev, batch_size=args.batch_size)
    matmuls = quantizable_matmuls(fp32)
    print(f"{args.ckpt}: {len(dev)} distinct dev sentences, {len(matmuls)} MatMuls with constant weights", flush=True)

    def graph(settings: Int8Settings, name: str) -> Path:
        path = folder / f"cand-{name}.onnx"
        quantize_int8(fp32, path, settings)
        return path

    def on_dev(settings: Int8Settings, name: str) -> tuple[float, float]:
        engine = OnnxEncoder.load(graph(settings, name))
        return agreement(engine.encode(dev, batch_size=args.batch_size), reference_dev)

    def show(rows):
        print("| setting | dev cosine mean | dev cosine min |\n|---|---|---|")
        for name, (mean, low) in rows:
            print(f"| {name} | {mean:.5f} | {low:.5f} |", flush=True)

    s8 = Int8Settings(per_channel=True, reduce_range=False, weight_type="S8", embeddings=True, keep_fp32=())
    grid = {  # every MatMul and table quantised unless the name says otherwise
        "per-tensor S8 (onnxruntime's default)": replace(s8, per_channel=False),
        "per-channel S8 (export.py before)": s8,
        "per-channel S8 reduce_range": replace(s8, reduce_range=True),
        "per-channel U8": replace(s8, weight_type="U8"),
        "per-channel S8, embeddings fp32": replace(s8, embeddings=False),
        "per-channel S8 reduce_range, embeddings fp32": replace(s8, reduce_range=True, embeddings=False),
        "per-channel U8, embeddings fp32": replace(s8, weight_type="U8", embeddings=False),
        "kfdeb default": Int8Settings(),
    }
    if stages & {"1", "2", "3"}:  # stages 2 and 3 start from stage 1's best
        print("\n### stage 1: settings")
        stage1 = {name: on_dev(s, f"s1-{i}") for i, (name, s) in enumerate(grid.items())}
        show(stage1.items())
        base_name = args.base or max((n for n in grid if n != "kfdeb default"), key=lambda n: stage1[n])
        base = replace(grid[base_name], keep_fp32=())
    finalists = {name: grid[name] for name in ("per-channel S8 (export.py before)", "kfdeb default")}
    finalists["per-channel S8 reduce_range, embeddings fp32, layer 0 FFN output fp32"] = replace(
        s8, reduce_range=True, embeddings=False, keep_fp32=("layer.0/output/dense",))
    if "2" in stages:
        print(f"\n### stage 2: one role kept fp32 in every layer (the rest: {base_name})")
        roles = sorted({m.role for m in matmuls})
        stage2 = {role: on_dev(replace(base, keep_fp32=(role,)), f"s2-{i}") for i, role in enumerate(roles)}
        show(stage2.items())
    if "3" in stages:
        print(f"\n### stage 3: one MatMul kept fp32 (the rest: {base_name})")
        gains = {m.name: on_dev(replace(base, keep_fp32=(m.name,)), f"s3-{i}") for i, m in enumerate(matmuls)}
        ranked = sorted(gains, key=lambda n: (gains[n][1], gains[n][0]), reverse=True)
        show([(n, gains[n]) for n in ranked[:10]])
        print("\n| kept fp32 (most sensitive first) | dev cosine mean | dev cosine min |\n|---|---|---|")
        for k in (1, 2, 4, 8):
            settings = replace(base, keep_fp32=tuple(ranked[:k]))
            mean, low = on_dev(settings, f"s3-top{k}")
            print(f"| top {k} | {mean:.5f} | {low:.5f} |", flush=True)
            finalists[f"{base_name} + top {k} MatMuls fp32"] = settings

    if "report" not in stages:
        return
    print("\n### report: KorSTS test (finalists chosen on dev)")
    engines = {"ONNX fp32": OnnxEncoder.load(fp32)}
    engines.update({name: OnnxEncoder.load(graph(s, f"final-{i}")) for i, (name, s) in enumerate(finalists.items())})
    for engine in engines.values():  # warm-up
        engine.encode(dev[:args.batch_size], batch_size=args.batch_size)
    speeds, figures, vectors, _ = sts_rounds(engines, test_pairs, args.batch_size, args.rounds)
    pytorch = Recorder(encoder)
    torch_figures = evaluate_sts(pytorch, test_pairs, args.batch_size).figures
    fp32_speed = statistics.median(speeds["ONNX fp32"])
    print(f"PyTorch fp32 test cosine Spearman {torch_figures['cosine_spearman']:.2f}, "
          f"Pearson {torch_figures['cosine_pearson']:.2f}")
    print("| graph | cos Spearman (vs fp32) | cos Pearson | cosine to PyTorch fp32 mean / min "
          "| sentences/s best / median | speed vs ONNX fp32 (median) | file MB |\n|---|---|---|---|---|---|---|")
    for name, engine in engines.items():
        mean, low = agreement(vectors[name], pytorch.vectors)
        spearman = figures[name]["cosine_spearman"]
        print(f"| {name} | {spearman:.2f} ({spearman - torch_figures['cosine_spearman']:+.2f}) "
              f"| {figures[name]['cosine_pearson']:.2f} | {mean:.5f} / {low:.5f} "
              f"| {max(speeds[name]):.1f} / {statistics.median(speeds[name]):.1f} "
              f"| {statistics.median(speeds[name]) / fp32_speed:.2f}x | {engine.path.stat().st_size / 1e6:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
