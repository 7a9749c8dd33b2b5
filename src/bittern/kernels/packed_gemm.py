"""The product of a few tokens (5–32: a batch of decode steps) with packed 2-bit ternary weights, on tensor cores.

Reads the Hugging Face ``bitnet`` layout in place (:mod:`bittern.packing`): uint8 ``[R, K]``, ``R = ceil(N / 4)``,
byte row ``r`` holding output rows ``r, r+R, r+2R, r+3R`` in its four 2-bit fields (``code + 1``). A program takes
``BR`` byte rows, all the tokens (``BM >= M``, padded) and one slice of ``K``: each step loads a ``[BR, BK]`` tile
of bytes and a ``[BM, BK]`` tile of int8 activations and makes four int8 tensor-core products, one per field
(``((byte >> 2q) & 3) - 1``, unpacked in registers), into four ``[BM, BR]`` int32 tiles.

**Split K.** With a few tokens the product is a read of the weights, and a launch with one program per block of
rows leaves most of the GPU idle while each program walks ``K`` (on an H100, 20 programs for a 2560 x 2560 layer,
each waiting on one load after another). Here every program takes only ``ITERS * BK`` of ``K``, so hundreds of
programs issue their loads at once. Each adds its int32 partial sums into a workspace with atomic adds — integer
sums are exact in any order, so the result stays bit-identical — then counts itself done on its tile's counter;
the last program of a tile reads the sums (swapping zeros in), runs the epilogue and resets the counter. The
workspace and counters are zero between launches, so the kernel needs no memset and can be captured in a CUDA
graph. Launches on one device must not run concurrently on two streams (they share the workspace). Under
programmatic dependent launch (:func:`bittern.kernels.packed.static_weights`, Hopper) a program loads its first
tile of weights, then waits for the kernel before it, before it reads the activations or touches the workspace.

The epilogue is the reference's, ``acc * s * a / 127 (+ bias)`` in float32 with an IEEE division, so the result
equals :func:`bittern.quant.integer_linear` bit for bit. Tiles are autotuned per (tokens, N, K).

Measured on an H100 before this design (BENCHMARKS.md): with one program per block of rows and the whole of
``K`` each, an on-chip unpacking product took 20–46 µs for a 16 x 2560 x 2560 layer, against 15 µs for unpacking
to int8 in one pass and an int8 GEMM, and 6 µs for bf16 cuBLAS.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from bittern.kernels import interpreter, tuning
from bittern.kernels.matmul import _rows

SKINNY_MAX_M = 32
"""The most tokens this kernel takes (one tile of tokens)."""

# (BR byte rows, BK, ITERS steps of BK per program, warps); the first is kept when BITTERN_AUTOTUNE=0
_TILES = [(16, 256, 1, 4), (32, 256, 1, 4), (16, 128, 2, 4), (32, 128, 2, 4), (16, 512, 1, 4), (64, 128, 1, 4)]

_WORKSPACE_INTS = 1 << 22
"""Initial workspace per device: int32 values (16 MiB), enough for three 2B4T-sized layers at 32 tokens."""


def _configs() -> list[triton.Config]:
    if interpreter.ON_IMPORT:
        return [triton.Config({"BR": 16, "BK": 32, "ITERS": 2}, num_warps=4, num_stages=1)]
    tiles = _TILES[:1] if os.environ.get("BITTERN_AUTOTUNE", "1") == "0" else _TILES
    return [triton.Config({"BR": br, "BK": bk, "ITERS": it}, num_warps=w, num_stages=2) for br, bk, it, w in tiles]


@triton.jit
def _codes(packed_bytes, Q: tl.constexpr):
    """Field ``Q`` of each byte as the int8 ternary code in {-1, 0, 1}."""
    return ((packed_bytes >> (2 * Q)) & 3).to(tl.int8) - 1


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


@triton.jit
def _finish(acc, ws, cell, rm, n, m_ok, n_ok, act_scale, s_ptr, bias_ptr, y_ptr, stride_ym, last,
            HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr):  # fmt: skip
    """If ``last``: the tile's whole sum (the workspace's, swapped for zeros, plus ``acc``) through
    :func:`_epilogue`."""
    if last:
        live = tl.broadcast_to(m_ok[:, None], acc.shape)
        total = tl.atomic_xchg(ws + cell, tl.zeros_like(acc), mask=live, sem="relaxed") + acc
        _epilogue(total, act_scale, rm, n, m_ok, n_ok, s_ptr, bias_ptr, y_ptr, stride_ym, HAS_BIAS, PER_CHANNEL)


@triton.jit
def _tile(
    xq_ptr, a_ptr, w_ptr, s_ptr, bias_ptr, y_ptr, ws_ptr, count_ptr, M, N, R, K, stride_xm, stride_wr, stride_ym,
    block, tile, split, SPLITS,
    HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
    ITERS: tl.constexpr, USE_GDC: tl.constexpr,
):  # fmt: skip
    """Byte rows ``[block * BR, +BR)`` of one layer, every token, ``K`` slice ``split``; ``tile`` indexes the
    workspace and counter across the launch's layers."""
    rr = block * BR + tl.arange(0, BR)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    w_rows = w_ptr + (rr % R).to(tl.int64)[:, None] * stride_wr  # rows past the end read a valid row, unstored
    x_rows = xq_ptr + rm.to(tl.int64)[:, None] * stride_xm
    acc0 = tl.zeros((BM, BR), dtype=tl.int32)
    acc1 = tl.zeros((BM, BR), dtype=tl.int32)
    acc2 = tl.zeros((BM, BR), dtype=tl.int32)
    acc3 = tl.zeros((BM, BR), dtype=tl.int32)
    # the first tile of weights depends on no earlier kernel: under programmatic dependent launch its load is in
    # flight while the kernel before this one finishes
    k_first = split * ITERS * BK + rk
    b_first = tl.load(w_rows + k_first[None, :], mask=k_first[None, :] < K, other=0)
    if USE_GDC:
        tl.extra.cuda.gdc_wait()  # the activations, the workspace and the output may be the previous kernel's
        tl.extra.cuda.gdc_launch_dependents()
    for i in tl.static_range(ITERS):
        k = (split * ITERS + i) * BK + rk
        k_ok = k < K
        if i == 0:
            b = b_first
        else:
            b = tl.load(w_rows + k[None, :], mask=k_ok[None, :], other=0)
        x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)  # zero: no product
        acc0 = tl.dot(x, tl.trans(_codes(b, 0)), acc0, out_dtype=tl.int32)
        acc1 = tl.dot(x, tl.trans(_codes(b, 1)), acc1, out_dtype=tl.int32)
        acc2 = tl.dot(x, tl.trans(_codes(b, 2)), acc2, out_dtype=tl.int32)
        acc3 = tl.dot(x, tl.trans(_codes(b, 3)), acc3, out_dtype=tl.int32)
    # the tile's four partial sums, [4, BM, BR] int32 per tile in the workspace
    ws = ws_ptr + tile.to(tl.int64) * (4 * BM * BR)
    cell = rm[:, None] * BR + tl.arange(0, BR)[None, :]
    last = split >= 0  # (true) a lone program finishes its own tile
    if SPLITS > 1:
        # only the real tokens' rows: the padding rows of the workspace stay zero, untouched
        live = tl.broadcast_to(m_ok[:, None], (BM, BR))
        tl.atomic_add(ws + cell, acc0, mask=live, sem="relaxed")
        tl.atomic_add(ws + BM * BR + cell, acc1, mask=live, sem="relaxed")
        tl.atomic_add(ws + 2 * BM * BR + cell, acc2, mask=live, sem="relaxed")
        tl.atomic_add(ws + 3 * BM * BR + cell, acc3, mask=live, sem="relaxed")
        # release our sums, acquire the others'; the last to arrive finishes the tile and resets its counter
        done = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        last = done == SPLITS - 1
        if last:
            tl.atomic_xchg(count_ptr + tile, 0, sem="relaxed")
        acc0 = tl.zeros_like(acc0)  # now in the workspace
        acc1 = tl.zeros_like(acc1)
        acc2 = tl.zeros_like(acc2)
        acc3 = tl.zeros_like(acc3)
    act_scale = tl.load(a_ptr + rm, mask=m_ok, other=1.0)
    r_ok = rr < R
    _finish(acc0, ws, cell, rm, rr, m_ok, r_ok & (rr < N), act_scale, s_ptr, bias_ptr, y_ptr, stride_ym, last,
            HAS_BIAS, PER_CHANNEL)  # fmt: skip
    _finish(acc1, ws + BM * BR, cell, rm, rr + R, m_ok, r_ok & (rr + R < N), act_scale, s_ptr, bias_ptr, y_ptr,
            stride_ym, last, HAS_BIAS, PER_CHANNEL)  # fmt: skip
    _finish(acc2, ws + 2 * BM * BR, cell, rm, rr + 2 * R, m_ok, r_ok & (rr + 2 * R < N), act_scale, s_ptr,
            bias_ptr, y_ptr, stride_ym, last, HAS_BIAS, PER_CHANNEL)  # fmt: skip
    _finish(acc3, ws + 3 * BM * BR, cell, rm, rr + 3 * R, m_ok, r_ok & (rr + 3 * R < N), act_scale, s_ptr,
            bias_ptr, y_ptr, stride_ym, last, HAS_BIAS, PER_CHANNEL)  # fmt: skip


