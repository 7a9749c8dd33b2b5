"""The reference ternary math (docs/design.md, "The numerical contract"), in plain PyTorch.

This module is the single source of truth for every number bittern computes: kernels, layers, formats and
exporters call it or are tested bit-for-bit against it. It is the published BitNet b1.58 arithmetic (the
Falcon-E / onebitllms ``BitLinear``, transformers' ``BitLinear`` and ``AutoBitLinear``) operation for operation,
so that a float32 run reproduces theirs bit for bit:

* a scale is the *reciprocal* that maps values to codes: ``s_w = 1 / mean|W|`` for weights,
  ``s_x = 127 / max|x|`` per token for activations; codes are ``round(v * s)``, values ``code / s``;
* ``127 / a`` is evaluated as PyTorch evaluates the published ``127 / tensor``: ``reciprocal(a) * 127``, two
  roundings (not one IEEE division, which differs on about a quarter of bf16-valued rows);
* every reciprocal and division is IEEE float32 (``torch.reciprocal`` and tensor/tensor division are, on CPU and
  CUDA); all quantization arithmetic runs in float32, whatever the input dtype;
* ``torch.round`` rounds half to even, everywhere;
* the magnitudes the scales come from are clamped below by :data:`EPS` = 1e-5;
* nothing here synchronises with the host (no ``.item()``, no Python branching on tensor values), so every
  function is safe inside CUDA graphs and ``torch.compile``.

Shapes use ``N`` for output features, ``K`` for input features and ``...`` for any leading token dims.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

EPS = 1e-5
"""Lower bound of every magnitude a scale is taken from (``mean|W|``, ``max|x|``)."""

ACT_MAX = 127.0
"""Activations are quantized to ``round(x * s_x)``, ``s_x = 127 / max|x|``, clamped to the int8 range [-128, 127]."""


def reciprocal(t: torch.Tensor) -> torch.Tensor:
    """``1 / t`` in float32, correctly rounded (IEEE division; ``torch.reciprocal`` is on CPU and CUDA)."""
    return torch.reciprocal(t.to(torch.float32))


def multiplier_of_scale(scale: torch.Tensor) -> torch.Tensor:
    """The multiplier ``m`` (``1 / s_w``, what the ``multiply`` convention stores) for a weight scale ``s_w``: of the
    float32 numbers within two ulps of ``1 / s_w`` whose reciprocal rounds back to ``s_w``, the one with the shortest
    significand (``1 / s_w`` itself when none does). A multiplier stored with few bits (a bf16 ``weight_scale``)
    therefore comes back exactly from ``s_w = reciprocal(m)``; for any other the result is within an ulp of it.

    Args:
        scale: float32 ``[...]``, positive and finite.

    Returns:
        float32 of the same shape.
    """
    s32 = scale.detach().to(torch.float32)
    nearest = reciprocal(s32)
    steps = torch.tensor([0, -1, 1, -2, 2], dtype=torch.int32, device=s32.device)
    candidates = (nearest.reshape(-1, 1).view(torch.int32) + steps).view(torch.float32)  # [n, 5]
    valid = reciprocal(candidates) == s32.reshape(-1, 1)
    bits = candidates.view(torch.int32)
    short = (bits & -bits).to(torch.int64) * valid  # the lowest set bit: larger = shorter significand; 0 if invalid
    best = candidates.gather(1, short.argmax(dim=1, keepdim=True)).reshape(s32.shape)
    return torch.where(valid.any(dim=1).reshape(s32.shape), best, nearest)


def mean_abs(weight: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """``m = max(mean(|W|), EPS)`` of a weight matrix, as float32: the magnitude its weight scale is taken from.

    The sum of ``|W|`` (float32 values) runs in float64 and the mean is rounded to float32 once: the result
    does not depend on the summation order, so CPU, CUDA, the Triton kernels (which sum in their own block
    order) and sharded weights (FSDP, DTensor) all get the same bits. (The published code takes a float32
    ``mean()``, whose last bit depends on the device and reduction order; the float64 sum is the correctly
    rounded mean those agree with up to that bit.)

    Args:
        weight: ``[N, K]`` of any floating dtype.
        per_channel: one magnitude per output row instead of one per tensor.

    Returns:
        float32 ``[1]`` (per tensor) or ``[N]`` (per channel), ``>= EPS``.
    """
    w32 = weight.detach().to(torch.float32)
    if per_channel:
        total = w32.abs().sum(dim=-1, dtype=torch.float64) / w32.shape[-1]
    else:
        total = (w32.abs().sum(dtype=torch.float64) / w32.numel()).reshape(1)
    return total.to(torch.float32).clamp(min=EPS)


def weight_scale(weight: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """The ternary weight scale ``s_w = 1 / max(mean(|W|), EPS)`` (float32, IEEE division): codes are
    ``round(W * s_w)``, the value of a code is ``code / s_w``.

    Args:
        weight: ``[N, K]`` of any floating dtype.
        per_channel: one scale per output row instead of one per tensor.

    Returns:
        float32 ``[1]`` (per tensor) or ``[N]`` (per channel), ``> 0``.
    """
    return reciprocal(mean_abs(weight, per_channel))


def _scale_for_rows(scale: torch.Tensor) -> torch.Tensor:
    """Reshape a ``[1]`` or ``[N]`` scale so it broadcasts against ``[N, K]``."""
    return scale.reshape(-1, 1).to(torch.float32)


def ternary_codes(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Ternary codes ``clamp(round(W * s_w), -1, 1)`` of ``weight`` for a given float32 scale ``s_w``.

    Args:
        weight: ``[N, K]`` floating.
        scale: float32 ``[1]`` or ``[N]`` from :func:`weight_scale`.

    Returns:
        int8 ``[N, K]`` with values in {-1, 0, 1}.
    """
    w32 = weight.detach().to(torch.float32)
    return torch.round(w32 * _scale_for_rows(scale)).clamp_(-1, 1).to(torch.int8)


