"""Bit layouts of ternary codes: pure functions, no model or file knowledge.

The Hugging Face ``bitnet`` layout (docs/design.md §3) packs four output rows into one byte row: for ``N`` output
rows, ``R = ceil(N / 4)``, byte row ``r`` holds rows ``r, r+R, r+2R, r+3R`` in bits 0-1, 2-3, 4-5, 6-7, each
as ``code + 1`` in {0, 1, 2}. The value 3 never occurs in a valid tensor.
"""

from __future__ import annotations

import torch

CODES_PER_BYTE = 4
INVALID_CODE = 3


def packed_rows(out_features: int) -> int:
    """Number of byte rows ``ceil(N / 4)`` that hold ``out_features`` ternary rows."""
    return -(-out_features // CODES_PER_BYTE)


def pack_ternary_rows(codes: torch.Tensor) -> torch.Tensor:
    """Pack ternary codes into the Hugging Face 2-bit row layout.

    Args:
        codes: integer ``[N, K]`` with values in {-1, 0, 1} (checked, except on the meta device).

    Returns:
        uint8 ``[ceil(N/4), K]``; the slots past the last real row (when N % 4 != 0) hold code 0 (bits 01),
        so every slot of a packed tensor is a valid code.
    """
    if codes.dim() != 2:
        raise ValueError(f"pack_ternary_rows expects a 2-D [N, K] tensor, got shape {tuple(codes.shape)}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"pack_ternary_rows expects integer codes, got {codes.dtype}")
    if codes.device.type != "meta" and bool(((codes < -1) | (codes > 1)).any()):
        raise ValueError("pack_ternary_rows: codes must lie in {-1, 0, 1}")
    n, k = codes.shape
    rows = packed_rows(n)
    shifted = (codes.to(torch.int16) + 1).to(torch.uint8)
    padded = torch.ones((rows * CODES_PER_BYTE, k), dtype=torch.uint8, device=codes.device)
    padded[:n] = shifted
    groups = padded.reshape(CODES_PER_BYTE, rows, k)
    packed = groups[0] | (groups[1] << 2) | (groups[2] << 4) | (groups[3] << 6)
    return packed


def unpack_ternary_rows(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_ternary_rows`.

    Args:
        packed: uint8 ``[ceil(N/4), K]``.
        out_features: ``N``, the number of real rows (the padding rows of the last group are dropped).

    Returns:
        int8 ``[N, K]``; a byte slot holding the invalid value 3 unpacks to 2 (check with
        :func:`count_invalid` first when the bytes come from outside).
    """
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"unpack_ternary_rows expects uint8 [R, K], got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[0] != packed_rows(out_features):
        raise ValueError(
            f"packed tensor has {packed.shape[0]} byte rows but {out_features} output rows need "
            f"{packed_rows(out_features)}"
        )
    slots = [(packed >> (2 * i)) & 3 for i in range(CODES_PER_BYTE)]
    codes = torch.cat(slots, dim=0)[:out_features]
    return codes.to(torch.int8) - 1


def count_invalid(packed: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
    """Number of 2-bit slots holding the unused value 3 (a 0-dim int64 tensor; no host sync).

    With ``out_features`` given, padding slots past the last real row are ignored.
    """
    total = torch.zeros((), dtype=torch.int64, device=packed.device)
    rows = packed.shape[0]
    for i in range(CODES_PER_BYTE):
        slot = (packed >> (2 * i)) & 3
        if out_features is not None:
            real = max(0, min(rows, out_features - i * rows))
            slot = slot[:real]
        total = total + (slot == INVALID_CODE).sum()
    return total
