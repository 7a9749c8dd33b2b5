"""LoRA on ternary models (docs/design.md §1: a use-case above :mod:`bittern.convert` and :mod:`bittern.nn`).

The base stays packed (2 bits per weight, frozen); PEFT's adapters train on top::

    import copy

    import bittern
    from bittern.peft import apply_lora, load_adapter, merge_lora, heal

    model = bittern.load_model("variants/packed")          # TernaryLinear layers
    peft_model = apply_lora(model, rank=16)                # PEFT LoRA on every ternary layer
    ...train...; peft_model.save_pretrained("adapter")     # PEFT's own adapter format
    merged = merge_lora(peft_model)                        # TernaryLinear again, ΔW folded in and re-ternarized
    healed = heal(merge_lora(peft_model2, layers="bitlinear"), batches, steps=50).model   # short QAT
    teacher = copy.deepcopy(peft_model3)                   # or distil the merge back towards the LoRA model
    healed = heal(merge_lora(peft_model3, layers="bitlinear"), batches, steps=50, teacher=teacher).model

Needs the ``peft`` extra (``pip install 'bittern[peft]'``).
"""

from __future__ import annotations

from bittern.peft.heal import HealResult, distillation_kl, heal
from bittern.peft.layer import TernaryLoraLinear
from bittern.peft.lora import apply_lora, load_adapter, lora_config, merge_lora, register, resolve_targets
from bittern.peft.merge import latent_weight, merged_layer

__all__ = [
    "HealResult",
    "TernaryLoraLinear",
    "apply_lora",
    "distillation_kl",
    "heal",
    "latent_weight",
    "load_adapter",
    "lora_config",
    "merge_lora",
    "merged_layer",
    "register",
    "resolve_targets",
]
