"""Triton quantizers: per-token int8 activations and per-tensor (or per-row) ternary weights.

Both reproduce :mod:`bittern.quant` bit for bit (tested in ``tests/kernels``):

* every reciprocal and division is IEEE round-to-nearest (``tl.math.div_rn``; Triton's ``/`` on float32 is an
  approximate division on NVIDIA GPUs); the activation scale is ``reciprocal(amax) * 127``, as the reference
  takes it (:func:`activation_scale`);
* rounding is half to even, done by adding and subtracting 1.5·2²³ in float32 — exact for |v| < 2²², so
  values are clamped into that range first where they could exceed it;
* the weight scale sums ``|W|`` in float64 over fixed blocks, then in a fixed order, rounds the mean to
  float32 once and takes its reciprocal: the bits do not depend on the order (see :func:`bittern.quant.mean_abs`).

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

ACT_BLOCK_K = 512
"""The activation quantizer reads a token's row in pieces of this many elements (1024 for rows over 4096)."""

_SUM_BLOCK = 4096
_SUM_CHUNKS = 16  # each program of the |W| sum covers 64 Ki elements; a 2560 x 6912 weight needs 270 partials
_CODES_BLOCK = 1024  # with 4 blocks per program and 8 warps; 4096-wide blocks streamed far slower on Hopper
_MEAN_BLOCK = 1024  # float64 lanes of the partial-sum reduction


@triton.jit
def _round_half_even(v):
    return (v + _ROUND_MAGIC) - _ROUND_MAGIC


@triton.jit
def reciprocal(v):
    """``1 / v`` in float32, IEEE round-to-nearest (:func:`bittern.quant.reciprocal`)."""
    return tl.math.div_rn(tl.full(v.shape, 1.0, tl.float32), v)


@triton.jit
def activation_scale(amax):
    """``s_x = reciprocal(amax) * 127`` for an ``amax`` already clamped to ``EPS``
    (:func:`bittern.quant.activation_scale`)."""
    return reciprocal(amax) * 127.0


@triton.jit
def rescale(acc, weight_scale, act_scale):
    """The reference's epilogue without the bias (:func:`bittern.quant.rescale`), ``acc / (s_w * s_x)`` in float32,
    one IEEE division: ``acc`` int32 ``[BM, BN]``, ``weight_scale`` a scalar or ``[1, BN]``, ``act_scale``
    ``[BM, 1]``."""
    return tl.math.div_rn(acc.to(tl.float32), weight_scale * act_scale)


@triton.jit
def _act_codes(x, act_scale):
    """float32 ``x`` → its int8 codes as float32, ``clamp(round_half_even(x * s_x), -128, 127)``.

    The clamp comes before the rounding (the same codes) so that the product is rounded to float32 on its own: fed
    straight into the rounding trick's addition, the GPU compiler contracts the two into one fused multiply-add,
    which rounds the exact product and splits the ties that bfloat16 inputs make common differently."""
    q = tl.minimum(tl.maximum(x * act_scale, -128.0), 127.0)
    return _round_half_even(q)


