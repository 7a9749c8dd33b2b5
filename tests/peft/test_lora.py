"""LoRA on packed ternary models through PEFT: training, a frozen base, save/load, several adapters, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, token_batch
from peft import PeftModel

import bittern
from bittern.errors import ConfigError, MissingFileError
from bittern.nn import TernaryLinear
from bittern.peft import TernaryLoraLinear, apply_lora, load_adapter


def packed_model(arch: str = "llama", seed: int = 0):
    model = tiny_model(arch, seed=seed)
    bittern.to_ternary(model)
    return model


def ternary_state(model) -> dict[str, torch.Tensor]:
    """Every packed code and scale, keyed by the layer's name without PEFT's ``base_layer`` level."""
    return {
        name.replace(".base_layer", ""): torch.cat([m.packed_weight.flatten().float(), m.weight_scale.flatten()])
        for name, m in model.named_modules()
        if isinstance(m, TernaryLinear)
    }


def train(model, ids: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("arch", ["llama", "bitnet", "qwen2"])
def test_lora_trains_and_the_packed_base_stays_bit_identical(arch: str) -> None:
    model = packed_model(arch)
    before = ternary_state(model)
    dense_before = {k: v.clone() for k, v in model.state_dict().items() if "packed" not in k and "scale" not in k}
    peft_model = apply_lora(model, rank=4)
    adapted = [m for m in peft_model.modules() if isinstance(m, TernaryLoraLinear)]
    assert len(adapted) == 7 * 2  # every projection of both blocks
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == {
        n for n, _ in peft_model.named_parameters() if ".lora_A." in n or ".lora_B." in n
    }
    losses = train(peft_model, token_batch(length=32), steps=25)
    assert losses[-1] < 0.7 * losses[0], losses
    after = ternary_state(peft_model.get_base_model())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    dense_after = {k.replace(".base_layer", ""): v for k, v in peft_model.get_base_model().state_dict().items()}
    assert all(torch.equal(v, dense_after[k]) for k, v in dense_before.items())


def test_gradient_reaches_adapters_below_frozen_packed_layers() -> None:
    """Layer 0's adapters learn only through layer 1's frozen packed layers: grad_x must pass them."""
    peft_model = apply_lora(packed_model(), rank=4)
    first = peft_model.get_base_model().model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(first.lora_B["default"].weight, std=0.02)  # B = 0 at init gives A no gradient
    ids = token_batch(length=16)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert first.lora_A["default"].weight.grad.abs().sum() > 0
    assert first.lora_B["default"].weight.grad.abs().sum() > 0


def test_packed_layer_passes_the_straight_through_gradient_to_its_input() -> None:
    torch.manual_seed(0)
    layer = TernaryLinear.from_bitlinear(torch.nn.Linear(32, 24, bias=True))
    x = torch.randn(3, 5, 32, requires_grad=True)
    grad_y = torch.randn(3, 5, 24)
    layer(x).backward(grad_y)
    torch.testing.assert_close(x.grad, grad_y @ layer.dequantized_weight())
    assert layer.bias.grad is None and layer.packed_weight.grad is None


def test_fresh_adapter_leaves_the_output_unchanged() -> None:
    model = packed_model()
    ids = token_batch(length=16)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        adapted = apply_lora(model, rank=8, dropout=0.1).eval()(input_ids=ids).logits
    assert torch.equal(reference, adapted)


def test_adapter_round_trips_through_peft_save_and_load(tmp_path) -> None:
    peft_model = apply_lora(packed_model(), rank=4, alpha=16)
    train(peft_model, token_batch(length=16), steps=5)
    peft_model.eval()
    ids = token_batch(length=24, seed=3)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = load_adapter(packed_model(), tmp_path / "adapter")
    assert isinstance(reloaded, PeftModel)
    assert reloaded.peft_config["default"].lora_alpha == 16
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
    assert not any(p.requires_grad for p in reloaded.parameters())
    trainable = load_adapter(packed_model(), tmp_path / "adapter", is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_several_adapters_share_one_packed_base(tmp_path) -> None:
    ids = token_batch(batch=2, length=16)
    outputs = {}
    for name, seed in (("first", 1), ("second", 2)):
        peft_model = apply_lora(packed_model(), rank=4)
        train(peft_model, token_batch(length=16, seed=seed), steps=4)
        peft_model.eval()
        with torch.no_grad():
            outputs[name] = peft_model(input_ids=ids).logits
        peft_model.save_pretrained(tmp_path / name)
    served = load_adapter(packed_model(), tmp_path / "first", adapter_name="first")
    load_adapter(served, tmp_path / "second", adapter_name="second")
    assert sum(isinstance(m, TernaryLinear) for m in served.modules()) == 14  # one base, not two
    with torch.no_grad():
        served.set_adapter("first")
        assert torch.equal(served(input_ids=ids).logits, outputs["first"])
        served.set_adapter("second")
        assert torch.equal(served(input_ids=ids).logits, outputs["second"])
        mixed = served(input_ids=ids, adapter_names=["first", "second"]).logits
    torch.testing.assert_close(mixed[0], outputs["first"][0])
    torch.testing.assert_close(mixed[1], outputs["second"][1])


def test_targets_choose_the_adapted_layers() -> None:
    peft_model = apply_lora(packed_model(), rank=2, targets=["q_proj", "v_proj"])
    adapted = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if isinstance(m, TernaryLoraLinear)}
    assert adapted == {"q_proj", "v_proj"}


def test_lora_on_bitlinear_keeps_the_quantized_forward_and_frozen_latents() -> None:
    model = tiny_model("llama")
    bittern.to_bitlinear(model)
    latents = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, bittern.BitLinear)}
    ids = token_batch(length=16)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    peft_model = apply_lora(model, rank=4)
    peft_model.eval()
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, reference)  # base forward is BitLinear's, B = 0
    losses = train(peft_model, ids, steps=20)
    assert losses[-1] < 0.7 * losses[0]
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, bittern.BitLinear):
            assert torch.equal(module.weight, latents[name.replace(".base_layer", "")])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"targets": ["nonexistent_proj"]}, "matches no module"),
        ({"targets": ["input_layernorm"]}, "only linear layers"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"rank": -3}, "rank must be a positive integer"),
        ({"alpha": 0}, "alpha must be positive"),
        ({"dropout": 1.0}, "dropout must lie in"),
        ({"use_dora": True}, "DoRA"),
    ],
)
def test_bad_settings_are_refused_with_one_clear_error(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_lora(packed_model(), **kwargs)


def test_a_model_without_ternary_layers_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no ternary layers"):
        apply_lora(tiny_model("llama"))
    with pytest.raises(MissingFileError, match=r"adapter_config\.json"):
        load_adapter(packed_model(), tmp_path)


def test_a_second_adapter_is_added_next_to_the_first() -> None:
    peft_model = apply_lora(packed_model(), rank=4)
    apply_lora(peft_model, rank=2, adapter_name="second")
    apply_lora(peft_model, rank=2, targets=["o_proj"], adapter_name="third")
    layer = peft_model.get_base_model().model.layers[0].self_attn.o_proj
    assert set(layer.lora_A) == {"default", "second", "third"}
    assert layer.lora_A["second"].weight.shape == (2, 64)
    assert "third" not in peft_model.get_base_model().model.layers[0].self_attn.q_proj.lora_A
