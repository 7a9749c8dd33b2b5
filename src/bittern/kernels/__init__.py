"""The kernel dispatch: one table of operations (:data:`OPS`), each with its reference and the implementations of
the backends that replace it.

Layers call the functions here, never a backend directly. Each is one entry of :data:`OPS` (an :class:`Op`): the
reference (:mod:`bittern.quant`, :mod:`bittern.reference`, :mod:`bittern.packing`: the numbers every kernel is tested
against), a Triton implementation (:mod:`bittern.kernels.ops`, the custom ops with their ``torch.compile`` fakes) and
a native CPU one (:mod:`bittern.kernels.cpu`). Which backend runs:

* ``auto`` (the default): the Triton kernels for CUDA tensors when Triton is installed; for CPU tensors the native
  CPU kernels (:mod:`bittern.kernels.cpu`, compiled on first use; ``BITTERN_CPU_KERNELS=0`` turns them off); the
  reference otherwise;
* ``reference``: always the reference;
* ``triton``: always the Triton kernels — an error if Triton is missing, or if a tensor is on the CPU without
  ``TRITON_INTERPRET=1`` (Triton's interpreter, slow: how CI tests the kernels on CPU).

An implementation may decline arguments it does not take (a gradient wanted, a shape its kernel does not handle):
the reference runs them. Choose with the ``BITTERN_KERNELS`` environment variable, :func:`set_backend`, or the
:func:`use_backend` context manager. Triton is imported only when a kernel first runs, so CPU-only installs never
import it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any, NamedTuple

import torch

from bittern import packing, quant, reference
from bittern.kernels import cpu, interpreter, shapes

BACKENDS = ("auto", "reference", "triton")
_ENV = "BITTERN_KERNELS"
_backend: str | None = None  # None: read the environment variable
# Looked up once (find_spec imports nothing): torch.compile cannot trace importlib, but reads a module global.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None

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


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer returns for input ``x``: autocast's dtype inside an autocast region (as
    ``nn.Linear`` does), else ``x.dtype``."""
    device_type = x.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _wants_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an operation on any of ``tensors`` (None entries ignored)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --- the table ------------------------------------------------------------------------------------------------------


class Implementation(NamedTuple):
    """A backend's implementation of an :class:`Op`: ``run`` takes the op's complete arguments; ``applies`` (the same
    arguments; None: always) says whether it takes these — when it does not, the op's reference runs."""

    run: Callable[..., Any]
    applies: Callable[..., bool] | None = None


class Op:
    """One operation of the table: its reference and, per backend, the implementation that replaces it.

    The first argument (a tensor) chooses: the Triton implementation where :func:`uses_triton`, the native CPU one
    where :func:`native_cpu`, else the reference. Every implementation gives the reference's numbers (bit for bit
    where the arithmetic is integer; tests/kernels compare each against it). The Triton implementations call the
    ``torch.library`` custom ops of :mod:`bittern.kernels.ops`, whose fake implementations keep them one graph node
    each under ``torch.compile``.
    """

    def __init__(self, name: str, reference: Callable[..., Any], *, triton: Implementation | None = None,
                 cpu: Implementation | None = None) -> None:  # fmt: skip
        self.name = name
        self.reference = reference
        self.triton = triton
        self.cpu = cpu

    def implementation(self, t: torch.Tensor) -> Implementation | None:
        """The backend implementation an operation on ``t`` goes to under the chosen backend (None: the reference)."""
        if self.triton is not None and uses_triton(t):
            return self.triton
        if self.cpu is not None and native_cpu(t):
            return self.cpu
        return None

    def takes(self, *args: Any) -> bool:
        """Whether a backend implementation (not the reference) runs these arguments."""
        chosen = self.implementation(args[0])
        return chosen is not None and (chosen.applies is None or chosen.applies(*args))

    def __call__(self, *args: Any) -> Any:
        chosen = self.implementation(args[0])
        if chosen is not None and (chosen.applies is None or chosen.applies(*args)):
            return chosen.run(*args)
        return self.reference(*args)

    def __repr__(self) -> str:
        backends = [name for name in ("triton", "cpu") if getattr(self, name) is not None]
        return f"Op({self.name!r}, reference + {' + '.join(backends) or 'nothing else'})"


def _ops() -> ModuleType:
    from bittern.kernels import ops

    return ops


def _quantizers() -> ModuleType:
    from bittern.kernels import quantizers

    return quantizers


def _norms() -> ModuleType:
    from bittern.kernels import norms

    return norms


