"""``bittern inspect``: what a checkpoint directory holds, validated.

Reading the checkpoint through :func:`bittern.formats.read_checkpoint` validates it (packed codes, scales,
NaN/Inf, shapes against the safetensors headers); byte counts come from the safetensors headers, so the
figures describe the files as stored.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors import safe_open

from bittern import formats
from bittern.errors import MissingFileError
from bittern.formats.common import weight_files

_DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
}


@dataclass
class Report:
    """The facts ``bittern inspect`` prints (sizes in bytes, counts in parameters)."""

    path: str
    format: str
    layout: str
    architecture: str
    model_type: str
    parameters: int
    ternary_layers: int
    ternary_weights: int
    dense_parameters: int
    bits_per_linear_weight: float
    file_bytes: int
    scale_convention: str | None = None
    tokenizer_files: list[str] = field(default_factory=list)
    tokenizer: str = "none"
    chat_template: bool = False
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """Human-readable ``key: value`` lines."""
        size = self.file_bytes
        return [
            f"path:                  {self.path}",
            f"format:                {self.format} ({self.layout})",
            f"architecture:          {self.architecture} (model_type {self.model_type})",
            f"parameters:            {self.parameters:,}",
            f"  ternary layers:      {self.ternary_layers} ({self.ternary_weights:,} weights)",
            f"  dense parameters:    {self.dense_parameters:,}",
            f"bits per linear weight: {self.bits_per_linear_weight:.4g}"
            + (f" (scale convention: {self.scale_convention})" if self.scale_convention else ""),
            f"file size:             {_human(size)} ({size:,} bytes)",
            f"tokenizer:             {self.tokenizer}",
            f"chat template:         {'yes' if self.chat_template else 'none (bittern chat needs --chat-template)'}",
            f"validation:            ok ({self.ternary_layers} ternary layers: codes in {{-1, 0, 1}}, "
            "scales > 0 and finite, no NaN/Inf, shapes consistent)",
            *(f"note:                  {note}" for note in self.notes),
        ]


def _human(size: int) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    power = min(int(math.log(max(size, 1), 1024)), len(units) - 1)
    return f"{size / 1024**power:.2f} {units[power]}"


def _stored_sizes(directory: Path) -> dict[str, tuple[int, int]]:
    """``{key: (number of elements, bits per element)}`` from the safetensors headers."""
    sizes = {}
    for path in weight_files(directory):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                piece = handle.get_slice(key)
                sizes[key] = (math.prod(piece.get_shape()), _DTYPE_BITS.get(piece.get_dtype(), 0))
    return sizes


def _refuse_adapter(directory: Path) -> None:
    """Raise :class:`MissingFileError` for a LoRA adapter directory (no config.json, an adapter_config.json), saying
    what inspect can read instead (:func:`bittern.formats.common.read_config`'s message suggests ``--adapter``,
    which the verbs that run a model have and inspect has not)."""
    common = formats.common
    if (directory / common.CONFIG_FILE).is_file() or not (directory / common.ADAPTER_CONFIG_FILE).is_file():
        return
    raise MissingFileError(
        f"is a LoRA adapter ({common.ADAPTER_CONFIG_FILE}), not a model: inspect its base model instead"
        f"{common._adapter_base_hint(directory)}; the adapter's settings are in "
        f"{directory / common.ADAPTER_CONFIG_FILE}",
        directory,
    )


def inspect_checkpoint(path: str | Path) -> Report:
    """Validate and describe a checkpoint directory (any layout :func:`read_checkpoint` accepts) or GGUF file."""
    directory = Path(path)
    if formats.gguf.is_gguf_file(directory):
        return _inspect_gguf(directory)
    _refuse_adapter(directory)
    from bittern.checkpoint import latent_layer_names

    checkpoint = formats.read_checkpoint(directory)  # raises on invalid codes, scales, NaN/Inf, ...
    raw_config = formats.common.read_config(directory)
    fmt = checkpoint.format
    sizes = _stored_sizes(directory)

    latent_names = latent_layer_names(checkpoint)
    ternary_names = list(checkpoint.ternary) + latent_names
    ternary_weights = 0
    stored_bits = 0
    for name in ternary_names:
        numel, bits = sizes.get(f"{name}.weight", (0, 0))
        scale_numel, scale_bits = sizes.get(f"{name}.weight_scale", (0, 0))
        if name in checkpoint.ternary:
            ternary_weights += checkpoint.ternary[name].numel()
        else:
            ternary_weights += numel
        stored_bits += numel * bits + scale_numel * scale_bits
    if ternary_weights:
        bits_per_weight = stored_bits / ternary_weights
    else:  # a plain checkpoint: report its linear weights' storage
        linear = [k for k, (n, _) in sizes.items() if k.endswith(".weight") and "embed" not in k and n > 0]
        total = sum(sizes[k][0] for k in linear)
        bits_per_weight = sum(sizes[k][0] * sizes[k][1] for k in linear) / total if total else 0.0
    dense = sum(t.numel() for t in checkpoint.tensors.values())
    files = sorted(p.name for p in directory.iterdir() if p.name in formats.common.TOKENIZER_FILES)
    latent = sum(checkpoint.tensors[f"{n}.weight"].numel() for n in latent_names)
    config = checkpoint.config
    convention = formats.packed.scale_convention(raw_config) if fmt == "packed" else None
    return Report(
        path=str(directory),
        format=fmt,
        layout=checkpoint.layout,
        architecture=", ".join(config.get("architectures") or ["unknown"]),
        model_type=str(config.get("model_type", "unknown")),
        parameters=dense + sum(w.numel() for w in checkpoint.ternary.values()),
        ternary_layers=len(ternary_names),
        ternary_weights=ternary_weights,
        dense_parameters=dense - latent,
        bits_per_linear_weight=bits_per_weight,
        file_bytes=sum(p.stat().st_size for p in directory.iterdir() if p.is_file()),
        scale_convention=convention,
        tokenizer_files=files,
        tokenizer=f"files {', '.join(files)}" if files else "none",
        chat_template=_directory_has_chat_template(directory),
        notes=list(checkpoint.notes),
    )


def _directory_has_chat_template(directory: Path) -> bool:
    """Whether the tokenizer files of ``directory`` define a chat template (a file, or in tokenizer_config.json)."""
    if (directory / "chat_template.jinja").is_file() or (directory / "chat_template.json").is_file():
        return True
    config = directory / "tokenizer_config.json"
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template")) if config.is_file() else False
    except (OSError, ValueError, AttributeError):
        return False


def _inspect_gguf(path: Path) -> Report:
    """Validate and describe a GGUF file (bits per ternary weight from the stored tensor bytes)."""
    import gguf

    checkpoint = formats.read_gguf(path)  # raises on invalid blocks, NaN/Inf, unknown tensors
    reader = gguf.GGUFReader(str(path))
    stored = {t.name: int(t.n_bytes) for t in reader.tensors}
    fields = {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.")}
    tokens = fields.get("tokenizer.ggml.tokens") or []
    model = fields.get("tokenizer.ggml.model")
    architecture = formats.gguf.ARCHITECTURES[checkpoint.config["model_type"]]
    names = [formats.gguf.gguf_tensor_name(f"{n}.weight", architecture) for n in checkpoint.ternary]
    ternary_bytes = sum(stored[name] for name in names)
    ternary_weights = sum(w.numel() for w in checkpoint.ternary.values())
    dense = sum(t.numel() for t in checkpoint.tensors.values())
    config = checkpoint.config
    return Report(
        path=str(path),
        format="gguf",
        layout=checkpoint.layout,
        architecture=", ".join(config.get("architectures") or ["unknown"]),
        model_type=str(config.get("model_type", "unknown")),
        parameters=dense + ternary_weights,
        ternary_layers=len(checkpoint.ternary),
        ternary_weights=ternary_weights,
        dense_parameters=dense,
        bits_per_linear_weight=8 * ternary_bytes / ternary_weights if ternary_weights else 0.0,
        file_bytes=path.stat().st_size,
        tokenizer=f"in the GGUF file ({model}, {len(tokens):,} tokens)" if model else "none",
        chat_template=bool(fields.get("tokenizer.chat_template")),
    )
