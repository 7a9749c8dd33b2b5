"""The kernels on a CUDA GPU (run on an H100): bit-identity on the 2B4T shapes, no host synchronisation, CUDA
graph capture and torch.compile (inductor). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from bittern import kernels, quant
from bittern.nn import BitLinear

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# (tokens M, outputs N, inputs K): the 2B4T projections at training batch sizes, plus ragged ones
SHAPES = [(4096, 6912, 2560), (4096, 2560, 6912), (1000, 1000, 1000), (7, 45, 70)]


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(*shape, generator=generator, device="cuda") * scale).to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_quantizers_and_forward_are_bit_identical(shape: tuple[int, int, int]) -> None:
    from bittern.kernels import matmul, quantizers

    m, n, k = shape
    for dtype in (torch.bfloat16, torch.float32):
        x = _randn(m, k, seed=m + k, dtype=dtype, scale=3.0)
        xq, act_scale = quantizers.quantize_activations(x)
        ref_xq, ref_act_scale = quant.quantize_activations(x)
        assert torch.equal(xq, ref_xq) and torch.equal(act_scale, ref_act_scale), dtype
        for per_channel in (False, True):
            weight = _randn(n, k, seed=n, dtype=dtype, scale=0.02)
            codes, scale = quantizers.ternarize(weight, per_channel)
            ref_codes, ref_scale = quant.ternarize(weight, per_channel)
            assert torch.equal(scale, ref_scale) and torch.equal(codes, ref_codes), (dtype, per_channel)
            bias = _randn(n, seed=1)
            y = matmul.int8_ternary_linear(xq, act_scale, codes, scale, bias, torch.float32)
            assert torch.equal(y, quant.linear_from_integers(xq, act_scale, codes, scale, bias)), (dtype, per_channel)


@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_the_reference_in_bf16(shape: tuple[int, int, int]) -> None:
    m, n, k = shape
    x = _randn(m, k, seed=3, scale=2.0).requires_grad_()
    w = _randn(n, k, seed=4, scale=0.02).requires_grad_()
    grad_y = _randn(m, n, seed=5, dtype=torch.bfloat16)
    grads = {}
    for backend in ("reference", "triton"):
        with kernels.use_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16):
            y = kernels.ternary_linear(x, w)
        y.backward(grad_y)
        grads[backend] = (y.detach().float(), x.grad.clone(), w.grad.clone())
        x.grad = w.grad = None
    for name, got, ref in zip(("y", "grad_x", "grad_w"), grads["triton"], grads["reference"], strict=True):
        rel = ((got - ref).norm() / ref.norm()).item()
        assert rel <= (0 if name == "y" else 1e-2), f"{name}: relative difference {rel:.2e}"


def _layer_and_input(seed: int = 0) -> tuple[BitLinear, torch.Tensor]:
    torch.manual_seed(seed)
    return BitLinear(2560, 6912, bias=False).cuda(), torch.randn(4, 512, 2560, device="cuda", requires_grad=True)


def _step(layer: BitLinear, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    y.float().square().mean().backward()
    return y


def test_no_host_synchronisation() -> None:
    layer, x = _layer_and_input()
    with kernels.use_backend("triton"):
        _step(layer, x)  # first call autotunes (that synchronises); the steady state must not
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _step(layer, x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_cuda_graph_capture_replays_forward_and_backward() -> None:
    layer, x = _layer_and_input()
    static_x = x.detach().clone().requires_grad_()
    with kernels.use_backend("triton"):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                layer.weight.grad = static_x.grad = None
                _step(layer, static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        layer.weight.grad = static_x.grad = None
        with torch.cuda.graph(graph):
            static_y = _step(layer, static_x)
        fresh = torch.randn_like(x)
        with torch.no_grad():
            static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        eager_x = fresh.clone().requires_grad_()
        saved_grad = layer.weight.grad.clone()
        layer.weight.grad = None
        eager_y = _step(layer, eager_x)
    assert torch.equal(static_y, eager_y)
    assert torch.allclose(static_x.grad, eager_x.grad) and torch.allclose(saved_grad, layer.weight.grad)


def test_inductor_compiles_the_layer_whole() -> None:
    layer, x = _layer_and_input()

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return layer(inputs)

    with kernels.use_backend("triton"):
        eager = forward(x)
        eager.float().square().mean().backward()
        eager_grad = layer.weight.grad.clone()
        layer.weight.grad = None
        compiled = torch.compile(forward, fullgraph=True)(x)  # fullgraph: a graph break raises
        compiled.float().square().mean().backward()
    assert torch.equal(compiled, eager)
    assert torch.allclose(layer.weight.grad, eager_grad, rtol=1e-3, atol=1e-6)
