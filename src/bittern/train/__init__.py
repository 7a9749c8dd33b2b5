"""Training: from scratch, converting a full-precision model, continuing or fine-tuning (``bittern train``).

Built on Hugging Face ``Trainer`` (TRL's ``SFTTrainer`` for chat data); see :mod:`bittern.train.run`.
"""

from bittern.train.config import TrainConfig
from bittern.train.presets import PRESETS
from bittern.train.run import TrainResult, train

__all__ = ["PRESETS", "TrainConfig", "TrainResult", "train"]
