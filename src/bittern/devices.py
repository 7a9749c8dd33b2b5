"""Device and dtype arguments as users give them (names or torch objects, or None for a default), checked once."""

from __future__ import annotations

import torch

from bittern.errors import ConfigError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
"""The dtype names the command line and the Python API accept."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch device; None: ``cuda`` when available, else ``cpu``.

    Raises:
        ConfigError: not a device name, or ``cuda`` without CUDA.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a torch device ({exc})") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(resolved)!r} was asked for but CUDA is not available")
    return resolved


def resolve_dtype(dtype: torch.dtype | str | None, default: torch.dtype) -> torch.dtype:
    """``dtype`` (a torch dtype or one of :data:`DTYPES`' names); None: ``default``.

    Raises:
        ConfigError: an unknown name.
    """
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
