"""Triton inference kernels over packed 2-bit ternary weights: a decode kernel and the prefill path.

**Layout.** The kernels read the Hugging Face ``bitnet`` layout itself (:mod:`bittern.packing`): uint8
``[R, K]`` with ``R = ceil(N / 4)``, byte row ``r`` holding output rows ``r, r+R, r+2R, r+3R`` in its four
2-bit fields (``code + 1``). No second copy in another layout is kept, and nothing is converted at load time.

* :func:`decode_linear` (``M <= DECODE_MAX_TOKENS`` tokens, ``K % 4 == 0``): the packed bytes are read as int32
  words, four consecutive ``k`` of one byte row each. Masking field ``q`` of every byte where it lies
  (``w & (0x03030303 << 2q)``) gives four unsigned bytes ``4^q c`` (``c = code + 1`` of output row ``r + qR``, at
  most 128): the operand of the ``dp4a`` instruction (a 4-way int8 dot product with int32 accumulation), whose
  sum over ``K`` is then ``4^q`` times the field's and is shifted back exactly. One word yields 16 weights'
  products in 4 masks and 4 ``dp4a``, with no shift per word. The activations are quantized per token inside the
  kernel (each program reads the token's whole row, which sits in L2, for its absmax) and packed four to a word
  the same way — or, given already quantized (``act_scale``: under ``torch.compile`` inductor fuses the
  quantization into the norm before the projection), read as words. Since
  ``sum_k xq_k (c_k - 1) = sum_k xq_k c_k - sum_k xq_k``, the ``- 1`` is one row sum per token, not a
  subtraction per weight. A program loads its whole block of weight words at once (``K`` is a compile-time
  constant) before it reads any activation: at batch 1 the product is bound by memory latency, not arithmetic,
  and inside :func:`static_weights` (programmatic dependent launch, Hopper) those loads are in flight while the
  kernel before it finishes.
* :func:`prefill_linear` (everything else): the activations quantized by
  :func:`bittern.kernels.quantizers.quantize_activations`; then, up to 256 tokens (a batch of decode steps, a short
  prompt), the int8 tensor-core product of :mod:`bittern.kernels.packed_gemm`, which reads the packed bytes and
  expands the codes in registers, one 2-bit field of a block of byte rows per program; beyond, the codes unpacked
  to int8 in one pass (:func:`unpack`) and the int8 tensor-core GEMM of :mod:`bittern.kernels.matmul`.
  :func:`prefill_group` serves two or three layers of one input with one quantization and one product (beyond 256
  tokens, their codes unpacked one above the other and :func:`~bittern.kernels.matmul.int8_ternary_group`).

Both end with the reference's epilogue, ``acc / (s_w * s_x) (+ bias)`` in float32, one IEEE division
(:func:`~bittern.kernels.quantizers.rescale`), so the output equals :func:`bittern.quant.integer_linear` bit for
bit. The decode kernel's tiles are autotuned per (N, K) for a float input; an int8 input takes one warp per
program and one or two byte rows (:func:`_prequantized_tile`). Import through :mod:`bittern.kernels` (lazily).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from bittern import packing, quant
from bittern.kernels import interpreter, matmul, packed_gemm, quantizers, shapes, tuning
from bittern.kernels.matmul import _rows
from bittern.kernels.packed_gemm import _epilogue
from bittern.kernels.quantizers import _act_codes, activation_scale
from bittern.kernels.shapes import DECODE_MAX_TOKENS

DECODE_MAX_K = 16384
"""Longest input row of the decode kernel (a program holds its block of weight words and a token's row at once)."""


def _decode_configs() -> list[triton.Config]:
    """Candidates ``(BR byte rows, warps)``; the first is the one kept without autotuning."""
    if interpreter.ON_IMPORT:
        return [triton.Config({"BR": 4}, num_warps=4, num_stages=1)]
    # few candidates, as each compiles per K; those holding over 64 weight words per thread are pruned per K. On
    # Hopper (benchmarks/linear.py, the 210 layers of 2B4T at M = 1) (8, 8) is the fastest with the quantization in
    # the kernel, where fewer programs repeat it, so it comes first (a prequantized input takes _prequantized_tile)
    shapes = [(8, 8), (2, 4), (4, 4), (8, 4), (16, 8)]
    if os.environ.get("BITTERN_AUTOTUNE", "1") == "0":
        shapes = shapes[:1]
    return [triton.Config({"BR": br}, num_warps=w, num_stages=1) for br, w in shapes]


PREQUANTIZED_WORDS_PER_THREAD = 128
"""Most words a thread of :func:`_prequantized_tile`'s one-row program holds: its share of one byte row's weight
words and of the activation row's."""

TWO_ROWS_WORDS_PER_THREAD = 100
"""Most words a thread of a two-row program holds (two byte rows' weight words and the activation row's): a
one-warp program takes two byte rows up to ``K`` = 4096 (96 words, which ptxas fits in registers without
spilling on sm_90)."""


def _prequantized_tile(kw0: int, kw1: int) -> dict[str, int]:
    """The decode kernel's tile for an int8 input whose ``K/4`` words are split ``kw0 + kw1``: two byte rows on
    one warp where a thread then holds at most :data:`TWO_ROWS_WORDS_PER_THREAD` words (``K`` <= 4096), else one
    byte row on the fewest warps (one up to ``K`` = 8192) whose threads hold at most
    :data:`PREQUANTIZED_WORDS_PER_THREAD` words each.

    Not autotuned: each kernel alone is timed without the ones around it, and inside the decode step a product's
    cost is what it adds after the kernel before it ends (its wait, then the ``dp4a`` work and the sums over
    ``K``). There few warps win: a sum over ``K`` within one warp needs no barrier, and one byte row on one warp
    adds less to the step than the (4 byte rows, 4 warps) autotuning chose for the 2B4T shapes. Two byte rows
    at ``K`` = 2560 read the activation row once for eight outputs, which made the batch-1 decode step faster
    still (docs/notes/inference-tuning.md)."""
    words = kw0 + kw1
    if 3 * words <= TWO_ROWS_WORDS_PER_THREAD * 32:
        return {"BR": 2, "num_warps": 1}
    warps = 1
    while 2 * words > PREQUANTIZED_WORDS_PER_THREAD * 32 * warps and warps < 8:
        warps *= 2
    return {"BR": 1, "num_warps": warps}


def _fits_registers(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The configs whose program holds at most 64 words of weights per thread (the first one otherwise)."""
    words = sum(named_args.get(name, kwargs.get(name, 1)) for name in ("KW0", "KW1"))
    kept = [c for c in configs if c.kwargs["BR"] * words <= 64 * 32 * c.num_warps]
    return kept or configs[:1]


@triton.jit
def _field(packed_bytes, Q: tl.constexpr):
    """The ``Q``-th 2-bit field of each byte as int8 ``code + 1`` in {0, 1, 2}."""
    return ((packed_bytes >> (2 * Q)) & 3).to(tl.int8)


@triton.jit
def _dp4a(a, b, c, USE_ASM: tl.constexpr):
    """``c + sum_i a_i * b_i`` over the four bytes of int32 words: ``a`` unsigned, ``b`` signed (PTX ``dp4a``).
    Under the interpreter, which runs no PTX, the same sum from shifts."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            "dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1
        )
    else:
        out = c
        for i in tl.static_range(4):
            out += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
        return out


@triton.jit(do_not_specialize=["N", "K", "R"])
def _unpack_kernel(w_ptr, codes_ptr, N, K, R, BR: tl.constexpr, BK: tl.constexpr):
    rr = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    ok = (rr[:, None] < R) & (cols[None, :] < K)
    b = tl.load(w_ptr + rr.to(tl.int64)[:, None] * K + cols[None, :], mask=ok, other=0)
    for q in tl.static_range(4):
        n = rr + q * R
        out = codes_ptr + n.to(tl.int64)[:, None] * K + cols[None, :]
        # rows past R belong to no byte row of this layer (n may still be < N: they must not be written)
        tl.store(out, _field(b, q) - 1, mask=ok & (n[:, None] < N))


@triton.jit(do_not_specialize=["N", "R", "KW"])
def _unpack_words_kernel(w_ptr, codes_ptr, N, R, KW, stride_wr, BR: tl.constexpr, BW: tl.constexpr):
    """:func:`_unpack_kernel` four bytes at a time: the packed bytes as int32 words, field ``q`` of each of a
    word's bytes selected, shifted down and made ``code + 1 - 1`` without a borrow into the next byte (each byte's
    top bit set first and cleared after), stored as a word of four int8 codes."""
    rr = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BW + tl.arange(0, BW)
    ok = (rr[:, None] < R) & (cols[None, :] < KW)
    words = tl.load(w_ptr + rr.to(tl.int64)[:, None] * stride_wr + cols[None, :], mask=ok, other=0)
    words = words.to(tl.uint32, bitcast=True)
    for q in tl.static_range(4):
        fields = (words >> (2 * q)) & 0x03030303
        codes = ((fields | 0x80808080) - 0x01010101) ^ 0x80808080
        n = rr + q * R
        out = codes_ptr + n.to(tl.int64)[:, None] * KW + cols[None, :]
        tl.store(out, codes.to(tl.int32, bitcast=True), mask=ok & (n[:, None] < N))


def unpack(packed: torch.Tensor, out_features: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of :func:`bittern.packing.unpack_ternary_rows`: int8 codes ``[N, K]`` in one pass (into ``out``,
    a contiguous int8 ``[N, K]``, when given).

    Four bytes at a time where ``K % 4 == 0`` and the rows start on 4-byte boundaries (every layer of the usual
    shapes), which is faster on a GPU than a byte per element; else byte by byte."""
    packed = _rows(packed)
    rows, k = packed.shape
    if out is None:
        codes = torch.empty((out_features, k), dtype=torch.int8, device=packed.device)
    elif out.shape != (out_features, k) or out.dtype != torch.int8 or not out.is_contiguous():
        raise ValueError(f"unpack: out must be a contiguous int8 [{out_features}, {k}]; got {out.dtype} "
                         f"{tuple(out.shape)}")  # fmt: skip
    else:
        codes = out
    if not (rows and k):
        return codes
    if k % 4 == 0 and packed.stride(0) % 4 == 0 and packed.data_ptr() % 4 == 0 and codes.data_ptr() % 4 == 0:
        words = k // 4
        grid = (triton.cdiv(rows, 16), triton.cdiv(words, 64))
        _unpack_words_kernel[grid](packed.view(torch.int32), codes.view(torch.int32), out_features, rows, words,
                                   packed.stride(0) // 4, BR=16, BW=64, num_warps=4)  # fmt: skip
    else:
        _unpack_kernel[(triton.cdiv(rows, 16), triton.cdiv(k, 256))](packed, codes, out_features, k, rows, 16, 256)
    return codes


def _check(x: torch.Tensor, packed: torch.Tensor, out_features: int, scale: torch.Tensor) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed weight must be uint8 [ceil(N/4), K], got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[0] != packing.packed_rows(out_features):
        raise ValueError(f"packed weight has {packed.shape[0]} byte rows; {out_features} outputs need "
                         f"{packing.packed_rows(out_features)}")  # fmt: skip
    if x.shape[-1] != packed.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features but the packed weight has {packed.shape[1]}")
    if packed.shape[1] == 0:
        raise ValueError("packed weight has no input features (K = 0): nothing to quantize or multiply")
    if scale.numel() not in (1, out_features):
        raise ValueError(f"weight scale has {scale.numel()} values; expected 1 or {out_features}")


def _check_group(
    x: torch.Tensor, packed: list[torch.Tensor], out_features: list[int], scales: list[torch.Tensor], caller: str
) -> None:
    if len(packed) < 2 or not len(packed) == len(out_features) == len(scales):
        raise ValueError(f"{caller} takes 2 or 3 layers with one packed weight, width and scale each; got "
                         f"{len(packed)}, {len(out_features)} and {len(scales)}")  # fmt: skip
    if not shapes.groupable(scales, [None] * len(scales)):
        raise ValueError(f"{caller} takes at most {shapes.MAX_GROUP} layers and needs every layer's scale per "
                         f"tensor, or every layer's per row")  # fmt: skip
    for weight, n, scale in zip(packed, out_features, scales, strict=True):
        _check(x, weight, n, scale)


@triton.jit
def _decode_rows(
    x_ptr, a_ptr, w_ptr, s_ptr, bias_ptr, y_ptr, M, N, R, stride_xm, stride_wr, stride_ym, block,
    K: tl.constexpr, KW0: tl.constexpr, KW1: tl.constexpr, EPS: tl.constexpr, HAS_BIAS: tl.constexpr,
    PER_CHANNEL: tl.constexpr, PREQUANTIZED: tl.constexpr, USE_ASM: tl.constexpr, USE_GDC: tl.constexpr,
    BR: tl.constexpr,
):  # fmt: skip
    """Byte rows ``[block * BR, (block + 1) * BR)`` of one layer for every token. The program loads its whole
    ``[BR, K/4]`` block of weight words first, then (``USE_GDC``) waits for the kernel before it, then takes one
    token after another: quantize its row and pack it four to a word (or, with ``PREQUANTIZED``, read the int8
    row as words and its scale from ``a_ptr``), then ``dp4a``. The ``K/4`` words are split in two power-of-two
    parts, ``KW0`` and a tail of at most ``KW1`` (masked): 640 words are 512 + 128, with no lane wasted."""
    KW: tl.constexpr = K // 4
    rr = block * BR + tl.arange(0, BR)
    r_ok = rr < R
    w_rows = w_ptr + rr.to(tl.int64)[:, None] * stride_wr
    j0 = tl.arange(0, KW0)  # KW0 <= KW: every word valid
    j1 = KW0 + tl.arange(0, KW1)
    j1_ok = j1 < KW
    # the weights do not depend on the kernel before this one: with programmatic dependent launch their loads are
    # in flight while it finishes
    w0 = tl.load(w_rows + j0[None, :], mask=r_ok[:, None], other=0)
    w1 = tl.load(w_rows + j1[None, :], mask=r_ok[:, None] & j1_ok[None, :], other=0)
    if USE_GDC:
        tl.extra.cuda.gdc_wait()  # the activations, and the output's memory, may be the previous kernel's
        # only now may the next kernel start: one that skips its own wait (an inductor kernel reading nothing of
        # this one's) must find everything before this kernel complete
        tl.extra.cuda.gdc_launch_dependents()
    lanes = tl.arange(0, 4)
    one = tl.arange(0, 1)
    for m in range(M):
        x_row = x_ptr + m * stride_xm
        if PREQUANTIZED:
            xw0 = tl.load(x_row + j0)  # four int8 activations in one word
            xw1 = tl.load(x_row + j1, mask=j1_ok, other=0)
            act_scale = tl.load(a_ptr + m)
        else:
            x0 = tl.load(x_row + j0[:, None] * 4 + lanes[None, :]).to(tl.float32)
            x1 = tl.load(x_row + j1[:, None] * 4 + lanes[None, :], mask=j1_ok[:, None], other=0.0).to(tl.float32)
            amax = tl.maximum(tl.max(tl.max(tl.abs(x0), axis=1), axis=0), tl.max(tl.max(tl.abs(x1), axis=1), axis=0))
            act_scale = activation_scale(tl.maximum(amax, EPS))
            xw0 = _pack_quantized(x0, act_scale, lanes)
            xw1 = _pack_quantized(x1, act_scale, lanes)
        total = _row_dot(tl.full([1, KW0], 0x01010101, tl.int32), xw0, USE_ASM)  # sum_k xq_k, [1]
        total += _row_dot(tl.full([1, KW1], 0x01010101, tl.int32), xw1, USE_ASM)
        rm = m + one
        a = tl.zeros([1], dtype=tl.float32) + act_scale
        m_ok = rm < M
        for q in tl.static_range(4):
            # field q where it lies: bytes 4^q (code + 1) <= 128, so the sum is exactly 4^q times the field's
            acc = _field_dot(w0, xw0, q, USE_ASM)
            acc += _field_dot(w1, xw1, q, USE_ASM)
            acc = acc >> (2 * q)
            n = rr + q * R
            _epilogue((acc - total)[None, :], a, rm, n, m_ok, r_ok & (n < N), s_ptr, bias_ptr, y_ptr, stride_ym,
                      HAS_BIAS, PER_CHANNEL)  # fmt: skip


@triton.jit
def _pack_quantized(x, act_scale, lanes):
    """``[W, 4]`` float32 activations → ``[W]`` int32 words of their int8 quantization (the reference's rounding)."""
    q = _act_codes(x, act_scale).to(tl.int32) & 0xFF
    return tl.sum(q << (8 * lanes)[None, :], axis=1)


@triton.jit
def _field_dot(words, xw, Q: tl.constexpr, USE_ASM: tl.constexpr):
    """``sum_k`` of the ``dp4a`` of field ``Q`` of each row of ``words`` ``[B, W]``, masked where it lies (bytes
    ``4^Q (code + 1)``), with ``xw`` ``[W]``: ``[B]``, ``4^Q`` times the field's sum.

    The mask and the ``dp4a`` are one inline-assembly step that takes the activation words. Written as a separate
    ``&``, the masks (four per weight word) depend on no token, and LLVM hoists them all out of the token loop, to
    be held in registers at once: at K = 6912 on one warp, ptxas (sm_90) then spilled. In one step with the
    activation word they stay in the loop: about half the registers, and nothing spills."""
    xb = tl.broadcast_to(xw[None, :], words.shape)
    if USE_ASM:
        if Q == 0:
            code: tl.constexpr = "{ .reg .b32 t; and.b32 t, $1, 0x03030303; dp4a.u32.s32 $0, t, $2, 0; }"
        elif Q == 1:
            code: tl.constexpr = "{ .reg .b32 t; and.b32 t, $1, 0x0C0C0C0C; dp4a.u32.s32 $0, t, $2, 0; }"
        elif Q == 2:
            code: tl.constexpr = "{ .reg .b32 t; and.b32 t, $1, 0x30303030; dp4a.u32.s32 $0, t, $2, 0; }"
        else:
            code: tl.constexpr = "{ .reg .b32 t; and.b32 t, $1, 0xC0C0C0C0; dp4a.u32.s32 $0, t, $2, 0; }"
        dots = tl.inline_asm_elementwise(code, "=r,r,r", [words, xb], dtype=tl.int32, is_pure=True, pack=1)
    else:
        field = tl.full([1, 1], 0x03030303, tl.int32) << (2 * Q)
        dots = _dp4a(words & field, xb, tl.zeros(words.shape, dtype=tl.int32), False)
    return tl.sum(dots, axis=1)


@triton.jit
def _row_dot(words, xw, USE_ASM: tl.constexpr):
    """``sum_k`` of the ``dp4a`` of each row of ``words`` ``[B, W]`` (unsigned bytes) with ``xw`` ``[W]``: ``[B]``."""
    xb = tl.broadcast_to(xw[None, :], words.shape)
    return tl.sum(_dp4a(words, xb, tl.zeros(words.shape, dtype=tl.int32), USE_ASM), axis=1)


@triton.jit(do_not_specialize=["M", "N", "R"])
def _decode_kernel(
    x_ptr, a_ptr, w_ptr, s_ptr, bias_ptr, y_ptr,
    M, N, R, stride_xm, stride_wr, stride_ym,
    K: tl.constexpr, KW0: tl.constexpr, KW1: tl.constexpr, EPS: tl.constexpr, HAS_BIAS: tl.constexpr,
    PER_CHANNEL: tl.constexpr, PREQUANTIZED: tl.constexpr, USE_ASM: tl.constexpr, USE_GDC: tl.constexpr,
    BR: tl.constexpr,
):  # fmt: skip
    _decode_rows(x_ptr, a_ptr, w_ptr, s_ptr, bias_ptr, y_ptr, M, N, R, stride_xm, stride_wr, stride_ym,
                 tl.program_id(0), K, KW0, KW1, EPS, HAS_BIAS, PER_CHANNEL, PREQUANTIZED, USE_ASM, USE_GDC,
                 BR)  # fmt: skip


@triton.jit(do_not_specialize=["M", "N0", "R0", "N1", "R1", "N2", "R2"])
def _decode_group_kernel(
    x_ptr, a_ptr, w0_ptr, s0_ptr, y0_ptr, w1_ptr, s1_ptr, y1_ptr, w2_ptr, s2_ptr, y2_ptr,
    M, N0, R0, N1, R1, N2, R2, stride_xm, stride_wr,
    K: tl.constexpr, KW0: tl.constexpr, KW1: tl.constexpr, EPS: tl.constexpr, PER_CHANNEL: tl.constexpr,
    PREQUANTIZED: tl.constexpr, USE_ASM: tl.constexpr, USE_GDC: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    # up to three layers of one input (q/k/v, gate/up) in one launch: the first blocks of programs take layer 0,
    # the next layer 1, the rest layer 2 (a launch costs about as much as a small layer's whole product)
    pid = tl.program_id(0)
    blocks0 = tl.cdiv(R0, BR)
    blocks1 = tl.cdiv(R1, BR)
    if pid < blocks0:
        w_ptr, s_ptr, y_ptr, n, r, block = w0_ptr, s0_ptr, y0_ptr, N0, R0, pid
    elif pid < blocks0 + blocks1:
        w_ptr, s_ptr, y_ptr, n, r, block = w1_ptr, s1_ptr, y1_ptr, N1, R1, pid - blocks0
    else:
        w_ptr, s_ptr, y_ptr, n, r, block = w2_ptr, s2_ptr, y2_ptr, N2, R2, pid - blocks0 - blocks1
    _decode_rows(x_ptr, a_ptr, w_ptr, s_ptr, s_ptr, y_ptr, M, n, r, stride_xm, stride_wr, n, block,
                 K, KW0, KW1, EPS, False, PER_CHANNEL, PREQUANTIZED, USE_ASM, USE_GDC, BR)  # fmt: skip


_PRUNE = {"early_config_prune": _fits_registers}
# autotuned only for a float input quantized in the kernel: an int8 input takes _prequantized_tile
_decode_tuned = tuning.autotune(_decode_configs(), key=["N", "K"], prune_configs_by=_PRUNE)(_decode_kernel)
_decode_group_tuned = tuning.autotune(_decode_configs(), key=["N0", "N1", "N2", "K"], prune_configs_by=_PRUNE)(
    _decode_group_kernel
)


def _decode_rows_of(x: torch.Tensor, act_scale: torch.Tensor | None, caller: str) -> tuple[torch.Tensor, dict]:
    """``x`` as the kernel's ``[M, K]`` rows (int32 words of four int8 values when ``act_scale`` is given),
    checked against the decode kernel's limits (named for ``caller``'s error); and the kernel arguments that
    depend on it."""
    x2 = _rows(x)
    m, k = x2.shape
    if m > DECODE_MAX_TOKENS or k % 4 or not 0 < k <= DECODE_MAX_K:
        raise ValueError(f"{caller} takes at most {DECODE_MAX_TOKENS} tokens and K % 4 == 0, 0 < K <= {DECODE_MAX_K}; "
                         f"got {m} tokens of {k}")  # fmt: skip
    if act_scale is None:
        return x2, {"PREQUANTIZED": False}
    if x.dtype != torch.int8 or act_scale.dtype != torch.float32 or act_scale.numel() != m:
        raise ValueError(f"{caller}: a quantized input is int8 [..., K] with float32 scales [..., 1] "
                         f"(quant.quantize_activations); got {x.dtype} {tuple(x.shape)} and "
                         f"{act_scale.dtype} {tuple(act_scale.shape)}")  # fmt: skip
    return x2.view(torch.int32), {"PREQUANTIZED": True}


_static_weights = threading.local()


@contextlib.contextmanager
def static_weights(enabled: bool = True) -> Iterator[None]:
    """Promise, for the calls made in this block (in this thread), that no kernel still queued on the stream
    writes the packed weights they read: true of a model's weights once loaded, not of weights packed on the GPU
    just before the call.

    On Hopper and newer GPUs the decode kernels then launch with programmatic dependent launch: a kernel starts
    while the one before it finishes, loads its weights, and waits for it only before reading the activations
    and writing its output; once past that wait it lets the next kernel start. The weight read of one layer
    thus overlaps the launch and the work of the kernel before it. The tensor-core product of
    :mod:`bittern.kernels.packed_gemm` (4–256 tokens) and the decode attention of :mod:`bittern.kernels.attention`
    launch the same way but wait first thing. Results are unchanged, bit for bit.
    Elsewhere (older GPUs, the interpreter) the block changes nothing.
    """
    before = getattr(_static_weights, "on", False)
    _static_weights.on = enabled
    try:
        yield
    finally:
        _static_weights.on = before


@functools.cache
def _supports_dependent_launch(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def launches_dependently(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with programmatic dependent launch now (inside
    :func:`static_weights`, on a GPU that has it, not under the interpreter)."""
    return (getattr(_static_weights, "on", False) and not interpreter.active()
            and _supports_dependent_launch(device))  # fmt: skip


def _decode_flags(k: int, per_channel: bool, device: torch.device) -> dict:
    """The decode kernels' compile-time flags for inputs of ``k`` features on ``device``."""
    dependent = launches_dependently(device)
    words = k // 4
    main = 1 << (words.bit_length() - 1)  # the largest power of two <= words (K > 0)
    return dict(K=k, KW0=main, KW1=triton.next_power_of_2(max(words - main, 1)), EPS=quant.EPS, PER_CHANNEL=per_channel,
                USE_ASM=not interpreter.active(), USE_GDC=dependent)  # fmt: skip


def _launch(kernel, tuned, byte_rows: list[int], args: tuple, flags: dict, config: dict[str, int] | None) -> None:  # type: ignore[no-untyped-def]
    """Launch ``tuned`` (autotuned), or ``kernel`` with a fixed ``config`` (tests; for an int8 input,
    :func:`_prequantized_tile` when none is given), one program per ``BR`` byte rows of every layer in
    ``byte_rows``; with programmatic dependent launch where ``flags`` ask for it."""
    launch = {"launch_pdl": True} if flags["USE_GDC"] else {}
    if config is None and flags["PREQUANTIZED"]:
        config = _prequantized_tile(flags["KW0"], flags["KW1"])
    if config is None:
        tuned[lambda meta: (sum(triton.cdiv(r, meta["BR"]) for r in byte_rows),)](*args, **flags, **launch)
    else:
        chosen = dict(config)
        warps = chosen.pop("num_warps", 4)
        grid = (sum(triton.cdiv(r, chosen["BR"]) for r in byte_rows),)
        kernel[grid](*args, **flags, **chosen, num_warps=warps, **launch)


def decode_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    out_features: int,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: dict[str, int] | None = None,
    act_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode product for at most :data:`DECODE_MAX_TOKENS` tokens, activation quantization fused in.

    Args:
        x: ``[..., K]`` float32 / bfloat16 / float16; at most ``DECODE_MAX_TOKENS`` tokens, ``K % 4 == 0``,
            ``K <= DECODE_MAX_K``. With ``act_scale``: the input already quantized, int8 ``[..., K]``.
        packed: uint8 ``[ceil(N/4), K]`` in the Hugging Face layout; ``out_features``: ``N``.
        scale: float32 ``[1]`` or ``[N]``, the weight scale ``s_w`` (a code is worth ``1 / s_w``).
        bias: ``[N]`` or None.
        out_dtype: dtype of the result.
        config: a fixed tile choice (``BR``, optional ``num_warps``) instead of autotuning; for tests.
        act_scale: float32 ``[..., 1]``, the per-token scale of an int8 ``x`` (the pair
            :func:`bittern.quant.quantize_activations` makes, e.g. fused by inductor into the kernel that produced
            ``x``); None for a float ``x``.

    Returns:
        ``[..., N]`` in ``out_dtype``, equal to :func:`bittern.quant.integer_linear` bit for bit.
    """
    _check(x, packed, out_features, scale)
    x2, input_flags = _decode_rows_of(x, act_scale, "decode_linear")
    m, k = x2.shape[0], x.shape[-1]
    words = _rows(packed).view(torch.int32)  # [R, K/4]; K % 4 == 0 keeps every row word-aligned
    n = out_features
    rows = packed.shape[0]
    y = torch.empty((m, n), dtype=interpreter.store_dtype(out_dtype), device=x.device)
    if m and n:
        args = (x2, act_scale if act_scale is not None else scale, words, scale, bias if bias is not None else scale,
                y, m, n, rows, x2.stride(0), words.stride(0), y.stride(0))  # fmt: skip
        flags = {**_decode_flags(k, scale.numel() != 1, x.device), **input_flags, "HAS_BIAS": bias is not None}
        _launch(_decode_kernel, _decode_tuned, [rows], args, flags, config)
    return y.to(out_dtype).reshape(*x.shape[:-1], n)


def decode_group(
    x: torch.Tensor,
    packed: list[torch.Tensor],
    out_features: list[int],
    scales: list[torch.Tensor],
    out_dtype: torch.dtype,
    config: dict[str, int] | None = None,
    act_scale: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """:func:`decode_linear` of two or three bias-free layers on the same input, in one launch.

    Args:
        x: ``[..., K]``, at most ``DECODE_MAX_TOKENS`` tokens, ``K % 4 == 0``.
        packed, out_features, scales: per layer, as in :func:`decode_linear`; every scale per tensor, or every
            scale per row.
        out_dtype: dtype of the results. config: a fixed tile choice; for tests.
        act_scale: with an int8 ``x``, its per-token scales (as in :func:`decode_linear`).

    Returns:
        One ``[..., N_i]`` tensor per layer, each equal to that layer's :func:`decode_linear` bit for bit.
    """
    _check_group(x, packed, out_features, scales, "decode_group")
    per_channel = {s.numel() != 1 for s in scales}
    x2, input_flags = _decode_rows_of(x, act_scale, "decode_group")
    m, k = x2.shape[0], x.shape[-1]
    words = [_rows(w).view(torch.int32) for w in packed]
    rows = [w.shape[0] for w in packed]
    ys = [torch.empty((m, n), dtype=interpreter.store_dtype(out_dtype), device=x.device) for n in out_features]
    if len(packed) == 2:  # a third layer of no rows: its programs are never launched
        words.append(words[1])
        rows.append(0)
        scales = [*scales, scales[1]]
        ys.append(ys[1])
        widths = [*out_features, 0]
    else:
        widths = list(out_features)
    if m:
        args = (
            x2, act_scale if act_scale is not None else scales[0],
            words[0], scales[0], ys[0], words[1], scales[1], ys[1], words[2], scales[2], ys[2],
            m, widths[0], rows[0], widths[1], rows[1], widths[2], rows[2], x2.stride(0), words[0].stride(0),
        )  # fmt: skip
        flags = {**_decode_flags(k, per_channel.pop(), x.device), **input_flags}
        _launch(_decode_group_kernel, _decode_group_tuned, rows, args, flags, config)
    return [y.to(out_dtype).reshape(*x.shape[:-1], n) for y, n in zip(ys, out_features, strict=False)]


def prefill_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    out_features: int,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Any number of tokens: the activations quantized per token, then up to
    :data:`~bittern.kernels.packed_gemm.MAX_M` tokens the tensor-core product of :mod:`bittern.kernels.packed_gemm`
    (the codes expanded on chip), beyond that the codes unpacked in one pass and the int8 GEMM of
    :mod:`bittern.kernels.matmul`. Shapes and result as :func:`decode_linear`."""
    _check(x, packed, out_features, scale)
    xq, act_scale = quantizers.quantize_activations(x)
    return _quantized_products(xq, act_scale, [packed], [out_features], [scale], bias, out_dtype)[0]


def prefill_group(
    x: torch.Tensor,
    packed: list[torch.Tensor],
    out_features: list[int],
    scales: list[torch.Tensor],
    out_dtype: torch.dtype,
) -> list[torch.Tensor]:
    """:func:`prefill_linear` of two or three bias-free layers on the same input, the activations quantized once
    and one product for every layer (beyond :data:`~bittern.kernels.packed_gemm.MAX_M` tokens, after an unpack pass
    per layer). Arguments and results as :func:`decode_group` (any number of tokens, any K)."""
    _check_group(x, packed, out_features, scales, "prefill_group")
    xq, act_scale = quantizers.quantize_activations(x)
    return _quantized_products(xq, act_scale, packed, out_features, scales, None, out_dtype)


def quantized_products(
    xq: torch.Tensor,
    act_scale: torch.Tensor,
    packed: list[torch.Tensor],
    out_features: list[int],
    scales: list[torch.Tensor],
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> list[torch.Tensor]:
    """One layer (``bias`` allowed), or two or three bias-free layers, on an input already quantized: int8
    ``[..., K]`` with float32 scales ``[..., 1]`` (:func:`bittern.quant.quantize_activations`, e.g. traced and fused by
    inductor into the norm before the projection). The decode kernel where it applies (:func:`decode_applies`),
    else the products of :func:`prefill_linear`. One ``[..., N_i]`` per layer, equal to the reference bit for bit."""
    if len(packed) == 1:
        _check(xq, packed[0], out_features[0], scales[0])
    else:
        _check_group(xq, packed, out_features, scales, "quantized_products")
        if bias is not None:
            raise ValueError("quantized_products takes a bias only for a single layer")
    if decode_applies(xq):
        if len(packed) == 1:
            return [decode_linear(xq, packed[0], out_features[0], scales[0], bias, out_dtype, act_scale=act_scale)]
        return decode_group(xq, packed, out_features, scales, out_dtype, act_scale=act_scale)
    return _quantized_products(xq, act_scale, packed, out_features, scales, bias, out_dtype)


def _quantized_products(
    xq: torch.Tensor,
    act_scale: torch.Tensor,
    packed: list[torch.Tensor],
    out_features: list[int],
    scales: list[torch.Tensor],
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> list[torch.Tensor]:
    if xq.numel() // max(xq.shape[-1], 1) <= packed_gemm.MAX_M:
        dependent = launches_dependently(xq.device)
        return packed_gemm.packed_gemm(
            xq, act_scale, packed, out_features, scales, bias, out_dtype, dependent_launch=dependent
        )
    if len(packed) == 1:
        return [matmul.int8_ternary_linear(xq, act_scale, unpack(packed[0], out_features[0]), scales[0], bias,
                                           out_dtype)]  # fmt: skip
    # the layers' codes one above the other, one product for all (as bf16 engines concatenate q/k/v)
    codes = torch.empty((sum(out_features), xq.shape[-1]), dtype=torch.int8, device=xq.device)
    first = 0
    for weight, n in zip(packed, out_features, strict=True):
        unpack(weight, n, codes[first : first + n])
        first += n
    return matmul.int8_ternary_group(xq, act_scale, codes, out_features, scales, out_dtype)


def packed_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    out_features: int,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The inference linear over packed weights: :func:`decode_linear` where it applies (up to DECODE_MAX_TOKENS tokens,
    ``K % 4 == 0``), else :func:`prefill_linear`. ``[..., K]`` → ``[..., N]`` in ``out_dtype``, bit-identical to
    the reference."""
    if decode_applies(x):
        return decode_linear(x, packed, out_features, scale, bias, out_dtype)
    return prefill_linear(x, packed, out_features, scale, bias, out_dtype)


def decode_applies(x: torch.Tensor) -> bool:
    """Whether the decode kernel takes ``x [..., K]``: at most :data:`DECODE_MAX_TOKENS` tokens, ``K % 4 == 0`` and
    ``K <= DECODE_MAX_K``."""
    k = x.shape[-1]
    return x.numel() // max(k, 1) <= DECODE_MAX_TOKENS and k % 4 == 0 and 0 < k <= DECODE_MAX_K
