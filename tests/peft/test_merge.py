"""Merging adapters into packed ternary layers: valid codes, the latent rule, PEFT's merge path, the loss."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, token_batch

import bittern
from bittern import quant
from bittern.errors import ConfigError
from bittern.nn import BitLinear, TernaryLinear
from bittern.peft import TernaryLoraLinear, apply_lora, latent_weight, merge_lora, merged_layer


def packed_model(seed: int = 0):
    model = tiny_model("llama", seed=seed)
    bittern.to_ternary(model)
    return model


def trained_adapter(steps: int = 15, seed: int = 0):
    peft_model = apply_lora(packed_model(seed), rank=4)
    ids = token_batch(length=32)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(steps):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return peft_model.eval(), ids


def loss_of(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_merge_gives_valid_ternary_layers_and_keeps_most_of_the_gain() -> None:
    peft_model, ids = trained_adapter()
    base_loss = loss_of(packed_model(), ids)
    adapted_loss = loss_of(peft_model, ids)
    deltas = {
        name: module.get_delta_weight("default")
        for name, module in peft_model.get_base_model().named_modules()
        if isinstance(module, TernaryLoraLinear)
    }
    merged = merge_lora(peft_model)
    merged_loss = loss_of(merged, ids)
    layers = {n: m for n, m in merged.named_modules() if isinstance(m, TernaryLinear)}
    assert set(layers) == set(deltas)
    flipped = 0
    for name, layer in layers.items():
        codes = layer.codes()
        assert set(codes.unique().tolist()) <= {-1, 0, 1}
        assert torch.isfinite(layer.weight_scale).all() and (layer.weight_scale > 0).all()
        flipped += int((codes != packed_model().get_submodule(name).codes()).sum())
    assert flipped > 0
    assert not any(isinstance(m, TernaryLoraLinear) for m in merged.modules())
    # the measured loss of the merged model: a real part of the adapter's gain survives rounding
    assert adapted_loss < merged_loss < base_loss, (adapted_loss, merged_loss, base_loss)


def test_merging_a_zero_update_reproduces_the_base_exactly() -> None:
    """The packed base's latent ((Wt / s_w) / d) ternarizes back to the same codes and scale; Wt / s_w itself would
    not."""
    merged = merge_lora(apply_lora(packed_model(), rank=4))  # B = 0: ΔW = 0
    base = packed_model()
    for name, layer in merged.named_modules():
        if isinstance(layer, TernaryLinear):
            original = base.get_submodule(name)
            assert torch.equal(layer.packed_weight, original.packed_weight)
            assert torch.equal(layer.weight_scale, original.weight_scale)
            shrunk = quant.mean_abs(original.dequantized_weight())  # the pitfall the latent avoids
            assert shrunk < 0.9 / original.weight_scale


def test_peft_merge_and_unload_agrees_with_merge_lora_and_unmerge_restores_the_base() -> None:
    peft_model, ids = trained_adapter()
    layer = peft_model.get_base_model().model.layers[0].mlp.up_proj
    original = (layer.base_layer.packed_weight.clone(), layer.base_layer.weight_scale.clone())
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
    layer.merge()
    assert layer.merged and not torch.equal(layer.base_layer.packed_weight, original[0])
    layer.unmerge()
    assert torch.equal(layer.base_layer.packed_weight, original[0])
    assert torch.equal(layer.base_layer.weight_scale, original[1])
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, adapted)

    ours = merge_lora(trained_adapter()[0])
    peft_merged = trained_adapter()[0].merge_and_unload()
    for name, module in ours.named_modules():
        if isinstance(module, TernaryLinear):
            theirs = peft_merged.get_submodule(name)
            assert isinstance(theirs, TernaryLinear)
            assert torch.equal(module.packed_weight, theirs.packed_weight)
            assert torch.equal(module.weight_scale, theirs.weight_scale)


def test_bitlinear_merge_keeps_the_unrounded_latent() -> None:
    peft_model, _ = trained_adapter()
    wrapper = peft_model.get_base_model().model.layers[1].self_attn.o_proj
    expected = latent_weight(wrapper.base_layer) + wrapper.get_delta_weight("default")
    merged = merge_lora(peft_model, layers="bitlinear")
    layer = merged.model.layers[1].self_attn.o_proj
    assert isinstance(layer, BitLinear)
    torch.testing.assert_close(layer.weight, expected, rtol=0, atol=0)
    assert not layer.weight.requires_grad


def test_merge_of_an_adapter_on_bitlinear_ternarizes_latent_plus_delta() -> None:
    model = tiny_model("llama")
    bittern.to_bitlinear(model)
    peft_model = apply_lora(model, rank=4, targets=["gate_proj"])
    wrapper = peft_model.get_base_model().model.layers[0].mlp.gate_proj
    torch.nn.init.normal_(wrapper.lora_B["default"].weight, std=0.05)
    latent = wrapper.base_layer.weight.detach() + wrapper.get_delta_weight("default")
    merged = merge_lora(peft_model)
    assert not any(isinstance(m, BitLinear) for m in merged.modules())  # packed for deployment
    codes, scale = quant.ternarize(latent)
    layer = merged.model.layers[0].mlp.gate_proj
    assert torch.equal(layer.codes(), codes) and torch.equal(layer.weight_scale, scale)


def test_merge_refuses_bad_input() -> None:
    with pytest.raises(ConfigError, match="PeftModel"):
        merge_lora(packed_model())
    with pytest.raises(ConfigError, match="unknown adapter"):
        merge_lora(apply_lora(packed_model(), rank=2), adapter_names=["nope"])
    with pytest.raises(ConfigError, match="layers must be"):
        merge_lora(apply_lora(packed_model(), rank=2), layers="dense")


def test_stochastic_merge_keeps_the_update_in_expectation_and_a_zero_update_exactly() -> None:
    torch.manual_seed(0)
    base = TernaryLinear.from_bitlinear(torch.nn.Linear(256, 64, bias=False))
    scale = base.weight_scale
    zero = merged_layer(base, torch.zeros(64, 256), rounding="stochastic", generator=torch.Generator().manual_seed(1))
    assert torch.equal(zero.packed_weight, base.packed_weight) and torch.equal(zero.weight_scale, scale)
    delta = torch.full((64, 256), 0.25) / scale  # a quarter of a step everywhere: nearest rounding keeps nothing
    nearest = merged_layer(base, delta)
    assert torch.equal(nearest.codes(), base.codes())
    merged = merged_layer(base, delta, rounding="stochastic", generator=torch.Generator().manual_seed(1))
    assert torch.equal(merged.weight_scale, scale)
    moved = (merged.codes() - base.codes()).float()
    eligible = base.codes() < 1  # codes already at +1 cannot move up
    assert abs(moved[eligible].mean().item() - 0.25) < 0.02
    assert set(merged.codes().unique().tolist()) <= {-1, 0, 1}


def test_stochastic_merge_lora_is_seeded() -> None:
    first = merge_lora(trained_adapter()[0], rounding="stochastic", seed=3)
    second = merge_lora(trained_adapter()[0], rounding="stochastic", seed=3)
    layer = "model.layers.0.mlp.down_proj"
    assert torch.equal(first.get_submodule(layer).packed_weight, second.get_submodule(layer).packed_weight)
    with pytest.raises(ConfigError, match="stochastic"):
        merge_lora(trained_adapter()[0], layers="bitlinear", rounding="stochastic")
