"""The Triton kernels as torch custom operators (``torch.library``), and the autograd function built on them.

Registered ops (namespace ``bittern``):

* ``quantize_activations`` and ``quantized_linear`` — the training forward: per-token int8 activations (once per
  input tensor: q/k/v and gate/up share them), then the latent weight's ternary codes and the int8 product with
  a fused rescale. Both can also write, in the same passes, the dequantized values the backward multiplies
  (:func:`backward_gemm`).
* ``ternary_linear_grad_input`` / ``ternary_linear_grad_weight`` — the straight-through backward products,
  fused (``BITTERN_BACKWARD_GEMM=triton``); ``dequantize_activations`` / ``dequantize_weight`` — the one-pass
  widening of int8 tensors saved for backward (``cublas-int8``).
* ``integer_linear`` — inference: ``y`` from a float input and fixed codes.
* ``packed_linear`` — inference straight from the packed 2-bit weights (:mod:`bittern.kernels.packed`): the
  decode kernel with fused activation quantization for up to 3 tokens, the prefill path beyond;
  ``packed_linear_group`` — two or three layers of one input (q/k/v, gate/up) in one launch.
* ``decode_attention`` — the decode step's rope, KV-cache write (in place) and attention of one token per
  sequence (:mod:`bittern.kernels.attention`).

Being custom ops with fake (meta) implementations, ``torch.compile`` keeps them as single nodes instead of
breaking the graph (eager calls skip the dispatcher: :class:`_CustomOp`), and since none of them synchronises
with the host, CUDA graphs capture them (run them once before capturing: the first call of a shape autotunes).

Importing this module imports Triton; :mod:`bittern.kernels` does so lazily, on first use.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import weakref

import torch

from bittern import quant
from bittern.kernels import attention, dense, matmul, packed, quantizers

BACKWARD_GEMMS = ("cublas", "cublas-int8", "triton")


def backward_gemm() -> str:
    """How the training linear's backward runs: ``$BITTERN_BACKWARD_GEMM``, ``cublas`` by default.

    * ``cublas``: the forward's quantizer passes also write what the backward multiplies, in the gradient's
      dtype (``xq / s_x`` per input, ``Wt / s_w`` per weight, :mod:`bittern.quant`'s dequantized values), and
      the backward is two cuBLAS products, as bf16's is. It saves a two-byte copy per activation and weight, as
      bf16 autocast does (q/k/v and gate/up share one copy of their input). The fastest of the three on Hopper
      (BENCHMARKS.md, ``benchmarks/train_step.py``).
    * ``cublas-int8``: saves the int8 ``xq`` and codes (one byte each) and widens them in the backward, one
      Triton pass each, before cuBLAS: less memory, one more pass per product.
    * ``triton``: the fused kernels of :mod:`bittern.kernels.matmul`, which widen the int8 tensors on chip and
      write no copy.

    Read at each forward (the choice is saved for that forward's backward).
    """
    value = os.environ.get("BITTERN_BACKWARD_GEMM", "cublas") or "cublas"
    if value not in BACKWARD_GEMMS:
        raise ValueError(f"BITTERN_BACKWARD_GEMM={value!r}; choose one of {', '.join(BACKWARD_GEMMS)}")
    return value


def _device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU even when another one is current (Triton launches on the current device)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


class _CustomOp:
    """A ``torch.library`` custom op that eager calls bypass: while torch.compile traces, calls go to the op (one
    graph node, with its fake implementation); otherwise straight to the Python implementation. The dispatcher's
    round trip through ``torch.library`` cost more host time per training step than the kernels it launched took
    on the GPU, so the step waited on the host.
    """

    def __init__(self, name: str, fn, mutates_args: tuple[str, ...] = ()) -> None:  # type: ignore[no-untyped-def]
        self.impl = fn
        self.op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
        functools.update_wrapper(self, fn)

    def register_fake(self, fake):  # type: ignore[no-untyped-def]
        self.op.register_fake(fake)
        return fake

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return (self.op if torch.compiler.is_compiling() else self.impl)(*args, **kwargs)


def _custom_op(name: str, mutates_args: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    """Decorator: ``fn`` registered as the custom op ``name``, writing in place only ``mutates_args`` (see
    :class:`_CustomOp`)."""
    return lambda fn: _CustomOp(name, fn, mutates_args)


def _nothing(like: torch.Tensor) -> torch.Tensor:
    """The placeholder for an output that was not asked for (a custom op cannot return None): empty, ``[0]``."""
    return like.new_empty((0,))


@_custom_op("bittern::quantize_activations")
def quantize_activations(x: torch.Tensor, widen: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` ``[..., K]`` → ``(xq int8 [M, K], s_x f32 [M, 1], xq / s_x [M, K] in widen, or [0])``."""
    with _device_guard(x):
        xq, act_scale, x_hat = quantizers.quantize_activations_and_widen(x, widen)
    k = x.shape[-1]
    return xq.reshape(-1, k), act_scale.reshape(-1, 1), _nothing(xq) if x_hat is None else x_hat.reshape(-1, k)


@quantize_activations.register_fake
def _(x, widen):  # type: ignore[no-untyped-def]
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    x_hat = x.new_empty((m, k), dtype=widen) if widen is not None else x.new_empty((0,), dtype=torch.int8)
    return x.new_empty((m, k), dtype=torch.int8), x.new_empty((m, 1), dtype=torch.float32), x_hat


@_custom_op("bittern::quantized_linear")
def quantized_linear(
    xq: torch.Tensor,
    act_scale: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    per_channel: bool,
    out_dtype: torch.dtype,
    widen: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training forward from quantized activations: ``xq`` int8 ``[M, K]``, ``a`` ``[M, 1]``, latent ``weight``
    ``[N, K]`` → ``(y [M, N] out_dtype, codes int8 [N, K], s_w f32 [1] or [N], Wt / s_w [N, K] in widen, or [0])``."""
    with _device_guard(xq):
        codes, scale, w_hat = quantizers.ternarize_and_widen(weight, per_channel, widen)
        y = matmul.int8_ternary_linear(xq, act_scale, codes, scale, bias, out_dtype)
    return y, codes, scale, _nothing(codes) if w_hat is None else w_hat


@quantized_linear.register_fake
def _(xq, act_scale, weight, bias, per_channel, out_dtype, widen):  # type: ignore[no-untyped-def]
    n, k = weight.shape
    w_hat = weight.new_empty((n, k), dtype=widen) if widen is not None else weight.new_empty((0,), dtype=torch.int8)
    return (
        xq.new_empty((xq.shape[0], n), dtype=out_dtype),
        weight.new_empty((n, k), dtype=torch.int8),
        weight.new_empty((n if per_channel else 1,), dtype=torch.float32),
        w_hat,
    )


class _SharedQuantization(threading.local):
    """The last input quantized by the training linear and its results, so that layers reading the same tensor
    (q/k/v, gate/up) quantize it once. An entry lives as long as its input: a weak reference drops it when the
    input is freed, and a changed ``_version`` (an in-place write) makes it stale."""

    def __init__(self) -> None:
        self.entry: tuple | None = None

    def lookup(self, x: torch.Tensor, widen: torch.dtype | None):  # type: ignore[no-untyped-def]
        entry = self.entry
        if entry is None:
            return None
        ref, version, cached_widen, results = entry
        if ref() is x and version == x._version and (widen is None or cached_widen == widen):
            return results
        return None

    def store(self, x: torch.Tensor, widen: torch.dtype | None, results: tuple) -> None:
        def drop(dead_ref, holder=self) -> None:  # type: ignore[no-untyped-def]
            if holder.entry is not None and holder.entry[0] is dead_ref:
                holder.entry = None

        self.entry = (weakref.ref(x, drop), x._version, widen, results)


_shared = _SharedQuantization()


def _quantized_activations(x: torch.Tensor, widen: torch.dtype | None):  # type: ignore[no-untyped-def]
    """``(xq, a, x_hat)`` of ``x``, quantized once for all the layers that read it (:class:`_SharedQuantization`).

    Under torch.compile the op is traced instead (a Python cache cannot be), once per layer; so is it under
    ``torch.inference_mode`` and while a CUDA graph is being captured."""
    if torch.compiler.is_compiling():
        return quantize_activations(x, widen)
    if x.is_inference() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        # inference tensors keep no version counter; a CUDA graph must capture its own quantization (a cached
        # result from before the capture would be replayed stale)
        return quantize_activations.impl(x, widen)
    results = _shared.lookup(x, widen)
    if results is None:
        results = quantize_activations.impl(x, widen)
        _shared.store(x, widen, results)
    return results


def _already_widened(t: torch.Tensor, _scale: torch.Tensor, _dtype: torch.dtype) -> torch.Tensor:
    return t


class _TernaryLinear(torch.autograd.Function):
    """Autograd around the ops: forward by ``bittern::quantize_activations`` and ``bittern::quantized_linear``,
    backward by the straight-through products (:func:`backward_gemm` says which).

    A plain ``autograd.Function`` rather than the ops' ``register_autograd``: the generated backward of an op
    with extra outputs copied those outputs (``empty`` + ``set_`` + ``copy_`` per saved tensor, seen in the
    profiler), and dynamo traces this class as well.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, per_channel, out_dtype):  # type: ignore[override]
        mode = backward_gemm()
        widened = mode == "cublas"
        needs_x, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        xq, act_scale, x_hat = _quantized_activations(x, out_dtype if widened and needs_w else None)
        y, codes, scale, w_hat = quantized_linear(
            xq, act_scale, weight, bias, per_channel, out_dtype, out_dtype if widened and needs_x else None
        )
        if widened:  # what the two products read, already in the gradient's dtype
            ctx.save_for_backward(x_hat if needs_w else None, None, w_hat if needs_x else None, None)
        else:
            ctx.save_for_backward(xq, act_scale, codes, scale)
        ctx.mode = mode
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        if ctx.mode == "triton":
            products = (grad_input, grad_weight)
        else:  # cuBLAS, on the copies the forward widened, or after one widening pass each
            if ctx.mode == "cublas":
                widen_weight = widen_activations = _already_widened
            else:
                widen_weight, widen_activations = dequantize_weight, dequantize_activations
            products = (
                functools.partial(quant.dense_grad_input, widen=widen_weight),
                functools.partial(quant.dense_grad_weight, widen=widen_activations),
            )
        grads = quant.ste_gradients(grad_y, *ctx.saved_tensors, ctx.dtypes, ctx.needs_input_grad[:3], *products)
        return (*grads, None, None)


@_custom_op("bittern::ternary_linear_grad_input")
def grad_input(grad_y: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad_y [..., N] @ (codes / s_w)`` → ``[..., K]`` in ``dtype``."""
    with _device_guard(grad_y):
        return matmul.grad_input(grad_y, codes, scale, dtype)


@grad_input.register_fake
def _(grad_y, codes, scale, dtype):  # type: ignore[no-untyped-def]
    return grad_y.new_empty((*grad_y.shape[:-1], codes.shape[1]), dtype=dtype)


@_custom_op("bittern::ternary_linear_grad_weight")
def grad_weight(grad_y: torch.Tensor, xq: torch.Tensor, act_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad_yᵀ @ (xq / s_x)`` over all tokens → ``[N, K]`` in ``dtype``."""
    with _device_guard(grad_y):
        return matmul.grad_weight(grad_y, xq, act_scale, dtype)


@grad_weight.register_fake
def _(grad_y, xq, act_scale, dtype):  # type: ignore[no-untyped-def]
    return grad_y.new_empty((grad_y.shape[-1], xq.shape[-1]), dtype=dtype)


@_custom_op("bittern::dequantize_activations")
def dequantize_activations(xq: torch.Tensor, act_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``xq / s_x`` in ``dtype``, one pass: int8 ``[M, K]``, float32 ``[M, 1]`` → ``[M, K]``."""
    with _device_guard(xq):
        return quantizers.dequantize_activations(xq, act_scale, dtype)


@dequantize_activations.register_fake
def _(xq, act_scale, dtype):  # type: ignore[no-untyped-def]
    return xq.new_empty(xq.shape, dtype=dtype)


@_custom_op("bittern::dequantize_weight")
def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``codes / s_w`` in ``dtype``, one pass: int8 ``[N, K]``, float32 ``[1]`` or ``[N]`` → ``[N, K]``."""
    with _device_guard(codes):
        return quantizers.dequantize_weight(codes, scale, dtype)


@dequantize_weight.register_fake
def _(codes, scale, dtype):  # type: ignore[no-untyped-def]
    return codes.new_empty(codes.shape, dtype=dtype)


@_custom_op("bittern::integer_linear")
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


@_custom_op("bittern::packed_linear")
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


@_custom_op("bittern::dense_linear")
def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` over a few rows (:func:`bittern.kernels.dense.dense_linear`): ``[..., K]`` → ``[..., N]``."""
    with _device_guard(x):
        return dense.dense_linear(x, weight, bias)


@dense_linear.register_fake
def _(x, weight, bias):  # type: ignore[no-untyped-def]
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@_custom_op("bittern::packed_linear_group")
def packed_linear_group(
    x: torch.Tensor,
    packed_weights: list[torch.Tensor],
    out_features: list[int],
    scales: list[torch.Tensor],
    out_dtype: torch.dtype,
) -> list[torch.Tensor]:
    """Two or three bias-free packed layers on one input in one launch: ``[..., K]`` → ``[..., N_i]``."""
    with _device_guard(x):
        if packed.decode_applies(x):
            return packed.decode_group(x, packed_weights, out_features, scales, out_dtype)
        return packed.prefill_group(x, packed_weights, out_features, scales, out_dtype)


@packed_linear_group.register_fake
def _(x, packed_weights, out_features, scales, out_dtype):  # type: ignore[no-untyped-def]
    return [x.new_empty((*x.shape[:-1], n), dtype=out_dtype) for n in out_features]


@_custom_op("bittern::packed_quantized")
def packed_quantized(
    xq: torch.Tensor,
    act_scale: torch.Tensor,
    packed_weights: list[torch.Tensor],
    out_features: list[int],
    scales: list[torch.Tensor],
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> list[torch.Tensor]:
    """The packed product on an input quantized beforehand (int8 ``[..., K]``, float32 scales ``[..., 1]``): one
    layer (with its bias, if any), or two or three bias-free layers in one launch
    (:func:`bittern.kernels.packed.quantized_products`). ``[..., N_i]`` per layer."""
    with _device_guard(xq):
        return packed.quantized_products(xq, act_scale, packed_weights, out_features, scales, bias, out_dtype)


@packed_quantized.register_fake
def _(xq, act_scale, packed_weights, out_features, scales, bias, out_dtype):  # type: ignore[no-untyped-def]
    return [xq.new_empty((*xq.shape[:-1], n), dtype=out_dtype) for n in out_features]


@_custom_op("bittern::decode_attention", mutates_args=("keys", "values"))
def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slot: torch.Tensor,
    pad: torch.Tensor,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """The decode step's rope, cache write (in place, into ``keys`` / ``values``) and attention
    (:func:`bittern.kernels.attention.decode_attention`): ``[B, H_kv, G, D]``."""
    with _device_guard(q):
        return attention.decode_attention(q, k, v, cos, sin, keys, values, slot, pad, scale, window)


@decode_attention.register_fake
def _(q, k, v, cos, sin, keys, values, slot, pad, scale, window):  # type: ignore[no-untyped-def]
    return torch.empty_like(q)


def unpack_codes(packed_weight: torch.Tensor, out_features: int) -> torch.Tensor:
    """The int8 codes ``[N, K]`` of a packed weight in one Triton pass, on the weight's GPU (eager only)."""
    with _device_guard(packed_weight):
        return packed.unpack(packed_weight, out_features)


def frozen_ternary_linear(
    x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """:func:`bittern.quant.frozen_ternary_linear` on the kernels: forward by ``bittern::integer_linear``,
    ``grad_x = grad_y @ (Wt / s_w)`` by the fused ``ternary_linear_grad_input`` kernel, which widens the int8 codes
    on chip (no dense copy of the weight)."""
    return quant.frozen_ternary_linear(x, codes, scale, bias, out_dtype, integer_linear, grad_input)


def ternary_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, per_channel: bool, out_dtype: torch.dtype
) -> torch.Tensor:
    """The training-time ternary linear on the kernels: ``[..., K]`` → ``[..., N]`` in ``out_dtype``."""
    return _TernaryLinear.apply(x, weight, bias, per_channel, out_dtype)
