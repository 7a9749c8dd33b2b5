"""Triton matrix products of the ternary linear layer: the int8 forward and the two backward products.

* :func:`int8_ternary_linear` — ``y = (xq @ Wtᵀ) / (s_w * s_x) + b``: int8 x int8 operands on the int8 tensor
  cores with int32 accumulation (exact), the rescale and bias fused into the epilogue in the reference's
  order of float32 operations, so ``y`` equals :func:`bittern.quant.integer_linear` bit for bit.
* :func:`grad_input` — ``grad_x = grad_y @ (Wt / s_w)``: ternary codes widened to the gradient's dtype on chip
  (exact: they are -1, 0, 1), float32 accumulation, divided by ``s_w`` in the epilogue (per-tensor scale) or
  the codes divided by it (per-row scale, which varies along the reduction). No dense copy of the weight is made.
* :func:`grad_weight` — ``grad_W = grad_yᵀ @ (xq / s_x)``, computed as ``(grad_y * (1 / s_x))ᵀ @ xq``: the
  per-token scale is folded into the gradient tile as it is loaded, ``xq`` widened on chip (exact: int8
  values fit bf16's 8-bit significand), float32 accumulation. No dequantized copy of the activations is made.

Tile shapes are autotuned per (N, K, M rounded up to a power of two) on a GPU, tuned for Hopper; under
``TRITON_INTERPRET=1`` one small tile shape is used. Import through :mod:`bittern.kernels` (lazily).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from bittern.kernels import interpreter, tuning
from bittern.kernels.quantizers import reciprocal, rescale

# Triton 3.9's interpreter computes bf16 x bf16 dots (and int8 -> bf16 casts) wrongly: there the backward kernels
# widen both operands to float32 after rounding them to the gradient's dtype, which leaves the products unchanged.
_UPCAST_DOTS = interpreter.ON_IMPORT
_store_dtype = interpreter.store_dtype


def _configs(shapes: list[tuple[int, int, int, int, int]], names: tuple[str, str, str]) -> list[triton.Config]:
    """Autotuning candidates ``(block0, block1, block_reduce, warps, stages)`` named for a kernel's blocks.

    ``BITTERN_AUTOTUNE=0`` keeps only the first (for test suites, where tuning every shape costs minutes)."""
    if interpreter.ON_IMPORT:
        return [triton.Config({names[0]: 32, names[1]: 32, names[2]: 32, "GROUP": 4}, num_warps=4, num_stages=1)]
    if os.environ.get("BITTERN_AUTOTUNE", "1") == "0":
        shapes = shapes[:1]
    return [
        triton.Config({names[0]: b0, names[1]: b1, names[2]: br, "GROUP": 8}, num_warps=w, num_stages=s)
        for b0, b1, br, w, s in shapes
    ]


# On Hopper: 128 x 128 tiles are the fastest from 4096 tokens; 64 x 64 ones from 128 to 512 tokens, where larger
# tiles leave most processors idle (20 programs for a 2560 x 2560 layer at 128 tokens)
_FORWARD_SHAPES = [
    (128, 128, 128, 8, 3),
    (128, 256, 128, 8, 3),
    (64, 128, 128, 4, 4),
    (128, 64, 128, 4, 4),
    (64, 64, 128, 4, 4),
    (64, 64, 256, 4, 3),
]
_BACKWARD_SHAPES = [
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
]


@triton.jit
def _grouped_tile(pid, size0, size1, BLOCK0: tl.constexpr, BLOCK1: tl.constexpr, GROUP: tl.constexpr):
    """Program id → (tile row, tile column), in groups of GROUP tile rows so that neighbours share L2 data."""
    tiles0 = tl.cdiv(size0, BLOCK0)
    tiles1 = tl.cdiv(size1, BLOCK1)
    per_group = GROUP * tiles1
    group = pid // per_group
    first = group * GROUP
    group_size = min(tiles0 - first, GROUP)
    tile0 = first + (pid % per_group) % group_size
    tile1 = (pid % per_group) // group_size
    return tile0, tile1


@triton.jit
def _int8_tile(
    xq_ptr, codes_ptr, M, N, K, stride_xm, stride_cn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    """This program's tile of the product: its token rows ``rm`` ``[BM]``, code rows ``rn`` ``[BN]`` and the int32
    ``[BM, BN]`` sums of ``xq[rm] · codes[rn]`` over all of ``K`` (rows past the end read a valid row; their results
    are masked at the store)."""
    tile_m, tile_n = _grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP)
    rm = tile_m * BM + tl.arange(0, BM)
    rn = tile_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_rows = xq_ptr + (rm % M).to(tl.int64)[:, None] * stride_xm
    b_rows = codes_ptr + (rn % N).to(tl.int64)[:, None] * stride_cn
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, tl.cdiv(K, BK)):
        cols = k0 * BK + rk
        if EVEN_K:
            a = tl.load(a_rows + cols[None, :])
            b = tl.load(b_rows + cols[None, :])
        else:
            a = tl.load(a_rows + cols[None, :], mask=cols[None, :] < K, other=0)
            b = tl.load(b_rows + cols[None, :], mask=cols[None, :] < K, other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
    return rm, rn, acc


@tuning.autotune(_configs(_FORWARD_SHAPES, ("BM", "BN", "BK")), key=["M_BUCKET", "N", "K"])
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BK"] == 0})
@triton.jit
def _forward_kernel(
    xq_ptr, codes_ptr, a_ptr, s_ptr, bias_ptr, y_ptr, M, N, K, M_BUCKET, stride_xm, stride_cn, stride_ym,
    HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    rm, rn, acc = _int8_tile(xq_ptr, codes_ptr, M, N, K, stride_xm, stride_cn, BM, BN, BK, GROUP, EVEN_K)
    # epilogue in the reference's order: acc / (s_w * s_x) (+ bias), float32, the division rounded as IEEE's
    act_scale = tl.load(a_ptr + rm % M)[:, None]
    if PER_CHANNEL:
        y = rescale(acc, tl.load(s_ptr + rn % N)[None, :], act_scale)
    else:
        y = rescale(acc, tl.load(s_ptr), act_scale)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn % N).to(tl.float32)[None, :]
    out = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@tuning.autotune(_configs(_FORWARD_SHAPES, ("BM", "BN", "BK")), key=["M_BUCKET", "N", "K"])
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BK"] == 0})
@triton.jit
def _forward_group_kernel(
    xq_ptr, codes_ptr, a_ptr, s0_ptr, y0_ptr, s1_ptr, y1_ptr, s2_ptr, y2_ptr, M, N, N0, N1, K, M_BUCKET,
    stride_xm, stride_cn, PER_CHANNEL: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    # two or three bias-free layers of one input, their codes one above the other ([N0 + N1 + N2, K]): one product,
    # whose epilogue gives each column its layer's scale and output (a tile may span two layers)
    rm, rn, acc = _int8_tile(xq_ptr, codes_ptr, M, N, K, stride_xm, stride_cn, BM, BN, BK, GROUP, EVEN_K)
    first = rn < N0
    second = (rn >= N0) & (rn < N0 + N1)
    col = tl.where(first, rn, tl.where(second, rn - N0, rn - N0 - N1))  # the column within its layer
    width = tl.where(first, N0, tl.where(second, N1, N - N0 - N1))
    if PER_CHANNEL:
        s = tl.load(tl.where(first, s0_ptr + col, tl.where(second, s1_ptr + col, s2_ptr + col)), mask=rn < N,
                    other=1.0)  # fmt: skip
    else:
        s = tl.where(first, tl.load(s0_ptr), tl.where(second, tl.load(s1_ptr), tl.load(s2_ptr)))
    y = rescale(acc, s[None, :], tl.load(a_ptr + rm % M)[:, None])
    rows = rm.to(tl.int64)[:, None] * width[None, :]
    out = tl.where(first, y0_ptr + col, tl.where(second, y1_ptr + col, y2_ptr + col))[None, :] + rows
    tl.store(out, y.to(y0_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@tuning.autotune(_configs(_BACKWARD_SHAPES, ("BM", "BK", "BN")), key=["M_BUCKET", "N", "K"])
@triton.jit
def _grad_input_kernel(
    g_ptr, codes_ptr, s_ptr, gx_ptr, M, N, K, M_BUCKET, stride_gm, stride_cn, stride_xm,
    PER_CHANNEL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    tile_m, tile_k = _grouped_tile(tl.program_id(0), M, K, BM, BK, GROUP)
    rm = tile_m * BM + tl.arange(0, BM)
    rk = tile_k * BK + tl.arange(0, BK)
    rn = tl.arange(0, BN)
    g_rows = g_ptr + (rm % M).to(tl.int64)[:, None] * stride_gm
    k_cols = (rk % K)[None, :]
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n0 in range(0, tl.cdiv(N, BN)):
        n = n0 * BN + rn
        n_ok = n < N
        g = tl.load(g_rows + n[None, :], mask=n_ok[None, :], other=0.0)
        codes = tl.load(codes_ptr + n.to(tl.int64)[:, None] * stride_cn + k_cols, mask=n_ok[:, None], other=0)
        if PER_CHANNEL:  # the scale varies along the reduction: apply it to the codes
            w = tl.math.div_rn(codes.to(tl.float32), tl.load(s_ptr + n, mask=n_ok, other=1.0)[:, None]).to(g.dtype)
        else:
            w = codes.to(tl.float32).to(g.dtype)
        if UPCAST:
            g = g.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(g, w, acc, input_precision=PRECISION)
    if not PER_CHANNEL:
        acc = tl.math.div_rn(acc, tl.load(s_ptr))
    out = gx_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :]
    tl.store(out, acc.to(gx_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rk[None, :] < K))


@tuning.autotune(_configs(_BACKWARD_SHAPES, ("BN", "BK", "BM")), key=["M_BUCKET", "N", "K"])
@triton.jit
def _grad_weight_kernel(
    g_ptr, xq_ptr, a_ptr, gw_ptr, M, N, K, M_BUCKET, stride_gm, stride_xm, stride_wn,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    tile_n, tile_k = _grouped_tile(tl.program_id(0), N, K, BN, BK, GROUP)
    rn = tile_n * BN + tl.arange(0, BN)
    rk = tile_k * BK + tl.arange(0, BK)
    rm = tl.arange(0, BM)
    n_cols = (rn % N)[:, None]
    k_cols = (rk % K)[None, :]
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for m0 in range(0, tl.cdiv(M, BM)):
        m = m0 * BM + rm
        m_ok = m < M
        m_rows = m.to(tl.int64)
        g_t = tl.load(g_ptr + m_rows[None, :] * stride_gm + n_cols, mask=m_ok[None, :], other=0.0)  # [BN, BM]
        inv_scale = reciprocal(tl.load(a_ptr + m, mask=m_ok, other=1.0))
        g_t = (g_t.to(tl.float32) * inv_scale[None, :]).to(g_ptr.dtype.element_ty)
        xq = tl.load(xq_ptr + m_rows[:, None] * stride_xm + k_cols, mask=m_ok[:, None], other=0)  # [BM, BK]
        if UPCAST:
            acc = tl.dot(g_t.to(tl.float32), xq.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(g_t, xq.to(tl.float32).to(g_t.dtype), acc, input_precision=PRECISION)
    out = gw_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    tl.store(out, acc.to(gw_ptr.dtype.element_ty), mask=(rn[:, None] < N) & (rk[None, :] < K))


def _float32_precision() -> str:
    """How a float32 gradient is multiplied: on TF32 tensor cores only where torch's own float32 matmuls are
    (``torch.backends.cuda.matmul.allow_tf32``), else exactly. bf16 gradients always use bf16 tensor cores."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D ``[rows, last]`` view whose last dimension is contiguous (copied only if needed)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _bucket(m: int) -> int:
    return triton.next_power_of_2(max(m, 1))


