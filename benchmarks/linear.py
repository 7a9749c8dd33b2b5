"""The linear layers of a BitNet b1.58 2B4T-shaped model, one pass through all of them, side by side on one GPU.

The stack is every projection of ``--layers`` decoder blocks (30 in 2B4T: 210 layers, 2.08 B weights): q and o
2560x2560, k and v 640x2560, gate and up 6912x2560, down 2560x6912 (N x K), each with its own random weights.
For ``M`` tokens (default 1, 16, 512 and 4096) the stack runs, per variant:

* ``bittern``: :class:`bittern.nn.TernaryLinear` on the Triton kernels — up to 3 tokens the dp4a decode kernel
  reading the 2-bit packed weights in place with the activation quantization fused in, launched inside
  :func:`bittern.kernels.static_weights` (on Hopper, programmatic dependent launch: each layer's weight read
  overlaps the kernel before it); 4–256 tokens the int8 tensor-core kernel of :mod:`bittern.kernels.packed_gemm`,
  which also reads the packed bytes and expands the codes on chip; beyond, the codes unpacked in one pass and the
  int8 tensor-core GEMM; exact int32 accumulation, bf16 output;
* ``bittern-serial``: the same without :func:`~bittern.kernels.static_weights` (each kernel waits for the one
  before it to finish before it starts);
* ``bittern-grouped``: as ``bittern``, with q/k/v and gate/up each one launch on one activation quantization
  (:func:`bittern.nn.project`, as the engine runs them);
* ``bittern-int8in``: the products given each input already quantized (int8 and its scale, made once per input
  outside the pass; :func:`bittern.kernels.packed.quantized_products`: the decode kernel up to 3 tokens, the
  tensor-core product over the packed bytes up to 256, the unpack pass and the int8 GEMM beyond) — what the
  engine hands them, its norms quantizing their output in the same kernel (inductor's in the compiled decode
  step, :func:`bittern.kernels.rms_norm` in the prompt's forward); the products' own cost without the quantization;
* ``bittern-int8in-grouped``: the same with q/k/v and gate/up each one call, as the engine runs them;
* ``bf16``: ``nn.Linear`` in bf16 with the same ternary values (cuBLAS);
* ``bf16-grouped``: the bf16 weights of q/k/v and of gate/up concatenated, one GEMM each (what bf16 engines do);
* ``transformers``: ``transformers.integrations.bitnet.BitLinear`` (the packed layer stock transformers loads
  ``bitnet`` checkpoints into; it unpacks its weights on every call).

Every variant's stack is captured in one CUDA graph (falling back to eager replay if capture fails, which is then
reported) and replayed: ``--warmup`` untimed, then the median of ``--repeats`` timed replays (CUDA events).
The table gives ms per pass over the stack, the speedup over bf16, and the share of the measured copy bandwidth
the pass achieves (bytes of weights and activations read and written / time, against a device-to-device copy of
``--copy-mib`` MiB timed the same way, counted as read + write).

    python benchmarks/linear.py [--tokens 1,16,512,4096] [--layers 30] [--json out.json]

``--device cpu`` is a dry run on tiny shapes (Triton's interpreter, wall clock) to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# The dry run needs Triton's interpreter, which Triton reads when first imported (torch or transformers may import
# it before main() runs): decide from the command line, before any import that could.
_ARGV = sys.argv[1:]
if "--device=cpu" in _ARGV or any(a == "--device" and b == "cpu" for a, b in itertools.pairwise(_ARGV)):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bittern import kernels, packing, quant  # noqa: E402
from bittern.nn import TernaryLinear, project  # noqa: E402

# (name, N outputs, K inputs) per decoder block, 2B4T
PROJECTIONS = [
    ("q", 2560, 2560),
    ("k", 640, 2560),
    ("v", 640, 2560),
    ("o", 2560, 2560),
    ("gate", 6912, 2560),
    ("up", 6912, 2560),
    ("down", 2560, 6912),
]
TINY_PROJECTIONS = [("q", 64, 64), ("k", 16, 64), ("down", 64, 96)]
VARIANTS = (
    "bittern", "bittern-serial", "bittern-grouped", "bittern-int8in", "bittern-int8in-grouped", "bf16", "bf16-grouped",
    "transformers",
)  # fmt: skip
GROUPS = (("q", "k", "v"), ("gate", "up"))
"""Projections of one input that the grouped variants run together."""
BUILT = ("bittern", "bf16", "transformers")
"""The variants with layers of their own; the others reuse these weights."""


def random_codes(n: int, k: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """int8 ``[N, K]`` codes, a third each of -1, 0 and 1 (the density of trained ternary weights is similar)."""
    return torch.randint(-1, 2, (n, k), generator=generator, device=device, dtype=torch.int8)


def build_layers(projections, blocks: int, device: torch.device, seed: int) -> dict[str, list[nn.Module]]:
    """The three variants' layers over the same codes and scales, one entry per projection of every block."""
    from transformers.integrations.bitnet import BitLinear as HFBitLinear

    generator = torch.Generator(device=device).manual_seed(seed)
    layers: dict[str, list[nn.Module]] = {v: [] for v in BUILT}
    for _ in range(blocks):
        for _, n, k in projections:
            codes = random_codes(n, k, generator, device)
            scale = 1.0 / (torch.rand(1, generator=generator, device=device) * 0.02 + 0.01)  # s_w: codes worth 1/s_w
            layers["bittern"].append(TernaryLinear.from_codes(codes, scale).to(device))
            dense = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
            with torch.no_grad():
                dense.weight.copy_(quant.dequantize_weight(codes, scale, torch.bfloat16))
            layers["bf16"].append(dense)
            hf = HFBitLinear(k, n, bias=False, device=device, dtype=torch.bfloat16)
            hf.weight.copy_(packing.pack_ternary_rows(codes))
            hf.weight_scale.copy_(scale.to(torch.bfloat16))  # bitlinear's weight_scale is s_w: it divides by it
            layers["transformers"].append(hf)
            del codes
    return layers


