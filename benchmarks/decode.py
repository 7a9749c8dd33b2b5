"""End-to-end decode speed and weight memory of a 2B4T-shaped ternary model: bittern's engine against
transformers, on one GPU.

The model: ``BitNetForCausalLM`` with the BitNet b1.58 2B4T dimensions (the ``2b4t-shape`` preset: hidden 2560,
intermediate 6912, ``--layers`` of 30 blocks, 20 heads, 5 KV heads, head_dim 128, vocab 128256, tied embeddings),
built on the device: a skeleton on the meta device, then every decoder projection a ``TernaryLinear`` filled with
random codes in {-1, 0, 1} (scale ``1/sqrt(K)``), layer by layer on the device; embeddings N(0, 0.02), norms 1.
No 2B-parameter float model is ever built on the CPU. Rows, each on the same weights:

1. ``bittern-ternary``: ``bittern.engine.Engine`` on the TernaryLinear model (int8 activations x ternary weights
   through ``bittern.kernels``; static KV cache; decode step replayed from a CUDA graph);
2. ``bittern-dense``: the same engine with the projections as ``nn.Linear`` holding ``Wt * s`` in bf16
   (``bittern.to_linear``): what the engine does with a bf16 checkpoint;
3. ``transformers-bf16``: that dense model's own ``generate`` (greedy, transformers' default dynamic KV cache,
   SDPA attention, eager: no torch.compile, whose compilation would not fit the time budget);
4. ``transformers-packed``: the model exported with ``bittern.save_model(..., "packed")`` (the Falcon-E
   ``bitlinear`` layout) and loaded by stock ``AutoModelForCausalLM.from_pretrained`` (transformers' packed
   ``BitLinear``, which unpacks its weights in every forward), then ``generate`` as in 3. (Not the 2B4T
   ``autobitlinear`` layout: transformers unpacks that one to dense bf16 ``AutoBitLinear`` weights at load time.)

Each row: a ``--prompt-len`` token random prompt per row, batch sizes ``--batch-sizes``, greedy decoding of
``--new-tokens`` tokens (rows 3 and 4: ``--hf-new-tokens``, fewer, as they are slow), one warm-up then ``--runs``
timed runs, median. Decode tokens/s count every row of the batch. The engine times its prefill and decode phases
itself (synchronising the GPU at each boundary); for transformers, prefill is the time of ``generate`` with one new
token, and decode tokens/s is ``batch * (n - 1) / (t(n) - t(1))``. Weight memory: bytes of parameters and buffers
(each storage once; the KV cache not included). Ratios are decode tokens/s against rows 2 and 3 at the same batch
size.

    python benchmarks/decode.py [--layers 30] [--batch-sizes 1,16] [--json decode.json]

``--device cpu --tiny`` is a dry run with a tiny model of the same structure, to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import add_model_options, free, text_table
from torch import nn

ROWS = ("bittern-ternary", "bittern-dense", "transformers-bf16", "transformers-packed")
PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
TINY = dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, vocab_size=256, num_layers=2)


def model_config(args: argparse.Namespace):
    """A BitNetConfig of the 2B4T shape (or the tiny dry-run shape), ``args.layers`` blocks."""
    from transformers import BitNetConfig

    from bittern.train.presets import PRESETS

    if not args.tiny:
        return PRESETS["2b4t-shape"].config(vocab_size=128256, num_layers=args.layers, eos_token_id=None)
    return BitNetConfig(
        vocab_size=TINY["vocab_size"],
        hidden_size=TINY["hidden_size"],
        intermediate_size=TINY["intermediate_size"],
        num_hidden_layers=TINY["num_layers"],
        num_attention_heads=TINY["num_heads"],
        num_key_value_heads=TINY["num_kv_heads"],
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        hidden_act="relu2",
        eos_token_id=None,
    )


def build_ternary_model(config, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """The BitNet model with random ternary projections, built on ``device`` (see the module docstring)."""
    from transformers import BitNetForCausalLM

    from bittern import packing
    from bittern.nn import TernaryLinear

    with torch.device("meta"):
        model = BitNetForCausalLM(config)
    for block in model.model.layers:  # packed buffers on the device (a quarter byte per weight)
        for name in PROJECTIONS:
            old = block.get_submodule(name)
            block.set_submodule(name, TernaryLinear(old.in_features, old.out_features, bias=False, device=device))
    rotary = type(model.model.rotary_emb)
    model.to_empty(device=device)
    model.to(dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for block in model.model.layers:
            for name in PROJECTIONS:
                layer = block.get_submodule(name)
                codes = torch.randint(
                    -1, 2, (layer.out_features, layer.in_features), dtype=torch.int8, device=device, generator=generator
                )
                layer.packed_weight.copy_(packing.pack_ternary_rows(codes))
                layer.weight_scale.fill_(layer.in_features**0.5)  # s_w: each code worth K^-1/2
            for module in block.modules():
                if "RMSNorm" in type(module).__name__:
                    module.weight.fill_(1.0)
        model.model.embed_tokens.weight.normal_(0.0, 0.02, generator=generator)
        model.model.norm.weight.fill_(1.0)
    model.model.rotary_emb = rotary(config).to(device)
    model.tie_weights()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def bench_engine(engine, prompts: torch.Tensor, new_tokens: int, runs: int) -> dict[str, float]:
    """Median prefill seconds and decode tokens/s of ``engine.generate_ids`` (greedy, EOS ignored)."""
    engine.generate_ids(prompts, min(new_tokens, 8), ignore_eos=True)  # warm-up: captures this batch's graph
    results = [engine.generate_ids(prompts, new_tokens, ignore_eos=True) for _ in range(runs)]
    assert all(len(ids) == new_tokens for r in results for ids in r.token_ids)
    return {
        "new_tokens": new_tokens,
        "prefill_s": statistics.median(r.prefill_seconds for r in results),
        "decode_tokens_per_s": statistics.median(r.decode_tokens_per_second for r in results),
    }


def bench_hf(model: nn.Module, prompts: torch.Tensor, new_tokens: int, runs: int) -> dict[str, float]:
    """Median prefill seconds and decode tokens/s of transformers' greedy ``generate``."""
    device = prompts.device
    mask = torch.ones_like(prompts)

    def generate(n: int) -> None:
        out = model.generate(prompts, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
        assert out.shape[1] == prompts.shape[1] + n

    with torch.inference_mode():
        generate(2)  # warm-up
        first = statistics.median(timed(lambda: generate(1), device) for _ in range(runs))
        full = statistics.median(timed(lambda: generate(new_tokens), device) for _ in range(runs))
    return {
        "new_tokens": new_tokens,
        "prefill_s": first,
        "decode_tokens_per_s": prompts.shape[0] * (new_tokens - 1) / max(full - first, 1e-9),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bittern.engine import Engine, weight_bytes

    device = torch.device(args.device)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype or _default_dtype(device)]
    config = model_config(args)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows = [r for r in args.rows.split(",") if r]
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    generator = torch.Generator().manual_seed(args.seed + 1)
    prompts = {
        b: torch.randint(0, config.vocab_size, (b, args.prompt_len), generator=generator).to(device)
        for b in batch_sizes
    }
    results: list[dict[str, Any]] = []

    def record(row: str, model: nn.Module, batch: int, figures: dict[str, float]) -> None:
        entry = {"row": row, "batch": batch, "weight_bytes": weight_bytes(model), **figures}
        results.append(entry)
        print(
            f"  {row:<20} batch {batch:>3}: {entry['decode_tokens_per_s']:9.1f} tokens/s decode, "
            f"prefill {entry['prefill_s'] * 1e3:8.1f} ms, weights {entry['weight_bytes'] / 2**20:9.1f} MiB",
            flush=True,
        )

    started = time.perf_counter()
    model = build_ternary_model(config, device, dtype, args.seed)
    max_seq_len = args.prompt_len + args.new_tokens
    engine_options = dict(max_batch=max(batch_sizes), max_seq_len=max_seq_len, cuda_graph=not args.no_cuda_graph,
                          compile=not args.no_compile)  # fmt: skip
    print(f"built the model in {time.perf_counter() - started:.1f} s", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        packed_dir = Path(scratch) / "packed"
        if "bittern-ternary" in rows:
            engine = Engine(model, None, **engine_options)
            for batch in batch_sizes:
                figures = bench_engine(engine, prompts[batch], args.new_tokens, args.runs)
                record("bittern-ternary", model, batch, figures)
            del engine
        if "transformers-packed" in rows:
            import bittern

            bittern.save_model(model, packed_dir, "packed", dtype=dtype)
        if "bittern-dense" in rows or "transformers-bf16" in rows:
            import bittern

            bittern.to_linear(model)  # nn.Linear holding Wt * s in the model's dtype
            free(device)
            if "bittern-dense" in rows:
                engine = Engine(model, None, **engine_options)
                for batch in batch_sizes:
                    figures = bench_engine(engine, prompts[batch], args.new_tokens, args.runs)
                    record("bittern-dense", model, batch, figures)
                del engine
            if "transformers-bf16" in rows:
                for batch in batch_sizes:
                    figures = bench_hf(model, prompts[batch], args.hf_new_tokens, args.runs)
                    record("transformers-bf16", model, batch, figures)
        del model
        free(device)
        if "transformers-packed" in rows:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(packed_dir, dtype=dtype, device_map=str(device)).eval()
            hf.generation_config.eos_token_id = None
            for batch in batch_sizes:
                record("transformers-packed", hf, batch, bench_hf(hf, prompts[batch], args.hf_new_tokens, args.runs))
            del hf
            free(device)
    for entry in results:
        for base in ("bittern-dense", "transformers-bf16"):
            ref = next((r for r in results if r["row"] == base and r["batch"] == entry["batch"]), None)
            entry[f"speedup_vs_{base}"] = entry["decode_tokens_per_s"] / ref["decode_tokens_per_s"] if ref else None
    return {
        "environment": _environment(device),
        "settings": {**vars(args), "dtype": str(dtype), "layers": config.num_hidden_layers},
        "results": results,
        "seconds": time.perf_counter() - started,
    }


def _default_dtype(device: torch.device) -> str:
    return "bfloat16" if device.type == "cuda" else "float32"


def _environment(device: torch.device) -> dict[str, Any]:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }
    try:
        env["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        env["triton"] = None
    return env


def format_table(report: dict[str, Any]) -> str:
    header = ("row", "batch", "new tokens", "decode tok/s", "prefill ms", "weights MiB", "vs bittern-dense")
    header = (*header, "vs hf-bf16")

    def ratio(value: float | None) -> str:
        return "" if value is None or math.isnan(value) else f"{value:.2f}x"

    body = [
        (
            r["row"],
            str(r["batch"]),
            str(r["new_tokens"]),
            f"{r['decode_tokens_per_s']:.1f}",
            f"{r['prefill_s'] * 1e3:.1f}",
            f"{r['weight_bytes'] / 2**20:.1f}",
            ratio(r["speedup_vs_bittern-dense"]),
            ratio(r["speedup_vs_transformers-bf16"]),
        )
        for r in report["results"]
    ]
    return text_table(header, body)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes (default 1,16)")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per row (default 128)")
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens generated by the engine rows")
    parser.add_argument("--hf-new-tokens", type=int, default=64, help="tokens generated by the transformers rows")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median; default 3)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--no-cuda-graph", action="store_true", help="engine rows: eager decode step")
    parser.add_argument("--no-compile", action="store_true", help="engine rows: capture the step uncompiled")
    parser.add_argument("--json", help="write the report as JSON to this path")
    args = parser.parse_args(argv)
    if args.tiny:
        args.prompt_len = min(args.prompt_len, 16)
        args.new_tokens = min(args.new_tokens, 8)
        args.hf_new_tokens = min(args.hf_new_tokens, 8)
        args.runs = min(args.runs, 2)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    env = report["environment"]
    print(f"\n{env['device']}, torch {env['torch']}, transformers {env['transformers']}; "
          f"{report['settings']['layers']} layers, prompt {args.prompt_len} tokens, {report['settings']['dtype']}; "
          f"{report['seconds']:.0f} s in all\n")  # fmt: skip
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
