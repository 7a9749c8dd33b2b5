"""bittern.compat: onebitllms' three functions, same names and signatures, bittern's numbers."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from conftest import tiny_model, token_batch
from safetensors.torch import load_file

from bittern import compat, load_model, packing, quant
from bittern.nn import BitLinear, TernaryLinear

ONEBITLLMS_SIGNATURES = {
    "replace_linear_with_bitnet_linear": ["model", "previous_dtype"],
    "quantize_to_1bit": ["input_checkpoint_path", "output_checkpoint_path"],
    "convert_to_bf16": ["input_checkpoint_path", "output_checkpoint_path"],
}


def test_the_three_functions_have_onebitllms_signatures() -> None:
    for name, parameters in ONEBITLLMS_SIGNATURES.items():
        assert list(inspect.signature(getattr(compat, name)).parameters) == parameters, name


def test_replace_linear_with_bitnet_linear_swaps_the_decoder_linears_in_place() -> None:
    model = tiny_model("llama")
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert compat.replace_linear_with_bitnet_linear(model) is model
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, BitLinear) and q_proj.weight is weight  # latent weights shared, not copied
    assert type(model.lm_head) is torch.nn.Linear
    assert sum(isinstance(m, BitLinear) for m in model.modules()) == 14


def test_quantize_to_1bit_and_convert_to_bf16_write_the_published_variants(tmp_path: Path) -> None:
    model = compat.replace_linear_with_bitnet_linear(tiny_model("llama"))
    model.config.is_bitnet_config = True
    model.save_pretrained(tmp_path / "trained")  # what SFTTrainer.save_model writes
    out = compat.quantize_to_1bit(str(tmp_path / "trained"), str(tmp_path / "packed"))
    assert out == str(tmp_path / "packed")
    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitnet"
    stored = load_file(str(tmp_path / "packed" / "model.safetensors"))
    assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16  # dense tensors in bf16, as onebitllms
    latent = model.model.layers[1].mlp.down_proj.weight
    codes, scale = quant.ternarize(latent)
    key = "model.layers.1.mlp.down_proj"
    assert torch.equal(packing.unpack_ternary_rows(stored[f"{key}.weight"], latent.shape[0]), codes)
    assert torch.equal(stored[f"{key}.weight_scale"], scale)
    assert isinstance(load_model(tmp_path / "packed").model.layers[1].mlp.down_proj, TernaryLinear)

    compat.convert_to_bf16(tmp_path / "trained", tmp_path / "bf16")
    dense = load_file(str(tmp_path / "bf16" / "model.safetensors"))[f"{key}.weight"]
    assert dense.dtype == torch.bfloat16
    assert torch.equal(dense, quant.dequantize_weight(codes, scale, torch.bfloat16))  # round(W * s) / s
    with torch.no_grad():
        assert torch.isfinite(load_model(tmp_path / "bf16")(token_batch()).logits).all()
