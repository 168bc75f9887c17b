"""kfdeb.cpu_linear: oneDNN's float32 GEMM for inference linear layers, against a float64 product and torch's path."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from kfdeb import cpu_linear
from kfdeb.errors import UserInputError

X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the oneDNN kernel's calls (the real kernel still computes)."""
    real, calls = cpu_linear._kernel(), []

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(cpu_linear, "_kernel", lambda: counted)
    return calls


def test_enabled_on_x86_64_with_the_pypi_torch():
    # CI runs on x86-64 with torch's PyPI wheel, which has the kernel: were it renamed in a later torch,
    # this fails instead of the speed silently going back to the BLAS path
    assert cpu_linear.onednn_enabled() == X86


@pytest.mark.parametrize("shape", [(7, 64), (3, 11, 64), "transposed"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_layers_compute_x_wt_plus_b_to_float32_accuracy(shape, bias, kernel_calls):
    generator = torch.Generator().manual_seed(3)
    layer = torch.nn.Linear(64, 96, bias=bias)
    x = torch.randn(64, 13, generator=generator).T if shape == "transposed" else torch.randn(shape, generator=generator)
    exact = x.double() @ layer.weight.double().T + (layer.bias.double() if bias else 0)
    with torch.inference_mode(), cpu_linear.onednn_linears(layer):
        got = layer(x)
    assert len(kernel_calls) == X86
    assert got.dtype == torch.float32 and got.shape == exact.shape
    torch_error = (F.linear(x, layer.weight, layer.bias).double() - exact).abs().max().item()
    assert (got.double() - exact).abs().max().item() <= max(4 * torch_error, 1e-5)
    assert "forward" not in vars(layer)  # restored


def test_encode_uses_the_kernel_and_gives_torch_s_embeddings(tiny_bert, monkeypatch, kernel_calls):
    from kfdeb.model import load_encoder

    encoder = load_encoder(tiny_bert)
    sentences = ["첫 번째 문장입니다.", "두 번째, 조금 더 긴 문장입니다.", "셋"] * 5
    fast = encoder.encode(sentences, batch_size=4)
    linears = sum(isinstance(m, torch.nn.Linear) for m in encoder.modules())
    assert len(kernel_calls) == (linears * 4 if X86 else 0)  # 15 sentences -> 3 distinct lengths in 4 batches of <= 4
    monkeypatch.setenv(cpu_linear.ENV_SWITCH, "blas")
    kernel_calls.clear()
    blas = encoder.encode(sentences, batch_size=4)
    assert kernel_calls == []
    assert torch.allclose(fast, blas, rtol=1e-5, atol=1e-6)
    assert not any("forward" in vars(m) for m in encoder.modules())


def test_gradients_take_torch_s_path(kernel_calls):
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    with cpu_linear.onednn_linears(layer):
        layer(x).square().sum().backward()
    assert kernel_calls == []  # the kernel has no backward: training keeps F.linear
    inside = x.grad.clone()
    x.grad = None
    layer(x).square().sum().backward()
    assert torch.equal(inside, x.grad)


def test_cpu_autocast_keeps_torch_s_path(kernel_calls):
    layer = torch.nn.Linear(16, 8)
    with torch.inference_mode(), cpu_linear.onednn_linears(layer), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(4, 16))
    assert kernel_calls == [] and out.dtype == torch.bfloat16


def test_a_module_off_the_cpu_is_left_alone():
    layer = torch.nn.Linear(4, 4, device="meta")  # stands for a GPU: any device but the CPU
    with cpu_linear.onednn_linears(layer):
        assert "forward" not in vars(layer)


def test_the_layers_are_restored_when_the_block_raises():
    layer = torch.nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match="boom"), cpu_linear.onednn_linears(layer):
        raise RuntimeError("boom")
    assert "forward" not in vars(layer)


def test_a_bad_switch_value_is_a_user_error(monkeypatch):
    monkeypatch.setenv(cpu_linear.ENV_SWITCH, "mkl")
    with pytest.raises(UserInputError, match="KFDEB_CPU_GEMM='mkl': expected onednn or blas"):
        cpu_linear.onednn_enabled()