Step = tuple[Callable[[torch.Tensor], object], int]
"""One call of a pass over the stack, and the width of the input it takes."""


def calls_of(stack: list[nn.Module], projections, grouped: bool) -> list[list[nn.Module]]:
    """The layers of one pass over ``stack`` in call order: one per call, or with ``grouped`` the layers of one
    input (:data:`GROUPS`) together."""
    if not grouped:
        return [[layer] for layer in stack]
    names = [name for name, _, _ in projections]
    calls: list[list[nn.Module]] = []
    for start in range(0, len(stack), len(projections)):
        block = dict(zip(names, stack[start : start + len(projections)], strict=True))
        done: set[str] = set()
        for name in names:
            if name in done:
                continue
            group = next((g for g in GROUPS if name in g), (name,))
            calls.append([block[n] for n in group if n in block])
            done.update(n for n in group if n in block)
    return calls


def steps_of(variant: str, layers: dict[str, list[nn.Module]], projections) -> list[Step]:
    """The calls of one pass over the stack for ``variant``: one per layer, or one per group of layers of one
    input (:data:`GROUPS`) for the grouped variants."""
    base = variant.split("-")[0]
    calls = calls_of(layers[base], projections, variant.endswith("-grouped"))
    return [(_grouped_call(base, members), members[0].in_features) for members in calls]


def prequantized_steps(
    stack: list[nn.Module], inputs: dict[int, torch.Tensor], projections, grouped: bool
) -> list[Step]:
    """``bittern-int8in`` (``-grouped``): the products of each layer (or group) fed its input quantized beforehand,
    once per width."""
    from bittern.kernels import packed

    quantized = {k: quant.quantize_activations(x) for k, x in inputs.items()}

    def call_of(members: list[TernaryLinear]) -> Callable[[torch.Tensor], object]:
        xq, act_scale = quantized[members[0].in_features]
        weights = [m.packed_weight for m in members]
        widths = [m.out_features for m in members]
        scales = [m.weight_scale for m in members]
        return lambda _x: packed.quantized_products(xq, act_scale, weights, widths, scales, None, torch.bfloat16)

    return [(call_of(members), members[0].in_features) for members in calls_of(stack, projections, grouped)]


def _grouped_call(base: str, members: list[nn.Module]) -> Callable[[torch.Tensor], object]:
    if len(members) == 1:
        return members[0]
    if base == "bittern":
        return lambda x: project(x, members)
    fused = nn.Linear(members[0].in_features, sum(m.out_features for m in members), bias=False,
                      device=members[0].weight.device, dtype=members[0].weight.dtype)  # fmt: skip
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in members]))
    return fused


def stack_pass(steps: list[Step], inputs: dict[int, torch.Tensor], static: bool) -> Callable[[], None]:
    """One pass over every step, each fed the input of its width (outputs are discarded); ``static``: inside
    :func:`bittern.kernels.static_weights`."""

    def run() -> None:
        with kernels.static_weights() if static else contextlib.nullcontext():
            for call, width in steps:
                call(inputs[width])

    return run


def time_pass(run: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> tuple[float, str]:
    """Median ms of ``run`` replayed from a CUDA graph (``mode`` says whether capture worked)."""
    for _ in range(max(warmup, 2)):  # also autotunes the kernels before capture
        run()
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times), "eager (cpu)"
    torch.cuda.synchronize()
    replay, mode = run, "eager"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        replay, mode = graph.replay, "cuda graph"
    except Exception as error:  # reported in the table; the eager timing still stands
        mode = f"eager (capture failed: {type(error).__name__})"
        torch.cuda.synchronize()
    for _ in range(warmup):
        replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), mode


def copy_bandwidth(device: torch.device, mib: int, repeats: int) -> float | None:
    """Device-to-device copy bandwidth in bytes/s, read + write counted (None on CPU)."""
    if device.type != "cuda":
        return None
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms, _ = time_pass(lambda: dst.copy_(src), device, warmup=3, repeats=repeats)
    return 2 * src.numel() / (ms * 1e-3)


