"""Scores and masks: exact counts, deterministic ties, hand-computed norms, splicing, strategy objects, errors."""

from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_compress.pruning.criteria import (
    global_magnitude_masks,
    magnitude_mask,
    num_pruned,
    splicing_mask,
    splicing_probability,
    splicing_thresholds,
    threshold_mask,
)
from lightning_compress.pruning.masks import (
    FilterNorm,
    Magnitude,
    Splicing,
    Structured,
    Threshold,
    apply_mask,
    sparsity,
)
from lightning_compress.pruning.structured import (
    channel_norms,
    filter_mask,
    filter_norms,
    kernel_mask,
    kernel_scores,
    vector_mask,
    vector_scores,
)


def test_magnitude_mask_breaks_ties_by_lower_index() -> None:
    weight = torch.tensor([0.5, -0.5, 0.5, 2.0, -0.5])
    assert magnitude_mask(weight, 0.4).tolist() == [False, False, True, True, True]
    assert magnitude_mask(weight, 0.0).all()


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(n=st.integers(1, 300), sparsity=st.floats(0.0, 0.999), levels=st.integers(1, 5))
def test_magnitude_mask_prunes_exactly_round_sparsity_n(n: int, sparsity: float, levels: int) -> None:
    weight = torch.randint(-levels, levels + 1, (n,), generator=torch.Generator().manual_seed(n)).float()
    mask = magnitude_mask(weight, sparsity)
    assert int((~mask).sum()) == num_pruned(sparsity, n)
    assert abs(int((~mask).sum()) - sparsity * n) <= 0.5
    if (~mask).any() and mask.any():
        assert weight[~mask].abs().max() <= weight[mask].abs().min()


def test_global_masks_rank_across_layers() -> None:
    weights = {"a": torch.tensor([[0.1, 0.9], [0.2, 0.8]]), "b": torch.tensor([0.3, 0.05, 0.7])}
    masks = global_magnitude_masks(weights, 3 / 7)
    assert masks["a"].tolist() == [[False, True], [False, True]]
    assert masks["b"].tolist() == [True, False, True]
    as_list = global_magnitude_masks(list(weights.values()), 3 / 7)
    assert [m.tolist() for m in as_list] == [masks["a"].tolist(), masks["b"].tolist()]


def test_threshold_mask() -> None:
    assert threshold_mask(torch.tensor([-0.3, 0.29, 0.31]), 0.3).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="-1"):
        threshold_mask(torch.ones(2), -1)


def test_vector_and_kernel_scores_conv2d() -> None:
    weight = torch.zeros(2, 1, 2, 2)
    weight[0, 0] = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    weight[1, 0] = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    assert vector_scores(weight).flatten().tolist() == pytest.approx([5.0, 1.0, 2**0.5, 2**0.5])
    assert vector_scores(weight, p=1).tolist() == [[[7.0, 1.0]], [[2.0, 2.0]]]
    assert kernel_scores(weight, p=1).tolist() == [[8.0], [4.0]]
    assert kernel_scores(weight).flatten().tolist() == pytest.approx([26**0.5, 2.0])
    # vector granularity removes the two weakest rows: (0, 0, 1) of norm 1 and the first sqrt(2) row (1, 0, 0)
    mask = vector_mask(weight, 0.5)
    assert mask[0, 0].tolist() == [[True, True], [False, False]]
    assert mask[1, 0].tolist() == [[False, False], [True, True]]
    assert kernel_mask(weight, 0.5)[1].sum() == 0 and kernel_mask(weight, 0.5)[0].all()


def test_linear_and_conv1d_granularities() -> None:
    linear = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    assert kernel_scores(linear).tolist() == [[1.0, 2.0], [0.5, 3.0]]
    assert vector_mask(linear, 0.5).tolist() == [[False, True], [False, True]]
    conv1d = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])  # (out=1, in=2, k=2): a vector is the whole kernel
    assert vector_scores(conv1d).tolist() == kernel_scores(conv1d).tolist() == [[5.0, 1.0]]


