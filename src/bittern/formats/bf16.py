"""The bf16 variant: a plain Hugging Face checkpoint whose ternary layers hold dense ``Wt / s_w`` weights
(onebitllms' ``convert_to_bf16``).

Stock transformers loads it as an ordinary model (no quantization config); it computes the ternary
weights without activation quantization. bittern's marker in ``config.json`` lists the ternary layers so
:func:`read_bf16` recovers their codes (``sign(W)``) and scale (``1 / max |W|``, exact up to the rounding of
``1 / s_w`` to the stored dtype). Note: ``Wt / s_w`` is not a valid latent weight for further training
(re-taking ``mean |W|`` shrinks the magnitude by the non-zero density); bittern rebuilds correct latents on load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bittern import quant
from bittern.errors import ConfigError, CorruptCheckpointError, MissingFileError
from bittern.formats.common import (
    WEIGHTS_FILE,
    Checkpoint,
    TernaryWeight,
    check_finite,
    make_marker,
    split_marker,
    write_checkpoint_dir,
)

FORMAT = "bf16"
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def write_bf16(
    checkpoint: Checkpoint, destination: str | Path, dtype: torch.dtype = torch.bfloat16, overwrite: bool = False
) -> Path:
    """Write the dense variant (every floating tensor in ``dtype``; ternary layers as ``Wt / s_w``)."""
    if dtype not in DTYPE_NAMES:
        raise ConfigError(f"the bf16 variant is written in one of {list(DTYPE_NAMES.values())}, not {dtype}")
    if not checkpoint.ternary:
        raise ConfigError("the model has no ternary layers; convert it first (bittern convert)")
    tensors = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in checkpoint.tensors.items()}
    for name, weight in checkpoint.ternary.items():
        tensors[f"{name}.weight"] = quant.dequantize_weight(weight.codes, weight.scale, dtype)
    config = dict(checkpoint.config)
    config.pop("is_bitnet_config", None)  # dense Wt / s_w values, not latent weights to quantize again
    config["dtype"] = DTYPE_NAMES[dtype]
    config["bittern"] = make_marker(
        FORMAT, ternary_layers=sorted(checkpoint.ternary), per_channel=checkpoint.per_channel
    )
    return write_checkpoint_dir(destination, tensors, config, FORMAT, checkpoint.source, overwrite)


def recover_ternary(weight: torch.Tensor, per_channel: bool, path: Path | None, key: str) -> TernaryWeight:
    """Codes and scale of a dense ``Wt / s_w`` tensor ``[N, K]`` (:func:`bittern.quant.ternary_of_dense`).

    Raises:
        CorruptCheckpointError: the non-zero magnitudes are not all equal (per tensor or per row).
    """
    recovered = quant.ternary_of_dense(weight, per_channel)
    if recovered is None:
        raise CorruptCheckpointError(
            "is listed as ternary but its non-zero values differ in magnitude (not a Wt/s_w tensor)", path, key
        )
    return TernaryWeight(*recovered)


def read_bf16(
    directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], files: dict[str, Path]
) -> Checkpoint:
    """Read bittern's bf16 variant back into codes and scales."""
    plain, _, marker = split_marker(config)
    assert marker is not None
    per_channel = bool(marker.get("per_channel", False))
    dense = dict(tensors)
    ternary = {}
    for name in marker.get("ternary_layers", []):
        key = f"{name}.weight"
        if key not in dense:
            raise MissingFileError(f"tensor '{key}' of a ternary layer is missing", directory / WEIGHTS_FILE)
        weight = dense.pop(key)
        check_finite(weight, files.get(key), key)
        ternary[name] = recover_ternary(weight, per_channel, files.get(key), key)
    for key, tensor in dense.items():
        check_finite(tensor, files.get(key), key)
    return Checkpoint(
        config=plain,
        tensors=dense,
        ternary=ternary,
        latent_layers=[],
        per_channel=per_channel,
        layout="bittern-bf16",
        source=directory,
        files=files,
    )
