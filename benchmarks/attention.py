"""The decode step's attention of one layer, side by side on one GPU: bittern's kernel against PyTorch's path.

For one new token per sequence, over a static KV cache of ``--slots`` slots with the query at ``--query-slots``
(2B4T's shape by default: 5 KV heads of 4 query heads, head_dim 128, bf16), per batch size:

* ``torch``: what the engine ran before the kernel, and still runs on other backends: rope on the query and key
  (``x * cos + rotate_half(x) * sin``), the key and value written into the cache with ``index_put_``, then
  ``F.scaled_dot_product_attention`` with the boolean mask of the slots the query sees (every cache slot read);
* ``bittern``: :func:`bittern.kernels.attention.decode_attention` — rope (reading the rope tables' row at the
  token's position itself), cache write and attention in one kernel that reads only the slots the query sees (a
  long cache split across programs while they are few).

Each is captured in a CUDA graph of ``--calls`` calls and replayed: ``--warmup`` untimed, then the median of
``--repeats`` timed replays (CUDA events), in µs per call. The table also gives the relative difference of the
outputs (‖Δ‖/‖torch‖).

    python benchmarks/attention.py [--batch-sizes 1,16] [--slots 384,4096] [--json attention.json]

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

from bittern.kernels import attention  # noqa: E402
from bittern.reference import rotate_half_rope  # noqa: E402  (the decoder's rope, as the engine runs it)


def make_step(batch: int, kv_heads: int, groups: int, slots: int, dim: int, dtype: torch.dtype,
              device: torch.device, seed: int) -> dict[str, torch.Tensor]:  # fmt: skip
    """Random operands of one decode step: the new token's ``q`` ``[B, H_kv, G, D]``, ``k`` / ``v`` ``[B, H_kv, D]``,
    rope tables ``cos`` / ``sin`` ``[S, D]`` (a row per position), and a cache ``keys`` / ``values``
    ``[B, H_kv, S, D]``."""
    generator = torch.Generator().manual_seed(seed)
    angles = torch.rand(slots, dim // 2, generator=generator) * 6.0

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    return {
        "q": normal(batch, kv_heads, groups, dim),
        "k": normal(batch, kv_heads, dim),
        "v": normal(batch, kv_heads, dim),
        "cos": angles.cos().repeat(1, 2).to(device=device, dtype=dtype),
        "sin": angles.sin().repeat(1, 2).to(device=device, dtype=dtype),
        "keys": normal(batch, kv_heads, slots, dim),
        "values": normal(batch, kv_heads, slots, dim),
    }


def torch_call(step: dict[str, torch.Tensor], slot: torch.Tensor, mask: torch.Tensor, scale: float) -> Callable:
    """The PyTorch path: rope, ``index_put_`` into the cache, masked SDPA over every slot. The rope tables' row at
    the slot (no padding) is gathered once, outside the timed call, as the engine gathered it once per step for
    every layer."""
    batch, kv_heads = step["q"].shape[:2]
    rows = torch.arange(batch, device=slot.device)[:, None]
    heads = torch.arange(kv_heads, device=slot.device)[None, :]
    cos, sin = step["cos"][slot][:, None, None, :], step["sin"][slot][:, None, None, :]  # [1, 1, 1, D]

    def call() -> torch.Tensor:
        q = rotate_half_rope(step["q"], cos, sin)
        k = rotate_half_rope(step["k"], cos[:, 0], sin[:, 0])
        step["keys"].index_put_((rows, heads, slot), k)
        step["values"].index_put_((rows, heads, slot), step["v"])
        return F.scaled_dot_product_attention(q, step["keys"], step["values"], attn_mask=mask, scale=scale)

    return call


def bittern_call(step: dict[str, torch.Tensor], slot: torch.Tensor, pad: torch.Tensor, scale: float) -> Callable:
    """bittern's kernel: rope, cache write and attention in one launch."""
    names = ("q", "k", "v", "cos", "sin", "keys", "values")
    return lambda: attention.decode_attention(*(step[n] for n in names), slot, pad, scale)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    tiny = device.type == "cpu"
    kv_heads, groups, dim = (2, 2, 16) if tiny else (args.kv_heads, args.groups, args.head_dim)
    dtype = torch.float32 if tiny else torch.bfloat16
    scale = dim**-0.5
    results = []
    for batch, slots in itertools.product(_ints(args.batch_sizes), _ints(args.slots)):
        slots = min(slots, 40) if tiny else slots
        for query in sorted({slots // 4, slots - 1}):
            slot = torch.tensor([query], device=device)
            pad = torch.zeros(batch, dtype=torch.long, device=device)
            mask = (torch.arange(slots, device=device) <= query)[None, None, None, :].expand(batch, 1, groups, slots)
            figures = {}
            outputs = {}
            for name in ("torch", "bittern"):
                step = make_step(batch, kv_heads, groups, slots, dim, dtype, device, seed=batch + slots)
                call = torch_call(step, slot, mask, scale) if name == "torch" else bittern_call(step, slot, pad, scale)
                outputs[name] = call().float()
                figures[name] = time_call(call, device, args.calls, args.warmup, args.repeats)
            difference = float((outputs["bittern"] - outputs["torch"]).norm() / outputs["torch"].norm())
            results.append({"batch": batch, "slots": slots, "query_slot": query, "torch_us": figures["torch"],
                            "bittern_us": figures["bittern"], "speedup": figures["torch"] / figures["bittern"],
                            "relative_difference": difference})  # fmt: skip
            row = results[-1]
            print(f"  batch {batch:>3}, {slots:>5} slots, query at {query:>5}: torch {row['torch_us']:9.2f} µs, "
                  f"bittern {row['bittern_us']:9.2f} µs", flush=True)  # fmt: skip
    return {
        "environment": {
            **versions(("triton",)),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
        "settings": {**vars(args), "kv_heads": kv_heads, "groups": groups, "head_dim": dim, "dtype": str(dtype)},
        "results": results,
    }


def _ints(text: str) -> list[int]:
    return [int(value) for value in text.split(",") if value]


def format_table(report: dict) -> str:
    lines = ["batch  slots  query slot  torch µs  bittern µs  speedup  rel. diff",
             "-----  -----  ----------  --------  ----------  -------  ---------"]  # fmt: skip
    for r in report["results"]:
        lines.append(f"{r['batch']:>5}  {r['slots']:>5}  {r['query_slot']:>10}  {r['torch_us']:8.2f}  "
                     f"{r['bittern_us']:10.2f}  {r['speedup']:6.2f}x  {r['relative_difference']:9.1e}")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (dry run on tiny shapes)")
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes (default 1,16)")
    parser.add_argument("--slots", default="384,4096", help="comma-separated cache sizes (default 384,4096)")
    parser.add_argument("--kv-heads", type=int, default=5, help="KV heads (default 5, as 2B4T)")
    parser.add_argument("--groups", type=int, default=4, help="query heads per KV head (default 4)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dimension, a power of two (default 128)")
    add_timing_options(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cpu":
        args.calls, args.repeats = 1, 1
    report = run(args)
    print_and_save(format_table(report), report, args.json)


if __name__ == "__main__":
    main()
