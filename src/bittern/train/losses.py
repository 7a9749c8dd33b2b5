"""The causal-LM cross-entropy computed in chunks of tokens, never holding the full ``[tokens, vocab]`` logits.

A causal LM's loss the usual way (``model(input_ids, labels=labels).loss`` in transformers) projects every position
through the LM head at once: bf16 logits ``[B·T, V]``, a float32 upcast for the cross-entropy, and float32
gradients of them in the backward. With a large vocabulary that is the largest tensor of a training step (2048
tokens of a 128256-token vocabulary: 1 GiB per float32 copy), and for LoRA, whose weights, gradients and optimizer
state are small, it sets the peak.

:func:`chunked_causal_lm_loss` instead projects ``chunk_tokens`` positions at a time, each chunk's head product and
cross-entropy under activation checkpointing: the backward recomputes a chunk's logits rather than keeping them,
so what a step holds for the loss is O(chunk x vocab) instead of O(tokens x vocab), for one extra head product per
chunk in the backward (``2·chunk·H·V`` FLOPs; the whole head's forward again). The value and the gradients are the
unchunked ones up to float rounding. :func:`causal_lm_loss` runs a Hugging Face causal LM (PEFT-wrapped or not)
through its forward and applies it to the final hidden states.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

#: config fields of transformers models whose logits are not ``head(hidden)`` (scaled or soft-capped)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor,
    chunk_tokens: int = 1024,
    ignore_index: int = -100,
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy of ``head(hidden)`` against ``labels``, ``chunk_tokens`` positions at a time.

    The labels are shifted as transformers' ``ForCausalLMLoss`` shifts them: position ``t`` predicts
    ``labels[:, t + 1]`` (the last position of each row predicts nothing), targets equal to ``ignore_index`` are
    skipped, the logits are upcast to float32 before the cross-entropy, and the result is the mean over the
    counted targets. Chunks run over the ``B·T`` flattened positions; each chunk's ``head`` product and
    cross-entropy sum is checkpointed (``use_reentrant=False``), so the backward recomputes its logits instead of
    keeping them: O(chunk_tokens x V) memory for the loss instead of O(B·T x V), at the cost of one extra head
    product per chunk in the backward.

    Args:
        hidden: ``[B, T, H]`` final hidden states (after the final norm), any float dtype; the head's input.
        head: the LM head, called as a module on ``[chunk, H]`` rows to give ``[chunk, V]`` logits (an
            ``nn.Linear``, PEFT-wrapped, frozen or tied to the embeddings: whatever it computes is used). Runs
            under the caller's autocast, also when the backward recomputes it.
        labels: integer ``[B, T]`` token ids in ``[0, V)`` or ``ignore_index``, unshifted (the ``input_ids``
            for plain language modelling).
        chunk_tokens: positions per chunk, >= 1; a larger chunk holds more logits at once and launches fewer
            head products.
        ignore_index: the label value whose targets are not counted.
        num_items_in_batch: divide the summed loss by this count instead of the number of counted targets (what
            transformers' ``Trainer`` passes under gradient accumulation, so micro-batches add up to the mean over
            the accumulated batch).

    Returns:
        A float32 scalar: mean NLL in nats per counted target. With no counted target it is 0 (with a graph, so
        ``backward`` works and gives zero gradients), where transformers' mean gives NaN.

    Raises:
        ValueError: ``hidden`` is not 3-D, ``labels`` is not an integer tensor of ``hidden``'s ``[B, T]``, or
            ``chunk_tokens`` is not a positive integer.
    """
    _check(hidden, labels, chunk_tokens)
    width = hidden.shape[-1]
    rows = hidden.reshape(-1, width)  # a view when hidden is contiguous
    targets = F.pad(labels, (0, 1), value=ignore_index)[:, 1:].reshape(-1).to(device=hidden.device, dtype=torch.long)
    piece = functools.partial(_chunk_nll_sum, head=head, ignore_index=ignore_index)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_tokens):
        chunk, chunk_targets = rows[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if torch.is_grad_enabled():
            total = total + checkpoint(piece, chunk, chunk_targets, use_reentrant=False)
        else:
            total = total + piece(chunk, chunk_targets)
    if num_items_in_batch is None:
        count = (targets != ignore_index).sum().clamp(min=1)
    else:
        count = torch.as_tensor(num_items_in_batch, device=total.device)
    return total / count


def _chunk_nll_sum(rows: torch.Tensor, targets: torch.Tensor, *, head: nn.Module, ignore_index: int) -> torch.Tensor:
    """Summed float32 cross-entropy of ``head(rows)`` (``[n, H]`` → ``[n, V]``) against int64 ``targets`` ``[n]``."""
    logits = head(rows).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


def _check(hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int) -> None:
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer (positions per chunk), got {chunk_tokens!r}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H] final hidden states, got shape {tuple(hidden.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must hold integer token ids, got dtype {labels.dtype}")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"labels must be [B, T] = {tuple(hidden.shape[:2])} to match hidden {tuple(hidden.shape)}, "
            f"got shape {tuple(labels.shape)}"
        )


# --- Hugging Face causal LMs ------------------------------------------------------------------------------------


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int | None = 1024,
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
    **forward_kwargs,
) -> torch.Tensor:
    """The causal-LM loss of a Hugging Face model: :func:`chunked_causal_lm_loss` when ``chunk_tokens`` is
    positive, else (0 or None) transformers' own ``model(input_ids=..., labels=...).loss``.

    Args:
        model: a transformers causal LM (LlamaForCausalLM, BitNetForCausalLM, ...) whose logits are
            ``get_output_embeddings()(last hidden state)``, possibly wrapped by PEFT (``get_peft_model``) or
            DistributedDataParallel; it is called through its own forward (see :func:`final_hidden_states`).
        input_ids: int64 ``[B, T]``.
        labels: integer ``[B, T]``, unshifted, -100 where not counted.
        chunk_tokens: positions per chunk; 0 or None: transformers' loss over the full logits.
        num_items_in_batch: see :func:`chunked_causal_lm_loss` (passed to transformers' loss when unchunked).
        forward_kwargs: more inputs of the forward (``attention_mask``, ``position_ids``, ...).

    Returns:
        The float32 scalar loss, mean NLL in nats per counted target.
    """
    if not chunk_tokens:
        if num_items_in_batch is not None:
            forward_kwargs["num_items_in_batch"] = num_items_in_batch
        return model(input_ids=input_ids, labels=labels, **forward_kwargs).loss
    hidden, _ = final_hidden_states(model, input_ids=input_ids, **forward_kwargs)
    return chunked_causal_lm_loss(
        hidden, output_head(model), labels, chunk_tokens, num_items_in_batch=num_items_in_batch
    )


