"""The dispatch between the reference and the kernels: which backend runs, and the errors of a wrong choice."""

from __future__ import annotations

import pytest
import torch

from bittern import kernels
from bittern.nn import BitLinear


def test_auto_runs_the_reference_on_cpu() -> None:
    with kernels.use_backend("auto"):
        assert not kernels.uses_triton(torch.zeros(2))


def test_reference_never_runs_triton() -> None:
    with kernels.use_backend("reference"):
        assert not kernels.uses_triton(torch.zeros(2))


def test_backend_context_restores_the_previous_choice() -> None:
    kernels.set_backend("reference")
    try:
        with kernels.use_backend("triton"):
            assert kernels.backend() == "triton"
        assert kernels.backend() == "reference"
    finally:
        kernels.set_backend(None)


def test_environment_variable_chooses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITTERN_KERNELS", "reference")
    assert kernels.backend() == "reference"
    monkeypatch.setenv("BITTERN_KERNELS", "fast")
    with pytest.raises(ValueError, match="BITTERN_KERNELS='fast'"):
        kernels.backend()


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        kernels.set_backend("cuda")


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with kernels.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        BitLinear(8, 4)(torch.randn(2, 8))


def test_triton_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    with kernels.use_backend("triton"), pytest.raises(RuntimeError, match="Triton is not installed"):
        kernels.uses_triton(torch.zeros(2))
    with kernels.use_backend("auto"):  # auto falls back quietly
        assert not kernels.uses_triton(torch.zeros(2))


def test_cpu_use_never_imports_triton() -> None:
    """CPU-only installs: training and inference layers on the CPU leave Triton unimported."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from bittern.nn import BitLinear, TernaryLinear\n"
        "layer = BitLinear(8, 4)\n"
        "layer(torch.randn(2, 8)).sum().backward()\n"
        "TernaryLinear.from_bitlinear(layer)(torch.randn(2, 8))\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    import os

    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "BITTERN_KERNELS": "auto"})


def test_public_quantizers_route_to_the_kernels_bit_identically() -> None:
    pytest.importorskip("triton")
    from bittern import quant

    device = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU the suite runs Triton's interpreter
    x = torch.randn(5, 40, device=device) * 3
    w = torch.randn(24, 40, device=device) * 0.02
    with kernels.use_backend("triton"):
        xq, scale = kernels.quantize_activations(x)
        codes, s = kernels.ternarize(w, per_channel=True)
        y = kernels.integer_linear(x, codes, s)
    ref_xq, ref_scale = quant.quantize_activations(x)
    ref_codes, ref_s = quant.ternarize(w, per_channel=True)
    assert torch.equal(xq, ref_xq) and torch.equal(scale, ref_scale)
    assert torch.equal(codes, ref_codes) and torch.equal(s, ref_s)
    assert torch.equal(y, quant.integer_linear(x, ref_codes, ref_s))


def test_every_op_has_a_reference_and_an_entry_point() -> None:
    for name, op in kernels.OPS.items():
        assert op.name == name and callable(op.reference)
        assert callable(getattr(kernels, name)), name  # the typed function layers call
        assert op.triton is not None or op.cpu is not None, f"{name}: a table entry with no backend"


def test_the_reference_backend_chooses_no_implementation() -> None:
    x = torch.randn(3, 16)
    with kernels.use_backend("reference"):
        assert all(op.implementation(x) is None for op in kernels.OPS.values())
        assert not kernels.dense_linear_applies(x.bfloat16(), torch.randn(8, 16).bfloat16())


def test_an_implementation_that_declines_leaves_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []
    op = kernels.Op(
        "double",
        lambda x: ran.append("reference") or x * 2,
        cpu=kernels.Implementation(lambda x: ran.append("cpu") or x + x, lambda x: x.numel() < 4),
    )
    monkeypatch.setattr(kernels, "native_cpu", lambda t: True)
    assert op(torch.ones(2)).tolist() == [2.0, 2.0] and op.takes(torch.ones(2))
    assert op(torch.ones(5)).tolist() == [2.0] * 5 and not op.takes(torch.ones(5))
    assert ran == ["cpu", "reference"]
    monkeypatch.setattr(kernels, "native_cpu", lambda t: False)
    op(torch.ones(2))
    assert ran[-1] == "reference"


def test_decode_attention_falls_back_to_the_reference_for_an_odd_head_dimension() -> None:
    from bittern import reference

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1, 2, 5, generator=generator)
    k, v = torch.randn(2, 1, 5, generator=generator), torch.randn(2, 1, 5, generator=generator)
    cos, sin = torch.randn(8, 5, generator=generator), torch.randn(8, 5, generator=generator)
    cache = [torch.randn(2, 1, 8, 5, generator=generator) for _ in range(2)]
    want_cache = [c.clone() for c in cache]
    slot, pad = torch.tensor([4]), torch.tensor([0, 2])
    assert not kernels.decode_attention_applies(q)
    got = kernels.decode_attention(q, k, v, cos, sin, *cache, slot, pad, 0.5)
    want = reference.decode_attention(q, k, v, cos, sin, *want_cache, slot, pad, 0.5)
    assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(cache, want_cache, strict=True))
