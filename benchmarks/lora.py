"""LoRA on a packed ternary base against full fine-tuning of latent weights: memory, step time and quality.

Part 1 (memory and step time): the ``2b4t-shape`` preset (BitNet b1.58 2B4T dimensions: BitNet architecture with
sub-norms and relu², hidden 2560, intermediate 6912, 20/5 heads, vocab 128256, tied embeddings) with
``--num-layers`` decoder blocks (all 30 by default: 2.1 B linear weights, the size where the optimizer state of
full fine-tuning matters; fewer layers and longer batches let the LM head's logits, the same in both arms, weigh
more), random weights, one fixed batch of random tokens, bf16 autocast, fused AdamW. Arms:

* ``full``: full fine-tuning the onebitllms way: every decoder linear a :class:`bittern.BitLinear` with float32
  latent weights, every parameter (embeddings and norms too) trained, with gradients and AdamW state;
* ``lora``: the decoder linears packed (:class:`bittern.TernaryLinear`, 2 bits per weight, frozen), the other
  frozen weights in ``--lora-frozen-dtype`` (bf16 by default), LoRA adapters (``--rank``, every ternary layer) in
  float32 with AdamW state: only the adapters train;
* ``full-ckpt`` / ``lora-ckpt``: the same with Hugging Face gradient checkpointing (activations recomputed per
  block), where activations no longer hide the weights' share.

Each arm builds its model from the same seed, runs ``--warmup`` untimed then ``--steps`` timed steps (CUDA events)
and reports the median step time and the peak GPU memory of training (the model's own weights included; the peak
counter is reset after the model is built).

Part 2 (``--quality``): a small real task with local data. A ternary model (the ``--quality-preset``, ``small`` by
default) is pretrained from scratch on the standard library's docstrings (``--base DIR``: a packed checkpoint with
its tokenizer instead), then fine-tuned on Python's ``help()`` topics (every 10th topic held out), the same
batches for every arm: (a) full fine-tuning of its latent weights, (b) LoRA on the packed base, (c) the adapter
merged and re-ternarized (``bittern.peft.merge_lora``: the packed layer's latent plus ``ΔW``, nearest rounding),
(c') the same with stochastic rounding at the base's scale (``rounding="stochastic"``), (c'') the naive merge that
ternarizes ``Wt·s + ΔW`` by ``mean|·|`` (for contrast: it shrinks every scale), (d) the merge (c) + a short heal
(``bittern.peft.heal``) from the unrounded merged latents of (c) and from the stochastic merge (c'), once per
``--heal-lr`` value (the packed base's latents sit at their codes' centres, so how far a short heal moves them
depends on the learning rate more than a fine-tuning run from trained latents does).
Reported: the held-out loss (mean NLL, nats/token) on the held-out topics of each, and the goals' ratios.

    python benchmarks/lora.py [--num-layers 30] [--batch-size 1] [--seq-len 2048] [--rank 16]
        [--arms full,lora,full-ckpt,lora-ckpt] [--quality] [--json out.json]

``--device cpu`` is a dry run with tiny shapes (wall-clock timing, no memory figures) to check the script end to
end on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.metadata
import json
import math
import platform
import statistics
import time
import traceback
from pathlib import Path

import torch
from torch import nn

ARMS = ("full", "lora", "full-ckpt", "lora-ckpt")
CPU_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
CPU_VOCAB = 256


# --- shared ---------------------------------------------------------------------------------------------------


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params: list[nn.Parameter], lr: float, device: torch.device, weight_decay: float = 0.0):
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, fused=device.type == "cuda")


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> torch.Tensor:
    with autocast(ids.device):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable(model), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def full_model(model: nn.Module) -> nn.Module:
    """Full fine-tuning: BitLinear latent weights (float32), every parameter trainable."""
    import bittern

    bittern.to_bitlinear(model)
    return model.requires_grad_(True)


def lora_model(model: nn.Module, rank: int, alpha: float | None, frozen_dtype: torch.dtype | None) -> nn.Module:
    """LoRA: the ternary layers packed and frozen, the rest frozen in ``frozen_dtype``, float32 adapters."""
    import bittern
    from bittern.peft import apply_lora

    bittern.to_ternary(model)
    if frozen_dtype is not None:
        model.to(frozen_dtype)  # TernaryLinear keeps its scales in float32
    return apply_lora(model, rank=rank, alpha=alpha)


def count(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


# --- part 1: memory and step time -------------------------------------------------------------------------------


def shape_config(args: argparse.Namespace):
    """The 2b4t-shape preset's config with ``args.num_layers`` blocks (tiny shapes on the CPU)."""
    from bittern.train.presets import get_preset

    preset = get_preset("2b4t-shape")
    config = preset.config(CPU_VOCAB, args.num_layers)
    if args.device == "cpu":
        for key, value in CPU_SHAPE.items():
            setattr(config, key, value)
        config.head_dim = CPU_SHAPE["hidden_size"] // CPU_SHAPE["num_attention_heads"]
        config.vocab_size = CPU_VOCAB
    config.use_cache = False
    return config


