"""A dense bf16 linear layer over a few rows, side by side on one GPU: cuBLAS (``F.linear``) against bittern's
Triton kernels (:func:`bittern.kernels.dense.dense_linear`, which the engine runs for a decode step's dense layers).

Shapes (``--shapes``): ``head``, the 2B4T LM head (128256 x 2560, the tied embeddings, 657 MB in bf16), and
``projections``, the four distinct projection shapes of a 2B4T block as a bf16 checkpoint holds them (q/o
2560 x 2560, k/v 640 x 2560, gate/up 6912 x 2560, down 2560 x 6912), which the engine runs on the kernel at one
row only (:func:`bittern.kernels.dense_linear_applies`). Rows of ``x`` per call: ``--rows`` (default 1, 4 and 16;
one row is the decode step of one sequence).

Each call is captured in a CUDA graph of ``--calls`` calls (or one per weight copy, if more) and replayed:
``--warmup`` untimed, then the median of ``--repeats`` timed replays (CUDA events), in µs per call, on random
normal operands. Consecutive calls take consecutive copies of the weight, as many as fill four times the GPU's L2
cache (a projection's weight fits in it, and a graph of calls on one copy would read it from L2; the engine's
layers each stream their own from memory). Bandwidth is the weight's bytes over that time (``x`` and ``y`` are
under 0.1% of them). The table also gives the relative difference of the outputs (‖Δ‖/‖cuBLAS‖): both accumulate
in float32, in different orders.

    python benchmarks/lm_head.py [--shapes head,projections] [--rows 1,4,16] [--json lm_head.json]

``--device cpu`` is a dry run on tiny shapes (Triton's interpreter, wall clock) to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Callable

# The dry run needs Triton's interpreter, which Triton reads when first imported: decide before importing torch.
_ARGV = sys.argv[1:]
if "--device=cpu" in _ARGV or any(a == "--device" and b == "cpu" for a, b in itertools.pairwise(_ARGV)):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import add_timing_options, print_and_save, time_call, versions  # noqa: E402

from bittern.kernels import dense  # noqa: E402

SHAPES = {
    "head": [("lm_head", 128256, 2560)],
    "projections": [("q/o", 2560, 2560), ("k/v", 640, 2560), ("gate/up", 6912, 2560), ("down", 2560, 6912)],
}
"""``(name, N, K)`` of each shape set: the weight is ``[N, K]``."""

TINY = [("tiny", 75, 600)]
"""The dry run's one shape (ragged: no multiple of any tile)."""


def l2_copies(weight: torch.Tensor) -> int:
    """How many copies of ``weight`` fill four times its GPU's L2 cache (1 on the CPU, or for a larger weight)."""
    if weight.device.type != "cuda":
        return 1
    l2_bytes = torch.cuda.get_device_properties(weight.device).L2_cache_size
    return max(1, -(-4 * l2_bytes // (weight.numel() * weight.element_size())))


def measure(name: str, weight: torch.Tensor, rows: int, args: argparse.Namespace, seed: int) -> dict:
    """One row of the report: ``F.linear`` and :func:`dense.dense_linear` of ``rows`` random rows by ``weight``."""
    features, width = weight.shape
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=generator).to(weight.device, weight.dtype)
    want = F.linear(x, weight).float()
    got = dense.dense_linear(x, weight).float()
    copies = [weight] + [torch.randn_like(weight) for _ in range(l2_copies(weight) - 1)]

    def cycling(linear: Callable) -> Callable:
        following = itertools.cycle(copies)
        return lambda: linear(x, next(following))

    calls = max(args.calls, len(copies))  # every copy once per replay: a replay's reads exceed the L2
    cublas = time_call(cycling(F.linear), weight.device, calls, args.warmup, args.repeats)
    ours = time_call(cycling(dense.dense_linear), weight.device, calls, args.warmup, args.repeats)
    gigabytes = weight.numel() * weight.element_size() / 1e9
    return {
        "shape": name, "N": features, "K": width, "rows": rows, "cublas_us": cublas, "bittern_us": ours,
        "speedup": cublas / ours, "cublas_tb_per_s": gigabytes / cublas * 1e3,
        "bittern_tb_per_s": gigabytes / ours * 1e3, "relative_difference": float((got - want).norm() / want.norm()),
    }  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    tiny = device.type == "cpu"
    dtype = torch.float32 if tiny else torch.bfloat16  # the interpreter's bf16 dots are widened anyway
    shapes = TINY if tiny else [shape for name in args.shapes.split(",") if name for shape in SHAPES[name]]
    generator = torch.Generator().manual_seed(args.seed)
    results = []
    for name, features, width in shapes:
        weight = torch.randn(features, width, generator=generator).to(device, dtype)
        for rows in (int(value) for value in args.rows.split(",") if value):
            r = measure(name, weight, rows, args, seed=args.seed + rows)
            results.append(r)
            print(f"  {name:<8} {features:>6} x {width:<5} rows {rows:>2}: cuBLAS {r['cublas_us']:9.2f} µs, "
                  f"bittern {r['bittern_us']:9.2f} µs", flush=True)  # fmt: skip
    return {
        "environment": {
            **versions(("triton",)),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
        "settings": {**vars(args), "dtype": str(dtype)},
        "results": results,
    }


def format_table(report: dict) -> str:
    lines = [
        "shape          N      K  rows  cuBLAS µs  bittern µs  speedup  cuBLAS TB/s  bittern TB/s  rel. diff",
        "--------  ------  -----  ----  ---------  ----------  -------  -----------  ------------  ---------",
    ]
    for r in report["results"]:
        lines.append(f"{r['shape']:<8}  {r['N']:>6}  {r['K']:>5}  {r['rows']:>4}  {r['cublas_us']:9.2f}  "
                     f"{r['bittern_us']:10.2f}  {r['speedup']:6.2f}x  {r['cublas_tb_per_s']:11.2f}  "
                     f"{r['bittern_tb_per_s']:12.2f}  {r['relative_difference']:9.1e}")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (dry run on a tiny shape)")
    parser.add_argument("--shapes", default="head,projections",
                        help="comma-separated shape sets: head, projections (default both)")  # fmt: skip
    parser.add_argument("--rows", default="1,4,16", help=f"comma-separated rows of x, each <= {dense.MAX_ROWS} "
                        "(default 1,4,16)")  # fmt: skip
    add_timing_options(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random operands (default 0)")
    args = parser.parse_args(argv)
    unknown = {name for name in args.shapes.split(",") if name} - set(SHAPES)
    if unknown:
        parser.error(f"unknown shape sets {sorted(unknown)}; choose from {', '.join(SHAPES)}")
    if any(not 0 < int(value) <= dense.MAX_ROWS for value in args.rows.split(",") if value):
        parser.error(f"--rows: each count must be 1 to {dense.MAX_ROWS}, got {args.rows}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cpu":
        args.calls, args.repeats = 1, 1
    report = run(args)
    print_and_save(format_table(report), report, args.json)


if __name__ == "__main__":
    main()
