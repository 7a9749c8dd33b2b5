"""The packed-weight inference kernels against :mod:`bittern.quant` (interpreter on CPU: small shapes with ragged
tails; N not a multiple of 4 exercises the padding slots of the Hugging Face layout)."""

from __future__ import annotations

import pytest
import torch

from bittern import kernels, packing, quant
from bittern.nn import TernaryLinear

pytest.importorskip("triton")
from bittern.kernels import interpreter, packed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (tokens M, outputs N, inputs K); the decode kernel needs K % 4 == 0
DECODE_SHAPES = [(1, 1, 4), (1, 10, 40), (3, 64, 100), (3, 37, 72), (2, 130, 36)]
# up to 256 tokens the tensor-core product of packed_gemm (K = 200: several steps of the interpreter's tile), beyond
# unpack + GEMM
PREFILL_SHAPES = [(17, 10, 40), (40, 50, 96), (65, 33, 17), (2, 9, 30), (33, 150, 70), (9, 70, 200), (32, 5, 12),
                  (257, 21, 40)]  # fmt: skip
# forced tile choices: wide and narrow byte-row blocks, one to four warps
DECODE_CONFIGS = [{"BR": 2}, {"BR": 4, "num_warps": 2}, {"BR": 16}, {"BR": 1, "num_warps": 1}]


def _operands(m: int, n: int, k: int, per_channel: bool, seed: int, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=generator) * 2).to(dtype)
    codes, scale = quant.ternarize(torch.randn(n, k, generator=generator) * 0.02, per_channel)
    bias = torch.randn(n, generator=generator)
    weight = packing.pack_ternary_rows(codes)
    return [t.to(DEVICE) for t in (x, codes, weight, scale, bias)]


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_decode_kernel_is_bit_identical_to_the_reference(shape: tuple[int, int, int], per_channel: bool) -> None:
    m, n, k = shape
    x, codes, weight, scale, bias = _operands(m, n, k, per_channel, seed=sum(shape))
    for b in (bias, None):
        y = packed.decode_linear(x, weight, n, scale, b, torch.float32)
        assert torch.equal(y, quant.integer_linear(x, codes, scale, b))


@pytest.mark.parametrize("config", DECODE_CONFIGS)
@pytest.mark.parametrize("tokens", [1, 3])
def test_decode_tiles_cover_every_row_and_column(config: dict[str, int], tokens: int) -> None:
    x, codes, weight, scale, bias = _operands(tokens, 21, 148, False, seed=11)  # 37 words, padded to 64 and masked
    y = packed.decode_linear(x, weight, 21, scale, bias, torch.float32, config=config)
    assert torch.equal(y, quant.integer_linear(x, codes, scale, bias))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_kernel_in_half_precision(dtype: torch.dtype) -> None:
    x, codes, weight, scale, bias = _operands(3, 24, 64, False, seed=5, dtype=dtype)
    y = packed.decode_linear(x, weight, 24, scale, bias.to(dtype), dtype)
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
    assert torch.equal(packed.decode_linear(x, weight, n, one, None, torch.float32), expected)
    assert torch.equal(packed.prefill_linear(x.repeat(20, 1), weight, n, one, None, torch.float32)[:2], expected)


def test_unpack_kernel_matches_the_layout() -> None:
    # 150 outputs: 38 byte rows, so the last block of 16 has rows past R whose n = r + qR is still < N. K % 4 == 0
    # takes the word-wise kernel (300, 68, 260: a partial block of 64 words), the others the byte-wise one
    for n, k in ((1, 1), (10, 33), (37, 300), (150, 70), (150, 68), (45, 260), (3, 4)):
        codes = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(n))
        assert torch.equal(packed.unpack(packing.pack_ternary_rows(codes).to(DEVICE), n).cpu(), codes)


