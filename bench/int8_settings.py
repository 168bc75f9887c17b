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
  exact    what a VNNI CPU computes for the s8 graphs, on this CPU (see `exact_u8s8`): dev and test
           agreement of each s8 setting as this CPU runs it and without saturation; figures only

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
from kfdeb.readers import BUNDLED_DATA_DIR, read_sts  # noqa: E402
from kfdeb.evaluation import distinct_sentences, evaluate_sts, sts_path  # noqa: E402
from kfdeb.model import load_encoder  # noqa: E402
from kfdeb.onnx import Int8Settings, OnnxEncoder, export, quantize_int8, quantizable_matmuls  # noqa: E402


def exact_u8s8(source: Path, target: Path) -> None:
    """Write `source` with every s8 MatMulInteger weight as u8 = s8 + 128 and its zero point + 128.

    (w_u8 - z_u8) = (w_s8 - z_s8) for every element, so the integer product is unchanged; but
    onnxruntime multiplies u8 x u8 with exact int32 sums on every x86 CPU, while u8 x s8 without
    VNNI goes through VPMADDUBSW, whose int16 sum of two products saturates (255 * 127 * 2 > 32767).
    So the new graph gives, on this CPU, the figures a VNNI CPU (VPDPBUSD: u8 x s8 into int32)
    gives for `source`.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    initializers = {t.name: t for t in model.graph.initializer}
    shifted: set[str] = set()  # a tensor two nodes share is shifted once
    for node in model.graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMulInteger" else None
        if weight is None or weight.data_type != onnx.TensorProto.INT8:
            continue  # not a constant weight, or u8 already: nothing saturates
        if len(node.input) < 4 or node.input[3] not in initializers:  # the zero point must move with the weight
            raise SystemExit(f"{source}: {node.name} has an s8 weight without a constant zero point")
        for name in (node.input[1], node.input[3]):
            if name not in shifted:
                values = numpy_helper.to_array(initializers[name]).astype(np.int16) + 128
                initializers[name].CopyFrom(numpy_helper.from_array(values.astype(np.uint8), name))
                shifted.add(name)
    onnx.save(model, str(target))


def check_exact_u8s8(folder: Path) -> str:
    """One MatMulInteger whose u8 x s8 products saturate VPMADDUBSW: onnxruntime on this CPU, on the
    rewritten graph, and numpy's int64 product. The rewritten graph must equal numpy exactly."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    a = np.full((2, 64), 255, dtype=np.uint8)
    a[1, ::2] = 3
    b = np.full((64, 3), 127, dtype=np.int8)
    b[:, 1] = -127
    b[::3, 2] = 5
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b", "a_zero", "b_zero"], ["y"])], "check",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 3])],
        [numpy_helper.from_array(b, "b"), numpy_helper.from_array(np.array(0, np.uint8), "a_zero"),
         numpy_helper.from_array(np.zeros(3, np.int8), "b_zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "check-s8.onnx"))
    exact_u8s8(folder / "check-s8.onnx", folder / "check-u8.onnx")
    want = a.astype(np.int64) @ b.astype(np.int64)

    def run(path: Path) -> np.ndarray:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"a": a})[0]

    here, rewritten = run(folder / "check-s8.onnx"), run(folder / "check-u8.onnx")
    if not np.array_equal(rewritten, want):
        raise SystemExit(f"exact_u8s8 check failed: {rewritten.tolist()} != {want.tolist()}")
    return ("this CPU's u8 x s8 equals the exact product" if np.array_equal(here, want)
            else f"this CPU's u8 x s8 saturates (max error {np.abs(here - want).max()} of {np.abs(want).max()})")


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
    parser.add_argument("--stages", default="1,2,3,report", help="which stages to run (comma-separated: 1,2,3,report,exact)")
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
    finalists["per-channel S8, embeddings fp32, layer 0 FFN output fp32 (for VNNI CPUs)"] = replace(
        s8, embeddings=False, keep_fp32=("layer.0/output/dense",))
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

    if "exact" in stages:
        exact_stage(args, folder, graph, finalists, dev, reference_dev, encoder, test_pairs)
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


def exact_stage(args, folder, graph, finalists, dev, reference_dev, encoder, test_pairs) -> None:
    print("\n### exact: the s8 graphs as this CPU runs them and as a VNNI CPU does (u8 x s8 exact; `exact_u8s8`)")
    print(f"self-check on one saturating MatMulInteger: {check_exact_u8s8(folder)}; the rewritten graph is exact")
    test = distinct_sentences(test_pairs)
    pytorch = Recorder(encoder)
    torch_spearman = evaluate_sts(pytorch, test_pairs, args.batch_size).figures["cosine_spearman"]
    reference_test = pytorch.vectors
    print(f"PyTorch fp32 test cosine Spearman {torch_spearman:.2f}")
    print("| s8 graph | arithmetic | dev cosine mean / min | test cosine mean / min | test cos Spearman (vs fp32) |"
          "\n|---|---|---|---|---|")
    for i, (name, settings) in enumerate(finalists.items()):
        if settings.weight_type != "S8":
            continue
        here = graph(settings, f"exact-{i}")
        exact = folder / f"exact-{i}-u8.onnx"
        exact_u8s8(here, exact)
        vectors = {}
        for arithmetic, path in (("this CPU", here), ("exact (VNNI)", exact)):
            engine = OnnxEncoder.load(path)
            dev_mean, dev_min = agreement(engine.encode(dev, batch_size=args.batch_size), reference_dev)
            recorder = Recorder(engine)
            spearman = evaluate_sts(recorder, test_pairs, args.batch_size).figures["cosine_spearman"]
            vectors[arithmetic] = recorder.vectors
            test_mean, test_min = agreement(recorder.vectors, reference_test)
            print(f"| {name} | {arithmetic} | {dev_mean:.5f} / {dev_min:.5f} | {test_mean:.5f} / {test_min:.5f} "
                  f"| {spearman:.2f} ({spearman - torch_spearman:+.2f}) |", flush=True)
        gap = agreement(vectors["this CPU"], vectors["exact (VNNI)"])
        print(f"|  | this CPU vs exact, cosine mean / min | {gap[0]:.7f} / {gap[1]:.7f} | {len(test)} test sentences | |",
              flush=True)


if __name__ == "__main__":
    main()