@triton.jit
def _store_act_row(xq_row, xhat_row, offs, mask, q, act_scale, WIDEN: tl.constexpr):
    """Store codes ``q`` (float32) as int8 and, with ``WIDEN``, their dequantized values ``q / s_x``."""
    tl.store(xq_row + offs, q.to(tl.int8), mask=mask)
    if WIDEN:  # xq / s_x, the value quant.dequantize_activations gives
        xhat = tl.math.div_rn(q, act_scale)
        tl.store(xhat_row + offs, xhat.to(xhat_row.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["K"])
def _act_quant_kernel(
    x_ptr, xq_ptr, scale_ptr, xhat_ptr, K, stride_x, EPS: tl.constexpr, BLOCK_K: tl.constexpr, WIDEN: tl.constexpr
):  # fmt: skip
    # One token per program, two passes over its row in BLOCK_K pieces: the absmax, then the codes (the second
    # read hits L2). This streams faster than one pass over the whole row held in registers (padded to a power of
    # two), which wastes lanes and registers on the padding.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    xq_row = xq_ptr + row * K
    xhat_row = xhat_ptr + row * K
    running = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        offs = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        running = tl.maximum(running, tl.abs(x))
    act_scale = activation_scale(tl.maximum(tl.max(running, axis=0), EPS))
    for start in range(0, K, BLOCK_K):
        offs = start + tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        _store_act_row(xq_row, xhat_row, offs, mask, _act_codes(x, act_scale), act_scale, WIDEN)
    tl.store(scale_ptr + row, act_scale)


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


@triton.jit
def _scale_of_partials(partial_ptr, num_partials, numel, EPS: tl.constexpr, BLOCK: tl.constexpr):
    """``1 / max(Σ partials / numel, EPS)``, the mean rounded to float32 once; the same order of additions wherever
    it runs."""
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, num_partials, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < num_partials, other=0.0)
    mean = tl.sum(acc, axis=0) / numel.to(tl.float64)  # float64 division is IEEE (div.rn.f64)
    return reciprocal(tl.maximum(mean.to(tl.float32), EPS))


@triton.jit(do_not_specialize=["num_partials", "numel"])
def _scale_from_partials_kernel(partial_ptr, scale_ptr, num_partials, numel, EPS: tl.constexpr, BLOCK: tl.constexpr):
    tl.store(scale_ptr, _scale_of_partials(partial_ptr, num_partials, numel, EPS, BLOCK))