def test_unpack_of_a_strided_or_misaligned_weight_matches_the_layout() -> None:
    codes = torch.randint(-1, 2, (90, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(4))
    weight = packing.pack_ternary_rows(codes).to(DEVICE)  # [23, 64]
    wide = torch.zeros((23, 80), dtype=torch.uint8, device=DEVICE)
    wide[:, :64] = weight  # rows 80 bytes apart: words, with a row stride of 20 words
    assert torch.equal(packed.unpack(wide[:, :64], 90).cpu(), codes)
    shifted = torch.zeros((23 * 64 + 1,), dtype=torch.uint8, device=DEVICE)
    shifted[1:] = weight.reshape(-1)
    assert torch.equal(packed.unpack(shifted[1:].view(23, 64), 90).cpu(), codes)  # 1 byte off: byte by byte


def test_unpack_codes_on_either_backend_equals_the_layout() -> None:
    codes = torch.randint(-1, 2, (150, 70), dtype=torch.int8, generator=torch.Generator().manual_seed(3))
    weight = packing.pack_ternary_rows(codes).to(DEVICE)
    for name in ("reference", "triton"):
        with kernels.use_backend(name):
            assert torch.equal(kernels.unpack_codes(weight, 150).cpu(), codes)


def test_dispatch_picks_decode_or_prefill_and_keeps_leading_dimensions() -> None:
    x, codes, weight, scale, bias = _operands(24, 20, 48, False, seed=2)
    with kernels.use_backend("triton"):
        for tokens in (x[:4].reshape(2, 2, 48), x.reshape(4, 6, 48), x[:3, :45]):
            if tokens.shape[-1] == 45:  # K % 4 != 0: the prefill path also serves a few tokens
                codes45 = codes[:, :45].contiguous()
                weight = packing.pack_ternary_rows(codes45).to(DEVICE)
                assert torch.equal(kernels.packed_linear(tokens, weight, 20, scale, bias),
                                   quant.integer_linear(tokens, codes45, scale, bias))  # fmt: skip
                continue
            y = kernels.packed_linear(tokens, weight, 20, scale, bias)
            assert y.shape == (*tokens.shape[:-1], 20)
            assert torch.equal(y, quant.integer_linear(tokens, codes, scale, bias))


def test_bad_operands_are_refused_with_the_reason() -> None:
    x, _, weight, scale, _ = _operands(2, 8, 16, False, seed=1)
    with pytest.raises(ValueError, match="byte rows"):
        packed.decode_linear(x, weight, 12, scale, None, torch.float32)
    with pytest.raises(ValueError, match="features"):
        packed.decode_linear(x[:, :8], weight, 8, scale, None, torch.float32)
    with pytest.raises(ValueError, match="at most 3 tokens"):
        packed.decode_linear(x.repeat(9, 1), weight, 8, scale, None, torch.float32)
    with pytest.raises(ValueError, match="K = 0"):
        packed.prefill_linear(x[:, :0].repeat(20, 1), weight[:, :0], 8, scale, None, torch.float32)


def test_packed_linear_op_passes_opcheck() -> None:
    import bittern.kernels.ops  # noqa: F401  (registers torch.ops.bittern)

    x, _, weight, scale, bias = _operands(3, 12, 32, False, seed=9)
    torch.library.opcheck(torch.ops.bittern.packed_linear.default, (x, weight, 12, scale, bias, torch.float32))


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


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("widths", [(10, 6, 6), (37, 9)])
def test_grouped_decode_equals_each_layer(widths: tuple[int, ...], per_channel: bool) -> None:
    generator = torch.Generator().manual_seed(len(widths))
    x = (torch.randn(3, 36, generator=generator) * 2).to(DEVICE)
    layers = [quant.ternarize(torch.randn(n, 36, generator=generator) * 0.02, per_channel) for n in widths]
    packed_weights = [packing.pack_ternary_rows(codes).to(DEVICE) for codes, _ in layers]
    scales = [scale.to(DEVICE) for _, scale in layers]
    for config in ({"BR": 2}, {"BR": 4, "num_warps": 2}):
        ys = packed.decode_group(x, packed_weights, list(widths), scales, torch.float32, config=config)
        for y, (codes, scale) in zip(ys, layers, strict=True):
            assert torch.equal(y, quant.integer_linear(x, codes.to(DEVICE), scale.to(DEVICE)))


@pytest.mark.parametrize("tokens", [5, 40, 260])  # packed_gemm; beyond 256, the unpack passes and one int8 GEMM
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("widths", [(10, 6, 6), (37, 9), (130, 70)])
def test_grouped_prefill_equals_each_layer(widths: tuple[int, ...], per_channel: bool, tokens: int) -> None:
    # K = 70: not a multiple of 4 nor of the reduction tile; 130 and 70 outputs span several byte-row blocks
    generator = torch.Generator().manual_seed(tokens + len(widths))
    x = (torch.randn(tokens, 70, generator=generator) * 2).to(DEVICE)
    layers = [quant.ternarize(torch.randn(n, 70, generator=generator) * 0.02, per_channel) for n in widths]
    packed_weights = [packing.pack_ternary_rows(codes).to(DEVICE) for codes, _ in layers]
    scales = [scale.to(DEVICE) for _, scale in layers]
    ys = packed.prefill_group(x, packed_weights, list(widths), scales, torch.float32)
    assert len(ys) == len(widths)
    for y, (codes, scale) in zip(ys, layers, strict=True):
        assert torch.equal(y, quant.integer_linear(x, codes.to(DEVICE), scale.to(DEVICE)))


def test_grouped_prefill_refuses_mixed_scales() -> None:
    x, _, weight, scale, _ = _operands(8, 8, 16, False, seed=3)
    with pytest.raises(ValueError, match="per tensor, or every layer's per row"):
        packed.prefill_group(x, [weight, weight], [8, 8], [scale, scale.expand(8).contiguous()], torch.float32)
    with pytest.raises(ValueError, match="2 or 3 layers"):
        packed.prefill_group(x, [weight], [8], [scale], torch.float32)


@pytest.mark.parametrize("tokens", [2, 9])
def test_project_groups_packed_layers_and_matches_each_call(tokens: int) -> None:
    from bittern.nn import project

    generator = torch.Generator().manual_seed(7)
    layers = [
        TernaryLinear.from_codes(
            torch.randint(-1, 2, (n, 32), generator=generator, dtype=torch.int8), torch.rand(1)
        ).to(DEVICE)
        for n in (16, 8, 8)
    ]
    x = torch.randn(tokens, 32, generator=generator).to(DEVICE)  # 2: the decode kernel; 9: the prefill product
    with kernels.use_backend("triton"), torch.no_grad():
        grouped = project(x, layers)
        single = [layer(x) for layer in layers]
    assert all(torch.equal(a, b) for a, b in zip(grouped, single, strict=True))
    import bittern.kernels.ops  # noqa: F401  (registers torch.ops.bittern)

    args = (x, [la.packed_weight for la in layers], [16, 8, 8], [la.weight_scale for la in layers], torch.float32)
    torch.library.opcheck(torch.ops.bittern.packed_linear_group.default, args)


def test_static_weights_leaves_results_bit_identical() -> None:
    # on an H100 this runs the decode kernels with programmatic dependent launch, one chained after another
    x, codes, weight, scale, bias = _operands(2, 45, 148, False, seed=3)
    others = [quant.ternarize(torch.randn(n, 148) * 0.02) for n in (30, 30)]
    packed_others = [packing.pack_ternary_rows(c).to(DEVICE) for c, _ in others]
    with packed.static_weights():
        y = packed.decode_linear(x, weight, 45, scale, bias, torch.float32)
        ys = packed.decode_group(x, packed_others, [30, 30], [s.to(DEVICE) for _, s in others], torch.float32)
        again = packed.decode_linear(x, weight, 45, scale, bias, torch.float32)
    assert torch.equal(y, quant.integer_linear(x, codes, scale, bias)) and torch.equal(again, y)
    for y_i, (c, s) in zip(ys, others, strict=True):
        assert torch.equal(y_i, quant.integer_linear(x, c.to(DEVICE), s.to(DEVICE)))


def test_static_weights_asks_for_dependent_launch_only_where_it_exists() -> None:
    device = torch.device(DEVICE)
    expected = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] >= 9 and not interpreter.active()
    assert not packed._decode_flags(64, False, device)["USE_GDC"]
    with pytest.raises(RuntimeError, match="inside"), packed.static_weights():
        assert packed._decode_flags(64, False, device)["USE_GDC"] == expected
        with packed.static_weights(False):
            assert not packed._decode_flags(64, False, device)["USE_GDC"]
        assert packed._decode_flags(64, False, device)["USE_GDC"] == expected
        raise RuntimeError("inside")
    assert not packed._decode_flags(64, False, device)["USE_GDC"]


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 9])  # the decode kernel; the tensor-core product between dependent launches
def test_dependent_launches_replay_from_a_cuda_graph(tokens: int) -> None:
    # a chain of products, each reading the output of the one before, and beside each a second product of a fixed
    # input: kernels under dependent launch and kernels without must still wait for what they read
    generator = torch.Generator().manual_seed(4)
    layers = [quant.ternarize(torch.randn(256, 256, generator=generator) * 0.02) for _ in range(6)]
    weights = [(packing.pack_ternary_rows(c).to(DEVICE), s.to(DEVICE)) for c, s in layers]
    x = torch.randn(tokens, 256, generator=generator).to(DEVICE)
    xq, act_scale = quant.quantize_activations(torch.randn(12, 256, generator=generator).to(DEVICE))

    def chain(h: torch.Tensor) -> list[torch.Tensor]:
        beside = []
        for w, s in weights:
            h = packed.packed_linear(h, w, 256, s, None, torch.float32)
            beside += packed.quantized_products(xq, act_scale, [w], [256], [s], None, torch.float32)
        return [h, *beside]

    expected = chain(x)
    assert torch.equal(expected[0], _reference_chain(x, layers))
    with packed.static_weights():
        chain(x)  # compiles outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(x)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(out, expected, strict=True))