def stochastic_ternary_codes(
    weight: torch.Tensor, scale: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Ternary codes of ``weight`` rounded stochastically at a given scale: ``clamp(floor(W * s_w + u), -1, 1)``
    with ``u`` uniform in [0, 1), so that ``E[codes / s_w] = W`` wherever ``|W * s_w| <= 1``; values already on
    the grid (``W * s_w`` an integer) give that integer exactly.

    Used to merge a small update into packed codes (``bittern.peft``): nearest rounding would drop every change
    smaller than half a code's value; this keeps it in expectation.

    Args:
        weight: ``[N, K]`` floating.
        scale: float32 ``[1]`` or ``[N]``.
        generator: the random stream (on ``weight``'s device); None uses torch's global one.

    Returns:
        int8 ``[N, K]`` with values in {-1, 0, 1}.
    """
    w32 = weight.detach().to(torch.float32) * _scale_for_rows(scale)
    noise = torch.rand(w32.shape, generator=generator, device=w32.device, dtype=torch.float32)
    return torch.floor(w32 + noise).clamp_(-1, 1).to(torch.int8)


def ternarize(weight: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternarize a weight matrix: ``(codes, s_w)`` with ``W ≈ codes / s_w``.

    Args:
        weight: ``[N, K]`` of any floating dtype (upcast to float32 before any arithmetic).
        per_channel: one scale per output row instead of one per tensor.

    Returns:
        ``codes``: int8 ``[N, K]`` in {-1, 0, 1}; ``s_w``: float32 ``[1]`` or ``[N]``, always > 0.
    """
    scale = weight_scale(weight, per_channel)
    return ternary_codes(weight, scale), scale


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes / s_w`` in float32 (IEEE division), then cast to ``dtype``. ``codes``: ``[N, K]``; ``scale``:
    ``[1]`` or ``[N]``. A code of 1 is worth ``1 / s_w`` (:func:`reciprocal` of the scale)."""
    return (codes.to(torch.float32) / _scale_for_rows(scale)).to(dtype)


def ternary_of_dense(values: torch.Tensor, per_channel: bool | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Codes and scale of a dense tensor of ternary values ``{-v, 0, v}`` (a bf16 variant's weight, a GGUF
    fallback tensor): ``codes = sign(values)``, ``s_w = 1 / max(v, EPS)``, so ``dequantize_weight`` gives back
    ``v`` up to the last bit of the reciprocal.

    Args:
        values: ``[N, K]`` floating.
        per_channel: one ``v`` per tensor (False), per row (True), or per tensor where one magnitude serves all
            rows and per row otherwise (None).

    Returns:
        ``(codes int8 [N, K], s_w float32 [1] or [N])``, or None when the non-zero magnitudes differ (per tensor,
        or within a row).
    """
    v32 = values.detach().to(torch.float32)
    magnitude = v32.abs()
    nonzero = magnitude != 0
    codes = torch.sign(v32).to(torch.int8)
    top = magnitude.amax().reshape(1) if magnitude.numel() else magnitude.new_zeros(1)
    if per_channel is not True and bool((magnitude[nonzero] == top).all()):
        return codes, reciprocal(top.clamp(min=EPS))
    if per_channel is False:
        return None
    rows = magnitude.amax(dim=1)
    if not bool(((magnitude == rows[:, None]) | ~nonzero).all()):
        return None
    return codes, reciprocal(rows.clamp(min=EPS))


def fake_quant_weight(weight: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """The fake-quantized weight ``round(W * s_w) / s_w`` with the dtype and shape of ``weight`` (no gradient)."""
    codes, scale = ternarize(weight, per_channel)
    return dequantize_weight(codes, scale, weight.dtype)


def activation_scale(amax: torch.Tensor) -> torch.Tensor:
    """``s_x = 127 / max(amax, EPS)`` as the published code evaluates it: ``reciprocal(max(amax, EPS)) * 127``,
    float32. ``amax``: ``[..., 1]`` per-token ``max|x|``."""
    return reciprocal(amax.to(torch.float32).clamp(min=EPS)) * ACT_MAX


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 quantization ``xq = clamp(round(x * s_x), -128, 127)``, ``s_x = 127 / max|x|``.

    The arithmetic order is fixed (kernels reproduce it bit for bit): :func:`activation_scale`, then
    ``x_f32 * s_x``, then round half to even.

    Args:
        x: ``[..., K]`` of any floating dtype.

    Returns:
        ``xq``: int8 ``[..., K]``; ``s_x``: float32 ``[..., 1]``.
    """
    x32 = x.detach().to(torch.float32)
    scale = activation_scale(x32.abs().amax(dim=-1, keepdim=True))
    xq = torch.round(x32 * scale).clamp_(-128, 127).to(torch.int8)
    return xq, scale


def dequantize_activations(xq: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``xq / s_x`` in float32 (IEEE division), cast to ``dtype``. ``xq``: ``[..., K]``; ``scale``: ``[..., 1]``."""
    return (xq.to(torch.float32) / scale.to(torch.float32)).to(dtype)


def fake_quant_activations(x: torch.Tensor) -> torch.Tensor:
    """The fake-quantized activation ``xq / s_x`` with the dtype and shape of ``x`` (no gradient)."""
    xq, scale = quantize_activations(x)
    return dequantize_activations(xq, scale, x.dtype)


EXACT_FLOAT32_K = 2**24 // 128
"""Up to this inner dimension a float32 product of int8 x ternary values is exact: every partial sum is an
integer of magnitude <= 128 * K < 2**24, which float32 (and TF32, whose inputs here need 8 bits) represents
exactly, in any summation order."""


def integer_matmul(xq: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Exact ``xq @ codes^T``, returned as int32.

    The product runs through the device's float32 matmul when ``K <= EXACT_FLOAT32_K`` (131072: exact, see
    there; torch has no int32 matmul on CUDA) and in float64 beyond; either way the result is the exact
    integer sum, identical to an int32-accumulating kernel.

    Args:
        xq: int8 ``[..., K]``.
        codes: int8 ``[N, K]`` in {-1, 0, 1}.

    Returns:
        int32 ``[..., N]``.
    """
    compute = torch.float32 if xq.shape[-1] <= EXACT_FLOAT32_K else torch.float64
    # autocast would run this product in bf16/fp16 and round the integer sums: keep it in `compute`.
    device_type = xq.device.type
    guard = torch.autocast(device_type, enabled=False) if device_type != "meta" else contextlib.nullcontext()
    with guard:
        acc = torch.nn.functional.linear(xq.to(compute), codes.to(compute))
    return acc.to(torch.int32)


def rescale(acc: torch.Tensor, weight_scale_: torch.Tensor, act_scale: torch.Tensor) -> torch.Tensor:
    """``acc / (s_w * s_x)`` in float32: the product of the two scales, then one IEEE division (transformers'
    ``BitLinear``: ``y / (weight_scale * input_scale)``).

    Args:
        acc: int32 ``[..., N]`` from :func:`integer_matmul`.
        weight_scale_: float32 ``[1]`` or ``[N]``.
        act_scale: float32 ``[..., 1]``.

    Returns:
        float32 ``[..., N]``.
    """
    return acc.to(torch.float32) / (weight_scale_.to(torch.float32) * act_scale.to(torch.float32))


def integer_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The ternary linear computed from integers: ``y = (xq @ Wt^T) / (s_w * s_x) + bias``.

    Args:
        x: ``[..., K]`` floating activations (quantized per token here).
        codes: int8 ``[N, K]``.
        scale: float32 ``[1]`` or ``[N]``.
        bias: ``[N]`` or None; added in float32, never quantized.
        out_dtype: dtype of the result; defaults to ``x.dtype``.

    Returns:
        ``[..., N]`` in ``out_dtype``.
    """
    xq, act_scale = quantize_activations(x)
    return linear_from_integers(xq, act_scale, codes, scale, bias).to(out_dtype or x.dtype)


class _FrozenTernaryLinearSTE(torch.autograd.Function):
    """Fixed codes (a packed, frozen layer): the forward of :func:`integer_linear` (or a kernel's twin of it); the
    gradient reaches ``x`` straight through the activation quantizer (``grad_x = grad_y @ (Wt / s_w)``, by
    ``input_product``) and ``bias``, never the codes."""

    @staticmethod
    def forward(ctx, x, codes, scale, bias, out_dtype, forward_fn, input_product):  # type: ignore[override]
        ctx.save_for_backward(codes, scale)
        ctx.dtypes = (x.dtype, None, None if bias is None else bias.dtype)
        ctx.input_product = input_product
        return forward_fn(x, codes, scale, bias, out_dtype)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        codes, scale = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], False, ctx.needs_input_grad[3])
        grad_x, _, grad_b = ste_gradients(grad_y, None, None, codes, scale, ctx.dtypes, needs, ctx.input_product)
        return grad_x, None, None, grad_b, None, None, None


def frozen_ternary_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    forward_fn: Callable[..., torch.Tensor] | None = None,
    input_product: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`integer_linear` with a straight-through gradient to ``x`` (and ``bias``): what a frozen packed
    layer needs when something below it trains (adapters, for instance). Output ``[..., N]`` in ``out_dtype``.
    ``forward_fn`` and ``input_product`` replace :func:`integer_linear` and :func:`dense_grad_input` (the kernels
    pass their twins); the rule is this one either way."""
    return _FrozenTernaryLinearSTE.apply(
        x, codes, scale, bias, out_dtype or x.dtype, forward_fn or integer_linear, input_product or dense_grad_input
    )


def linear_from_integers(
    xq: torch.Tensor, act_scale: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """float32 ``(xq @ codes^T) / (s_w * s_x) + bias``: the one place the integer output is formed."""
    y = rescale(integer_matmul(xq, codes), scale, act_scale)
    return y if bias is None else y + bias.to(torch.float32)


class _TernaryLinearSTE(torch.autograd.Function):
    """The fully quantized linear (λ = 1): forward from integers, backward by the straight-through estimator.

    Forward is :func:`integer_linear` (bit-identical to the packed inference layer); backward treats both
    quantizers as the identity: ``grad_x = grad_y @ (Wt / s_w)``, ``grad_W = grad_y^T @ (xq / s_x)``,
    ``grad_b = sum(grad_y)``. Only int8 codes and float32 scales are kept for backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, per_channel, out_dtype):  # type: ignore[override]
        codes, scale = ternarize(weight, per_channel)
        xq, act_scale = quantize_activations(x)
        y = linear_from_integers(xq, act_scale, codes, scale, bias)
        ctx.save_for_backward(xq, act_scale, codes, scale)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        return (*ste_gradients(grad_y, *ctx.saved_tensors, ctx.dtypes, ctx.needs_input_grad[:3]), None, None)


