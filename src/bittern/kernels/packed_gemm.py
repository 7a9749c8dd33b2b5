"""The product of 4–256 tokens (a batch of decode steps, a short prompt) with packed 2-bit ternary weights on int8
tensor cores, the codes expanded on chip.

Reads the Hugging Face ``bitnet`` layout in place (:mod:`bittern.packing`): uint8 ``[R, K]``, ``R = ceil(N / 4)``,
byte row ``r`` holding output rows ``r, r+R, r+2R, r+3R`` in its four 2-bit fields (``code + 1``). A program takes
one field ``q`` of ``BC`` byte rows — output rows ``qR + [r0, r0 + BC)`` — and ``BM`` tokens, and walks ``K``: each
step loads a ``[BC, BK]`` tile of bytes and a ``[BM, BK]`` tile of int8 activations, expands the field to int8
codes in registers and makes one int8 tensor-core product ``codes @ xqᵀ`` into a ``[BC, BM]`` int32 tile. The
codes are the product's register operand, so they never go through shared memory; on a GPU the expansion takes
four instructions per four codes (``((word >> 2q) & 0x03030303 | 0x80808080) - 0x01010101 ^ 0x80808080``: the
``- 1`` of each byte without a borrow into the next). The four programs of one block of byte rows run next to each
other, so the block is read from memory once and from L2 four times. Two or three layers of one input (q/k/v,
gate/up) share one launch. Inside :func:`bittern.kernels.packed.static_weights` on Hopper the kernel launches
with programmatic dependent launch: it waits for the kernel before it first thing and lets the next one start at
once.

Why this range of tokens (docs/kernels.md, docs/notes/inference-tuning.md):

* against the codes unpacked to int8 in a separate pass and the int8 GEMM (:mod:`bittern.kernels.matmul`), which
  reads four times the weight bytes and writes them once more: faster up to 256 tokens, where the product is bound
  by its weight bytes; slower from 512 tokens, where it is bound by the tensor cores and waits for each step's
  expansion (Triton keeps a product with a register operand synchronous);
* against the split-K kernel it replaced for 5–32 tokens (a ``K`` slice per program, int32 atomics into a
  workspace): faster at almost every shape (about even for ``down``, whose program walks the longest ``K``), with
  no workspace and no fix-up;
* against the dp4a decode kernel (:mod:`bittern.kernels.packed`), which keeps 1–3 tokens: faster per block from 4.

The epilogue is the reference's, ``acc / (s_w * s_x) (+ bias)`` in float32, one IEEE division
(:func:`~bittern.kernels.quantizers.rescale`), so the result equals :func:`bittern.quant.integer_linear` bit
for bit. Tiles are autotuned per (tokens rounded up to a power of two, the layers' N, K).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from bittern.kernels import interpreter, tuning
from bittern.kernels.matmul import _bucket, _rows
from bittern.kernels.quantizers import rescale

MAX_M = 256
"""The most tokens this kernel serves; beyond, unpacking once and the int8 GEMM is faster (on Hopper)."""

# (BM tokens, BC byte rows, BK, warps, stages); the first is kept when BITTERN_AUTOTUNE=0. On Hopper: (64, 64, 256)
# the fastest for most shapes at 64-128 tokens, (64, 32, 256) for the narrow 2560-wide outputs, (128, 64, 128) at 256;
# at 8-16 tokens (16, 32 | 64, 256), at 32 (16 | 32, 64, 256)
_TILES = [
    (64, 64, 256, 4, 3),
    (64, 32, 256, 4, 3),
    (64, 64, 128, 4, 3),
    (128, 64, 128, 4, 3),
    (128, 128, 128, 8, 3),
    (16, 32, 256, 4, 3),
    (16, 64, 256, 4, 3),
    (32, 64, 256, 4, 3),
    (16, 16, 256, 4, 3),
]


def _configs() -> list[triton.Config]:
    if interpreter.ON_IMPORT:
        return [triton.Config({"BM": 32, "BC": 16, "BK": 32}, num_warps=4, num_stages=1)]
    tiles = _TILES[:1] if os.environ.get("BITTERN_AUTOTUNE", "1") == "0" else _TILES
    return [triton.Config({"BM": bm, "BC": bc, "BK": bk}, num_warps=w, num_stages=s) for bm, bc, bk, w, s in tiles]


def _fit_tokens(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The candidates whose tile of tokens is no wider than the tokens rounded up to a power of two (at least 16):
    wider ones only multiply zeros."""
    bucket = max(named_args.get("M_BUCKET", kwargs.get("M_BUCKET", 16)), 16)
    return [c for c in configs if c.kwargs["BM"] <= bucket] or configs[:1]


