"""Linear layers on oneDNN's float32 GEMM, for inference on x86-64 CPUs.

A linear layer computes y = x W^T + b. On CPU, torch's F.linear hands the product to its BLAS (MKL
in the PyPI wheels), and on AMD Zen CPUs MKL's sgemm runs far below the AVX-512 rate. Measured on
a 2-vCPU AMD EPYC (Zen 5), 4096 x 384 times 384 x 1536 in float32 (bench/cpu_gemm.py): F.linear
190 GFLOP/s, oneDNN (torch.ops.mkldnn._linear_pointwise, the kernel torch's own inductor CPU
backend emits) 447, onnxruntime's MLAS 362; the encode of all-MiniLM-L6-v2 and of
multilingual-e5-small 1.65x faster, embeddings within 4e-7 of F.linear's. The maths is the same
float32 product; only the order of the summation differs.

`onednn_linears(module)` routes the F.linear calls made in the calling thread through that kernel
for the duration of a `with` block (inference: encode). It pushes a torch function mode
(`torch.overrides.TorchFunctionMode`) that sees every torch function called in the block and
answers F.linear itself; torch keeps the stack of these modes per thread, so another thread
encoding with the same model at the same time never sees it, and the model is not modified at all.
nn.Linear and any subclass that calls F.linear (its own forward stays its own) get the kernel;
everything else runs as torch would run it. A call falls back to F.linear when the kernel cannot
serve it: gradients wanted (the kernel has no backward, and training keeps torch's path), a tensor
that is not float32 or not on the CPU, CPU autocast on (it asks for bf16/fp16 products), a tensor
subclass. The whole context does nothing for a module that is not on the CPU (a GPU keeps torch's
path untouched), when the torch build lacks the kernel, on a CPU that is not x86-64 (oneDNN there
is a different library), or with KFDEB_CPU_GEMM=blas in the environment (the escape hatch, and how
the benches measure both). Before first use the kernel is checked once against a float64 product;
a kernel that disagrees is not used. The mode costs one Python call per torch function in the
block, small beside an encoder's products (about 50 calls per layer a batch for BERT).

Why not patch the layers (what this module did until issue 35): the old context set an instance
attribute `layer.forward` on each nn.Linear of the shared model and deleted it on exit, skipping
the layers that already had one, which is also how it replaced the forward of subclasses that
define their own. With two threads encoding on one model, thread B entering while A's patches are
in place found every layer patched, patched none and registered none to restore; A's exit then
deleted them all while B was still encoding, so B's remaining batches ran on F.linear (other
rounding: not equal to a single-threaded encode), and an entry interleaved with another thread's
patching or unpatching could leave B's exit deleting an attribute that A had already deleted
(AttributeError). The large errors measured in issue 35 (rows off by up to 0.11 with
all-MiniLM-L6-v2) came from the same pattern of shared state in SentenceEncoder.encode: it put the
model in eval mode and restored the mode it found on exit; B, entering after A, found eval mode
and restored that, while A, finishing first, put the model back in training mode under B, whose
remaining batches then ran with dropout (a freshly loaded encoder counted as training, since
nn.Module starts so). That happens with KFDEB_CPU_GEMM=blas too; model.py's `eval_mode` fixes it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from kfdeb.errors import UserInputError

ENV_SWITCH = "KFDEB_CPU_GEMM"  # "onednn" (default on x86-64) or "blas" (torch's F.linear everywhere)
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)  # the kernel knows nothing of tensor subclasses


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


def _serves(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the kernel can compute this F.linear call (module docstring: when it falls back)."""
    return (not torch.is_grad_enabled() and x.dtype == torch.float32 and weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32) and x.device.type == "cpu"
            and weight.device.type == "cpu" and not torch.is_autocast_enabled("cpu"))


class OneDnnLinears(TorchFunctionMode):
    """A torch function mode answering F.linear with oneDNN's kernel where it can (module docstring)."""

    def __init__(self, kernel: Callable[..., torch.Tensor]):
        super().__init__()
        self.kernel = kernel

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and all(t in PLAIN_TENSORS for t in types):
            x, weight, *rest = args
            bias = rest[0] if rest else kwargs.get("bias")
            if _serves(x, weight, bias):
                return self.kernel(x, weight, bias, "none", [], "")
        # the mode is off while this handler runs: func is torch's own
        return func(*args, **kwargs)


@contextlib.contextmanager
def onednn_linears(module: torch.nn.Module) -> Iterator[None]:
    """Within the block, the F.linear calls of the calling thread compute on oneDNN where they can
    (module docstring); nothing changes for a module whose parameters are not on the CPU."""
    on_cpu = all(parameter.device.type == "cpu" for parameter in module.parameters())
    if not on_cpu or not onednn_enabled():
        yield
        return
    with OneDnnLinears(_kernel()):
        yield
