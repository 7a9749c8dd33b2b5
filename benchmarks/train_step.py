"""Training step time and memory of ternary linear layers against bf16, side by side on one GPU.

Part 1: a Llama with BitNet b1.58 2B4T dimensions (hidden 2560, intermediate 6912, 20 heads, 5 KV heads, vocab
32768; ``--num-layers`` decoder blocks), float32 parameters, bf16 autocast, fused AdamW, one fixed batch of random
tokens. The seven projections of every decoder block (q/k/v/o, gate/up/down; never embeddings or the LM head) are,
per variant:

* ``bf16``: plain ``nn.Linear`` (the model as built);
* ``onebitllms``: ``onebitllms.layers.BitNetLinear`` (Triton quantizers, dense bf16 matmul; CUDA only);
* ``autobitlinear``: ``transformers.integrations.bitnet.AutoBitLinear(online_quant=True)`` (torch.compile'd
  quantizers);
* ``autobitlinear-eager``: the same with torch.compile disabled (its quantizers run eagerly);
* ``bittern-reference``: ``bittern.to_bitlinear`` under ``bittern.kernels.use_backend("reference")``;
* ``bittern-kernels``: the same under ``use_backend("triton")`` (the default backward: the forward's quantizer
  passes also write the bf16 values the backward multiplies, and the backward is two cuBLAS products);
* ``bittern-kernels-int8-bwd``: the same saving int8 activations and codes for backward, widened there
  (``BITTERN_BACKWARD_GEMM=cublas-int8``: less memory, one more pass per product);
* ``bittern-kernels-fused-bwd``: the same with Triton's fused backward products (``BITTERN_BACKWARD_GEMM=triton``).

Each variant builds its model from the same seed, runs ``--warmup`` untimed then ``--steps`` timed training steps
(CUDA events around forward + backward + optimizer step, the host waiting for each step's end) and reports the
median step time, tokens/s, peak memory, both against bf16, and the first and last loss. Then ``--steps`` more steps
back to back, as a training loop runs them (an event at each step boundary, one host sync at the end): the median
of those is the "back-to-back" step time, in which the host's launch time overlaps the previous step's GPU work
instead of starting on an idle GPU.

Part 2 (``--curve-steps``, 0 to skip): a small bittern model trained three times from the same seed on the same
batches — on the reference backend, on the kernels, and on the kernels with the fused Triton backward — and the
agreement of the reference and kernel loss curves. ``--curve-data text`` (the default): natural text, the UTF-8
bytes of Python's ``help()`` topics, where the loss falls smoothly. ``synthetic``: a learnable sequence (next token
= (7 * token + 3) mod 1024, a ``--curve-noise`` share of tokens random), whose loss falls sharply once the pattern
is found, at a step that varies from run to run even for one path (see BENCHMARKS.md).

onebitllms is not a dependency: install its wheel for the benchmark only
(``pip install --no-deps onebitllms==0.0.4``); the variant is skipped, with the reason, when it is missing.

    python benchmarks/train_step.py [--num-layers 6] [--batch-size 4] [--seq-len 2048] [--steps 20]
        [--variants bf16,onebitllms,autobitlinear,bittern-reference,bittern-kernels] [--curve-steps 200]
        [--json out.json]

``--device cpu`` is a dry run with tiny shapes (wall-clock timing, no memory figures, Triton's interpreter) to
check the script on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from common import autocast, fmt, free, ratio, versions
from torch import nn

VARIANTS = (
    "bf16",
    "onebitllms",
    "autobitlinear",
    "autobitlinear-eager",
    "bittern-reference",
    "bittern-kernels",
    "bittern-kernels-int8-bwd",
    "bittern-kernels-fused-bwd",
)
PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
CPU_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
CPU_VOCAB = 256
CURVE_VOCAB_SUBSET = 1024
CURVE_TAIL = 50


def llama_config(
    num_layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int, positions: int
):  # -> LlamaConfig (transformers is imported inside main, after TRITON_INTERPRET is set)
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=positions,
        tie_word_embeddings=False,
    )


def build_model(config, seed: int, device: torch.device) -> nn.Module:
    """A float32 Llama initialized from ``seed`` (the same weights for every variant on one device)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with device:
        model = LlamaForCausalLM(config)
    return model.to(device=device, dtype=torch.float32).train()