@triton.jit
def _codes(packed_bytes, Q: tl.constexpr, USE_ASM: tl.constexpr):
    """Field ``Q`` of each byte as the int8 code in {-1, 0, 1}. With ``USE_ASM`` (a GPU), four bytes per 32-bit
    operation: select the field's two bits of each byte, set each byte's top bit, subtract one from every byte
    (the top bit absorbs the borrow) and clear the top bit again. Under the interpreter, which runs no PTX, the
    same from per-byte shifts."""
    if USE_ASM:
        if Q == 0:
            codes = tl.inline_asm_elementwise(
                "{ .reg .b32 t; and.b32 t, $1, 0x03030303; or.b32 t, t, 0x80808080; "
                "sub.u32 t, t, 0x01010101; xor.b32 $0, t, 0x80808080; }",
                "=r,r", [packed_bytes], dtype=tl.int8, is_pure=True, pack=4,
            )  # fmt: skip
        elif Q == 1:
            codes = tl.inline_asm_elementwise(
                "{ .reg .b32 t; shr.b32 t, $1, 2; and.b32 t, t, 0x03030303; or.b32 t, t, 0x80808080; "
                "sub.u32 t, t, 0x01010101; xor.b32 $0, t, 0x80808080; }",
                "=r,r", [packed_bytes], dtype=tl.int8, is_pure=True, pack=4,
            )  # fmt: skip
        elif Q == 2:
            codes = tl.inline_asm_elementwise(
                "{ .reg .b32 t; shr.b32 t, $1, 4; and.b32 t, t, 0x03030303; or.b32 t, t, 0x80808080; "
                "sub.u32 t, t, 0x01010101; xor.b32 $0, t, 0x80808080; }",
                "=r,r", [packed_bytes], dtype=tl.int8, is_pure=True, pack=4,
            )  # fmt: skip
        else:
            codes = tl.inline_asm_elementwise(
                "{ .reg .b32 t; shr.b32 t, $1, 6; and.b32 t, t, 0x03030303; or.b32 t, t, 0x80808080; "
                "sub.u32 t, t, 0x01010101; xor.b32 $0, t, 0x80808080; }",
                "=r,r", [packed_bytes], dtype=tl.int8, is_pure=True, pack=4,
            )  # fmt: skip
    else:
        codes = ((packed_bytes >> (2 * Q)) & 3).to(tl.int8) - 1
    return codes


@triton.jit
def _epilogue(acc, act_scale, rm, n, m_ok, n_ok, s_ptr, bias_ptr, y_ptr, stride_ym,
              HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr):  # fmt: skip
    """``y = acc / (s_w * s_x) (+ bias)`` in the reference's float32 order, stored for the valid rows/columns."""
    if PER_CHANNEL:
        y = rescale(acc, tl.load(s_ptr + n, mask=n_ok, other=1.0)[None, :], act_scale[:, None])
    else:
        y = rescale(acc, tl.load(s_ptr), act_scale[:, None])
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + n[None, :]
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _field_sums(x_rows, w_rows, M, K, rm, Q: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                USE_ASM: tl.constexpr):  # fmt: skip
    """int32 ``[BC, BM]``: field ``Q`` of the byte rows at ``w_rows`` times the token rows at ``x_rows``, all of
    ``K``. ``Q`` is a compile-time constant so that the expansion's shift is an immediate."""
    rk = tl.arange(0, BK)
    acc = tl.zeros((BC, BM), dtype=tl.int32)
    for k0 in range(0, tl.cdiv(K, BK)):
        k = k0 * BK + rk
        k_ok = k < K
        x = tl.load(x_rows + k[None, :], mask=(rm < M)[:, None] & k_ok[None, :], other=0)  # zero: no product
        b = tl.load(w_rows + k[None, :], mask=k_ok[None, :], other=0)
        acc = tl.dot(_codes(b, Q, USE_ASM), tl.trans(x), acc, out_dtype=tl.int32)
    return acc


