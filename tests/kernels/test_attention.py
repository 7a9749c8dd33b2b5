"""The decode step's attention kernel (rope, cache write, attention) against the reference
(:func:`bittern.reference.decode_attention`) in float64 (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from bittern import reference
from bittern.kernels import attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(step: dict, slot: int, pad: list[int], scale: float, window: int | None):
    """:func:`bittern.reference.decode_attention` in float64: the output, and the cache after the write."""
    tensors = {name: t.double() for name, t in step.items()}
    keys, values = tensors["keys"].clone(), tensors["values"].clone()
    out = reference.decode_attention(tensors["q"], tensors["k"], tensors["v"], tensors["cos"], tensors["sin"], keys,
                                     values, torch.tensor([slot]), torch.tensor(pad), scale, window)  # fmt: skip
    return out, keys, values


def _step(batch: int, cache_rows: int, kv_heads: int, groups: int, slots: int, dim: int, dtype, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    angles = torch.rand(slots + 3, dim // 2, generator=generator) * 6.0  # rope tables of more rows than slots
    tensors = {
        "q": torch.randn(batch, kv_heads, groups, dim, generator=generator),
        "k": torch.randn(batch, kv_heads, dim, generator=generator),
        "v": torch.randn(batch, kv_heads, dim, generator=generator),
        "cos": angles.cos().repeat(1, 2),
        "sin": angles.sin().repeat(1, 2),
        "keys": torch.randn(cache_rows, kv_heads, slots, dim, generator=generator),
        "values": torch.randn(cache_rows, kv_heads, slots, dim, generator=generator),
    }
    return {name: t.to(dtype) for name, t in tensors.items()}


def _run(step: dict, slot: int, pad: list[int], scale: float, window: int | None = None, **tiles) -> tuple:
    on_device = {name: t.to(DEVICE) for name, t in step.items()}
    out = attention.decode_attention(
        on_device["q"], on_device["k"], on_device["v"], on_device["cos"], on_device["sin"], on_device["keys"],
        on_device["values"], torch.tensor([slot], device=DEVICE), torch.tensor(pad, device=DEVICE), scale, window,
        **tiles,
    )  # fmt: skip
    return out.cpu(), on_device["keys"].cpu(), on_device["values"].cpu()


@pytest.mark.parametrize(
    ("groups", "slot", "pad", "window"),
    [
        (4, 37, [0, 5, 30], None),  # rows of different lengths
        (1, 0, [0, 0, 0], None),  # the first slot: the new key alone
        (3, 64, [0, 2, 64], None),  # groups not a power of two; a row that sees only the new slot
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
    step = _step(3, 4, 2, groups, 80, 32, torch.float32, seed=slot)
    out, keys, values = _run(step, slot, pad, 0.2, window, block=block, split=split)
    want, want_keys, want_values = _reference(step, slot, pad, 0.2, window)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    # the new key (roped) and value land in rows < B at the slot; nothing else changes, row 3 included
    torch.testing.assert_close(keys.double(), want_keys, rtol=1e-6, atol=1e-6)
    assert torch.equal(values.double(), want_values)
    assert torch.equal(keys[3], step["keys"][3])


def test_decode_attention_in_bfloat16_over_a_longer_cache() -> None:
    step = _step(2, 2, 2, 4, 100, 64, torch.bfloat16, seed=3)
    out, keys, _ = _run(step, 99, [0, 40], 0.125, block=32, split=64)
    assert out.dtype == torch.bfloat16 and out.shape == step["q"].shape
    want, want_keys, _ = _reference(step, 99, [0, 40], 0.125, None)
    error = (out.double() - want).norm() / want.norm()
    assert error < 1e-2, error
    torch.testing.assert_close(keys[:, :, 99].double(), want_keys[:, :, 99], rtol=1e-2, atol=1e-2)


def test_decode_attention_refuses_bad_operands() -> None:
    step = _step(1, 1, 2, 4, 8, 32, torch.float32, seed=0)
    q, k, v, cos, sin, keys, values = (step[n] for n in ("q", "k", "v", "cos", "sin", "keys", "values"))
    slot, pad = torch.tensor([3]), torch.tensor([0])
    with pytest.raises(ValueError, match="cache"):
        attention.decode_attention(q, k, v, cos, sin, keys[:, :1], values[:, :1], slot, pad, 1.0)
    with pytest.raises(ValueError, match="k and v"):
        attention.decode_attention(q, k[:, :1], v, cos, sin, keys, values, slot, pad, 1.0)
    with pytest.raises(ValueError, match="power of two"):
        attention.decode_attention(q[..., :24], k[..., :24], v[..., :24], cos[..., :24], sin[..., :24],
                                   keys[..., :24], values[..., :24], slot, pad, 1.0)  # fmt: skip
    with pytest.raises(ValueError, match="one per row"):
        attention.decode_attention(q, k, v, cos, sin, keys, values, slot, torch.tensor([0, 0]), 1.0)
    with pytest.raises(ValueError, match="dividing split"):
        attention.decode_attention(q, k, v, cos, sin, keys, values, slot, pad, 1.0, block=32, split=48)
    with pytest.raises(ValueError, match="rope tables"):  # fewer rows than the cache has slots
        attention.decode_attention(q, k, v, cos[:7], sin[:7], keys, values, slot, pad, 1.0)


def test_decode_attention_without_splitting_past_the_first_split(monkeypatch: pytest.MonkeyPatch) -> None:
    # as many programs as processors: one program per head walks the whole cache, the new slot past `split`
    monkeypatch.setattr(attention, "_processors", lambda device: 1)
    step = _step(2, 2, 2, 4, 80, 32, torch.float32, seed=9)
    out, keys, _ = _run(step, 70, [0, 13], 0.3, block=16, split=32)
    want, want_keys, _ = _reference(step, 70, [0, 13], 0.3, None)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keys.double(), want_keys, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("batch", "kv_heads", "combined"), [(1, 2, True), (3, 4, False)])
def test_decode_attention_default_splits_one_short_launch_only(
    monkeypatch: pytest.MonkeyPatch, batch: int, kv_heads: int, combined: bool
) -> None:
    # 2 programs (one sequence): 128-slot splits of a 300-slot cache, added by the combining kernel; 12 programs:
    # 512-slot programs, one per head, no second kernel. Both against the reference.
    grids: list[tuple] = []
    kernel = attention._combine_kernel

    class Spy:
        def __getitem__(self, grid):  # type: ignore[no-untyped-def]
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(attention, "_combine_kernel", Spy())
    step = _step(batch, batch, kv_heads, 2, 300, 32, torch.float32, seed=batch)
    pad = [0, 7, 250][:batch]
    out, keys, _ = _run(step, 290, pad, 0.25)
    want, want_keys, _ = _reference(step, 290, pad, 0.25, None)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keys.double(), want_keys, rtol=1e-6, atol=1e-6)
    assert grids == ([(batch * kv_heads,)] if combined else [])
