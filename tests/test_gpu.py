"""The foundation on a CUDA GPU: conversion of cuda models, the integer path on cuda against the CPU, and
stock transformers loading bittern's packed checkpoint on the GPU. Skipped without CUDA; run on an H100."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, token_batch

from bittern import quant
from bittern.checkpoint import save_model
from bittern.convert import to_bitlinear, to_ternary
from bittern.nn import TernaryLinear

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_quantizers_on_cuda_match_cpu() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(384, 256, generator=generator)
    x = torch.randn(8, 32, 256, generator=generator) * 3
    codes_cpu, scale_cpu = quant.ternarize(weight)
    codes_gpu, scale_gpu = quant.ternarize(weight.cuda())
    assert torch.equal(codes_gpu.cpu(), codes_cpu)
    # the float64 sum makes the scale independent of each device's summation order
    assert torch.equal(scale_gpu.cpu(), scale_cpu)
    xq_cpu, a_cpu = quant.quantize_activations(x)
    xq_gpu, a_gpu = quant.quantize_activations(x.cuda())
    assert torch.equal(xq_gpu.cpu(), xq_cpu)
    assert torch.equal(a_gpu.cpu(), a_cpu)
    acc_cpu = quant.integer_matmul(xq_cpu, codes_cpu)
    acc_gpu = quant.integer_matmul(xq_gpu, codes_gpu)
    assert torch.equal(acc_gpu.cpu(), acc_cpu)


def test_cuda_model_converts_and_matches_cpu() -> None:
    ids = token_batch()
    cpu = tiny_model("llama")
    gpu = tiny_model("llama").cuda()
    for model in (cpu, gpu):
        to_bitlinear(model)
        to_ternary(model)
    layer = gpu.model.layers[0].mlp.down_proj
    assert isinstance(layer, TernaryLinear) and layer.packed_weight.is_cuda and layer.weight_scale.is_cuda
    with torch.no_grad():
        expected = cpu(ids).logits
        got = gpu(ids.cuda()).logits.cpu()
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-4


def test_stock_transformers_loads_packed_on_cuda(tmp_path: Path) -> None:
    ids = token_batch()
    model = tiny_model("bitnet")
    to_bitlinear(model)
    to_ternary(model)
    with torch.no_grad():
        expected = model(ids).logits
    save_model(model, tmp_path / "packed", "packed")
    torch.save(ids, tmp_path / "ids.pt")
    child = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "packed")!r}, dtype=dtype, device_map="cuda")
            with torch.no_grad():
                torch.save(model(ids.cuda()).logits.float().cpu(), {str(tmp_path)!r} + f"/{{name}}.pt")
        assert "bittern" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", child], check=True)
    for name, limit, agreement in (("float32", 1e-2, 0.99), ("bfloat16", 2e-2, 0.98)):
        logits = torch.load(tmp_path / f"{name}.pt")
        relative = ((logits - expected).norm() / expected.norm()).item()
        same = (logits.argmax(-1) == expected.argmax(-1)).float().mean().item()
        print(f"stock transformers on cuda, {name}: rel err {relative:.2e}, argmax agreement {same:.4f}")
        assert relative <= limit and same >= agreement
