"""Tests of the reference ternary math (:mod:`bittern.quant`) against the numerical contract (docs/design.md):
the published BitNet b1.58 code's operations, as PyTorch evaluates them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bittern import quant
from bittern.nn import BitLinear, TernaryLinear

PROPERTY = settings(max_examples=50, deadline=None)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@st.composite
def random_tensors(
    draw: st.DrawFn,
    ndim: int = 2,
    max_dim: int = 48,
    dtypes: tuple[torch.dtype, ...] = (torch.float32,),
) -> torch.Tensor:
    """A random tensor of ``ndim`` dims (each 1..``max_dim``) in one of ``dtypes``.

    Values come from a seeded generator with a drawn magnitude (1e-3..1e3) and a drawn shape of distribution
    (normal, uniform, heavy-tailed, or normal with about half the entries set to exactly zero), always finite.
    """
    shape = tuple(draw(st.integers(1, max_dim)) for _ in range(ndim))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    magnitude = 10.0 ** draw(st.integers(-3, 3))
    kind = draw(st.sampled_from(("normal", "uniform", "heavy", "sparse")))
    gen = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        values = torch.rand(shape, generator=gen) * 2 - 1
    elif kind == "heavy":
        values = torch.randn(shape, generator=gen) / torch.rand(shape, generator=gen).clamp(min=0.05)
    else:
        values = torch.randn(shape, generator=gen)
        if kind == "sparse":
            values = values * (torch.rand(shape, generator=gen) < 0.5)
    # heavy tails x 1e3 can exceed float16's range: keep every value finite in the drawn dtype
    limit = torch.finfo(dtype).max / 2
    return (values * magnitude).clamp(-limit, limit).to(dtype)


def float64_mean_abs(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``mean(|W|)`` of the float32-upcast weight, accumulated in float64 (an independent reference)."""
    w64 = weight.to(torch.float32).to(torch.float64).abs()
    return w64.mean(dim=-1) if per_channel else w64.mean().reshape(1)


def published_activation_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The published per-token quantizer, written as the Falcon-E / transformers code writes it (in float32)."""
    x = x.to(torch.float32)
    scale = 127 / x.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
    return (x * scale).round().clamp_(-128, 127).to(torch.int8), scale


def published_weight_quant(weight: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The published ternary quantizer (``scale = 1.0 / mean``, ``round(w * scale)``) for a given float32 mean."""
    w = weight.to(torch.float32)
    scale = 1.0 / mean.clamp(min=1e-5)
    return (w * scale.reshape(-1, 1)).round().clamp_(-1, 1).to(torch.int8), scale


# --- ternarize / weight scale ----------------------------------------------------------------------------


@PROPERTY
@given(weight=random_tensors(dtypes=FLOAT_DTYPES), per_channel=st.booleans())
def test_ternarize_codes_and_scale(weight: torch.Tensor, per_channel: bool) -> None:
    codes, scale = quant.ternarize(weight, per_channel=per_channel)
    n = weight.shape[0]

    assert codes.dtype == torch.int8
    assert codes.shape == weight.shape
    assert set(codes.unique().tolist()) <= {-1, 0, 1}

    assert scale.dtype == torch.float32
    assert scale.shape == ((n,) if per_channel else (1,))
    assert bool((scale > 0).all())

    # s_w = 1 / max(mean|W|, 1e-5): the float64 mean of the float32 values, rounded to float32 once, then the
    # published reciprocal; codes = clamp(round(W * s_w), -1, 1), half to even.
    mean = float64_mean_abs(weight, per_channel).to(torch.float32)
    assert torch.equal(quant.mean_abs(weight, per_channel), mean.clamp(min=1e-5))
    expected_codes, expected_scale = published_weight_quant(weight, mean)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(codes, expected_codes)
    # ... and independent of the summation order: the reversed tensor gives the same bits.
    flipped = quant.weight_scale(weight.flip(-1).flip(0), per_channel=per_channel)
    assert torch.equal(flipped, scale.flip(0))


@PROPERTY
@given(weight=random_tensors(dtypes=FLOAT_DTYPES), per_channel=st.booleans())
def test_requantizing_fake_quant_weight_with_same_scale_is_identity(weight: torch.Tensor, per_channel: bool) -> None:
    codes, scale = quant.ternarize(weight, per_channel=per_channel)
    fake = quant.dequantize_weight(codes, scale)
    assert fake.dtype == torch.float32
    assert torch.equal(quant.ternary_codes(fake, scale), codes)
    assert torch.equal(
        quant.fake_quant_weight(weight, per_channel), quant.dequantize_weight(codes, scale, weight.dtype)
    )


