"""Triton quantizers: per-token int8 activations and per-tensor (or per-row) ternary weights.

Both reproduce :mod:`bittern.quant` bit for bit (tested in ``tests/kernels``):

* every division that feeds a rounding is IEEE round-to-nearest (``tl.math.div_rn``; Triton's ``/`` on
  float32 is an approximate division on NVIDIA GPUs);
* rounding is half to even, done by adding and subtracting 1.5·2²³ in float32 — exact for |v| < 2²², so
  values are clamped into that range first where they could exceed it;
* the weight scale sums ``|W|`` in float64 over fixed blocks, then in a fixed order, and rounds the mean to
  float32 once: the bits do not depend on the order (see :func:`bittern.quant.weight_scale`).

Nothing here reads a value back to the host: the scale stays on the device between the two launches, so
the quantizers run inside CUDA graphs and never stall the launch queue.

This module imports Triton; import it only through :mod:`bittern.kernels`, which does so lazily.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bittern import quant
from bittern.kernels import interpreter

# 1.5 * 2**23: v + M - M rounds a float32 |v| < 2**22 to an integer, half to even
_ROUND_MAGIC = tl.constexpr(12582912.0)

ACT_SINGLE_PASS_MAX_K = 16384
"""Up to this row length a token's activations stay in registers: one read of ``x``. Longer rows read it twice."""

_SUM_BLOCK = 4096
_SUM_CHUNKS = 16  # each program of the |W| sum covers 64 Ki elements; a 2560 x 6912 weight needs 270 partials
_CODES_BLOCK = 4096


@triton.jit
def _round_half_even(v):
    return (v + _ROUND_MAGIC) - _ROUND_MAGIC


