"""Helpers the benchmark scripts share (run a script as ``python benchmarks/NAME.py``: its folder is on the path).

Not part of the package: these only format, free memory and report versions for the scripts here.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on a GPU (how the training benchmarks run), nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def free(device: torch.device) -> None:
    """Drop unreferenced tensors and hand cached GPU memory back, so the next arm's peak starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ratio(value: float | None, base: float | None) -> float | None:
    """``value / base``, or None when either is missing (or ``base`` is 0)."""
    return None if value is None or not base else value / base


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """``value`` formatted by ``spec`` (plus ``suffix``), ``n/a`` for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:{spec}}{suffix}"


def versions(packages: tuple[str, ...]) -> dict[str, str | None]:
    """Python's, torch's and each installed package's version (None where not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for package in packages:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def time_call(call: Callable, device: torch.device, calls: int, warmup: int, repeats: int) -> float:
    """Median µs per call: ``calls`` calls captured in one CUDA graph and replayed (wall clock, eagerly, on CPU)."""
    if device.type != "cuda":
        call()
        started = time.perf_counter()
        for _ in range(calls):
            call()
        return (time.perf_counter() - started) / calls * 1e6
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            call()
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def text_table(header: tuple[str, ...], body: list[tuple[str, ...]]) -> str:
    """Rows of cells as aligned text: the first column left-aligned, the others right-aligned, a rule under the
    header."""
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in [header, *body]]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--tiny``, ``--layers`` and ``--seed`` of the benchmarks on ``decode.py``'s 2B4T-shaped model."""
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run; use with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model of the same structure (a dry run)")
    parser.add_argument("--layers", type=int, default=30, help="decoder blocks (default 30, the full 2B4T depth)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")


def print_and_save(table: str, report: dict, path: str | None) -> None:
    """Print ``table`` after a blank line and, with a ``path``, write ``report`` there as JSON."""
    print()
    print(table)
    if path:
        with open(path, "w") as handle:
            json.dump(report, handle, indent=2)
        print(f"\nwrote {path}")


def add_timing_options(parser: argparse.ArgumentParser) -> None:
    """``--calls``, ``--warmup``, ``--repeats`` (what :func:`time_call` takes) and ``--json``."""
    parser.add_argument("--calls", type=int, default=20, help="calls per CUDA graph (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed replays (default 3)")
    parser.add_argument("--repeats", type=int, default=15, help="timed replays, median taken (default 15)")
    parser.add_argument("--json", help="write the report as JSON to this path")
