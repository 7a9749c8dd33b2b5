"""onebitllms' three public functions under their own names and signatures, computed by bittern.

A script written for onebitllms (tiiuae's fine-tuning package for Falcon-E) runs unchanged with
``from bittern.compat import replace_linear_with_bitnet_linear, quantize_to_1bit, convert_to_bf16``:

* :func:`replace_linear_with_bitnet_linear` swaps the decoder's ``nn.Linear`` layers for :class:`bittern.nn.BitLinear`
  (latent weights shared, trained with the straight-through estimator), as onebitllms' ``BitNetLinear``;
* :func:`quantize_to_1bit` writes a trained latent checkpoint as the packed ``bitnet`` layout stock transformers
  loads (``bitlinear``: ``weight_scale = 1 / mean|W|``), tokenizer included;
* :func:`convert_to_bf16` writes it as dense ``round(W * s) / s`` weights in bfloat16.

What differs, on purpose: every scale is computed in float32 from the float32 mean of ``|W|`` (onebitllms'
exporters take the mean and the reciprocal in bfloat16, so their stored scale and a few codes differ from what
its own training forward computed), the scales are stored in float32, and nothing is half-written on failure.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bittern.checkpoint import convert_checkpoint
from bittern.convert import to_bitlinear

__all__ = ["convert_to_bf16", "quantize_to_1bit", "replace_linear_with_bitnet_linear"]


def replace_linear_with_bitnet_linear(model: nn.Module, previous_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace the ``nn.Linear`` layers of ``model``'s decoder blocks by :class:`bittern.nn.BitLinear` (in place; the
    LM head and embeddings stay as they are) and return ``model``.

    ``previous_dtype`` is accepted for onebitllms' signature (its recursion carries the default dtype there) and
    not needed: each BitLinear keeps its layer's own weight, dtype and device.
    """
    del previous_dtype
    return to_bitlinear(model)


def quantize_to_1bit(input_checkpoint_path: str | Path, output_checkpoint_path: str | Path) -> str:
    """Write the latent checkpoint in ``input_checkpoint_path`` (saved by ``save_pretrained`` after training with
    :func:`replace_linear_with_bitnet_linear`, or any checkpoint bittern reads) as a packed ``bitnet`` checkpoint in
    ``output_checkpoint_path``, dense tensors in bfloat16 as onebitllms writes them; returns the output path.
    Replaces an existing output directory, as onebitllms' ``save_pretrained`` does."""
    convert_checkpoint(input_checkpoint_path, output_checkpoint_path, "packed", dtype=torch.bfloat16, overwrite=True)
    return str(output_checkpoint_path)


def convert_to_bf16(input_checkpoint_path: str | Path, output_checkpoint_path: str | Path) -> str:
    """Write the checkpoint in ``input_checkpoint_path`` with every ternary layer as its dense bfloat16 value
    ``round(W * s) / s`` (a plain checkpoint any tool loads) in ``output_checkpoint_path``; returns the output path."""
    convert_checkpoint(input_checkpoint_path, output_checkpoint_path, "bf16", dtype=torch.bfloat16, overwrite=True)
    return str(output_checkpoint_path)
