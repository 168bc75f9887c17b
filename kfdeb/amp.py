"""Training precision: which autocast dtype `--amp` gives on a device, and the startup line that says why.

auto: bf16 where the GPU computes it natively (compute capability 8.0 and up), fp16 with a GradScaler on older
GPUs, full fp32 on CPU. Pooling and the losses stay float32 whatever is chosen (loop.py casts them).
"""

from __future__ import annotations

import torch


def amp_dtype_for(amp: str, device_type: str, cuda_capability: tuple[int, int] | None) -> torch.dtype | None:
    """The autocast dtype for `--amp` on this device (None: full fp32).

    auto: bf16 on GPUs with native bf16 (compute capability 8.0 and up: A100, H100, RTX 30xx+);
    fp16 with a GradScaler on older GPUs (V100, T4), which only emulate bf16 (slowly) and where
    the reference trained with fp16; none on CPU, where bf16 pays only with avx512_bf16/AMX.
    """
    if amp == "auto":
        if device_type != "cuda":
            return None
        return torch.bfloat16 if cuda_capability is not None and cuda_capability >= (8, 0) else torch.float16
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def describe_amp(amp: str, dtype: torch.dtype | None, cuda_capability: tuple[int, int] | None) -> str:
    """The startup line's words for the precision chosen, and why."""
    name = {None: "none (fp32)", torch.bfloat16: "bf16", torch.float16: "fp16 with GradScaler"}[dtype]
    if amp != "auto":
        return f"{name} (--amp {amp})"
    if cuda_capability is None:
        return f"{name} (auto: not a GPU)"
    native = "native bf16" if cuda_capability >= (8, 0) else "no native bf16"
    return f"{name} (auto: GPU compute capability {cuda_capability[0]}.{cuda_capability[1]}, {native})"
