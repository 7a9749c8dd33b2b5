"""A dense (bfloat16 / float16 / float32) linear layer over a few rows, in Triton: a decode step's LM head, and the
projections of a bf16 checkpoint at one row.

At decode the LM head multiplies one row per sequence by the whole embedding matrix (2B4T: 128256 x 2560 in
bfloat16, 657 MB), a large share of a ternary decode step, bound by how fast the weight streams from memory. On
Hopper these kernels stream it faster than cuBLAS's at 1 to 16 rows, and at one row they beat cuBLAS on the 2B4T
projection shapes too, which makes the bf16 engine's decode step faster (BENCHMARKS.md, ``benchmarks/lm_head.py``).
Each program owns a block of output features and streams their weight rows once, whatever the number of rows of
``x``:

* one row (:func:`_one_row_kernel`): elementwise products accumulated in float32 ``[BN, BK]`` and summed at the
  end, no tensor cores;
* 2 to :data:`MAX_ROWS` rows (:func:`_few_rows_kernel`): ``tl.dot`` of the weight block with ``x``'s columns
  padded to 16, float32 accumulation (IEEE for float32 operands, no TF32).

Both accumulate in float32 and round once to ``x``'s dtype, as ``F.linear`` does; the order of additions differs,
as between cuBLAS's own kernels. Import through :mod:`bittern.kernels` (lazily).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bittern.kernels import interpreter, packed

MAX_ROWS = 16
"""Most rows of ``x`` the kernels take (one ``tl.dot`` column block); more go to ``F.linear``."""

FEW_ROWS_MIN_FEATURES = 32768
"""Fewest output features for which the engine takes :func:`_few_rows_kernel` (2 to 16 rows) over cuBLAS; one row
takes :func:`_one_row_kernel` at any width. At 4 and 16 rows the kernel beats cuBLAS on the 2B4T LM head (128256
features) and loses on the 2B4T projections (640 to 6912 features; BENCHMARKS.md, ``benchmarks/lm_head.py``), whose
few programs of 64 features leave most of the GPU idle."""

_ONE_ROW_TILE = (8, 512, 4)
"""(features per program, columns per step, warps) of :func:`_one_row_kernel`: the fastest of a sweep on Hopper for
the 2B4T LM head (128256 x 2560, bf16), narrowly ahead of (16, 512, 4), (32, 512, 8) and (8, 256, 2)."""

_FEW_ROWS_TILE = (64, 128, 4)
"""(features per program, columns per step, warps) of :func:`_few_rows_kernel`: the fastest of a sweep on Hopper for
the 2B4T LM head (128256 x 2560, bf16) at 4 and 16 rows, ahead of (64, 256, 8) and (32, 256, 4)."""

_UPCAST_DOTS = interpreter.ON_IMPORT
"""Triton's interpreter multiplies bf16 tiles wrongly (see :mod:`bittern.kernels.matmul`): there the operands are
widened to float32, which leaves every product unchanged."""

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes the kernels take (``x`` and the weight alike)."""


@triton.jit
def _one_row_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, N, stride_w,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_GDC: tl.constexpr,
):  # fmt: skip
    """``y[n] = sum_k x[k] * w[n, k] (+ b[n])`` for the ``BN`` features of program ``pid``, in float32."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()  # x may be the previous kernel's
        tl.extra.cuda.gdc_launch_dependents()
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    ok = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for start in tl.static_range(0, K, BK):
        cols = start + tl.arange(0, BK)
        k_ok = cols < K
        w = tl.load(w_rows + cols[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptr + cols, mask=k_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _few_rows_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, stride_x, stride_w, stride_y,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, MP: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, USE_GDC: tl.constexpr,
):  # fmt: skip
    """``y[m, n] = sum_k x[m, k] * w[n, k] (+ b[n])`` for the ``BN`` features of program ``pid`` and all ``M <= MP``
    rows: ``[BN, BK] @ [BK, MP]`` products accumulated in float32."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    ok = rows < N
    rm = tl.arange(0, MP)
    m_ok = rm < M
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros([BN, MP], dtype=tl.float32)
    for start in tl.static_range(0, K, BK):
        cols = start + tl.arange(0, BK)
        k_ok = cols < K
        w = tl.load(w_rows + cols[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0)
        xt = tl.load(x_ptr + rm[None, :] * stride_x + cols[:, None], mask=m_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:
            w = w.to(tl.float32)
            xt = xt.to(tl.float32)
        acc = tl.dot(w, xt, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + rm[None, :] * stride_y + rows[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=ok[:, None] & m_ok[None, :])  # fmt: skip


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`dense_linear` takes ``x`` ``[..., K]`` and ``weight`` ``[N, K]``: both of one floating dtype,
    at most :data:`MAX_ROWS` rows, the weight contiguous in its rows."""
    return (
        x.dtype in _DTYPES
        and weight.dtype == x.dtype
        and weight.dim() == 2
        and x.shape[-1] == weight.shape[1] > 0
        and weight.stride(-1) == 1
        and 0 < x.numel() // x.shape[-1] <= MAX_ROWS
    )


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a few rows (where :func:`applies`).

    Args:
        x: ``[..., K]`` float32 / bfloat16 / float16, at most :data:`MAX_ROWS` rows.
        weight: ``[N, K]`` of ``x``'s dtype, each row contiguous.
        bias: ``[N]`` or None.

    Returns:
        ``[..., N]`` in ``x``'s dtype.
    """
    if not applies(x, weight):
        raise ValueError(f"dense_linear takes x [..., K] of at most {MAX_ROWS} rows and a weight [N, K] of its "
                         f"floating dtype, contiguous rows; got x {x.dtype} {tuple(x.shape)} and weight "
                         f"{weight.dtype} {tuple(weight.shape)}")  # fmt: skip
    features, width = weight.shape
    if bias is not None and bias.shape != (features,):
        raise ValueError(f"dense_linear: bias {tuple(bias.shape)} does not match the weight's {features} features")
    rows = x.reshape(-1, width)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    count = rows.shape[0]
    y = torch.empty((count, features), dtype=interpreter.store_dtype(x.dtype), device=x.device)
    dependent = packed.launches_dependently(x.device)
    launch = {"launch_pdl": True} if dependent else {}
    bias_arg = bias.contiguous() if bias is not None else weight
    if count == 1:
        block, step, warps = _ONE_ROW_TILE
        _one_row_kernel[(triton.cdiv(features, block),)](
            rows, weight, bias_arg, y, features, weight.stride(0),
            K=width, HAS_BIAS=bias is not None, BN=block, BK=step, USE_GDC=dependent, num_warps=warps, **launch,
        )  # fmt: skip
    else:
        block, step, warps = _FEW_ROWS_TILE
        _few_rows_kernel[(triton.cdiv(features, block),)](
            rows, weight, bias_arg, y, count, features, rows.stride(0), weight.stride(0), y.stride(0),
            K=width, HAS_BIAS=bias is not None, BN=block, BK=step, MP=MAX_ROWS, UPCAST=_UPCAST_DOTS,
            PRECISION="ieee" if x.dtype == torch.float32 or _UPCAST_DOTS else "tf32",
            USE_GDC=dependent, num_warps=warps, **launch,
        )  # fmt: skip
    return y.to(x.dtype).reshape(*x.shape[:-1], features)
