"""Tests of the 2-bit Hugging Face ``bitnet`` row layout (:mod:`bittern.packing`, docs/design.md §3)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bittern import packing

PROPERTY = settings(max_examples=50, deadline=None)


@st.composite
def ternary_codes(draw: st.DrawFn, max_n: int = 40, max_k: int = 40) -> torch.Tensor:
    """Random int8 ternary codes ``[N, K]`` with N in 1..``max_n`` (any N % 4) and K in 1..``max_k``."""
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(1, max_k))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)


def reference_count_invalid(packed: torch.Tensor, out_features: int | None) -> int:
    """Slot-by-slot count of the value 3, skipping slots of rows >= ``out_features`` (plain Python loops)."""
    rows, k = packed.shape
    total = 0
    for r in range(rows):
        for col in range(k):
            byte = int(packed[r, col])
            for i in range(4):
                row = r + i * rows
                if out_features is not None and row >= out_features:
                    continue
                total += (byte >> (2 * i)) & 3 == 3
    return total


# --- round trip and shapes --------------------------------------------------------------------------------


@PROPERTY
@given(codes=ternary_codes())
def test_pack_unpack_round_trip(codes: torch.Tensor) -> None:
    n, k = codes.shape
    packed = packing.pack_ternary_rows(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (-(-n // 4), k)
    assert packing.packed_rows(n) == -(-n // 4)

    unpacked = packing.unpack_ternary_rows(packed, n)
    assert unpacked.dtype == torch.int8
    assert torch.equal(unpacked, codes)
    assert int(packing.count_invalid(packed)) == 0
    assert int(packing.count_invalid(packed, n)) == 0


@PROPERTY
@given(codes=ternary_codes())
def test_pack_accepts_any_integer_dtype(codes: torch.Tensor) -> None:
    expected = packing.pack_ternary_rows(codes)
    for dtype in (torch.int16, torch.int32, torch.int64):
        assert torch.equal(packing.pack_ternary_rows(codes.to(dtype)), expected)


@PROPERTY
@given(codes=ternary_codes())
def test_bit_layout_slot_by_slot(codes: torch.Tensor) -> None:
    """Byte row r holds rows r, r+R, r+2R, r+3R as code+1 in bits 0-1, 2-3, 4-5, 6-7; padding slots hold 1."""
    n, _ = codes.shape
    packed = packing.pack_ternary_rows(codes)
    rows = packed.shape[0]
    for i in range(4):
        slot = (packed >> (2 * i)) & 3
        for r in range(rows):
            row = r + i * rows
            expected = codes[row].to(torch.uint8) + 1 if row < n else torch.ones_like(slot[r])
            assert torch.equal(slot[r], expected.to(torch.uint8)), (i, r)


# --- hand-written examples ------------------------------------------------------------------------------


def test_hand_packed_example_with_padding() -> None:
    # N = 5, K = 2, so R = 2: byte row 0 holds rows 0, 2, 4, pad; byte row 1 holds rows 1, 3, pad, pad.
    codes = torch.tensor([[-1, 0], [1, -1], [0, 1], [1, 1], [-1, 1]], dtype=torch.int8)
    # slots written high to low (bits 7-6, 5-4, 3-2, 1-0), each code + 1; padding is 01 (code 0)
    expected = torch.tensor(
        [
            [0b01_00_01_00, 0b01_10_10_01],  # (pad, row4, row2, row0) per column
            [0b01_01_10_10, 0b01_01_10_00],  # (pad, pad, row3, row1) per column
        ],
        dtype=torch.uint8,
    )
    packed = packing.pack_ternary_rows(codes)
    assert torch.equal(packed, expected)
    assert torch.equal(packing.unpack_ternary_rows(expected, 5), codes)


def test_hand_packed_single_column() -> None:
    codes = torch.tensor([[-1], [0], [1], [1]], dtype=torch.int8)
    assert packing.pack_ternary_rows(codes).tolist() == [[0b10_10_01_00]]


def test_unpack_transformers_docstring_example() -> None:
    """The worked example in transformers' ``unpack_weights`` docstring."""
    packed = torch.tensor([[0b10100001, 0b00011000], [0b10010000, 0b00001010]], dtype=torch.uint8)
    expected = torch.tensor(
        [[0, -1], [-1, 1], [-1, 1], [-1, 1], [1, 0], [0, -1], [1, -1], [1, -1]],
        dtype=torch.int8,
    )
    assert torch.equal(packing.unpack_ternary_rows(packed, 8), expected)
    assert torch.equal(packing.pack_ternary_rows(expected), packed)


# --- compatibility with transformers' own packer ----------------------------------------------------------


