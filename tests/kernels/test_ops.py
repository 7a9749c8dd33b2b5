"""The kernels as torch custom ops: the training linear and its straight-through gradients against the reference,
torch.library's own consistency checks, torch.compile without graph breaks, and BitLinear training on them."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, token_batch

from bittern import kernels, packing, quant
from bittern.convert import to_bitlinear, to_ternary
from bittern.nn import BitLinear

pytest.importorskip("triton")
from bittern.kernels import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _leaves(m: int, n: int, k: int, seed: int, bias: bool = True, lead: tuple[int, ...] = ()):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, m, k, generator=generator) * 2).to(DEVICE).requires_grad_()
    w = (torch.randn(n, k, generator=generator) * 0.05).to(DEVICE).requires_grad_()
    b = torch.randn(n, generator=generator).to(DEVICE).requires_grad_() if bias else None
    return x, w, b


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("backward_gemm", ops.BACKWARD_GEMMS)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_training_linear_matches_the_reference(
    per_channel: bool, bias: bool, backward_gemm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BITTERN_BACKWARD_GEMM", backward_gemm)
    x, w, b = _leaves(9, 45, 70, seed=1, bias=bias, lead=(2,))
    grad_y = torch.randn(2, 9, 45, generator=torch.Generator().manual_seed(2)).to(DEVICE)

    y = ops.ternary_linear(x, w, b, per_channel, torch.float32)
    y.backward(grad_y)
    got = [x.grad, w.grad] + ([b.grad] if bias else [])
    x.grad = w.grad = None
    if bias:
        b.grad = None
    expected_y = quant.ternary_linear_ste(x, w, b, per_channel)
    expected_y.backward(grad_y)
    expected = [x.grad, w.grad] + ([b.grad] if bias else [])

    assert torch.equal(y, expected_y)  # the forward is exact: bit for bit
    for name, g, e in zip(("x", "weight", "bias"), got, expected, strict=False):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        assert _relative(g, e) <= 1e-6, name


def test_unknown_backward_gemm_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITTERN_BACKWARD_GEMM", "cutlass")
    x, w, _ = _leaves(5, 16, 32, seed=3, bias=False)
    with pytest.raises(ValueError, match="BITTERN_BACKWARD_GEMM='cutlass'"):
        ops.ternary_linear(x, w, None, False, torch.float32).sum().backward()


def test_layers_reading_one_input_quantize_it_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """q/k/v on one tensor: one activation pass, and each output and gradient equals the layer's own reference;
    an in-place write to the input makes the next layer quantize it again."""
    from bittern.kernels import quantizers

    calls = []
    real = quantizers.quantize_activations_and_widen
    monkeypatch.setattr(quantizers, "quantize_activations_and_widen", lambda x, w: calls.append(1) or real(x, w))
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 5, 24, generator=generator).to(DEVICE).requires_grad_()
    h = x * 1.0  # a non-leaf input, as a norm's output is
    weights = [(torch.randn(n, 24, generator=generator) * 0.1).to(DEVICE).requires_grad_() for n in (16, 8, 8)]
    outputs = [ops.ternary_linear(h, w, None, False, torch.float32) for w in weights]
    assert len(calls) == 1
    torch.cat(outputs, -1).square().sum().backward()
    got = [x.grad] + [w.grad for w in weights]
    for t in [x, *weights]:
        t.grad = None
    h = x * 1.0
    expected_y = [quant.ternary_linear_ste(h, w) for w in weights]
    torch.cat(expected_y, -1).square().sum().backward()
    for y, e in zip(outputs, expected_y, strict=True):
        assert torch.equal(y, e)
    for g, e in zip(got, [x.grad] + [w.grad for w in weights], strict=True):
        assert _relative(g, e) <= 1e-6

    with torch.no_grad():
        h = x * 1.0
        before = ops.ternary_linear(h, weights[0], None, False, torch.float32)
        h.mul_(2.0)  # same tensor object, new contents
        after = ops.ternary_linear(h, weights[0], None, False, torch.float32)
    assert len(calls) == 3
    assert torch.equal(after, quant.ternary_linear_ste(h, weights[0]))
    assert not torch.equal(after, before)


def test_inference_mode_inputs_are_quantized_per_call() -> None:
    """Inference tensors have no version counter to check a cached quantization against."""
    _, w, _ = _leaves(5, 16, 32, seed=10, bias=False)
    with torch.inference_mode():
        x = torch.randn(5, 32, device=DEVICE)
        first = ops.ternary_linear(x, w, None, False, torch.float32)
        x.mul_(-3.0)
        second = ops.ternary_linear(x, w, None, False, torch.float32)
        expected = quant.ternary_linear_ste(x, w)
    assert torch.equal(second, expected) and not torch.equal(first, second)


def test_backward_modes_give_the_same_bf16_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """Widened in the forward or after the fact, the backward multiplies the same values: equal bits."""
    x, w, b = _leaves(6, 24, 40, seed=8)
    grad_y = torch.randn(6, 24, generator=torch.Generator().manual_seed(9)).to(DEVICE, torch.bfloat16)
    grads = {}
    for mode in ("cublas", "cublas-int8"):
        monkeypatch.setenv("BITTERN_BACKWARD_GEMM", mode)
        ops.ternary_linear(x, w, b, False, torch.bfloat16).backward(grad_y)
        grads[mode] = [x.grad, w.grad, b.grad]
        x.grad = w.grad = b.grad = None
    for got, expected in zip(grads["cublas"], grads["cublas-int8"], strict=True):
        assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_gradients_only_where_asked() -> None:
    x, w, _ = _leaves(5, 16, 32, seed=3, bias=False)
    frozen = w.detach()
    ops.ternary_linear(x, frozen, None, False, torch.float32).sum().backward()
    assert x.grad is not None
    x2 = x.detach()
    ops.ternary_linear(x2, w, None, False, torch.float32).sum().backward()
    assert w.grad is not None and x2.grad is None


def test_inference_op_matches_the_reference() -> None:
    x, w, b = _leaves(7, 33, 40, seed=4)
    codes, scale = quant.ternarize(w)
    got = ops.integer_linear(x.detach(), codes, scale, b.detach(), torch.float32)
    assert torch.equal(got, quant.integer_linear(x.detach(), codes, scale, b.detach()))


def test_torch_library_consistency_checks() -> None:
    """opcheck: schema, fake (meta) implementations and AOT dispatch agree with each op. (Autograd is the
    autograd.Function around the ops, tested above and under torch.compile below.)"""
    x, w, b = (t.detach() for t in _leaves(6, 16, 32, seed=5))
    for widen in (None, torch.float32):
        torch.library.opcheck(torch.ops.bittern.quantize_activations.default, (x, widen))
        xq, act_scale = quant.quantize_activations(x)
        for per_channel in (False, True):
            args = (xq, act_scale, w, b, per_channel, torch.float32, widen)
            torch.library.opcheck(torch.ops.bittern.quantized_linear.default, args)
    codes, scale = quant.ternarize(w)
    torch.library.opcheck(torch.ops.bittern.integer_linear.default, (x, codes, scale, None, torch.float32))
    xq, act_scale = quant.quantize_activations(x)
    grad_y = torch.randn(6, 16, device=DEVICE)
    torch.library.opcheck(torch.ops.bittern.ternary_linear_grad_input.default, (grad_y, codes, scale, torch.float32))
    torch.library.opcheck(torch.ops.bittern.ternary_linear_grad_weight.default, (grad_y, xq, act_scale, torch.float32))


def test_inference_ops_pass_the_torch_library_checks() -> None:
    """opcheck of the packed product on a quantized input, the dense few-row product (the LM head) and the decode
    attention, which writes the KV cache in place (its mutation must be declared, or compiled graphs would drop or
    reorder the write)."""
    generator = torch.Generator().manual_seed(12)
    codes, scale = quant.ternarize(torch.randn(10, 32, generator=generator))
    xq, act_scale = quant.quantize_activations(torch.randn(3, 32, generator=generator))
    weight = packing.pack_ternary_rows(codes)
    args = (xq, act_scale, [weight], [10], [scale], None, torch.float32)
    torch.library.opcheck(torch.ops.bittern.packed_quantized.default, tuple(_on_device(args)))
    batch, kv_heads, groups, dim, slots = 2, 2, 2, 16, 24
    q = torch.randn(batch, kv_heads, groups, dim, generator=generator)
    k, v = torch.randn(2, batch, kv_heads, dim, generator=generator)
    angles = torch.rand(slots, dim // 2, generator=generator)  # rope tables: a row per position
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
    keys, values = torch.randn(2, batch + 1, kv_heads, slots, dim, generator=generator)
    args = (q, k, v, cos, sin, keys, values, torch.tensor([5]), torch.tensor([0, 2]), 0.25, None)
    torch.library.opcheck(torch.ops.bittern.decode_attention.default, tuple(_on_device(args)))
    x, head = torch.randn(2, 3, 32, generator=generator), torch.randn(24, 32, generator=generator)
    torch.library.opcheck(torch.ops.bittern.dense_linear.default, tuple(_on_device((x, head, None))))


def _on_device(args: tuple) -> list:
    def moved(t):  # type: ignore[no-untyped-def]
        return t.to(DEVICE) if torch.is_tensor(t) else t

    return [[moved(t) for t in a] if isinstance(a, list) else moved(a) for a in args]


def test_compiles_without_graph_breaks() -> None:
    layer = BitLinear(32, 16).to(DEVICE)
    x = torch.randn(3, 32, device=DEVICE, requires_grad=True)
    with kernels.use_backend("triton"):
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)  # fullgraph: a break raises
        compiled.sum().backward()
    assert torch.equal(compiled, eager)
    assert x.grad is not None and layer.weight.grad is not None


def test_autocast_output_dtype_follows_nn_linear() -> None:
    x, w, b = _leaves(4, 16, 32, seed=6)
    device_type = torch.device(DEVICE).type
    for backend in ("reference", "triton"):
        with kernels.use_backend(backend), torch.autocast(device_type, dtype=torch.bfloat16):
            y = kernels.ternary_linear(x, w, b)
            expected = torch.nn.functional.linear(x, w, b)
        assert y.dtype == expected.dtype == torch.bfloat16, backend
        y.float().sum().backward()
        assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32, backend
        x.grad = w.grad = b.grad = None


def test_a_model_trains_the_same_on_kernels_and_reference() -> None:
    """A tiny Llama: four AdamW steps on each path; the forward is exact and the gradients agree to float32
    rounding, so the losses agree closely (not bitwise: rounding can flip a ternary code after a step)."""
    ids = token_batch(batch=2, length=16).to(DEVICE)
    losses = {}
    for backend in ("reference", "triton"):
        model = to_bitlinear(tiny_model("llama")).to(DEVICE).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[backend] = []
        with kernels.use_backend(backend):
            for _ in range(4):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses[backend].append(loss.item())
    assert losses["triton"][0] == losses["reference"][0]  # same weights, exact forward: the same bits
    assert losses["triton"] == pytest.approx(losses["reference"], rel=1e-4)
    assert losses["triton"][-1] < losses["triton"][0]


def test_packed_inference_layers_use_the_kernels() -> None:
    model = to_ternary(to_bitlinear(tiny_model("bitnet"))).to(DEVICE)
    ids = token_batch().to(DEVICE)
    with torch.no_grad():
        with kernels.use_backend("reference"):
            expected = model(ids).logits
        with kernels.use_backend("triton"):
            got = model(ids).logits
    assert torch.equal(got, expected)


def test_frozen_packed_layer_gradient_on_the_kernels() -> None:
    """The fused grad_input kernel gives a frozen packed layer's input the reference's straight-through gradient."""
    x, w, b = _leaves(9, 45, 70, seed=8)
    codes, scale = quant.ternarize(w.detach())
    bias = b.detach().requires_grad_()
    grad_y = torch.randn(9, 45, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    with kernels.use_backend("triton"):
        y = kernels.integer_linear(x, codes, scale, bias)
    y.backward(grad_y)
    got_x, got_b = x.grad.clone(), bias.grad.clone()
    x.grad = bias.grad = None
    expected = quant.frozen_ternary_linear(x, codes, scale, bias)
    expected.backward(grad_y)
    assert torch.equal(y, expected)
    assert _relative(got_x, x.grad) <= 1e-6 and _relative(got_b, bias.grad) <= 1e-6
