"""Run setup (kfdeb/run.py): device and precision choices, seeds, the output folder."""

from __future__ import annotations

import pytest
import torch

from kfdeb.distributed import Context, resolve_device
from kfdeb.errors import UserInputError
from kfdeb.run import amp_dtype_for, describe_amp

V100, T4, A100, H100 = (7, 0), (7, 5), (8, 0), (9, 0)


@pytest.mark.parametrize("amp, device, capability, expected", [
    ("auto", "cuda", H100, torch.bfloat16),
    ("auto", "cuda", A100, torch.bfloat16),
    ("auto", "cuda", T4, torch.float16),  # emulated bf16 only: fp16 + GradScaler, as the reference trained
    ("auto", "cuda", V100, torch.float16),
    ("auto", "cpu", None, None),
    ("none", "cuda", H100, None),
    ("bf16", "cpu", None, torch.bfloat16),  # asked for: honoured, even where it is slow
    ("fp16", "cuda", H100, torch.float16),
    ("bf16", "cuda", V100, torch.bfloat16),
])
def test_amp_dtype_for_each_device(amp, device, capability, expected):
    assert amp_dtype_for(amp, device, capability) is expected


def test_the_startup_line_says_which_precision_and_why():
    assert describe_amp("auto", torch.bfloat16, H100) == "bf16 (auto: GPU compute capability 9.0, native bf16)"
    assert describe_amp("auto", torch.float16, T4) == \
        "fp16 with GradScaler (auto: GPU compute capability 7.5, no native bf16)"
    assert describe_amp("auto", None, None) == "none (fp32) (auto: not a GPU)"
    assert describe_amp("bf16", torch.bfloat16, None) == "bf16 (--amp bf16)"


@pytest.mark.parametrize("requested, local_rank, world, cuda, expected", [
    ("auto", 0, 1, False, "cpu"),
    ("auto", 3, 8, True, "cuda:3"),
    ("cuda", 0, 1, True, "cuda:0"),  # one process: GPU 0, not torch.device("cuda") without an index
    ("cuda", 5, 8, True, "cuda:5"),  # under torchrun: this rank's GPU
    ("cuda:1", 0, 1, True, "cuda:1"),
    ("cpu", 1, 2, True, "cpu"),
])
def test_resolve_device(requested, local_rank, world, cuda, expected):
    assert resolve_device(requested, local_rank, world, cuda) == expected


@pytest.mark.parametrize("requested, world, cuda, message", [
    ("cuda", 1, False, "CUDA is not available"),
    ("cuda:1", 2, True, "names one GPU, but 2 processes run"),
    ("tpu", 1, False, "expected auto, cpu, cuda or cuda:N"),
])
def test_resolve_device_refuses_what_cannot_work(requested, world, cuda, message):
    with pytest.raises(UserInputError, match=message):
        resolve_device(requested, 0, world, cuda)


CPU_CONTEXT = Context(0, 0, 1, torch.device("cpu"))


def test_matryoshka_widths_must_fit_the_model_and_a_missing_full_width_warns(capsys):
    from kfdeb.run import check_matryoshka_dims

    with pytest.raises(UserInputError, match="--matryoshka_dims 1024: wider than the model's 768-dimensional embedding"):
        check_matryoshka_dims((1024, 256), 768, CPU_CONTEXT)
    check_matryoshka_dims((768, 256), 768, CPU_CONTEXT)
    assert capsys.readouterr().out == ""
    check_matryoshka_dims((512, 256), 768, CPU_CONTEXT)
    assert "leaves out the model's own width 768" in capsys.readouterr().out
