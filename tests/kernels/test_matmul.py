"""The Triton matrix products against :mod:`bittern.quant` and a float64 truth (interpreter on CPU: small shapes
with ragged tails in every dimension)."""

from __future__ import annotations

import pytest
import torch

from bittern import quant

pytest.importorskip("triton")
from bittern.kernels import matmul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (M tokens, N outputs, K inputs): single rows, tails past every tile size, one tile exactly
SHAPES = [(1, 1, 1), (37, 45, 70), (65, 33, 96), (32, 32, 32), (3, 130, 17)]


def _operands(m: int, n: int, k: int, per_channel: bool, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator) * 2
    weight = torch.randn(n, k, generator=generator) * 0.02
    xq, act_scale = quant.quantize_activations(x)
    codes, scale = quant.ternarize(weight, per_channel)
    bias = torch.randn(n, generator=generator)
    return [t.to(DEVICE) for t in (xq, act_scale, codes, scale, bias)]


def _relative(got: torch.Tensor, truth: torch.Tensor) -> float:
    return ((got.double() - truth).norm() / truth.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_is_bit_identical_to_the_integer_reference(shape: tuple[int, int, int], per_channel: bool) -> None:
    xq, act_scale, codes, scale, bias = _operands(*shape, per_channel, seed=sum(shape))
    for b in (bias, None):
        y = matmul.int8_ternary_linear(xq, act_scale, codes, scale, b, torch.float32)
        assert torch.equal(y, quant.linear_from_integers(xq, act_scale, codes, scale, b))
    y16 = matmul.int8_ternary_linear(xq, act_scale, codes, scale, bias, torch.bfloat16)
    assert y16.dtype == torch.bfloat16
    assert torch.equal(y16, quant.linear_from_integers(xq, act_scale, codes, scale, bias).to(torch.bfloat16))


def test_forward_keeps_leading_dimensions() -> None:
    xq, act_scale, codes, scale, bias = _operands(12, 20, 40, False, seed=3)
    y = matmul.int8_ternary_linear(xq.reshape(3, 4, 40), act_scale.reshape(3, 4, 1), codes, scale, bias, torch.float32)
    assert y.shape == (3, 4, 20)
    assert torch.equal(y.reshape(12, 20), matmul.int8_ternary_linear(xq, act_scale, codes, scale, bias, torch.float32))


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("widths", [(40, 12, 12), (5, 70), (32, 32)])  # layers ending inside a tile, or on its edge
def test_grouped_forward_equals_each_layer(widths: tuple[int, ...], per_channel: bool) -> None:
    generator = torch.Generator().manual_seed(sum(widths))
    xq, act_scale = quant.quantize_activations(torch.randn(3, 37, 70, generator=generator) * 2)
    layers = [quant.ternarize(torch.randn(n, 70, generator=generator) * 0.02, per_channel) for n in widths]
    stacked = torch.cat([codes for codes, _ in layers]).to(DEVICE)
    scales = [scale.to(DEVICE) for _, scale in layers]
    for dtype in (torch.float32, torch.bfloat16):
        ys = matmul.int8_ternary_group(xq.to(DEVICE), act_scale.to(DEVICE), stacked, list(widths), scales, dtype)
        assert len(ys) == len(widths)
        for y, (codes, scale) in zip(ys, layers, strict=True):
            expected = quant.linear_from_integers(xq, act_scale, codes, scale, None).to(dtype)
            assert y.shape == (3, 37, codes.shape[0]) and y.dtype == dtype and y.is_contiguous()
            assert torch.equal(y.cpu(), expected)


def test_grouped_forward_refuses_mismatched_layers() -> None:
    xq, act_scale, codes, scale, _ = _operands(4, 8, 16, False, seed=1)
    with pytest.raises(ValueError, match="2 or 3 layers"):
        matmul.int8_ternary_group(xq, act_scale, codes, [8], [scale], torch.float32)
    with pytest.raises(ValueError, match="2 or 3 layers"):
        matmul.int8_ternary_group(xq, act_scale, codes, [4, 5], [scale, scale], torch.float32)
    with pytest.raises(ValueError, match="per tensor, or every layer's per row"):
        matmul.int8_ternary_group(xq, act_scale, codes, [4, 4], [scale, scale.expand(4)], torch.float32)


def test_forward_accumulates_exactly_at_the_int8_extremes() -> None:
    # every product is -128 * -1: a float16 or bf16 accumulator would round 128 * K, int32 does not
    k = 1000
    xq = torch.full((2, k), -128, dtype=torch.int8, device=DEVICE)
    codes = torch.full((3, k), -1, dtype=torch.int8, device=DEVICE)
    one = torch.ones(1, device=DEVICE)
    y = matmul.int8_ternary_linear(xq, torch.ones((2, 1), device=DEVICE), codes, one, None, torch.float32)
    assert torch.equal(y, torch.full((2, 3), 128.0 * k, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_grad_input(shape: tuple[int, int, int], per_channel: bool, dtype: torch.dtype) -> None:
    m, n, _k = shape
    _xq, _a, codes, scale, _b = _operands(*shape, per_channel, seed=7 + sum(shape))
    grad_y = torch.randn(m, n, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    got = matmul.grad_input(grad_y, codes, scale, torch.float32)
    assert got.dtype == torch.float32 and got.shape == (m, codes.shape[1])
    truth = grad_y.double() @ quant.dequantize_weight(codes, scale, torch.float64)
    # bf16 operands: the per-row scale is rounded to bf16 with the codes (as the reference does)
    assert _relative(got, truth) <= (1e-6 if dtype == torch.float32 else 1e-2)
    reference = grad_y @ quant.dequantize_weight(codes, scale, dtype)
    assert _relative(got, reference.double()) <= (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_grad_weight(shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    m, n, k = shape
    xq, act_scale, _c, _s, _b = _operands(*shape, False, seed=11 + sum(shape))
    grad_y = torch.randn(m, n, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)
    got = matmul.grad_weight(grad_y, xq, act_scale, torch.float32)
    assert got.dtype == torch.float32 and got.shape == (n, k)
    truth = grad_y.double().t() @ quant.dequantize_activations(xq, act_scale, torch.float64)
    assert _relative(got, truth) <= (1e-6 if dtype == torch.float32 else 1e-2)


def test_grad_weight_of_no_tokens_is_zero() -> None:
    got = matmul.grad_weight(
        torch.zeros(0, 5, device=DEVICE),
        torch.zeros(0, 7, dtype=torch.int8, device=DEVICE),
        torch.ones(0, 1, device=DEVICE),
        torch.float32,
    )
    assert torch.equal(got, torch.zeros(5, 7, device=DEVICE))
