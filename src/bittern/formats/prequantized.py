"""The prequantized variant: latent (full-precision master) weights plus a marker, ready for training.

It is a plain Hugging Face checkpoint (stock transformers loads it, but computes gibberish without
BitLinear layers); ``config.json`` carries bittern's marker naming the layers that are ternary, so
bittern reloads them as :class:`bittern.nn.BitLinear` with the same per-tensor or per-channel scales.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bittern.errors import ConfigError, MissingFileError
from bittern.formats.common import (
    WEIGHTS_FILE,
    Checkpoint,
    check_finite,
    make_marker,
    split_marker,
    write_checkpoint_dir,
)

FORMAT = "prequantized"


def write_prequantized(checkpoint: Checkpoint, destination: str | Path, overwrite: bool = False) -> Path:
    """Write latent weights and the marker listing ``checkpoint.latent_layers``."""
    if checkpoint.ternary:
        raise ConfigError(
            "a prequantized checkpoint holds latent weights; this model's ternary layers are packed "
            "(load it as BitLinear layers first)"
        )
    if not checkpoint.latent_layers:
        raise ConfigError("the model has no ternary (BitLinear) layers; convert it first (bittern convert)")
    config = dict(checkpoint.config)
    config["is_bitnet_config"] = True  # Falcon-E's mark of latent BitNet weights: other tools read it as such too
    config["bittern"] = make_marker(
        FORMAT, ternary_layers=sorted(checkpoint.latent_layers), per_channel=checkpoint.per_channel
    )
    return write_checkpoint_dir(destination, checkpoint.tensors, config, FORMAT, checkpoint.source, overwrite)


def read_prequantized(
    directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], files: dict[str, Path]
) -> Checkpoint:
    """Read a prequantized checkpoint: dense tensors and the names of the latent layers."""
    plain, _, marker = split_marker(config)
    assert marker is not None
    layers = list(marker.get("ternary_layers", []))
    for name in layers:
        if f"{name}.weight" not in tensors:
            raise MissingFileError(f"latent weight '{name}.weight' is missing", directory / WEIGHTS_FILE)
    for key, tensor in tensors.items():
        check_finite(tensor, files.get(key), key)
    return Checkpoint(
        config=plain,
        tensors=dict(tensors),
        latent_layers=layers,
        per_channel=bool(marker.get("per_channel", False)),
        layout="bittern-prequantized",
        source=directory,
        files=files,
    )