def test_weight_scale_is_clamped_for_an_all_zero_weight() -> None:
    codes, scale = quant.ternarize(torch.zeros(3, 5))
    assert torch.equal(scale, 1.0 / torch.tensor([1e-5], dtype=torch.float32))
    assert torch.equal(codes, torch.zeros(3, 5, dtype=torch.int8))


# --- activations -----------------------------------------------------------------------------------------


@PROPERTY
@given(x=st.integers(1, 3).flatmap(lambda nd: random_tensors(ndim=nd, max_dim=24, dtypes=FLOAT_DTYPES)))
def test_quantize_activations_range_scale_and_error(x: torch.Tensor) -> None:
    xq, a = quant.quantize_activations(x)
    assert xq.dtype == torch.int8
    assert xq.shape == x.shape
    assert int(xq.min()) >= -128
    assert int(xq.max()) <= 127

    assert a.dtype == torch.float32
    assert a.shape == (*x.shape[:-1], 1)
    x32 = x.to(torch.float32)
    # the published code's codes and scale, bit for bit
    expected_codes, expected_scale = published_activation_quant(x)
    assert torch.equal(a, expected_scale)
    assert torch.equal(xq, expected_codes)

    deq = quant.dequantize_activations(xq, a)
    step = 1 / a
    bound = step / 2 + step * 1e-5  # half a quantization step, plus float32 rounding of the products
    assert bool(((x32 - deq).abs() <= bound).all())
    assert torch.equal(quant.fake_quant_activations(x), quant.dequantize_activations(xq, a, x.dtype))


def test_activation_scale_is_clamped_for_an_all_zero_token() -> None:
    xq, a = quant.quantize_activations(torch.zeros(2, 4))
    assert torch.equal(a, torch.reciprocal(torch.full((2, 1), 1e-5)) * 127)
    assert torch.equal(xq, torch.zeros(2, 4, dtype=torch.int8))


# --- round half to even, in every path ------------------------------------------------------------------

# mean|W| = 8 / 8 = 1 exactly, so W / s is exactly ±0.5, ±1.5, ±1 (times a power of two keeps it exact).
TIE_WEIGHT = torch.tensor([[0.5, -0.5, 1.5, -1.5], [1.0, -1.0, 1.0, -1.0]])
# round-half-even of ±0.5 is 0 (half-up would give 1 or ±1); ±1.5 rounds to ±2 and clamps to ±1.
TIE_CODES = torch.tensor([[0, 0, 1, -1], [1, -1, 1, -1]], dtype=torch.int8)


@pytest.mark.parametrize("power", [-3, 0, 2])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_weight_ties_round_half_to_even(power: int, dtype: torch.dtype) -> None:
    weight = (TIE_WEIGHT * 2.0**power).to(dtype)
    codes, scale = quant.ternarize(weight)
    assert torch.equal(scale, torch.tensor([2.0**-power]))
    assert torch.equal(codes, TIE_CODES)


