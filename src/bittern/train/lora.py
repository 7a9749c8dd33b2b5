"""The LoRA side of ``bittern train --lora-rank R``: the frozen packed base with adapters, and what the run writes.

Run directory additions (the three full variants are not written: the base is not trained)::

    adapter/                   the trained adapter in PEFT's format (adapter_config.json + safetensors)
    variants/merged            the adapter folded into the base and re-ternarized (--lora-merge-rounding): packed
    variants/merged-healed     the merged latents after --lora-heal-steps of quantization-aware training, packed

``report.md`` lists the held-out perplexity of the base, base + adapter, merged and merged + healed models, each
reloaded from disk.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from bittern.checkpoint import load_model, save_model
from bittern.errors import ConfigError
from bittern.formats.common import atomic_output_dir
from bittern.nn import TernaryLinear
from bittern.train.config import TrainConfig

ADAPTER_DIR = "adapter"
MERGED = "merged"
HEALED = "merged-healed"


def prepare_lora_model(config: TrainConfig) -> tuple[nn.Module, list[str]]:
    """The ternary ``config.model`` loaded as packed TernaryLinear layers (frozen) with trainable LoRA adapters.

    Returns the ``PeftModel`` and notes for the report.
    """
    from bittern.peft import apply_lora

    model = load_model(config.model, layers="ternary", dtype=torch.float32)
    targets = list(config.lora_targets) or None
    peft_model = apply_lora(model, config.lora_rank, config.lora_alpha, targets, config.lora_dropout)
    trainable, total = peft_model.get_nb_trainable_parameters()
    lora = peft_model.peft_config["default"]
    notes = [
        f"LoRA: rank {lora.r}, alpha {lora.lora_alpha:g}, dropout {lora.lora_dropout:g}, targets "
        f"{', '.join(sorted(lora.target_modules))}; {trainable:,} trainable parameters, packed base frozen "
        f"({total:,} parameters in all, counting each packed byte once)"
    ]
    return peft_model, notes


def _directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export_lora(
    peft_model: nn.Module,
    config: TrainConfig,
    run_dir: Path,
    held_out_ids: torch.Tensor,
    train_set,
    progress: bool = True,
) -> list:
    """Write the adapter, the merged and (with heal steps) the healed model; evaluate each as reloaded from disk.

    Returns :class:`bittern.train.results.VariantResult` rows: ``base``, ``adapter`` (base + adapter), ``merged`` and
    ``merged-healed``.
    """
    from bittern.eval.perplexity import sliding_window_nll
    from bittern.inspection import inspect_checkpoint
    from bittern.peft import heal, load_adapter, merge_lora
    from bittern.train.results import VariantResult

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer_dir = run_dir / "tokenizer"

    def perplexity(model: nn.Module) -> float:
        model.to(device).eval()
        return sliding_window_nll(
            model, held_out_ids, window=config.seq_len, stride=config.seq_len, progress=progress
        ).perplexity

    def packed_row(name: str, model: nn.Module) -> VariantResult:
        destination = run_dir / "variants" / name
        padded = any(m.out_features % 4 for m in model.modules() if isinstance(m, TernaryLinear))
        save_model(
            model,
            destination,
            "packed",
            dtype=torch.bfloat16,
            allow_padded_rows=padded,
            tokenizer_source=tokenizer_dir,
            overwrite=True,
        )
        report = inspect_checkpoint(destination)
        ppl = perplexity(load_model(destination))
        return VariantResult(name, str(destination), report.file_bytes, report.bits_per_linear_weight, ppl)

    base_report = inspect_checkpoint(config.model)
    rows = [
        VariantResult(
            "base",
            str(config.model),
            base_report.file_bytes,
            base_report.bits_per_linear_weight,
            perplexity(load_model(config.model)),
        )
    ]
    adapter_dir = run_dir / ADAPTER_DIR
    with atomic_output_dir(adapter_dir, overwrite=True) as staging:
        peft_model.save_pretrained(staging)
    reloaded = load_adapter(load_model(config.model, layers="ternary"), adapter_dir)
    rows.append(
        VariantResult("adapter", str(adapter_dir), _directory_bytes(adapter_dir), float("nan"), perplexity(reloaded))
    )
    reloaded = reloaded.to("cpu")
    if config.lora_merge_rounding == "stochastic":
        # the heal starts from the stochastically merged codes (their latents, Wt'·s / d): the better start
        latent = merge_lora(reloaded, rounding="stochastic", seed=config.seed)
        rows.append(packed_row(MERGED, copy.deepcopy(latent)))
    else:
        # the heal starts from the unrounded merged latents, whose ternarization is the merged model
        latent = merge_lora(reloaded, layers="bitlinear")
        rows.append(packed_row(MERGED, merge_lora_copy(latent)))
    if config.lora_heal_steps > 0:
        if train_set is None:
            raise ConfigError("--lora-heal-steps needs text training data")
        generator = torch.Generator().manual_seed(config.seed)
        batches = torch.utils.data.DataLoader(
            train_set, batch_size=config.batch_size, shuffle=True, generator=generator
        )
        healed = heal(latent.to(device), batches, config.lora_heal_steps, lr=config.lora_heal_lr, progress=progress)
        rows.append(packed_row(HEALED, healed.model.to("cpu")))
    if progress:
        for row in rows:
            print(f"{row.variant:<14} held-out perplexity {row.perplexity:.2f}")
    return rows


def merge_lora_copy(latent: nn.Module) -> nn.Module:
    """A packed copy of a merged model whose adapted layers hold unrounded latents (the original stays, to heal)."""
    from bittern.convert import to_ternary

    return to_ternary(copy.deepcopy(latent))
