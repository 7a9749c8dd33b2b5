"""Native CPU kernels for the ternary linear layer: int8 activations x 2-bit weights, exact integer sums.

The product reads the Hugging Face 2-bit layout (:mod:`bittern.packing`) in place — no conversion at load, no
unpacked copy: one 32-byte load holds 4 output rows x 32 inputs, and each 2-bit field, shifted and masked, is the
unsigned byte ``code + 1`` that ``vpmaddubsw`` / ``vpdpbusd`` multiply with the signed int8 activations; the
``+ 1`` is taken back once per output by subtracting the token's activation sum. Everything is bit-identical to
:func:`bittern.quant.integer_linear` (docs/design.md §2), whatever the instruction set, thread count or shape:
activations quantized per token with the same IEEE float32 steps (``(1 / amax) * 127``, round half to even), the
product summed exactly in int32, ``acc / (s_w * s_x)`` as one product and one division, then the bias, then the
output dtype.

* One token (decode) streams the weights once (a GEMV); several tokens (a prompt) extract each chunk of 2-bit
  fields once into a buffer on the stack and run a tile of tokens over it (a GEMM).
* Work is split over the output rows of all the layers of a call on torch's intra-op thread pool
  (``at::parallel_for``): ``torch.set_num_threads`` applies.
* Instruction sets, picked at run time from what the CPU reports: x86-64 AVX2, AVX-VNNI and AVX-512 VNNI, and
  portable C++ elsewhere; :func:`use_isa` forces a lower one (tests run every one the CPU has).

**How it is built.** The C++ sources ship inside the package (``csrc/``) and are compiled on first use with the
system's C++ compiler into a per-user cache directory (``$BITTERN_CPU_KERNELS_CACHE``, else
``$XDG_CACHE_HOME/bittern/cpu-kernels`` or ``~/.cache/bittern/cpu-kernels``), keyed by a hash of the sources, the
flags, the compiler and the torch build; later processes load the cached library. Not a setup.py extension: pip
would build that in an isolated environment against an unpinned torch (the CUDA build) — compiling against the
torch already installed needs no build-time requirement at all. Not ``torch.utils.cpp_extension.load`` either: it
needs ninja and includes ``torch/extension.h`` (pybind11 and all of ATen), where the kernels need only
``ATen/Parallel.h`` and the operator registration ``torch/library.h``; the two files compile in parallel. The
library registers ``torch.ops.bittern_cpu.*`` (a call costs about as much as any small torch operator). Without a
compiler, or if the build fails, one warning says so and every layer runs on the reference.

``BITTERN_CPU_KERNELS=0`` turns the kernels off (as does ``bittern.kernels.use_backend("reference")``).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

ENV = "BITTERN_CPU_KERNELS"
"""Set to ``0`` to run every CPU layer on the reference instead of the native kernels."""
CACHE_ENV = "BITTERN_CPU_KERNELS_CACHE"
"""Directory of the compiled kernels (default: a ``bittern/cpu-kernels`` directory in the user's cache)."""

ISAS = ("scalar", "avx2", "avxvnni", "avx512vnni")
"""The instruction sets of the kernels, lowest first (``scalar``: portable C++)."""

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = ("ternary_cpu.cpp", "engine_cpu.cpp", "ternary_cpu_ops.cpp")
_HEADERS = ("ternary_cpu.h", "ternary_cpu_simd.inc")
_LIBRARY = "bittern_cpu"

_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet
_linear = None  # torch.ops.bittern_cpu.packed_linear.default, once loaded
_quantized = None


class BuildError(RuntimeError):
    """The kernels could not be compiled (the message holds the compiler's complaint)."""


def enabled() -> bool:
    """Whether ``$BITTERN_CPU_KERNELS`` allows the native kernels (anything but ``0``)."""
    return os.environ.get(ENV, "1") != "0"


def available() -> bool:
    """Whether the native kernels run here: enabled, and compiled and loaded (on the first call, which may take a few
    seconds to compile; later calls and processes reuse the library). Never raises: a failure warns once."""
    if _loaded is None:
        if not enabled():
            return False
        _load()
    return bool(_loaded) and enabled()


def applies(x: torch.Tensor) -> bool:
    """Whether a product on ``x`` can run on the native kernels: a CPU tensor and :func:`available`."""
    return x.device.type == "cpu" and available()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return name
    return None


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bittern" / "cpu-kernels"


def _build_plan(compiler: str) -> tuple[str, list[list[str]], list[str]]:
    """(hash key, compile commands without the output, link flags)."""
    torch_dir = Path(torch.__file__).parent
    torch_lib = torch_dir / "lib"
    openmp = "OpenMP" in torch.__config__.parallel_info().splitlines()[-1]
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    common = [
        "-O3",
        "-fPIC",
        "-DNDEBUG",
        "-ffp-contract=off",  # no fused multiply-adds: every float step is one IEEE operation, as in the reference
        "-fno-math-errno",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{torch_dir / 'include'}",
        f"-I{_CSRC}",
        "-w",
    ]
    if openmp:
        common.append("-fopenmp")
    standard = "-std=c++20" if (major, minor) >= (2, 9) else "-std=c++17"
    compiles = [[compiler, standard, *common, "-c", str(_CSRC / source)] for source in _SOURCES]
    link = ["-shared", f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]
    if openmp:  # link torch's own OpenMP runtime (the one torch.set_num_threads sets) when it ships one
        bundled = sorted(torch_lib.glob("libgomp*.so*"))
        link += [str(bundled[0])] if bundled else ["-fopenmp"]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    digest = hashlib.sha256()
    for name in (*_SOURCES, *_HEADERS):
        digest.update((_CSRC / name).read_bytes())
    for part in (*compiles[0], *link, version, torch.__version__, str(torch.version.git_version), sys.platform):
        digest.update(part.encode())
    return digest.hexdigest()[:20], compiles, link


def build(verbose: bool = False) -> Path:
    """Compile the kernels into :func:`cache_dir` (unless already there) and return the library's path.

    Raises:
        BuildError: no C++ compiler, or the compilation failed.
    """
    compiler = _compiler()
    if compiler is None:
        raise BuildError("no C++ compiler found (looked for $CXX, g++ and c++)")
    key, compiles, link = _build_plan(compiler)
    directory = cache_dir()
    target = directory / f"lib{_LIBRARY}-{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as work:
        objects = [str(Path(work) / f"{Path(source).stem}.o") for source in _SOURCES]
        procs = [
            subprocess.Popen([*cmd, "-o", obj], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for cmd, obj in zip(compiles, objects, strict=True)
        ]
        outputs = [proc.communicate()[0] for proc in procs]
        failed = [(cmd, out) for cmd, out, proc in zip(compiles, outputs, procs, strict=True) if proc.returncode]
        if not failed:
            linked = subprocess.run(
                [compiler, *objects, *link, "-o", str(Path(work) / target.name)], capture_output=True, text=True
            )
            if linked.returncode:
                failed = [(["link"], linked.stdout + linked.stderr)]
        if failed:
            cmd, out = failed[0]
            tail = "\n".join(out.strip().splitlines()[-20:])
            raise BuildError(f"compiling {Path(cmd[-1]).name} failed:\n{tail}")
        if verbose:
            for out in outputs:
                sys.stderr.write(out)
        os.replace(Path(work) / target.name, target)  # atomic: a concurrent build writes the same file
    return target


def _load() -> None:
    global _loaded, _linear, _quantized
    with _lock:
        if _loaded is not None:
            return
        try:
            path = build()
            torch.ops.load_library(str(path))
            ops = torch.ops.bittern_cpu
            _linear = ops.packed_linear.default
            _quantized = ops.packed_quantized.default
            _register_fakes()
            _loaded = True
        except (BuildError, OSError, RuntimeError) as error:
            _loaded = False
            warnings.warn(
                f"bittern: the native CPU kernels are not available ({error}); ternary layers on the CPU run on the "
                f"reference implementation, which is much slower. Install a C++ compiler (g++) to use them, or set "
                f"{ENV}=0 to silence this warning.",
                RuntimeWarning,
                stacklevel=3,
            )


def _register_fakes() -> None:
    """Shapes of the operators' outputs for torch.compile's tracing (the kernels themselves stay opaque)."""

    def outputs(x, out_features, out_dtype):
        return [x.new_empty((*x.shape[:-1], n), dtype=out_dtype) for n in out_features]

    def linear_fake(x, packed, out_features, scales, bias, out_dtype):
        return outputs(x, out_features, out_dtype)

    def quantized_fake(xq, act_scale, packed, out_features, scales, bias, out_dtype):
        return outputs(xq, out_features, out_dtype)

    def quantize_fake(x):
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)

    for name, fn in (("packed_linear", linear_fake), ("packed_quantized", quantized_fake), ("quantize", quantize_fake)):
        with contextlib.suppress(RuntimeError, AttributeError):  # already registered, or an older torch
            torch.library.register_fake(f"{_LIBRARY}::{name}")(fn)


def _require() -> None:
    if not available():
        raise RuntimeError(f"the native CPU kernels are not available (see the warning above, or {ENV}=0)")


# --- the products ------------------------------------------------------------------------------------------------


def packed_linear(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    out_features: int,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """:func:`bittern.quant.integer_linear` of the packed weight, bit for bit.

    Args:
        x: CPU ``[..., K]`` floating activations (float32 and bfloat16 read directly, others upcast to float32 first,
            as the reference does); quantized per token here.
        packed_weight: contiguous uint8 ``[ceil(N/4), K]`` in the Hugging Face layout, ``N = out_features``.
        scale: float32 ``s_w``, ``[1]`` or ``[N]``.
        bias: ``[N]`` or None, added in float32.
        out_dtype: of the result (default ``x.dtype``).

    Returns:
        ``[..., N]`` in ``out_dtype``.
    """
    if _linear is None:
        _require()
    return _linear(x, [packed_weight], [out_features], [scale], bias, out_dtype or x.dtype)[0]


def packed_linear_group(
    x: torch.Tensor,
    packed_weights: Sequence[torch.Tensor],
    out_features: Sequence[int],
    scales: Sequence[torch.Tensor],
    out_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """:func:`packed_linear` of several bias-free layers on one input (q/k/v, gate/up): the activations quantized
    once and every layer's rows in one parallel pass. One ``[..., N_i]`` per layer, each equal to that layer's
    :func:`packed_linear`."""
    if _linear is None:
        _require()
    return _linear(x, list(packed_weights), list(out_features), list(scales), None, out_dtype or x.dtype)


def packed_quantized(
    xq: torch.Tensor,
    act_scale: torch.Tensor,
    packed_weights: Sequence[torch.Tensor],
    out_features: Sequence[int],
    scales: Sequence[torch.Tensor],
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> list[torch.Tensor]:
    """The product of activations quantized beforehand: int8 ``xq`` ``[..., K]`` and float32 ``act_scale``
    ``[..., 1]`` (:func:`bittern.quant.quantize_activations`); one layer (its bias allowed) or several bias-free
    ones. Equal to :func:`packed_linear` of the unquantized input."""
    if _quantized is None:
        _require()
    return _quantized(xq, act_scale, list(packed_weights), list(out_features), list(scales), bias, out_dtype)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`bittern.quant.quantize_activations` (bit for bit): ``(xq int8 [..., K], s_x float32 [..., 1])``."""
    _require()
    return torch.ops.bittern_cpu.quantize.default(x)


def parallel_threads(tasks: int = 64) -> int:
    """How many threads the kernels' thread pool (torch's intra-op pool) runs ``tasks`` tasks on."""
    _require()
    return int(torch.ops.bittern_cpu.parallel_threads.default(tasks))


# --- the engine's other kernels ------------------------------------------------------------------------------


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for float32 / bfloat16 / float16 CPU tensors (a few rows: the LM head of a decode
    step), streaming the weight once with float32 sums (their order is not PyTorch's). ``[..., N]`` in ``x``'s
    dtype."""
    _require()
    return torch.ops.bittern_cpu.dense_linear.default(x, weight, bias)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, y)``: ``s = x + residual`` (``x`` itself without one), ``y = weight * (s_f32 * rsqrt(mean(s_f32²) +
    eps)).to(s.dtype)`` in ``promote_types(weight.dtype, x.dtype)`` — a Hugging Face ``LlamaRMSNorm``'s forward, every
    elementwise rounding where the module rounds, the mean summed in double (it may differ from PyTorch's in the last
    bit). ``x`` ``[..., D]`` float32 / bfloat16 / float16 on the CPU."""
    _require()
    return torch.ops.bittern_cpu.rms_norm.default(x, residual, weight, eps)


def norm_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    packed_weights: Sequence[torch.Tensor],
    out_features: Sequence[int],
    scales: Sequence[torch.Tensor],
    *,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`rms_norm` and the packed layers reading its output in one call: ``(s, [layer(y) for each layer])``,
    ``y`` quantized straight from the norm (never stored). With ``gate`` (and no residual) the norm's input is
    :func:`relu2_mul` ``(gate, x)`` — a BitNet feed-forward's ``ffn_sub_norm(act(gate) * up)`` before
    ``down_proj``. Each output equals :func:`packed_linear` of :func:`rms_norm`'s ``y`` bit for bit; ``bias`` only
    with one layer; outputs in ``out_dtype`` (default ``x.dtype``)."""
    _require()
    out = torch.ops.bittern_cpu.norm_linear.default(
        x, residual, gate, weight, eps, list(packed_weights), list(out_features), list(scales), bias,
        out_dtype or x.dtype,
    )  # fmt: skip
    return out[0], out[1:]


def relu2_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``square(relu(gate)) * up`` (Hugging Face's ``ReLUSquaredActivation`` — BitNet's relu² — times the up
    projection), bit for bit as PyTorch computes it in the tensors' dtype (float32 / bfloat16 / float16, CPU, one
    shape)."""
    _require()
    return torch.ops.bittern_cpu.relu2_mul.default(gate, up)


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
    """:func:`bittern.kernels.decode_attention` on the CPU: the decode step's rope (rounded in the model's dtype as
    the model rounds it), cache write and attention over each row's slots ``[pad[b], slot]`` (within ``window``) in
    one call, float32 sums and softmax. ``q`` ``[B, H_kv, G, D]``, ``k`` / ``v`` ``[B, H_kv, D]``, ``cos`` / ``sin``
    ``[P > slot, D]``, the cache ``[B_max, H_kv, S, D]`` (contiguous, written at ``slot``), all of one dtype; ``slot``
    int64 ``[1]``, ``pad`` int64 ``[B]``. Returns ``[B, H_kv, G, D]``."""
    _require()
    return torch.ops.bittern_cpu.decode_attention.default(q, k, v, cos, sin, keys, values, slot, pad, scale, window)


# --- memory ---------------------------------------------------------------------------------------------------------

HUGE_PAGES_ENV = "BITTERN_HUGE_PAGES"
"""Set to ``0`` to keep a CPU engine's weights where they were loaded (see :func:`huge_page_copies`)."""
_HUGE = 2 << 20