def build(config, seed: int, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(device).train()


def measure(arm: str, config, ids: torch.Tensor, args: argparse.Namespace) -> dict:
    device = ids.device
    cuda = device.type == "cuda"
    model = build(config, args.seed, device)
    if arm.startswith("full"):
        model, lr = full_model(model), args.full_lr
    else:
        model, lr = lora_model(model, args.rank, args.alpha, args.frozen_dtype), args.lora_lr
    if arm.endswith("-ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
    model.train()
    params = trainable(model)
    optimizer = make_optimizer(params, lr, device)
    free(device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident_gib = torch.cuda.memory_allocated() / 2**30
    losses, times_ms = [], []
    for step in range(args.warmup + args.steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses.append(train_step(model, optimizer, ids))
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            begin = time.perf_counter()
            losses.append(train_step(model, optimizer, ids))
            elapsed = (time.perf_counter() - begin) * 1e3
        if step >= args.warmup:
            times_ms.append(elapsed)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    values = [float(v) for v in torch.stack(losses).float().cpu()]
    row = {
        "arm": arm,
        "trainable_params": count(params),
        "step_ms_median": statistics.median(times_ms),
        "step_ms": times_ms,
        "tokens_per_s": ids.numel() / (statistics.median(times_ms) / 1e3),
        "peak_gib": peak_gib,
        "resident_gib": resident_gib if cuda else None,
        "first_loss": values[0],
        "final_loss": values[-1],
    }
    del model, optimizer, params, losses
    free(device)
    return row


def memory_part(args: argparse.Namespace, device: torch.device) -> dict:
    config = shape_config(args)
    ids = torch.randint(
        0, config.vocab_size, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(1)
    )
    ids = ids.to(device)
    result: dict = {
        "config": {
            "preset": "2b4t-shape",
            "num_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "heads": f"{config.num_attention_heads}/{config.num_key_value_heads}",
            "vocab_size": config.vocab_size,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "warmup": args.warmup,
            "rank": args.rank,
            "lora_frozen_dtype": str(args.frozen_dtype).replace("torch.", "") if args.frozen_dtype else "float32",
            "autocast": "bfloat16" if device.type == "cuda" else None,
        },
        "arms": [],
    }
    for arm in args.arms:
        try:
            row = measure(arm, config, ids, args)
        except Exception as exc:  # an arm that does not fit is a result, not the end of the run
            traceback.print_exc()
            row = {"arm": arm, "error": f"{type(exc).__name__}: {exc}"[:500]}
        else:
            print(f"{arm}: {row['step_ms_median']:.1f} ms/step, peak {fmt(row['peak_gib'], '.2f', ' GiB')}, "
                  f"{row['trainable_params']:,} trainable, loss {row['first_loss']:.3f} → {row['final_loss']:.3f}",
                  flush=True)  # fmt: skip
        result["arms"].append(row)
        free(device)
    rows = {r["arm"]: r for r in result["arms"] if "error" not in r}
    for lora, full in (("lora", "full"), ("lora-ckpt", "full-ckpt")):
        if lora in rows and full in rows:
            rows[lora]["memory_vs_full"] = ratio(rows[lora]["peak_gib"], rows[full]["peak_gib"])
            rows[lora]["time_vs_full"] = ratio(rows[lora]["step_ms_median"], rows[full]["step_ms_median"])
    return result


# --- part 2: quality on a real task -----------------------------------------------------------------------------


def quality_data(args: argparse.Namespace, tokenizer) -> dict[str, torch.Tensor]:
    """Token streams: ``pretrain`` (stdlib docstrings), ``train`` and ``held_out`` (help() topics, every 10th held
    out). int64 ``[T]`` each, on the CPU."""
    from bittern.train.corpus import pydoc_topics, stdlib_docstrings

    def stream(documents: list[str]) -> torch.Tensor:
        ids: list[int] = []
        for document in documents:
            ids += tokenizer(document, add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
        return torch.tensor(ids, dtype=torch.long)

    topics = pydoc_topics()
    return {
        "pretrain": stream(stdlib_docstrings(args.docstring_modules)) if args.base is None else torch.empty(0),
        "train": stream([t for i, t in enumerate(topics) if i % 10 != 5]),
        "held_out": stream([t for i, t in enumerate(topics) if i % 10 == 5]),
    }


def batches(stream: torch.Tensor, steps: int, batch: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """``steps`` batches of ``[batch, seq_len]`` blocks of ``stream``, shuffled epoch by epoch (seeded)."""
    blocks = stream[: stream.numel() // seq_len * seq_len].view(-1, seq_len)
    if blocks.shape[0] < batch:
        raise SystemExit(f"only {blocks.shape[0]} blocks of {seq_len} tokens; lower --q-seq-len or --q-batch-size")
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        if len(order) < batch:
            order += torch.randperm(blocks.shape[0], generator=generator).tolist()
        out.append(blocks[order[:batch]])
        order = order[batch:]
    return out


def fit(
    model: nn.Module,
    data: list[torch.Tensor],
    lr: float,
    device: torch.device,
    desc: str,
    evaluate=None,
    every: int = 0,
) -> tuple[list[float], list[tuple[int, float]]]:
    """AdamW over ``data`` with 5% warmup and linear decay to 0: the loss of every step, and ``(step,
    evaluate(model))`` every ``every`` steps and at the end when ``evaluate`` is given."""
    from tqdm.auto import tqdm

    params = trainable(model)
    optimizer = make_optimizer(params, lr, device)
    warmup = max(len(data) // 20, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (len(data) - s) / max(len(data) - warmup, 1)))
    )
    model.train()
    losses, curve = [], []
    for step, ids in enumerate(tqdm(data, desc=desc, unit="step", dynamic_ncols=True), start=1):
        losses.append(train_step(model, optimizer, ids.to(device)))
        schedule.step()
        if evaluate is not None and ((every and step % every == 0) or step == len(data)):
            curve.append((step, evaluate(model)))
            model.train()
    del optimizer
    return [float(v) for v in torch.stack(losses).float().cpu()], curve


def held_out_loss(model: nn.Module, ids: torch.Tensor, seq_len: int) -> float:
    """Mean next-token NLL (nats/token) over disjoint ``seq_len`` windows of ``ids``."""
    from bittern.eval.perplexity import sliding_window_nll

    with autocast(next(model.parameters()).device):
        result = sliding_window_nll(model, ids, window=seq_len, stride=seq_len, progress=False)
    return result.nll_sum / result.tokens


def naive_merge(peft_model) -> nn.Module:
    """``ternarize(Wt·s + ΔW)`` by the weight rule itself (scale = mean|·|): the merge that shrinks every scale."""
    from peft.tuners.lora import LoraLayer

    from bittern import quant
    from bittern.nn import TernaryLinear

    model = copy.deepcopy(peft_model)
    base = model.get_base_model()
    with torch.no_grad():
        for name, module in list(base.named_modules()):
            if isinstance(module, LoraLayer):
                inner = module.get_base_layer()
                dense = inner.dequantized_weight() + module.get_delta_weight("default").float()
                codes, scale = quant.ternarize(dense, per_channel=inner.per_channel)
                base.set_submodule(name, TernaryLinear.from_codes(codes, scale, inner.bias))
    return base


def pretrained_base(args: argparse.Namespace, device: torch.device):
    """``(model with BitLinear latents, tokenizer, pretraining losses)``: trained here, or loaded from ``--base``."""
    import bittern
    from bittern.train.presets import get_preset
    from bittern.train.tokenizer import load_tokenizer, train_bpe_tokenizer

    if args.base is not None:
        tokenizer = load_tokenizer(args.base)
        return bittern.load_model(args.base, layers="bitlinear").to(device), tokenizer, [], None
    from transformers import AutoModelForCausalLM

    from bittern.train.corpus import stdlib_docstrings

    tokenizer = train_bpe_tokenizer(stdlib_docstrings(args.docstring_modules), args.vocab_size)
    data = quality_data(args, tokenizer)
    preset = get_preset(args.quality_preset)
    config = preset.config(len(tokenizer), args.q_layers, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(args.seed)
    model = full_model(AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device))
    steps = batches(data["pretrain"], args.pretrain_steps, args.pretrain_batch_size, args.q_seq_len, args.seed)
    losses, _ = fit(model, steps, args.pretrain_lr, device, "pretrain on docstrings")
    return model, tokenizer, losses, data


def quality_part(args: argparse.Namespace, device: torch.device) -> dict:
    import bittern
    from bittern.peft import heal, merge_lora

    begin = time.perf_counter()
    base, tokenizer, pretrain_losses, data = pretrained_base(args, device)
    data = data or quality_data(args, tokenizer)
    ft = batches(data["train"], args.ft_steps, args.q_batch_size, args.q_seq_len, args.seed + 1)
    held = data["held_out"]
    seq = args.q_seq_len
    base.eval()
    packed_base = bittern.to_ternary(copy.deepcopy(base)).eval()
    rows: dict[str, dict] = {"base": {"held_out_loss": held_out_loss(packed_base, held, seq)}}
    del packed_base

    def evaluate(model: nn.Module) -> float:  # a BitLinear model computes what its packed form computes
        return held_out_loss(model, held, seq)

    every = max(args.ft_steps // 5, 1)
    full = full_model(copy.deepcopy(base))
    started = time.perf_counter()
    losses, curve = fit(full, ft, args.q_full_lr, device, "full fine-tuning", evaluate, every)
    rows["full"] = {"train_losses": losses, "held_out_curve": curve, "seconds": time.perf_counter() - started}
    rows["full"]["held_out_loss"] = held_out_loss(bittern.to_ternary(full).eval(), held, seq)
    del full
    free(device)

    lora = lora_model(copy.deepcopy(base), args.rank, args.alpha, None)
    started = time.perf_counter()
    losses, curve = fit(lora, ft, args.q_lora_lr, device, "LoRA", evaluate, every)
    rows["lora"] = {"train_losses": losses, "held_out_curve": curve, "seconds": time.perf_counter() - started}
    lora.eval()
    rows["lora"]["held_out_loss"] = held_out_loss(lora, held, seq)
    rows["lora"]["trainable_params"] = count(trainable(lora))
    rows["merged-naive"] = {"held_out_loss": held_out_loss(naive_merge(lora).eval(), held, seq)}
    stochastic = merge_lora(copy.deepcopy(lora), rounding="stochastic", seed=args.seed)
    rows["merged-stochastic"] = {"held_out_loss": held_out_loss(stochastic.eval(), held, seq)}
    latent = merge_lora(lora, layers="bitlinear")
    rows["merged"] = {"held_out_loss": held_out_loss(bittern.to_ternary(copy.deepcopy(latent)).eval(), held, seq)}
    heal_data = ft[: args.heal_steps]
    starts = {"merged": latent, "merged-stochastic": stochastic}
    for start, merged in starts.items():
        for lr in args.heal_lr:
            started = time.perf_counter()
            healed = heal(copy.deepcopy(merged), heal_data, steps=args.heal_steps, lr=lr)
            row = {"start": start, "lr": lr, "train_losses": healed.losses, "seconds": time.perf_counter() - started}
            row["held_out_loss"] = held_out_loss(healed.model, held, seq)
            rows[f"{start}+heal lr {lr:g}"] = row
            del healed
            free(device)
    del latent, stochastic, starts, merged, base
    free(device)
    healed_rows = [row for row in rows.values() if "start" in row]

    ratios = {
        "lora_vs_full": rows["lora"]["held_out_loss"] / rows["full"]["held_out_loss"],
        "healed_vs_lora": {
            f"{row['start']}, lr {row['lr']:g}": row["held_out_loss"] / rows["lora"]["held_out_loss"]
            for row in healed_rows
        },
        "merged_vs_lora": rows["merged"]["held_out_loss"] / rows["lora"]["held_out_loss"],
        "stochastic_vs_lora": rows["merged-stochastic"]["held_out_loss"] / rows["lora"]["held_out_loss"],
    }
    return {
        "config": {
            "base": args.base or f"{args.quality_preset} preset ({args.q_layers or 'all'} layers) pretrained here",
            "vocab_size": len(tokenizer),
            "pretrain_steps": 0 if args.base else args.pretrain_steps,
            "pretrain_tokens_available": int(data["pretrain"].numel()),
            "ft_steps": args.ft_steps,
            "heal_steps": args.heal_steps,
            "batch_size": args.q_batch_size,
            "pretrain_batch_size": args.pretrain_batch_size,
            "seq_len": seq,
            "ft_train_tokens_available": int(data["train"].numel()),
            "held_out_tokens": int(held.numel()),
            "rank": args.rank,
            "alpha": args.alpha if args.alpha is not None else 2 * args.rank,
            "lr": {"pretrain": args.pretrain_lr, "full": args.q_full_lr, "lora": args.q_lora_lr, "heal": args.heal_lr},
        },
        "pretrain_final_loss": pretrain_losses[-1] if pretrain_losses else None,
        "rows": rows,
        "ratios": ratios,
        "seconds": time.perf_counter() - begin,
    }


# --- report -------------------------------------------------------------------------------------------------------


def ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{suffix}"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("triton", "transformers", "peft", "bittern"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def print_tables(results: dict) -> None:
    memory = results.get("memory")
    if memory:
        c = memory["config"]
        print(f"\n2b4t-shape ({c['num_layers']} layers, vocab {c['vocab_size']}), batch {c['batch_size']} x seq "
              f"{c['seq_len']}, LoRA rank {c['rank']} on every ternary layer, {results['device']}")  # fmt: skip
        print("| arm | trainable params | step ms (median) | tokens/s | peak GiB | memory vs full | time vs full |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for row in memory["arms"]:
            if "error" in row:
                print(f"| {row['arm']} | failed: {row['error']} | | | | | |")
                continue
            print(
                f"| {row['arm']} | {row['trainable_params']:,} | {row['step_ms_median']:.1f} | "
                f"{row['tokens_per_s']:,.0f} | {fmt(row['peak_gib'], '.2f')} | "
                f"{fmt(row.get('memory_vs_full'), '.1%')} | {fmt(row.get('time_vs_full'), '.2f', 'x')} |"
            )
    quality = results.get("quality")
    if quality:
        if "error" in quality:
            print(f"\nquality: failed: {quality['error']}")
            return
        c = quality["config"]
        print(f"\nquality: {c['base']}; fine-tuned {c['ft_steps']} steps of {c['batch_size']} x {c['seq_len']} tokens "
              f"on help() topics, held-out {c['held_out_tokens']:,} tokens; heal {c['heal_steps']} steps")  # fmt: skip
        print("| model | held-out loss (nats/token) | perplexity |")
        print("|---|---:|---:|")
        for name, row in quality["rows"].items():
            loss = row["held_out_loss"]
            print(f"| {name} | {loss:.4f} | {math.exp(loss):.2f} |")
        r = quality["ratios"]
        print(f"LoRA / full: {r['lora_vs_full']:.3f} (goal <= 1.05); merged / LoRA: {r['merged_vs_lora']:.3f} "
              f"(stochastic rounding: {r['stochastic_vs_lora']:.3f}); "
              "merged+heal / LoRA: " + ", ".join(f"{v:.3f} ({k})" for k, v in r["healed_vs_lora"].items())
              + " (goal <= 1.02)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: tiny-shape dry run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 * rank)")
    part1 = parser.add_argument_group("part 1: memory and step time")
    part1.add_argument("--num-layers", type=int, default=30, help="decoder blocks of the 2b4t shape (default 30: all)")
    part1.add_argument("--batch-size", type=int, default=1)
    part1.add_argument("--seq-len", type=int, default=2048)
    part1.add_argument("--steps", type=int, default=10, help="timed steps per arm")
    part1.add_argument("--warmup", type=int, default=3, help="untimed steps per arm first")
    part1.add_argument("--arms", default=",".join(ARMS), help=f"comma list out of {','.join(ARMS)} ('' to skip)")
    part1.add_argument("--full-lr", type=float, default=1e-4)
    part1.add_argument("--lora-lr", type=float, default=1e-3)
    part1.add_argument("--lora-frozen-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                       help="dtype of the LoRA arm's frozen embeddings and norms")  # fmt: skip
    part2 = parser.add_argument_group("part 2: quality (--quality)")
    part2.add_argument("--quality", action="store_true", help="run part 2")
    part2.add_argument("--base", help="packed ternary checkpoint (with tokenizer) to fine-tune instead of pretraining")
    part2.add_argument("--quality-preset", default="small", help="preset pretrained as the base (default small)")
    part2.add_argument("--q-layers", type=int, default=None, help="blocks of the quality preset (default: all)")
    part2.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary trained on the docstrings")
    part2.add_argument("--docstring-modules", type=int, default=None, help="read at most this many stdlib modules")
    part2.add_argument("--pretrain-steps", type=int, default=600)
    part2.add_argument("--pretrain-batch-size", type=int, default=32)
    part2.add_argument("--pretrain-lr", type=float, default=1.5e-3)
    part2.add_argument("--ft-steps", type=int, default=60, help="fine-tuning steps of full FT and of LoRA")
    part2.add_argument("--heal-steps", type=int, default=20)
    part2.add_argument("--q-batch-size", type=int, default=16, help="fine-tuning and heal batch size")
    part2.add_argument("--q-seq-len", type=int, default=256)
    part2.add_argument("--q-full-lr", type=float, default=3e-4, help="full fine-tuning peak learning rate")
    part2.add_argument("--q-lora-lr", type=float, default=2e-3, help="LoRA peak learning rate")
    part2.add_argument(
        "--heal-lr",
        type=lambda text: [float(v) for v in text.split(",")],
        default=[3e-4, 1e-3, 3e-3],
        help="heal peak learning rates, comma list: one heal from the same merge per value (default 3e-4,1e-3,3e-3)",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arms {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    args.frozen_dtype = torch.bfloat16 if args.lora_frozen_dtype == "bfloat16" else None
    if args.device == "cpu":
        args.num_layers, args.batch_size, args.seq_len, args.steps, args.warmup = 1, 2, 32, 2, 1
        args.quality_preset, args.q_layers, args.vocab_size, args.docstring_modules = "tiny", 1, 320, 30
        args.pretrain_steps, args.ft_steps, args.heal_steps = min(args.pretrain_steps, 10), min(args.ft_steps, 10), 3
        args.q_batch_size, args.pretrain_batch_size, args.q_seq_len, args.rank = 4, 4, 64, min(args.rank, 4)
    elif not torch.cuda.is_available():
        parser.error("no CUDA GPU here; use --device cpu for a dry run")
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device(args.device)
    results: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()}, dry run)",
        "versions": versions(),
        "memory": None,
        "quality": None,
    }

    def write() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))

    if args.arms:
        results["memory"] = memory_part(args, device)
        write()
    if args.quality:
        try:
            results["quality"] = quality_part(args, device)
        except Exception as exc:
            traceback.print_exc()
            results["quality"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        write()
    print_tables(results)


if __name__ == "__main__":
    main()
