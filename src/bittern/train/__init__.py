"""Training: from scratch, converting a full-precision model, continuing or fine-tuning (``bittern train``).

Built on Hugging Face ``Trainer`` (TRL's ``SFTTrainer`` for chat data); see :mod:`bittern.train.run`. The names
below are imported on first use, so the light modules (presets, schedules) load without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "PRESETS": "bittern.train.presets",
    "TrainConfig": "bittern.train.config",
    "TrainResult": "bittern.train.run",
    "train": "bittern.train.run",
}

__all__ = ["PRESETS", "TrainConfig", "TrainResult", "train"]

if TYPE_CHECKING:
    from bittern.train.config import TrainConfig
    from bittern.train.presets import PRESETS
    from bittern.train.run import TrainResult, train


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` (or the submodule ``name``) on first access, and keep it."""
    module = _EXPORTS.get(name)
    if module is None:  # a submodule (``bittern.train.x`` after a bare import), as an eager __init__ would have loaded
        try:
            value = importlib.import_module(f"bittern.train.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"bittern.train.{name}":
                raise
            raise AttributeError(f"module 'bittern.train' has no attribute {name!r}") from None
    else:
        value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