def _traced() -> bool:
    return torch.compiler.is_compiling()


# references that compose other ops (the packed products from unpacked codes)


def _unpacked_integer_linear(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    out_features: int,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return integer_linear(x, unpack_codes(packed_weight, out_features), scale, bias, out_dtype)


def _layer_by_layer(
    x: torch.Tensor,
    packed_weights: list[torch.Tensor],
    out_features: list[int],
    scales: list[torch.Tensor],
    out_dtype: torch.dtype,
) -> list[torch.Tensor]:
    return [packed_linear(x, w, n, s, None, out_dtype) for w, n, s in zip(packed_weights, out_features, scales,
                                                                             strict=True)]  # fmt: skip


def _quantized_layer_by_layer(
    xq: torch.Tensor,
    act_scale: torch.Tensor,
    packed_weights: list[torch.Tensor],
    out_features: list[int],
    scales: list[torch.Tensor],
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> list[torch.Tensor]:
    layers = zip(packed_weights, out_features, scales, strict=True)
    return [quant.linear_from_integers(xq, act_scale, packing.unpack_ternary_rows(w, n), s,
                                       bias if i == 0 else None).to(out_dtype)
            for i, (w, n, s) in enumerate(layers)]  # fmt: skip


def _reference_integer_linear(
    x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    frozen = _wants_grad(x, bias)  # the straight-through gradient to x and the bias; the codes never get one
    return (quant.frozen_ternary_linear if frozen else quant.integer_linear)(x, codes, scale, bias, out_dtype)


def _triton_integer_linear(
    x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    ops = _ops()
    return (ops.frozen_ternary_linear if _wants_grad(x, bias) else ops.integer_linear)(x, codes, scale, bias,
                                                                                       out_dtype)  # fmt: skip


def _triton_packed_linear(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    out_features: int,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    if _traced():  # quantized by traced code: inductor fuses it into the producer of x (the norm before)
        xq, act_scale = quant.quantize_activations(x)
        return _ops().packed_quantized(xq, act_scale, [packed_weight], [out_features], [scale], bias, out_dtype)[0]
    return _ops().packed_linear(x, packed_weight, out_features, scale, bias, out_dtype)


def _triton_packed_group(
    x: torch.Tensor,
    packed_weights: list[torch.Tensor],
    out_features: list[int],
    scales: list[torch.Tensor],
    out_dtype: torch.dtype,
) -> list[torch.Tensor]:
    if _traced():
        xq, act_scale = quant.quantize_activations(x)
        return _ops().packed_quantized(xq, act_scale, packed_weights, out_features, scales, None, out_dtype)
    return _ops().packed_linear_group(x, packed_weights, out_features, scales, out_dtype)


def _triton_groups(
    x: torch.Tensor,
    packed_weights: list[torch.Tensor],
    out_features: list[int],
    scales: list[torch.Tensor],
    out_dtype: torch.dtype,
) -> bool:
    return not _wants_grad(x) and len(scales) > 1 and shapes.groupable(scales, [None] * len(scales))


def _cpu_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None, quantize: bool
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    summed, y = cpu.rms_norm(x, weight, eps, residual)
    return summed, y, cpu.quantize_activations(y) if quantize else None


def _cpu_norm_applies(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None, quantize: bool
) -> bool:
    return not _wants_grad(x, weight) and x.dtype in CPU_FLOATS and weight.dtype in CPU_FLOATS


def _triton_dense_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if _wants_grad(x, weight) or output_dtype(x) != x.dtype:
        return False
    from bittern.kernels import dense

    one_row = x.numel() == x.shape[-1]
    return dense.applies(x, weight) and (one_row or weight.shape[0] >= dense.FEW_ROWS_MIN_FEATURES)


def _cpu_dense_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if _wants_grad(x, weight) or output_dtype(x) != x.dtype:
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    return x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16) and rows <= CPU_DENSE_MAX_ROWS


def _triton_attention_applies(q: torch.Tensor, *_: Any) -> bool:
    dim = q.shape[-1]
    return not _wants_grad(q) and dim >= 16 and dim & (dim - 1) == 0


def _cpu_attention_applies(q: torch.Tensor, *_: Any) -> bool:
    return not _wants_grad(q) and q.shape[-1] % 2 == 0 and q.dtype in CPU_FLOATS


def _no_grad(x: torch.Tensor, *_: Any) -> bool:
    return not _wants_grad(x)


def _linear_no_grad(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    out_features: int,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> bool:
    return not _wants_grad(x, bias)  # a trainable bias needs the reference's autograd too


def _eager(*_: Any) -> bool:
    return not _traced()


OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op("quantize_activations", quant.quantize_activations,
           triton=Implementation(lambda x: _quantizers().quantize_activations(x)),
           cpu=Implementation(lambda *args: cpu.quantize_activations(*args), lambda x: x.dtype in CPU_FLOATS)),
        Op("ternarize", quant.ternarize,
           triton=Implementation(lambda weight, per_channel: _quantizers().ternarize(weight, per_channel))),
        Op("ternary_linear", quant.ternary_linear_ste,
           triton=Implementation(lambda *args: _ops().ternary_linear(*args))),
        Op("integer_linear", _reference_integer_linear, triton=Implementation(_triton_integer_linear)),
        Op("unpack_codes", packing.unpack_ternary_rows,
           triton=Implementation(lambda w, n: _ops().unpack_codes(w, n), _eager)),
        Op("packed_linear", _unpacked_integer_linear,
           triton=Implementation(_triton_packed_linear, _linear_no_grad),
           cpu=Implementation(lambda *args: cpu.packed_linear(*args), _linear_no_grad)),
        Op("packed_linear_group", _layer_by_layer,
           triton=Implementation(_triton_packed_group, _triton_groups),
           cpu=Implementation(lambda *args: cpu.packed_linear_group(*args), _no_grad)),
        Op("packed_quantized", _quantized_layer_by_layer,
           triton=Implementation(lambda *args: _ops().packed_quantized(*args)),
           cpu=Implementation(lambda *args: cpu.packed_quantized(*args))),
        Op("rms_norm", reference.rms_norm,
           triton=Implementation(lambda *args: _norms().rms_norm(*args),
                                 lambda x, *_: not _traced() and _norms().applies(x)),
           cpu=Implementation(_cpu_rms_norm, _cpu_norm_applies)),
        Op("dense_linear", torch.nn.functional.linear,
           triton=Implementation(lambda *args: _ops().dense_linear(*args), _triton_dense_applies),
           cpu=Implementation(lambda *args: cpu.dense_linear(*args), _cpu_dense_applies)),
        Op("decode_attention", reference.decode_attention,
           triton=Implementation(lambda *args: _ops().decode_attention(*args), _triton_attention_applies),
           cpu=Implementation(lambda *args: cpu.decode_attention(*args), _cpu_attention_applies)),
    )
}  # fmt: skip
"""Every operation the layers and the engine call, by name: its reference and its Triton and native CPU
implementations (see :class:`Op`). The functions below are the typed entry points: each fills in its defaults and
calls its entry."""


# --- the entry points -----------------------------------------------------------------------------------------------


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 quantization (:func:`bittern.quant.quantize_activations`): ``(xq int8, a float32 [..., 1])``."""
    return OPS["quantize_activations"](x)


def ternarize(weight: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternarize ``[N, K]`` (:func:`bittern.quant.ternarize`): ``(codes int8, s float32 [1] or [N])``."""
    return OPS["ternarize"](weight, per_channel)


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
    return OPS["ternary_linear"](x, weight, bias, per_channel, out_dtype or output_dtype(x))


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
    return OPS["integer_linear"](x, codes, scale, bias, out_dtype or output_dtype(x))


def unpack_codes(packed_weight: torch.Tensor, out_features: int) -> torch.Tensor:
    """:func:`bittern.packing.unpack_ternary_rows` (uint8 ``[ceil(N/4), K]`` → int8 codes ``[N, K]``), in one Triton
    pass on the Triton backend outside torch.compile (the PyTorch version makes several passes and temporaries)."""
    return OPS["unpack_codes"](packed_weight, out_features)


def packed_linear(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    out_features: int,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """:func:`integer_linear` with the codes given packed: uint8 ``[ceil(N/4), K]`` in the Hugging Face layout
    (:mod:`bittern.packing`), ``N = out_features``. ``[..., K]`` → ``[..., N]``, bit-identical on every backend.

    Without gradients, the Triton backend multiplies straight from the packed bytes (no unpacked copy of the
    weight: :mod:`bittern.kernels.packed`), and so do the native CPU kernels for CPU tensors
    (:mod:`bittern.kernels.cpu`). Under ``torch.compile`` the Triton backend's activations are quantized by traced
    PyTorch (:func:`bittern.quant.quantize_activations`, which inductor fuses into the kernel that produces ``x``, the
    norm before each projection) and the kernels take the int8 input; eagerly, the kernels' own quantization is
    cheaper than PyTorch's several launches. When ``x`` or ``bias`` needs a gradient, the codes are unpacked and
    :func:`integer_linear` gives the straight-through one.
    """
    return OPS["packed_linear"](x, packed_weight, out_features, scale, bias, out_dtype or output_dtype(x))


def packed_linear_group(
    x: torch.Tensor,
    packed_weights: list[torch.Tensor],
    out_features: list[int],
    scales: list[torch.Tensor],
    out_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """:func:`packed_linear` of bias-free layers on the same input ``x`` ``[..., K]``, without gradients: on the
    Triton backend, where :func:`bittern.kernels.shapes.groupable`, one launch for every layer (the decode kernel up
    to :data:`bittern.kernels.shapes.DECODE_MAX_TOKENS` tokens with ``K % 4 == 0``, else the activations quantized
    once and one launch of the on-chip-unpacking tensor-core product); on the native CPU kernels one call (the
    activations quantized once, every layer's rows in one parallel pass); one :func:`packed_linear` per layer
    otherwise. Each result equals that layer's :func:`packed_linear` exactly."""
    return OPS["packed_linear_group"](x, packed_weights, out_features, scales, out_dtype or output_dtype(x))


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
    ``[..., 1]`` (:func:`bittern.quant.quantize_activations`, or :func:`rms_norm` with ``quantize``), for layers that
    :func:`bittern.kernels.shapes.groupable` accepts. One ``[..., N_i]`` per layer in ``out_dtype``, equal to
    :func:`packed_linear` of the unquantized input bit for bit. Triton backend: one launch for the group; native CPU
    kernels: one call; reference: each layer from its unpacked codes."""
    return OPS["packed_quantized"](xq, act_scale, packed_weights, out_features, scales, bias, out_dtype)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    quantize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Residual add, a Hugging Face ``LlamaRMSNorm``'s forward and, with ``quantize``, the per-token int8
    quantization of its output (:func:`bittern.reference.rms_norm`): ``(s, y, (yq, a) or None)``. ``x``
    ``[..., D]``; ``y`` in ``promote_types(weight.dtype, x.dtype)``. On the Triton backend (outside torch.compile)
    one kernel (:mod:`bittern.kernels.norms`); on the native CPU kernels one call (:func:`bittern.kernels.cpu.rms_norm`;
    the quantization, if asked for, another)."""
    return OPS["rms_norm"](x, weight, eps, residual, quantize)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (the reference), on the backends for the few rows of a 16-bit dense layer's
    decode step, where they beat PyTorch: on the Triton backend (:mod:`bittern.kernels.dense`) one row, or up to 16
    rows of a weight of at least :data:`bittern.kernels.dense.FEW_ROWS_MIN_FEATURES` outputs (an LM head), both of
    one dtype; on the CPU the native 16-bit GEMV (:func:`bittern.kernels.cpu.dense_linear`) up to
    :data:`CPU_DENSE_MAX_ROWS` rows. No gradient, no autocast on those paths. ``[..., N]``."""
    return OPS["dense_linear"](x, weight, bias)


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
    """The decode step's attention with rope and cache write (:func:`bittern.reference.decode_attention`): the new
    token's query heads ``q`` ``[B, H_kv, G, D]``, key ``k`` and value ``v`` ``[B, H_kv, D]`` (before rope), the rope
    tables ``cos`` / ``sin`` ``[P >= S, D]`` and the cache slot ``slot`` (int64 ``[1]``); writes the roped key and
    the value into ``keys`` / ``values`` ``[B_max, H_kv, S, D]`` at that slot and attends over the slots each row
    sees. One kernel on the Triton backend (:mod:`bittern.kernels.attention`, a head dimension that is a power of two
    of at least 16), one call on the native CPU kernels (:func:`bittern.kernels.cpu.decode_attention`, an even
    one). ``[B, H_kv, G, D]``."""
    return OPS["decode_attention"](q, k, v, cos, sin, keys, values, slot, pad, scale, window)


def dense_linear_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`dense_linear` runs ``x`` ``[..., K]`` and ``weight`` ``[N, K]`` on a backend (not PyTorch)."""
    return OPS["dense_linear"].takes(x, weight, None)


def decode_attention_applies(q: torch.Tensor) -> bool:
    """Whether :func:`decode_attention` runs on a backend for the query heads ``q`` ``[B, H_kv, G, D]`` (else the
    caller's own attention is the faster fallback: the reference is written for clarity, row by row)."""
    return OPS["decode_attention"].takes(q)
