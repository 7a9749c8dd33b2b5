"""What every checkpoint layout shares: the in-memory :class:`Checkpoint`, safetensors reading with
validation, atomic output directories, and tokenizer files.

Nothing here knows about models or training; it moves tensors between memory and files. No pickle is
ever loaded: only ``config.json`` (JSON) and ``*.safetensors`` files are read.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from bittern import packing
from bittern.errors import (
    CheckpointError,
    ConfigError,
    CorruptCheckpointError,
    MissingFileError,
    NonFiniteWeightError,
    OutputExistsError,
    UnknownFormatError,
)
from bittern.kernels import cpu

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
"""A PEFT adapter directory's config (an adapter is not a model: it runs on a base, ``--adapter``)."""
MARKER_KEY = "bittern"
"""Key of bittern's own block in ``config.json``: ``{"format": ..., "ternary_layers": [...], ...}``."""
MARKER_VERSION = 1

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


class TernaryWeight:
    """A ternary weight: ``W = codes / scale`` (:mod:`bittern.quant`'s contract), held in the form it was made
    from — int8 codes, or the packed 2-bit bytes of the Hugging Face layout (:mod:`bittern.packing`) — so that a
    packed checkpoint goes from file to layer without an int8 copy. The other form is computed when asked for and
    not kept.

    Attributes:
        scale: float32 ``[1]`` (per tensor) or ``[N]`` (per channel); always the weight scale ``s_w = 1 / mean|W|``
            (the ``bitlinear`` ``weight_scale``), whatever layout it was read from.
    """

    def __init__(
        self,
        codes: torch.Tensor | None,
        scale: torch.Tensor,
        *,
        packed: torch.Tensor | None = None,
        out_features: int | None = None,
    ) -> None:
        """``codes``: int8 ``[N, K]`` in {-1, 0, 1}; or ``codes=None`` with ``packed`` uint8 ``[ceil(N/4), K]`` and
        ``out_features = N``."""
        if (codes is None) == (packed is None):
            raise ValueError("a TernaryWeight takes either int8 codes or packed bytes")
        if packed is not None and out_features is None:
            raise ValueError("packed bytes need out_features")
        self._codes = codes
        self._packed = packed
        self.scale = scale
        rows, columns = (codes.shape[0], codes.shape[1]) if codes is not None else (out_features, packed.shape[1])
        self.shape = (int(rows), int(columns))

    @property
    def codes(self) -> torch.Tensor:
        """int8 ``[N, K]`` in {-1, 0, 1} (unpacked on each call when held packed)."""
        if self._codes is not None:
            return self._codes
        return packing.unpack_ternary_rows(self._packed, self.shape[0])

    @property
    def packed(self) -> torch.Tensor:
        """uint8 ``[ceil(N/4), K]`` in the Hugging Face layout (packed on each call when held as codes)."""
        if self._packed is not None:
            return self._packed
        return packing.pack_ternary_rows(self._codes)

    @property
    def per_channel(self) -> bool:
        return self.scale.numel() != 1

    def numel(self) -> int:
        """``N * K``: the number of ternary weights."""
        return self.shape[0] * self.shape[1]


@dataclass
class Checkpoint:
    """A model's tensors and config, independent of the file layout they came from or go to.

    Attributes:
        config: the Hugging Face ``config.json`` content, without ``quantization_config`` and bittern's
            marker (layouts add their own when writing).
        tensors: every dense tensor by state-dict key (embeddings, norms, biases, unconverted linears, and the
            latent weights of ``latent_layers``).
        ternary: the ternary layers by module name (their ``.weight`` is not in ``tensors``).
        latent_layers: module names whose dense ``.weight`` is the latent weight of a ternary layer
            (prequantized checkpoints); None means "the default conversion policy decides".
        dense_linear_layers: names of the linear layers that stay full precision (e.g. ``lm_head``),
            when known; the packed layout lists them in ``modules_to_not_convert``.
        per_channel: whether ternary layers use one scale per output row.
        layout: where it came from: ``bittern-packed``, ``bittern-bf16``, ``bittern-prequantized``,
            ``falcon-e``, ``bitnet-2b4t``, ``hf-full``, or ``model`` (built from a live model).
        source: the directory it was read from (tokenizer files are copied from there), if any.
        files: for each tensor key, the file it was read from (for error messages).
        format: the family :func:`bittern.formats.detect_format` found (``packed``, ``bf16``, ``prequantized``,
            ``full``, ``gguf``), or ``model`` when built from a live model.
        notes: what the reader noticed and worked around (e.g. a stale bittern marker it ignored), one sentence
            each, for ``bittern inspect``.
    """

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    ternary: dict[str, TernaryWeight] = field(default_factory=dict)
    latent_layers: list[str] | None = field(default_factory=list)
    dense_linear_layers: list[str] | None = None
    per_channel: bool = False
    layout: str = "model"
    source: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    format: str = "model"
    notes: list[str] = field(default_factory=list)