@triton.jit(do_not_specialize=["K"])
def _act_quant_kernel(
    x_ptr, xq_ptr, scale_ptr, K, stride_x, EPS: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_PASS: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    xq_row = xq_ptr + row * K
    if SINGLE_PASS:
        offs = tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=0), EPS)
        q = _round_half_even(tl.math.div_rn(x * 127.0, amax))
        q = tl.minimum(tl.maximum(q, -128.0), 127.0)
        tl.store(xq_row + offs, q.to(tl.int8), mask=mask)
    else:
        running = tl.zeros([BLOCK_K], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            offs = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            running = tl.maximum(running, tl.abs(x))
        amax = tl.maximum(tl.max(running, axis=0), EPS)
        for start in range(0, K, BLOCK_K):
            offs = start + tl.arange(0, BLOCK_K)
            mask = offs < K
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            q = _round_half_even(tl.math.div_rn(x * 127.0, amax))
            q = tl.minimum(tl.maximum(q, -128.0), 127.0)
            tl.store(xq_row + offs, q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + row, amax)


# Triton compiles arguments equal to 1 as constants (and a constant has no .to()): sizes are never specialised.
@triton.jit(do_not_specialize=["numel"])
def _abs_sum_partials_kernel(w_ptr, partial_ptr, numel, BLOCK: tl.constexpr, CHUNKS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for chunk in range(CHUNKS):
        offs = (pid * CHUNKS + chunk) * BLOCK + tl.arange(0, BLOCK)
        w = tl.load(w_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
        acc += tl.abs(w).to(tl.float64)
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit(do_not_specialize=["num_partials", "numel"])
def _mean_from_partials_kernel(partial_ptr, scale_ptr, num_partials, numel, EPS: tl.constexpr, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, num_partials, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < num_partials, other=0.0)
    mean = tl.sum(acc, axis=0) / numel.to(tl.float64)  # float64 division is IEEE (div.rn.f64)
    tl.store(scale_ptr, tl.maximum(mean.to(tl.float32), EPS))


@triton.jit(do_not_specialize=["K"])
def _row_abs_mean_kernel(w_ptr, scale_ptr, K, stride_w, EPS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        w = tl.load(w_ptr + row * stride_w + offs, mask=offs < K, other=0.0).to(tl.float32)
        acc += tl.abs(w).to(tl.float64)
    mean = tl.sum(acc, axis=0) / K.to(tl.float64)
    tl.store(scale_ptr + row, tl.maximum(mean.to(tl.float32), EPS))


@triton.jit(do_not_specialize=["numel", "K"])
def _ternary_codes_kernel(w_ptr, scale_ptr, codes_ptr, numel, K, PER_CHANNEL: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PER_CHANNEL:
        s = tl.load(scale_ptr + offs // K, mask=mask, other=1.0)
    else:
        s = tl.load(scale_ptr)
    q = tl.math.div_rn(w, s)
    q = _round_half_even(tl.minimum(tl.maximum(q, -2.0), 2.0))  # the clamp keeps the rounding trick exact
    q = tl.minimum(tl.maximum(q, -1.0), 1.0)
    tl.store(codes_ptr + offs, q.to(tl.int8), mask=mask)


@triton.jit(do_not_specialize=["K"])
def _dequantize_kernel(q_ptr, scale_ptr, out_ptr, K, ROW_SCALE: tl.constexpr, DIVIDE_127: tl.constexpr,
                       BLOCK: tl.constexpr):  # fmt: skip
    # a 2-D grid (row, column block): the row's scale is one load, and no index is divided by K
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < K
    q = tl.load(q_ptr + row * K + cols, mask=mask, other=0).to(tl.float32)
    s = tl.load(scale_ptr + row) if ROW_SCALE else tl.load(scale_ptr)
    value = q * s
    if DIVIDE_127:
        value = tl.math.div_rn(value, tl.full((BLOCK,), 127.0, tl.float32))
    tl.store(out_ptr + row * K + cols, value.to(out_ptr.dtype.element_ty), mask=mask)


def _dequantize(
    q: torch.Tensor, scale: torch.Tensor, row_scale: bool, divide: bool, dtype: torch.dtype
) -> torch.Tensor:
    q = q if q.is_contiguous() else q.contiguous()
    out = torch.empty(q.shape, dtype=interpreter.store_dtype(dtype), device=q.device)
    if q.numel():
        k = q.shape[-1]
        rows = q.numel() // k
        block = min(4096, triton.next_power_of_2(k))
        _dequantize_kernel[(rows, triton.cdiv(k, block))](
            q, scale, out, k, ROW_SCALE=row_scale, DIVIDE_127=divide, BLOCK=block, num_warps=4
        )
    return out.to(dtype)


def dequantize_activations(xq: torch.Tensor, act_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Triton twin of :func:`bittern.quant.dequantize_activations`: ``xq * a / 127`` in one pass, ``[..., K]``."""
    return _dequantize(xq, act_scale.reshape(-1).contiguous(), True, True, dtype)


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Triton twin of :func:`bittern.quant.dequantize_weight`: ``codes * s`` in one pass, ``[N, K]``."""
    return _dequantize(codes, scale, scale.numel() != 1, False, dtype)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`bittern.quant.quantize_activations`, one program per token.

    Args:
        x: ``[..., K]`` float32, float16 or bfloat16 (the last dimension must be contiguous).

    Returns:
        ``xq``: int8 ``[..., K]``; ``a``: float32 ``[..., 1]``; bit-identical to the reference.
    """
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    xq = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m > 0 and k > 0:
        single = k <= ACT_SINGLE_PASS_MAX_K
        block = triton.next_power_of_2(k) if single else 4096
        warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
        _act_quant_kernel[(m,)](
            rows, xq, scale, k, rows.stride(0), EPS=quant.EPS, BLOCK_K=block, SINGLE_PASS=single, num_warps=warps
        )
    return xq.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


def weight_scale(weight: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """Triton twin of :func:`bittern.quant.weight_scale`: float32 ``[1]`` or ``[N]``, kept on the device."""
    w = weight.detach()
    if not w.is_contiguous():
        w = w.contiguous()
    n, k = w.shape
    if per_channel:
        scale = torch.empty(n, dtype=torch.float32, device=w.device)
        _row_abs_mean_kernel[(n,)](w, scale, k, w.stride(0), EPS=quant.EPS, BLOCK=1024)
        return scale
    numel = w.numel()
    per_program = _SUM_BLOCK * _SUM_CHUNKS
    num_partials = max(1, triton.cdiv(numel, per_program))
    partials = torch.empty(num_partials, dtype=torch.float64, device=w.device)
    _abs_sum_partials_kernel[(num_partials,)](w, partials, numel, BLOCK=_SUM_BLOCK, CHUNKS=_SUM_CHUNKS, num_warps=8)
    scale = torch.empty(1, dtype=torch.float32, device=w.device)
    _mean_from_partials_kernel[(1,)](partials, scale, num_partials, numel, EPS=quant.EPS, BLOCK=1024)
    return scale


def ternary_codes(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Triton twin of :func:`bittern.quant.ternary_codes`: int8 ``[N, K]`` in {-1, 0, 1}."""
    w = weight.detach()
    if not w.is_contiguous():
        w = w.contiguous()
    codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    numel = w.numel()
    if numel:
        grid = (triton.cdiv(numel, _CODES_BLOCK),)
        per_channel = scale.numel() != 1
        _ternary_codes_kernel[grid](
            w, scale, codes, numel, w.shape[1], PER_CHANNEL=per_channel, BLOCK=_CODES_BLOCK, num_warps=8
        )
    return codes


def ternarize(weight: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`bittern.quant.ternarize`: ``(codes int8 [N, K], s float32 [1] or [N])``."""
    scale = weight_scale(weight, per_channel)
    return ternary_codes(weight, scale), scale
