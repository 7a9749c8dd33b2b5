"""Checkpoints in the layouts others publish, written by hand (not by bittern's writers), read by bittern.

* Falcon-E style: ``LlamaForCausalLM`` + ``quantization_config`` ``bitlinear`` offline, no
  ``modules_to_not_convert``, ``weight_scale = 1/mean|W|`` as bf16 ``[1]``, dense tensors bf16.
* microsoft 2B4T style: ``BitNetForCausalLM`` (relu², sub-norms, tied embeddings) + ``autobitlinear`` offline,
  ``weight_scale = mean|W|`` as bf16 ``[1]``.
* a plain full-precision checkpoint written by ``save_pretrained``.

Weights are packed with transformers' own ``pack_weights``; codes and scales are computed here in plain torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, token_batch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.integrations.bitnet import pack_weights

from bittern.checkpoint import load_model, save_model
from bittern.convert import to_bitlinear
from bittern.formats import read_checkpoint
from bittern.nn import BitLinear, TernaryLinear

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

FALCON_E_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    **TINY,
    "head_dim": 16,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "is_bitnet_config": True,
    "quantization_config": {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"},
}

BITNET_2B4T_CONFIG = {
    "architectures": ["BitNetForCausalLM"],
    "model_type": "bitnet",
    **TINY,
    "hidden_act": "relu2",
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": True,
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"},
}

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Outside:
    """A hand-written outside checkpoint and what it holds."""

    directory: Path
    codes: dict[str, torch.Tensor]  # layer -> int8 [N, K]
    packed: dict[str, torch.Tensor]  # layer -> uint8 [N/4, K] as written
    stored_scale: dict[str, torch.Tensor]  # layer -> weight_scale as written (bf16 [1])
    scale: dict[str, torch.Tensor]  # layer -> the weight scale s_w bittern must recover (float32 [1])


def reference_ternarize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, mean|W|)`` by the published formula: float32 values, ``scale = 1.0 / mean``, ``round(w * scale)``
    half to even. (The mean is the float64 one rounded to float32 once: published exporters take a float32 mean,
    which can differ from it in the last bit.)"""
    w32 = weight.detach().float()
    mean = (w32.abs().double().mean().float()).clamp(min=1e-5).reshape(1)
    return (w32 * (1.0 / mean)).round().clamp(-1, 1).to(torch.int8), mean


def write_outside_packed(
    directory: Path, arch: str, config: dict, divide: bool, dense_dtype: torch.dtype, **overrides: object
) -> Outside:
    """Write a packed bitnet checkpoint the way Falcon-E (``divide``) or 2B4T (multiply) ship theirs."""
    model = tiny_model(arch, **overrides)
    tied = bool(config.get("tie_word_embeddings"))
    tensors: dict[str, torch.Tensor] = {}
    outside = Outside(directory, {}, {}, {}, {})
    for key, value in model.state_dict().items():
        name = key.removesuffix(".weight")
        if tied and key == "lm_head.weight":
            continue
        if key.endswith(".weight") and name.rsplit(".", 1)[-1] in BLOCK_LINEARS:
            codes, mean = reference_ternarize(value)
            packed = pack_weights(codes.clone())
            stored = (1.0 / mean if divide else mean).to(torch.bfloat16)
            tensors[key] = packed
            tensors[f"{name}.weight_scale"] = stored
            outside.codes[name] = codes
            outside.packed[name] = packed
            outside.stored_scale[name] = stored
            outside.scale[name] = stored.float() if divide else 1.0 / stored.float()
        else:
            tensors[key] = value.detach().to(dense_dtype).contiguous()
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(
        json.dumps({**config, "torch_dtype": str(dense_dtype).removeprefix("torch.")}, indent=2)
    )
    assert len(outside.codes) == 2 * len(BLOCK_LINEARS)
    return outside


def falcon_e(directory: Path) -> Outside:
    return write_outside_packed(directory, "llama", FALCON_E_CONFIG, divide=True, dense_dtype=torch.bfloat16)


