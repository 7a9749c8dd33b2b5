"""The decode step's attention, in Triton: one new token per sequence, over a static KV cache.

The engine's decode step attends from one query slot to a cache of ``S`` preallocated slots. Through
``F.scaled_dot_product_attention`` with a mask, every slot is read on every step (the shapes must not change for a CUDA
graph), in a kernel built for long query tiles, a large share of the whole step; rope and the cache write were two more
kernels. Here one program takes one KV head of one sequence, with every query head of its group as the rows of one tile.
It applies rope to the new token's query heads and key (reading the rope tables' row at the token's position itself: a
gather before the kernel was one more small kernel on the step's critical path), attends over the cached slots the query
sees plus the new one (from registers), and writes its key and value into the cache at its slot. The slot is read from
device memory, so the loop bound follows the sequence while the launch, captured once, stays the same. A cache longer
than :data:`_SPLIT` slots (:data:`_SPLIT_FEW` for a launch of a few programs, one sequence) is split across programs,
whose partial softmax sums a second kernel adds (flash decoding).

Visibility is the decoder's (:mod:`bittern.engine.decoder`): the query at slot ``i`` of row ``b`` sees slots
``pad[b] … i`` (and, with a sliding window ``w``, only those ``> i - w``); a query in the padding sees only its own
slot. Rope is the rotate-half form of Llama-family models, ``x * cos + rotate_half(x) * sin``, in float32, rounded
once to the model's dtype. Softmax runs in float32 online over blocks of ``BS`` slots (the flash-attention
recurrence); ``q·k`` takes the operands in their dtype with float32 accumulation, the probabilities are rounded to
the values' dtype before ``p·v``, as flash attention does (float32 operands multiply exactly, not on TF32 tensor
cores). Import through :mod:`bittern.kernels` (lazily).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from bittern.kernels import interpreter, packed

# Triton's interpreter multiplies bf16 tiles wrongly (see bittern.kernels.matmul): there the tiles are widened to
# float32 after rounding to their dtype, which leaves every product unchanged.
_UPCAST_DOTS = interpreter.ON_IMPORT

_BLOCK = 128
"""Cache slots per step of a program's loop. On Hopper at the 2B4T shape (5 KV heads of 4 query heads, head_dim 128,
384 slots) 128 slots and 4 warps beat 32 or 64 slots and 2 or 8 warps at batch 1 and 16, one program per head
(with 128-slot splits at batch 1, 8 warps won: :data:`_WARPS_FEW`)."""

_SPLIT = 512
"""Cache slots per program. A cache of more slots is split across programs while they are fewer than the GPU's
processors (a few KV heads would otherwise walk a long cache each on one SM), their partial sums added by a second
kernel. At batch 1 on a long cache the split is several times faster than one program per head
(BENCHMARKS.md, ``benchmarks/attention.py``)."""

_SPLIT_FEW = 128
"""Cache slots per program when a launch has at most :data:`_FEW_PROGRAMS` programs (one sequence of a model with a
few KV heads): each walks one block. At the 2B4T shape, batch 1 (5 programs), a 384-slot cache, this made the
decode step faster than 512-slot programs on Hopper. At batch 4 (20 programs) on a short cache the second kernel
costs more than the splits save, so larger launches keep :data:`_SPLIT`."""

_FEW_PROGRAMS = 8
"""Launches of at most this many programs (batch x KV heads) take :data:`_SPLIT_FEW` and :data:`_WARPS_FEW`."""

_WARPS_FEW = 8
"""Warps of a program of a launch of at most :data:`_FEW_PROGRAMS` programs (others: 4): with 128-slot splits, 8
warps made the batch-1 decode step slightly faster than 4."""


@triton.jit
def _rope(x_ptrs, rd, cos, sin, D: tl.constexpr):
    """``x * cos + rotate_half(x) * sin`` in float32 for the rows at ``x_ptrs`` (``[..., 1]`` pointers to element 0
    of each row): ``rotate_half`` puts ``-x[D/2:]`` before ``x[:D/2]``."""
    x = tl.load(x_ptrs + rd[None, :]).to(tl.float32)
    turned = tl.load(x_ptrs + ((rd + D // 2) % D)[None, :]).to(tl.float32)
    return x * cos[None, :] + tl.where(rd < D // 2, -turned, turned) * sin[None, :]


@triton.jit
def _decode_attention_kernel(
    q_ptr, kn_ptr, vn_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, slot_ptr, pad_ptr, out_ptr, part_ptr, stat_ptr,
    kv_heads, scale, window,
    stride_qb, stride_qh, stride_qg, stride_knb, stride_knh, stride_vnb, stride_vnh, stride_cp,
    stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_og,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, SPLIT: tl.constexpr,
    SPLITS: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    USE_GDC: tl.constexpr,
):  # fmt: skip
    """One KV head of one row (axis 0) over slots ``[split * SPLIT, (split + 1) * SPLIT)`` (axis 1) of those the
    query sees. The split holding the new slot writes the new key and value there and adds that slot from
    registers; the cached slots before it come from memory. One split: the output. Several: the split's running
    max, sum and unnormalised ``p·v`` into the workspace, for :func:`_combine_kernel`. With ``USE_GDC``
    (programmatic dependent launch) the program is resident before the previous kernel ends, and waits for it
    first thing."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()  # every input may be the previous kernel's
        tl.extra.cuda.gdc_launch_dependents()  # only past the wait (see bittern.kernels.packed._decode_rows)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // kv_heads
    h = pid % kv_heads
    i = tl.load(slot_ptr)
    pad = tl.load(pad_ptr + b)
    position = tl.maximum(i - pad, 0)  # the token's rope position (0 for a query in the padding)
    first = tl.minimum(pad, i)  # a padding query sees only its own slot
    if HAS_WINDOW:
        first = tl.maximum(first, i - window + 1)
    end = i  # the cached slots; slot i is the new token's
    owner = i >= 0  # (true) one program per head: it owns the new slot
    if SPLITS > 1:
        owner = split == i // SPLIT
        first = tl.maximum(first, split * SPLIT)
        end = tl.minimum(end, (split + 1) * SPLIT)
    rg = tl.arange(0, GP)
    rd = tl.arange(0, D)
    g_ok = rg < G
    dtype = k_ptr.dtype.element_ty
    cos = tl.load(cos_ptr + position.to(tl.int64) * stride_cp + rd).to(tl.float32)
    sin = tl.load(sin_ptr + position.to(tl.int64) * stride_cp + rd).to(tl.float32)
    q_rows = q_ptr + b * stride_qb + h * stride_qh + tl.minimum(rg, G - 1)[:, None] * stride_qg  # padded rows: unused
    q = _rope(q_rows, rd, cos, sin, D).to(dtype)  # [GP, D]
    k_new = _rope(kn_ptr + b * stride_knb + h * stride_knh + tl.zeros([1, 1], tl.int32), rd, cos, sin, D)
    k_new = tl.reshape(k_new, [D]).to(dtype)
    v_new = tl.load(vn_ptr + b * stride_vnb + h * stride_vnh + rd).to(dtype)
    k_rows = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_rows = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    if UPCAST:
        q = q.to(tl.float32)
    best = tl.full([GP], float("-inf"), tl.float32)
    total = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    for start in range(first, end, BS):  # no step at all when no cached slot of this split is seen
        s = start + tl.arange(0, BS)
        s_ok = s < end
        k = tl.load(k_rows + s.to(tl.int64)[:, None] * stride_ks + rd[None, :], mask=s_ok[:, None], other=0.0)
        v = tl.load(v_rows + s.to(tl.int64)[:, None] * stride_vs + rd[None, :], mask=s_ok[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GP, BS] float32
        scores = tl.where(s_ok[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))  # finite: the block has a visible slot
        p = tl.exp(scores - new_best[:, None])
        keep = tl.exp(best - new_best)
        total = total * keep + tl.sum(p, axis=1)
        p = p.to(v.dtype)
        if UPCAST:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * keep[:, None] + tl.dot(p, v, input_precision=PRECISION)
        best = new_best
    if owner:  # the new slot, seen by every query; no program reads it from memory in this launch
        # stored after the loop: a store before it would hold the loop's first loads behind the rope's
        tl.store(k_rows + i.to(tl.int64) * stride_ks + rd, k_new)
        tl.store(v_rows + i.to(tl.int64) * stride_vs + rd, v_new)
        fresh = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale  # [GP]
        new_best = tl.maximum(best, fresh)
        p = tl.exp(fresh - new_best)
        keep = tl.exp(best - new_best)
        total = total * keep + p
        p = p.to(dtype).to(tl.float32)
        acc = acc * keep[:, None] + p[:, None] * v_new.to(tl.float32)[None, :]
        best = new_best
    if SPLITS == 1:
        out = acc / total[:, None]
        tl.store(out_ptr + b * stride_ob + h * stride_oh + rg[:, None] * stride_og + rd[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])  # fmt: skip
    else:
        cell = (pid * SPLITS + split).to(tl.int64) * GP + rg  # [GP] rows of this split's partials
        tl.store(part_ptr + cell[:, None] * D + rd[None, :], acc)
        tl.store(stat_ptr + 2 * cell, best)
        tl.store(stat_ptr + 2 * cell + 1, total)


@triton.jit
def _combine_kernel(
    part_ptr, stat_ptr, out_ptr, kv_heads, stride_ob, stride_oh, stride_og,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, USE_GDC: tl.constexpr,
):  # fmt: skip
    """One KV head of one row: the splits' partial softmax sums rescaled to their common max and added."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    b = pid // kv_heads
    h = pid % kv_heads
    rg = tl.arange(0, GP)
    rd = tl.arange(0, D)
    base = pid.to(tl.int64) * SPLITS * GP + rg
    best = tl.full([GP], float("-inf"), tl.float32)
    for split in range(SPLITS):
        best = tl.maximum(best, tl.load(stat_ptr + 2 * (base + split * GP)))
    total = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    for split in range(SPLITS):
        cell = base + split * GP
        weight = tl.exp(tl.load(stat_ptr + 2 * cell) - best)  # 0 for a split that saw nothing (max -inf)
        total += weight * tl.load(stat_ptr + 2 * cell + 1)
        acc += weight[:, None] * tl.load(part_ptr + cell[:, None] * D + rd[None, :])
    out = acc / total[:, None]
    tl.store(out_ptr + b * stride_ob + h * stride_oh + rg[:, None] * stride_og + rd[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(rg < G)[:, None])  # fmt: skip


@functools.cache
def _processors(device: torch.device) -> int:
    """Streaming multiprocessors of a GPU (128 elsewhere: the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 128


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
    window: int | None = None,
    block: int = _BLOCK,
    split: int | None = None,
) -> torch.Tensor:
    """Rope, cache write and attention of one new token per sequence.

    Args:
        q: ``[B, H_kv, G, D]``, the new token's query heads before rope, the ``G`` heads that share each KV head
            (grouped-query attention) together; ``D`` a power of two, at least 16.
        k, v: ``[B, H_kv, D]``, its key (before rope) and value.
        cos, sin: ``[P, D]`` with ``P >= S``, the rope tables of positions ``0 … P-1``: row ``b`` takes the row
            of its token's position ``max(slot - pad[b], 0)``.
        keys, values: ``[B_max, H_kv, S, D]`` (``B_max >= B``), the whole cache: rows ``< B`` get the roped key and
            the value at slot ``slot``; nothing else is written.
        slot: int64 ``[1]`` on the device, the token's cache slot ``i`` (``< S``).
        pad: int64 ``[B]``, each row's left-padding slots.
        scale: the factor on ``q·k`` (``1/sqrt(D)`` usually). window: a sliding window, or None.
        block: cache slots per step of the loop (a power of two >= 16); for tests.
        split: cache slots per program (a multiple of ``block``): a cache of more slots is split across programs
            (while there are fewer programs than processors) whose partial sums a second kernel adds; for tests.
            Default: :data:`_SPLIT_FEW` for at most :data:`_FEW_PROGRAMS` programs (``B * H_kv``), else
            :data:`_SPLIT`.

    Returns:
        ``[B, H_kv, G, D]`` in ``q``'s dtype.
    """
    batch, kv_heads, groups, dim = q.shape
    if keys.shape != values.shape or keys.shape[0] < batch or keys.shape[1] != kv_heads or keys.shape[3] != dim:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} needs a cache [B_max >= B, H_kv, S, D] of the same "
                         f"H_kv and D; got keys {tuple(keys.shape)} and values {tuple(values.shape)}")  # fmt: skip
    if k.shape != (batch, kv_heads, dim) or v.shape != k.shape:
        raise ValueError(f"decode_attention: for q {tuple(q.shape)}, k and v must be [B, H_kv, D]; got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")  # fmt: skip
    if cos.dim() != 2 or cos.shape[1] != dim or cos.shape[0] < keys.shape[2] or sin.shape != cos.shape or \
            sin.stride() != cos.stride():  # fmt: skip
        raise ValueError(f"decode_attention: cos and sin must be rope tables [P >= S, D] covering the cache's "
                         f"{keys.shape[2]} slots; got {tuple(cos.shape)} and {tuple(sin.shape)}")  # fmt: skip
    if dim < 16 or dim & (dim - 1):
        raise ValueError(f"decode_attention takes a head dimension that is a power of two >= 16, got {dim}")
    if slot.numel() != 1 or pad.shape != (batch,):
        raise ValueError(f"decode_attention: slot must hold one value and pad one per row; got {tuple(slot.shape)} "
                         f"and {tuple(pad.shape)} for {batch} rows")  # fmt: skip
    few = batch * kv_heads <= _FEW_PROGRAMS
    if split is None:
        split = _SPLIT_FEW if few else _SPLIT
    if block < 16 or block & (block - 1) or split % block:
        raise ValueError(f"decode_attention: block must be a power of two >= 16 dividing split; got {block}, {split}")
    if any(t.stride(-1) != 1 for t in (q, k, v, cos, sin, keys, values)):
        raise ValueError("decode_attention needs every tensor contiguous in its last dimension")
    out = torch.empty((batch, kv_heads, groups, dim), dtype=interpreter.store_dtype(q.dtype), device=q.device)
    if not (batch and kv_heads and groups):
        return out.to(q.dtype)
    padded = max(16, triton.next_power_of_2(groups))
    programs = batch * kv_heads
    # split only while programs are fewer than processors: at batch 16 (80 programs, 4096 slots) eight splits ran
    # slower than none, at batch 1 (5 programs) several times faster
    splits = max(1, min(triton.cdiv(keys.shape[2], split), _processors(q.device) // programs))
    part = stats = out  # unused with one split
    if splits > 1:
        part = torch.empty((programs * splits * padded, dim), dtype=torch.float32, device=q.device)
        stats = torch.empty((programs * splits * padded, 2), dtype=torch.float32, device=q.device)
    # inside static_weights() on Hopper (the engine's decode step): the kernel's programs are launched while the
    # q/k/v product before it finishes, and wait for it before reading anything
    dependent = packed.launches_dependently(q.device)
    launch = {"launch_pdl": True} if dependent else {}
    _decode_attention_kernel[(programs, splits)](
        q, k, v, cos, sin, keys, values, slot, pad, out, part, stats, kv_heads, scale, window or 0,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        G=groups, GP=padded, D=dim, BS=block, SPLIT=split, SPLITS=splits, HAS_WINDOW=window is not None,
        UPCAST=_UPCAST_DOTS, PRECISION="ieee" if q.dtype == torch.float32 or _UPCAST_DOTS else "tf32",
        num_warps=_WARPS_FEW if few else 4,
        USE_GDC=dependent, **launch,
    )  # fmt: skip
    if splits > 1:
        _combine_kernel[(programs,)](
            part, stats, out, kv_heads, out.stride(0), out.stride(1), out.stride(2),
            G=groups, GP=padded, D=dim, SPLITS=splits, num_warps=4, USE_GDC=dependent, **launch,
        )  # fmt: skip
    return out.to(q.dtype)
