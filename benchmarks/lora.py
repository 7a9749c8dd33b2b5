"""LoRA on a packed ternary base against full fine-tuning of latent weights: memory, step time and quality.

Part 1 (memory and step time): the ``2b4t-shape`` preset (BitNet b1.58 2B4T dimensions: BitNet architecture with
sub-norms and relu², hidden 2560, intermediate 6912, 20/5 heads, vocab 128256, tied embeddings) with
``--num-layers`` decoder blocks (all 30 by default: 2.1 B linear weights, the size where the optimizer state of
full fine-tuning matters; fewer layers and longer batches let the LM head's logits, the same in both arms, weigh
more), random weights, one fixed batch of random tokens, bf16 autocast, fused AdamW. Every arm (and every fit of
part 2) computes its loss the same way, by ``bittern.train.losses``: in chunks of ``--loss-chunk`` tokens whose LM-head
logits the backward recomputes instead of keeping (1024 by default; 0: transformers' own loss, which holds the float32
logits of every token and their gradients, several GiB of the peak at vocab 128256). Arms:

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
its tokenizer instead), then fine-tuned on Python's ``help()`` topics, sorted by name and split by topic: every
10th from the 6th is held out, every 10th from the 1st is the validation split (taken from the training topics,
disjoint from the held-out ones; before it existed, its 8 topics were trained on too), the rest is trained on,
the same batches for every run:

(a) full fine-tuning of its latent weights, once per ``--q-full-lr``;
(b) LoRA on the packed base, once per ``--rank`` and ``--q-lora-lr``;
(c) the adapter of the selected LoRA run merged and re-ternarized (``bittern.peft.merge_lora``: the packed layer's
    latent plus ``ΔW``, nearest rounding), (c') the same with stochastic rounding at the base's scale
    (``rounding="stochastic"``), (c'') the naive merge that ternarizes ``Wt·s + ΔW`` by ``mean|·|`` (for contrast:
    it shrinks every scale);
(d) a short heal (``bittern.peft.heal``, ``--heal-steps``) from the unrounded merged latents of (c) and from the
    stochastic merge (c'), once per ``--heal-lr`` and ``--heal-distill`` weight ``w``: the heal minimizes
    ``w · KL(LoRA ‖ merged) + (1 - w) · cross-entropy``, the selected LoRA model (frozen) as the teacher; ``w = 0``
    is the plain cross-entropy heal.

Selection: in each arm (a), (b) and (d), the run with the lowest validation loss is selected; every run's
validation and held-out losses are reported, and the goal ratios (LoRA / full <= 1.05, merged + heal / LoRA <=
1.02) are the held-out losses of the selected runs, so no choice is made on the held-out topics. Losses are mean
NLL in nats/token over disjoint ``--q-seq-len`` windows; merges and heals also report the mean per-token
``KL(LoRA ‖ model)`` on the held-out windows. A progress line per run shows where a long run is, ``--json`` is
rewritten after every run, and ``--q-max-minutes`` skips the heal runs that would likely end past a time limit
(reported as skipped). Runs: ``len(q-full-lr) + len(rank) · len(q-lora-lr)`` fine-tunings of ``--ft-steps`` and
``2 · len(heal-lr) · len(heal-distill)`` heals of ``--heal-steps`` (defaults: 6 x 60 and 12 x 40 steps).

    python benchmarks/lora.py [--num-layers 30] [--batch-size 1] [--seq-len 2048] [--rank 16] [--loss-chunk 1024]
        [--arms full,lora,full-ckpt,lora-ckpt | --skip-part1] [--quality] [--json out.json]

``--device cpu`` is a dry run with tiny shapes (wall-clock timing, no memory figures; chunks of at most 16 tokens)
to check the script end to end on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
import traceback
from pathlib import Path

import torch
from common import autocast, fmt, free, ratio, versions
from torch import nn

ARMS = ("full", "lora", "full-ckpt", "lora-ckpt")
CPU_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
CPU_VOCAB = 256
QUALITY_SPLITS = ("train", "validation", "held_out")


# --- shared ---------------------------------------------------------------------------------------------------


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params: list[nn.Parameter], lr: float, device: torch.device, weight_decay: float = 0.0):
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, fused=device.type == "cuda")


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor, loss_chunk: int) -> torch.Tensor:
    """One AdamW step on ``ids`` (int64 ``[B, T]``, its own labels); the loss through ``bittern.train.losses``:
    ``loss_chunk`` tokens per checkpointed LM-head chunk, 0 for transformers' loss over the full logits."""
    from bittern.train.losses import causal_lm_loss

    with autocast(ids.device):
        loss = causal_lm_loss(model, ids, ids, loss_chunk)
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


