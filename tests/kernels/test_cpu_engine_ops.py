"""The engine's other native CPU kernels (:mod:`bittern.kernels.cpu`): the fused RMSNorm (bit for bit in 16-bit dtypes
where its mean's last bit is rounded away, within float32 rounding otherwise), relu² (bit for bit), norm + packed
layers in one call (bit for bit against the two calls), the 16-bit GEMV and the decode attention (float32 sums)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import one_thread

from bittern import packing, quant, reference
from bittern.kernels import cpu

pytestmark = [
    pytest.mark.skipif(not cpu.available(), reason="the native CPU kernels did not build here"),
    pytest.mark.usefixtures("single_thread"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _hf_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_is_the_hugging_face_norm(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 300, generator=generator) * 3).to(dtype)
    residual = torch.randn(3, 5, 300, generator=generator).to(dtype)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-4  # a flipped last bit of a 16-bit value is 1e-3 of it
    for weight in (torch.randn(300, generator=generator).to(dtype), torch.randn(300, generator=generator)):
        s, y = cpu.rms_norm(x, weight, 1e-5, residual)
        assert torch.equal(s, x + residual)
        ref = _hf_norm(x + residual, weight, 1e-5)
        assert y.dtype == ref.dtype
        assert _relative_error(y, ref) <= tolerance
        if dtype != torch.float32 and weight.dtype == dtype:  # the mean's last bit rounds away in 16 bits
            assert float((y != ref).float().mean()) <= 0.01
        s, y = cpu.rms_norm(x, weight, 1e-5)
        assert s is x
        assert _relative_error(y, _hf_norm(x, weight, 1e-5)) <= tolerance


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu2_mul_is_bit_identical(dtype: torch.dtype) -> None:
    from transformers.activations import ReLUSquaredActivation

    generator = torch.Generator().manual_seed(1)
    gate, up = (torch.randn(2, 1000, generator=generator) * 4).to(dtype), torch.randn(2, 1000).to(dtype)
    gate[0, :3] = torch.tensor([0.0, -0.0, -1.0])
    assert torch.equal(cpu.relu2_mul(gate, up), ReLUSquaredActivation()(gate) * up)


@pytest.mark.parametrize("isa", cpu.supported_isas() if cpu.available() else [])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_linear_equals_the_norm_then_the_packed_layers(isa: str, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 3, 130, generator=generator) * 3).to(dtype)
    residual = torch.randn(2, 3, 130, generator=generator).to(dtype)
    gate = (torch.randn(2, 3, 130, generator=generator) * 2).to(dtype)
    weight = torch.rand(130, generator=generator).to(dtype) + 0.5
    layers = []
    for n, per_channel in ((24, False), (10, True)):
        codes, scale = quant.ternarize(torch.randn(n, 130, generator=generator), per_channel)
        layers.append((packing.pack_ternary_rows(codes), n, scale))
    packed, sizes, scales = zip(*layers, strict=True)
    bias = torch.randn(24, generator=generator)
    with cpu.use_isa(isa):
        for rows in (x, x[:1, :1]):
            for how in ("residual", "gate", "plain"):
                r = residual[: len(rows), : rows.shape[1]] if how == "residual" else None
                g = gate[: len(rows), : rows.shape[1]] if how == "gate" else None
                s, outs = cpu.norm_linear(rows, weight, 1e-5, packed, sizes, scales, residual=r, gate=g)
                h = cpu.relu2_mul(g, rows) if g is not None else rows
                want_s, y = cpu.rms_norm(h, weight, 1e-5, r)
                if r is not None:
                    assert torch.equal(s, want_s)
                expected = cpu.packed_linear_group(y, packed, sizes, scales)
                assert all(torch.equal(a, b) for a, b in zip(outs, expected, strict=True))
            _, (one,) = cpu.norm_linear(rows, weight, 1e-5, packed[:1], sizes[:1], scales[:1], bias=bias)
            y = cpu.rms_norm(rows, weight, 1e-5)[1]
            assert torch.equal(one, cpu.packed_linear(y, packed[0], 24, scales[0], bias))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_linear_is_f_linear(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 300, generator=generator).to(dtype)
    weight = torch.randn(77, 300, generator=generator).to(dtype)
    bias = torch.randn(77, generator=generator).to(dtype)
    for isa in cpu.supported_isas()[:1] + cpu.supported_isas()[-1:]:
        with cpu.use_isa(isa):
            y = cpu.dense_linear(x, weight, bias)
            assert y.dtype == dtype and y.shape == (3, 2, 77)
            ref = F.linear(x.float(), weight.float(), bias.float())
            assert _relative_error(y, ref) <= (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("isa", cpu.supported_isas()[:1] + cpu.supported_isas()[-1:] if cpu.available() else [])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 4])
def test_decode_attention_against_step_by_step_pytorch(isa: str, dtype: torch.dtype, window: int | None) -> None:
    generator = torch.Generator().manual_seed(4)
    batch, heads, groups, dim, length, slot = 3, 2, 3, 24, 16, 9
    q = torch.randn(batch, heads, groups, dim, generator=generator).to(dtype)
    k, v = (torch.randn(batch, heads, dim, generator=generator).to(dtype) for _ in range(2))
    cos, sin = (torch.randn(length, dim, generator=generator).to(dtype) for _ in range(2))
    keys = torch.randn(batch + 1, heads, length, dim, generator=generator).to(dtype)
    values = torch.randn(batch + 1, heads, length, dim, generator=generator).to(dtype)
    pad = torch.tensor([0, 3, 9])
    want_keys, want_values = keys.clone(), values.clone()
    want = reference.decode_attention(q, k, v, cos, sin, want_keys, want_values, torch.tensor([slot]), pad, 0.3, window)
    with cpu.use_isa(isa), one_thread():
        got = cpu.decode_attention(q, k, v, cos, sin, keys, values, torch.tensor([slot]), pad, 0.3, window)
    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)  # rope rounded as the model rounds it
    assert _relative_error(got, want) <= (1e-5 if dtype == torch.float32 else 1e-2)