@tuning.autotune(_configs(), key=["BM", "N0", "N1", "N2", "K"])
@triton.jit(do_not_specialize=["M", "R0", "R1", "R2"])
def _skinny_kernel(
    xq_ptr, a_ptr, w0_ptr, s0_ptr, b0_ptr, y0_ptr, w1_ptr, s1_ptr, y1_ptr, w2_ptr, s2_ptr, y2_ptr, ws_ptr, count_ptr,
    M, N0, R0, N1, R1, N2, R2, K, stride_xm, stride_wr,
    HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr, BM: tl.constexpr, USE_GDC: tl.constexpr,
    BR: tl.constexpr, BK: tl.constexpr, ITERS: tl.constexpr,
):  # fmt: skip
    # one to three layers of one input in one launch (q/k/v, gate/up): the first blocks of byte rows belong to
    # layer 0, the next to layer 1, the rest to layer 2 (only layer 0 may have a bias); axis 1 slices K
    block = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    blocks0 = tl.cdiv(R0, BR)
    blocks1 = tl.cdiv(R1, BR)
    if block < blocks0:
        _tile(xq_ptr, a_ptr, w0_ptr, s0_ptr, b0_ptr, y0_ptr, ws_ptr, count_ptr, M, N0, R0, K, stride_xm, stride_wr,
              N0, block, block, split, splits, HAS_BIAS, PER_CHANNEL, BM, BR, BK, ITERS, USE_GDC)  # fmt: skip
    elif block < blocks0 + blocks1:
        _tile(xq_ptr, a_ptr, w1_ptr, s1_ptr, s1_ptr, y1_ptr, ws_ptr, count_ptr, M, N1, R1, K, stride_xm, stride_wr,
              N1, block - blocks0, block, split, splits, False, PER_CHANNEL, BM, BR, BK, ITERS, USE_GDC)  # fmt: skip
    else:
        _tile(xq_ptr, a_ptr, w2_ptr, s2_ptr, s2_ptr, y2_ptr, ws_ptr, count_ptr, M, N2, R2, K, stride_xm, stride_wr,
              N2, block - blocks0 - blocks1, block, split, splits, False, PER_CHANNEL, BM, BR, BK, ITERS,
              USE_GDC)  # fmt: skip


