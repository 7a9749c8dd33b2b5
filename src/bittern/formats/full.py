"""Plain full-precision Hugging Face checkpoints, and the dense checkpoints whose linear layers are BitNet latent
weights: ``autobitlinear`` online (2B4T's bf16 revision) and Falcon-E's ``prequantized`` revision (a plain
``LlamaForCausalLM`` config with ``"is_bitnet_config": true`` and no ``quantization_config``). Which layers of a
latent checkpoint are ternary is decided by the default conversion policy when the model is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bittern.formats.common import Checkpoint, check_finite, split_marker


def latent_layout(config: dict[str, Any]) -> str | None:
    """The layout of a dense checkpoint whose linear layers are BitNet latent weights, or None for a plain one:
    ``bitnet-online`` (a ``bitnet`` ``quantization_config`` that is not offline) or ``falcon-e-prequantized``
    (``is_bitnet_config: true`` without ``quantization_config``)."""
    quantization = config.get("quantization_config")
    if isinstance(quantization, dict) and quantization.get("quant_method") == "bitnet":
        return "bitnet-online" if quantization.get("quantization_mode", "offline") != "offline" else None
    if quantization is None and config.get("is_bitnet_config") is True:
        return "falcon-e-prequantized"
    return None


def read_full(
    directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], files: dict[str, Path]
) -> Checkpoint:
    """Read a dense checkpoint. A plain one has no ternary layers (``latent_layers=[]``); a latent one
    (:func:`latent_layout`) gets ``latent_layers=None``: the default conversion policy picks its latent layers."""
    plain, _, _ = split_marker(config)
    for key, tensor in tensors.items():
        check_finite(tensor, files.get(key), key)
    latent = latent_layout(config)
    return Checkpoint(
        config=plain,
        tensors=dict(tensors),
        latent_layers=None if latent else [],
        layout=latent or "hf-full",
        source=directory,
        files=files,
    )
