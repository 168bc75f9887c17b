"""Linear layers on oneDNN's float32 GEMM, for inference on x86-64 CPUs.

A linear layer computes y = x W^T + b. On CPU, torch's F.linear hands the product to its BLAS (MKL
in the PyPI wheels), and on AMD Zen CPUs MKL's sgemm runs far below the AVX-512 rate. Measured on
a 2-vCPU AMD EPYC (Zen 5), 4096 x 384 times 384 x 1536 in float32 (bench/cpu_gemm.py): F.linear
190 GFLOP/s, oneDNN (torch.ops.mkldnn._linear_pointwise, the kernel torch's own inductor CPU
backend emits) 447, onnxruntime's MLAS 362; the encode of all-MiniLM-L6-v2 and of
multilingual-e5-small 1.65x faster, embeddings within 4e-7 of F.linear's. The maths is the same
float32 product; only the order of the summation differs.

`onednn_linears(module)` routes every nn.Linear of `module` through that kernel for the duration of
a `with` block (inference: encode). Each call still falls back to F.linear when the kernel cannot
serve it: gradients wanted (the kernel has no backward, and training keeps torch's path), a tensor
that is not float32, CPU autocast on (it asks for bf16 products). The whole context does nothing
for a module that is not on the CPU (a GPU keeps torch's path untouched), when the torch build
lacks the kernel, on a CPU that is not x86-64 (oneDNN there is a different library), or with
KFDEB_CPU_GEMM=blas in the environment (the escape hatch, and how the benches measure both).
Before first use the kernel is checked once against a float64 product; a kernel that disagrees is
not used.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from kfdeb.errors import UserInputError

ENV_SWITCH = "KFDEB_CPU_GEMM"  # "onednn" (default on x86-64) or "blas" (torch's F.linear everywhere)


def _kernel():
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


@functools.lru_cache(maxsize=1)
def _kernel_works() -> bool:
    """The kernel exists and computes x W^T + b to float32 accuracy (checked once per process)."""
    kernel = _kernel()
    if kernel is None or not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(shape, generator=generator) for shape in ((5, 3, 64), (48, 64), (48,)))
    try:
        with torch.no_grad():
            got = kernel(x, weight, bias, "none", [], "")
    except RuntimeError:
        return False
    exact = x.double() @ weight.double().T + bias.double()
    return got.shape == exact.shape and torch.allclose(got.double(), exact, rtol=1e-5, atol=1e-5)


def onednn_enabled() -> bool:
    """Whether onednn_linears will route linear layers to oneDNN in this process (see module docstring)."""
    choice = os.environ.get(ENV_SWITCH, "onednn").strip().lower()
    if choice not in ("onednn", "blas"):
        raise UserInputError(f"environment variable {ENV_SWITCH}={choice!r}: expected onednn or blas")
    return choice == "onednn" and platform.machine().lower() in ("x86_64", "amd64") and _kernel_works()


def _linear_forward(kernel: Callable[..., torch.Tensor], layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight, bias = layer.weight, layer.bias
    if (torch.is_grad_enabled() or x.dtype != torch.float32 or weight.dtype != torch.float32
            or torch.is_autocast_enabled("cpu")):
        return F.linear(x, weight, bias)
    return kernel(x, weight, bias, "none", [], "")


@contextlib.contextmanager
def onednn_linears(module: torch.nn.Module) -> Iterator[None]:
    """Within the block, module's nn.Linear layers compute on oneDNN where they can (module docstring);
    nothing changes for a module whose parameters are not on the CPU."""
    on_cpu = all(parameter.device.type == "cpu" for parameter in module.parameters())
    if not on_cpu or not onednn_enabled():
        yield
        return
    kernel = _kernel()
    layers = [layer for layer in module.modules() if isinstance(layer, torch.nn.Linear) and "forward" not in vars(layer)]
    for layer in layers:
        # an instance attribute: nn.Module.__call__ finds it before the class's forward
        layer.forward = functools.partial(_linear_forward, kernel, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
