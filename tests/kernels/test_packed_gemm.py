"""The tensor-core product over packed weights for 4-256 tokens (:mod:`bittern.kernels.packed_gemm`) against
:mod:`bittern.quant`: under the interpreter on CPU (codes expanded by shifts), on a GPU with the four-bytes-a-word
expansion. Shapes are ragged: tokens, byte rows and K past every tile, N not a multiple of 4."""

from __future__ import annotations

import pytest
import torch

from bittern import packing, quant

pytest.importorskip("triton")
from bittern.kernels import packed, packed_gemm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _operands(m: int, n: int, k: int, per_channel: bool, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator) * 2
    codes, scale = quant.ternarize(torch.randn(n, k, generator=generator) * 0.02, per_channel)
    bias = torch.randn(n, generator=generator)
    xq, act_scale = quant.quantize_activations(x)
    return [t.to(DEVICE) for t in (x, xq, act_scale, codes, packing.pack_ternary_rows(codes), scale, bias)]


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape", [(33, 10, 40), (70, 150, 100), (64, 64, 64), (40, 3, 7), (100, 37, 33), (5, 21, 72)])
def test_product_is_bit_identical_to_the_reference(shape: tuple[int, int, int], per_channel: bool) -> None:
    m, n, k = shape
    x, xq, act_scale, codes, weight, scale, bias = _operands(m, n, k, per_channel, seed=sum(shape))
    for b in (bias, None):
        (y,) = packed_gemm.packed_gemm(xq, act_scale, [weight], [n], [scale], b, torch.float32)
        assert torch.equal(y, quant.integer_linear(x, codes, scale, b))
    (y16,) = packed_gemm.packed_gemm(xq, act_scale, [weight], [n], [scale], None, torch.bfloat16)
    assert y16.dtype == torch.bfloat16
    assert torch.equal(y16, quant.integer_linear(x, codes, scale, None, torch.bfloat16))


def test_every_field_lands_on_its_own_output_row() -> None:
    # output rows r, r+R, r+2R, r+3R share byte row r: give each field a different code so a swapped field shows
    n, k, rows = 64, 48, 16
    codes = torch.zeros(n, k, dtype=torch.int8)
    for q, value in enumerate((-1, 0, 1, -1)):
        codes[q * rows : (q + 1) * rows] = value
    codes[3 * rows :, ::2] = 1  # the fourth field differs from the first
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(0))
    xq, act_scale = quant.quantize_activations(x)
    one = torch.ones(1)
    args = [t.to(DEVICE) for t in (xq, act_scale, packing.pack_ternary_rows(codes), one)]
    (y,) = packed_gemm.packed_gemm(args[0], args[1], [args[2]], [n], [args[3]], None, torch.float32)
    assert torch.equal(y.cpu(), quant.integer_linear(x, codes, one))


def test_extreme_values_accumulate_exactly() -> None:
    # every activation quantizes to +-127 and every code is -1: sums of 127 * K need an exact int32 accumulator
    k, n = 1000, 8
    x = torch.ones(40, k)
    x[1::2] = -1
    xq, act_scale = quant.quantize_activations(x)
    weight = packing.pack_ternary_rows(torch.full((n, k), -1, dtype=torch.int8))
    one = torch.ones(1)
    (y,) = packed_gemm.packed_gemm(xq.to(DEVICE), act_scale.to(DEVICE), [weight.to(DEVICE)], [n],
                                       [one.to(DEVICE)], None, torch.float32)  # fmt: skip
    expected = torch.tensor([[-1.0 * k], [1.0 * k]]).repeat(20, n)
    assert torch.equal(y.cpu(), expected)


def test_leading_dimensions_are_kept() -> None:
    x, xq, act_scale, codes, weight, scale, _ = _operands(2 * 24, 12, 20, False, seed=4)
    (y,) = packed_gemm.packed_gemm(xq.view(2, 24, 20), act_scale.view(2, 24, 1), [weight], [12], [scale], None,
                                       torch.float32)  # fmt: skip
    assert y.shape == (2, 24, 12)
    assert torch.equal(y.reshape(48, 12), quant.integer_linear(x, codes, scale))


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("widths", [(10, 6, 6), (37, 9), (130, 70, 3)])
def test_layers_of_one_input_in_one_launch_equal_each_layer(widths: tuple[int, ...], per_channel: bool) -> None:
    # q/k/v and gate/up: byte-row blocks of two or three layers in one grid, each layer with its own N, R and scale
    generator = torch.Generator().manual_seed(len(widths) + sum(widths))
    x = torch.randn(45, 70, generator=generator) * 2
    xq, act_scale = quant.quantize_activations(x)
    layers = [quant.ternarize(torch.randn(n, 70, generator=generator) * 0.02, per_channel) for n in widths]
    ys = packed_gemm.packed_gemm(xq.to(DEVICE), act_scale.to(DEVICE),
                                     [packing.pack_ternary_rows(c).to(DEVICE) for c, _ in layers], list(widths),
                                     [s.to(DEVICE) for _, s in layers], None, torch.float32)  # fmt: skip
    assert [y.shape for y in ys] == [(45, n) for n in widths]
    for y, (codes, scale) in zip(ys, layers, strict=True):
        assert torch.equal(y.cpu(), quant.integer_linear(x, codes, scale))


def test_a_bias_only_with_a_single_layer() -> None:
    _, xq, act_scale, _, weight, scale, bias = _operands(40, 8, 16, False, seed=2)
    with pytest.raises(ValueError, match="single layer"):
        packed_gemm.packed_gemm(xq, act_scale, [weight, weight], [8, 8], [scale, scale], bias, torch.float32)


@pytest.mark.parametrize(("tokens", "path"), [(3, "decode"), (4, "gemm"), (256, "gemm"), (257, "unpack")])
def test_token_count_picks_the_product(tokens: int, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for module, name, label in ((packed, "decode_linear", "decode"), (packed_gemm, "packed_gemm", "gemm"),
                                (packed, "unpack", "unpack")):  # fmt: skip
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _l=label, **kw: calls.append(_l) or _f(*a, **kw))
    x, _, _, codes, weight, scale, bias = _operands(tokens, 6, 8, False, seed=tokens)
    y = packed.packed_linear(x, weight, 6, scale, bias, torch.float32)
    assert calls == [path]
    assert torch.equal(y, quant.integer_linear(x, codes, scale, bias))


def test_tiles_wider_than_the_tokens_are_not_tried() -> None:
    import triton

    configs = [triton.Config({"BM": bm, "BC": 64, "BK": 256}) for bm in (64, 16, 128, 32)]
    kept = packed_gemm._fit_tokens(configs, {"M_BUCKET": 8})
    assert [c.kwargs["BM"] for c in kept] == [16]  # 8 tokens: the narrowest tile of 16
    assert [c.kwargs["BM"] for c in packed_gemm._fit_tokens(configs, {"M_BUCKET": 64})] == [64, 16, 32]
    assert packed_gemm._fit_tokens(configs, {"M_BUCKET": 256}) == configs
    assert packed_gemm._fit_tokens(configs[2:3], {"M_BUCKET": 8}) == configs[2:3]  # none fits: the first is kept
