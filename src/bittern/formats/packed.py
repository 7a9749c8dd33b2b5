"""The Hugging Face packed ``bitnet`` layout (docs/design.md §3), read and written.

Each ternary layer ``L`` is stored as ``L.weight`` (uint8 ``[N/4, K]``, 2-bit codes, see
:mod:`bittern.packing`) and ``L.weight_scale`` (``[1]``), and ``config.json`` carries a
``quantization_config`` with ``quant_method: bitnet``. Two scale conventions exist:

* ``divide`` (``linear_class: bitlinear``; Falcon-E, onebitllms; the default): ``weight_scale = s_w = 1 / mean|W|``,
  bittern's own scale, stored as it is; transformers divides the output by it;
* ``multiply`` (``linear_class: autobitlinear``, offline; microsoft/bitnet-b1.58-2B-4T): ``weight_scale = 1 / s_w``
  (``mean|W|`` up to its last bit, :func:`bittern.quant.multiplier_of_scale`: a multiplier read from such a file is
  written back unchanged) and transformers multiplies the output by it; reading takes ``s_w = 1 / weight_scale``.

Stock transformers loads what :func:`write_packed` writes with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bittern import packing, quant
from bittern.errors import ConfigError, CorruptCheckpointError, ShapeMismatchError, UnknownFormatError
from bittern.formats.common import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Checkpoint,
    PackedTernaryWeight,
    TernaryWeight,
    check_finite,
    make_marker,
    split_marker,
    write_checkpoint_dir,
)

FORMAT = "packed"
SCALE_CONVENTIONS = {"divide": "bitlinear", "multiply": "autobitlinear"}
"""bittern's name of a scale convention → transformers' ``linear_class``."""


def quantization_config(convention: str, modules_to_not_convert: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` block transformers' ``BitNetQuantConfig`` expects."""
    if convention not in SCALE_CONVENTIONS:
        raise ConfigError(f"scale convention must be one of {sorted(SCALE_CONVENTIONS)}, got {convention!r}")
    return {
        "quant_method": "bitnet",
        "linear_class": SCALE_CONVENTIONS[convention],
        "quantization_mode": "offline",
        "modules_to_not_convert": sorted(modules_to_not_convert),
        "use_rms_norm": False,
        "rms_norm_eps": 1e-6,
    }


def packed_tensors(
    ternary: dict[str, TernaryWeight], convention: str = "divide", allow_padded_rows: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The packed ``weight`` / ``weight_scale`` tensors of ternary layers.

    Returns:
        ``(tensors, padded)``: tensors by state-dict key, and ``{layer: N}`` for layers whose ``N % 4 != 0``.

    Raises:
        ConfigError: per-channel scales (not representable in this layout), or ``N % 4 != 0`` without
            ``allow_padded_rows``.
    """
    if convention not in SCALE_CONVENTIONS:
        raise ConfigError(f"scale convention must be one of {sorted(SCALE_CONVENTIONS)}, got {convention!r}")
    tensors: dict[str, torch.Tensor] = {}
    padded: dict[str, int] = {}
    for name, weight in ternary.items():
        n = weight.codes.shape[0]
        if weight.per_channel:
            raise ConfigError(
                f"layer '{name}' has per-channel scales, which the Hugging Face bitnet layout cannot hold "
                "(its weight_scale is one number per layer); export the bf16 or prequantized variant instead"
            )
        if n % packing.CODES_PER_BYTE:
            if not allow_padded_rows:
                raise ConfigError(
                    f"layer '{name}' has out_features={n}, not a multiple of 4: transformers' BitLinear keeps "
                    f"out_features // 4 = {n // 4} byte rows and cannot load it. Pass allow_padded_rows=True "
                    "(--allow-padded-rows) to store ceil(N/4) rows, which bittern loads and stock transformers "
                    "does not, or export the bf16 or prequantized variant"
                )
            padded[name] = n
        scale = weight.scale.to(torch.float32).reshape(1)
        tensors[f"{name}.weight"] = packing.pack_ternary_rows(weight.codes)
        tensors[f"{name}.weight_scale"] = scale.clone() if convention == "divide" else quant.multiplier_of_scale(scale)
    return tensors, padded


def write_packed(
    checkpoint: Checkpoint,
    destination: str | Path,
    convention: str = "divide",
    allow_padded_rows: bool = False,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``checkpoint`` in the packed layout to ``destination`` (atomically).

    ``checkpoint.dense_linear_layers`` must list the linear layers that stay full precision; they become
    ``modules_to_not_convert``, so transformers converts exactly the layers that are ternary here.
    ``dtype`` casts the dense floating tensors (embeddings, norms, head, biases; None keeps theirs).
    Scales are always stored in float32.

    Note (transformers 5.x): with the ``multiply`` convention (``autobitlinear``), stock transformers keeps
    every ``*.weight`` tensor in its on-disk dtype whatever ``dtype`` is passed to ``from_pretrained``, so
    write the dtype your users will load (bfloat16, like the published 2B4T checkpoint).
    """
    if not checkpoint.ternary:
        raise ConfigError("the model has no ternary layers to pack; convert it first (bittern convert)")
    if checkpoint.dense_linear_layers is None:
        raise ConfigError("the packed layout needs the list of linear layers that stay full precision")
    tensors, padded = packed_tensors(checkpoint.ternary, convention, allow_padded_rows)
    overlap = set(tensors) & set(checkpoint.tensors)  # a ternary layer's weight must not also be dense
    if overlap:
        raise ConfigError(f"tensors stored both dense and packed: {sorted(overlap)[:5]}")
    dense = dict(checkpoint.tensors)
    if dtype is not None:
        dense = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in dense.items()}
    config = dict(checkpoint.config)
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = quantization_config(convention, checkpoint.dense_linear_layers)
    config["bittern"] = make_marker(
        FORMAT,
        scale_convention=convention,
        ternary_layers=sorted(checkpoint.ternary),
        padded_out_features=padded,
    )
    return write_checkpoint_dir(destination, {**dense, **tensors}, config, FORMAT, checkpoint.source, overwrite)