def replace_projections(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> int:
    """Swap the seven projections of every decoder block for ``make(linear)``; returns how many were swapped."""
    count = 0
    for block in model.model.layers:
        for name in PROJECTIONS:
            old = block.get_submodule(name)
            assert isinstance(old, nn.Linear) and old.bias is None, f"{name}: {type(old).__name__}"
            block.set_submodule(name, make(old))
            count += 1
    return count


def onebitllms_layer(linear: nn.Linear) -> nn.Module:
    from onebitllms.layers import BitNetLinear

    layer = BitNetLinear(linear.in_features, linear.out_features, bias=False).to(linear.weight.device)
    with torch.no_grad():
        layer.weight.copy_(linear.weight)
    return layer


def autobitlinear_layer(linear: nn.Linear) -> nn.Module:
    from transformers.integrations.bitnet import AutoBitLinear

    layer = AutoBitLinear(
        linear.in_features,
        linear.out_features,
        bias=False,
        online_quant=True,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    with torch.no_grad():
        layer.weight.copy_(linear.weight)
    return layer


def skip_reason(variant: str, device: torch.device) -> str | None:
    """Why ``variant`` cannot run here (None: it can)."""
    if variant == "onebitllms":
        if device.type != "cuda":
            return "onebitllms runs its Triton quantizers on CUDA only"
        try:
            import onebitllms  # noqa: F401
        except Exception as exc:
            return f"import onebitllms failed: {type(exc).__name__}: {exc}"
    if variant == "autobitlinear":
        try:
            from transformers.integrations.bitnet import AutoBitLinear  # noqa: F401
        except Exception as exc:
            return f"import transformers.integrations.bitnet.AutoBitLinear failed: {type(exc).__name__}: {exc}"
    if variant == "bittern-kernels":
        from bittern import kernels

        if not kernels.triton_available():
            return "Triton is not installed"
    return None


def make_variant(variant: str, config, seed: int, device: torch.device) -> tuple[nn.Module, str | None]:
    """The model of ``variant`` and the bittern kernel backend to run it under (None: not a bittern model)."""
    import bittern

    model = build_model(config, seed, device)
    expected = 7 * config.num_hidden_layers
    if variant == "bf16":
        return model, None
    if variant == "onebitllms":
        swapped = replace_projections(model, onebitllms_layer)
    elif variant in ("autobitlinear", "autobitlinear-eager"):
        swapped = replace_projections(model, autobitlinear_layer)
    elif variant.startswith("bittern-"):
        bittern.to_bitlinear(model)
        swapped = sum(isinstance(m, bittern.BitLinear) for m in model.modules())
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    assert swapped == expected, f"{variant}: {swapped} layers replaced, expected {expected}"
    model.to(device)  # a replacement layer may have created a buffer on the default device
    backends = {
        "bittern-reference": "reference",
        "bittern-kernels": "triton",
        "bittern-kernels-int8-bwd": "cublas-int8",
        "bittern-kernels-fused-bwd": "triton-backward",
    }
    backend = {**backends, "autobitlinear-eager": "eager"}.get(variant)
    return model, backend


def make_optimizer(model: nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, fused=device.type == "cuda")


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> torch.Tensor:
    with autocast(ids.device):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def backend_context(backend: str | None) -> contextlib.AbstractContextManager:
    if backend is None:
        return contextlib.nullcontext()
    if backend == "eager":  # AutoBitLinear's quantizers without their torch.compile
        return torch._dynamo.config.patch(disable=True)
    from bittern import kernels

    if backend == "cublas-int8":  # int8 saved for backward, widened there
        return _kernels_with_backward("cublas-int8")
    if backend == "triton-backward":  # Triton's fused backward products instead of cuBLAS
        return _kernels_with_backward("triton")
    return kernels.use_backend(backend)


@contextlib.contextmanager
def _kernels_with_backward(mode: str):
    """The kernels with ``BITTERN_BACKWARD_GEMM=mode`` (restored after)."""
    from bittern import kernels

    previous = os.environ.get("BITTERN_BACKWARD_GEMM")
    os.environ["BITTERN_BACKWARD_GEMM"] = mode
    try:
        with kernels.use_backend("triton"):
            yield
    finally:
        if previous is None:
            os.environ.pop("BITTERN_BACKWARD_GEMM")
        else:
            os.environ["BITTERN_BACKWARD_GEMM"] = previous


def measure(variant: str, config, ids: torch.Tensor, args: argparse.Namespace) -> dict:
    """Warm-up and timed steps of one variant: step times (ms), peak memory, losses."""
    device = ids.device
    model, backend = make_variant(variant, config, args.seed, device)
    optimizer = make_optimizer(model, args.lr, device)
    cuda = device.type == "cuda"
    attention = getattr(model.config, "_attn_implementation", None)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses: list[torch.Tensor] = []
    times_ms: list[float] = []
    with backend_context(backend):
        for _ in range(args.warmup):
            losses.append(train_step(model, optimizer, ids))
        for _ in range(args.steps):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                losses.append(train_step(model, optimizer, ids))
                end.record()
                end.synchronize()
                times_ms.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                losses.append(train_step(model, optimizer, ids))
                times_ms.append((time.perf_counter() - begin) * 1e3)
        pipelined_ms: list[float] = []
        if cuda:  # back to back, as a training loop runs: events at the step boundaries, one host sync at the end
            torch.cuda.synchronize()
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)]
            marks[0].record()
            for mark in marks[1:]:
                losses.append(train_step(model, optimizer, ids))
                mark.record()
            torch.cuda.synchronize()
            pipelined_ms = [a.elapsed_time(b) for a, b in itertools.pairwise(marks)]
        peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        if variant in args.profile.split(","):
            profile_steps(variant, model, optimizer, ids, args)
    loss_values = [float(v) for v in torch.stack(losses).float().cpu()]
    del model, optimizer, losses
    free(device)
    median_ms = statistics.median(times_ms)
    return {
        "variant": variant,
        "backend": backend,
        "attn_implementation": attention,
        "step_ms_median": median_ms,
        "pipelined_ms_median": statistics.median(pipelined_ms) if pipelined_ms else None,
        "pipelined_ms": pipelined_ms,
        "step_ms_min": min(times_ms),
        "step_ms_max": max(times_ms),
        "step_ms": times_ms,
        "tokens_per_s": ids.numel() / (median_ms / 1e3),
        "peak_gib": peak_gib,
        "first_loss": loss_values[0],
        "final_loss": loss_values[-1],
        "losses": loss_values,
    }