def huge_pages_available() -> bool:
    """Whether :func:`huge_page_copies` can ask for transparent huge pages here (Linux, not turned off)."""
    if os.environ.get(HUGE_PAGES_ENV, "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


_advised: list[tuple[int, int]] = []  # address ranges advised for huge pages (kept; an entry outliving its tensor
# only makes on_huge_pages answer yes for memory reused at that address: nothing wrong, a missed move at worst)


def _record(start: int, end: int) -> None:
    _advised.append((start, end))


def on_huge_pages(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s memory was advised for huge pages here (:func:`advise_huge_pages`,
    :func:`huge_page_block`)."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    return any(lo <= start and end <= hi for lo, hi in _advised)


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Advise the whole 2 MiB pages inside a CPU tensor's memory for transparent huge pages
    (``madvise(MADV_HUGEPAGE)``); call it before the memory is first written (a fresh ``torch.empty``), for the pages
    are chosen when first touched. Weights streamed from memory touch a new 4 KiB page every 4 KiB, and every miss of
    the address translation caches costs a page walk (two nested ones in a virtual machine); 2 MiB pages make 512
    times fewer. Returns whether any page was advised."""
    if not huge_pages_available() or tensor.device.type != "cpu":
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // _HUGE) * _HUGE, end // _HUGE * _HUGE
    if last <= first:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if libc.madvise(first, last - first, mmap.MADV_HUGEPAGE) != 0:
        return False
    _record(start, end)
    return True


def huge_page_block(nbytes: int) -> torch.Tensor:
    """uint8 ``[nbytes]`` in an anonymous mapping advised for transparent huge pages (see :func:`advise_huge_pages`),
    starting on a 2 MiB boundary, untouched (no memory taken until written). Views of the result keep the mapping
    alive."""
    block = mmap.mmap(-1, nbytes + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    block.madvise(mmap.MADV_HUGEPAGE)
    base = torch.frombuffer(block, dtype=torch.uint8)
    start = -base.data_ptr() % _HUGE
    out = base[start : start + nbytes]
    _record(out.data_ptr(), out.data_ptr() + nbytes)
    return out


# --- instruction sets ------------------------------------------------------------------------------------------


def supported_isas() -> list[str]:
    """The instruction sets this CPU runs, lowest first (``scalar`` always)."""
    _require()
    mask = int(torch.ops.bittern_cpu.isas.default())
    return [name for i, name in enumerate(ISAS) if mask >> i & 1]


def isa() -> str:
    """The instruction set the kernels use now (the best supported, unless :func:`use_isa` says otherwise)."""
    _require()
    return ISAS[int(torch.ops.bittern_cpu.isa.default(-2))]


def set_isa(name: str | None) -> str:
    """Use instruction set ``name`` (one of :data:`ISAS`; a higher one than the CPU has gives the best it has), or
    the best one with None; returns the one now in use. Process-wide."""
    _require()
    if name is not None and name not in ISAS:
        raise ValueError(f"unknown instruction set {name!r}; choose one of {', '.join(ISAS)}")
    return ISAS[int(torch.ops.bittern_cpu.isa.default(-1 if name is None else ISAS.index(name)))]


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[str]:
    """Run a block on instruction set ``name`` (see :func:`set_isa`), then restore the previous one."""
    previous = isa()
    try:
        yield set_isa(name)
    finally:
        set_isa(previous)
