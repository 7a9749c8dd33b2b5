"""Which CPU products run on the native kernels (:mod:`bittern.kernels.cpu`): packed layers without gradients under the
``auto`` backend; never under ``reference``, ``BITTERN_CPU_KERNELS=0`` or when a gradient is wanted."""

from __future__ import annotations

import pytest
import torch
from conftest import one_thread

from bittern import kernels, quant
from bittern.kernels import cpu
from bittern.nn import BitLinear, TernaryLinear, project

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the native CPU kernels did not build here")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the ops whose native CPU implementation ran during a test."""
    seen: list[str] = []
    for name in ("packed_linear", "packed_linear_group", "packed_quantized"):
        op = kernels.OPS[name]
        assert op.cpu is not None

        def spy(*args, _original=op.cpu.run, _name=name):
            seen.append(_name)
            return _original(*args)

        monkeypatch.setattr(op, "cpu", kernels.Implementation(spy, op.cpu.applies))
    return seen


def _layer(n: int = 12, k: int = 40, bias: bool = True, seed: int = 0) -> TernaryLinear:
    torch.manual_seed(seed)
    return TernaryLinear.from_bitlinear(BitLinear(k, n, bias=bias))


def _reference(layer: TernaryLinear, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    return quant.integer_linear(x, layer.codes(), layer.weight_scale, layer.bias, out_dtype)


def test_packed_layers_run_on_the_native_kernels(calls: list[str]) -> None:
    layer = _layer()
    x = torch.randn(3, 40)
    with torch.no_grad(), one_thread():
        assert torch.equal(layer(x), _reference(layer, x))
    assert calls == ["packed_linear"]
    assert kernels.native_cpu(x)


def test_groups_and_prequantized_inputs_run_on_the_native_kernels(calls: list[str]) -> None:
    q, k = _layer(12, 40, bias=False, seed=1), _layer(8, 40, bias=False, seed=2)
    x = torch.randn(2, 40)
    with torch.inference_mode(), one_thread():
        got = project(x, [q, k])
        assert calls == ["packed_linear_group"]
        assert torch.equal(got[0], _reference(q, x)) and torch.equal(got[1], _reference(k, x))
        got = project(x, [q, k], quant.quantize_activations(x))
        assert calls[-1] == "packed_quantized"
        assert torch.equal(got[0], _reference(q, x)) and torch.equal(got[1], _reference(k, x))


@pytest.mark.parametrize("how", ["backend", "environment"])
def test_the_reference_can_be_forced(how: str, calls: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer()
    x = torch.randn(3, 40)
    if how == "environment":
        monkeypatch.setenv(cpu.ENV, "0")
        assert not cpu.available()
        y = layer(x)
    else:
        with kernels.use_backend("reference"):
            y = layer(x)
    assert calls == []
    assert torch.equal(y.detach(), _reference(layer, x))


def test_a_gradient_goes_through_the_reference(calls: list[str]) -> None:
    layer = _layer()
    x = torch.randn(3, 40, requires_grad=True)
    layer(x).sum().backward()
    assert calls == []
    assert x.grad is not None


def test_a_trainable_bias_goes_through_the_reference(calls: list[str]) -> None:
    layer = _layer()
    bias = layer.bias.detach().clone().requires_grad_()
    y = kernels.packed_linear(torch.randn(3, 40), layer.packed_weight, layer.out_features, layer.weight_scale, bias)
    y.sum().backward()
    assert calls == []
    assert torch.equal(bias.grad, torch.full_like(bias, 3.0))  # d(sum)/d(bias): one per row of x


def test_autocast_output_dtype(calls: list[str]) -> None:
    layer = _layer()
    x = torch.randn(3, 40)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert calls == ["packed_linear"]
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, _reference(layer, x, torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_table_quantizes_activations_on_the_native_kernels_bit_for_bit(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 5, 70, generator=generator) * 4).to(dtype)
    x = x.transpose(0, 1)  # not contiguous
    assert kernels.OPS["quantize_activations"].takes(x)
    with one_thread():
        xq, scale = kernels.quantize_activations(x)
    want_xq, want_scale = quant.quantize_activations(x)
    assert torch.equal(xq, want_xq) and torch.equal(scale, want_scale)