def loss_label(loss_chunk: int) -> str:
    """How the runs computed their loss, for the table headers."""
    return f"loss in {loss_chunk}-token chunks" if loss_chunk else "loss over full logits (transformers)"


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
            losses.append(train_step(model, optimizer, ids, args.loss_chunk))
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            begin = time.perf_counter()
            losses.append(train_step(model, optimizer, ids, args.loss_chunk))
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
            "loss_chunk": args.loss_chunk,
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


def topic_split(index: int) -> str:
    """Which split ``help()`` topic number ``index`` (sorted by name) belongs to: every 10th topic from the 6th is
    ``held_out``, every 10th from the 1st is ``validation`` (for choosing learning rates, ranks and heal settings),
    the rest is ``train``."""
    return {5: "held_out", 0: "validation"}.get(index % 10, "train")


def quality_data(args: argparse.Namespace, tokenizer) -> dict[str, torch.Tensor]:
    """Token streams: ``pretrain`` (stdlib docstrings), ``train``, ``validation`` and ``held_out`` (help() topics,
    see :func:`topic_split`). int64 ``[T]`` each, on the CPU."""
    from bittern.train.corpus import pydoc_topics, stdlib_docstrings

    def stream(documents: list[str]) -> torch.Tensor:
        ids: list[int] = []
        for document in documents:
            ids += tokenizer(document, add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
        return torch.tensor(ids, dtype=torch.long)

    topics = pydoc_topics()
    split = {name: [t for i, t in enumerate(topics) if topic_split(i) == name] for name in QUALITY_SPLITS}
    data = {name: stream(documents) for name, documents in split.items()}
    data["pretrain"] = stream(stdlib_docstrings(args.docstring_modules)) if args.base is None else torch.empty(0)
    data["topics"] = {name: len(documents) for name, documents in split.items()}
    return data


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
    loss_chunk: int,
    evaluate=None,
    every: int = 0,
) -> tuple[list[float], list[dict]]:
    """AdamW over ``data`` with 5% warmup and linear decay to 0 (the loss as :func:`train_step` computes it with
    ``loss_chunk``): the loss of every step, and ``{"step": step, **evaluate(model)}`` every ``every`` steps and at
    the end when ``evaluate`` is given."""
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
        losses.append(train_step(model, optimizer, ids.to(device), loss_chunk))
        schedule.step()
        if evaluate is not None and ((every and step % every == 0) or step == len(data)):
            curve.append({"step": step, **evaluate(model)})
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
    """``(model with BitLinear latents, tokenizer, pretraining losses, data)``: trained here, or loaded from
    ``--base`` (data None then)."""
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
    losses, _ = fit(model, steps, args.pretrain_lr, device, "pretrain on docstrings", args.loss_chunk)
    return model, tokenizer, losses, data


class Progress:
    """One line per finished run: ``[quality k/n, elapsed] what``; the partial result is written each time."""

    def __init__(self, total: int, publish) -> None:
        self.total, self.done, self.publish = total, 0, publish
        self.begin = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.begin

    def __call__(self, text: str) -> None:
        self.done += 1
        print(f"[quality {self.done}/{self.total}, {self.elapsed() / 60:.1f} min] {text}", flush=True)
        self.publish()


def select(rows: dict[str, dict], names: list[str]) -> str | None:
    """The name among ``names`` with the lowest validation loss (rows that ran), marked ``selected``."""
    ran = [name for name in names if "validation_loss" in rows[name]]
    if not ran:
        return None
    best = min(ran, key=lambda name: rows[name]["validation_loss"])
    rows[best]["selected"] = True
    return best


def heal_name(start: str, lr: float, weight: float) -> str:
    return f"{start}+heal lr {lr:g}" + (f" distill {weight:g}" if weight else "")


