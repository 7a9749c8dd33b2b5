"""The trained model's three exported variants (packed, bf16, prequantized), each reloaded from disk and evaluated."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bittern.checkpoint import load_model, save_model
from bittern.convert import ConversionPolicy, set_quantization_strength, ternary_layer_names, to_bitlinear
from bittern.nn import BitLinear
from bittern.train.config import TrainConfig
from bittern.train.ranks import is_main_process
from bittern.train.results import VariantResult

VARIANTS = ("packed", "bf16", "prequantized")


def model_for_export(trainer, model: nn.Module, config: TrainConfig) -> nn.Module | None:
    """The trained model in float32 on the CPU with λ = 1, on rank 0 (None on the other ranks).

    Training is over, so the model itself is moved rather than copied (a copy would double its memory on the
    GPU). Under FSDP every rank takes part in gathering the full state, which rank 0 loads into a fresh model.
    """
    if config.fsdp:
        from transformers import AutoModelForCausalLM

        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # a collective: every rank calls it
        if not is_main_process():
            return None
        exported = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
        to_bitlinear(exported, ConversionPolicy.for_layers(ternary_layer_names(model)))
        missing, unexpected = exported.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if exported.config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"gathered FSDP state does not fit the model: {missing=} {unexpected=}")
    elif is_main_process():
        exported = model.to(device="cpu", dtype=torch.float32)
    else:
        return None
    set_quantization_strength(exported, 1.0)
    # what save_pretrained records (Trainer's checkpoints set it on the live model; a model rebuilt from one lacks it)
    exported.config.architectures = [type(exported).__name__]
    return exported.eval()


def export_and_evaluate(
    model: nn.Module, run_dir: Path, held_out_ids: torch.Tensor, seq_len: int, progress: bool = True
) -> list[VariantResult]:
    """Write the three variants under ``run_dir/variants`` and evaluate each one as reloaded from disk."""
    from bittern.eval.perplexity import sliding_window_nll
    from bittern.inspection import inspect_checkpoint

    tokenizer_dir = run_dir / "tokenizer"
    padded = any(m.out_features % 4 for m in model.modules() if isinstance(m, BitLinear))
    results = []
    for variant in VARIANTS:
        destination = run_dir / "variants" / variant
        save_model(
            model,
            destination,
            variant,
            allow_padded_rows=padded,
            # embeddings, norms and head in bf16, as published packed models ship them; latent weights stay fp32
            dtype=torch.bfloat16 if variant != "prequantized" else None,
            tokenizer_source=tokenizer_dir,
            overwrite=True,
        )
        report = inspect_checkpoint(destination)
        reloaded = load_model(destination, device="cuda" if torch.cuda.is_available() else "cpu")
        ppl = sliding_window_nll(reloaded, held_out_ids, window=seq_len, stride=seq_len, progress=progress).perplexity
        results.append(VariantResult(variant, str(destination), report.file_bytes, report.bits_per_linear_weight, ppl))
        if progress:
            print(f"exported {variant:<13} {report.file_bytes / 2**20:8.2f} MiB  held-out perplexity {ppl:.2f}")
    return results