def dense_grad_input(
    grad_y: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, widen=dequantize_weight
) -> torch.Tensor:
    """``grad_x = grad_y @ (Wt / s_w)``: ``Wt / s_w`` widened to ``grad_y``'s dtype by ``widen`` (the kernels pass
    their one-pass twin), then one dense product. ``[..., N]`` → ``[..., K]`` in ``dtype``."""
    return (grad_y @ widen(codes, scale, grad_y.dtype)).to(dtype)


def dense_grad_weight(
    grad_y: torch.Tensor, xq: torch.Tensor, act_scale: torch.Tensor, dtype: torch.dtype, widen=dequantize_activations
) -> torch.Tensor:
    """``grad_W = grad_yᵀ @ (xq / s_x)`` over all tokens, ``xq / s_x`` widened to ``grad_y``'s dtype by
    ``widen``. ``grad_y`` ``[..., N]``, ``xq`` ``[..., K]`` → ``[N, K]`` in ``dtype``."""
    x_hat = widen(xq, act_scale, grad_y.dtype)
    return (grad_y.reshape(-1, grad_y.shape[-1]).t() @ x_hat.reshape(-1, x_hat.shape[-1])).to(dtype)


def ste_gradients(
    grad_y: torch.Tensor,
    xq: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    codes: torch.Tensor,
    scale: torch.Tensor,
    dtypes: tuple[torch.dtype, torch.dtype | None, torch.dtype | None],
    needs: tuple[bool, bool, bool],
    input_product=dense_grad_input,
    weight_product=dense_grad_weight,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The straight-through gradients ``(grad_x, grad_W, grad_b)`` of the ternary linear from what its forward
    saved; both quantizers pass the gradient unchanged, ``grad_b = Σ grad_y``.

    ``input_product(grad_y, codes, scale, dtype)`` and ``weight_product(grad_y, xq, act_scale, dtype)`` compute
    the two products (:func:`dense_grad_input` / :func:`dense_grad_weight` here; the kernels pass theirs).
    ``dtypes``: of x, W and b (None: no bias); ``needs``: which of the three to compute (``xq`` and ``act_scale``
    may be None when ``grad_W`` is not needed). Shapes: ``grad_y`` ``[..., N]``, ``xq`` ``[..., K]``,
    ``codes`` ``[N, K]``.
    """
    x_dtype, w_dtype, b_dtype = dtypes
    grad_x = input_product(grad_y, codes, scale, x_dtype) if needs[0] else None
    grad_w = weight_product(grad_y, xq, act_scale, w_dtype) if needs[1] else None
    grad_b = None
    if b_dtype is not None and needs[2]:
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(b_dtype)
    return grad_x, grad_w, grad_b


def ternary_linear_ste(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    per_channel: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The training-time ternary linear at λ = 1: the exact integer forward of :func:`integer_linear`
    computed from latent ``weight`` ``[N, K]`` (ternarized on the fly), straight-through gradients to ``x``,
    ``weight`` and ``bias``. Output ``[..., N]`` in ``out_dtype`` (default ``x.dtype``).
    """
    return _TernaryLinearSTE.apply(x, weight, bias, per_channel, out_dtype or x.dtype)


def check_lam(lam: float) -> float:
    """``lam`` as a float, if it is a quantization strength λ in [0, 1]; ``ValueError`` otherwise."""
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"the quantization warmup factor lam must lie in [0, 1], got {lam}")
    return lam