def scale_convention(config: dict[str, Any]) -> str:
    """``divide`` or ``multiply``: the scale convention a packed checkpoint's ``quantization_config`` declares
    (its ``linear_class``; transformers' default is ``bitlinear``)."""
    quantization = config.get("quantization_config") or {}
    return "multiply" if quantization.get("linear_class") == "autobitlinear" else "divide"


def is_packed(config: dict[str, Any]) -> bool:
    """Whether a config describes a packed ``bitnet`` checkpoint (offline quantization)."""
    quantization = config.get("quantization_config") or {}
    return (
        quantization.get("quant_method") == "bitnet" and quantization.get("quantization_mode", "offline") == "offline"
    )


def read_packed(
    directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], files: dict[str, Path]
) -> Checkpoint:
    """Read a packed checkpoint (bittern's own, Falcon-E style or 2B4T style) from already loaded tensors.

    Raises:
        UnknownFormatError: a ``linear_class`` or option bittern does not support.
        CorruptCheckpointError: a missing ``weight_scale``, code 3 in the packed bytes, a zero scale.
        ShapeMismatchError: byte rows that do not fit the layer, a scale that is not one number.
        NonFiniteWeightError: NaN/Inf in a scale or dense tensor.
    """
    plain, quantization, marker = split_marker(config)
    config_path = directory / CONFIG_FILE
    quantization = quantization or {}
    linear_class = quantization.get("linear_class", "bitlinear")
    if linear_class not in SCALE_CONVENTIONS.values():
        raise UnknownFormatError(f"quantization_config.linear_class {linear_class!r} is not supported", config_path)
    if quantization.get("use_rms_norm"):
        raise UnknownFormatError(
            "quantization_config.use_rms_norm=true (an RMSNorm inside each BitLinear) is not supported", config_path
        )
    divide = linear_class == "bitlinear"
    padded = dict((marker or {}).get("padded_out_features") or {})

    dense = dict(tensors)
    ternary: dict[str, TernaryWeight] = {}
    for key in [k for k, t in tensors.items() if k.endswith(".weight") and t.dtype == torch.uint8]:
        name = key[: -len(".weight")]
        packed = dense.pop(key)
        path = files.get(key)
        scale_key = f"{name}.weight_scale"
        if scale_key not in dense:
            raise CorruptCheckpointError("packed weight has no weight_scale tensor beside it", path, key)
        stored_scale = dense.pop(scale_key)
        scale_path = files.get(scale_key)
        if stored_scale.numel() != 1:
            raise ShapeMismatchError(
                f"weight_scale must hold one number, found shape {tuple(stored_scale.shape)}", scale_path, scale_key
            )
        check_finite(stored_scale, scale_path, scale_key)
        stored = stored_scale.to(torch.float32).reshape(1)
        if not bool((stored > 0).all()):
            raise CorruptCheckpointError(f"weight_scale must be > 0, found {float(stored[0])}", scale_path, scale_key)
        if packed.dim() != 2:
            raise ShapeMismatchError(f"packed weight must be 2-D, found shape {tuple(packed.shape)}", path, key)
        out_features = int(padded.get(name, packed.shape[0] * packing.CODES_PER_BYTE))
        if packing.packed_rows(out_features) != packed.shape[0]:
            raise ShapeMismatchError(f"{packed.shape[0]} byte rows cannot hold out_features={out_features}", path, key)
        invalid = int(packing.count_invalid(packed, out_features))
        if invalid:
            raise CorruptCheckpointError(
                f"{invalid} packed 2-bit slots hold the value 3, which is no ternary code", path, key
            )
        scale = stored if divide else quant.reciprocal(stored)
        ternary[name] = PackedTernaryWeight(packed, out_features, scale)
    if not ternary:
        raise CorruptCheckpointError(
            "config.json declares a bitnet quantization but no tensor holds packed uint8 weights",
            directory / WEIGHTS_FILE,
        )
    for key, tensor in dense.items():
        check_finite(tensor, files.get(key), key)

    if marker is not None:
        layout = "bittern-packed"
    elif linear_class == "autobitlinear":
        layout = "bitnet-2b4t"
    else:
        layout = "falcon-e"
    not_converted = quantization.get("modules_to_not_convert")
    return Checkpoint(
        config=plain,
        tensors=dense,
        ternary=ternary,
        latent_layers=[],
        dense_linear_layers=list(not_converted) if isinstance(not_converted, list) else None,
        layout=layout,
        source=directory,
        files=files,
    )