@triton.jit(do_not_specialize=["K"])
def _row_scale_kernel(w_ptr, scale_ptr, K, stride_w, EPS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        w = tl.load(w_ptr + row * stride_w + offs, mask=offs < K, other=0.0).to(tl.float32)
        acc += tl.abs(w).to(tl.float64)
    mean = tl.sum(acc, axis=0) / K.to(tl.float64)
    tl.store(scale_ptr + row, reciprocal(tl.maximum(mean.to(tl.float32), EPS)))


@triton.jit(do_not_specialize=["numel", "K", "num_partials"])
def _ternary_codes_kernel(
    w_ptr, scale_ptr, codes_ptr, what_ptr, partial_ptr, numel, K, num_partials, EPS: tl.constexpr,
    PER_CHANNEL: tl.constexpr, FROM_PARTIALS: tl.constexpr, WIDEN: tl.constexpr, BLOCK: tl.constexpr,
    CHUNKS: tl.constexpr, MEAN_BLOCK: tl.constexpr,
):  # fmt: skip
    # FROM_PARTIALS: every program reduces the |W| partial sums itself, in _scale_from_partials_kernel's order
    # (the same bits), and program 0 stores the scale: one launch fewer than a separate mean kernel.
    pid = tl.program_id(0).to(tl.int64)
    if FROM_PARTIALS:
        s_tensor = _scale_of_partials(partial_ptr, num_partials, numel, EPS, MEAN_BLOCK)
        if pid == 0:
            tl.store(scale_ptr, s_tensor)
    elif not PER_CHANNEL:
        s_tensor = tl.load(scale_ptr)
    for chunk in range(CHUNKS):
        offs = (pid * CHUNKS + chunk) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if PER_CHANNEL:
            s = tl.load(scale_ptr + offs // K, mask=mask, other=1.0)
        else:
            s = s_tensor
        q = _round_half_even(tl.minimum(tl.maximum(w * s, -2.0), 2.0))  # the clamp keeps the rounding trick exact
        q = tl.minimum(tl.maximum(q, -1.0), 1.0)
        tl.store(codes_ptr + offs, q.to(tl.int8), mask=mask)
        if WIDEN:  # codes / s_w, the value quant.dequantize_weight gives
            tl.store(what_ptr + offs, tl.math.div_rn(q, s).to(what_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["K"])
def _dequantize_kernel(q_ptr, scale_ptr, out_ptr, K, ROW_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    # a 2-D grid (row, column block): the row's scale is one load, and no index is divided by K
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < K
    q = tl.load(q_ptr + row * K + cols, mask=mask, other=0).to(tl.float32)
    s = tl.load(scale_ptr + row) if ROW_SCALE else tl.load(scale_ptr)
    value = tl.math.div_rn(q, s)
    tl.store(out_ptr + row * K + cols, value.to(out_ptr.dtype.element_ty), mask=mask)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, row_scale: bool, dtype: torch.dtype) -> torch.Tensor:
    """``q / scale`` (IEEE division) in ``dtype``: int8 ``[R, K]`` over a float32 scale per row or one in all."""
    q = q if q.is_contiguous() else q.contiguous()
    out = torch.empty(q.shape, dtype=interpreter.store_dtype(dtype), device=q.device)
    if q.numel():
        k = q.shape[-1]
        rows = q.numel() // k
        block = min(4096, triton.next_power_of_2(k))
        _dequantize_kernel[(rows, triton.cdiv(k, block))](
            q, scale, out, k, ROW_SCALE=row_scale, BLOCK=block, num_warps=4
        )
    return out.to(dtype)


def dequantize_activations(xq: torch.Tensor, act_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Triton twin of :func:`bittern.quant.dequantize_activations`: ``xq / s_x`` in one pass, ``[..., K]``."""
    return _dequantize(xq, act_scale.reshape(-1).contiguous(), True, dtype)


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Triton twin of :func:`bittern.quant.dequantize_weight`: ``codes / s_w`` in one pass, ``[N, K]``."""
    return _dequantize(codes, scale, scale.numel() != 1, dtype)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`bittern.quant.quantize_activations`, one program per token: ``x`` ``[..., K]``
    float32, float16 or bfloat16 → ``(xq int8 [..., K], s_x float32 [..., 1])``, bit-identical to the reference."""
    xq, scale, _ = quantize_activations_and_widen(x, None)
    return xq, scale


def quantize_activations_and_widen(
    x: torch.Tensor, widen: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`quantize_activations`, optionally writing the dequantized activations in the same pass.

    Args:
        x: ``[..., K]`` float32, float16 or bfloat16 (the last dimension must be contiguous).
        widen: also write ``xq / s_x`` in this dtype in the same pass (the value of
            :func:`bittern.quant.dequantize_activations`: what the backward's ``grad_W`` product reads), or None.

    Returns:
        ``xq``: int8 ``[..., K]``; ``s_x``: float32 ``[..., 1]``; the widened ``[..., K]`` or None. All bit-identical
        to the reference.
    """
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    xq = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    x_hat = None if widen is None else torch.empty((m, k), dtype=interpreter.store_dtype(widen), device=x.device)
    if m > 0 and k > 0:
        block, warps = (ACT_BLOCK_K, 4) if k <= 4096 else (2 * ACT_BLOCK_K, 8)  # the best of a sweep on Hopper
        _act_quant_kernel[(m,)](
            rows, xq, scale, xq if x_hat is None else x_hat, k, rows.stride(0), EPS=quant.EPS, BLOCK_K=block,
            WIDEN=x_hat is not None, num_warps=warps,
        )  # fmt: skip
    if x_hat is not None:
        x_hat = x_hat.to(widen).reshape(x.shape)
    return xq.reshape(x.shape), scale.reshape(*x.shape[:-1], 1), x_hat


def _abs_sum_partials(w: torch.Tensor) -> torch.Tensor:
    """float64 partial sums of ``|W|`` over fixed blocks of a contiguous weight (``cdiv(numel, 64 Ki)`` of them)."""
    numel = w.numel()
    num_partials = max(1, triton.cdiv(numel, _SUM_BLOCK * _SUM_CHUNKS))
    partials = torch.empty(num_partials, dtype=torch.float64, device=w.device)
    _abs_sum_partials_kernel[(num_partials,)](w, partials, numel, BLOCK=_SUM_BLOCK, CHUNKS=_SUM_CHUNKS, num_warps=8)
    return partials


def _contiguous_detached(weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach()
    return w if w.is_contiguous() else w.contiguous()


def weight_scale(weight: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """Triton twin of :func:`bittern.quant.weight_scale`: float32 ``[1]`` or ``[N]``, kept on the device."""
    w = _contiguous_detached(weight)
    n, k = w.shape
    if per_channel:
        scale = torch.empty(n, dtype=torch.float32, device=w.device)
        _row_scale_kernel[(n,)](w, scale, k, w.stride(0), EPS=quant.EPS, BLOCK=1024)
        return scale
    partials = _abs_sum_partials(w)
    scale = torch.empty(1, dtype=torch.float32, device=w.device)
    _scale_from_partials_kernel[(1,)](partials, scale, partials.numel(), w.numel(), EPS=quant.EPS, BLOCK=_MEAN_BLOCK)
    return scale


def _launch_codes(
    w: torch.Tensor, scale: torch.Tensor, per_channel: bool, partials: torch.Tensor | None, widen: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The codes pass (and the widened ``codes / s_w``); with ``partials`` it also reduces them into ``scale``."""
    codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    w_hat = None if widen is None else torch.empty(w.shape, dtype=interpreter.store_dtype(widen), device=w.device)
    numel = w.numel()
    if numel:
        num_partials = 0 if partials is None else partials.numel()
        # 4 blocks per program; more when every program re-reads many partial sums, so that this re-read stays
        # a small share of its work (a 2560 x 6912 weight has 270 partials, a 128256 x 2560 one 5010)
        chunks = max(4, min(64, triton.next_power_of_2(triton.cdiv(num_partials, 128))))
        grid = (triton.cdiv(numel, _CODES_BLOCK * chunks),)
        _ternary_codes_kernel[grid](
            w, scale, codes, codes if w_hat is None else w_hat, scale if partials is None else partials, numel,
            w.shape[1], num_partials, EPS=quant.EPS, PER_CHANNEL=per_channel, FROM_PARTIALS=partials is not None,
            WIDEN=w_hat is not None, BLOCK=_CODES_BLOCK, CHUNKS=chunks, MEAN_BLOCK=_MEAN_BLOCK, num_warps=8,
        )  # fmt: skip
    return codes, None if w_hat is None else w_hat.to(widen)


def ternary_codes(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Triton twin of :func:`bittern.quant.ternary_codes`: int8 ``[N, K]`` in {-1, 0, 1}."""
    return _launch_codes(_contiguous_detached(weight), scale, scale.numel() != 1, None, None)[0]


def ternarize(weight: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`bittern.quant.ternarize`: ``(codes int8 [N, K], s_w float32 [1] or [N])``."""
    codes, scale, _ = ternarize_and_widen(weight, per_channel, None)
    return codes, scale


def ternarize_and_widen(
    weight: torch.Tensor, per_channel: bool, widen: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`ternarize`, optionally writing ``codes / s_w``: ``(codes int8 [N, K], s_w float32 [1] or [N], widened)``.

    Two launches per tensor (the ``|W|`` partial sums, then the codes, whose programs reduce the partials to
    ``s_w`` themselves), two per row scale. ``widen``: also write ``codes / s_w`` in this dtype in the codes pass
    (:func:`bittern.quant.dequantize_weight`'s value, what the backward's ``grad_x`` product reads), or None.
    """
    w = _contiguous_detached(weight)
    if per_channel or not w.numel():
        scale = weight_scale(w, per_channel)
        codes, w_hat = _launch_codes(w, scale, per_channel, None, widen)
    else:
        scale = torch.empty(1, dtype=torch.float32, device=w.device)
        codes, w_hat = _launch_codes(w, scale, False, _abs_sum_partials(w), widen)
    return codes, scale, w_hat