def profile_steps(variant: str, model: nn.Module, optimizer, ids: torch.Tensor, args: argparse.Namespace) -> None:
    """Two steps under torch.profiler: print the kernels taking the most device time (and save the table)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.is_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            train_step(model, optimizer, ids)
        if ids.is_cuda:
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if ids.is_cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60)
    print(f"--- profile of {variant} (2 steps) ---\n{table}")
    if args.json:
        with open(f"{args.json}.{variant}.profile.txt", "w") as handle:
            handle.write(table)


def curve_batches(steps: int, batch: int, seq_len: int, subset: int, noise: float, seed: int) -> list[torch.Tensor]:
    """Per-step batches of the learnable sequence: next = (7 * token + 3) mod ``subset`` from a random start,
    each token replaced by a random one (below ``subset``) with probability ``noise``. CPU, int64."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        tokens = torch.empty(batch, seq_len, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, subset, (batch,), generator=generator)
        noisy = torch.rand(batch, seq_len, generator=generator) < noise
        random = torch.randint(0, subset, (batch, seq_len), generator=generator)
        for t in range(1, seq_len):
            following = (tokens[:, t - 1] * 7 + 3) % subset
            tokens[:, t] = torch.where(noisy[:, t], random[:, t], following)
        batches.append(tokens)
    return batches