def test_activation_ties_round_half_to_even() -> None:
    # max|x| = 127: s_x = 1 and x * s_x == x exactly; max|x| = 254: s_x = 0.5 and x * s_x == x / 2 exactly.
    x = torch.tensor(
        [
            [127.0, 2.5, -2.5, 0.5, -0.5, 1.5, -1.5, 3.5],
            [254.0, 5.0, -5.0, 1.0, -1.0, 3.0, -3.0, 7.0],
        ]
    )
    xq, a = quant.quantize_activations(x)
    assert torch.equal(a, torch.tensor([[1.0], [0.5]]))
    expected_row = [127, 2, -2, 0, 0, 2, -2, 4]
    assert torch.equal(xq, torch.tensor([expected_row, expected_row], dtype=torch.int8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_and_training_forward_agree_on_tie_codes(dtype: torch.dtype) -> None:
    """The half-up-vs-half-even defect: the export path and BitLinear's forward must round ties alike."""
    layer = BitLinear(4, 2, bias=False, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(TIE_WEIGHT * 0.25)
    exported = TernaryLinear.from_bitlinear(layer)
    assert torch.equal(exported.codes(), TIE_CODES)

    # Feeding the identity through the training forward reads out its fake-quantized weight exactly:
    # each identity row quantizes to (0, .., 127, .., 0) with s_x = 127, which dequantizes back to exactly 1.
    fake = layer.eval()(torch.eye(4, dtype=dtype)).t().to(torch.float32)
    scale = exported.weight_scale
    assert torch.equal(scale, torch.tensor([4.0]))
    assert torch.equal(torch.round(fake * scale).to(torch.int8), exported.codes())
    assert torch.equal(fake, exported.dequantized_weight())


# --- scale from float32, never from a bfloat16-rounded mean -------------------------------------------------


def test_scale_is_float32_mean_not_bf16_rounded() -> None:
    """The bf16-mean-in-export defect: a float32 weight whose mean|W| is not a bfloat16 number."""
    weight = torch.tensor([[1.0 + 2.0**-10, -(1.0 + 2.0**-10)], [1.0 + 2.0**-10, 1.0 + 2.0**-10]])
    mean32 = weight.abs().mean().reshape(1)
    assert mean32.item() == 1.0 + 2.0**-10
    bf16_means = {
        float(mean32.to(torch.bfloat16)),  # float32 mean, then rounded to bf16
        float(weight.to(torch.bfloat16).abs().mean()),  # mean of a bf16 copy
    }
    assert mean32.item() not in bf16_means

    assert torch.equal(quant.mean_abs(weight), mean32)
    assert torch.equal(quant.weight_scale(weight), 1.0 / mean32)

    layer = BitLinear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    exported = TernaryLinear.from_bitlinear(layer)
    assert exported.weight_scale.dtype == torch.float32
    assert torch.equal(exported.weight_scale, quant.weight_scale(layer.weight))
    assert 1.0 / exported.weight_scale.item() not in bf16_means


def test_scale_of_bf16_weight_is_mean_in_float32() -> None:
    # Both values are bf16 numbers; their mean 1 + 2**-8 is not (bf16 keeps 7 fraction bits).
    weight = torch.tensor([[1.0, -(1.0 + 2.0**-7)], [1.0 + 2.0**-7, -1.0]], dtype=torch.bfloat16)
    mean = quant.mean_abs(weight)
    assert mean.dtype == torch.float32
    assert mean.item() == 1.0 + 2.0**-8
    assert mean.item() != float(weight.abs().mean())
    assert torch.equal(quant.weight_scale(weight), 1.0 / mean)


# --- integer matmul and integer linear ------------------------------------------------------------------


@st.composite
def int_operands(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 activations ``[*lead, K]`` (full int8 range) and ternary codes ``[N, K]`` with K up to 300."""
    lead = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=2)))
    k = draw(st.integers(1, 300))
    n = draw(st.integers(1, 24))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    xq = torch.randint(-128, 128, (*lead, k), generator=gen, dtype=torch.int8)
    codes = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
    return xq, codes


@PROPERTY
@given(operands=int_operands())
def test_integer_matmul_is_exact(operands: tuple[torch.Tensor, torch.Tensor]) -> None:
    xq, codes = operands
    acc = quant.integer_matmul(xq, codes)
    assert acc.dtype == torch.int32
    assert acc.shape == (*xq.shape[:-1], codes.shape[0])
    # float64 holds every partial sum (|sum| <= 128 * 300) exactly.
    expected = xq.to(torch.float64) @ codes.to(torch.float64).t()
    assert torch.equal(acc.to(torch.float64), expected)


def test_integer_matmul_extreme_values() -> None:
    k = 300
    xq = torch.full((2, k), -128, dtype=torch.int8)
    xq[1] = 127
    codes = torch.stack([torch.full((k,), -1, dtype=torch.int8), torch.ones(k, dtype=torch.int8)])
    acc = quant.integer_matmul(xq, codes)
    assert acc.tolist() == [[128 * k, -128 * k], [-127 * k, 127 * k]]


def test_integer_matmul_is_exact_inside_autocast() -> None:
    """Mixed-precision training wraps the model in autocast; the integer sums must not be rounded to bf16."""
    gen = torch.Generator().manual_seed(3)
    xq = torch.randint(-128, 128, (4, 2048), generator=gen, dtype=torch.int8)
    codes = torch.randint(-1, 2, (8, 2048), generator=gen, dtype=torch.int8)
    expected = quant.integer_matmul(xq, codes)
    assert expected.abs().max() > 256  # beyond bf16's exact integers, so rounding would show
    with torch.autocast("cpu", dtype=torch.bfloat16):
        acc = quant.integer_matmul(xq, codes)
        y = quant.ternary_linear_ste(torch.randn(4, 2048, generator=gen), torch.randn(8, 2048, generator=gen))
    assert torch.equal(acc, expected)
    assert y.dtype == torch.float32


@st.composite
def linear_problems(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
    """``(x [*lead, K], W [N, K], bias [N] or None, per_channel)``, float32, K up to 300."""
    lead = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    k = draw(st.integers(1, 300))
    n = draw(st.integers(1, 24))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn((*lead, k), generator=gen) * 10.0 ** draw(st.integers(-2, 2))
    weight = torch.randn((n, k), generator=gen) * 10.0 ** draw(st.integers(-3, 1))
    bias = torch.randn(n, generator=gen) if draw(st.booleans()) else None
    return x, weight, bias, draw(st.booleans())


@PROPERTY
@given(problem=linear_problems())
def test_integer_linear_formula_and_fake_quant_agreement(
    problem: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool],
) -> None:
    x, weight, bias, per_channel = problem
    codes, s = quant.ternarize(weight, per_channel)
    y = quant.integer_linear(x, codes, s, bias)
    assert y.dtype == torch.float32
    assert y.shape == (*x.shape[:-1], weight.shape[0])

    # The formula, in transformers' BitLinear's float32 order: (xq @ Wt^T) / (s_w * s_x) + bias.
    xq, a = quant.quantize_activations(x)
    acc = (xq.to(torch.float64) @ codes.to(torch.float64).t()).to(torch.float32)
    expected = acc / (s * a)
    if bias is not None:
        expected = expected + bias
    assert torch.equal(y, expected)

    # The float fake-quant path computes the same linear map up to float32 summation error, which scales with the
    # magnitude of the summed terms, not of the sum (an exact 0 from cancelling terms comes out as a few ulp).
    x_fake, w_fake = quant.fake_quant_activations(x), quant.fake_quant_weight(weight, per_channel)
    fake = F.linear(x_fake, w_fake, bias)
    terms = F.linear(x_fake.abs(), w_fake.abs(), None if bias is None else bias.abs())
    err = (y - fake).abs().max().item()
    assert err <= 1e-5 * max(terms.max().item(), 1e-30)


def test_integer_linear_out_dtype() -> None:
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    codes, s = quant.ternarize(torch.randn(5, 8))
    assert quant.integer_linear(x, codes, s).dtype == torch.bfloat16
    assert quant.integer_linear(x, codes, s, out_dtype=torch.float32).dtype == torch.float32


# --- straight-through estimator and warmup ----------------------------------------------------------------


@PROPERTY
@given(
    weight=random_tensors(dtypes=(torch.float32, torch.bfloat16)),
    lam=st.sampled_from([0.3, 1.0]),
    per_channel=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_ste_gradients_are_identity(weight: torch.Tensor, lam: float, per_channel: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    upstream = torch.randn(weight.shape, generator=gen).to(weight.dtype)

    w = weight.clone().requires_grad_(True)
    quant.ste_weight(w, lam, per_channel).backward(upstream)
    assert torch.equal(w.grad, upstream)

    x = weight.clone().requires_grad_(True)
    quant.ste_activations(x, lam).backward(upstream)
    assert torch.equal(x.grad, upstream)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ste_lambda_endpoints_and_midpoint(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, generator=gen).to(dtype)
    x = (torch.randn(2, 3, 10, generator=gen) * 4).to(dtype)

    # lam = 0: the input itself, full precision.
    assert quant.ste_weight(w, 0.0) is w
    assert quant.ste_activations(x, 0.0) is x

    # lam = 1: exactly the fake-quantized value, in the input's dtype.
    assert torch.equal(quant.ste_weight(w, 1.0), quant.fake_quant_weight(w))
    assert torch.equal(quant.ste_weight(w, 1.0, per_channel=True), quant.fake_quant_weight(w, per_channel=True))
    assert torch.equal(quant.ste_activations(x, 1.0), quant.fake_quant_activations(x))

    # lam = 0.5: v + 0.5 * (Q(v) - v) computed in float32 (Q(v) unrounded), then cast.
    w32, x32 = w.to(torch.float32), x.to(torch.float32)
    qw = quant.dequantize_weight(*quant.ternarize(w))
    qx = quant.dequantize_activations(*quant.quantize_activations(x))
    assert torch.equal(quant.ste_weight(w, 0.5), (w32 + 0.5 * (qw - w32)).to(dtype))
    assert torch.equal(quant.ste_activations(x, 0.5), (x32 + 0.5 * (qx - x32)).to(dtype))
    if dtype == torch.float32:
        torch.testing.assert_close(quant.ste_weight(w, 0.5), (w + qw) / 2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("lam", [-0.1, 1.01, 2.0, math.inf, math.nan])
def test_ste_rejects_lambda_outside_unit_interval(lam: float) -> None:
    w = torch.randn(3, 4)
    with pytest.raises(ValueError, match="lam"):
        quant.ste_weight(w, lam)
    with pytest.raises(ValueError, match="lam"):
        quant.ste_activations(w, lam)


# --- no value read on the host: everything runs on the meta device --------------------------------------


@pytest.mark.parametrize("per_channel", [False, True])
def test_functions_run_on_meta_tensors(per_channel: bool) -> None:
    weight = torch.empty(6, 20, device="meta", dtype=torch.bfloat16)
    x = torch.empty(2, 3, 20, device="meta", dtype=torch.bfloat16)

    codes, scale = quant.ternarize(weight, per_channel)
    assert (codes.device.type, codes.dtype, codes.shape) == ("meta", torch.int8, (6, 20))
    assert (scale.device.type, scale.dtype, scale.shape) == ("meta", torch.float32, (6,) if per_channel else (1,))

    xq, a = quant.quantize_activations(x)
    assert (xq.device.type, xq.dtype, xq.shape) == ("meta", torch.int8, (2, 3, 20))
    assert (a.device.type, a.dtype, a.shape) == ("meta", torch.float32, (2, 3, 1))

    bias = torch.empty(6, device="meta")
    y = quant.integer_linear(x, codes, scale, bias)
    assert (y.device.type, y.dtype, y.shape) == ("meta", torch.bfloat16, (2, 3, 6))

    w = weight.clone().requires_grad_(True)
    fake = quant.ste_weight(w, 0.5, per_channel)
    assert (fake.device.type, fake.dtype, fake.shape) == ("meta", torch.bfloat16, (6, 20))
    fake.sum().backward()
    assert w.grad is not None
    assert w.grad.shape == (6, 20)

    fake_x = quant.ste_activations(x, 1.0)
    assert (fake_x.device.type, fake_x.dtype, fake_x.shape) == ("meta", torch.bfloat16, (2, 3, 20))


def test_stochastic_ternary_codes_are_exact_on_the_grid_and_unbiased_between() -> None:
    scale = torch.tensor([2.0])  # a code is worth 1 / s_w = 0.5
    generator = torch.Generator().manual_seed(0)
    grid = torch.tensor([[-1, 0, 1, 1, 0, -1]], dtype=torch.float32) / scale
    assert torch.equal(quant.stochastic_ternary_codes(grid, scale, generator), grid.mul(scale).to(torch.int8))
    target = torch.full((200, 256), 0.3) / scale  # 30% of the way from code 0 to code 1
    codes = quant.stochastic_ternary_codes(target, scale, generator)
    assert set(codes.unique().tolist()) == {0, 1}
    assert abs(codes.float().mean().item() - 0.3) < 0.01
    clamped = quant.stochastic_ternary_codes(torch.full((4, 4), -3.0), scale, generator)
    assert torch.equal(clamped, torch.full((4, 4), -1, dtype=torch.int8))


def test_activation_scale_is_the_published_reciprocal_times_127_not_one_division() -> None:
    """``127 / a`` in the published code is PyTorch's ``reciprocal(a) * 127`` (two roundings): on bf16-valued maxima
    that differs from one IEEE division in about a quarter of the rows, and bittern follows the published one."""
    amax = torch.linspace(0.5, 8.0, 4096).to(torch.bfloat16).to(torch.float32).unique().reshape(-1, 1)
    scale = quant.activation_scale(amax)
    assert torch.equal(scale, 127 / amax)  # PyTorch's evaluation of the published expression
    one_division = torch.full((), 127.0) / amax
    assert int((scale != one_division).sum()) > amax.numel() // 10
    x = torch.cat([amax, amax * 0.37], dim=1)
    assert torch.equal(quant.quantize_activations(x)[1], scale)
