"""The float32 GEMM rate of each CPU path kfdeb could take for a linear layer (kfdeb/cpu_linear.py).

y = x W^T + b with x 4096 x 384 and W 1536 x 384 (MiniLM's and e5-small's feed-forward shape: a batch
of 64 sentences of 64 tokens), float32, on --threads threads: torch's F.linear (its BLAS: MKL in the
PyPI wheels), oneDNN through torch.ops.mkldnn._linear_pointwise (what kfdeb's encode uses on x86-64),
numpy's matmul (OpenBLAS) and onnxruntime's Gemm (MLAS). GFLOP/s = 2 * 4096 * 384 * 1536 / seconds,
the median of --reps timed calls after a warm-up; and each path's largest difference from a float64
product, relative to the largest |y|. Then a whole encode: --model's embeddings of the bundled KorSTS
test sentences (2,514 distinct), kfdeb's encode with KFDEB_CPU_GEMM=blas and with oneDNN (the
default), alternating, the median seconds of each and the largest embedding difference.

    python bench/cpu_gemm.py --threads 2 --model minilm
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from harness import REPO, cpu_model, git_commit, model_path


def rate(function, flops: float, reps: int) -> float:
    function()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return flops / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--model", default="minilm", help="minilm, e5 or a folder: the whole-encode comparison")
    parser.add_argument("--encode_reps", type=int, default=3)
    parser.add_argument("--cache", default=str(REPO / "output" / "bench-models"), help="where built bench models are kept")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows, width, out = 4096, 384, 1536
    x, weight, bias = (torch.randn(shape, generator=generator) for shape in ((rows, width), (out, width), (out,)))
    flops = 2 * rows * width * out
    exact = x.double() @ weight.double().T + bias.double()
    scale = exact.abs().max().item()
    paths = {"torch F.linear (MKL)": lambda: F.linear(x, weight, bias),
             "oneDNN _linear_pointwise (kfdeb encode)": lambda: torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")}
    x_np, weight_t, bias_np = x.numpy(), weight.numpy().T.copy(), bias.numpy()
    paths["numpy matmul (OpenBLAS)"] = lambda: torch.from_numpy(x_np @ weight_t + bias_np)
    try:
        import onnxruntime
        from onnx import TensorProto, helper, numpy_helper

        graph = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)], "linear",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, width])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, out])],
                                  [numpy_helper.from_array(weight.numpy(), "w"), numpy_helper.from_array(bias_np, "b")])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = onnxruntime.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                               .SerializeToString(), options, providers=["CPUExecutionProvider"])
        paths["onnxruntime Gemm (MLAS)"] = lambda: torch.from_numpy(session.run(None, {"x": x_np})[0])
    except ImportError:
        print("onnxruntime not installed: its row is left out")
    print(f"{cpu_model()}, torch {torch.__version__}, numpy {np.__version__}, {args.threads} threads, commit {git_commit()}")
    print("\n| path | GFLOP/s | max relative difference from float64 |\n|---|---|---|")
    for name, function in paths.items():
        error = (function().double() - exact).abs().max().item() / scale
        print(f"| {name} | {rate(function, flops, args.reps):.0f} | {error:.1e} |")

    import kfdeb
    from kfdeb.cli import quiet_third_party
    from kfdeb.readers import BUNDLED_DATA_DIR, read_sts

    quiet_third_party()
    sentences = list(dict.fromkeys(s for pair in read_sts(BUNDLED_DATA_DIR / "KorSTS" / "sts-test.tsv")
                                   for s in (pair.sentence1, pair.sentence2)))
    model = kfdeb.load(model_path(args.model, Path(args.cache)), device="cpu")
    model.encode(sentences[:64])
    seconds: dict[str, list[float]] = {"blas": [], "onednn": []}
    embeddings = {}
    for rep in range(args.encode_reps):
        for switch in ("blas", "onednn") if rep % 2 == 0 else ("onednn", "blas"):
            os.environ["KFDEB_CPU_GEMM"] = switch
            started = time.perf_counter()
            embeddings[switch] = model.encode(sentences, batch_size=64)
            seconds[switch].append(time.perf_counter() - started)
    blas, onednn = (statistics.median(seconds[k]) for k in ("blas", "onednn"))
    print(f"\n{args.model}: encode of {len(sentences)} KorSTS test sentences, median of {args.encode_reps}: "
          f"KFDEB_CPU_GEMM=blas {blas:.2f} s, onednn {onednn:.2f} s ({blas / onednn:.2f}x); largest embedding "
          f"difference {(embeddings['blas'] - embeddings['onednn']).abs().max().item():.1e}")


if __name__ == "__main__":
    main()
