"""Autotuning of bittern's Triton kernels, with each shape's choice kept on disk between processes.

Triton times every candidate tile of a kernel the first time it meets a shape (its autotuning key): seconds per
shape, which every new process used to pay again (most of the first graphed prefill of a 2B4T-shaped model was
tuning). :func:`autotune` asks Triton to also write each choice, with the candidates' timings, to its cache
directory (``TRITON_CACHE_DIR``, by default ``~/.triton/cache``), keyed by the Triton version, the GPU, the
kernel's source, the candidate list and the shape; a later process reads it instead of timing again.
Delete that directory (or set ``BITTERN_AUTOTUNE_CACHE=0``) to tune afresh. Under Triton's interpreter nothing is
tuned or written. ``BITTERN_AUTOTUNE=0`` (read by each kernel module) keeps one candidate, so nothing is timed.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

import triton

CACHE_ENV = "BITTERN_AUTOTUNE_CACHE"
"""Set to ``0`` to keep autotuning choices in memory only (per process)."""


def disk_cache_supported() -> bool:
    """Whether this Triton's ``autotune`` can keep its results on disk (``cache_results``, Triton 3.3 and later)."""
    return "cache_results" in inspect.signature(triton.autotune).parameters


def autotune(configs: Sequence[triton.Config], key: list[str], **options: Any) -> Callable:
    """``triton.autotune(configs, key, **options)``, its choices cached on disk where this Triton supports it and
    ``BITTERN_AUTOTUNE_CACHE`` is not ``0``."""
    if os.environ.get(CACHE_ENV, "1") != "0" and disk_cache_supported():
        options.setdefault("cache_results", True)
    return triton.autotune(configs=list(configs), key=key, **options)
