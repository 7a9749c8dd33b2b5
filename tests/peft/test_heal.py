"""Healing a merged model: a short quantization-aware run that wins back what rounding lost."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, token_batch

import bittern
from bittern.errors import ConfigError
from bittern.nn import BitLinear, TernaryLinear
from bittern.peft import apply_lora, heal, merge_lora


def test_heal_lowers_the_merged_loss_and_returns_packed_layers() -> None:
    model = tiny_model("llama")
    bittern.to_ternary(model)
    peft_model = apply_lora(model, rank=4)
    ids = token_batch(length=32)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(15):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    merged = merge_lora(peft_model, layers="bitlinear")
    embeddings = merged.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        merged_loss = float(bittern.to_ternary(merged)(input_ids=ids, labels=ids).loss)
    result = heal(merged, [{"input_ids": ids}], steps=8, lr=1e-3, progress=False)
    assert result.model is merged
    assert len(result.losses) == 8
    assert not any(isinstance(m, BitLinear) for m in merged.modules())
    assert sum(isinstance(m, TernaryLinear) for m in merged.modules()) == 14
    assert torch.equal(merged.get_input_embeddings().weight, embeddings)  # only the ternary layers trained
    with torch.no_grad():
        healed_loss = float(merged(input_ids=ids, labels=ids).loss)
    assert healed_loss < merged_loss, (healed_loss, merged_loss)
    assert abs(result.losses[0] - merged_loss) < 1e-4  # the first step starts from the merged model


def test_heal_refuses_bad_input() -> None:
    with pytest.raises(ConfigError, match="at least 1 step"):
        heal(tiny_model("llama"), [token_batch()], steps=0)
    with pytest.raises(ConfigError, match="no ternary layers"):
        heal(tiny_model("llama"), [token_batch()], steps=1)
