"""The run's human-readable outputs: ``curves.png`` (loss and learning rate) and ``report.md``."""

from __future__ import annotations

import datetime
import json
import math
import platform
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bittern.train.callbacks import read_metrics

if TYPE_CHECKING:
    from bittern.train.config import TrainConfig
    from bittern.train.results import TrainResult


def plot_curves(metrics_path: Path, destination: Path) -> bool:
    """Training and held-out loss, and the learning rate (and λ when it warms up), against the step.

    Returns False (and writes nothing) when there is nothing to plot or matplotlib is missing.
    """
    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r]
    if not train:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    held = [r for r in records if "eval_loss" in r]
    figure, (loss_axis, lr_axis) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(2, 1))
    loss_axis.plot([r["step"] for r in train], [r["loss"] for r in train], label="training loss")
    if held:
        loss_axis.plot([r["step"] for r in held], [r["eval_loss"] for r in held], "o-", label="held-out loss")
    loss_axis.set_ylabel("cross-entropy (nats/token)")
    loss_axis.legend()
    loss_axis.grid(alpha=0.3)
    lr_axis.plot([r["step"] for r in train], [r.get("learning_rate", 0.0) for r in train], label="learning rate")
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel("optimizer step")
    if any(r.get("lambda", 1.0) < 1.0 for r in train):
        lam_axis = lr_axis.twinx()
        lam_axis.plot([r["step"] for r in train], [r.get("lambda", 1.0) for r in train], "g--", label="λ")
        lam_axis.set_ylabel("λ (quantization strength)")
    lr_axis.grid(alpha=0.3)
    figure.tight_layout()
    tmp = destination.with_suffix(".tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(destination)
    return True


def _shown(path: Path, root: Path) -> Path:
    """``path`` relative to the run directory when it lies inside it (a LoRA run's base lies elsewhere)."""
    return path.relative_to(root) if path.is_relative_to(root) else path


def write_report(result: TrainResult, config: TrainConfig, destination: Path) -> None:
    """``report.md``: what was trained, on what, and the held-out perplexity of every exported variant."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86'})"
    lines = [
        f"# bittern training run: {destination.parent.name}",
        "",
        f"- date: {datetime.date.today().isoformat()}; device: {device}; torch {torch.__version__}",
        *[f"- {note}" for note in result.notes],
        f"- steps: {result.steps}; training tokens available: {result.train_tokens:,}; "
        f"held-out tokens: {result.held_out_tokens:,}",
        f"- mean training objective over the run (cross-entropy, plus the KL term when distilling): "
        f"{result.final_loss:.4f}"
        if result.final_loss
        else "",
        "",
        "## Held-out perplexity (window = stride = sequence length)",
        "",
        "| model | size | bits per linear weight | perplexity |",
        "|---|---:|---:|---:|",
    ]
    for variant in result.variants:
        bits = "—" if math.isnan(variant.bits_per_linear_weight) else f"{variant.bits_per_linear_weight:.2f}"
        lines.append(
            f"| {variant.variant} (`{_shown(Path(variant.path), destination.parent)}`) | "
            f"{variant.size_bytes / 2**20:.2f} MiB | {bits} | {variant.perplexity:.2f} |"
        )
    lines.append(f"| unigram baseline (add-one, from the training tokens) | | | {result.unigram_perplexity:.2f} |")
    lines += ["", "## Settings", "", "```json"]
    lines += [json.dumps(config.as_dict(), indent=2), "```", "", "Curves: `curves.png`; every log: `metrics.jsonl`."]
    tmp = destination.with_suffix(".tmp")
    tmp.write_text("\n".join(line for line in lines) + "\n", encoding="utf-8")
    tmp.replace(destination)