def bitnet_2b4t(directory: Path, dense_dtype: torch.dtype) -> Outside:
    return write_outside_packed(
        directory, "bitnet", BITNET_2B4T_CONFIG, divide=False, dense_dtype=dense_dtype, tie_word_embeddings=True
    )


def bittern_logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(token_batch()).logits.float()


def stock_logits(directory: Path, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    with torch.no_grad():
        return model, model(token_batch()).logits.float()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def check_recovered(directory: Path, outside: Outside, layout: str) -> None:
    checkpoint = read_checkpoint(directory)
    assert checkpoint.layout == layout
    assert sorted(checkpoint.ternary) == sorted(outside.codes)
    for name, codes in outside.codes.items():
        weight = checkpoint.ternary[name]
        assert torch.equal(weight.codes, codes), f"codes of {name}"
        assert weight.scale.dtype == torch.float32 and weight.scale.shape == (1,)
        assert torch.equal(weight.scale, outside.scale[name]), f"scale of {name}"
        assert f"{name}.weight" not in checkpoint.tensors and f"{name}.weight_scale" not in checkpoint.tensors


# --- (a) Falcon-E ---------------------------------------------------------------------------------------------


def test_falcon_e_read(tmp_path: Path) -> None:
    """Codes and 1/weight_scale are recovered; the head and embeddings stay dense."""
    outside = falcon_e(tmp_path / "falcon")
    check_recovered(tmp_path / "falcon", outside, "falcon-e")
    checkpoint = read_checkpoint(tmp_path / "falcon")
    assert checkpoint.dense_linear_layers is None  # modules_to_not_convert absent in the source
    assert checkpoint.tensors["lm_head.weight"].dtype == torch.bfloat16
    assert "quantization_config" not in checkpoint.config
    for name, stored in outside.stored_scale.items():  # the scale is bf16(1/m): 1/m to bf16 precision
        mean = reference_ternarize(tiny_model("llama").get_submodule(name).weight)[1]
        torch.testing.assert_close(checkpoint.ternary[name].scale, 1 / mean, rtol=2**-8, atol=0)
        assert stored.dtype == torch.bfloat16 and stored.shape == (1,)


def test_falcon_e_matches_stock(tmp_path: Path) -> None:
    """bittern's model of a Falcon-E checkpoint computes what stock transformers computes."""
    falcon_e(tmp_path / "falcon")
    model = load_model(tmp_path / "falcon")
    names = [f"model.layers.{i}.{part}.{p}" for i in range(2) for part, p in _parts()]
    assert {type(model.get_submodule(n)) for n in names} == {TernaryLinear}
    assert type(model.lm_head) is nn.Linear
    stock, expected = stock_logits(tmp_path / "falcon", torch.float32)
    assert type(stock.model.layers[0].mlp.up_proj).__name__ == "BitLinear"
    rel = relative_error(bittern_logits(model), expected)
    assert rel <= 1e-2, f"relative error {rel:.2e}"


def test_falcon_e_written_back(tmp_path: Path) -> None:
    """Falcon-E → bittern → packed divide: byte-identical packed codes, same scales, same stock logits."""
    outside = falcon_e(tmp_path / "falcon")
    save_model(load_model(tmp_path / "falcon"), tmp_path / "back", variant="packed", dtype=torch.bfloat16)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["quantization_config"]["linear_class"] == "bitlinear"
    assert config["model_type"] == "llama"
    back = read_checkpoint(tmp_path / "back")
    for name, codes in outside.codes.items():
        assert torch.equal(back.ternary[name].codes, codes), name
        torch.testing.assert_close(back.ternary[name].scale, outside.scale[name], rtol=1e-6, atol=0)
    with safe_open(str(tmp_path / "back" / "model.safetensors"), framework="pt") as handle:
        for name, packed in outside.packed.items():
            assert torch.equal(handle.get_tensor(f"{name}.weight"), packed), f"packed bytes of {name}"
    _, original = stock_logits(tmp_path / "falcon", torch.float32)
    _, rewritten = stock_logits(tmp_path / "back", torch.float32)
    rel = relative_error(rewritten, original)
    assert rel <= 1e-3, f"relative error {rel:.2e}"


# --- (b) microsoft 2B4T ---------------------------------------------------------------------------------------


def test_bitnet_2b4t_read(tmp_path: Path) -> None:
    """Codes and weight_scale (the multiplier itself) are recovered; the tied head is not stored."""
    outside = bitnet_2b4t(tmp_path / "b", torch.bfloat16)
    check_recovered(tmp_path / "b", outside, "bitnet-2b4t")
    checkpoint = read_checkpoint(tmp_path / "b")
    assert checkpoint.config["model_type"] == "bitnet"
    assert "lm_head.weight" not in checkpoint.tensors
    model = load_model(tmp_path / "b")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert type(model.model.layers[0].mlp.down_proj) is TernaryLinear


@pytest.mark.parametrize(
    ("dense_dtype", "tolerance"),
    [
        (torch.float32, 1e-2),
        # bf16 on disk: stock AutoBitLinear keeps the on-disk dtype, so it runs only in bf16 arithmetic, which
        # alone moves this random bitnet's logits by ~1.8% (same figure as the stock-parity bf16 rows).
        (torch.bfloat16, 2.5e-2),
    ],
    ids=["float32-dense", "bf16-dense"],
)
def test_bitnet_2b4t_matches_stock(tmp_path: Path, dense_dtype: torch.dtype, tolerance: float) -> None:
    """bittern's model of a 2B4T checkpoint computes what stock transformers computes."""
    bitnet_2b4t(tmp_path / "b", dense_dtype)
    model = load_model(tmp_path / "b")
    stock, expected = stock_logits(tmp_path / "b", dense_dtype)
    assert type(stock.model.layers[0].self_attn.q_proj).__name__ == "AutoBitLinear"
    rel = relative_error(bittern_logits(model), expected)
    assert rel <= tolerance, f"relative error {rel:.2e}"


@pytest.mark.parametrize("dense_dtype", [torch.float32, torch.bfloat16], ids=["float32-dense", "bf16-dense"])
def test_bitnet_2b4t_written_back(tmp_path: Path, dense_dtype: torch.dtype) -> None:
    """2B4T → bittern → packed multiply: identical codes and packed bytes, exact scales, same stock logits."""
    outside = bitnet_2b4t(tmp_path / "b", dense_dtype)
    save_model(
        load_model(tmp_path / "b"), tmp_path / "back", variant="packed", scale_convention="multiply", dtype=dense_dtype
    )
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["quantization_config"]["linear_class"] == "autobitlinear"
    assert config["tie_word_embeddings"] is True
    back = read_checkpoint(tmp_path / "back")
    for name, codes in outside.codes.items():
        assert torch.equal(back.ternary[name].codes, codes), name
        assert torch.equal(back.ternary[name].scale, outside.scale[name]), name
    with safe_open(str(tmp_path / "back" / "model.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" not in set(handle.keys())
        for name, packed in outside.packed.items():
            assert torch.equal(handle.get_tensor(f"{name}.weight"), packed), f"packed bytes of {name}"
    _, original = stock_logits(tmp_path / "b", dense_dtype)
    _, rewritten = stock_logits(tmp_path / "back", dense_dtype)
    rel = relative_error(rewritten, original)
    assert rel <= 1e-3, f"relative error {rel:.2e}"


# --- (c) plain full precision -------------------------------------------------------------------------------


def test_hf_full(tmp_path: Path) -> None:
    """A save_pretrained checkpoint reads as hf-full; it loads plain by default, as BitLinear (with the stored
    latents) or as TernaryLinear (with their codes) on request."""
    source = tiny_model("llama")
    source.save_pretrained(tmp_path / "full")
    assert (tmp_path / "full" / "model.safetensors").is_file()
    checkpoint = read_checkpoint(tmp_path / "full")
    assert checkpoint.layout == "hf-full"
    assert checkpoint.ternary == {}
    assert not checkpoint.latent_layers
    state = source.state_dict()
    assert sorted(checkpoint.tensors) == sorted(state)
    for key, tensor in checkpoint.tensors.items():
        assert torch.equal(tensor, state[key]), key
    names = [f"model.layers.{i}.{part}.{p}" for i in range(2) for part, p in _parts()]

    plain = load_model(tmp_path / "full")
    assert {type(plain.get_submodule(n)) for n in names} == {nn.Linear}
    _, expected = stock_logits(tmp_path / "full", torch.float32)
    rel = relative_error(bittern_logits(plain), expected)
    assert rel <= 1e-2, f"relative error {rel:.2e}"
    assert rel <= 1e-6, "the plain view of a full checkpoint should be the very same computation"

    bit = load_model(tmp_path / "full", layers="bitlinear")
    assert {type(bit.get_submodule(n)) for n in names} == {BitLinear}
    assert type(bit.lm_head) is nn.Linear
    for name in names:
        assert torch.equal(bit.get_submodule(name).weight, state[f"{name}.weight"]), name

    ternary = load_model(tmp_path / "full", layers="ternary")
    assert type(ternary.lm_head) is nn.Linear
    for name in names:
        codes, mean = reference_ternarize(state[f"{name}.weight"])
        layer = ternary.get_submodule(name)
        assert isinstance(layer, TernaryLinear)
        assert torch.equal(layer.codes(), codes), name
        assert torch.equal(layer.weight_scale, 1.0 / mean), name
    # BitLinear at λ=1 computes from integers like TernaryLinear: bit-identical logits.
    assert torch.equal(bittern_logits(ternary), bittern_logits(bit))


def test_hf_full_to_prequantized(tmp_path: Path) -> None:
    """hf-full → bittern (BitLinear) → prequantized keeps every latent weight bit-exactly."""
    source = tiny_model("qwen2")
    source.save_pretrained(tmp_path / "full")
    save_model(load_model(tmp_path / "full", layers="bitlinear"), tmp_path / "pre", variant="prequantized")
    reloaded = load_model(tmp_path / "pre")
    assert type(reloaded.model.layers[0].self_attn.q_proj) is BitLinear
    state = source.state_dict()
    assert sorted(reloaded.state_dict()) == sorted(state)
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, state[key]), key


def _parts() -> list[tuple[str, str]]:
    return [("self_attn", p) for p in BLOCK_LINEARS[:4]] + [("mlp", p) for p in BLOCK_LINEARS[4:]]


# --- (d) latent BitNet layouts, and markers other tools left behind ------------------------------------------


def write_latent(directory: Path, arch: str, config: dict, dense_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The tiny ``arch`` model's weights, unquantized, in ``dense_dtype``, under ``config`` (written by hand)."""
    model = tiny_model(arch)
    tensors = {key: value.detach().to(dense_dtype).contiguous() for key, value in model.state_dict().items()}
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return model


def test_falcon_e_prequantized_revision_reads_as_latent_weights(tmp_path: Path) -> None:
    """``is_bitnet_config`` without ``quantization_config`` (Falcon-E's prequantized revision): latent weights that
    load as BitLinear and inspect as ternary, never as a plain full-precision model."""
    from bittern.inspection import inspect_checkpoint

    config = {key: value for key, value in FALCON_E_CONFIG.items() if key != "quantization_config"}
    write_latent(tmp_path / "pre", "llama", config)
    checkpoint = read_checkpoint(tmp_path / "pre")
    assert (checkpoint.format, checkpoint.layout, checkpoint.latent_layers) == ("full", "falcon-e-prequantized", None)
    report = inspect_checkpoint(tmp_path / "pre")
    assert report.layout == "falcon-e-prequantized"
    assert report.ternary_layers == 2 * len(BLOCK_LINEARS)
    assert report.bits_per_linear_weight == 16
    model = load_model(tmp_path / "pre")
    assert {type(model.get_submodule(f"model.layers.0.{p}.{n}")) for p, n in _parts()} == {BitLinear}
    assert type(model.lm_head) is nn.Linear


def test_online_2b4t_layout_reports_its_ternary_layers(tmp_path: Path) -> None:
    """The 2B4T bf16 ("online") layout: inspect counts the latent layers load_model makes BitLinear."""
    from bittern.inspection import inspect_checkpoint

    online = {**BITNET_2B4T_CONFIG, "quantization_config": {**BITNET_2B4T_CONFIG["quantization_config"]}}
    online["quantization_config"]["quantization_mode"] = "online"
    write_latent(tmp_path / "online", "bitnet", online)
    report = inspect_checkpoint(tmp_path / "online")
    assert (report.format, report.layout) == ("full", "bitnet-online")
    assert report.ternary_layers == 2 * len(BLOCK_LINEARS)
    assert report.bits_per_linear_weight == 16
    model = load_model(tmp_path / "online")
    assert isinstance(model.model.layers[1].mlp.down_proj, BitLinear)


def test_a_marker_that_quantization_config_contradicts_is_ignored_and_reported(tmp_path: Path) -> None:
    """onebitllms' quantize_to_1bit run on a bittern prequantized directory keeps bittern's marker in the config it
    writes beside packed tensors: the quantization_config decides, the marker is named as ignored."""
    from bittern.inspection import inspect_checkpoint

    model = to_bitlinear(tiny_model("llama"))
    save_model(model, tmp_path / "pre", "prequantized")
    config = json.loads((tmp_path / "pre" / "config.json").read_text())
    assert config["bittern"]["format"] == "prequantized" and config["is_bitnet_config"] is True
    tensors = {}
    with safe_open(str(tmp_path / "pre" / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
            value = handle.get_tensor(key)
            name = key.removesuffix(".weight")
            if name in config["bittern"]["ternary_layers"]:  # onebitllms' _weight_quant and pack_weights
                codes, mean = reference_ternarize(value)
                tensors[key] = pack_weights(codes.clone())
                tensors[f"{name}.weight_scale"] = (1.0 / mean).to(torch.bfloat16)
            else:
                tensors[key] = value.to(torch.bfloat16)
    (tmp_path / "onebit").mkdir()
    save_file(tensors, str(tmp_path / "onebit" / "model.safetensors"), metadata={"format": "pt"})
    config["quantization_config"] = {"modules_to_not_convert": ["lm_head"], "quant_method": "bitnet"}
    (tmp_path / "onebit" / "config.json").write_text(json.dumps(config))

    checkpoint = read_checkpoint(tmp_path / "onebit")
    assert (checkpoint.format, checkpoint.layout) == ("packed", "falcon-e")
    assert len(checkpoint.notes) == 1 and "'prequantized'" in checkpoint.notes[0]
    report = inspect_checkpoint(tmp_path / "onebit")
    assert report.format == "packed" and report.notes == checkpoint.notes
    assert any(line.startswith("note:") and "ignored" in line for line in report.lines())
    loaded = load_model(tmp_path / "onebit")
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, TernaryLinear)
    _, stock = stock_logits(tmp_path / "onebit", torch.float32)
    assert relative_error(bittern_logits(loaded), stock) <= 1e-5


def test_uint8_weights_beside_a_stale_marker_read_as_packed(tmp_path: Path) -> None:
    """Without a quantization_config the tensors decide: uint8 weights with a weight_scale are packed whatever
    bittern's marker says."""
    outside = falcon_e(tmp_path / "falcon")
    config = json.loads((tmp_path / "falcon" / "config.json").read_text())
    del config["quantization_config"]
    config["bittern"] = {"format": "bf16", "version": 1, "ternary_layers": sorted(outside.codes)}
    (tmp_path / "falcon" / "config.json").write_text(json.dumps(config))
    checkpoint = read_checkpoint(tmp_path / "falcon")
    assert checkpoint.format == "packed" and "packed uint8 weights" in checkpoint.notes[0]
    for name, codes in outside.codes.items():
        assert torch.equal(checkpoint.ternary[name].codes, codes), name


def test_save_model_copies_the_tokenizer_of_a_model_from_pretrained(tmp_path: Path) -> None:
    """A model loaded with stock ``from_pretrained`` from a directory with a tokenizer: save_model copies it."""
    from bittern.train.tokenizer import train_bpe_tokenizer

    tiny_model("llama").save_pretrained(tmp_path / "src")
    train_bpe_tokenizer(["some text to learn a few merges from"] * 4, 300).save_pretrained(tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32)
    save_model(to_bitlinear(model), tmp_path / "out", "packed")
    assert (tmp_path / "out" / "tokenizer.json").is_file()
