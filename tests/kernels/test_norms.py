"""The fused RMSNorm (residual add, norm, activation quantization) against the Hugging Face module and
:func:`bittern.quant.quantize_activations` (interpreter on CPU: small rows with ragged widths)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from bittern import kernels, packing, quant, reference

pytest.importorskip("triton")
from bittern.kernels import norms

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _norm_and_inputs(width: int, dtype: torch.dtype, seed: int, rows: tuple[int, ...] = (3, 5)):
    generator = torch.Generator().manual_seed(seed)
    module = LlamaRMSNorm(width, eps=1e-5)
    with torch.no_grad():
        module.weight.copy_(torch.randn(width, generator=generator) * 0.5 + 1)
    x = torch.randn(*rows, width, generator=generator) * 3
    residual = torch.randn(*rows, width, generator=generator)
    return module.to(DEVICE, dtype), x.to(DEVICE, dtype), residual.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [64, 100, 640])
def test_fused_norm_computes_the_module_and_quantizes_its_output_exactly(width: int, dtype: torch.dtype) -> None:
    module, x, residual = _norm_and_inputs(width, dtype, seed=width)
    summed, y, (yq, scale) = norms.rms_norm(x, module.weight, module.variance_epsilon, residual, quantize=True)
    assert torch.equal(summed, x + residual)  # the add rounds as PyTorch's does
    with torch.no_grad():
        expected = module(x + residual)
    assert y.dtype == expected.dtype and y.shape == expected.shape
    # the mean's order of additions and rsqrt's last bit may differ from PyTorch's: at most one rounding step
    tolerance = 2e-6 if dtype == torch.float32 else 2**-7
    assert ((y.float() - expected.float()).abs() <= tolerance * expected.float().abs() + 1e-6).all()
    xq_ref, scale_ref = quant.quantize_activations(y)  # of the norm's own output, bit for bit
    assert torch.equal(yq, xq_ref) and torch.equal(scale, scale_ref)
    ref_summed, ref_y, _ = reference.rms_norm(x, module.weight, module.variance_epsilon, residual)
    assert torch.equal(summed, ref_summed)
    assert ((y.float() - ref_y.float()).abs() <= tolerance * ref_y.float().abs() + 1e-6).all()


def test_fused_norm_without_residual_or_quantization() -> None:
    module, x, _ = _norm_and_inputs(96, torch.bfloat16, seed=1, rows=(7,))
    summed, y, quantized = norms.rms_norm(x, module.weight, module.variance_epsilon)
    assert summed is x and quantized is None
    with torch.no_grad():
        assert (y.float() - module(x).float()).abs().max() <= 2**-7 * module(x).float().abs().max()


def test_a_zero_row_quantizes_to_zeros_with_the_smallest_scale() -> None:
    module, x, residual = _norm_and_inputs(48, torch.float32, seed=2, rows=(2,))
    x[1] = 0
    residual[1] = 0
    _, y, (yq, scale) = norms.rms_norm(x, module.weight, module.variance_epsilon, residual, quantize=True)
    assert torch.equal(y[1], torch.zeros_like(y[1])) and torch.equal(yq[1], torch.zeros_like(yq[1]))
    assert torch.equal(scale[1].cpu(), quant.activation_scale(torch.tensor([quant.EPS])))


def test_fused_norm_output_follows_the_weight_dtype_promotion() -> None:
    module, x, _ = _norm_and_inputs(32, torch.bfloat16, seed=3)
    weight = module.weight.float()  # a float32 gain on a bf16 input: PyTorch's product is float32
    _, y, _ = norms.rms_norm(x, weight, module.variance_epsilon)
    with torch.no_grad():
        expected = weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)
    assert y.dtype == torch.float32
    assert torch.allclose(y, expected, rtol=2e-6, atol=1e-6)


def test_bad_inputs_are_refused_by_name() -> None:
    module, x, residual = _norm_and_inputs(32, torch.float32, seed=4)
    with pytest.raises(ValueError, match="weight"):
        norms.rms_norm(x, module.weight[:16], 1e-5)
    with pytest.raises(ValueError, match="residual"):
        norms.rms_norm(x, module.weight, 1e-5, residual.to(torch.float16))
    with pytest.raises(ValueError, match="floating"):
        norms.rms_norm(x.to(torch.int32), module.weight, 1e-5)
    too_wide = torch.zeros(1, norms.MAX_WIDTH + 4, device=DEVICE)
    with pytest.raises(ValueError, match=str(norms.MAX_WIDTH)):
        norms.rms_norm(too_wide, torch.ones(norms.MAX_WIDTH + 4, device=DEVICE), 1e-5)


def test_dispatch_falls_back_to_the_module_formula_on_the_reference_backend() -> None:
    module, x, residual = _norm_and_inputs(40, torch.float32, seed=5)
    with kernels.use_backend("reference"):
        summed, y, (yq, scale) = kernels.rms_norm(x, module.weight, module.variance_epsilon, residual, quantize=True)
    with torch.no_grad():
        assert torch.equal(y, module(x + residual)) and torch.equal(summed, x + residual)
    assert torch.equal(yq, quant.quantize_activations(y)[0]) and torch.equal(scale, quant.quantize_activations(y)[1])


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("tokens", [2, 9, 40])  # decode kernel, split-K product, unpack + GEMM on Triton
def test_packed_products_of_a_quantized_input_equal_the_packed_linear(backend: str, tokens: int) -> None:
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 64, generator=generator).to(DEVICE)
    layers = [quant.ternarize(torch.randn(n, 64, generator=generator) * 0.02) for n in (24, 8)]
    weights = [packing.pack_ternary_rows(c).to(DEVICE) for c, _ in layers]
    scales = [s.to(DEVICE) for _, s in layers]
    bias = torch.randn(24, generator=generator).to(DEVICE)
    with kernels.use_backend(backend):
        xq, act_scale = kernels.quantize_activations(x)
        group = kernels.packed_quantized(xq, act_scale, weights, [24, 8], scales, None, torch.float32)
        single = kernels.packed_quantized(xq, act_scale, weights[:1], [24], scales[:1], bias, torch.float32)
    for y, (codes, scale) in zip(group, layers, strict=True):
        assert torch.equal(y, quant.integer_linear(x, codes.to(DEVICE), scale.to(DEVICE)))
    assert torch.equal(single[0], quant.integer_linear(x, layers[0][0].to(DEVICE), scales[0], bias))
