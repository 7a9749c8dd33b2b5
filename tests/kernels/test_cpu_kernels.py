"""The native CPU kernels (:mod:`bittern.kernels.cpu`) against :mod:`bittern.quant`, bit for bit: every instruction set
this CPU runs, ragged shapes (K not a multiple of a block or of a chunk, N not a multiple of 4, more tokens than a
tile), per-tensor and per-row scales, bias or none, float32 / bfloat16 / float16 inputs and outputs, one token and
several, one thread and two."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import one_thread

from bittern import packing, quant
from bittern.kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the native CPU kernels did not build here")


def _isas() -> list[str]:
    return cpu.supported_isas() if cpu.available() else []


# (tokens M, outputs N, inputs K): K around the 32- and 64-byte blocks and past a 32-block chunk of either (1024,
# 2048 bytes); N around the 4 rows of a byte row, the 4 byte rows of a work item and the 8 outputs of a vector; M past
# a 64-token tile and past the 256 tokens summed at once
SHAPES = [(1, 1, 1), (1, 5, 31), (1, 13, 100), (1, 8, 2100), (1, 37, 4500), (2, 4, 33), (3, 9, 64), (5, 130, 65),
          (70, 37, 77), (65, 6, 2049), (300, 10, 40)]  # fmt: skip


def _operands(m: int, n: int, k: int, per_channel: bool, seed: int, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=generator) * 3).to(dtype)
    codes, scale = quant.ternarize(torch.randn(n, k, generator=generator), per_channel)
    bias = torch.randn(n, generator=generator)
    return x, codes, packing.pack_ternary_rows(codes), scale, bias


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("shape", SHAPES)
def test_packed_linear_is_bit_identical_to_the_reference(isa: str, shape: tuple[int, int, int]) -> None:
    m, n, k = shape
    for per_channel in (False, True):
        x, codes, packed, scale, bias = _operands(m, n, k, per_channel, seed=sum(shape) + per_channel)
        with cpu.use_isa(isa), one_thread():
            for b in (bias, None):
                assert torch.equal(cpu.packed_linear(x, packed, n, scale, b), quant.integer_linear(x, codes, scale, b))


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_and_outputs(isa: str, dtype: torch.dtype) -> None:
    x, codes, packed, scale, bias = _operands(6, 21, 300, False, seed=3, dtype=dtype)
    with cpu.use_isa(isa), one_thread():
        for out_dtype in (dtype, torch.float32, torch.float64):
            for b in (bias.to(dtype), None):
                y = cpu.packed_linear(x, packed, 21, scale, b, out_dtype)
                assert y.dtype == out_dtype
                assert torch.equal(y, quant.integer_linear(x, codes, scale, b, out_dtype))
        one = x[:1]
        assert torch.equal(cpu.packed_linear(one, packed, 21, scale), quant.integer_linear(one, codes, scale))


@pytest.mark.parametrize("isa", _isas())
def test_invalid_code_three_counts_as_the_reference_unpacks_it(isa: str) -> None:
    x, _, packed, scale, _ = _operands(3, 16, 200, False, seed=4)
    generator = torch.Generator().manual_seed(5)
    packed = packed | ((torch.rand(packed.shape, generator=generator) < 0.2).to(torch.uint8) * 0xFF)  # 3 in all 4
    codes = packing.unpack_ternary_rows(packed, 16)
    assert int(codes.max()) == 2
    with cpu.use_isa(isa), one_thread():
        for rows in (x, x[:1]):
            assert torch.equal(cpu.packed_linear(rows, packed, 16, scale), quant.integer_linear(rows, codes, scale))


@pytest.mark.parametrize("isa", _isas())
def test_two_threads_compute_the_same_bits(isa: str) -> None:
    # large enough that the work is split: 256 byte rows x 1040 inputs per token
    x, codes, packed, scale, bias = _operands(33, 1024, 1040, True, seed=6)
    previous = torch.get_num_threads()
    try:
        with cpu.use_isa(isa):
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for rows in (x, x[:1]):
                    expected = quant.integer_linear(rows, codes, scale, bias)
                    assert torch.equal(cpu.packed_linear(rows, packed, 1024, scale, bias), expected)
    finally:
        torch.set_num_threads(previous)


def test_the_thread_pool_is_torchs() -> None:
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert cpu.parallel_threads() == threads
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("isa", _isas())
def test_group_and_prequantized_products_equal_each_layer(isa: str) -> None:
    x, codes_a, packed_a, scale_a, _ = _operands(4, 24, 130, False, seed=7)
    _, codes_b, packed_b, scale_b, _ = _operands(4, 10, 130, True, seed=8)
    _, codes_c, packed_c, scale_c, bias = _operands(4, 7, 130, False, seed=9)
    expected = [quant.integer_linear(x, c, s) for c, s in ((codes_a, scale_a), (codes_b, scale_b), (codes_c, scale_c))]
    with cpu.use_isa(isa), one_thread():
        for rows in (x, x[:1]):
            got = cpu.packed_linear_group(
                rows, [packed_a, packed_b, packed_c], [24, 10, 7], [scale_a, scale_b, scale_c]
            )
            for y, e in zip(got, expected, strict=True):
                assert torch.equal(y, e[: len(rows)])
        xq, act_scale = quant.quantize_activations(x)
        got = cpu.packed_quantized(
            xq, act_scale, [packed_a, packed_b], [24, 10], [scale_a, scale_b], None, torch.float32
        )
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        (with_bias,) = cpu.packed_quantized(xq, act_scale, [packed_c], [7], [scale_c], bias, torch.bfloat16)
        assert torch.equal(with_bias, quant.integer_linear(x, codes_c, scale_c, bias, torch.bfloat16))


@pytest.mark.parametrize("isa", _isas())
def test_activation_quantization_is_the_reference(isa: str) -> None:
    generator = torch.Generator().manual_seed(10)
    # bf16 values: exact rounding ties are common; one tiny row (the 1e-5 floor), a zero row, an odd width
    x = (torch.randn(2, 9, 1003, generator=generator) * 4).to(torch.bfloat16)
    x[0, 1] *= 1e-7
    x[1, 2] = 0
    with cpu.use_isa(isa):
        for rows in (x, x.float(), x.to(torch.float16), x[..., 1:]):  # the last one is not contiguous
            xq, scale = cpu.quantize_activations(rows)
            ref_q, ref_scale = quant.quantize_activations(rows)
            assert torch.equal(xq, ref_q) and torch.equal(scale, ref_scale)
    # ties: s_x is exactly 1 for amax 127, so x.5 values round half to even
    ties = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]])
    assert float(quant.activation_scale(torch.tensor([127.0]))) == 1.0
    assert torch.equal(cpu.quantize_activations(ties)[0], quant.quantize_activations(ties)[0])


def test_leading_dimensions_and_non_contiguous_inputs() -> None:
    x, codes, packed, scale, bias = _operands(12, 20, 40, False, seed=11)
    x3 = x.reshape(3, 4, 40)
    with one_thread():
        y = cpu.packed_linear(x3, packed, 20, scale, bias)
        assert y.shape == (3, 4, 20)
        assert torch.equal(y, quant.integer_linear(x3, codes, scale, bias))
        strided = x3.transpose(0, 1)
        assert torch.equal(cpu.packed_linear(strided, packed, 20, scale), quant.integer_linear(strided, codes, scale))
        for empty in (x[:0], x3[:, :0]):  # no tokens
            assert torch.equal(cpu.packed_linear(empty, packed, 20, scale), quant.integer_linear(empty, codes, scale))


def test_bad_operands_are_clear_errors() -> None:
    x, _, packed, scale, _ = _operands(2, 8, 16, False, seed=12)
    with pytest.raises(RuntimeError, match=r"packed weight 0 must be a contiguous CPU uint8 \[2, 16\]"):
        cpu.packed_linear(x, packed[:, :8], 8, scale)
    with pytest.raises(RuntimeError, match="scale 0 must be a CPU tensor of 1 or 8 values"):
        cpu.packed_linear(x, packed, 8, torch.ones(3))
    with pytest.raises(RuntimeError, match=r"bias must be a CPU \[8\] tensor"):
        cpu.packed_linear(x, packed, 8, scale, torch.ones(4))
    with pytest.raises(RuntimeError, match="x must be floating"):
        cpu.packed_linear(x.to(torch.int32), packed, 8, scale)
    with pytest.raises(ValueError, match="unknown instruction set 'sse9'"):
        cpu.set_isa("sse9")


def test_isa_choice_is_clamped_and_restored() -> None:
    best = cpu.isa()
    assert best == cpu.supported_isas()[-1]
    with cpu.use_isa("scalar") as chosen:
        assert chosen == "scalar" and cpu.isa() == "scalar"
    assert cpu.isa() == best
    assert cpu.set_isa(cpu.ISAS[-1]) == best  # asking for more than the CPU has gives the best it has


def test_no_compiler_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(cpu, "_loaded", None)
    monkeypatch.setattr(cpu, "_compiler", lambda: None)
    monkeypatch.setenv(cpu.CACHE_ENV, str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not cpu.available()
        assert not cpu.available()
    assert len(caught) == 1
    assert "no C++ compiler found" in str(caught[0].message)


def test_the_library_is_cached_by_content(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = cpu.build()
    assert built.is_file() and built.parent == cpu.cache_dir()
    assert cpu.build() == built  # found again, not rebuilt
    monkeypatch.setenv(cpu.CACHE_ENV, str(tmp_path))
    assert cpu.cache_dir() == tmp_path
