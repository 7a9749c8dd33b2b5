"""Which process of a distributed run this is (torchrun / accelerate set ``RANK``)."""

from __future__ import annotations

import os


def is_main_process() -> bool:
    """Whether this is rank 0 (or the only process): the one that writes the run's shared files."""
    return int(os.environ.get("RANK", "0")) == 0
