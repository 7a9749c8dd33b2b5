"""Folding a LoRA update into a ternary layer: the one rule every merge path uses.

A ternary layer computes with ``Wt / s_w`` (a code is worth ``v = 1 / s_w``); LoRA adds ``ΔW = scaling · B @ A`` on
top. The merged layer is the ternary layer of the *latent* weight ``L + ΔW``, ternarized by the numerical contract
(:func:`bittern.quant.ternarize`):

* a :class:`~bittern.nn.BitLinear` base has latent weights ``W`` of its own: ``L = W`` (which is also what PEFT's
  own merge of an ``nn.Linear`` does: ``W += ΔW``);
* a packed :class:`~bittern.nn.TernaryLinear` base has only ``Wt`` and ``s_w``: ``L = (Wt / s_w) / d`` with ``d``
  the share of non-zero codes (:meth:`TernaryLinear.to_bitlinear`), the latent whose ternarization gives back
  ``Wt`` and ``s_w``. Ternarizing ``Wt / s_w + ΔW`` itself would re-take ``mean|·|`` of ``{-v, 0, v}`` values and
  shrink the magnitude to about ``v·d`` (every merged layer would lose a third of its output); with ``L`` the merge
  of ``ΔW = 0`` is the identity, and ``ΔW`` flips the codes it pushes across a rounding threshold.

Small updates (``|ΔW| < v/2`` nearly everywhere, the usual case) flip few codes: the merged model loses part of
what the adapter learned. :func:`bittern.peft.heal` trains the merged latent weights a few steps to win it back.

``rounding="stochastic"`` is the alternative for packed bases: ``Wt / s_w + ΔW`` is rounded stochastically at the
base's own scale (:func:`bittern.quant.stochastic_ternary_codes`), so each code moves with probability ``|ΔW| / v``
and the merged weight equals ``Wt / s_w + ΔW`` in expectation (exactly the base when ``ΔW = 0``). A BitLinear base
is always rounded to nearest: its latent weights already lie spread inside their rounding intervals, so a small
``ΔW`` tips the ones near a threshold, much as stochastic rounding would.
"""

from __future__ import annotations

import torch
from torch import nn

from bittern import quant
from bittern.nn import BitLinear, TernaryLinear


def latent_weight(layer: nn.Module) -> torch.Tensor:
    """The float32 ``[N, K]`` latent weight of a linear layer: a BitLinear's (or nn.Linear's) own weight, or for a
    TernaryLinear the latent that reproduces its codes and scale (``(Wt / s_w) / d``)."""
    if isinstance(layer, TernaryLinear):
        return layer.to_bitlinear(dtype=torch.float32).weight.detach()
    return layer.weight.detach().to(torch.float32)


ROUNDINGS = ("nearest", "stochastic")


def merged_layer(
    base: nn.Module,
    delta: torch.Tensor,
    bias_delta: torch.Tensor | None = None,
    layers: str = "ternary",
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> nn.Module:
    """A new layer computing ``base`` with ``delta`` (float ``[N, K]``) folded in.

    Args:
        base: the adapted layer: TernaryLinear, BitLinear, or a plain nn.Linear (merged densely, ``W + ΔW``).
        delta: ``scaling · B @ A`` summed over the merged adapters.
        bias_delta: ``[N]`` added to the bias (LoRA with ``lora_bias``), or None.
        layers: ``ternary`` (a packed TernaryLinear) or ``bitlinear`` (a BitLinear holding the merged latent
            weight ``L + ΔW`` in float32, unrounded: the starting point of a heal). Plain nn.Linear bases stay
            nn.Linear either way.
        rounding: ``nearest`` (the weight rule) or ``stochastic`` (packed bases with ``layers="ternary"`` only;
            see the module docstring); ``generator`` drives it.

    Returns:
        The new layer on ``base``'s device, in eval/train mode as ``base``; ``base`` is not modified.
    """
    bias = None if getattr(base, "bias", None) is None else base.bias.detach().to(torch.float32)
    if bias_delta is not None:
        bias = (torch.zeros(delta.shape[0], device=delta.device) if bias is None else bias) + bias_delta.float()
    latent = latent_weight(base) + delta.to(torch.float32)
    if not isinstance(base, (BitLinear, TernaryLinear)):
        dense = nn.Linear(base.in_features, base.out_features, bias=bias is not None, device="meta")
        dense.weight = nn.Parameter(latent.to(base.weight.dtype), requires_grad=base.weight.requires_grad)
        if bias is not None:
            dense.bias = nn.Parameter(bias.to(base.weight.dtype))
        return dense.train(base.training)
    per_channel = base.per_channel
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, not {rounding!r}")
    if layers == "ternary" and rounding == "stochastic" and isinstance(base, TernaryLinear):
        merged = base.dequantized_weight() + delta.to(torch.float32)
        codes = quant.stochastic_ternary_codes(merged, base.weight_scale, generator)
        new: nn.Module = TernaryLinear.from_codes(codes, base.weight_scale, bias, per_channel=per_channel)
    elif layers == "ternary":
        codes, scale = quant.ternarize(latent, per_channel=per_channel)
        new = TernaryLinear.from_codes(codes, scale, bias, per_channel=per_channel)
    elif layers == "bitlinear":
        new = BitLinear(
            base.in_features, base.out_features, bias=bias is not None, device="meta", per_channel=per_channel
        )
        new.weight = nn.Parameter(latent)
        if bias is not None:
            new.bias = nn.Parameter(bias)
    else:
        raise ValueError(f"layers must be 'ternary' or 'bitlinear', not {layers!r}")
    return new.train(base.training)
