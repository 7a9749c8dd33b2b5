"""examples/falcon_e_sft.py: the Falcon-E fine-tuning recipe runs on a tiny replica, and what it exports is the
published packed layout (codes and scales by the published formula from the trained latents, stock transformers'
logits)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bittern import inspection, load_model, packing

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "falcon_e_sft.py"


def run_example(out: Path) -> Path:
    spec = importlib.util.spec_from_file_location("falcon_e_sft", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(["--tiny", "--out", str(out), "--steps", "3", "--max-length", "64"])


def test_the_recipe_fine_tunes_and_exports_the_published_packed_layout(tmp_path: Path) -> None:
    packed = run_example(tmp_path)
    config = json.loads((packed / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitnet"
    assert (packed / "tokenizer.json").is_file()
    prequantized = inspection.inspect_checkpoint(tmp_path / "prequantized")
    assert prequantized.layout == "falcon-e-prequantized" and prequantized.ternary_layers == 14

    latents = load_file(str(tmp_path / "sft" / "model.safetensors"))
    stored = load_file(str(packed / "model.safetensors"))
    layers = [key.removesuffix(".weight") for key, tensor in stored.items() if tensor.dtype == torch.uint8]
    assert len(layers) == 14
    for name in layers:
        w = latents[f"{name}.weight"].to(torch.float32)
        scale = 1.0 / (w.abs().to(torch.float64).mean().to(torch.float32).clamp(min=1e-5))  # published: 1 / mean|W|
        codes = (w * scale).round().clamp(-1, 1).to(torch.int8)
        n = w.shape[0]
        assert torch.equal(packing.unpack_ternary_rows(stored[f"{name}.weight"], n), codes), name
        assert torch.equal(stored[f"{name}.weight_scale"], scale.reshape(1)), name

    ids = torch.randint(0, config["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stock = AutoModelForCausalLM.from_pretrained(packed, dtype=torch.float32).eval()(ids).logits
        ours = load_model(packed)(ids).logits
    assert float((ours - stock).norm() / stock.norm()) <= 1e-5