@PROPERTY
@given(codes=ternary_codes())
def test_matches_transformers_pack_weights(codes: torch.Tensor) -> None:
    from transformers.integrations.bitnet import pack_weights, unpack_weights

    n, _ = codes.shape
    theirs = pack_weights(codes.clone())  # pack_weights adds 1 in place
    ours = packing.pack_ternary_rows(codes)
    assert theirs.dtype == torch.uint8
    if n % 4 == 0:
        assert torch.equal(ours, theirs)
    # For any N the real slots agree (transformers leaves padding slots at 00, we write 01).
    assert torch.equal(packing.unpack_ternary_rows(theirs, n), codes)
    if n % 4 == 0:
        # transformers' unpacker is wrapped in torch.compile; its eager original is the same function.
        eager_unpack = getattr(unpack_weights, "__wrapped__", unpack_weights)
        assert torch.equal(eager_unpack(ours, torch.float32), codes.to(torch.float32))


# --- count_invalid --------------------------------------------------------------------------------------


@st.composite
def raw_packed(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    """Arbitrary uint8 bytes ``[R, K]`` (so some slots hold 3) and an ``out_features`` that fits R rows."""
    rows = draw(st.integers(1, 10))
    k = draw(st.integers(1, 12))
    out_features = draw(st.integers(4 * rows - 3, 4 * rows))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return torch.randint(0, 256, (rows, k), generator=gen, dtype=torch.uint8), out_features


@PROPERTY
@given(sample=raw_packed())
def test_count_invalid_matches_slot_by_slot_count(sample: tuple[torch.Tensor, int]) -> None:
    packed, out_features = sample
    total = packing.count_invalid(packed)
    real = packing.count_invalid(packed, out_features)
    assert total.dtype == torch.int64
    assert total.shape == ()
    assert int(total) == reference_count_invalid(packed, None)
    assert int(real) == reference_count_invalid(packed, out_features)


def test_count_invalid_ignores_padding_slots() -> None:
    # N = 5, R = 2: slot 2 of byte row 0 is row 4 (real); slot 2 of byte row 1 and all slot 3s are padding.
    packed = torch.full((2, 3), 0b11_11_11_11, dtype=torch.uint8)
    assert int(packing.count_invalid(packed)) == 2 * 3 * 4
    assert int(packing.count_invalid(packed, 5)) == 3 * 5  # 5 real rows x 3 columns
    assert int(packing.count_invalid(packed, 8)) == 2 * 3 * 4

    only_padding = torch.tensor([[0b11_01_01_01], [0b11_11_01_01]], dtype=torch.uint8)
    assert int(packing.count_invalid(only_padding)) == 3
    assert int(packing.count_invalid(only_padding, 5)) == 0
    assert int(packing.count_invalid(only_padding, 6)) == 1


def test_count_invalid_on_meta() -> None:
    result = packing.count_invalid(torch.empty(3, 5, dtype=torch.uint8, device="meta"), 10)
    assert (result.device.type, result.dtype, result.shape) == ("meta", torch.int64, ())


@pytest.mark.parametrize("bad", [2, 3, -2, -3, 127])
def test_out_of_range_code_is_refused(bad: int) -> None:
    """An out-of-range code never reaches the bytes (code 3 would pack as 0b100 and corrupt the next row)."""
    codes = torch.zeros(4, 2, dtype=torch.int8)
    codes[0, 0] = bad
    with pytest.raises(ValueError, match=r"\{-1, 0, 1\}"):
        packing.pack_ternary_rows(codes)


def test_float_codes_are_refused() -> None:
    with pytest.raises(ValueError, match="integer"):
        packing.pack_ternary_rows(torch.tensor([[0.6], [-0.7]]))


# --- argument checks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8,), (2, 4, 3), ()])
def test_pack_rejects_non_matrix(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="2-D"):
        packing.pack_ternary_rows(torch.zeros(shape, dtype=torch.int8))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.float32])
def test_unpack_rejects_non_uint8(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="uint8"):
        packing.unpack_ternary_rows(torch.zeros(2, 3, dtype=dtype), 8)


@pytest.mark.parametrize("shape", [(6,), (2, 3, 1)])
def test_unpack_rejects_non_matrix(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="uint8"):
        packing.unpack_ternary_rows(torch.zeros(shape, dtype=torch.uint8), 8)


@pytest.mark.parametrize("out_features", [4, 8, 13])
def test_unpack_rejects_wrong_row_count(out_features: int) -> None:
    with pytest.raises(ValueError, match="byte rows"):
        packing.unpack_ternary_rows(torch.zeros(3, 2, dtype=torch.uint8), out_features)
