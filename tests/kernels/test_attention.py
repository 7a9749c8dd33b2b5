"""The decode attention kernel against attention written out from its visibility rule (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from bittern.kernels import attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(q, keys, values, slot: int, pad: list[int], scale: float, window: int | None) -> torch.Tensor:
    """float64 softmax attention of slot ``slot`` over the slots it sees: ``pad[b] … slot`` (only its own slot when
    ``pad[b] > slot``), and within ``window``."""
    out = torch.empty(q.shape, dtype=torch.float64)
    for b in range(q.shape[0]):
        first = min(pad[b], slot)
        if window is not None:
            first = max(first, slot - window + 1)
        k = keys[b, :, first : slot + 1].double()  # [H, n, D]
        v = values[b, :, first : slot + 1].double()
        scores = q[b].double() @ k.transpose(-1, -2) * scale  # [H, G, n]
        out[b] = scores.softmax(-1) @ v
    return out


def _operands(batch: int, kv_heads: int, groups: int, slots: int, dim: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads, groups, dim, generator=generator).to(dtype)
    keys = torch.randn(batch, kv_heads, slots, dim, generator=generator).to(dtype)
    values = torch.randn(batch, kv_heads, slots, dim, generator=generator).to(dtype)
    return q, keys, values


@pytest.mark.parametrize(
    ("groups", "slot", "pad", "window"),
    [
        (4, 37, [0, 5, 30], None),  # rows of different lengths
        (1, 0, [0, 0, 0], None),  # the first slot: one key
        (3, 64, [0, 2, 64], None),  # groups not a power of two; a row whose only visible slot is the query's
        (4, 70, [0, 9, 66], 8),  # sliding window narrower than some rows, wider than the shortest
        (2, 45, [50, 1, 0], None),  # a padding query (pad past the slot) sees only its own slot
    ],
)
# (block, split) for an 80-slot cache: one program walking several blocks (online softmax); three programs per
# head, some seeing nothing, added by the combining kernel; one block
@pytest.mark.parametrize(("block", "split"), [(16, 512), (16, 32), (128, 128)])
def test_decode_attention_follows_the_visibility_rule(
    groups: int, slot: int, pad: list[int], window: int | None, block: int, split: int
) -> None:
    q, keys, values = _operands(3, 2, groups, 80, 32, torch.float32, seed=slot)
    got = attention.decode_attention(
        q.to(DEVICE), keys.to(DEVICE), values.to(DEVICE), torch.tensor([slot], device=DEVICE),
        torch.tensor(pad, device=DEVICE), 0.2, window, block=block, split=split,
    )  # fmt: skip
    want = _reference(q, keys, values, slot, pad, 0.2, window)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)


def test_decode_attention_in_bfloat16_over_strided_cache_views() -> None:
    q, keys, values = _operands(2, 2, 4, 100, 64, torch.bfloat16, seed=3)
    big_keys = torch.zeros(3, 2, 120, 64, dtype=torch.bfloat16)  # the engine passes views [:B] of a larger cache
    big_keys[:2, :, :100] = keys
    big_values = torch.zeros_like(big_keys)
    big_values[:2, :, :100] = values
    got = attention.decode_attention(
        q.to(DEVICE), big_keys[:2].to(DEVICE), big_values[:2].to(DEVICE), torch.tensor([99], device=DEVICE),
        torch.tensor([0, 40], device=DEVICE), 0.125, block=32, split=64,
    )  # fmt: skip
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    want = _reference(q, keys, values, 99, [0, 40], 0.125, None)
    error = (got.double().cpu() - want).norm() / want.norm()
    assert error < 1e-2, error


def test_decode_attention_refuses_bad_operands() -> None:
    q, keys, values = _operands(1, 2, 4, 8, 32, torch.float32, seed=0)
    slot, pad = torch.tensor([3]), torch.tensor([0])
    with pytest.raises(ValueError, match="keys and values"):
        attention.decode_attention(q, keys[:, :1], values[:, :1], slot, pad, 1.0)
    with pytest.raises(ValueError, match="power of two"):
        attention.decode_attention(q[..., :24], keys[..., :24], values[..., :24], slot, pad, 1.0)
    with pytest.raises(ValueError, match="one per row"):
        attention.decode_attention(q, keys, values, slot, torch.tensor([0, 0]), 1.0)
    with pytest.raises(ValueError, match="dividing split"):
        attention.decode_attention(q, keys, values, slot, pad, 1.0, block=32, split=48)
