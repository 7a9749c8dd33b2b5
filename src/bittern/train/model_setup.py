"""The model a run trains: built from a preset, converted from a full-precision checkpoint, continued from a ternary
one, or prepared for LoRA; with the teacher for distillation and the λ warmup it needs."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bittern.checkpoint import load_model
from bittern.convert import ConversionPolicy, select_layers, ternary_layer_names, to_bitlinear
from bittern.errors import ConfigError
from bittern.formats import detect_format
from bittern.formats.common import read_config
from bittern.formats.full import latent_layout
from bittern.train.config import TrainConfig
from bittern.train.presets import get_preset


@dataclass
class PreparedModel:
    model: nn.Module
    teacher: nn.Module | None
    tokenizer: object
    mode: str
    lambda_schedule: str
    lambda_warmup: int
    notes: list[str]


def source_is_full_precision(config: TrainConfig) -> bool:
    if config.gguf_file:
        return True
    source = Path(config.model)
    if not source.is_dir():
        raise ConfigError(f"--model {source}: not a checkpoint directory")
    raw = read_config(source)
    return detect_format(raw, source) == "full" and latent_layout(raw) is None


def prepare_model(config: TrainConfig, tokenizer) -> PreparedModel:
    notes: list[str] = []
    torch.manual_seed(config.seed)
    if config.preset is not None:
        from transformers import AutoModelForCausalLM

        preset = get_preset(config.preset)
        if preset.vocab_size is not None and len(tokenizer) > preset.vocab_size:
            raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens, more than preset {config.preset}'s vocab")
        model_config = preset.config(
            len(tokenizer),
            config.num_layers,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
        to_bitlinear(model)
        mode, schedule, teacher = "scratch", config.lambda_schedule or "none", None
    elif source_is_full_precision(config):
        model = load_full_precision(config)
        teacher = copy.deepcopy(model) if config.distill_weight > 0 else None
        schedule = config.lambda_schedule or "linear"
        to_bitlinear(model, ConversionPolicy(lam=0.0 if schedule != "none" else 1.0))
        mode = "convert"
        if teacher is not None:
            notes.append(f"distillation from the frozen original, KL weight {config.distill_weight}")
    elif config.lora_rank is not None:
        from bittern.train.lora import prepare_lora_model

        if source_is_full_precision(config):
            raise ConfigError(
                f"--lora-rank needs a ternary --model (packed, bf16 or prequantized); {config.model} is full "
                "precision: convert it first (bittern train --model ... without --lora-rank)"
            )
        model, lora_notes = prepare_lora_model(config)
        notes += lora_notes
        mode, schedule, teacher = "lora", "none", None
    else:
        model = load_model(config.model, layers="bitlinear")
        if not ternary_layer_names(model) and not select_layers(model):
            raise ConfigError(f"--model {config.model}: no linear layers to train as ternary")
        mode, schedule, teacher = "continue", config.lambda_schedule or "none", None
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and config.seq_len > max_positions:
        raise ConfigError(f"--seq-len {config.seq_len} exceeds the model's maximum of {max_positions} positions")
    warmup = config.lambda_warmup_steps if config.lambda_warmup_steps is not None else config.steps // 2
    if schedule != "none":
        notes.append(f"λ warmup: {schedule} over {warmup} steps")
    model.train()
    return PreparedModel(model, teacher, tokenizer, mode, schedule, warmup, notes)


def load_full_precision(config: TrainConfig) -> nn.Module:
    if config.gguf_file:
        from transformers import AutoModelForCausalLM

        path = Path(config.model) / config.gguf_file
        if not path.is_file():
            raise ConfigError(f"--gguf-file {path}: no such file")
        model = AutoModelForCausalLM.from_pretrained(config.model, gguf_file=config.gguf_file, dtype=torch.float32)
        # transformers dequantizes GGUF tensors on load but keeps a GGUF "quantizer" attached, which makes
        # Trainer refuse to train the (float32) weights; nothing quantized remains, so drop the markers.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        return model
    return load_model(config.model, layers="auto", dtype=torch.float32)
