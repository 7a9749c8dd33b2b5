"""Training: from scratch, converting a full-precision model, continuing or fine-tuning (``bittern train``).

Built on Hugging Face ``Trainer`` (TRL's ``SFTTrainer`` for chat data); see :mod:`bittern.train.run`. The names
below are imported on first use, so the light modules (presets, schedules) load without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bittern.lazy import lazy_attributes

_EXPORTS = {
    "PRESETS": "bittern.train.presets",
    "TrainConfig": "bittern.train.config",
    "TrainResult": "bittern.train.results",
    "train": "bittern.train.run",
}

__all__ = ["PRESETS", "TrainConfig", "TrainResult", "train"]

if TYPE_CHECKING:
    from bittern.train.config import TrainConfig
    from bittern.train.presets import PRESETS
    from bittern.train.results import TrainResult
    from bittern.train.run import train


__getattr__, __dir__ = lazy_attributes("bittern.train", _EXPORTS, globals())