@tuning.autotune(
    _configs(), key=["M_BUCKET", "N0", "N1", "N2", "K"], prune_configs_by={"early_config_prune": _fit_tokens}
)
@triton.jit(do_not_specialize=["M", "R0", "R1", "R2"])
def _gemm_kernel(
    xq_ptr, a_ptr, w0_ptr, s0_ptr, bias_ptr, y0_ptr, w1_ptr, s1_ptr, y1_ptr, w2_ptr, s2_ptr, y2_ptr,
    M, N0, R0, N1, R1, N2, R2, K, M_BUCKET, stride_xm, stride_wr,
    HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr, USE_ASM: tl.constexpr, USE_GDC: tl.constexpr,
    BM: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    # one to three layers of one input in one launch (q/k/v, gate/up; a bias only with a single layer): the first
    # blocks of byte rows belong to layer 0, the next to layer 1, the rest to layer 2. Program order: token tile
    # fastest, then the field, then the block of byte rows (so a block's bytes are read together)
    if USE_GDC:
        tl.extra.cuda.gdc_wait()  # the activations and the outputs may be the previous kernel's
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tile_m = pid % tiles_m
    q = (pid // tiles_m) % 4
    block = pid // (tiles_m * 4)
    blocks0 = tl.cdiv(R0, BC)
    blocks1 = tl.cdiv(R1, BC)
    if block < blocks0:
        w_ptr, s_ptr, y_ptr, N, R = w0_ptr, s0_ptr, y0_ptr, N0, R0
    elif block < blocks0 + blocks1:
        w_ptr, s_ptr, y_ptr, N, R = w1_ptr, s1_ptr, y1_ptr, N1, R1
        block -= blocks0
    else:
        w_ptr, s_ptr, y_ptr, N, R = w2_ptr, s2_ptr, y2_ptr, N2, R2
        block -= blocks0 + blocks1
    rm = tile_m * BM + tl.arange(0, BM)
    rr = block * BC + tl.arange(0, BC)
    x_rows = xq_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + (rr % R).to(tl.int64)[:, None] * stride_wr  # rows past the end read a valid row, unstored
    if q == 0:
        acc = _field_sums(x_rows, w_rows, M, K, rm, 0, BC, BM, BK, USE_ASM)
    elif q == 1:
        acc = _field_sums(x_rows, w_rows, M, K, rm, 1, BC, BM, BK, USE_ASM)
    elif q == 2:
        acc = _field_sums(x_rows, w_rows, M, K, rm, 2, BC, BM, BK, USE_ASM)
    else:
        acc = _field_sums(x_rows, w_rows, M, K, rm, 3, BC, BM, BK, USE_ASM)
    m_ok = rm < M
    n = rr + q * R
    act_scale = tl.load(a_ptr + rm, mask=m_ok, other=1.0)
    _epilogue(tl.trans(acc), act_scale, rm, n, m_ok, (rr < R) & (n < N), s_ptr, bias_ptr, y_ptr, N, HAS_BIAS,
              PER_CHANNEL)  # fmt: skip


def packed_gemm(
    xq: torch.Tensor,
    act_scale: torch.Tensor,
    packed: list[torch.Tensor],
    out_features: list[int],
    scales: list[torch.Tensor],
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    dependent_launch: bool = False,
) -> list[torch.Tensor]:
    """``(xq @ codes_iᵀ) / (s_i * s_x) (+ bias)`` over packed weights for one to three layers of the same int8
    input, one launch, the codes expanded on chip.

    Args:
        xq: int8 ``[..., K]`` (any number of tokens; meant for 4 to :data:`MAX_M`); act_scale: float32 ``[..., 1]``
            (from :func:`bittern.kernels.quantizers.quantize_activations`).
        packed: per layer, uint8 ``[ceil(N_i / 4), K]`` in the Hugging Face layout.
        out_features: per layer, ``N_i``. scales: per layer, float32 ``[1]`` or ``[N_i]``; all per tensor or all
            per row.
        bias: ``[N_0]``, or None; only a single layer may have one.
        out_dtype: dtype of the results.
        dependent_launch: launch with programmatic dependent launch (Hopper): the kernel waits for the one before
            it first thing, then lets the next one start (its launch overlaps this kernel's work).

    Returns:
        One ``[..., N_i]`` tensor per layer in ``out_dtype``, equal to :func:`bittern.quant.integer_linear` of that
        layer's codes bit for bit. The caller checks shapes (:mod:`bittern.kernels.packed`).
    """
    if bias is not None and len(packed) != 1:
        raise ValueError("packed_gemm takes a bias only for a single layer")
    x2 = _rows(xq)
    m, k = x2.shape
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
    if m and sum(rows):
        grid = lambda meta: (triton.cdiv(m, meta["BM"]) * 4 * sum(triton.cdiv(r, meta["BC"]) for r in rows),)  # noqa: E731
        _gemm_kernel[grid](
            x2, act_scale.reshape(-1).contiguous(), words[0], scales[0], bias if bias is not None else scales[0],
            ys[0], words[1], scales[1], ys[1], words[2], scales[2], ys[2],
            m, widths[0], rows[0], widths[1], rows[1], widths[2], rows[2], k, _bucket(m), x2.stride(0),
            words[0].stride(0), HAS_BIAS=bias is not None, PER_CHANNEL=scales[0].numel() != 1,
            USE_ASM=not interpreter.ON_IMPORT, USE_GDC=dependent_launch,
            **({"launch_pdl": True} if dependent_launch else {}),
        )  # fmt: skip
    return [y.to(out_dtype).reshape(*xq.shape[:-1], n) for y, n in zip(ys[:count], out_features, strict=True)]
