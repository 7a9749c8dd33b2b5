"""A short quantization-aware "heal" of a merged model: train the merged latent weights a few steps.

Merging rounds ``latent + ΔW`` to ternary codes, which loses the part of ``ΔW`` that crosses no rounding
threshold. Healing turns the ternary layers into :class:`~bittern.nn.BitLinear` (latent weights, straight-through
estimator) and trains them on the fine-tuning data for a few steps; the result is packed again. Its memory is
that of full fine-tuning of the ternary layers (latent weights, gradients and AdamW state) for those steps.

What the heal trains towards is a choice: the data's next tokens (cross-entropy), or, with a ``teacher`` (the
LoRA model before merging), the teacher's next-token distributions (distillation: the KL divergence from the
teacher to the merged model), or a mix. Since a heal is there to win back what the merge lost, the model the
adapter made is the natural target; :func:`distillation_kl` measures how far a model is from it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from bittern import reference
from bittern.convert import ConversionPolicy, set_quantization_strength, ternary_layer_names, to_bitlinear, to_ternary
from bittern.errors import ConfigError
from bittern.nn import BitLinear


@dataclass
class HealResult:
    """The healed model (packed TernaryLinear layers, eval mode) and per-step training losses (nats/token).

    ``losses`` is what each step minimized: ``distill_weight · kl + (1 - distill_weight) · ce`` with a teacher,
    else ``ce``. ``ce_losses`` is the next-token cross-entropy of every step and ``kl_losses`` the KL divergence
    from the teacher (empty without one), both measured on the step's batch before its update.
    """

    model: nn.Module
    losses: list[float] = field(default_factory=list)
    ce_losses: list[float] = field(default_factory=list)
    kl_losses: list[float] = field(default_factory=list)


def _input_ids(batch) -> torch.Tensor:
    """int64 ``[B, L]`` from a tensor or a ``{"input_ids": ...}`` mapping (a PackedBlocks item or a collated batch)."""
    ids = batch["input_ids"] if isinstance(batch, dict) else batch
    return ids if ids.dim() == 2 else ids.unsqueeze(0)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (what training and evaluation use there), nothing elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _vocab_size(module: nn.Module) -> int | None:
    """Rows of the output head (the logits' width), else ``config.vocab_size``, else None."""
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    return getattr(getattr(module, "config", None), "vocab_size", None)


def _check_teacher(model: nn.Module, teacher: nn.Module) -> None:
    if not isinstance(teacher, nn.Module):
        raise ConfigError(f"teacher must be a torch.nn.Module (a causal LM), not a {type(teacher).__name__}")
    if any(module is model for module in teacher.modules()):
        raise ConfigError(
            "the teacher is (or contains) the model being healed; merge_lora consumes its PeftModel, so keep a "
            "copy of the LoRA model as the teacher (copy.deepcopy before merging)"
        )
    if next(teacher.parameters(), None) is None:
        raise ConfigError("the teacher has no parameters")
    student_vocab, teacher_vocab = _vocab_size(model), _vocab_size(teacher)
    if student_vocab is not None and teacher_vocab is not None and student_vocab != teacher_vocab:
        raise ConfigError(
            f"the teacher's vocabulary ({teacher_vocab} logits) differs from the model's ({student_vocab}); "
            "distillation needs the same tokenizer"
        )


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``KL(teacher ‖ student)`` (nats), temperature 1, in float32.

    Both ``[B, L, V]`` (any float dtype, the same device); every one of the ``B·L`` positions counts, the last
    one of each sequence too (its prediction needs no label).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(
            f"teacher logits {list(teacher_logits.shape)} do not match the model's {list(student_logits.shape)}; "
            "distillation needs the same tokenizer and vocabulary"
        )
    return reference.distillation_kl(student_logits, teacher_logits)


def _teacher_logits(teacher: nn.Module, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The teacher's logits ``[B, L, V]`` for ``ids`` (no grad, under its device's autocast), on ``device``."""
    teacher_device = _device(teacher)
    with torch.no_grad(), _autocast(teacher_device):
        logits = teacher(input_ids=ids.to(teacher_device)).logits
    return logits.to(device)


def distillation_kl(model: nn.Module, teacher: nn.Module, batches: Iterable) -> float:
    """Mean ``KL(teacher ‖ model)`` per position (nats) over ``batches``: how far ``model`` is from ``teacher``.

    Both models run without gradients, in eval mode (their training flags are restored), each on its own
    device under bf16 autocast on CUDA; the KL is computed in float32 at temperature 1, averaged over all
    ``B·L`` positions of every batch (token ids, int64 ``[B, L]`` or dicts with ``input_ids``).

    Raises:
        ConfigError: the teacher is the model, the vocabularies differ, or there are no batches.
    """
    _check_teacher(model, teacher)
    device = _device(model)
    modes = (model.training, teacher.training)
    model.eval()
    teacher.eval()
    total, positions = 0.0, 0
    try:
        for batch in batches:
            ids = _input_ids(batch).to(device)
            with torch.no_grad(), _autocast(device):
                logits = model(input_ids=ids).logits
            kl = _kl(logits, _teacher_logits(teacher, ids, device))
            count = ids.numel()
            total += float(kl) * count
            positions += count
    finally:
        model.train(modes[0])
        teacher.train(modes[1])
    if not positions:
        raise ConfigError("distillation_kl: no batches to measure on")
    return total / positions


def heal(
    model: nn.Module,
    batches: Iterable,
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    train_all: bool = False,
    max_grad_norm: float = 1.0,
    progress: bool = True,
    teacher: nn.Module | None = None,
    distill_weight: float | None = None,
) -> HealResult:
    """Train the ternary layers of ``model`` as BitLinear for ``steps`` AdamW steps, then pack them (in place).

    Args:
        model: a merged model (:func:`bittern.peft.merge_lora`; ``layers="bitlinear"`` keeps the unrounded merged
            latents, the better start) with TernaryLinear and/or BitLinear layers.
        batches: token ids, int64 ``[B, L]`` (or dicts with ``input_ids``), on any device; cycled if shorter than
            ``steps``. The cross-entropy is the model's next-token loss with ``labels = input_ids``.
        lr: peak learning rate; it decays linearly to 0 over the steps. A packed base's latents start at their
            codes' centres (0 or ``±s/d``), about ``s/2`` from the nearest rounding threshold, so the rate must move
            weights by a fair share of ``s`` within the few steps; the default suits weights of ``mean|W|`` ≈ 0.01-0.05.
        train_all: also train embeddings, norms and the head (default: only the ternary layers' latent weights).
        progress: show a tqdm bar.
        teacher: the model to distil from, typically the LoRA model before merging (``copy.deepcopy`` it first:
            :func:`~bittern.peft.merge_lora` consumes its PeftModel), with the same tokenizer (logits of the same
            width). It is run without gradients and in eval mode (its training flag is restored afterwards), on
            its own device, under bf16 autocast when that device is CUDA (as the model is), and is not modified.
        distill_weight: ``w`` in [0, 1]: each step minimizes ``w · KL(teacher ‖ model) + (1 - w) · CE``, the KL
            taken between the next-token distributions at temperature 1 in float32, averaged over all ``B·L``
            positions (nats/token, like the CE). Default 1 (pure distillation) with a teacher; without one, only 0
            (or None) is allowed. With ``w = 0`` the teacher is still run, so the KL is logged but not trained.

    Returns:
        :class:`HealResult`; ``model`` itself is returned in it with packed layers, in eval mode.

    Raises:
        ConfigError: ``steps < 1``, no ternary layers, ``distill_weight`` outside [0, 1] or given (> 0) without a
            teacher, a teacher that is (or contains) ``model``, or whose vocabulary differs from the model's.
    """
    if steps < 1:
        raise ConfigError(f"heal needs at least 1 step, got {steps}")
    if distill_weight is not None:
        if isinstance(distill_weight, bool) or not isinstance(distill_weight, int | float):
            raise ConfigError(f"distill_weight must be a number in [0, 1], got {distill_weight!r}")
        if not (math.isfinite(distill_weight) and 0.0 <= distill_weight <= 1.0):
            raise ConfigError(f"distill_weight must lie in [0, 1], got {distill_weight!r}")
    if teacher is None:
        if distill_weight:
            raise ConfigError(f"distill_weight={distill_weight!r} needs a teacher to distil from")
        weight = 0.0
    else:
        _check_teacher(model, teacher)
        weight = 1.0 if distill_weight is None else float(distill_weight)
    names = ternary_layer_names(model)
    if not names:
        raise ConfigError("heal: the model has no ternary layers")
    to_bitlinear(model, ConversionPolicy.for_layers(names))
    device = _device(model)
    set_quantization_strength(model, 1.0)
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    model.requires_grad_(train_all)
    for layer in layers:
        layer.requires_grad_(True)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    result = HealResult(model)
    teacher_training = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher.eval()
    model.train()
    stream = _cycle(batches)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="heal", unit="step", dynamic_ncols=True)
    try:
        for _ in range(steps):
            ids = _input_ids(next(stream)).to(device)
            with _autocast(device):
                output = model(input_ids=ids, labels=ids)
            ce = output.loss
            if teacher is None:
                loss = ce
            else:
                logits = output.logits if weight > 0.0 else output.logits.detach()  # w = 0: measured, not trained
                kl = _kl(logits, _teacher_logits(teacher, ids, device))
                if weight == 0.0:
                    loss = ce
                elif weight == 1.0:
                    loss = kl
                else:
                    loss = weight * kl + (1.0 - weight) * ce
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            del output
            result.losses.append(float(loss.detach()))
            result.ce_losses.append(float(ce.detach()))
            if teacher is not None:
                result.kl_losses.append(float(kl.detach()))
            if bar is not None:
                bar.update(1)
                text = f"ce {result.ce_losses[-1]:.3f}"
                if teacher is not None:
                    text += f", kl {result.kl_losses[-1]:.4f}"
                bar.set_postfix_str(text, refresh=False)
    finally:
        if bar is not None:
            bar.close()
        if teacher is not None:
            teacher.train(teacher_training)
    del optimizer
    model.requires_grad_(False)
    to_ternary(model)
    model.eval()
    return result


def _cycle(batches: Iterable) -> Iterator:
    """Iterate ``batches`` again and again (each pass in the same order)."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ConfigError("heal: no batches to train on")
