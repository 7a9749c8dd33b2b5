"""What a training run produced: its exported variants and their held-out perplexity."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class VariantResult:
    """One exported variant, reloaded from disk and evaluated on the held-out text."""

    variant: str
    path: str
    size_bytes: int
    bits_per_linear_weight: float
    perplexity: float


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    mode: str
    steps: int
    train_tokens: int
    held_out_tokens: int
    unigram_perplexity: float
    final_loss: float | None
    variants: list[VariantResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
