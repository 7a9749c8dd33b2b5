"""The dense few-row linear kernels (the decode step's LM head) against ``F.linear`` in float64 (interpreter on
CPU: small ragged shapes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bittern import kernels

pytest.importorskip("triton")
from bittern.kernels import dense

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _operands(rows: tuple[int, ...], features: int, width: int, dtype: torch.dtype, bias: bool, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, width, generator=generator)
    weight = torch.randn(features, width, generator=generator) / width**0.5
    b = torch.randn(features, generator=generator) if bias else None
    moved = [t.to(DEVICE, dtype) if t is not None else None for t in (x, weight, b)]
    return moved[0], moved[1], moved[2]


# rows: one (the elementwise kernel), then 2, 5 and 16 (the tl.dot kernel; 16 fills its column block). Features and
# widths that are no multiple of any tile: tails on both axes.
@pytest.mark.parametrize("rows", [(1,), (1, 1), (2,), (1, 5), (16,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_dense_linear_matches_f_linear(rows: tuple[int, ...], dtype: torch.dtype, bias: bool) -> None:
    x, weight, b = _operands(rows, 75, 600, dtype, bias, seed=sum(rows) + bias)
    y = dense.dense_linear(x, weight, b)
    assert y.dtype == dtype and y.shape == (*rows, 75)
    want = F.linear(x.double(), weight.double(), None if b is None else b.double())
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    else:  # float32 sums of exact products, rounded once to bfloat16: within one rounding of the exact result
        error = (y.double() - want).abs()
        assert (error <= 2**-8 * want.abs() + 1e-3).all(), error.max()


def test_dense_linear_refuses_what_it_does_not_take() -> None:
    x, weight, _ = _operands((2,), 24, 32, torch.float32, False, seed=0)
    assert dense.applies(x, weight)
    assert not dense.applies(torch.zeros(17, 32), weight)  # more rows than one column block
    assert not dense.applies(x.double(), weight.double())
    assert not dense.applies(x.bfloat16(), weight)  # mixed dtypes
    assert not dense.applies(x, weight.t().contiguous().t())  # weight rows not contiguous
    with pytest.raises(ValueError, match="at most 16 rows"):
        dense.dense_linear(torch.zeros(17, 32, device=DEVICE), weight)
    with pytest.raises(ValueError, match="bias"):
        dense.dense_linear(x, weight, torch.zeros(23, device=DEVICE))


def test_dispatch_takes_the_kernel_only_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    # one row at any width; a few rows only of a weight as wide as an LM head (the kernels' measured gain)
    x, weight, b = _operands((3,), 40, 64, torch.float32, True, seed=1)
    with kernels.use_backend("triton"):
        assert kernels.dense_linear_applies(x[:1], weight)
        assert not kernels.dense_linear_applies(x, weight)
        monkeypatch.setattr(dense, "FEW_ROWS_MIN_FEATURES", 40)
        assert kernels.dense_linear_applies(x, weight)
        torch.testing.assert_close(kernels.dense_linear(x, weight, b), F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
        with torch.enable_grad():
            assert not kernels.dense_linear_applies(x.requires_grad_(), weight)
    with kernels.use_backend("reference"):
        assert not kernels.dense_linear_applies(x.detach()[:1], weight)
