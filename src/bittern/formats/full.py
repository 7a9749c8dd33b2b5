"""Plain full-precision Hugging Face checkpoints (and latent-weight QAT checkpoints such as
``autobitlinear`` online or Falcon-E's ``prequantized`` revision): dense tensors only. Which layers become
ternary is decided by a conversion policy when the model is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bittern.formats.common import Checkpoint, check_finite, split_marker


def read_full(
    directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], files: dict[str, Path]
) -> Checkpoint:
    """Read a dense checkpoint. A plain one has no ternary layers (``latent_layers=[]``); an online bitnet
    (QAT) one gets ``latent_layers=None``: the default conversion policy picks its latent layers."""
    plain, quantization, _ = split_marker(config)
    for key, tensor in tensors.items():
        check_finite(tensor, files.get(key), key)
    latent = quantization is not None  # an online (QAT) bitnet checkpoint: its linears are latent weights
    return Checkpoint(
        config=plain,
        tensors=dict(tensors),
        latent_layers=None if latent else [],
        layout="bitnet-online" if latent else "hf-full",
        source=directory,
        files=files,
    )
