"""The dtype an encode computes in (`--dtype`, `kfdeb.load(..., dtype=...)`): float32, bfloat16, float16, or auto.

bfloat16 and float16 run the encoder under torch.autocast: each matrix product (linear layers, attention's
matmul/bmm) rounds its inputs, the weights included, to the dtype and accumulates in float32 inside the
kernel (on CPU: oneDNN, AMX or AVX512-bf16 where the CPU has them; on CUDA: tensor cores); the
element-wise ops between the products keep their inputs' dtype, and the residual stream, which starts at
the float32 embedding table, stays float32. Autocast was chosen over a bfloat16 copy of the weights: it
leaves the shared model untouched and is switched on per thread, so concurrent encodes in different dtypes
stay independent, and no second copy of the model lives on past the call. Its casts of the weights are
cached while a call runs (encode keeps one autocast context for the call, under no_grad: model.py); the
cache is torch's, process-wide under a lock, and a thread leaving autocast empties it, after which another
thread's next batch casts the weights again, to the same values. The products run on the same bf16/fp16
kernels either way, autocast only adding the cast of each float32 activation that enters one.
Pooling, normalisation, similarity and search stay float32: pooling.py widens the token states to
float32 with autocast off inside, and everything after it works on float32 embeddings.

Accuracy: bfloat16 keeps 8 significant bits (relative rounding <= 2^-9 ~ 0.2% per input of a product),
float16 11 bits (2^-12 ~ 0.02%); tests/test_inference_dtype.py bounds what that does to the embeddings of
tiny models (cosine to float32's >= 0.999 in bf16, >= 0.99998 in fp16) and to a retrieval set's nDCG@10
(within 0.4 points). float16 on a CPU is allowed: torch's CPU autocast computes it correctly (the same
tests), fast only where the CPU has avx512_fp16 or amx_fp16. float16's range ends at 65504: an encode whose
activations overflow it (inf/NaN embeddings) stops with a one-line error instead of returning them.

auto: bfloat16 on a CUDA GPU with native bf16 (compute capability 8.0 and up) and on a CPU whose flags
(/proc/cpuinfo, Linux) include amx_bf16 or avx512_bf16; float32 everywhere else (float16 is never
chosen automatically: its narrow range can overflow, to inf, where bf16 cannot).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from kfdeb.errors import UserInputError

DTYPE_NAMES = ("float32", "bfloat16", "float16", "auto")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # the CPU features that make bf16 products faster than float32
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (the first processor's `flags` line); empty elsewhere."""
    if not sys.platform.startswith("linux"):
        return set()
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> tuple[torch.dtype, str]:
    """The dtype encode computes in on `device`, and why (module docstring): (dtype, reason)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise UserInputError(f"dtype {dtype}: expected float32, bfloat16, float16 or auto")
        return dtype, "asked for"
    if dtype not in DTYPE_NAMES:
        raise UserInputError(f"dtype {dtype!r}: expected float32, bfloat16, float16 or auto")
    if dtype != "auto":
        return DTYPES[dtype], "asked for"
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) >= (8, 0):
            return torch.bfloat16, f"auto: GPU compute capability {major}.{minor}, native bf16"
        return torch.float32, f"auto: GPU compute capability {major}.{minor}, no native bf16"
    if device.type == "cpu":
        found = [flag for flag in CPU_BF16_FLAGS if flag in cpu_flags()]
        if found:
            return torch.bfloat16, f"auto: the CPU has {' and '.join(found)}"
        return torch.float32, f"auto: the CPU has neither {' nor '.join(CPU_BF16_FLAGS)}"
    return torch.float32, f"auto: device {device.type}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def computing_in(dtype: torch.dtype, device: torch.device):
    """The context an encode's forward runs in: autocast to dtype (module docstring), nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def describe_dtype(dtype: torch.dtype, reason: str, option: str) -> str:
    """A log line's words for the dtype chosen and why: "bfloat16 (auto: the CPU has amx_bf16)", "float32 (--dtype
    float32)" when the option named it."""
    return f"{dtype_name(dtype)} ({f'{option} {dtype_name(dtype)}' if reason == 'asked for' else reason})"
