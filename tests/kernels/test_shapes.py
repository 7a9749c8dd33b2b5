"""The grouping rule the dispatch, the layers and the Triton kernels share."""

from __future__ import annotations

import torch

from bittern.kernels import shapes

PER_TENSOR, PER_ROW = torch.ones(1), torch.ones(8)


def test_one_layer_groups_with_its_bias() -> None:
    assert shapes.groupable([PER_ROW], [torch.zeros(8)])


def test_two_or_three_bias_free_layers_of_one_scale_kind_group() -> None:
    assert shapes.groupable([PER_TENSOR] * 3, [None] * 3)
    assert shapes.groupable([PER_ROW, PER_ROW], [None, None])


def test_what_does_not_group() -> None:
    assert not shapes.groupable([], [])
    assert not shapes.groupable([PER_TENSOR] * 4, [None] * 4)  # more than one launch holds
    assert not shapes.groupable([PER_TENSOR, PER_ROW], [None, None])  # mixed scale kinds
    assert not shapes.groupable([PER_TENSOR, PER_TENSOR], [torch.zeros(8), None])  # a bias in a group
    assert not shapes.groupable([PER_TENSOR], [None, None])  # mismatched lists
