"""One dispatch between the reference math (:mod:`bittern.quant`) and the Triton kernels.

Layers call the functions here, never a backend directly. Which backend runs:

* ``auto`` (the default): the Triton kernels for CUDA tensors when Triton is installed; for CPU tensors the native
  CPU kernels of the packed products (:mod:`bittern.kernels.cpu`, compiled on first use; ``BITTERN_CPU_KERNELS=0``
  turns them off); the reference otherwise;
* ``reference``: always :mod:`bittern.quant` (the baseline every kernel is tested against);
* ``triton``: always the kernels — an error if Triton is missing, or if a tensor is on the CPU without
  ``TRITON_INTERPRET=1`` (Triton's interpreter, slow: how CI tests the kernels on CPU).

Choose with the ``BITTERN_KERNELS`` environment variable, :func:`set_backend`, or the :func:`use_backend`
context manager. Triton is imported only when a kernel first runs, so CPU-only installs never import it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from types import ModuleType

import torch

from bittern import packing, quant, reference
from bittern.kernels import cpu, interpreter

BACKENDS = ("auto", "reference", "triton")
_ENV = "BITTERN_KERNELS"
_backend: str | None = None  # None: read the environment variable
# Looked up once (find_spec imports nothing): torch.compile cannot trace importlib, but reads a module global.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None

DECODE_MAX_TOKENS = 3
"""Token counts up to this run on the decode kernel (:mod:`bittern.kernels.packed`); more go to the prefill path. The
decode kernel's cost grows with every token it serves, :mod:`bittern.kernels.packed_gemm`'s hardly over a few tokens: on
Hopper, for a 2B4T block's launches on an int8 input under dependent launch, the decode kernel is the faster up to 3
tokens and the tensor-core product from 4 (docs/notes/inference-tuning.md)."""


CPU_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes the native CPU kernels read and write."""
CPU_DENSE_MAX_ROWS = 8
"""Token counts up to this run a 16-bit dense layer (an LM head) on the native CPU GEMV; more go to PyTorch."""


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def backend() -> str:
    """The chosen backend: :func:`set_backend`'s, else ``$BITTERN_KERNELS``, else ``auto``."""
    if _backend is not None:
        return _backend
    value = os.environ.get(_ENV, "auto") or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{_ENV}={value!r} names no kernel backend; choose one of {', '.join(BACKENDS)}")
    return value


