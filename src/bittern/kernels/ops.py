"""The Triton kernels as torch custom operators (``torch.library``), and the autograd function built on them.

Registered ops (namespace ``bittern``):

* ``ternary_linear`` — the training forward: quantize activations, ternarize the latent weight, int8 product,
  fused rescale. Returns ``y`` and, for the backward pass, ``xq`` (int8), ``a``, the codes (int8) and ``s``:
  the layer keeps one byte per activation and per weight for backward, where a bf16 layer keeps two.
* ``ternary_linear_grad_input`` / ``ternary_linear_grad_weight`` — the straight-through backward products,
  fused (``BITTERN_BACKWARD_GEMM=triton``); ``dequantize_activations`` / ``dequantize_weight`` — the one-pass
  widening that feeds cuBLAS instead (the default).
* ``integer_linear`` — inference: ``y`` from a float input and fixed codes.
* ``packed_linear`` — inference straight from the packed 2-bit weights (:mod:`bittern.kernels.packed`): the
  decode kernel with fused activation quantization for up to 4 tokens, the prefill path beyond;
  ``packed_linear_group`` — the decode kernel for two or three layers of one input (q/k/v, gate/up) in one launch.

Being custom ops with fake (meta) implementations, ``torch.compile`` keeps them as single nodes instead of
breaking the graph, and since none of them synchronises with the host, CUDA graphs capture them (run them once
before capturing: the first call of a shape autotunes).

Importing this module imports Triton; :mod:`bittern.kernels` does so lazily, on first use.
"""

from __future__ import annotations

import contextlib
import os

import torch

from bittern import quant
from bittern.kernels import matmul, packed, quantizers

BACKWARD_GEMMS = ("cublas", "triton")


def backward_gemm() -> str:
    """Which library runs the two backward products: ``$BITTERN_BACKWARD_GEMM``, ``cublas`` by default.

    ``cublas``: the codes and ``xq * a / 127`` are widened to the gradient's dtype (one Triton pass each, the
    values of :mod:`bittern.quant`'s dequantizers) and multiplied by torch (cuBLAS). ``triton``: the fused
    kernels of :mod:`bittern.kernels.matmul`, which widen on chip and write no copy. Measured on an H100
    (BENCHMARKS.md), cuBLAS is faster at the 2B4T shapes.
    """
    value = os.environ.get("BITTERN_BACKWARD_GEMM", "cublas") or "cublas"
    if value not in BACKWARD_GEMMS:
        raise ValueError(f"BITTERN_BACKWARD_GEMM={value!r}; choose one of {', '.join(BACKWARD_GEMMS)}")
    return value


_Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU even when another one is current (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("bittern::ternary_linear", mutates_args=())
def ternary_linear_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, per_channel: bool, out_dtype: torch.dtype
) -> _Outputs:
    """``x`` ``[..., K]``, latent ``weight`` ``[N, K]`` → ``(y [..., N] out_dtype, xq int8 [M, K], a f32 [M, 1],
    codes int8 [N, K], s f32 [1] or [N])`` with ``M`` the number of tokens."""
    with _device_guard(x):
        xq, act_scale = quantizers.quantize_activations(x)
        codes, scale = quantizers.ternarize(weight, per_channel)
        y = matmul.int8_ternary_linear(xq, act_scale, codes, scale, bias, out_dtype)
    k = x.shape[-1]
    return y, xq.reshape(-1, k), act_scale.reshape(-1, 1), codes, scale


@ternary_linear_forward.register_fake
def _(x, weight, bias, per_channel, out_dtype):  # type: ignore[no-untyped-def]
    n, k = weight.shape
    m = x.numel() // k if k else 0
    return (
        x.new_empty((*x.shape[:-1], n), dtype=out_dtype),
        x.new_empty((m, k), dtype=torch.int8),
        x.new_empty((m, 1), dtype=torch.float32),
        weight.new_empty((n, k), dtype=torch.int8),
        weight.new_empty((n if per_channel else 1,), dtype=torch.float32),
    )


