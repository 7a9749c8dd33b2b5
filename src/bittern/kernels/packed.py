"""Triton inference kernels over packed 2-bit ternary weights: a skinny GEMM for decoding and a prefill GEMM.

**Layout.** The kernels read the Hugging Face ``bitnet`` layout itself (:mod:`bittern.packing`): uint8
``[R, K]`` with ``R = ceil(N / 4)``, byte row ``r`` holding output rows ``r, r+R, r+2R, r+3R`` in its four
2-bit fields (``code + 1``). One program takes a block of byte rows and produces all four row quarters of it,
so every weight byte is read from memory once, K-contiguous loads stay vectorised, and no second copy of the
weights in another layout is needed (no conversion at load time, no extra memory). Each field is widened on
chip to an unsigned int8 ``c = code + 1`` in {0, 1, 2}; since ``sum_k xq_k (c_k - 1) = sum_k xq_k c_k -
sum_k xq_k``, the ``- 1`` is applied once per output as a row sum of the activations instead of per weight.

* :func:`skinny_linear` (decode, ``M <= SKINNY_MAX_M`` tokens): the per-token int8 activation quantization
  is fused in (each program reads the few activation rows whole to find their absmax, then quantizes tile by
  tile as it multiplies), int8 tensor-core products with int32 accumulation, and the reduction over ``K`` is
  optionally split across programs (``SPLIT``) so that narrow layers still fill the GPU. Split partial sums are
  added into an int32 workspace with atomics (exact, so order-independent); the last program of a tile — found
  with an atomic counter — applies the epilogue and leaves the workspace and counter at zero again, so one
  launch does everything and the kernel can be captured in a CUDA graph.
* :func:`prefill_linear` (``M > SKINNY_MAX_M``): activations quantized by
  :func:`bittern.kernels.quantizers.quantize_activations`, then a tiled int8 GEMM with the weights widened on
  chip.

Both end with the reference's epilogue, ``acc * s * a / 127 (+ bias)`` in float32 with an IEEE division, so the
output equals :func:`bittern.quant.integer_linear` bit for bit. Tile shapes (and ``SPLIT``) are autotuned per
(M rounded up to a power of two, N, K). Import through :mod:`bittern.kernels` (lazily).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from bittern import packing, quant
from bittern.kernels import interpreter, quantizers
from bittern.kernels.matmul import _grouped_tile
from bittern.kernels.quantizers import _round_half_even

SKINNY_MAX_M = 16
"""Token counts up to this use the decode kernel (one 16-row tensor-core tile, activations quantized inside)."""

_SKINNY_BM = 16


def _autotune_limited() -> bool:
    return os.environ.get("BITTERN_AUTOTUNE", "1") == "0"


def _skinny_configs() -> list[triton.Config]:
    """Candidates ``(BR byte rows, BK, SPLIT, warps, stages)``; the first is the one kept without autotuning."""
    if interpreter.ON_IMPORT:
        return [triton.Config({"BR": 16, "BK": 32, "SPLIT": 1}, num_warps=4, num_stages=1)]
    shapes = [
        (16, 256, 1, 4, 3),
        (32, 256, 1, 4, 3),
        (64, 256, 1, 4, 3),
        (16, 256, 4, 4, 3),
        (32, 256, 2, 4, 3),
        (32, 512, 4, 4, 3),
        (16, 512, 8, 4, 2),
        (64, 512, 2, 8, 3),
    ]
    if _autotune_limited():
        shapes = shapes[:1]
    return [triton.Config({"BR": br, "BK": bk, "SPLIT": sp}, num_warps=w, num_stages=s) for br, bk, sp, w, s in shapes]


def _prefill_configs() -> list[triton.Config]:
    """Candidates ``(BM, BR byte rows, BK, warps, stages)``: a tile covers ``BM`` tokens x ``4 * BR`` outputs."""
    if interpreter.ON_IMPORT:
        return [triton.Config({"BM": 32, "BR": 16, "BK": 32, "GROUP": 4}, num_warps=4, num_stages=1)]
    shapes = [
        (128, 32, 128, 8, 3),
        (128, 64, 128, 8, 3),
        (64, 32, 128, 4, 4),
        (128, 16, 128, 4, 4),
        (64, 64, 64, 4, 4),
    ]
    if _autotune_limited():
        shapes = shapes[:1]
    return [
        triton.Config({"BM": bm, "BR": br, "BK": bk, "GROUP": 8}, num_warps=w, num_stages=s)
        for bm, br, bk, w, s in shapes
    ]


@triton.jit
def _field(packed_bytes, Q: tl.constexpr):
    """The ``Q``-th 2-bit field of each byte as int8 ``code + 1`` in {0, 1, 2}."""
    return ((packed_bytes >> (2 * Q)) & 3).to(tl.int8)


@triton.jit
def _epilogue(acc, act_scale, rm, n, m_ok, n_ok, s_ptr, bias_ptr, y_ptr, stride_ym,
              HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr):  # fmt: skip
    """``y = acc * s * a / 127 (+ bias)`` in the reference's float32 order, stored for the valid rows/columns."""
    y = acc.to(tl.float32)
    if PER_CHANNEL:
        y = y * tl.load(s_ptr + n, mask=n_ok, other=1.0)[None, :]
    else:
        y = y * tl.load(s_ptr)
    y = y * act_scale[:, None]
    y = tl.math.div_rn(y, tl.full(y.shape, 127.0, tl.float32))
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + n[None, :]
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["M", "N", "K", "R"])
def _skinny_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, y_ptr, ws_ptr, count_ptr,
    M, N, K, R, M_BUCKET, stride_xm, stride_wr, stride_ym,
    EPS: tl.constexpr, HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr,
    BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BM)
    m_ok = rm < M
    rk = tl.arange(0, BK)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm

    # 1. the tokens' absmax over the whole row (the few rows are read from L2 by every program)
    amax = tl.zeros([BM], dtype=tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + rk
        x = tl.load(x_rows + cols[None, :], mask=m_ok[:, None] & (cols[None, :] < K), other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    amax = tl.maximum(amax, EPS)

    # 2. this program's share of the reduction: K tiles [first, last)
    k_tiles = tl.cdiv(K, BK)
    per_split = tl.cdiv(k_tiles, SPLIT)
    first = pid_k * per_split
    last = tl.minimum(first + per_split, k_tiles)

    rr = pid_r * BR + tl.arange(0, BR)
    r_ok = rr < R
    w_rows = w_ptr + rr.to(tl.int64)[:, None] * stride_wr
    acc0 = tl.zeros([BM, BR], dtype=tl.int32)
    acc1 = tl.zeros([BM, BR], dtype=tl.int32)
    acc2 = tl.zeros([BM, BR], dtype=tl.int32)
    acc3 = tl.zeros([BM, BR], dtype=tl.int32)
    row_sum = tl.zeros([BM], dtype=tl.int32)
    for t in range(first, last):
        cols = t * BK + rk
        k_ok = cols < K
        x = tl.load(x_rows + cols[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        q = _round_half_even(tl.math.div_rn(x * 127.0, amax[:, None]))
        xq = tl.minimum(tl.maximum(q, -128.0), 127.0).to(tl.int8)
        row_sum += tl.sum(xq.to(tl.int32), axis=1)
        b = tl.load(w_rows + cols[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0)
        acc0 = tl.dot(xq, tl.trans(_field(b, 0)), acc0, out_dtype=tl.int32)
        acc1 = tl.dot(xq, tl.trans(_field(b, 1)), acc1, out_dtype=tl.int32)
        acc2 = tl.dot(xq, tl.trans(_field(b, 2)), acc2, out_dtype=tl.int32)
        acc3 = tl.dot(xq, tl.trans(_field(b, 3)), acc3, out_dtype=tl.int32)
    acc0 -= row_sum[:, None]
    acc1 -= row_sum[:, None]
    acc2 -= row_sum[:, None]
    acc3 -= row_sum[:, None]

    n0 = rr
    n1 = rr + R
    n2 = rr + 2 * R
    n3 = rr + 3 * R
    ok0 = r_ok & (n0 < N)
    ok1 = r_ok & (n1 < N)
    ok2 = r_ok & (n2 < N)
    ok3 = r_ok & (n3 < N)
    if SPLIT == 1:
        _epilogue(acc0, amax, rm, n0, m_ok, ok0, s_ptr, bias_ptr, y_ptr, stride_ym, HAS_BIAS, PER_CHANNEL)
        _epilogue(acc1, amax, rm, n1, m_ok, ok1, s_ptr, bias_ptr, y_ptr, stride_ym, HAS_BIAS, PER_CHANNEL)
        _epilogue(acc2, amax, rm, n2, m_ok, ok2, s_ptr, bias_ptr, y_ptr, stride_ym, HAS_BIAS, PER_CHANNEL)
        _epilogue(acc3, amax, rm, n3, m_ok, ok3, s_ptr, bias_ptr, y_ptr, stride_ym, HAS_BIAS, PER_CHANNEL)
    else:
        # exact int32 partial sums meet in the workspace; the last split to arrive finishes the tile
        p0 = ws_ptr + rm[:, None] * N + n0[None, :]
        p1 = ws_ptr + rm[:, None] * N + n1[None, :]
        p2 = ws_ptr + rm[:, None] * N + n2[None, :]
        p3 = ws_ptr + rm[:, None] * N + n3[None, :]
        tl.atomic_add(p0, acc0, mask=m_ok[:, None] & ok0[None, :])
        tl.atomic_add(p1, acc1, mask=m_ok[:, None] & ok1[None, :])
        tl.atomic_add(p2, acc2, mask=m_ok[:, None] & ok2[None, :])
        tl.atomic_add(p3, acc3, mask=m_ok[:, None] & ok3[None, :])
        tl.debug_barrier()  # every thread's partial sums are issued before the tile's counter moves
        arrived = tl.atomic_add(count_ptr + pid_r, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            zero = tl.zeros([BM, BR], dtype=tl.int32)
            acc0 = tl.atomic_xchg(p0, zero, mask=m_ok[:, None] & ok0[None, :])
            acc1 = tl.atomic_xchg(p1, zero, mask=m_ok[:, None] & ok1[None, :])
            acc2 = tl.atomic_xchg(p2, zero, mask=m_ok[:, None] & ok2[None, :])
            acc3 = tl.atomic_xchg(p3, zero, mask=m_ok[:, None] & ok3[None, :])
            _epilogue(acc0, amax, rm, n0, m_ok, ok0, s_ptr, bias_ptr, y_ptr, stride_ym, HAS_BIAS, PER_CHANNEL)
            _epilogue(acc1, amax, rm, n1, m_ok, ok1, s_ptr, bias_ptr, y_ptr, stride_ym, HAS_BIAS, PER_CHANNEL)
            _epilogue(acc2, amax, rm, n2, m_ok, ok2, s_ptr, bias_ptr, y_ptr, stride_ym, HAS_BIAS, PER_CHANNEL)
            _epilogue(acc3, amax, rm, n3, m_ok, ok3, s_ptr, bias_ptr, y_ptr, stride_ym, HAS_BIAS, PER_CHANNEL)
            tl.atomic_xchg(count_ptr + pid_r, 0)  # ready for the next launch


_skinny_tuned = triton.autotune(configs=_skinny_configs(), key=["M_BUCKET", "N", "K"])(_skinny_kernel)


@triton.jit(do_not_specialize=["M", "N", "K", "R"])
def _prefill_kernel(
    xq_ptr, a_ptr, w_ptr, s_ptr, bias_ptr, y_ptr,
    M, N, K, R, M_BUCKET, stride_xm, stride_wr, stride_ym,
    HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr,
    BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    tile_m, tile_r = _grouped_tile(tl.program_id(0), M, R, BM, BR, GROUP)
    rm = tile_m * BM + tl.arange(0, BM)
    rr = tile_r * BR + tl.arange(0, BR)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    r_ok = rr < R
    a_rows = xq_ptr + (rm % M).to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + (rr % R).to(tl.int64)[:, None] * stride_wr
    acc0 = tl.zeros([BM, BR], dtype=tl.int32)
    acc1 = tl.zeros([BM, BR], dtype=tl.int32)
    acc2 = tl.zeros([BM, BR], dtype=tl.int32)
    acc3 = tl.zeros([BM, BR], dtype=tl.int32)
    row_sum = tl.zeros([BM], dtype=tl.int32)
    for k0 in range(0, tl.cdiv(K, BK)):
        cols = k0 * BK + rk
        k_ok = cols[None, :] < K
        xq = tl.load(a_rows + cols[None, :], mask=k_ok, other=0)
        b = tl.load(w_rows + cols[None, :], mask=k_ok, other=0)
        row_sum += tl.sum(xq.to(tl.int32), axis=1)
        acc0 = tl.dot(xq, tl.trans(_field(b, 0)), acc0, out_dtype=tl.int32)
        acc1 = tl.dot(xq, tl.trans(_field(b, 1)), acc1, out_dtype=tl.int32)
        acc2 = tl.dot(xq, tl.trans(_field(b, 2)), acc2, out_dtype=tl.int32)
        acc3 = tl.dot(xq, tl.trans(_field(b, 3)), acc3, out_dtype=tl.int32)
    act_scale = tl.load(a_ptr + rm % M)
    _epilogue(acc0 - row_sum[:, None], act_scale, rm, rr, m_ok, r_ok & (rr < N),
              s_ptr, bias_ptr, y_ptr, stride_ym, HAS_BIAS, PER_CHANNEL)  # fmt: skip
    _epilogue(acc1 - row_sum[:, None], act_scale, rm, rr + R, m_ok, r_ok & (rr + R < N),
              s_ptr, bias_ptr, y_ptr, stride_ym, HAS_BIAS, PER_CHANNEL)  # fmt: skip
    _epilogue(acc2 - row_sum[:, None], act_scale, rm, rr + 2 * R, m_ok, r_ok & (rr + 2 * R < N),
              s_ptr, bias_ptr, y_ptr, stride_ym, HAS_BIAS, PER_CHANNEL)  # fmt: skip
    _epilogue(acc3 - row_sum[:, None], act_scale, rm, rr + 3 * R, m_ok, r_ok & (rr + 3 * R < N),
              s_ptr, bias_ptr, y_ptr, stride_ym, HAS_BIAS, PER_CHANNEL)  # fmt: skip


_prefill_tuned = triton.autotune(configs=_prefill_configs(), key=["M_BUCKET", "N", "K"])(_prefill_kernel)

_workspaces: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _split_workspace(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The zeroed int32 partial-sum workspace ``[16 * N]`` and tile counters of the split decode kernel.

    Kept per (device, N) for the life of the process: the kernel leaves both at zero after every launch, so
    layers of the same width share them (launches on one stream run one after another). The first call
    allocates: make it before capturing a CUDA graph (a warm-up call does).
    """
    key = (device, n)
    if key not in _workspaces:
        rows = packing.packed_rows(n)
        _workspaces[key] = (
            torch.zeros(_SKINNY_BM * n, dtype=torch.int32, device=device),
            torch.zeros(triton.cdiv(rows, 16), dtype=torch.int32, device=device),
        )
    return _workspaces[key]


def _check(x: torch.Tensor, packed: torch.Tensor, out_features: int, scale: torch.Tensor) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed weight must be uint8 [ceil(N/4), K], got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[0] != packing.packed_rows(out_features):
        raise ValueError(f"packed weight has {packed.shape[0]} byte rows; {out_features} outputs need "
                         f"{packing.packed_rows(out_features)}")  # fmt: skip
    if x.shape[-1] != packed.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features but the packed weight has {packed.shape[1]}")
    if scale.numel() not in (1, out_features):
        raise ValueError(f"weight scale has {scale.numel()} values; expected 1 or {out_features}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, last]`` with a contiguous last dimension (copied only if needed)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def skinny_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    out_features: int,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Decode product for at most :data:`SKINNY_MAX_M` tokens, activation quantization fused in.

    Args:
        x: ``[..., K]`` float32 / bfloat16 / float16 with at most 16 tokens.
        packed: uint8 ``[ceil(N/4), K]`` in the Hugging Face layout; ``out_features``: ``N``.
        scale: float32 ``[1]`` or ``[N]`` (the codes' multiplier ``s``); bias: ``[N]`` or None.
        out_dtype: dtype of the result.
        config: a fixed tile choice (``BR``, ``BK``, ``SPLIT``, optional ``num_warps``) instead of autotuning;
            for tests.

    Returns:
        ``[..., N]`` in ``out_dtype``, equal to :func:`bittern.quant.integer_linear` bit for bit.
    """
    _check(x, packed, out_features, scale)
    packed = _rows(packed)
    x2 = _rows(x)
    m, k = x2.shape
    if m > SKINNY_MAX_M:
        raise ValueError(f"skinny_linear takes at most {SKINNY_MAX_M} tokens, got {m}")
    n = out_features
    rows = packed.shape[0]
    y = torch.empty((m, n), dtype=interpreter.store_dtype(out_dtype), device=x.device)
    if m and n:
        ws, counters = _split_workspace(x.device, n)
        args = (
            x2, packed, scale, bias if bias is not None else scale, y, ws, counters,
            m, n, k, rows, triton.next_power_of_2(m), x2.stride(0), packed.stride(0), y.stride(0),
        )  # fmt: skip
        flags = dict(EPS=quant.EPS, HAS_BIAS=bias is not None, PER_CHANNEL=scale.numel() != 1, BM=_SKINNY_BM)
        if config is None:
            _skinny_tuned[lambda meta: (triton.cdiv(rows, meta["BR"]), meta["SPLIT"])](*args, **flags)
        else:
            chosen = dict(config)
            warps = chosen.pop("num_warps", 4)
            grid = (triton.cdiv(rows, chosen["BR"]), chosen["SPLIT"])
            _skinny_kernel[grid](*args, **flags, **chosen, num_warps=warps)
    return y.to(out_dtype).reshape(*x.shape[:-1], n)


def prefill_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    out_features: int,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Prompt-sized product: activations quantized per token, then an int8 GEMM over the packed weights.

    Shapes and result as :func:`skinny_linear`, for any number of tokens.
    """
    _check(x, packed, out_features, scale)
    packed = _rows(packed)
    xq, act_scale = quantizers.quantize_activations(x)
    x2 = _rows(xq)
    m, k = x2.shape
    n = out_features
    rows = packed.shape[0]
    y = torch.empty((m, n), dtype=interpreter.store_dtype(out_dtype), device=x.device)
    if m and n:
        grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(rows, meta["BR"]),)  # noqa: E731
        _prefill_tuned[grid](
            x2, act_scale.reshape(-1).contiguous(), packed, scale, bias if bias is not None else scale, y,
            m, n, k, rows, triton.next_power_of_2(m), x2.stride(0), packed.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, PER_CHANNEL=scale.numel() != 1,
        )  # fmt: skip
    return y.to(out_dtype).reshape(*x.shape[:-1], n)


def packed_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    out_features: int,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The inference linear over packed weights: :func:`skinny_linear` for up to 16 tokens, else
    :func:`prefill_linear`. ``[..., K]`` → ``[..., N]`` in ``out_dtype``, bit-identical to the reference."""
    tokens = x.numel() // max(x.shape[-1], 1)
    if tokens <= SKINNY_MAX_M:
        return skinny_linear(x, packed, out_features, scale, bias, out_dtype)
    return prefill_linear(x, packed, out_features, scale, bias, out_dtype)
