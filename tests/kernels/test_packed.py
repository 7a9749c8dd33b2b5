"""The packed-weight inference kernels against :mod:`bittern.quant` (interpreter on CPU: small shapes with ragged
tails; N not a multiple of 4 exercises the padding slots of the Hugging Face layout)."""

from __future__ import annotations

import pytest
import torch

from bittern import kernels, packing, quant
from bittern.nn import TernaryLinear

pytest.importorskip("triton")
from bittern.kernels import packed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (tokens M, outputs N, inputs K)
SKINNY_SHAPES = [(1, 1, 1), (1, 10, 40), (3, 64, 100), (16, 37, 70), (7, 130, 33)]
PREFILL_SHAPES = [(17, 10, 40), (40, 50, 96), (65, 33, 17)]
# forced tile choices: one K tile per program, and reductions split over 2-4 programs (a split may get no tile)
SPLIT_CONFIGS = [{"BR": 16, "BK": 32, "SPLIT": 1}, {"BR": 16, "BK": 32, "SPLIT": 2}, {"BR": 16, "BK": 32, "SPLIT": 4}]


def _operands(m: int, n: int, k: int, per_channel: bool, seed: int, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=generator) * 2).to(dtype)
    codes, scale = quant.ternarize(torch.randn(n, k, generator=generator) * 0.02, per_channel)
    bias = torch.randn(n, generator=generator)
    weight = packing.pack_ternary_rows(codes)
    return [t.to(DEVICE) for t in (x, codes, weight, scale, bias)]


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape", SKINNY_SHAPES)
def test_decode_kernel_is_bit_identical_to_the_reference(shape: tuple[int, int, int], per_channel: bool) -> None:
    m, n, k = shape
    x, codes, weight, scale, bias = _operands(m, n, k, per_channel, seed=sum(shape))
    for b in (bias, None):
        y = packed.skinny_linear(x, weight, n, scale, b, torch.float32)
        assert torch.equal(y, quant.integer_linear(x, codes, scale, b))


@pytest.mark.parametrize("config", SPLIT_CONFIGS)
def test_split_reduction_is_exact_and_leaves_the_workspace_clean(config: dict[str, int]) -> None:
    m, n, k = 5, 21, 150  # 5 K tiles of 32, split 1, 2 or 4 ways
    x, codes, weight, scale, bias = _operands(m, n, k, False, seed=11)
    reference = quant.integer_linear(x, codes, scale, bias)
    for _ in range(2):  # a second launch starts from the workspace the first one left
        y = packed.skinny_linear(x, weight, n, scale, bias, torch.float32, config=config)
        assert torch.equal(y, reference)
        workspace, counters = packed._split_workspace(x.device, n)
        assert not workspace.any() and not counters.any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_kernel_in_half_precision(dtype: torch.dtype) -> None:
    x, codes, weight, scale, bias = _operands(4, 24, 64, False, seed=5, dtype=dtype)
    y = packed.skinny_linear(x, weight, 24, scale, bias.to(dtype), dtype)
    assert y.dtype == dtype
    assert torch.equal(y, quant.integer_linear(x, codes, scale, bias.to(dtype), dtype))


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape", PREFILL_SHAPES)
def test_prefill_kernel_is_bit_identical_to_the_reference(shape: tuple[int, int, int], per_channel: bool) -> None:
    m, n, k = shape
    x, codes, weight, scale, bias = _operands(m, n, k, per_channel, seed=sum(shape))
    for b in (bias, None):
        y = packed.prefill_linear(x, weight, n, scale, b, torch.float32)
        assert torch.equal(y, quant.integer_linear(x, codes, scale, b))
    y16 = packed.prefill_linear(x.to(torch.bfloat16), weight, n, scale, None, torch.bfloat16)
    assert torch.equal(y16, quant.integer_linear(x.to(torch.bfloat16), codes, scale, None, torch.bfloat16))


def test_extreme_values_accumulate_exactly() -> None:
    # every activation quantizes to +-127 and every code is -1: sums of 127 * K need an exact int32 accumulator
    k, n = 1000, 8
    x = torch.ones(2, k, device=DEVICE)
    x[1] = -1
    weight = packing.pack_ternary_rows(torch.full((n, k), -1, dtype=torch.int8)).to(DEVICE)
    one = torch.ones(1, device=DEVICE)
    expected = torch.tensor([[-1.0 * k], [1.0 * k]], device=DEVICE).expand(2, n)
    assert torch.equal(packed.skinny_linear(x, weight, n, one, None, torch.float32), expected)
    assert torch.equal(packed.prefill_linear(x.repeat(20, 1), weight, n, one, None, torch.float32)[:2], expected)


def test_dispatch_picks_decode_or_prefill_and_keeps_leading_dimensions() -> None:
    x, codes, weight, scale, bias = _operands(24, 20, 48, False, seed=2)
    with kernels.use_backend("triton"):
        for tokens in (x[:6].reshape(2, 3, 48), x.reshape(4, 6, 48)):
            y = kernels.packed_linear(tokens, weight, 20, scale, bias)
            assert y.shape == (*tokens.shape[:-1], 20)
            assert torch.equal(y, quant.integer_linear(tokens, codes, scale, bias))


def test_bad_operands_are_refused_with_the_reason() -> None:
    x, _, weight, scale, _ = _operands(2, 8, 16, False, seed=1)
    with pytest.raises(ValueError, match="byte rows"):
        packed.skinny_linear(x, weight, 12, scale, None, torch.float32)
    with pytest.raises(ValueError, match="features"):
        packed.skinny_linear(x[:, :8], weight, 8, scale, None, torch.float32)
    with pytest.raises(ValueError, match="at most 16 tokens"):
        packed.skinny_linear(x.repeat(9, 1), weight, 8, scale, None, torch.float32)


def test_ternary_linear_runs_on_the_packed_kernels_and_still_trains_what_is_below() -> None:
    generator = torch.Generator().manual_seed(4)
    layer = TernaryLinear.from_codes(
        torch.randint(-1, 2, (12, 40), generator=generator, dtype=torch.int8), torch.tensor([0.05]), torch.randn(12)
    ).to(DEVICE)
    x = torch.randn(3, 5, 40, generator=generator).to(DEVICE)
    with kernels.use_backend("reference"):
        reference = layer(x)
    with kernels.use_backend("triton"), torch.no_grad():
        assert torch.equal(layer(x), reference)
    x.requires_grad_()
    with kernels.use_backend("triton"):
        y = layer(x)  # a gradient is needed: the unpacked path with the straight-through backward
        y.sum().backward()
    assert torch.equal(y.detach(), reference)
    assert x.grad is not None and x.grad.shape == x.shape
