"""The Triton quantizers against :mod:`bittern.quant`, bit for bit (on CPU they run in Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch

from bittern import quant

pytest.importorskip("triton")
import triton
import triton.language as tl

from bittern.kernels import quantizers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(DEVICE)


# --- activations -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (37, 70), (3, 5, 129), (2, 64)])
def test_activation_codes_and_scales_are_bit_identical(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = _randn(*shape, seed=sum(shape), dtype=dtype, scale=3.0)
    xq, scale = quantizers.quantize_activations(x)
    ref_xq, ref_scale = quant.quantize_activations(x)
    assert xq.dtype == torch.int8 and scale.dtype == torch.float32
    assert xq.shape == x.shape and scale.shape == (*x.shape[:-1], 1)
    assert torch.equal(xq, ref_xq)
    assert torch.equal(scale, ref_scale)


def test_activation_ties_round_half_to_even() -> None:
    # amax 127 makes x * 127 / a == x: the halves 0.5, 1.5, 2.5, -0.5, -2.5 go to the even neighbour
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -126.5]], device=DEVICE)
    xq, _ = quantizers.quantize_activations(x)
    assert xq.tolist() == [[127, 0, 2, 2, 0, -2, 4, -126]]
    assert torch.equal(xq, quant.quantize_activations(x)[0])


def test_activation_zero_rows_and_extremes() -> None:
    x = torch.zeros(3, 40, device=DEVICE)
    x[1, 3] = 1e-30  # below EPS: the maximum is clamped to 1e-5
    x[2] = torch.linspace(-3e4, 3e4, 40)
    xq, scale = quantizers.quantize_activations(x)
    ref_xq, ref_scale = quant.quantize_activations(x)
    assert torch.equal(xq, ref_xq) and torch.equal(scale, ref_scale)
    assert scale[0].item() == pytest.approx(127 / 1e-5) and xq[0].abs().sum().item() == 0


@pytest.mark.parametrize("pieces", [2, 8])  # 8: rows over 4096 are read in wider pieces
def test_activation_rows_of_several_pieces(pieces: int) -> None:
    k = pieces * quantizers.ACT_BLOCK_K + 300  # a ragged tail
    x = _randn(2, k, seed=5, dtype=torch.bfloat16, scale=2.0)
    xq, scale = quantizers.quantize_activations(x)
    ref_xq, ref_scale = quant.quantize_activations(x)
    assert torch.equal(xq, ref_xq) and torch.equal(scale, ref_scale)


def test_activation_strided_input() -> None:
    x = _randn(70, 37, seed=6).t()  # [37, 70] with a non-unit last stride
    xq, scale = quantizers.quantize_activations(x)
    ref_xq, ref_scale = quant.quantize_activations(x)
    assert torch.equal(xq, ref_xq) and torch.equal(scale, ref_scale)


# --- weights -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (45, 70), (300, 301)])  # 300 x 301 spans two partial sums
def test_ternary_codes_and_scale_are_bit_identical(
    shape: tuple[int, int], per_channel: bool, dtype: torch.dtype
) -> None:
    weight = _randn(*shape, seed=shape[0], dtype=dtype, scale=0.02)
    codes, scale = quantizers.ternarize(weight, per_channel)
    ref_codes, ref_scale = quant.ternarize(weight, per_channel)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale.shape == ((shape[0],) if per_channel else (1,))
    assert torch.equal(scale, ref_scale)
    assert torch.equal(codes, ref_codes)
    assert set(codes.unique().tolist()) <= {-1, 0, 1}


def test_weight_ties_round_half_to_even() -> None:
    # mean |W| = 1: W / s hits 0.5 (→ 0), 1.5 (→ 2 → clamped 1) and -0.5 (→ 0) exactly
    weight = torch.tensor([[0.5, 1.5, -0.5, 2.0], [-1.5, 0.25, 0.75, 1.0]], device=DEVICE)
    assert quant.weight_scale(weight).item() == 1.0
    codes, scale = quantizers.ternarize(weight)
    assert scale.item() == 1.0
    assert codes.tolist() == [[0, 1, 0, 1], [-1, 0, 1, 1]]


def test_tiny_weights_take_the_scale_floor() -> None:
    weight = torch.full((4, 8), 1e-9, device=DEVICE)
    codes, scale = quantizers.ternarize(weight)
    assert scale.item() == pytest.approx(1 / quant.EPS)
    assert torch.equal(codes, quant.ternarize(weight)[0])
    assert codes.abs().sum().item() == 0


def test_scale_is_order_independent() -> None:
    weight = _randn(257, 300, seed=9, scale=0.05)
    assert torch.equal(quantizers.weight_scale(weight), quantizers.weight_scale(weight.flip(0).contiguous()))
    assert torch.equal(quantizers.weight_scale(weight.t()), quant.weight_scale(weight))  # non-contiguous input


@pytest.mark.parametrize("widen", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 70), (3, 5, 129)])
def test_activations_widened_in_the_same_pass_equal_the_dequantized_reference(
    shape: tuple[int, ...], widen: torch.dtype
) -> None:
    x = _randn(*shape, seed=3, dtype=torch.bfloat16, scale=2.0)
    xq, scale, x_hat = quantizers.quantize_activations_and_widen(x, widen)
    ref_xq, ref_scale = quant.quantize_activations(x)
    assert torch.equal(xq, ref_xq) and torch.equal(scale, ref_scale)
    assert x_hat.dtype == widen and x_hat.shape == x.shape
    assert torch.equal(x_hat, quant.dequantize_activations(ref_xq, ref_scale, widen))
    assert quantizers.quantize_activations_and_widen(x, None)[2] is None


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("widen", [torch.float32, torch.bfloat16])
def test_weight_widened_in_the_codes_pass_equals_the_dequantized_reference(
    per_channel: bool, widen: torch.dtype
) -> None:
    weight = _randn(45, 70, seed=4, scale=0.02)
    codes, scale, w_hat = quantizers.ternarize_and_widen(weight, per_channel, widen)
    ref_codes, ref_scale = quant.ternarize(weight, per_channel)
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)
    assert w_hat.dtype == widen and torch.equal(w_hat, quant.dequantize_weight(ref_codes, ref_scale, widen))


def test_codes_programs_that_reduce_many_partials_cover_the_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small blocks force 625 partial sums, so each codes program covers several blocks (the large-weight case)."""
    monkeypatch.setattr(quantizers, "_SUM_BLOCK", 16)
    monkeypatch.setattr(quantizers, "_SUM_CHUNKS", 1)
    monkeypatch.setattr(quantizers, "_CODES_BLOCK", 64)
    weight = _randn(100, 100, seed=5, scale=0.03)
    codes, scale = quantizers.ternarize(weight)
    ref_codes, ref_scale = quant.ternarize(weight)
    assert torch.equal(scale, ref_scale) and torch.equal(codes, ref_codes)


