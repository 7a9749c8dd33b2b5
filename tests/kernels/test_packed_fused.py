"""The decode kernel with its prologue and epilogue fused in (:func:`bittern.kernels.packed.decode_fused`): gated
activation, RMSNorm, quantization, product and residual add against the same steps in PyTorch and
:mod:`bittern.quant` (interpreter on CPU: small shapes, ragged word counts, N not a multiple of 4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bittern import kernels, packing, quant

pytest.importorskip("triton")
from bittern.kernels import ops, packed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
# (tokens, K, widths of the layers): one layer, a pair, a triple; K = 100 is 25 words (16 + a masked tail of 16)
SHAPES = [(1, 100, (37,)), (3, 72, (20, 9)), (2, 36, (8, 12, 5))]


def _steps_in_pytorch(x, up, activation, gain, layers, bias, residual):  # type: ignore[no-untyped-def]
    """The modules' own formulas, each operation in ``x``'s dtype: what the fused kernel must reproduce."""
    h = x
    if activation == "relu2":
        h = torch.square(torch.relu(h)) * up
    elif activation == "silu":
        h = F.silu(h) * up
    if gain is not None:
        h32 = h.float()
        h = gain * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    ys = [quant.integer_linear(h, c, s, bias if i == 0 else None, x.dtype) for i, (c, s) in enumerate(layers)]
    if residual is not None:
        ys[0] = residual + ys[0]
    return ys


def _case(m: int, k: int, widths: tuple[int, ...], dtype: torch.dtype, gated: bool, seed: int):  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype).to(DEVICE)

    x, up = randn(m, k), (randn(m, k) if gated else None)
    gain = (torch.rand(k, generator=generator) + 0.5).to(dtype).to(DEVICE)
    layers = [quant.ternarize(torch.randn(n, k, generator=generator), m % 2 == 1) for n in widths]  # mixed
    layers = [(c.to(DEVICE), s.to(DEVICE)) for c, s in layers]
    single = len(widths) == 1
    bias = randn(widths[0]) if single else None
    residual = randn(m, widths[0]) if single else None
    return x, up, gain, layers, bias, residual


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", [None, "relu2", "silu"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_steps_match_pytorch(shape: tuple, activation: str | None, dtype: torch.dtype) -> None:
    m, k, widths = shape
    x, up, gain, layers, bias, residual = _case(m, k, widths, dtype, activation is not None, seed=m * k)
    weights = [packing.pack_ternary_rows(c) for c, _ in layers]
    for norm in (gain, None):
        got = packed.decode_fused(x, weights, list(widths), [s for _, s in layers], dtype, bias=bias, up=up,
                                  activation=activation, norm_weight=norm, norm_eps=EPS, residual=residual)  # fmt: skip
        want = _steps_in_pytorch(x, up, activation, norm, layers, bias, residual)
        for y, w in zip(got, want, strict=True):
            assert y.dtype == dtype and y.shape == w.shape
            if norm is None and activation != "silu":  # no order of additions, no exp: bit for bit
                assert torch.equal(y, w)
            else:  # the mean's order (and exp's last bit) may round one value the other way
                assert _relative(y, w) <= (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("config", [{"BR": 1, "num_warps": 1}, {"BR": 4, "num_warps": 2}, {"BR": 16}])
def test_fused_tiles_cover_every_row(config: dict[str, int]) -> None:
    x, up, _, layers, bias, residual = _case(3, 148, (21,), torch.float32, True, seed=3)  # 37 words
    scale, weight = layers[0][1], packing.pack_ternary_rows(layers[0][0])
    got = packed.decode_fused(x, [weight], [21], [scale], torch.float32, bias=bias, up=up, activation="relu2",
                              residual=residual, config=config)[0]  # fmt: skip
    assert torch.equal(got, _steps_in_pytorch(x, up, "relu2", None, layers, bias, residual)[0])


def test_prologue_alone_equals_the_plain_decode_kernel() -> None:
    # nothing fused: decode_fused is decode_linear (and decode_group) bit for bit
    x, _, _, layers, bias, _ = _case(2, 64, (24,), torch.float32, False, seed=4)
    scale, weight = layers[0][1], packing.pack_ternary_rows(layers[0][0])
    got = packed.decode_fused(x, [weight], [24], [scale], torch.float32, bias=bias)[0]
    assert torch.equal(got, packed.decode_linear(x, weight, 24, scale, bias, torch.float32))


def test_bad_arguments_are_refused_by_name() -> None:
    x, up, gain, layers, _, _ = _case(1, 40, (8, 8), torch.float32, True, seed=5)
    weights, scales = [packing.pack_ternary_rows(c) for c, _ in layers], [s for _, s in layers]
    one = (weights[:1], [8], scales[:1], torch.float32)
    with pytest.raises(ValueError, match="only for a single layer"):
        packed.decode_fused(x, weights, [8, 8], scales, torch.float32, residual=torch.zeros(1, 8, device=DEVICE))
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        packed.decode_fused(x, *one, up=up, activation="gelu")
    with pytest.raises(ValueError, match="needs 'up'"):
        packed.decode_fused(x, *one, activation="relu2")
    with pytest.raises(ValueError, match=r"up .* does not match"):
        packed.decode_fused(x, *one, up=up[:, :20], activation="relu2")
    with pytest.raises(ValueError, match="norm_weight"):
        packed.decode_fused(x, *one, norm_weight=gain[:20])
    with pytest.raises(ValueError, match="residual"):
        packed.decode_fused(x, *one, residual=torch.zeros(1, 9, device=DEVICE))
    with pytest.raises(ValueError, match="one floating dtype"):
        packed.decode_fused(x, weights[:1], [8], scales[:1], torch.bfloat16, norm_weight=gain)
    with pytest.raises(ValueError, match="float input"):
        packed.decode_fused(x.to(torch.int8), *one)
    with pytest.raises(ValueError, match="at most 3 tokens"):
        packed.decode_fused(torch.zeros(4, 40, device=DEVICE), *one, norm_weight=gain)


@pytest.mark.parametrize("activation", [None, "relu2", "silu"])
def test_dispatch_agrees_on_both_backends_and_beyond_decode_shapes(activation: str | None) -> None:
    # kernels.fused_projection: one kernel where it applies; the same steps in PyTorch on the reference backend,
    # and on the Triton backend for more tokens than the decode kernel takes
    for tokens in (2, 5):
        x, up, gain, layers, bias, residual = _case(tokens, 48, (16,), torch.float32, activation is not None, seed=6)
        args = ([packing.pack_ternary_rows(layers[0][0])], [16], [layers[0][1]], bias, up, activation, gain, EPS,
                residual)  # fmt: skip
        want = _steps_in_pytorch(x, up, activation, gain, layers, bias, residual)[0]
        with kernels.use_backend("reference"):
            reference = kernels.fused_projection(x, *args)[0]
        with kernels.use_backend("triton"):
            assert kernels.fused_projection_applies(x) == (tokens <= kernels.DECODE_MAX_TOKENS)
            triton = kernels.fused_projection(x, *args)[0]
        assert _relative(reference, want) <= 1e-5 and _relative(triton, want) <= 1e-5


def test_fused_op_passes_opcheck() -> None:
    x, up, gain, layers, bias, residual = _case(1, 32, (12,), torch.float32, True, seed=7)
    args = (x, [packing.pack_ternary_rows(layers[0][0])], [12], [layers[0][1]], bias, up, "relu2", gain, EPS,
            residual)  # fmt: skip
    torch.library.opcheck(ops.decode_fused.op, args)
