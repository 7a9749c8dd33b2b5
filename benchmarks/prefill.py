"""A prompt's forward pass (prefill) as the scheduler admits prompts, on a 2B4T-shaped model: how long one
graphed prefill takes per (prompts, padded length), and where its GPU time goes.

The model is ``benchmarks/decode.py``'s (random ternary projections, ``--layers`` blocks of the 2B4T shape, bf16),
run through the engine's :class:`~bittern.engine.prefill.CudaGraphPrefill` into a prefill cache, as
:class:`~bittern.engine.scheduler.Scheduler` runs it; rows: ``ternary`` (the packed TernaryLinear model) and
``dense`` (the same weights as bf16 ``nn.Linear``, what a bf16 checkpoint runs). For each shape ``BxL`` (``B``
prompts left-padded to ``L`` slots) the graph is captured once, then replayed: median of ``--repeats`` replays,
ms per forward and µs per slot. ``--profile BxL`` also runs that shape eagerly under ``torch.profiler`` and prints
the GPU time of its kernels grouped into linear layers, attention, and the rest.

    python benchmarks/prefill.py [--shapes 1x128,1x512,4x512,1x2048] [--rows ternary,dense] [--profile 4x512]
    python benchmarks/prefill.py --device cpu --tiny --shapes 1x16,2x32   # a dry run without a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from typing import Any

import torch
from common import add_model_options, fmt, print_and_save, text_table, versions
from decode import build_ternary_model, model_config

ROWS = ("ternary", "dense")


def _shape(text: str) -> tuple[int, int]:
    try:
        rows, length = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PROMPTSxLENGTH such as 4x512, not {text!r}") from None
    if rows < 1 or length < 1:
        raise argparse.ArgumentTypeError(f"prompts and length must be positive, not {text!r}")
    return rows, length


def _runner(model: torch.nn.Module, args: argparse.Namespace):
    """The scheduler's prefill runner over ``model`` and a prefill cache of the largest shape's rows."""
    from bittern.engine.decoder import Decoder
    from bittern.engine.prefill import CudaGraphPrefill, EagerPrefill

    decoder = Decoder(model, args.max_seq_len)
    cache = decoder.new_cache(max(rows for rows, _ in args.shapes))
    graphed = args.device.startswith("cuda")
    return (CudaGraphPrefill if graphed else EagerPrefill)(decoder, cache)


def _inputs(rows: int, length: int, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(rows * 100_003 + length)
    ids = torch.randint(vocab, (rows, length), generator=generator).to(device)
    pad = torch.zeros(rows, dtype=torch.long, device=device)
    return ids, pad


def time_forward(runner, rows: int, length: int, vocab: int, device: torch.device, repeats: int) -> float:
    """Median seconds of one prefill forward of ``rows`` prompts of ``length`` slots (graphed on a GPU)."""
    ids, pad = _inputs(rows, length, vocab, device)
    runner(ids, pad)  # capture (or warm up)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runner(ids, pad)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            runner(ids, pad)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def _kind(name: str) -> str:
    lowered = name.lower()
    if any(k in lowered for k in ("gemm", "packed", "matmul", "cutlass", "sm90_xmma", "nvjet", "_mm_", "linear")):
        return "linear layers"
    if any(k in lowered for k in ("attention", "fmha", "flash", "softmax", "sdpa", "attn")):
        return "attention"
    if any(k in lowered for k in ("index", "scatter", "gather", "copy", "memcpy", "cat")):
        return "indexing and copies"
    return "norms, activations, other"


def profile_forward(runner, rows: int, length: int, vocab: int, device: torch.device) -> dict[str, Any]:
    """GPU time of one eager prefill forward, per kind of kernel and for the ten longest kernels (µs)."""
    from torch.profiler import ProfilerActivity, profile

    from bittern.engine.prefill import EagerPrefill

    ids, pad = _inputs(rows, length, vocab, device)
    EagerPrefill.__call__(runner, ids, pad)  # warm up
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        EagerPrefill.__call__(runner, ids, pad)
        torch.cuda.synchronize(device)
    kernels: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        gpu = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if gpu and event.key and not event.key.startswith("aten::") and not event.key.startswith("cuda"):
            kernels[event.key] += gpu
    kinds: dict[str, float] = defaultdict(float)
    for name, us in kernels.items():
        kinds[_kind(name)] += us
    top = sorted(kernels.items(), key=lambda item: -item[1])[:10]
    return {"shape": f"{rows}x{length}", "kinds_us": dict(kinds), "top_us": top, "total_us": sum(kernels.values())}


def build(args: argparse.Namespace, row: str) -> torch.nn.Module:
    import bittern

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = model_config(argparse.Namespace(tiny=args.tiny, layers=args.layers))
    config.max_position_embeddings = max(config.max_position_embeddings, args.max_seq_len)
    model = build_ternary_model(config, device, dtype, args.seed)
    if row == "dense":
        bittern.to_linear(model)
    return model


def format_table(results: list[dict[str, Any]]) -> str:
    header = ("shape", "slots", *(f"{r} ms" for r in ROWS), *(f"{r} µs/slot" for r in ROWS), "ternary × dense")
    by_shape: dict[str, dict[str, float]] = defaultdict(dict)
    for entry in results:
        by_shape[entry["shape"]][entry["row"]] = entry["seconds"]
    body = []
    for shape, times in by_shape.items():
        rows, length = _shape(shape)
        ms = [fmt(None if times.get(r) is None else times[r] * 1e3, ".2f") for r in ROWS]
        per = [fmt(None if times.get(r) is None else times[r] * 1e6 / (rows * length), ".2f") for r in ROWS]
        speedup = times["dense"] / times["ternary"] if {"dense", "ternary"} <= times.keys() else None
        body.append((shape, str(rows * length), *ms, *per, fmt(speedup, ".2f", "x")))
    return text_table(header, body)


def format_profile(row: str, report: dict[str, Any]) -> str:
    total = report["total_us"]
    lines = [f"{row} {report['shape']}, one eager forward: {total / 1e3:.2f} ms of GPU kernels"]
    for kind, us in sorted(report["kinds_us"].items(), key=lambda item: -item[1]):
        lines.append(f"  {kind:<28} {us / 1e3:8.2f} ms  {us / total:6.1%}")
    lines.append("  longest kernels:")
    for name, us in report["top_us"]:
        lines.append(f"    {us / 1e3:8.2f} ms  {name[:100]}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--shapes", default="1x128,1x512,4x512,1x2048", help="comma-separated PROMPTSxLENGTH "
                        "prefill shapes (default 1x128,1x512,4x512,1x2048)")  # fmt: skip
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--profile", type=_shape, help="also profile this PROMPTSxLENGTH shape's eager forward")
    parser.add_argument("--repeats", type=int, default=15, help="timed replays, median taken (default 15)")
    parser.add_argument("--json", help="write the report as JSON to this path")
    args = parser.parse_args(argv)
    try:
        args.shapes = [_shape(s) for s in args.shapes.split(",") if s]
    except argparse.ArgumentTypeError as error:
        parser.error(f"--shapes: {error}")
    args.row_list = [r for r in args.rows.split(",") if r]
    unknown = set(args.row_list) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    if args.profile and not args.device.startswith("cuda"):
        parser.error("--profile needs a CUDA device")
    args.max_seq_len = max(length for _, length in args.shapes + ([args.profile] if args.profile else []))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    results, profiles = [], {}
    with torch.inference_mode():
        for row in args.row_list:
            model = build(args, row)
            runner = _runner(model, args)
            vocab = model.config.vocab_size
            for rows, length in args.shapes:
                seconds = time_forward(runner, rows, length, vocab, device, args.repeats)
                results.append({"row": row, "shape": f"{rows}x{length}", "seconds": seconds})
                print(f"  {row:<8} {rows}x{length}: {seconds * 1e3:.2f} ms", flush=True)
            if args.profile:
                profiles[row] = profile_forward(runner, *args.profile, vocab, device)
                print(format_profile(row, profiles[row]), flush=True)
            del model, runner
            if device.type == "cuda":
                torch.cuda.empty_cache()
    environment = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   **versions(("torch", "triton", "transformers"))}  # fmt: skip
    settings = {k: v for k, v in vars(args).items() if k != "row_list"}
    report = {"environment": environment, "settings": settings, "results": results, "profiles": profiles}
    shape = "tiny shape, 2 layers" if args.tiny else f"2B4T shape, {args.layers} layers"
    print(f"\n{environment['device']}, torch {environment['torch']}; {shape}")
    print_and_save(format_table(results), report, args.json)


if __name__ == "__main__":
    main()