def read_config(directory: str | Path) -> dict[str, Any]:
    """Parse ``directory/config.json``.

    Raises:
        MissingFileError: the directory or its config.json does not exist.
        CorruptCheckpointError: config.json is not a JSON object, or ``directory`` is a ``.gguf`` file that is not a
            GGUF file (GGUF files themselves are read by :func:`bittern.formats.gguf.read_gguf`).
    """
    directory = Path(directory)
    if directory.is_file() and directory.suffix.lower() == ".gguf":
        size = directory.stat().st_size
        raise CorruptCheckpointError(
            f"not a GGUF file: it does not start with the magic bytes 'GGUF' ({size:,} bytes)", directory
        )
    if not directory.is_dir():
        what = "is a file, not a checkpoint directory" if directory.is_file() else "checkpoint directory does not exist"
        raise MissingFileError(what, directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        if (directory / ADAPTER_CONFIG_FILE).is_file():
            raise MissingFileError(
                "is a LoRA adapter (adapter_config.json), not a model: generate, chat and eval run it on its base "
                f"model with --adapter {directory}{_adapter_base_hint(directory)}; to convert, export or serve it, "
                "use the LoRA run's variants/merged model (the adapter folded into the base)",
                directory,
            )
        raise MissingFileError("config.json is missing; a checkpoint directory needs one", path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"not valid JSON ({exc})", path) from exc
    if not isinstance(config, dict):
        raise CorruptCheckpointError("must hold a JSON object", path)
    return config


def _adapter_base_hint(directory: Path) -> str:
    """`` (base: PATH)`` from an adapter's ``base_model_name_or_path``, or nothing."""
    try:
        base = json.loads((directory / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return ""
    return f" (its base: {base})" if isinstance(base, str) and base else ""


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: ``model.safetensors`` or the shards its index names.

    Raises:
        MissingFileError: no safetensors weights, or a shard named in the index is missing.
        UnknownFormatError: only pickle weights (``*.bin``/``*.pt``), which bittern never loads.
    """
    directory = Path(directory)
    index = directory / WEIGHTS_INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CorruptCheckpointError(f"not a safetensors index ({exc})", index) from exc
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.is_file():
                raise MissingFileError("shard named in the index is missing", file)
        return files
    single = directory / WEIGHTS_FILE
    if single.is_file():
        return [single]
    others = sorted(directory.glob("*.safetensors"))
    if others:
        return others
    pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    if pickles:
        raise UnknownFormatError(
            f"only pickle weights found ({', '.join(pickles)}); bittern never loads pickle files. "
            "Re-save the model with safetensors (model.save_pretrained(dir, safe_serialization=True))",
            directory,
        )
    raise MissingFileError("no model.safetensors (or sharded *.safetensors) weights found", directory)


HUGE_PAGE_MIN_BYTES = 2 << 20
"""Tensors at least this large are read into memory advised for transparent huge pages."""

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def _read_into_memory(path: Path, keys: list[str]) -> dict[str, torch.Tensor] | None:
    """The tensors ``keys`` of the safetensors file ``path`` read with plain file reads into tensors of their own
    (None when the header holds something this reader does not take; the caller then uses safetensors' own). Unlike
    ``safe_open(...).get_tensor``, whose source pages stay mapped (and resident) until the file is closed, the memory
    held is the tensors' alone: a checkpoint's peak RSS while loading is its size, not twice it."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        start = 8 + length
        out = {}
        for key in keys:
            entry = header.get(key)
            dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
            if dtype is None:
                return None
            begin, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=dtype)
            if tensor.numel() * tensor.element_size() != end - begin:
                return None
            if end - begin >= HUGE_PAGE_MIN_BYTES:  # large weights on 2 MiB pages (chosen when first written)
                cpu.advise_huge_pages(tensor)
            if end > begin:
                handle.seek(start + begin)
                if handle.readinto(tensor.view(-1).view(torch.uint8).numpy()) != end - begin:
                    return None
            out[key] = tensor
    return out


def read_tensors(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """Load every tensor of a checkpoint's safetensors files (on CPU).

    Returns:
        ``(tensors, files)``: tensors by key, and the file each came from.

    Raises:
        CorruptCheckpointError: a file is truncated or its header is corrupt (names the file), or a key
            appears in two files.
    """
    tensors: dict[str, torch.Tensor] = {}
    files: dict[str, Path] = {}
    for path in weight_files(directory):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:  # checks the header and the size
                keys = list(handle.keys())
                for key in keys:
                    if key in tensors:
                        raise CorruptCheckpointError(f"tensor also stored in '{files[key]}'", path, key)
                    files[key] = path
                read = _read_into_memory(path, keys)
                if read is None:
                    read = {}
                    for key in keys:
                        try:
                            read[key] = handle.get_tensor(key)
                        except (SafetensorError, RuntimeError, ValueError) as exc:
                            raise CorruptCheckpointError(f"cannot read tensor ({exc})", path, key) from exc
                tensors.update(read)
        except CheckpointError:
            raise
        except (SafetensorError, OSError, RuntimeError, ValueError, KeyError, struct.error) as exc:
            raise CorruptCheckpointError(f"not a readable safetensors file ({exc})", path) from exc
    return tensors, files


def check_finite(tensor: torch.Tensor, path: str | Path | None, key: str) -> None:
    """Raise :class:`NonFiniteWeightError` naming ``path`` and ``key`` if ``tensor`` holds NaN or Inf."""
    if not tensor.is_floating_point():
        return
    flat = tensor.reshape(-1)
    step = 1 << 24  # in pieces: a mask of the whole tensor would take a byte per value
    if all(bool(torch.isfinite(flat[i : i + step]).all()) for i in range(0, flat.numel(), step)):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    raise NonFiniteWeightError(f"{bad} of {tensor.numel()} values are NaN or Inf", path, key)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (made contiguous, on CPU) to one safetensors file with ``format: pt`` metadata.

    safetensors writes the metadata keys in a per-process random order (a Rust ``HashMap``), so a file whose
    metadata has more than one key differs from byte to byte between two writes of the same tensors.
    """
    ready = {key: t.detach().to("cpu").contiguous() for key, t in tensors.items()}
    save_file(ready, str(path), metadata={"format": "pt", **(metadata or {})})


def write_config(directory: Path, config: dict[str, Any]) -> None:
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def copy_tokenizer_files(source: Path | None, directory: Path) -> list[str]:
    """Copy the tokenizer (and generation config) files found in ``source`` into ``directory``."""
    if source is None:
        return []
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(source) / name
        if src.is_file():
            shutil.copy2(src, directory / name)
            copied.append(name)
    return copied


def current_umask() -> int:
    """The process's umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask_permissions(path: str | Path) -> None:
    """Give ``path`` (and, for a directory, everything below it) the permissions a plain ``open``/``mkdir`` would:
    ``0o666 & ~umask`` for files, ``0o777 & ~umask`` for directories.

    ``tempfile.mkdtemp`` makes private (0700) directories and safetensors writes private (0600) files; outputs
    renamed into place from there would otherwise stay readable by their owner only.
    """
    mask = current_umask()
    path = Path(path)
    if path.is_dir():
        for root, directories, files in os.walk(path):
            for name in directories:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
        os.chmod(path, 0o777 & ~mask)
    elif path.exists():
        os.chmod(path, 0o666 & ~mask)


def refuse_replacing(destination: str | Path, source: str | Path | None, same_allowed: bool = False) -> None:
    """Raise :class:`ConfigError` when writing ``destination`` would replace ``source`` (a directory read to make the
    output): a directory holding it, which an overwrite replaces whole with everything beside the source, or (unless
    ``same_allowed``: a model already in memory saved in place) the same path."""
    if source is None:
        return
    target, origin = Path(destination).resolve(), Path(source).resolve()
    if target == origin and not same_allowed:
        raise ConfigError("the destination must differ from the source")
    if target in origin.parents:
        raise ConfigError(f"the destination '{destination}' holds the source '{source}': writing it would replace the "
                          "source (and all beside it); choose a destination outside it")  # fmt: skip


@contextlib.contextmanager
def atomic_output_dir(destination: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``destination``; on success rename it into place.

    On any exception the temporary directory is removed and ``destination`` is left untouched. An existing
    ``destination`` is replaced only with ``overwrite=True`` (and only after the new content is complete). The
    directory and its files get the permissions the umask gives (:func:`apply_umask_permissions`).

    Raises:
        OutputExistsError: ``destination`` exists and ``overwrite`` is False (checked before any work).
    """
    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise OutputExistsError(
            f"output '{destination}' already exists; pass overwrite=True (--overwrite) to replace it"
        )
    if destination.exists() and not destination.is_dir():
        raise OutputExistsError(f"output '{destination}' exists and is not a directory")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    try:
        yield staging
        apply_umask_permissions(staging)
        if destination.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
            os.replace(destination, retired / destination.name)
            os.replace(staging, destination)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_checkpoint_dir(
    destination: str | Path,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    fmt: str,
    tokenizer_source: Path | None,
    overwrite: bool,
) -> Path:
    """Write ``model.safetensors``, ``config.json`` and the tokenizer files into ``destination``, atomically.

    ``fmt`` names the layout; callers record it in ``config.json``'s bittern marker (:func:`make_marker`). The same
    tensors and config give the same bytes.
    """
    with atomic_output_dir(destination, overwrite) as staging:
        # metadata: only format=pt (more keys would come out in a random order, see write_safetensors); the
        # layout is recorded in config.json's bittern marker
        write_safetensors(staging / WEIGHTS_FILE, tensors)
        write_config(staging, config)
        copy_tokenizer_files(tokenizer_source, staging)
    return Path(destination)


def split_marker(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]:
    """Split a config into ``(plain_config, quantization_config, bittern_marker)`` (copies)."""
    plain = dict(config)
    quantization = plain.pop("quantization_config", None)
    marker = plain.pop(MARKER_KEY, None)
    return plain, quantization, marker


def make_marker(fmt: str, **fields: Any) -> dict[str, Any]:
    """bittern's block for ``config.json``."""
    return {"format": fmt, "version": MARKER_VERSION, **fields}