def test_filter_norms_l1_l2_and_mask() -> None:
    weight = torch.tensor([[[1.0, -1.0]], [[3.0, 4.0]], [[0.0, -2.0]], [[0.5, 0.5]]])
    assert filter_norms(weight, p=1).tolist() == [2.0, 7.0, 2.0, 1.0]
    assert filter_norms(weight, p=2).tolist() == pytest.approx([2**0.5, 5.0, 2.0, 0.5**0.5])
    assert filter_mask(weight, 0.5, p=2).tolist() == [False, True, True, False]
    assert filter_mask(weight, 0.5, p=1).tolist() == [False, True, True, False]  # tie 2.0: lower index first
    assert filter_mask(weight, 0.25, scores=torch.tensor([4.0, 3.0, 2.0, 1.0])).tolist() == [True, True, True, False]


def test_channel_norms_plain_and_grouped() -> None:
    weight = torch.arange(8.0).reshape(2, 2, 2)  # Conv1d (out=2, in=2, k=2)
    assert channel_norms(weight, p=1).tolist() == [0 + 1 + 4 + 5, 2 + 3 + 6 + 7]
    grouped = torch.arange(8.0).reshape(4, 1, 2)  # groups=2: filters 0,1 read channel 0; 2,3 read channel 1
    assert channel_norms(grouped, p=1, groups=2).tolist() == [0 + 1 + 2 + 3, 4 + 5 + 6 + 7]
    depthwise = nn.Conv2d(3, 3, 3, groups=3).weight
    assert channel_norms(depthwise, groups=3).tolist() == pytest.approx(filter_norms(depthwise).tolist())
    with pytest.raises(ValueError, match="groups=3"):
        channel_norms(grouped, groups=3)


def test_splicing_mask_function_and_thresholds() -> None:
    weight = torch.tensor([0.05, 0.2, 0.2, 0.5, -0.6])
    previous = torch.tensor([True, True, False, False, False])
    assert splicing_mask(weight, 0.1, 0.4, previous).tolist() == [False, True, False, True, True]
    assert splicing_mask(weight, 0.1, 0.4).tolist() == [False, True, True, True, True]
    # |w| = 1, 2, 3: mu = 2, sigma = sqrt(2/3); c = 1.5 -> t = 2 + 1.5 * 0.8165 = 3.2247
    a, b = splicing_thresholds(torch.tensor([1.0, -2.0, 3.0, 0.0]), c=1.5)
    assert a == pytest.approx(0.9 * (2 + 1.5 * (2 / 3) ** 0.5)) and b == pytest.approx(1.1 * (2 + 1.5 * (2 / 3) ** 0.5))
    assert splicing_probability(0) == 1.0 and splicing_probability(3, gamma=1.0, power=2.0) == 1 / 16
    with pytest.raises(ValueError, match=r"a=0.5, b=0.5"):
        splicing_mask(weight, 0.5, 0.5)
    with pytest.raises(ValueError, match="c=-5"):
        splicing_thresholds(torch.tensor([1.0, 2.0]), c=-5)


def test_invalid_values_are_quoted() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\), got 1.0"):
        magnitude_mask(torch.ones(3), 1.0)
    with pytest.raises(ValueError, match=r"got -0.1"):
        Magnitude(-0.1)
    with pytest.raises(ValueError, match="p=3"):
        filter_norms(torch.ones(2, 2), p=3)
    with pytest.raises(ValueError, match=r"sparsity=0.9 would remove every filter of a layer with 2 filters"):
        filter_mask(torch.ones(2, 3), 0.9)
    with pytest.raises(ValueError, match="granularity"):
        Structured(0.5, granularity="row")
    with pytest.raises(ValueError, match=r"a=0.3, b=0.1"):
        Splicing(0.3, 0.1)


def test_strategy_objects_and_apply_mask() -> None:
    weight = torch.tensor([[1.0, -3.0], [0.2, 0.0], [2.0, 2.0]])
    assert FilterNorm(1 / 3)(weight).tolist() == [[True, True], [False, False], [True, True]]
    assert Structured(0.5, granularity="element")(weight).sum() == 3
    assert Threshold(1.5)(weight).tolist() == [[False, True], [False, False], [True, True]]
    assert Splicing(0.5, 1.5)(weight, Threshold(0.5)(weight)).tolist() == [[True, True], [False, False], [True, True]]
    mask = Magnitude(0.5)(weight)
    apply_mask(weight, mask)
    assert weight.tolist() == [[0.0, -3.0], [0.0, 0.0], [2.0, 2.0]] and sparsity(mask) == 0.5
    assert pickle.loads(pickle.dumps(FilterNorm(0.3, p=1))) == FilterNorm(0.3, p=1)
