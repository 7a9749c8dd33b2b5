"""Checkpoint layouts: pure tensor ⇄ file functions, one module per layout.

:func:`read_checkpoint` detects the layout of a directory and returns a :class:`Checkpoint`; the
``write_*`` functions of each module write one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    "read_checkpoint",
    "read_gguf",
    "write_bf16",
    "write_packed",
    "write_prequantized",
]


def detect_format(config: dict[str, Any], directory: Path | None = None) -> str:
    """The layout a config describes: ``packed``, ``bf16``, ``prequantized`` or ``full``.

    Raises:
        UnknownFormatError: an unknown bittern marker format or quantization method.
    """
    where = directory / CONFIG_FILE if directory is not None else None
    marker = config.get(MARKER_KEY)
    if marker is not None:
        fmt = marker.get("format") if isinstance(marker, dict) else None
        if fmt not in VARIANTS:
            raise UnknownFormatError(f"unknown bittern format {fmt!r} (known: {', '.join(VARIANTS)})", where)
        return fmt
    quantization = config.get("quantization_config")
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        if method != "bitnet":
            raise UnknownFormatError(
                f"unknown quantization method {method!r}; bittern reads 'bitnet' checkpoints and plain ones", where
            )
        return "packed" if is_packed(config) else "full"
    return "full"


def read_checkpoint(directory: str | Path) -> Checkpoint:
    """Read any supported checkpoint directory into a :class:`Checkpoint` (tensors on CPU).

    Supported: bittern's packed / bf16 / prequantized variants, Falcon-E style packed (LlamaForCausalLM +
    ``bitlinear``), microsoft 2B4T style packed (``autobitlinear`` offline), online (QAT) bitnet checkpoints
    and plain full-precision Hugging Face checkpoints; a ``.gguf`` file (llama / bitnet, see
    :func:`bittern.formats.gguf.read_gguf`) is read too.
    """
    directory = Path(directory)
    if is_gguf_file(directory):
        return read_gguf(directory)
    config = read_config(directory)
    fmt = detect_format(config, directory)
    tensors, files = read_tensors(directory)
    reader = {"packed": read_packed, "bf16": read_bf16, "prequantized": read_prequantized, "full": read_full}[fmt]
    return reader(directory, config, tensors, files)