def _reference_chain(x: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    for codes, scale in layers:
        x = quant.integer_linear(x, codes.to(x.device), scale.to(x.device))
    return x


@pytest.mark.parametrize("shape", [(1, 37, 72), (3, 130, 36), (2, 8, 16)])
def test_decode_kernel_takes_a_prequantized_input(shape: tuple[int, int, int]) -> None:
    m, n, k = shape
    x, codes, weight, scale, bias = _operands(m, n, k, False, seed=m * n)
    xq, act_scale = quant.quantize_activations(x)
    y = packed.decode_linear(xq, weight, n, scale, bias, torch.float32, act_scale=act_scale)
    assert torch.equal(y, quant.integer_linear(x, codes, scale, bias))
    others = [quant.ternarize(torch.randn(w, k) * 0.02, True) for w in (9, n)]
    ys = packed.decode_group(xq, [packing.pack_ternary_rows(c).to(DEVICE) for c, _ in others], [9, n],
                             [s.to(DEVICE) for _, s in others], torch.float32, act_scale=act_scale)  # fmt: skip
    for y_i, (c, s) in zip(ys, others, strict=True):
        assert torch.equal(y_i, quant.integer_linear(x, c.to(DEVICE), s.to(DEVICE)))


def test_prequantized_extremes_accumulate_exactly() -> None:
    # codes +1 put the largest byte (2 << 6 = 128) in the top field, and an int8 input may hold -128: every field
    # of every byte row, its sum over K = 4096, must come back exact from the in-place masks
    k, n = 4096, 12
    xq = torch.full((3, k), 127, dtype=torch.int8)
    xq[1] = -128
    xq[2, ::2] = -128
    codes = torch.ones((n, k), dtype=torch.int8)
    codes[::3] = -1
    codes[1::3, ::5] = 0
    act_scale = torch.full((3, 1), 2.5)
    one = torch.ones(1)
    y = packed.decode_linear(xq.to(DEVICE), packing.pack_ternary_rows(codes).to(DEVICE), n, one.to(DEVICE), None,
                             torch.float32, act_scale=act_scale.to(DEVICE))  # fmt: skip
    expected = (xq.long() @ codes.long().T).float() / (one * act_scale)
    assert torch.equal(y.cpu(), expected)


def test_prequantized_tile_takes_two_rows_or_the_fewest_warps_that_hold_one() -> None:
    one_row = packed.PREQUANTIZED_WORDS_PER_THREAD * 32
    two_rows = packed.TWO_ROWS_WORDS_PER_THREAD * 32
    for main, tail in ((4, 1), (512, 128), (1024, 1), (1024, 128), (1024, 1024), (2048, 1), (4096, 1)):  # K 16 … 16384
        tile = packed._prequantized_tile(main, tail)
        words, warps = main + tail, tile["num_warps"]
        if 3 * words <= two_rows:  # two rows' weight words and the activation words, per thread of one warp
            assert tile == {"BR": 2, "num_warps": 1}
            continue
        assert tile["BR"] == 1
        assert 2 * words <= one_row * warps  # one row's weight words and the activation words, per thread
        assert warps == 1 or 2 * words > one_row * warps // 2  # and no fewer would do
    assert packed._prequantized_tile(512, 128) == {"BR": 2, "num_warps": 1}  # 2B4T's K = 2560
    assert packed._prequantized_tile(1024, 1) == {"BR": 2, "num_warps": 1}  # K = 4096
    assert packed._prequantized_tile(1024, 128) == {"BR": 1, "num_warps": 1}  # K = 4608
    assert packed._prequantized_tile(1024, 1024) == {"BR": 1, "num_warps": 1}  # K = 6912 (1728 words)
    assert packed._prequantized_tile(4096, 1) == {"BR": 1, "num_warps": 4}  # K = 16384


def test_prequantized_input_is_checked() -> None:
    x, _, weight, scale, _ = _operands(2, 8, 16, False, seed=1)
    xq, act_scale = quant.quantize_activations(x)
    with pytest.raises(ValueError, match="int8"):
        packed.decode_linear(x, weight, 8, scale, None, torch.float32, act_scale=act_scale)
    with pytest.raises(ValueError, match="scales"):
        packed.decode_linear(xq, weight, 8, scale, None, torch.float32, act_scale=act_scale[:1])


@pytest.mark.parametrize("tokens", [1, 16, 260])  # the decode kernel, packed_gemm, unpack + GEMM
def test_compiled_products_quantize_in_traced_code_and_agree(tokens: int) -> None:
    # under torch.compile the input is quantized by traced PyTorch (inductor fuses it into the producer of x) and
    # the kernels take it as int8: the results must not change by a bit
    generator = torch.Generator().manual_seed(8)
    layers = [quant.ternarize(torch.randn(n, 64, generator=generator) * 0.02) for n in (40, 12, 12)]
    weights = [packing.pack_ternary_rows(c).to(DEVICE) for c, _ in layers]
    scales = [s.to(DEVICE) for _, s in layers]
    x = torch.randn(tokens, 64, generator=generator).to(DEVICE)
    norm = torch.rand(64, generator=generator).to(DEVICE) + 0.5

    def step(h: torch.Tensor) -> list[torch.Tensor]:
        h = h * norm
        return [kernels.packed_linear(h, weights[0], 40, scales[0]),
                *kernels.packed_linear_group(h, weights[1:], [12, 12], scales[1:])]  # fmt: skip

    seen: list[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs):  # type: ignore[no-untyped-def]
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm if DEVICE == "cpu" else torch._inductor.compile(gm, example_inputs)

    with kernels.use_backend("triton"), torch.no_grad():
        expected = step(x)
        torch._dynamo.reset()
        got = torch.compile(step, backend=backend, fullgraph=True)(x)
    assert any("packed_quantized" in target for target in seen)
    for y, e, (c, s) in zip(got, expected, layers, strict=True):
        assert torch.equal(y, e)
        assert torch.equal(y, quant.integer_linear(x * norm, c.to(DEVICE), s.to(DEVICE)))