def quality_part(args: argparse.Namespace, device: torch.device, out: dict, publish) -> dict:
    """Fill ``out`` (config, rows, selected runs, ratios) run by run, calling ``publish()`` after each."""
    import bittern
    from bittern.peft import distillation_kl, heal, merge_lora

    heal_starts = ("merged-stochastic", "merged")  # the better start first: a time limit drops the other's runs
    heal_runs = [(s, w, lr) for s in heal_starts for w in args.heal_distill for lr in args.heal_lr]
    ft_runs = len(args.q_full_lr) + len(args.q_lora_lr) * len(args.ranks)
    progress = Progress((args.base is None) + 1 + ft_runs + 3 + len(heal_runs), publish)
    limit = args.q_max_minutes * 60 if args.q_max_minutes else math.inf
    rows: dict[str, dict] = {}
    out.update(config={}, rows=rows)

    base, tokenizer, pretrain_losses, data = pretrained_base(args, device)
    data = data or quality_data(args, tokenizer)
    out["pretrain_final_loss"] = pretrain_losses[-1] if pretrain_losses else None
    if args.base is None:
        progress(f"pretrained {args.pretrain_steps} steps, final loss {pretrain_losses[-1]:.3f}")
    ft = batches(data["train"], args.ft_steps, args.q_batch_size, args.q_seq_len, args.seed + 1)
    validation, held, seq = data["validation"], data["held_out"], args.q_seq_len
    out["config"] = {
        "base": args.base or f"{args.quality_preset} preset ({args.q_layers or 'all'} layers) pretrained here",
        "vocab_size": len(tokenizer),
        "pretrain_steps": 0 if args.base else args.pretrain_steps,
        "pretrain_tokens_available": int(data["pretrain"].numel()),
        "ft_steps": args.ft_steps,
        "heal_steps": args.heal_steps,
        "batch_size": args.q_batch_size,
        "pretrain_batch_size": args.pretrain_batch_size,
        "seq_len": seq,
        "topics": data["topics"],
        "split": "help() topics sorted by name: index % 10 == 5 held out, index % 10 == 0 validation, the rest train",
        "ft_train_tokens_available": int(data["train"].numel()),
        "validation_tokens": int(validation.numel()),
        "held_out_tokens": int(held.numel()),
        "ranks": args.ranks,
        "alpha": args.alpha if args.alpha is not None else "2 * rank",
        "lr": {"pretrain": args.pretrain_lr, "full": args.q_full_lr, "lora": args.q_lora_lr, "heal": args.heal_lr},
        "heal_distill_weights": args.heal_distill,
        "loss_chunk": args.loss_chunk,
        "max_minutes": args.q_max_minutes or None,
        "selection": "per arm, the run with the lowest validation loss; goal ratios are held-out losses of those runs",
    }

    def losses_of(model: nn.Module) -> dict[str, float]:  # a BitLinear model computes what its packed form computes
        return {
            "validation_loss": held_out_loss(model, validation, seq),
            "held_out_loss": held_out_loss(model, held, seq),
        }

    def summary(row: dict) -> str:
        return f"validation {row['validation_loss']:.4f}, held-out {row['held_out_loss']:.4f}"

    base.eval()
    packed_base = bittern.to_ternary(copy.deepcopy(base)).eval()
    rows["base"] = {"arm": "base", **losses_of(packed_base)}
    del packed_base
    progress(f"base: {summary(rows['base'])}")

    every = max(args.ft_steps // 5, 1)
    for lr in args.q_full_lr:
        name = f"full lr {lr:g}"
        full = full_model(copy.deepcopy(base))
        started = time.perf_counter()
        losses, curve = fit(full, ft, lr, device, name, args.loss_chunk, losses_of, every)
        row = {"arm": "full", "lr": lr, "train_losses": losses, "curve": curve}
        row.update(losses_of(bittern.to_ternary(full).eval()), seconds=time.perf_counter() - started)
        rows[name] = row
        del full
        free(device)
        progress(f"{name}: {summary(row)} ({row['seconds']:.0f} s)")

    teacher, teacher_name = None, None  # the LoRA run with the lowest validation loss so far
    for rank in args.ranks:
        for lr in args.q_lora_lr:
            name = f"lora r{rank} lr {lr:g}"
            lora = lora_model(copy.deepcopy(base), rank, args.alpha, None)
            started = time.perf_counter()
            losses, curve = fit(lora, ft, lr, device, name, args.loss_chunk, losses_of, every)
            lora.eval()
            row = {"arm": "lora", "rank": rank, "lr": lr, "train_losses": losses, "curve": curve}
            row.update(losses_of(lora), seconds=time.perf_counter() - started, trainable_params=count(trainable(lora)))
            rows[name] = row
            if teacher is None or row["validation_loss"] < rows[teacher_name]["validation_loss"]:
                teacher, teacher_name = lora.requires_grad_(False), name
            del lora
            free(device)
            progress(f"{name}: {summary(row)} ({row['seconds']:.0f} s)")
    del base
    selected = {
        "full": select(rows, [n for n, r in rows.items() if r["arm"] == "full"]),
        "lora": select(rows, [n for n, r in rows.items() if r["arm"] == "lora"]),
    }
    assert selected["lora"] == teacher_name
    out["selected"] = selected

    held_blocks = held[: held.numel() // seq * seq].view(-1, seq).split(8)

    def kl_to_lora(model: nn.Module) -> float:  # mean KL(LoRA ‖ model) per token over full held-out windows
        return distillation_kl(model, teacher, held_blocks)

    starts = {}
    for name in ("merged-naive", "merged-stochastic", "merged"):
        if name == "merged-naive":
            merged = naive_merge(teacher)
        elif name == "merged-stochastic":
            merged = merge_lora(copy.deepcopy(teacher), rounding="stochastic", seed=args.seed)
        else:  # the unrounded merged latents: a heal start; packed, the nearest-rounding merge
            merged = merge_lora(copy.deepcopy(teacher), layers="bitlinear")
        packed = bittern.to_ternary(copy.deepcopy(merged)).eval() if name == "merged" else merged.eval()
        rows[name] = {"arm": "merge", **losses_of(packed), "held_out_kl_to_lora": kl_to_lora(packed)}
        if name in heal_starts:
            starts[name] = merged
        del packed, merged
        progress(f"{name}: {summary(rows[name])}, KL to LoRA {rows[name]['held_out_kl_to_lora']:.4f}")

    heal_data = ft[: args.heal_steps]
    longest = 0.0  # of the heal runs so far
    for start, weight, lr in heal_runs:
        name = heal_name(start, lr, weight)
        if progress.elapsed() + longest > limit:  # the next heal would likely end past --q-max-minutes
            rows[name] = {"arm": "heal", "start": start, "lr": lr, "distill_weight": weight}
            rows[name]["skipped"] = "skipped: time limit"
            progress(f"{name}: skipped (--q-max-minutes {args.q_max_minutes:g})")
            continue
        started = time.perf_counter()
        healed = heal(copy.deepcopy(starts[start]), heal_data, steps=args.heal_steps, lr=lr,
                      teacher=teacher if weight else None, distill_weight=weight, progress=True)  # fmt: skip
        row = {"arm": "heal", "start": start, "lr": lr, "distill_weight": weight, "train_losses": healed.losses,
               "ce_losses": healed.ce_losses, "kl_losses": healed.kl_losses}  # fmt: skip
        row.update(losses_of(healed.model), held_out_kl_to_lora=kl_to_lora(healed.model))
        row["seconds"] = time.perf_counter() - started
        longest = max(longest, row["seconds"])
        rows[name] = row
        del healed
        free(device)
        progress(f"{name}: {summary(row)}, KL to LoRA {row['held_out_kl_to_lora']:.4f} ({row['seconds']:.0f} s)")
    starts.clear()
    teacher = None  # frees the LoRA models
    free(device)

    heal_names = [n for n, r in rows.items() if r["arm"] == "heal"]
    selected["heal"] = select(rows, heal_names)
    lora_row, full_row = rows[selected["lora"]], rows[selected["full"]]
    for row in rows.values():
        if "held_out_loss" in row:
            row["held_out_vs_lora"] = row["held_out_loss"] / lora_row["held_out_loss"]
            row["validation_vs_lora"] = row["validation_loss"] / lora_row["validation_loss"]
    ratios = {
        "lora_vs_full": lora_row["held_out_loss"] / full_row["held_out_loss"],
        "lora_vs_full_validation": lora_row["validation_loss"] / full_row["validation_loss"],
        "merged_vs_lora": rows["merged"]["held_out_vs_lora"],
        "stochastic_vs_lora": rows["merged-stochastic"]["held_out_vs_lora"],
        "naive_vs_lora": rows["merged-naive"]["held_out_vs_lora"],
        "healed_vs_lora": rows[selected["heal"]]["held_out_vs_lora"] if selected["heal"] else None,
        "healed_vs_lora_validation": rows[selected["heal"]]["validation_vs_lora"] if selected["heal"] else None,
        "healed_vs_lora_per_distill_weight": {},  # the validation-selected heal among those of each weight
    }
    for weight in args.heal_distill:
        names = [n for n in heal_names if rows[n]["distill_weight"] == weight and "validation_loss" in rows[n]]
        if names:
            best = min(names, key=lambda n: rows[n]["validation_loss"])
            ratios["healed_vs_lora_per_distill_weight"][f"{weight:g}"] = {
                "run": best,
                "held_out_vs_lora": rows[best]["held_out_vs_lora"],
                "validation_vs_lora": rows[best]["validation_vs_lora"],
            }
    out["ratios"] = ratios
    out["seconds"] = progress.elapsed()
    publish()
    return out


# --- report -------------------------------------------------------------------------------------------------------


def print_tables(results: dict) -> None:
    memory = results.get("memory")
    if memory:
        c = memory["config"]
        print(f"\n2b4t-shape ({c['num_layers']} layers, vocab {c['vocab_size']}), batch {c['batch_size']} x seq "
              f"{c['seq_len']}, LoRA rank {c['rank']} on every ternary layer, {loss_label(c['loss_chunk'])}, "
              f"{results['device']}")  # fmt: skip
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
        print_quality(quality)


def print_quality(quality: dict) -> None:
    if "error" in quality:
        print(f"\nquality: failed: {quality['error']}")
    c, rows = quality.get("config"), quality.get("rows")
    if not c or not rows:
        return
    t = c["topics"]
    print(
        f"\nquality: {c['base']}; fine-tuned {c['ft_steps']} steps of {c['batch_size']} x {c['seq_len']} tokens on "
        f"{t['train']} help() topics; validation {t['validation']} topics ({c['validation_tokens']:,} tokens), "
        f"held-out {t['held_out']} topics ({c['held_out_tokens']:,} tokens); heal {c['heal_steps']} steps; "
        f"{loss_label(c['loss_chunk'])} (heals: bittern.peft.heal's own)"
    )
    print("Each arm's learning rate (LoRA: and rank) and the heal setting are chosen by validation loss (validation "
          "topics are split off the training topics, apart from the held-out ones); '(selected)' marks them, and the "
          "goal ratios below are held-out losses of the selected runs. vs LoRA: against the selected LoRA run; "
          "KL to LoRA: mean KL(LoRA ‖ model) per held-out token.")  # fmt: skip
    print("| run | validation loss | held-out loss (nats/token) | held-out ppl | held-out vs LoRA | KL to LoRA | s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        label = f"{name} (selected)" if row.get("selected") else name
        if "held_out_loss" not in row:
            print(f"| {label} | {row.get('skipped', 'not run')} | | | | | |")
            continue
        loss = row["held_out_loss"]
        print(f"| {label} | {row['validation_loss']:.4f} | {loss:.4f} | {math.exp(loss):.2f} | "
              f"{fmt(row.get('held_out_vs_lora'), '.3f')} | {fmt(row.get('held_out_kl_to_lora'), '.4f')} | "
              f"{fmt(row.get('seconds'), '.0f')} |")  # fmt: skip
    r, chosen = quality.get("ratios"), quality.get("selected", {})
    if not r:
        return
    print(f"LoRA / full, validation-selected ({chosen['lora']} vs {chosen['full']}): {r['lora_vs_full']:.3f} held-out "
          f"(goal <= 1.05; {r['lora_vs_full_validation']:.3f} on validation)")  # fmt: skip
    print(f"merged / LoRA: nearest {r['merged_vs_lora']:.3f}, stochastic rounding {r['stochastic_vs_lora']:.3f}, "
          f"naive {r['naive_vs_lora']:.3f}")  # fmt: skip
    if r["healed_vs_lora"] is not None:
        print(f"merged+heal / LoRA, validation-selected ({chosen['heal']}): {r['healed_vs_lora']:.3f} held-out "
              f"(goal <= 1.02; {r['healed_vs_lora_validation']:.3f} on validation)")  # fmt: skip
        per_weight = r["healed_vs_lora_per_distill_weight"]
        print("  per distill weight, validation-selected within each: " + "; ".join(
            f"{w}: {v['held_out_vs_lora']:.3f} ({v['run']})" for w, v in per_weight.items()))  # fmt: skip


def comma_list(kind, low: float | None = None, high: float | None = None):
    """An argparse type: a comma list of ``kind`` values within [low, high], duplicates dropped, order kept."""

    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a comma list of {kind.__name__} values: {text!r}") from exc
        if not values:
            raise argparse.ArgumentTypeError("give at least one value")
        for value in values:
            if (low is not None and not value >= low) or (high is not None and not value <= high):
                raise argparse.ArgumentTypeError(f"{value} lies outside [{low}, {high}]")
        return list(dict.fromkeys(values))

    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: tiny-shape dry run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", type=comma_list(int, 1), default=[16],
                        help="LoRA rank(s), comma list (default 16): part 1 measures the first, part 2 fine-tunes a "
                        "LoRA per rank and learning rate")  # fmt: skip
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 * rank)")
    parser.add_argument("--loss-chunk", type=int, default=1024, metavar="N",
                        help="tokens per chunk of the loss of every arm and fit (LM-head logits recomputed in the "
                        "backward, not kept); 0: transformers' loss over the full logits (default 1024)")  # fmt: skip
    part1 = parser.add_argument_group("part 1: memory and step time")
    part1.add_argument("--skip-part1", action="store_true", help="run no part 1 arm (the same as --arms '')")
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
    part2.add_argument("--ft-steps", type=int, default=60, help="fine-tuning steps of every full FT and LoRA run")
    part2.add_argument("--heal-steps", type=int, default=40, help="steps of every heal run (default 40)")
    part2.add_argument("--q-batch-size", type=int, default=16, help="fine-tuning and heal batch size")
    part2.add_argument("--q-seq-len", type=int, default=256)
    part2.add_argument("--q-full-lr", type=comma_list(float, 0), default=[1e-4, 3e-4, 1e-3],
                       help="full fine-tuning peak learning rates, comma list: one run each, the best on validation "
                       "selected (default 1e-4,3e-4,1e-3)")  # fmt: skip
    part2.add_argument("--q-lora-lr", type=comma_list(float, 0), default=[1e-3, 3e-3, 1e-2],
                       help="LoRA peak learning rates, comma list: one run per value and rank, the best on validation "
                       "selected (default 1e-3,3e-3,1e-2)")  # fmt: skip
    part2.add_argument("--heal-lr", type=comma_list(float, 0), default=[3e-4, 1e-3, 3e-3],
                       help="heal peak learning rates, comma list: one heal per start, value and distill weight "
                       "(default 3e-4,1e-3,3e-3)")  # fmt: skip
    part2.add_argument("--heal-distill", type=comma_list(float, 0.0, 1.0), default=[0.0, 1.0],
                       help="heal distillation weights w in [0, 1], comma list: each heal minimizes "
                       "w * KL(LoRA || merged) + (1 - w) * cross-entropy; 0: the plain heal (default 0,1)")  # fmt: skip
    part2.add_argument("--q-max-minutes", type=float, default=0.0,
                       help="time limit of part 2 in minutes: a heal run that would likely end past it is skipped "
                       "and reported so (default 0: none)")  # fmt: skip
    parser.add_argument("--json", help="write every result here (part 2: rewritten after every run)")
    args = parser.parse_args()
    args.arms = [] if args.skip_part1 else [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arms {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if not args.arms and not args.quality:
        parser.error("nothing to run: part 1 is skipped and --quality is not given")
    for name in ("ft_steps", "heal_steps", "pretrain_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.loss_chunk < 0:
        parser.error("--loss-chunk must be >= 0 (0: transformers' loss)")
    args.frozen_dtype = torch.bfloat16 if args.lora_frozen_dtype == "bfloat16" else None
    args.ranks = args.rank
    if args.device == "cpu":
        args.num_layers, args.batch_size, args.seq_len, args.steps, args.warmup = 1, 2, 32, 2, 1
        args.quality_preset, args.q_layers, args.vocab_size, args.docstring_modules = "tiny", 1, 320, 30
        args.pretrain_steps, args.ft_steps = min(args.pretrain_steps, 10), min(args.ft_steps, 10)
        args.heal_steps = min(args.heal_steps, 3)
        args.q_batch_size, args.pretrain_batch_size, args.q_seq_len = 4, 4, 64
        args.ranks = list(dict.fromkeys(min(rank, 4) for rank in args.ranks))
        args.loss_chunk = min(args.loss_chunk, 16)  # several chunks per batch of the tiny shapes
    elif not torch.cuda.is_available():
        parser.error("no CUDA GPU here; use --device cpu for a dry run")
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    args.rank = args.ranks[0]  # part 1
    device = torch.device(args.device)
    results: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()}, dry run)",
        "versions": versions(("triton", "transformers", "peft", "bittern")),
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
        results["quality"] = {}
        try:
            quality_part(args, device, results["quality"], write)
        except Exception as exc:  # keep the runs that finished
            traceback.print_exc()
            results["quality"]["error"] = f"{type(exc).__name__}: {exc}"[:500]
        write()
    print_tables(results)


if __name__ == "__main__":
    main()
