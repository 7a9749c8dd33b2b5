"""Which inputs and layer groups the packed-weight kernels take: written once, read by the dispatch
(:mod:`bittern.kernels`), the layers (:func:`bittern.nn.project`) and the Triton kernels
(:mod:`bittern.kernels.packed`). Imports neither Triton nor any other kernel module."""

from __future__ import annotations

from collections.abc import Sequence

import torch

DECODE_MAX_TOKENS = 3
"""Token counts up to this run on the Triton decode kernel (:mod:`bittern.kernels.packed`); more go to the prefill
path (:mod:`bittern.kernels.packed_gemm`). The decode kernel's cost grows with every token it serves, the prefill
path's hardly over a few tokens: on Hopper, for a 2B4T block's launches on an int8 input under dependent launch, the
decode kernel is the faster up to 3 tokens and the tensor-core product from 4 (docs/notes/inference-tuning.md)."""

MAX_GROUP = 3
"""The most layers of one input one launch computes (q/k/v)."""


def groupable(scales: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]) -> bool:
    """Whether packed layers of one input, given by their weight scales (``[1]`` or ``[N_i]``) and biases, run as
    one group (one launch on a GPU, one call on the CPU): one layer (its bias allowed), or two or three bias-free
    layers whose scales are all per tensor or all per row."""
    if not 1 <= len(scales) <= MAX_GROUP or len(scales) != len(biases):
        return False
    if len(scales) > 1 and any(b is not None for b in biases):
        return False
    return len({s.numel() != 1 for s in scales}) == 1