def _grid(size0: int, size1: int, block0: str, block1: str):
    return lambda meta: (triton.cdiv(size0, meta[block0]) * triton.cdiv(size1, meta[block1]),)


def int8_ternary_linear(
    xq: torch.Tensor,
    act_scale: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``(xq @ codesᵀ) / (s_w * s_x) + bias`` — bit-identical to the reference's integer linear.

    Args:
        xq: int8 ``[..., K]``; act_scale: float32 ``[..., 1]``.
        codes: int8 ``[N, K]``; scale: float32 ``[1]`` or ``[N]``.
        bias: ``[N]`` or None. out_dtype: dtype of ``y``.

    Returns:
        ``[..., N]`` in ``out_dtype``.
    """
    a2 = _rows(xq)
    m, k = a2.shape
    n = codes.shape[0]
    y = torch.empty((m, n), dtype=_store_dtype(out_dtype), device=xq.device)
    if m and n:
        codes = codes if codes.stride(-1) == 1 else codes.contiguous()
        _forward_kernel[_grid(m, n, "BM", "BN")](
            a2, codes, act_scale.reshape(-1).contiguous(), scale, bias if bias is not None else scale, y,
            m, n, k, _bucket(m), a2.stride(0), codes.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, PER_CHANNEL=scale.numel() != 1,
        )  # fmt: skip
    return y.to(out_dtype).reshape(*xq.shape[:-1], n)


def int8_ternary_group(
    xq: torch.Tensor,
    act_scale: torch.Tensor,
    codes: torch.Tensor,
    out_features: list[int],
    scales: list[torch.Tensor],
    out_dtype: torch.dtype,
) -> list[torch.Tensor]:
    """:func:`int8_ternary_linear` of two or three bias-free layers of one input in one product: ``codes`` holds
    their codes one above the other, ``[N_0 + N_1 (+ N_2), K]``.

    Args:
        xq: int8 ``[..., K]``; act_scale: float32 ``[..., 1]``.
        codes: int8 ``[sum N_i, K]``; out_features: ``N_i`` per layer.
        scales: per layer, float32 ``[1]`` (all) or ``[N_i]`` (all).
        out_dtype: dtype of the results.

    Returns:
        One contiguous ``[..., N_i]`` per layer, each equal to that layer's :func:`int8_ternary_linear` bit for bit.
    """
    if not 2 <= len(out_features) <= 3 or len(scales) != len(out_features) or codes.shape[0] != sum(out_features):
        raise ValueError(f"int8_ternary_group takes 2 or 3 layers whose codes are stacked; got widths {out_features},"
                         f" {len(scales)} scales and codes {tuple(codes.shape)}")  # fmt: skip
    per_channel = {s.numel() != 1 for s in scales}
    if len(per_channel) != 1:
        raise ValueError("int8_ternary_group needs every layer's scale per tensor, or every layer's per row")
    a2 = _rows(xq)
    m, k = a2.shape
    n = codes.shape[0]
    ys = [torch.empty((m, width), dtype=_store_dtype(out_dtype), device=xq.device) for width in out_features]
    if m and n:
        codes = codes if codes.stride(-1) == 1 else codes.contiguous()
        third = 2 if len(ys) == 3 else 1  # a third layer of no columns: never selected
        _forward_group_kernel[_grid(m, n, "BM", "BN")](
            a2, codes, act_scale.reshape(-1).contiguous(), scales[0], ys[0], scales[1], ys[1], scales[third],
            ys[third], m, n, out_features[0], out_features[1], k, _bucket(m), a2.stride(0), codes.stride(0),
            PER_CHANNEL=per_channel.pop(),
        )  # fmt: skip
    return [y.to(out_dtype).reshape(*xq.shape[:-1], width) for y, width in zip(ys, out_features, strict=True)]


def grad_input(grad_y: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad_x = grad_y @ (codes / s_w)`` with float32 accumulation.

    Args:
        grad_y: ``[..., N]`` float32 / bfloat16 / float16 (the product runs in this dtype: bf16 tensor cores).
        codes: int8 ``[N, K]``; scale: float32 ``[1]`` or ``[N]``. dtype: dtype of ``grad_x``.

    Returns:
        ``[..., K]`` in ``dtype``.
    """
    g2 = _rows(grad_y)
    m, n = g2.shape
    k = codes.shape[1]
    gx = torch.empty((m, k), dtype=_store_dtype(dtype), device=grad_y.device)
    if m and k:
        _grad_input_kernel[_grid(m, k, "BM", "BK")](
            g2, codes, scale, gx, m, n, k, _bucket(m), g2.stride(0), codes.stride(0), gx.stride(0),
            PER_CHANNEL=scale.numel() != 1, UPCAST=_UPCAST_DOTS, PRECISION=_float32_precision(),
        )  # fmt: skip
    return gx.to(dtype).reshape(*grad_y.shape[:-1], k)


def grad_weight(grad_y: torch.Tensor, xq: torch.Tensor, act_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad_W = grad_yᵀ @ (xq / s_x)`` over all tokens, float32 accumulation.

    Args:
        grad_y: ``[..., N]``; xq: int8 ``[..., K]``; act_scale: float32 ``[..., 1]``. dtype: of ``grad_W``.

    Returns:
        ``[N, K]`` in ``dtype``.
    """
    g2 = _rows(grad_y)
    x2 = _rows(xq)
    m, n = g2.shape
    k = x2.shape[1]
    if m == 0:
        return torch.zeros((n, k), dtype=dtype, device=grad_y.device)
    gw = torch.empty((n, k), dtype=_store_dtype(dtype), device=grad_y.device)
    if n and k:
        _grad_weight_kernel[_grid(n, k, "BN", "BK")](
            g2, x2, act_scale.reshape(-1).contiguous(), gw, m, n, k, _bucket(m),
            g2.stride(0), x2.stride(0), gw.stride(0), UPCAST=_UPCAST_DOTS, PRECISION=_float32_precision(),
        )  # fmt: skip
    return gw.to(dtype)