_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, ints: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The device's zeroed int32 workspace (at least ``ints`` values) and tile counters (at least ``tiles``).

    Kept for the process's life and left zeroed by every launch; grown (reallocated) only when a launch needs more,
    which the first call of a shape does before any CUDA-graph capture."""
    held = _workspaces.get(device)
    if held is None or held[0].numel() < ints or held[1].numel() < tiles:
        size = max(ints, _WORKSPACE_INTS, 0 if held is None else held[0].numel())
        counters = max(tiles, 1 << 14, 0 if held is None else held[1].numel())
        if torch.cuda.is_available() and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the packed skinny product needs a larger workspace during CUDA-graph capture; "
                               "run the step once before capturing it")  # fmt: skip
        held = (torch.zeros(size, dtype=torch.int32, device=device), torch.zeros(counters, dtype=torch.int32,
                                                                                 device=device))  # fmt: skip
        _workspaces[device] = held
    return held


def skinny_gemm(
    xq: torch.Tensor,
    act_scale: torch.Tensor,
    packed: list[torch.Tensor],
    out_features: list[int],
    scales: list[torch.Tensor],
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    dependent_launch: bool = False,
) -> list[torch.Tensor]:
    """``(xq @ codes_iᵀ) * s_i * a / 127 (+ bias)`` for one to three layers of the same int8 input, one launch.

    Args:
        xq: int8 ``[..., K]`` with at most :data:`SKINNY_MAX_M` tokens; act_scale: float32 ``[..., 1]`` (from
            :func:`bittern.kernels.quantizers.quantize_activations`).
        packed: per layer, uint8 ``[ceil(N_i / 4), K]`` in the Hugging Face layout.
        out_features: per layer, ``N_i``. scales: per layer, float32 ``[1]`` or ``[N_i]``; all per tensor or all
            per row.
        bias: ``[N_0]`` for the first layer, or None (only a single layer may have one).
        out_dtype: dtype of the results.
        dependent_launch: launch with programmatic dependent launch (Hopper; the caller promises that no queued
            kernel writes the packed weights, see :func:`bittern.kernels.packed.static_weights`): the first tile of
            weights is loaded while the kernel before finishes.

    Returns:
        One ``[..., N_i]`` tensor per layer in ``out_dtype``, equal to :func:`bittern.quant.integer_linear` of that
        layer's codes bit for bit. The caller checks shapes (:mod:`bittern.kernels.packed`).
    """
    x2 = _rows(xq)
    m, k = x2.shape
    if m > SKINNY_MAX_M:
        raise ValueError(f"skinny_gemm takes at most {SKINNY_MAX_M} tokens, got {m}")
    count = len(packed)
    words = [_rows(w) for w in packed]
    rows = [w.shape[0] for w in words]
    ys = [torch.empty((m, n), dtype=interpreter.store_dtype(out_dtype), device=xq.device) for n in out_features]
    widths = list(out_features)
    while len(words) < 3:  # absent layers have no rows: their programs are never launched
        words.append(words[0])
        scales = [*scales, scales[0]]
        ys.append(ys[0])
        widths.append(0)
        rows.append(0)
    if m and k and sum(rows):
        bm = max(16, triton.next_power_of_2(m))
        widest = max(br for br, *_ in _TILES)
        most_tiles = sum(triton.cdiv(r, 16) for r in rows)  # with the narrowest tile
        ws, counters = _workspace(xq.device, 4 * bm * (sum(rows) + 3 * widest), most_tiles)
        grid = lambda meta: (  # noqa: E731
            sum(triton.cdiv(r, meta["BR"]) for r in rows),
            triton.cdiv(k, meta["BK"] * meta["ITERS"]),
        )
        _skinny_kernel[grid](
            x2, act_scale.reshape(-1).contiguous(), words[0], scales[0], bias if bias is not None else scales[0],
            ys[0], words[1], scales[1], ys[1], words[2], scales[2], ys[2], ws, counters,
            m, widths[0], rows[0], widths[1], rows[1], widths[2], rows[2], k, x2.stride(0), words[0].stride(0),
            HAS_BIAS=bias is not None, PER_CHANNEL=scales[0].numel() != 1, BM=bm, USE_GDC=dependent_launch,
            **({"launch_pdl": True} if dependent_launch else {}),
        )  # fmt: skip
    else:
        for y in ys[:count]:
            y.zero_()  # K = 0: empty sums
    return [y.to(out_dtype).reshape(*xq.shape[:-1], n) for y, n in zip(ys[:count], out_features, strict=True)]
