"""Checkpoint layouts: pure tensor ⇄ file functions, one module per layout.

:func:`read_checkpoint` detects the layout of a directory and returns a :class:`Checkpoint`; the
``write_*`` functions of each module write one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bittern.errors import UnknownFormatError
from bittern.formats.bf16 import read_bf16, write_bf16
from bittern.formats.common import CONFIG_FILE, MARKER_KEY, Checkpoint, TernaryWeight, read_config, read_tensors
from bittern.formats.full import read_full
from bittern.formats.gguf import is_gguf_file, read_gguf
from bittern.formats.packed import SCALE_CONVENTIONS, is_packed, read_packed, write_packed
from bittern.formats.prequantized import read_prequantized, write_prequantized

VARIANTS = ("packed", "bf16", "prequantized")

__all__ = [
    "SCALE_CONVENTIONS",
    "VARIANTS",
    "Checkpoint",
    "TernaryWeight",
    "detect_format",
    "marker_conflicts",
    "read_checkpoint",
    "read_gguf",
    "write_bf16",
    "write_packed",
    "write_prequantized",
]


def _holds_packed_weights(tensors: dict[str, torch.Tensor] | None) -> bool:
    """Whether some ``*.weight`` tensor is uint8 with a ``*.weight_scale`` beside it (the packed layout's tensors)."""
    return tensors is not None and any(
        key.endswith(".weight") and t.dtype == torch.uint8 and f"{key}_scale" in tensors for key, t in tensors.items()
    )


def detect_format(
    config: dict[str, Any], directory: Path | None = None, tensors: dict[str, torch.Tensor] | None = None
) -> str:
    """The layout a config (and, when given, its tensors) describes: ``packed``, ``bf16``, ``prequantized`` or
    ``full`` (plain, or latent BitNet weights: :func:`~bittern.formats.full.latent_layout`).

    What the checkpoint says about itself is trusted in this order: a ``quantization_config`` (what stock
    transformers obeys), then the tensors (uint8 weights with a ``weight_scale`` are packed whatever the config
    says), then bittern's marker. :func:`marker_conflicts` names a marker these overrule.

    Raises:
        UnknownFormatError: an unknown bittern marker format or quantization method.
    """
    where = directory / CONFIG_FILE if directory is not None else None
    marker_format = _marker_format(config, where)
    quantization = config.get("quantization_config")
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        if method != "bitnet":
            raise UnknownFormatError(
                f"unknown quantization method {method!r}; bittern reads 'bitnet' checkpoints and plain ones", where
            )
        return "packed" if is_packed(config) else "full"
    if _holds_packed_weights(tensors):
        return "packed"
    return marker_format or "full"


def _marker_format(config: dict[str, Any], where: Path | None) -> str | None:
    """The format bittern's marker names (None without a marker).

    Raises:
        UnknownFormatError: a marker that names no known format (malformed, or from a newer bittern).
    """
    marker = config.get(MARKER_KEY)
    if marker is None:
        return None
    fmt = marker.get("format") if isinstance(marker, dict) else None
    if fmt not in VARIANTS:
        raise UnknownFormatError(f"unknown bittern format {fmt!r} (known: {', '.join(VARIANTS)})", where)
    return fmt


def marker_conflicts(config: dict[str, Any], fmt: str) -> list[str]:
    """Why bittern's marker in ``config`` does not describe the checkpoint, which :func:`detect_format` found to be
    ``fmt`` (e.g. another tool re-saved a bittern directory and kept the marker): one sentence each, or none."""
    marker = config.get(MARKER_KEY)
    if not isinstance(marker, dict) or marker.get("format") == fmt:
        return []
    said = marker.get("format")
    if config.get("quantization_config") is not None:
        why = (
            "its quantization_config describes a packed bitnet checkpoint"
            if fmt == "packed"
            else ("its quantization_config describes latent (online) bitnet weights")
        )
    else:
        why = "its tensors hold packed uint8 weights with a weight_scale"
    return [f"bittern's marker in config.json says {said!r}, but {why}: read as {fmt}; the marker was ignored"]


def read_checkpoint(directory: str | Path) -> Checkpoint:
    """Read any supported checkpoint directory into a :class:`Checkpoint` (tensors on CPU).

    Supported: bittern's packed / bf16 / prequantized variants, Falcon-E style packed (LlamaForCausalLM +
    ``bitlinear``) and prequantized (``is_bitnet_config``, latent weights), microsoft 2B4T style packed
    (``autobitlinear`` offline), online (QAT) bitnet checkpoints and plain full-precision Hugging Face checkpoints;
    a ``.gguf`` file (llama / bitnet, see :func:`bittern.formats.gguf.read_gguf`) is read too. A bittern marker that
    the ``quantization_config`` or the tensors contradict is ignored and named in ``Checkpoint.notes``.
    """
    directory = Path(directory)
    if is_gguf_file(directory):
        return read_gguf(directory)
    config = read_config(directory)
    tensors, files = read_tensors(directory)
    fmt = detect_format(config, directory, tensors)
    notes = marker_conflicts(config, fmt)
    if notes:
        config = {key: value for key, value in config.items() if key != MARKER_KEY}
    reader = {"packed": read_packed, "bf16": read_bf16, "prequantized": read_prequantized, "full": read_full}[fmt]
    checkpoint = reader(directory, config, tensors, files)
    checkpoint.format = fmt
    checkpoint.notes.extend(notes)
    return checkpoint
