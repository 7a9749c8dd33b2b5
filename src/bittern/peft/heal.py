"""A short quantization-aware "heal" of a merged model: train the merged latent weights a few steps.

Merging rounds ``latent + ΔW`` to ternary codes, which loses the part of ``ΔW`` that crosses no rounding
threshold. Healing turns the ternary layers into :class:`~bittern.nn.BitLinear` (latent weights, straight-through
estimator) and trains them on the fine-tuning data for a few steps; the result is packed again. Its memory is
that of full fine-tuning of the ternary layers (latent weights, gradients and AdamW state) for those steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from bittern.convert import ConversionPolicy, ternary_layer_names, to_bitlinear, to_ternary
from bittern.errors import ConfigError
from bittern.nn import BitLinear


@dataclass
class HealResult:
    """The healed model (packed TernaryLinear layers, eval mode) and the training loss of every step."""

    model: nn.Module
    losses: list[float] = field(default_factory=list)


def _input_ids(batch) -> torch.Tensor:
    """int64 ``[B, L]`` from a tensor or a ``{"input_ids": ...}`` mapping (a PackedBlocks item or a collated batch)."""
    ids = batch["input_ids"] if isinstance(batch, dict) else batch
    return ids if ids.dim() == 2 else ids.unsqueeze(0)


def heal(
    model: nn.Module,
    batches: Iterable,
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    train_all: bool = False,
    max_grad_norm: float = 1.0,
    progress: bool = True,
) -> HealResult:
    """Train the ternary layers of ``model`` as BitLinear for ``steps`` AdamW steps, then pack them (in place).

    Args:
        model: a merged model (:func:`bittern.peft.merge_lora`; ``layers="bitlinear"`` keeps the unrounded merged
            latents, the better start) with TernaryLinear and/or BitLinear layers.
        batches: token ids, int64 ``[B, L]`` (or dicts with ``input_ids``), on any device; cycled if shorter than
            ``steps``. The loss is the model's next-token cross-entropy with ``labels = input_ids``.
        lr: peak learning rate; it decays linearly to 0 over the steps. A packed base's latents start at their
            codes' centres (0 or ``±s/d``), about ``s/2`` from the nearest rounding threshold, so the rate must move
            weights by a fair share of ``s`` within the few steps; the default suits weights of ``mean|W|`` ≈ 0.01-0.05.
        train_all: also train embeddings, norms and the head (default: only the ternary layers' latent weights).
        progress: show a tqdm bar.

    Returns:
        :class:`HealResult`; ``model`` itself is returned in it with packed layers, in eval mode.
    """
    if steps < 1:
        raise ConfigError(f"heal needs at least 1 step, got {steps}")
    names = ternary_layer_names(model)
    if not names:
        raise ConfigError("heal: the model has no ternary layers")
    to_bitlinear(model, ConversionPolicy.for_layers(names))
    device = next(model.parameters()).device
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    for layer in layers:
        layer.lam = 1.0
    model.requires_grad_(train_all)
    for layer in layers:
        layer.requires_grad_(True)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    losses: list[float] = []
    model.train()
    stream = _cycle(batches)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="heal", unit="step", dynamic_ncols=True)
    for _ in range(steps):
        ids = _input_ids(next(stream)).to(device)
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"loss {losses[-1]:.3f}", refresh=False)
    if bar is not None:
        bar.close()
    del optimizer
    model.requires_grad_(False)
    to_ternary(model)
    return HealResult(model.eval(), losses)


def _cycle(batches: Iterable) -> Iterator:
    """Iterate ``batches`` again and again (each pass in the same order)."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ConfigError("heal: no batches to train on")