def _blend(value: torch.Tensor, quantized_f32: torch.Tensor, lam: float) -> torch.Tensor:
    """``v + lam * (Q(v) - v)`` in float32, exactly ``Q(v)`` when lam == 1; result in ``value.dtype``."""
    if lam == 1.0:
        return quantized_f32.to(value.dtype)
    v32 = value.to(torch.float32)
    return (v32 + lam * (quantized_f32 - v32)).to(value.dtype)


class _WeightSTE(torch.autograd.Function):
    """Fake-quantized weight forward, identity backward (straight-through estimator)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, lam: float, per_channel: bool) -> torch.Tensor:  # type: ignore[override]
        codes, scale = ternarize(weight, per_channel)
        return _blend(weight, dequantize_weight(codes, scale), lam)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        return grad_output, None, None


class _ActivationSTE(torch.autograd.Function):
    """Fake-quantized activation forward, identity backward (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:  # type: ignore[override]
        xq, scale = quantize_activations(x)
        return _blend(x, dequantize_activations(xq, scale), lam)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        return grad_output, None


def ste_weight(weight: torch.Tensor, lam: float = 1.0, per_channel: bool = False) -> torch.Tensor:
    """``W + lam * (Wt/s_w - W).detach()``: the training-time weight, gradient passed straight through.

    ``lam`` = 0 returns ``weight`` itself (full precision); ``lam`` = 1 returns exactly ``Wt / s_w``.
    """
    lam = check_lam(lam)
    if lam == 0.0:
        return weight
    return _WeightSTE.apply(weight, lam, per_channel)


def ste_activations(x: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """``x + lam * (xq/s_x - x).detach()``: the training-time activation, gradient passed straight through."""
    lam = check_lam(lam)
    if lam == 0.0:
        return x
    return _ActivationSTE.apply(x, lam)