@torch.library.custom_op("bittern::ternary_linear_grad_input", mutates_args=())
def grad_input(grad_y: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad_y [..., N] @ (codes * s)`` → ``[..., K]`` in ``dtype``."""
    with _device_guard(grad_y):
        return matmul.grad_input(grad_y, codes, scale, dtype)


@grad_input.register_fake
def _(grad_y, codes, scale, dtype):  # type: ignore[no-untyped-def]
    return grad_y.new_empty((*grad_y.shape[:-1], codes.shape[1]), dtype=dtype)


@torch.library.custom_op("bittern::ternary_linear_grad_weight", mutates_args=())
def grad_weight(grad_y: torch.Tensor, xq: torch.Tensor, act_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad_yᵀ @ (xq * a / 127)`` over all tokens → ``[N, K]`` in ``dtype``."""
    with _device_guard(grad_y):
        return matmul.grad_weight(grad_y, xq, act_scale, dtype)


@grad_weight.register_fake
def _(grad_y, xq, act_scale, dtype):  # type: ignore[no-untyped-def]
    return grad_y.new_empty((grad_y.shape[-1], xq.shape[-1]), dtype=dtype)


@torch.library.custom_op("bittern::dequantize_activations", mutates_args=())
def dequantize_activations(xq: torch.Tensor, act_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``xq * a / 127`` in ``dtype``, one pass: int8 ``[M, K]``, float32 ``[M, 1]`` → ``[M, K]``."""
    with _device_guard(xq):
        return quantizers.dequantize_activations(xq, act_scale, dtype)


@dequantize_activations.register_fake
def _(xq, act_scale, dtype):  # type: ignore[no-untyped-def]
    return xq.new_empty(xq.shape, dtype=dtype)


@torch.library.custom_op("bittern::dequantize_weight", mutates_args=())
def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``codes * s`` in ``dtype``, one pass: int8 ``[N, K]``, float32 ``[1]`` or ``[N]`` → ``[N, K]``."""
    with _device_guard(codes):
        return quantizers.dequantize_weight(codes, scale, dtype)


@dequantize_weight.register_fake
def _(codes, scale, dtype):  # type: ignore[no-untyped-def]
    return codes.new_empty(codes.shape, dtype=dtype)


class _TernaryLinear(torch.autograd.Function):
    """Autograd around the ops: forward by ``bittern::ternary_linear``, backward by the straight-through products.

    A plain ``autograd.Function`` rather than the op's ``register_autograd``: the generated backward of an op
    with extra outputs copied those outputs (``empty`` + ``set_`` + ``copy_`` per saved tensor, seen in the
    profiler), and dynamo traces this class as well.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, per_channel, out_dtype):  # type: ignore[override]
        y, xq, act_scale, codes, scale = ternary_linear_forward(x, weight, bias, per_channel, out_dtype)
        ctx.save_for_backward(xq, act_scale, codes, scale)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        if backward_gemm() == "cublas":  # widen in one Triton pass each, multiply on cuBLAS
            products = (_widened_grad_input, _widened_grad_weight)
        else:  # the fused Triton products
            products = (grad_input, grad_weight)
        grads = quant.ste_gradients(grad_y, *ctx.saved_tensors, ctx.dtypes, ctx.needs_input_grad[:3], *products)
        return (*grads, None, None)


def _widened_grad_input(grad_y, codes, scale, dtype):  # type: ignore[no-untyped-def]
    return quant.dense_grad_input(grad_y, codes, scale, dtype, widen=dequantize_weight)


def _widened_grad_weight(grad_y, xq, act_scale, dtype):  # type: ignore[no-untyped-def]
    return quant.dense_grad_weight(grad_y, xq, act_scale, dtype, widen=dequantize_activations)


@torch.library.custom_op("bittern::integer_linear", mutates_args=())
def integer_linear(
    x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """Inference: ``x [..., K]`` quantized per token, times fixed ``codes [N, K]`` → ``[..., N]`` (no autograd)."""
    with _device_guard(x):
        xq, act_scale = quantizers.quantize_activations(x)
        return matmul.int8_ternary_linear(xq, act_scale, codes, scale, bias, out_dtype)


@integer_linear.register_fake
def _(x, codes, scale, bias, out_dtype):  # type: ignore[no-untyped-def]
    return x.new_empty((*x.shape[:-1], codes.shape[0]), dtype=out_dtype)


@torch.library.custom_op("bittern::packed_linear", mutates_args=())
def packed_linear(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    out_features: int,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Inference from packed weights: ``x [..., K]``, uint8 ``[ceil(N/4), K]`` → ``[..., N]`` (no autograd)."""
    with _device_guard(x):
        return packed.packed_linear(x, packed_weight, out_features, scale, bias, out_dtype)


@packed_linear.register_fake
def _(x, packed_weight, out_features, scale, bias, out_dtype):  # type: ignore[no-untyped-def]
    return x.new_empty((*x.shape[:-1], out_features), dtype=out_dtype)


@torch.library.custom_op("bittern::packed_linear_group", mutates_args=())
def packed_linear_group(
    x: torch.Tensor,
    packed_weights: list[torch.Tensor],
    out_features: list[int],
    scales: list[torch.Tensor],
    out_dtype: torch.dtype,
) -> list[torch.Tensor]:
    """Two or three bias-free packed layers on one input, decoded in one launch: ``[..., K]`` → ``[..., N_i]``."""
    with _device_guard(x):
        return packed.decode_group(x, packed_weights, out_features, scales, out_dtype)


@packed_linear_group.register_fake
def _(x, packed_weights, out_features, scales, out_dtype):  # type: ignore[no-untyped-def]
    return [x.new_empty((*x.shape[:-1], n), dtype=out_dtype) for n in out_features]


class _FrozenTernaryLinear(torch.autograd.Function):
    """Fixed codes: forward by ``bittern::integer_linear``; ``grad_x = grad_y @ (Wt * s)`` by the fused
    ``ternary_linear_grad_input`` kernel, which widens the int8 codes on chip (no dense copy of the weight)."""

    @staticmethod
    def forward(ctx, x, codes, scale, bias, out_dtype):  # type: ignore[override]
        ctx.save_for_backward(codes, scale)
        ctx.dtypes = (x.dtype, None, None if bias is None else bias.dtype)
        return integer_linear(x, codes, scale, bias, out_dtype)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        codes, scale = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], False, ctx.needs_input_grad[3])
        grad_x, _, grad_b = quant.ste_gradients(grad_y, None, None, codes, scale, ctx.dtypes, needs, grad_input)
        return grad_x, None, None, grad_b, None


def frozen_ternary_linear(
    x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """Inference forward on the kernels with a straight-through gradient to ``x`` (and ``bias``)."""
    return _FrozenTernaryLinear.apply(x, codes, scale, bias, out_dtype)


def ternary_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, per_channel: bool, out_dtype: torch.dtype
) -> torch.Tensor:
    """The training-time ternary linear on the kernels: ``[..., K]`` → ``[..., N]`` in ``out_dtype``."""
    return _TernaryLinear.apply(x, weight, bias, per_channel, out_dtype)
