"""kfdeb.cpu_linear: oneDNN's float32 GEMM for inference linear layers, against a float64 product and torch's path;
encodes in several threads on one model against one thread's."""

from __future__ import annotations

import platform
import threading

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


def test_a_subclass_keeps_its_own_forward(kernel_calls):
    class ScaledLinear(torch.nn.Linear):  # e.g. an adapter: its own forward around F.linear
        def forward(self, x):
            return 2 * F.linear(x, self.weight, self.bias) + 1

    torch.manual_seed(0)
    layer, x = ScaledLinear(64, 32), torch.randn(5, 64)
    with torch.inference_mode(), cpu_linear.onednn_linears(layer):
        got = layer(x)
    assert len(kernel_calls) == X86  # its F.linear still takes the kernel
    exact = 2 * (x.double() @ layer.weight.double().T + layer.bias.double()) + 1
    assert (got.double() - exact).abs().max().item() <= 1e-5


def test_the_route_is_local_to_the_calling_thread(kernel_calls):
    layer, x, outside = torch.nn.Linear(64, 32), torch.randn(5, 64), []

    def other_thread() -> None:
        with torch.inference_mode():  # a call the kernel could serve, were the route this thread's too
            outside.append(torch.equal(layer(x), F.linear(x, layer.weight, layer.bias)))

    with torch.inference_mode(), cpu_linear.onednn_linears(layer):
        other = threading.Thread(target=other_thread)
        other.start()
        other.join()
    assert outside == [True] and kernel_calls == []  # the other thread ran torch's F.linear, untouched


TEXTS = [f"{i}번째 문장입니다. " * (1 + i % 5) for i in range(24)]
WAIT = 60  # seconds a thread waits for the other before the test gives up (a deadlock would hang otherwise)


def interleaved_encodes(model, dtype: str) -> dict[str, torch.Tensor]:
    """Thread A starts an encode; inside its first batch it lets thread B start, which stops inside its own first
    batch until A has finished its whole encode (its exit included); then B finishes. The order in which one
    encode's exit falls in the middle of another's, forced instead of waited for."""
    a_inside, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()
    results: dict[str, torch.Tensor] = {}

    def hold(module, args):
        if threading.current_thread().name == "A" and not a_inside.is_set():
            a_inside.set()
            b_inside.wait(WAIT)
        elif threading.current_thread().name == "B" and not b_inside.is_set():
            b_inside.set()
            a_done.wait(WAIT)

    def encode(name: str) -> None:
        try:
            results[name] = model.encode(TEXTS, batch_size=4, dtype=dtype)
        finally:
            if name == "A":
                a_done.set()

    hook = model.transformer.register_forward_pre_hook(hold)
    try:
        a = threading.Thread(target=encode, args=("A",), name="A")
        b = threading.Thread(target=encode, args=("B",), name="B")
        a.start()
        assert a_inside.wait(WAIT)
        b.start()
        a.join(WAIT)
        b.join(WAIT)
    finally:
        hook.remove()
    return results


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_encode_ending_inside_another_changes_none_of_its_rows(tiny_deberta_dropout, dtype):
    # dropout 0.1 in the model: an encode that ran any batch in training mode would show it
    import kfdeb

    model = kfdeb.load(tiny_deberta_dropout, device="cpu")
    alone = model.encode(TEXTS, batch_size=4, dtype=dtype)
    assert torch.equal(model.encode(TEXTS, batch_size=4, dtype=dtype), alone)  # deterministic when alone
    results = interleaved_encodes(model, dtype)
    assert set(results) == {"A", "B"}
    assert torch.equal(results["A"], alone) and torch.equal(results["B"], alone)
    assert torch.equal(model.encode(TEXTS, batch_size=4, dtype=dtype), alone)  # and nothing left changed after


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_threads_encoding_on_one_model_get_one_thread_s_results(tiny_deberta_dropout, dtype):
    import kfdeb

    model = kfdeb.load(tiny_deberta_dropout, device="cpu")
    alone = model.encode(TEXTS, batch_size=4, dtype=dtype)
    results: dict[int, list[torch.Tensor]] = {}

    def encode_repeatedly(k: int) -> None:
        results[k] = [model.encode(TEXTS, batch_size=4, dtype=dtype) for _ in range(8)]

    threads = [threading.Thread(target=encode_repeatedly, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert sorted(results) == [0, 1]
    assert all(torch.equal(result, alone) for k in results for result in results[k])
