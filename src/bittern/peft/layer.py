"""The PEFT LoRA layer for a packed :class:`~bittern.nn.TernaryLinear`, registered through PEFT's custom-module
dispatch (``LoraConfig._register_custom_module``).

Why a class of our own: PEFT's ``lora.Linear`` serves ``nn.Linear`` bases (so :class:`~bittern.nn.BitLinear`, an
``nn.Linear``, needs nothing), but a packed layer has no dense ``weight`` for PEFT's merge to add to, and PEFT
cannot tell its in/out features. Everything else — the forward (base output plus ``scaling · B(A(dropout(x)))``),
several adapters, mixed-adapter batches, saving and loading — is PEFT's, inherited unchanged.

The frozen base stays packed: its forward is :func:`bittern.kernels.integer_linear`, whose backward passes
``grad_y @ (Wt/s_w)`` to ``x`` (a fused Triton kernel on the GPU that widens the int8 codes on chip; no bf16 copy
of the weight) and never a gradient to the codes.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from bittern.nn import TernaryLinear
from bittern.peft.merge import merged_layer

_STASH = "bittern_unmerged"


class TernaryLoraLinear(LoraLinear):
    """LoRA adapters on a frozen packed :class:`TernaryLinear` (``[..., K]`` → ``[..., N]``).

    ``merge`` folds the active adapters into the packed codes by :func:`bittern.peft.merge.merged_layer` (the
    base's latent plus ``ΔW``, re-ternarized), so PEFT's ``merge_and_unload`` yields TernaryLinear layers; the
    codes and scale from before the merge are kept (2 bits per weight) so that ``unmerge`` restores them exactly.
    Only plain LoRA is supported (no DoRA or other variants: they need a dense base weight).
    """

    @property
    def lora_variants(self) -> dict[tuple[str, ...], Any]:
        return {(): None}

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold ``adapter_names`` (default: the active adapters) into the packed base, in place.

        Adapters merged earlier stay merged; the codes are recomputed once from the original base plus the sum of
        every merged adapter's ``ΔW`` (merging adapters one after the other would round after each).
        """
        names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
        if not names:
            return
        base: TernaryLinear = self.get_base_layer()
        if _STASH not in self._caches:
            bias = None if base.bias is None else base.bias.detach().clone()
            self._caches[_STASH] = (base.packed_weight.clone(), base.weight_scale.clone(), bias)
        everything = [*self.merged_adapters, *names]
        original = self._original_base()
        delta = sum(self.get_delta_weight(a).to(torch.float32) for a in everything)
        bias_delta = None
        if any(self.lora_bias[a] for a in everything):
            bias_delta = sum(
                self.lora_B[a].bias.detach().float() * self.scaling[a] for a in everything if self.lora_bias[a]
            )
        merged = merged_layer(original, delta, bias_delta, layers="ternary")
        if safe_merge and not torch.isfinite(merged.weight_scale).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter(s) {names} seem to be broken")
        self._install(base, merged.packed_weight, merged.weight_scale, merged.bias)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Restore the packed codes, scale and bias from before the first merge (exactly)."""
        if not self.merged:
            return
        packed, scale, bias = self._caches.pop(_STASH)
        self._install(self.get_base_layer(), packed, scale, bias)
        self.merged_adapters.clear()

    def _original_base(self) -> TernaryLinear:
        """The base layer as it was before any merge (a light copy around the stashed buffers)."""
        packed, scale, bias = self._caches[_STASH]
        base: TernaryLinear = self.get_base_layer()
        original = TernaryLinear(
            base.in_features, base.out_features, bias=bias is not None, per_channel=base.per_channel, device="meta"
        )
        self._install(original, packed, scale, bias)
        return original

    @staticmethod
    def _install(layer: TernaryLinear, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        layer.packed_weight = packed
        layer.weight_scale = scale.to(device=packed.device, dtype=torch.float32)
        if bias is not None:
            dtype = layer.bias.dtype if layer.bias is not None else bias.dtype
            layer.bias = nn.Parameter(bias.detach().to(device=packed.device, dtype=dtype), requires_grad=False)

    def __repr__(self) -> str:
        return "bittern." + super().__repr__()