def set_backend(name: str | None) -> None:
    """Choose ``auto``, ``reference`` or ``triton`` for this process; None goes back to ``$BITTERN_KERNELS``."""
    global _backend
    _backend = None if name is None else _check(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block with another backend, then restore the previous choice."""
    global _backend
    previous = _backend
    _backend = _check(name)
    try:
        yield
    finally:
        _backend = previous


@contextlib.contextmanager
def static_weights() -> Iterator[None]:
    """A block whose packed weights no queued kernel writes (a loaded model's): there, on Hopper and newer, the
    decode kernels overlap the kernel before them (:func:`bittern.kernels.packed.static_weights`). Without Triton
    it changes nothing."""
    if not triton_available():
        yield
        return
    from bittern.kernels import packed

    with packed.static_weights():
        yield


def triton_available() -> bool:
    """Whether Triton is importable (nothing is imported to find out)."""
    return _TRITON_FOUND


def uses_triton(t: torch.Tensor) -> bool:
    """Whether an operation on ``t`` runs on the Triton kernels under the current backend."""
    chosen = backend()
    if chosen == "reference":
        return False
    if chosen == "auto":
        return t.is_cuda and triton_available()
    if not triton_available():
        raise RuntimeError(f"kernel backend 'triton' was chosen but Triton is not installed (pip install triton); "
                           f"unset {_ENV} or choose 'reference'")  # fmt: skip
    if not t.is_cuda and not interpreter.active():
        raise RuntimeError(f"kernel backend 'triton' got a tensor on {t.device}: the kernels need a CUDA GPU, or "
                           f"TRITON_INTERPRET=1 to run (slowly) in Triton's interpreter")  # fmt: skip
    return True


def native_cpu(x: torch.Tensor) -> bool:
    """Whether a packed product on ``x`` runs on the native CPU kernels (:mod:`bittern.kernels.cpu`): a CPU tensor
    under the ``auto`` backend, outside torch.compile, the kernels enabled and built (on first use)."""
    return x.device.type == "cpu" and backend() == "auto" and not torch.compiler.is_compiling() and cpu.available()


def _ops() -> ModuleType:
    from bittern.kernels import ops

    return ops


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer returns for input ``x``: autocast's dtype inside an autocast region (as
    ``nn.Linear`` does), else ``x.dtype``."""
    device_type = x.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def ternary_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    per_channel: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The training-time ternary linear at λ = 1 (:func:`bittern.quant.ternary_linear_ste` semantics).

    Args:
        x: ``[..., K]`` floating activations, quantized per token.
        weight: latent ``[N, K]`` weight, ternarized per call (per tensor, or per row with ``per_channel``).
        bias: ``[N]`` or None, never quantized.
        out_dtype: dtype of the result; defaults to :func:`output_dtype`.

    Returns:
        ``[..., N]``; gradients to ``x``, ``weight`` and ``bias`` by the straight-through estimator.
    """
    out_dtype = out_dtype or output_dtype(x)
    if uses_triton(x):
        return _ops().ternary_linear(x, weight, bias, per_channel, out_dtype)
    return quant.ternary_linear_ste(x, weight, bias, per_channel, out_dtype)


def integer_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Fixed int8 ``codes`` ``[N, K]`` and float32 ``scale``: ``[..., K]`` → ``[..., N]``
    (:func:`bittern.quant.integer_linear`, bit-identical on either backend). When ``x`` (or ``bias``) needs a
    gradient, it gets the straight-through one (:func:`bittern.quant.frozen_ternary_linear`); the codes never do.
    """
    out_dtype = out_dtype or output_dtype(x)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    if uses_triton(x):
        ops = _ops()
        return (ops.frozen_ternary_linear if needs_grad else ops.integer_linear)(x, codes, scale, bias, out_dtype)
    return (quant.frozen_ternary_linear if needs_grad else quant.integer_linear)(x, codes, scale, bias, out_dtype)


def packed_linear(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    out_features: int,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """:func:`integer_linear` with the codes given packed: uint8 ``[ceil(N/4), K]`` in the Hugging Face layout
    (:mod:`bittern.packing`), ``N = out_features``. ``[..., K]`` → ``[..., N]``, bit-identical on either backend.

    Without gradients, the Triton backend multiplies straight from the packed bytes (no unpacked copy of the
    weight: :mod:`bittern.kernels.packed`), and so do the native CPU kernels for CPU tensors
    (:mod:`bittern.kernels.cpu`). Under ``torch.compile`` the Triton backend's activations are quantized by traced
    PyTorch (:func:`bittern.quant.quantize_activations`, which inductor fuses into the kernel that produces ``x``, the
    norm before each projection) and the kernels take the int8 input; eagerly, the kernels' own quantization is
    cheaper than PyTorch's several launches. When ``x`` or ``bias`` needs a gradient, the codes are unpacked and
    :func:`integer_linear` gives the straight-through one.
    """
    out_dtype = out_dtype or output_dtype(x)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    if not needs_grad and uses_triton(x):
        if torch.compiler.is_compiling():  # quantized by traced code: inductor fuses it into the producer of x
            xq, act_scale = quant.quantize_activations(x)
            return _ops().packed_quantized(xq, act_scale, [packed_weight], [out_features], [scale], bias, out_dtype)[0]
        return _ops().packed_linear(x, packed_weight, out_features, scale, bias, out_dtype)
    if not needs_grad and native_cpu(x):
        return cpu.packed_linear(x, packed_weight, out_features, scale, bias, out_dtype)
    return integer_linear(x, unpack_codes(packed_weight, out_features), scale, bias, out_dtype)


def unpack_codes(packed_weight: torch.Tensor, out_features: int) -> torch.Tensor:
    """:func:`bittern.packing.unpack_ternary_rows` (uint8 ``[ceil(N/4), K]`` → int8 codes ``[N, K]``), in one Triton
    pass on the Triton backend outside torch.compile (the PyTorch version makes several passes and temporaries)."""
    if not torch.compiler.is_compiling() and uses_triton(packed_weight):
        return _ops().unpack_codes(packed_weight, out_features)
    return packing.unpack_ternary_rows(packed_weight, out_features)


def packed_linear_group(
    x: torch.Tensor,
    packed_weights: list[torch.Tensor],
    out_features: list[int],
    scales: list[torch.Tensor],
    out_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """:func:`packed_linear` of two or three bias-free layers on the same input ``x`` ``[..., K]``, without
    gradients: on the Triton backend (the scales all per tensor or all per row) one launch for every layer — the
    decode kernel up to :data:`DECODE_MAX_TOKENS` tokens with ``K % 4 == 0``, else the activations quantized once
    and one launch of the on-chip-unpacking tensor-core product; on the native CPU kernels one call (the activations
    quantized once, every layer's rows in one parallel pass); one :func:`packed_linear` per layer otherwise.
    Each result equals that layer's :func:`packed_linear` exactly.
    """
    out_dtype = out_dtype or output_dtype(x)
    if not (torch.is_grad_enabled() and x.requires_grad) and native_cpu(x):
        return cpu.packed_linear_group(x, packed_weights, out_features, scales, out_dtype)
    grouped = (
        not (torch.is_grad_enabled() and x.requires_grad)
        and 2 <= len(packed_weights) <= 3
        and len({s.numel() != 1 for s in scales}) == 1
        and uses_triton(x)
    )
    if grouped and torch.compiler.is_compiling():
        xq, act_scale = quant.quantize_activations(x)
        return _ops().packed_quantized(xq, act_scale, packed_weights, out_features, scales, None, out_dtype)
    if grouped:
        return _ops().packed_linear_group(x, packed_weights, out_features, scales, out_dtype)
    return [
        packed_linear(x, w, n, s, None, out_dtype) for w, n, s in zip(packed_weights, out_features, scales, strict=True)
    ]


def packed_quantized(
    xq: torch.Tensor,
    act_scale: torch.Tensor,
    packed_weights: list[torch.Tensor],
    out_features: list[int],
    scales: list[torch.Tensor],
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> list[torch.Tensor]:
    """The packed product of an input quantized beforehand: int8 ``xq`` ``[..., K]`` and its float32 scales
    ``[..., 1]`` (:func:`bittern.quant.quantize_activations`, or :func:`rms_norm` with ``quantize``); one layer
    (its bias allowed) or two or three bias-free layers. One ``[..., N_i]`` per layer in ``out_dtype``, equal to
    :func:`packed_linear` of the unquantized input bit for bit. Triton backend: one launch for the group; native CPU
    kernels: one call; reference: each layer from its unpacked codes."""
    if uses_triton(xq):
        return _ops().packed_quantized(xq, act_scale, packed_weights, out_features, scales, bias, out_dtype)
    if native_cpu(xq):
        return cpu.packed_quantized(xq, act_scale, packed_weights, out_features, scales, bias, out_dtype)
    return [
        quant.linear_from_integers(xq, act_scale, packing.unpack_ternary_rows(w, n), s, bias if i == 0 else None).to(
            out_dtype
        )
        for i, (w, n, s) in enumerate(zip(packed_weights, out_features, scales, strict=True))
    ]


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    quantize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Residual add, a Hugging Face ``LlamaRMSNorm``'s forward and, with ``quantize``, the per-token int8
    quantization of its output: ``(s, y, (yq, a) or None)`` with ``s = x + residual`` (``x`` if None),
    ``y = weight * (s_f32 * rsqrt(mean(s_f32²) + eps)).to(s.dtype)``, ``(yq, a) = quantize_activations(y)``.
    ``x`` ``[..., D]``; ``y`` in ``promote_types(weight.dtype, x.dtype)``. On the Triton backend (outside
    torch.compile) one kernel (:mod:`bittern.kernels.norms`); on the native CPU kernels one call
    (:func:`bittern.kernels.cpu.rms_norm`; the quantization, if asked for, another); else PyTorch, the module's own
    formula."""
    if not torch.compiler.is_compiling() and uses_triton(x):
        from bittern.kernels import norms

        if norms.applies(x):
            return norms.rms_norm(x, weight, eps, residual, quantize)
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if not wants_grad and native_cpu(x) and x.dtype in CPU_FLOATS and weight.dtype in CPU_FLOATS:
        summed, y = cpu.rms_norm(x, weight, eps, residual)
        return summed, y, cpu.quantize_activations(y) if quantize else None
    return reference.rms_norm(x, weight, eps, residual, quantize)


def dense_linear_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`dense_linear` runs on ``x`` ``[..., K]`` and ``weight`` ``[N, K]``: the Triton backend, both
    of one floating dtype (no autocast), no gradient wanted, and where the kernels beat cuBLAS on Hopper
    (BENCHMARKS.md, ``benchmarks/lm_head.py``): one row (a decode step of one sequence), or up to 16 rows of a
    weight of at least :data:`bittern.kernels.dense.FEW_ROWS_MIN_FEATURES` outputs (an LM head)."""
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if wants_grad or output_dtype(x) != x.dtype:
        return False
    if native_cpu(x):
        rows = x.numel() // max(x.shape[-1], 1)
        return x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16) and rows <= CPU_DENSE_MAX_ROWS
    if not uses_triton(x):
        return False
    from bittern.kernels import dense

    one_row = x.numel() == x.shape[-1]
    return dense.applies(x, weight) and (one_row or weight.shape[0] >= dense.FEW_ROWS_MIN_FEATURES)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a few rows on the Triton backend (where :func:`dense_linear_applies`): a
    dense layer's decode step, streaming the weights faster than cuBLAS's kernels for those shapes
    (:mod:`bittern.kernels.dense`); on the CPU, the native 16-bit GEMV (:func:`bittern.kernels.cpu.dense_linear`).
    ``[..., N]`` in ``x``'s dtype."""
    if x.device.type == "cpu":
        return cpu.dense_linear(x, weight, bias)
    return _ops().dense_linear(x, weight, bias)


def decode_attention_applies(q: torch.Tensor) -> bool:
    """Whether :func:`decode_attention` runs on ``q`` ``[B, H_kv, G, D]``: no gradient wanted, and the Triton backend
    with a head dimension that is a power of two of at least 16, or the native CPU kernels with an even one."""
    dim = q.shape[-1]
    if torch.is_grad_enabled() and q.requires_grad:
        return False
    if native_cpu(q):
        return dim % 2 == 0 and q.dtype in CPU_FLOATS
    return dim >= 16 and dim & (dim - 1) == 0 and uses_triton(q)


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
) -> torch.Tensor:
    """The decode step's attention on the Triton backend (where :func:`decode_attention_applies`), rope and cache
    write included: the new token's query heads ``q`` ``[B, H_kv, G, D]``, key ``k`` and value ``v``
    ``[B, H_kv, D]`` (before rope), the rope tables ``cos`` / ``sin`` ``[P >= S, D]`` (the kernel reads row
    ``max(slot - pad[b], 0)``) and the cache slot ``slot`` (int64 ``[1]``). Writes the roped key and the value
    into the cache ``keys`` / ``values`` ``[B_max, H_kv, S, D]`` at that slot, then attends over the slots each
    row sees, from its padding ``pad`` (int64 ``[B]``) to the new one (within ``window``, if any), reading only
    those (:mod:`bittern.kernels.attention`; on the CPU :func:`bittern.kernels.cpu.decode_attention`).
    ``[B, H_kv, G, D]``."""
    if q.device.type == "cpu":
        return cpu.decode_attention(q, k, v, cos, sin, keys, values, slot, pad, scale, window)
    return _ops().decode_attention(q, k, v, cos, sin, keys, values, slot, pad, scale, window)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 quantization (:func:`bittern.quant.quantize_activations`): ``(xq int8, a float32 [..., 1])``."""
    if uses_triton(x):
        from bittern.kernels import quantizers

        return quantizers.quantize_activations(x)
    return quant.quantize_activations(x)


def ternarize(weight: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternarize ``[N, K]`` (:func:`bittern.quant.ternarize`): ``(codes int8, s float32 [1] or [N])``."""
    if uses_triton(weight):
        from bittern.kernels import quantizers

        return quantizers.ternarize(weight, per_channel)
    return quant.ternarize(weight, per_channel)
