"""The linear layers of a BitNet b1.58 2B4T-shaped model, one pass through all of them, side by side on one GPU.

The stack is every projection of ``--layers`` decoder blocks (30 in 2B4T: 210 layers, 2.08 B weights): q and o
2560x2560, k and v 640x2560, gate and up 6912x2560, down 2560x6912 (N x K), each with its own random weights.
For ``M`` tokens (default 1, 16, 512 and 4096) the stack runs, per variant:

* ``bittern``: :class:`bittern.nn.TernaryLinear` on the Triton kernels — for M <= 16 the dp4a decode kernel
  reading the 2-bit packed weights in place with the activation quantization fused in; beyond, the codes
  unpacked in one pass and the int8 tensor-core GEMM; exact int32 accumulation, bf16 output;
* ``bf16``: ``nn.Linear`` in bf16 with the same ternary values (cuBLAS);
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
from bittern.nn import TernaryLinear  # noqa: E402

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
VARIANTS = ("bittern", "bf16", "transformers")


def random_codes(n: int, k: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """int8 ``[N, K]`` codes, a third each of -1, 0 and 1 (the density of trained ternary weights is similar)."""
    return torch.randint(-1, 2, (n, k), generator=generator, device=device, dtype=torch.int8)


def build_layers(projections, blocks: int, device: torch.device, seed: int) -> dict[str, list[nn.Module]]:
    """The three variants' layers over the same codes and scales, one entry per projection of every block."""
    from transformers.integrations.bitnet import BitLinear as HFBitLinear

    generator = torch.Generator(device=device).manual_seed(seed)
    layers: dict[str, list[nn.Module]] = {v: [] for v in VARIANTS}
    for _ in range(blocks):
        for _, n, k in projections:
            codes = random_codes(n, k, generator, device)
            scale = torch.rand(1, generator=generator, device=device) * 0.02 + 0.01
            layers["bittern"].append(TernaryLinear.from_codes(codes, scale).to(device))
            dense = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
            with torch.no_grad():
                dense.weight.copy_(quant.dequantize_weight(codes, scale, torch.bfloat16))
            layers["bf16"].append(dense)
            hf = HFBitLinear(k, n, bias=False, device=device, dtype=torch.bfloat16)
            hf.weight.copy_(packing.pack_ternary_rows(codes))
            hf.weight_scale.copy_((1.0 / scale).to(torch.bfloat16))  # it divides by its scale
            layers["transformers"].append(hf)
            del codes
    return layers


def stack_pass(layers: list[nn.Module], inputs: dict[int, torch.Tensor]) -> Callable[[], None]:
    """One pass over every layer, each fed the input of its width (outputs are discarded)."""

    def run() -> None:
        for layer in layers:
            layer(inputs[layer.in_features])

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
    """Weights read once plus bf16 activations read and written, for one pass over the stack."""
    total = 0
    for _, n, k in projections:
        weight = packing.packed_rows(n) * k if variant != "bf16" else 2 * n * k
        total += blocks * (weight + 2 * tokens * (n + k))
    return total


def check_agreement(layers: dict[str, list[nn.Module]], x: torch.Tensor) -> dict[str, float]:
    """Relative difference of the first layer's output per variant against bittern's reference path."""
    with kernels.use_backend("reference"):
        truth = layers["bittern"][0](x).float()
    out = {}
    for variant, stack in layers.items():
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
                ms, mode = time_pass(stack_pass(layers[variant], inputs), device, args.warmup, repeats)
                moved = bytes_moved(variant, projections, blocks, tokens)
                row[variant] = {
                    "ms": ms,
                    "mode": mode,
                    "bytes": moved,
                    "share_of_copy_bandwidth": None if bandwidth is None else moved / (ms * 1e-3) / bandwidth,
                }
            results["rows"].append(row)
            print(f"M={tokens}: " + ", ".join(f"{v} {row[v]['ms']:.3f} ms" for v in variants), flush=True)
    if device.type == "cuda":
        from bittern.kernels import packed

        results["chosen_tiles"] = {str(key): str(config) for key, config in packed._decode_tuned.cache.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print_table(results, variants)


def print_table(results: dict, variants: list[str]) -> None:
    bw = results["copy_bandwidth_tb_s"]
    print(f"\n{results['layers']} linear layers, {results['weights'] / 1e9:.2f} B weights on {results['device']}"
          + (f"; copy bandwidth {bw:.2f} TB/s (read + write)" if bw else ""))  # fmt: skip
    print(
        "| M | "
        + " | ".join(f"{v} ms" for v in variants)
        + " | bittern × bf16 | transformers × bf16 | bittern % copy bw |"
    )
    print("|---:|" + "---:|" * (len(variants) + 3))
    for row in results["rows"]:
        base = row.get("bf16", {}).get("ms")
        cells = [f"{row[v]['ms']:.3f}" for v in variants]
        speed = f"{base / row['bittern']['ms']:.2f}x" if base and "bittern" in row else "-"
        hf = f"{base / row['transformers']['ms']:.2f}x" if base and "transformers" in row else "-"
        share = row.get("bittern", {}).get("share_of_copy_bandwidth")
        pct = f"{100 * share:.0f}%" if share else "-"
        print(f"| {row['tokens']} | " + " | ".join(cells) + f" | {speed} | {hf} | {pct} |")
    modes = {v: row[v]["mode"] for row in results["rows"] for v in variants}
    print("timing: " + ", ".join(f"{v}: {m}" for v, m in modes.items()))


if __name__ == "__main__":
    main()
