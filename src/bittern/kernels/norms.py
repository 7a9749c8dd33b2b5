"""A fused RMSNorm for the engine's prompt forward: residual add, norm and the next projection's int8 activation
quantization in one pass over each token's row.

Eagerly, a Hugging Face ``LlamaRMSNorm`` (and the BitNet / Mistral / Qwen2 / Qwen3 copies of it) is five or six
kernels (upcast, square, mean, rsqrt, two products), the residual add before it one more, and a ternary projection
after it quantizes its input in another pass. :func:`rms_norm` does all of it in one kernel, one program per token
(the graphed prompt forward is markedly faster for it):

* ``s = x + residual`` rounded to the input dtype (exactly what ``x + residual`` gives), stored when a residual is
  given;
* ``y = weight * (s_f32 * rsqrt(mean(s_f32²) + eps)).to(dtype)``: the module's formula and order of roundings (the
  mean's order of additions and ``rsqrt``'s last bit may differ from PyTorch's, as they do between PyTorch's own
  kernels);
* optionally ``(yq, a) = quantize_activations(y)`` exactly as :func:`bittern.quant.quantize_activations` would
  quantize the stored ``y`` (bit for bit: the same IEEE division and rounding as the quantizer kernels).

Import through :mod:`bittern.kernels` (lazily).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bittern import quant
from bittern.kernels import interpreter
from bittern.kernels.quantizers import _act_codes, activation_scale

MAX_WIDTH = 32768
"""Widest row the kernel takes (a program holds its row in registers)."""


@triton.jit
def _rounded(v, dtype: tl.constexpr, BY_HAND: tl.constexpr):
    """float32 ``v`` rounded to ``dtype`` (nearest, ties to even). ``BY_HAND`` (bfloat16 under the interpreter,
    whose cast truncates): the rounding done on the bits, the result float32 values that bfloat16 holds exactly."""
    if BY_HAND:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit(do_not_specialize=["D", "stride_x", "stride_r"])
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, s_ptr, y_ptr, q_ptr, a_ptr, D, stride_x, stride_r, eps,
    IN_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, IN_BY_HAND: tl.constexpr, OUT_BY_HAND: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, QUANTIZE: tl.constexpr, QEPS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < D
    s = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # x + residual in the input dtype, as PyTorch's add rounds it
        s += tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        s = _rounded(s, IN_DTYPE, IN_BY_HAND).to(tl.float32)
        tl.store(s_ptr + row * D + cols, s, mask=ok)
    variance = tl.sum(s * s, axis=0) / D
    normed = _rounded(s * tl.math.rsqrt(variance + eps), IN_DTYPE, IN_BY_HAND).to(tl.float32)
    weight = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    y = _rounded(weight * normed, OUT_DTYPE, OUT_BY_HAND).to(tl.float32)
    tl.store(y_ptr + row * D + cols, y, mask=ok)
    if QUANTIZE:  # of y as stored
        act_scale = activation_scale(tl.maximum(tl.max(tl.where(ok, tl.abs(y), 0.0), axis=0), QEPS))
        tl.store(q_ptr + row * D + cols, _act_codes(y, act_scale).to(tl.int8), mask=ok)
        tl.store(a_ptr + row, act_scale)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def applies(x: torch.Tensor) -> bool:
    """Whether :func:`rms_norm` takes ``x`` ``[..., D]``: a floating row of at most :data:`MAX_WIDTH`."""
    return x.dtype in _TL_DTYPES and 0 < x.shape[-1] <= MAX_WIDTH


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    quantize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """``s = x + residual``; ``y = RMSNorm(s)``; optionally ``y``'s per-token int8 quantization, in one launch.

    Args:
        x: ``[..., D]`` float32 / bfloat16 / float16, ``D <= MAX_WIDTH``.
        weight: ``[D]`` of one of those dtypes, the norm's gain; ``y``'s dtype is
            ``torch.promote_types(weight.dtype, x.dtype)``, as the module's ``weight * normed`` gives.
        eps: the module's ``variance_epsilon``.
        residual: ``[..., D]`` in ``x``'s dtype, or None (then ``s`` is ``x`` itself).
        quantize: also return ``(yq int8 [..., D], a float32 [..., 1])``, equal to
            :func:`bittern.quant.quantize_activations` of ``y`` bit for bit.

    Returns:
        ``(s, y, quantized or None)``.
    """
    if not applies(x):
        raise ValueError(f"rms_norm takes a floating [..., D] input with 0 < D <= {MAX_WIDTH}, got {x.dtype} "
                         f"{tuple(x.shape)}")  # fmt: skip
    width = x.shape[-1]
    if weight.shape != (width,) or weight.dtype not in _TL_DTYPES:
        raise ValueError(f"rms_norm: weight is {weight.dtype} {tuple(weight.shape)}; the input's rows need a "
                         f"floating ({width},)")  # fmt: skip
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"rms_norm: residual {residual.dtype} {tuple(residual.shape)} does not match the input "
                         f"{x.dtype} {tuple(x.shape)}")  # fmt: skip
    rows_x = x.reshape(-1, width)
    rows_x = rows_x if rows_x.stride(-1) == 1 else rows_x.contiguous()
    rows_r = None if residual is None else residual.reshape(-1, width)
    if rows_r is not None and rows_r.stride(-1) != 1:
        rows_r = rows_r.contiguous()
    rows = rows_x.shape[0]
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    summed = rows_x
    if rows_r is not None:
        summed = torch.empty((rows, width), dtype=interpreter.store_dtype(x.dtype), device=x.device)
    y = torch.empty((rows, width), dtype=interpreter.store_dtype(out_dtype), device=x.device)
    yq = torch.empty((rows, width), dtype=torch.int8, device=x.device) if quantize else y
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device) if quantize else y
    if rows:
        block = triton.next_power_of_2(width)
        _rms_norm_kernel[(rows,)](
            rows_x, rows_r if rows_r is not None else rows_x, weight.contiguous(), summed, y, yq, scale, width,
            rows_x.stride(0), rows_r.stride(0) if rows_r is not None else 0, float(eps),
            IN_DTYPE=_TL_DTYPES[x.dtype], OUT_DTYPE=_TL_DTYPES[out_dtype],
            IN_BY_HAND=interpreter.ON_IMPORT and x.dtype == torch.bfloat16,
            OUT_BY_HAND=interpreter.ON_IMPORT and out_dtype == torch.bfloat16,
            HAS_RESIDUAL=rows_r is not None, QUANTIZE=quantize, QEPS=quant.EPS, BLOCK=block,
            num_warps=max(4, min(16, block // 512)),
        )  # fmt: skip
    shape = x.shape
    summed = summed.to(x.dtype).reshape(shape) if rows_r is not None else x
    quantized = (yq.reshape(shape), scale.reshape(*shape[:-1], 1)) if quantize else None
    return summed, y.to(out_dtype).reshape(shape), quantized