# --- dequantizers (the backward's widening passes) -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (37, 70), (3, 5, 129)])
def test_dequantized_activations_are_bit_identical(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    xq, scale = quant.quantize_activations(_randn(*shape, seed=len(shape), scale=3.0))
    got = quantizers.dequantize_activations(xq, scale, dtype)
    assert got.dtype == dtype and got.shape == xq.shape
    assert torch.equal(got, quant.dequantize_activations(xq, scale, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_channel", [False, True])
def test_dequantized_weights_are_bit_identical(per_channel: bool, dtype: torch.dtype) -> None:
    codes, scale = quant.ternarize(_randn(45, 70, seed=8, scale=0.02), per_channel)
    got = quantizers.dequantize_weight(codes, scale, dtype)
    assert got.dtype == dtype and torch.equal(got, quant.dequantize_weight(codes, scale, dtype))


# --- the scale helpers every kernel shares ------------------------------------------------------------------


@triton.jit
def _scale_helpers_kernel(amax_ptr, acc_ptr, ws_ptr, sx_ptr, scale_out, rescaled_out, n, block: tl.constexpr):
    offs = tl.program_id(0) * block + tl.arange(0, block)
    ok = offs < n
    tl.store(scale_out + offs, quantizers.activation_scale(tl.load(amax_ptr + offs, mask=ok, other=1.0)), mask=ok)
    acc = tl.load(acc_ptr + offs, mask=ok, other=0)
    ws = tl.load(ws_ptr + offs, mask=ok, other=1.0)
    sx = tl.load(sx_ptr + offs, mask=ok, other=1.0)
    tl.store(rescaled_out + offs, quantizers.rescale(acc, ws, sx), mask=ok)


def scale_helpers(
    amax: torch.Tensor, acc: torch.Tensor, ws: torch.Tensor, sx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' ``activation_scale(amax)`` and ``rescale(acc, ws, sx)`` applied elementwise (1-D, same length)."""
    scale, rescaled = torch.empty_like(amax), torch.empty_like(ws)
    n = amax.numel()
    _scale_helpers_kernel[(triton.cdiv(n, 1024),)](amax, acc, ws, sx, scale, rescaled, n, block=1024)
    return scale, rescaled


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: equal float32 bit patterns, any NaN matching any NaN."""
    return (a.view(torch.int32) == b.view(torch.int32)) | (torch.isnan(a) & torch.isnan(b))


def _positive_floats(count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random float32 bit patterns from ``EPS`` up to 1e30 (every exponent alike)."""
    low, high = (torch.tensor([quant.EPS, 1e30]).view(torch.int32)).tolist()
    return torch.randint(low, high, (count,), generator=generator, dtype=torch.int32).view(torch.float32)


def test_scale_helpers_round_as_the_reference() -> None:
    """``activation_scale`` is ``reciprocal(a) * 127`` with an IEEE reciprocal, and ``rescale`` one IEEE division:
    the reference's bits on random float32 patterns, bf16-valued maxima (where one division by ``a`` would differ)
    and int32 products up to the largest a 2B4T-shaped layer makes."""
    generator = torch.Generator().manual_seed(127)
    count = 1 << 16
    amax = torch.cat([_positive_floats(count // 2, generator),
                      torch.linspace(0.01, 300.0, count // 2).to(torch.bfloat16).to(torch.float32)])  # fmt: skip
    acc = torch.randint(-(128 * 6912), 128 * 6912, (count,), generator=generator, dtype=torch.int32)
    ws = _positive_floats(count, generator).clamp(max=1e5)
    sx = quant.activation_scale(_positive_floats(count, generator))
    scale, rescaled = scale_helpers(amax.to(DEVICE), acc.to(DEVICE), ws.to(DEVICE), sx.to(DEVICE))
    wrong = ~same_bits(scale.cpu(), quant.activation_scale(amax))
    assert not wrong.any(), f"{int(wrong.sum())} scales differ, e.g. at max|x| = {amax[wrong][:4].tolist()}"
    wrong = ~same_bits(rescaled.cpu(), quant.rescale(acc, ws, sx))
    assert not wrong.any(), f"{int(wrong.sum())} rescaled products differ"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_activation_scale_rounds_as_the_reference_for_every_float32_maximum() -> None:
    """Every float32 ``max|x|`` from ``EPS`` to the largest finite value: the kernels' scale is the reference's."""
    low, high = torch.tensor([quant.EPS, 3.4028235e38]).view(torch.int32).tolist()
    chunk = 1 << 26
    for start in range(low, high + 1, chunk):
        bits = torch.arange(start, min(start + chunk, high + 1), dtype=torch.int64, device="cuda").to(torch.int32)
        amax = bits.view(torch.float32)
        ones = torch.ones_like(amax)
        scale, _ = scale_helpers(amax, torch.zeros_like(bits), ones, ones)
        wrong = ~same_bits(scale, quant.activation_scale(amax))
        assert not wrong.any(), f"{int(wrong.sum())} scales differ, e.g. at {amax[wrong][:4].tolist()}"