def final_hidden_states(model: nn.Module, **inputs) -> tuple[torch.Tensor, object]:
    """``([B, T, H] final hidden states, the model's outputs)`` of one forward of a Hugging Face causal LM.

    The forward runs through ``model`` itself, so whatever wraps it acts as usual (PEFT's adapter hooks, DDP's
    gradient synchronisation, accelerate's autocast), with ``logits_to_keep=1``: the head projects only each
    row's last position (``[B, 1, V]`` logits in the outputs). The hidden states are the backbone's
    ``last_hidden_state`` (after the final norm), taken by a forward hook on the backbone
    (``get_decoder()`` of the unwrapped model).

    Raises:
        ValueError: the model's logits are not ``head(hidden)`` (soft-capped or scaled), or it has no separate
            backbone or no output embeddings.
    """
    backbone = _backbone(model)
    captured: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple, output) -> None:
        captured.append(output[0])  # BaseModelOutput(WithPast)[0] and tuple outputs alike: last_hidden_state

    handle = backbone.register_forward_hook(keep)
    try:
        outputs = model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(
            f"expected one call of the backbone {type(backbone).__name__} per forward, saw {len(captured)}"
        )
    return captured[0], outputs


def output_head(model: nn.Module) -> nn.Module:
    """The LM head module of a (wrapped) Hugging Face causal LM: ``get_output_embeddings()``, PEFT layer or not."""
    head = unwrap_causal_lm(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head) to compute a loss with")
    return head


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside DistributedDataParallel (``.module``), ``torch.compile`` (``._orig_mod``)
    and PEFT (``get_base_model()``) wrappers.

    Raises:
        ValueError: ``model`` is (inside) ``nn.DataParallel``, whose replicas a hook on the original cannot see.
    """
    while True:
        if isinstance(model, nn.DataParallel):
            raise ValueError("the chunked loss does not support nn.DataParallel: run one process per GPU (torchrun)")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif callable(getattr(type(model), "get_base_model", None)):
            model = model.get_base_model()
        else:
            return model


def _backbone(model: nn.Module) -> nn.Module:
    language_model = unwrap_causal_lm(model)
    config = getattr(language_model, "config", None)
    transforms = [name for name in _LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1, 1.0)]
    if transforms:
        raise ValueError(
            f"{type(language_model).__name__} transforms its logits ({', '.join(transforms)}): the chunked loss "
            "computes head(hidden) only; use chunk_tokens=0"
        )
    backbone = language_model.get_decoder() if hasattr(language_model, "get_decoder") else None
    if not isinstance(backbone, nn.Module) or backbone is language_model:
        raise ValueError(f"{type(language_model).__name__} has no backbone apart from its LM head (get_decoder())")
    return backbone