def text_batches(steps: int, batch: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """Per-step batches of natural text: UTF-8 bytes (token ids 0-255) of Python's ``help()`` topics (the embedded
    corpus, :func:`bittern.train.corpus.default_corpus`), blocks at seeded random offsets. CPU, int64."""
    from bittern.train.corpus import default_corpus

    data = torch.frombuffer(bytearray("\n\n".join(default_corpus(docstrings=False)).encode()), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq_len, (steps, batch), generator=generator)
    return [torch.stack([data[s : s + seq_len] for s in row.tolist()]).long() for row in starts]


def loss_curve(config, batches: list[torch.Tensor], backend: str, args: argparse.Namespace) -> dict:
    """Train a bittern model from ``args.seed`` on ``batches`` under ``backend``; the loss of every step."""
    import bittern

    device = torch.device(args.device)
    model = bittern.to_bitlinear(build_model(config, args.seed, device))
    optimizer = make_optimizer(model, args.curve_lr, device)
    losses = []
    begin = time.perf_counter()
    with backend_context(backend):
        for batch in batches:
            losses.append(train_step(model, optimizer, batch.to(device)))
    values = [float(v) for v in torch.stack(losses).float().cpu()]
    seconds = time.perf_counter() - begin
    del model, optimizer, losses
    free(device)
    return {"losses": values, "seconds": seconds}


def curve_agreement(args: argparse.Namespace, shape: dict, vocab: int) -> dict:
    config = llama_config(
        args.curve_layers,
        shape["hidden_size"],
        shape["intermediate_size"],
        shape["num_attention_heads"],
        shape["num_key_value_heads"],
        vocab,
        max(args.curve_seq_len, 128),
    )
    subset = min(CURVE_VOCAB_SUBSET, vocab)
    if args.curve_data == "text":
        batches = text_batches(args.curve_steps, args.curve_batch_size, args.curve_seq_len, 1)
    else:
        size = (args.curve_steps, args.curve_batch_size, args.curve_seq_len)
        batches = curve_batches(*size, subset, args.curve_noise, 1)
    result: dict = {
        "config": {
            "num_layers": args.curve_layers,
            **shape,
            "vocab_size": vocab,
            "data": args.curve_data,
            "vocab_subset": subset if args.curve_data == "synthetic" else 256,
            "noise": args.curve_noise if args.curve_data == "synthetic" else None,
            "batch_size": args.curve_batch_size,
            "seq_len": args.curve_seq_len,
            "steps": args.curve_steps,
            "lr": args.curve_lr,
        }
    }
    runs = {}
    for backend in ("reference", "triton", "triton-backward"):
        try:
            runs[backend] = loss_curve(config, batches, backend, args)
        except Exception as exc:
            traceback.print_exc()
            result["error"] = f"{backend}: {type(exc).__name__}: {exc}"
            result["traceback"] = traceback.format_exc()[-4000:]
            return result
        print(f"curve {backend}: {runs[backend]['seconds']:.1f} s, loss {runs[backend]['losses'][0]:.4f} → "
              f"{runs[backend]['losses'][-1]:.4f}", flush=True)  # fmt: skip
    ref, kern, fused = runs["reference"]["losses"], runs["triton"]["losses"], runs["triton-backward"]["losses"]
    diffs = [abs(a - b) for a, b in zip(ref, kern, strict=True)]
    relative = [d / max(abs(a), 1e-12) for d, a in zip(diffs, ref, strict=True)]
    tail = diffs[-CURVE_TAIL:]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    result.update(
        {
            "max_abs_diff": diffs[worst],
            "max_abs_diff_step": worst,
            "max_rel_diff": max(relative),
            "mean_abs_diff_last": statistics.fmean(tail),
            "last_n": len(tail),
            "reference": {"first": ref[0], "last": ref[-1], "seconds": runs["reference"]["seconds"], "losses": ref},
            "triton": {"first": kern[0], "last": kern[-1], "seconds": runs["triton"]["seconds"], "losses": kern},
            "fused_backward": {"losses": fused, "last": fused[-1]},
        }
    )
    return result


def print_table(results: dict) -> None:
    config = results["config"]
    print(
        f"\nLlama ({config['num_layers']} layers, hidden {config['hidden_size']}, intermediate "
        f"{config['intermediate_size']}, {config['num_attention_heads']}/{config['num_key_value_heads']} heads, "
        f"vocab {config['vocab_size']}), batch {config['batch_size']} x seq {config['seq_len']}, "
        f"{config['steps']} timed steps after {config['warmup']} warm-up, {results['device']}, "
        f"torch {results['versions']['torch']}"
    )
    print("| variant | step ms (median) | tokens/s | peak GiB | time vs bf16 | memory vs bf16 | final loss "
          "| back-to-back step ms | back-to-back vs bf16 |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in results["variants"]:
        if "skipped" in row or "error" in row:
            print(f"| {row['variant']} | {'skipped' if 'skipped' in row else 'failed'}: "
                  f"{row.get('skipped') or row.get('error')} | | | | | | | |")  # fmt: skip
            continue
        print(
            f"| {row['variant']} | {row['step_ms_median']:.1f} | {row['tokens_per_s']:,.0f} | "
            f"{fmt(row['peak_gib'], '.2f')} | {fmt(row['time_vs_bf16'], '.2f', 'x')} | "
            f"{fmt(row['memory_vs_bf16'], '.2f', 'x')} | {row['final_loss']:.4f} | "
            f"{fmt(row['pipelined_ms_median'], '.1f')} | {fmt(row['pipelined_vs_bf16'], '.2f', 'x')} |"
        )
    curve = results.get("curve")
    if curve is None:
        print("\nloss-curve agreement: skipped (--curve-steps 0)")
    elif "error" in curve:
        print(f"\nloss-curve agreement: failed: {curve['error']}")
    else:
        c = curve["config"]
        print(
            f"\nloss-curve agreement on {c['data']} data, reference vs triton backend ({c['steps']} steps, "
            f"{c['num_layers']} layers, "
            f"hidden {c['hidden_size']}, batch {c['batch_size']} x seq {c['seq_len']}): "
            f"max |Δloss| {curve['max_abs_diff']:.3e} (step {curve['max_abs_diff_step']}), "
            f"max rel {curve['max_rel_diff']:.3e}, "
            f"mean |Δloss| last {curve['last_n']} {curve['mean_abs_diff_last']:.3e}; "
            f"loss reference {curve['reference']['first']:.4f} → {curve['reference']['last']:.4f}, "
            f"triton {curve['triton']['first']:.4f} → {curve['triton']['last']:.4f} "
            f"(with the fused Triton backward: → {curve['fused_backward']['last']:.4f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: tiny-shape dry run")
    parser.add_argument("--num-layers", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant before the timed ones")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list out of {','.join(VARIANTS)}")
    parser.add_argument("--curve-steps", type=int, default=200, help="loss-curve agreement steps (0: skip)")
    parser.add_argument("--curve-layers", type=int, default=4)
    parser.add_argument("--curve-batch-size", type=int, default=8)
    parser.add_argument("--curve-seq-len", type=int, default=512)
    parser.add_argument("--curve-lr", type=float, default=1e-3)
    parser.add_argument("--curve-data", default="text", choices=("text", "synthetic"),
                        help="text: bytes of Python's help() topics; synthetic: the sequence task")  # fmt: skip
    parser.add_argument("--curve-noise", type=float, default=0.1, help="share of random tokens in the curve data")
    parser.add_argument("--profile", default="", help="comma list of variants to profile for 2 extra steps")
    parser.add_argument("--json")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")

    if args.device == "cpu":
        # Triton reads TRITON_INTERPRET when bittern's kernels first import it (lazily, on the first kernel call).
        os.environ["TRITON_INTERPRET"] = "1"
        args.num_layers, args.batch_size, args.seq_len, args.steps, args.warmup = 1, 2, 32, 2, 1
        args.curve_layers, args.curve_batch_size, args.curve_seq_len = 1, 2, 32
        args.curve_steps = min(args.curve_steps, 3)
        shape, vocab = CPU_SHAPE, CPU_VOCAB
        curve_shape, curve_vocab = CPU_SHAPE, CPU_VOCAB
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU here; use --device cpu for a dry run")
        torch.backends.cuda.matmul.allow_tf32 = True
        shape = {"hidden_size": 2560, "intermediate_size": 6912, "num_attention_heads": 20, "num_key_value_heads": 5}
        vocab = 32768
        curve_shape = {
            "hidden_size": 512,
            "intermediate_size": 1376,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
        }
        curve_vocab = 32768
    device = torch.device(args.device)
    config = llama_config(
        args.num_layers,
        shape["hidden_size"],
        shape["intermediate_size"],
        shape["num_attention_heads"],
        shape["num_key_value_heads"],
        vocab,
        max(args.seq_len, 4096 if device.type == "cuda" else 128),
    )
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(args.seed))
    ids = ids.to(device)
    results: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()}, dry run)",
        "versions": versions(("triton", "transformers", "bittern", "onebitllms")),
        "config": {
            "num_layers": args.num_layers,
            **shape,
            "vocab_size": vocab,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "warmup": args.warmup,
            "lr": args.lr,
            "seed": args.seed,
            "param_dtype": "float32",
            "autocast": "bfloat16" if device.type == "cuda" else None,
            "tf32": device.type == "cuda",
            "fused_adamw": device.type == "cuda",
            "timing": "cuda events" if device.type == "cuda" else "time.perf_counter",
        },
        "variants": [],
        "curve": None,
    }

    def write() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))

    for variant in variants:
        reason = skip_reason(variant, device)
        if reason:
            row = {"variant": variant, "skipped": reason}
            print(f"{variant}: skipped: {reason}", flush=True)
        else:
            try:
                row = measure(variant, config, ids, args)
            except Exception as exc:
                traceback.print_exc()
                row = {"variant": variant, "error": f"{type(exc).__name__}: {exc}"[:500]}
                row["traceback"] = traceback.format_exc()[-4000:]
                print(f"{variant}: failed: {row['error']}", flush=True)
            else:
                print(
                    f"{variant}: {row['step_ms_median']:.1f} ms/step (min {row['step_ms_min']:.1f}, max "
                    f"{row['step_ms_max']:.1f}), {row['tokens_per_s']:,.0f} tokens/s, peak "
                    f"{fmt(row['peak_gib'], '.2f', ' GiB')}, loss {row['first_loss']:.4f} → {row['final_loss']:.4f}",
                    flush=True,
                )
        results["variants"].append(row)
        free(device)  # after the except block, whose traceback held the failed variant's model
        write()
    base = next((r for r in results["variants"] if r["variant"] == "bf16" and "step_ms_median" in r), None)
    for row in results["variants"]:
        if "step_ms_median" in row:
            row["time_vs_bf16"] = ratio(row["step_ms_median"], base and base["step_ms_median"])
            row["pipelined_vs_bf16"] = ratio(row["pipelined_ms_median"], base and base["pipelined_ms_median"])
            row["memory_vs_bf16"] = ratio(row["peak_gib"], base and base["peak_gib"])
    write()

    if args.curve_steps > 0:
        results["curve"] = curve_agreement(args, curve_shape, curve_vocab)
        write()
    print_table(results)


if __name__ == "__main__":
    main()
