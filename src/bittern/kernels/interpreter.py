"""Triton's CPU interpreter (``TRITON_INTERPRET=1``, how CI runs the kernels): whether it is on, and the one
workaround its numerics need. Imports nothing from Triton."""

from __future__ import annotations

import os

import torch


def active() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the interpreter (read now)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


ON_IMPORT = active()
"""The interpreter setting when the kernels were defined: Triton reads it as it decorates them, so it holds for
the whole process."""


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel writes a ``dtype`` result in. Triton 3.9's interpreter truncates float32 → bfloat16 (a
    GPU rounds to nearest even): there a kernel writes float32 and torch rounds it, exactly as the GPU would."""
    return torch.float32 if ON_IMPORT and dtype == torch.bfloat16 else dtype