def bytes_moved(variant: str, projections, blocks: int, tokens: int) -> int:
    """Weights read once, the inputs read (bf16; int8 for the ``int8in`` variants) and the bf16 outputs written,
    for one pass over the stack."""
    input_bytes = 1 if "int8in" in variant else 2
    total = 0
    for _, n, k in projections:
        weight = 2 * n * k if variant.startswith("bf16") else packing.packed_rows(n) * k
        total += blocks * (weight + tokens * (input_bytes * k + 2 * n))
    return total


def check_agreement(layers: dict[str, list[nn.Module]], x: torch.Tensor) -> dict[str, float]:
    """Relative difference of the first layer's output per variant against bittern's reference path."""
    with kernels.use_backend("reference"):
        truth = layers["bittern"][0](x).float()
    out = {}
    for variant, stack in layers.items():
        with kernels.static_weights():
            y = stack[0](x).float()
        out[variant] = ((y - truth).norm() / truth.norm()).item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a tiny dry run)")
    parser.add_argument("--tokens", default="1,16,512,4096", help="comma-separated token counts M")
    parser.add_argument("--layers", type=int, default=30, help="decoder blocks (7 projections each)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--copy-mib", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    device = torch.device(args.device)
    tiny = device.type == "cpu"
    if tiny:
        kernels.set_backend("triton")
    projections = TINY_PROJECTIONS if tiny else PROJECTIONS
    blocks = 1 if tiny else args.layers
    tokens_list = [1, 20] if tiny else [int(t) for t in args.tokens.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    repeats = 2 if tiny else args.repeats

    layers = build_layers(projections, blocks, device, args.seed)
    bandwidth = copy_bandwidth(device, args.copy_mib, repeats)
    widths = sorted({k for _, _, k in projections})
    results: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "layers": blocks * len(projections),
        "weights": blocks * sum(n * k for _, n, k in projections),
        "copy_bandwidth_tb_s": None if bandwidth is None else bandwidth / 1e12,
        "rows": [],
    }
    generator = torch.Generator(device=device).manual_seed(args.seed + 1)
    with torch.inference_mode():
        for tokens in tokens_list:
            inputs = {
                k: torch.randn(tokens, k, generator=generator, device=device, dtype=torch.bfloat16) for k in widths
            }
            agreement = check_agreement(layers, inputs[projections[0][2]])
            row = {"tokens": tokens, "agreement_vs_reference": agreement}
            for variant in variants:
                if variant.startswith("bittern-int8in"):
                    steps = prequantized_steps(layers["bittern"], inputs, projections, variant.endswith("-grouped"))
                else:
                    steps = steps_of(variant, layers, projections)
                run = stack_pass(steps, inputs, static=variant != "bittern-serial")
                ms, mode = time_pass(run, device, args.warmup, repeats)
                moved = bytes_moved(variant, projections, blocks, tokens)
                row[variant] = {
                    "ms": ms,
                    "mode": mode,
                    "bytes": moved,
                    "share_of_copy_bandwidth": None if bandwidth is None else moved / (ms * 1e-3) / bandwidth,
                }
            results["rows"].append(row)
            print(f"M={tokens}: " + ", ".join(f"{v} {row[v]['ms']:.3f} ms" for v in variants if v in row), flush=True)
    if device.type == "cuda":
        from bittern.kernels import packed

        results["chosen_tiles"] = {str(key): str(config) for key, config in packed._decode_tuned.cache.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print_table(results, variants)


def print_table(results: dict, variants: list[str]) -> None:
    """One row per (M, variant): ms per pass, speed against bf16 (grouped variants against bf16-grouped where it
    ran) and the share of the copy bandwidth."""
    bw = results["copy_bandwidth_tb_s"]
    print(f"\n{results['layers']} linear layers, {results['weights'] / 1e9:.2f} B weights on {results['device']}"
          + (f"; copy bandwidth {bw:.2f} TB/s (read + write)" if bw else ""))  # fmt: skip
    print("| M | variant | ms | × bf16 | % copy bw | timing |")
    print("|---:|---|---:|---:|---:|---|")
    for row in results["rows"]:
        for v in (v for v in variants if v in row):
            peer = "bf16-grouped" if v.endswith("-grouped") and "bf16-grouped" in row else "bf16"
            base = row.get(peer, {}).get("ms")
            speed = f"{base / row[v]['ms']:.2f}x" + (" (vs grouped)" if peer != "bf16" else "") if base else "-"
            share = row[v]["share_of_copy_bandwidth"]
            pct = f"{100 * share:.0f}%" if share else "-"
            print(f"| {row['tokens']} | {v} | {row[v]['ms']:.3f} | {speed} | {pct} | {row[v]['mode']} |")


if __name__ == "__main__":
    main()
