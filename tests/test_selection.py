"""Exact keep counts and top-k masks (selection.py): round-half-up, at least one, ties by index."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergewise.selection import keep_count, kth_largest, round_half_up, threshold_mask, topk_mask

T, F = True, False


# --- round_half_up / keep_count ---------------------------------------------------------------

@pytest.mark.parametrize(("fraction", "n", "expected"), [
    (0.35, 10, 4),   # 3.5 -> 4 (float 0.35 * 10 is 3.4999999999999996: naive round gives 3)
    (0.15, 10, 2),   # 1.5 -> 2 (float 0.15 is 0.1499999...)
    (0.45, 10, 5),   # 4.5 -> 5
    (0.05, 10, 1),   # 0.5 -> 1
    (0.25, 10, 3),   # 2.5 -> 3 (half up, not banker's rounding to 2)
    (0.24, 10, 2),   # 2.4 -> 2
    (0.5, 3, 2),     # 1.5 -> 2
    (0.1, 3, 0),     # 0.3 -> 0 (round_half_up itself has no floor of one)
    (0.7, 5, 4),     # 3.5 -> 4
    (0.2, 6, 1),     # 1.2 -> 1
    (1.0, 7, 7),
    (1.5, 4, 4),     # capped at n
    (0.0, 10, 0),
    (-0.5, 10, 0),
    (0.5, 0, 0),
])
def test_round_half_up(fraction: float, n: int, expected: int) -> None:
    assert round_half_up(fraction, n) == expected


@pytest.mark.parametrize(("fraction", "n", "expected"), [
    (0.35, 10, 4),
    (0.1, 3, 1),     # 0.3 rounds to 0, but density > 0 keeps at least one
    (0.01, 10, 1),
    (1e-9, 5, 1),
    (0.2, 1, 1),     # 1-element tensor
    (0.5, 1, 1),
    (0.0, 10, 0),    # density 0 keeps nothing
    (-0.1, 10, 0),
    (0.5, 0, 0),     # empty tensor
    (1.0, 9, 9),
    (0.9, 10, 9),
])
def test_keep_count(fraction: float, n: int, expected: int) -> None:
    assert keep_count(fraction, n) == expected


# --- kth_largest ------------------------------------------------------------------------------

def test_kth_largest() -> None:
    v = torch.tensor([5.0, 1.0, 4.0, 2.0, 4.0])
    assert float(kth_largest(v, 1)) == 5.0
    assert float(kth_largest(v, 2)) == 4.0
    assert float(kth_largest(v, 3)) == 4.0
    assert float(kth_largest(v, 4)) == 2.0
    assert float(kth_largest(v, 5)) == 1.0


# --- topk_mask --------------------------------------------------------------------------------

@pytest.mark.parametrize(("k", "expected"), [
    # magnitudes [3, 1, 3, 2, 3]: order by (value desc, index asc) is 0, 2, 4, 3, 1
    (0, [F, F, F, F, F]),
    (1, [T, F, F, F, F]),
    (2, [T, F, T, F, F]),
    (3, [T, F, T, F, T]),
    (4, [T, F, T, T, T]),
    (5, [T, T, T, T, T]),
    (7, [T, T, T, T, T]),
])
def test_topk_mask_ties_by_lowest_index(k: int, expected: list[bool]) -> None:
    mag = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0])
    assert torch.equal(topk_mask(mag, k), torch.tensor(expected))


def test_topk_mask_keeps_shape_and_all_equal_values() -> None:
    # all four equal: the first three in row-major (flat) order win
    mask = topk_mask(torch.ones(2, 2), 3)
    assert mask.shape == (2, 2)
    assert torch.equal(mask, torch.tensor([[T, T], [T, F]]))
    # exact zeros tie as well; a >= threshold rule would keep all four
    assert torch.equal(topk_mask(torch.zeros(4), 2), torch.tensor([T, T, F, F]))


def test_topk_mask_2d_ties_across_rows() -> None:
    # flat: [1, 2, 2, 2, 0, 2] -> order 1, 2, 3, 5, 0, 4 ; k = 3 keeps flat 1, 2, 3
    mag = torch.tensor([[1.0, 2.0, 2.0], [2.0, 0.0, 2.0]])
    assert torch.equal(topk_mask(mag, 3), torch.tensor([[F, T, T], [T, F, F]]))


def test_topk_mask_one_element() -> None:
    assert torch.equal(topk_mask(torch.tensor([0.0]), 1), torch.tensor([T]))
    assert torch.equal(topk_mask(torch.tensor([7.0]), 0), torch.tensor([F]))


def test_topk_mask_bfloat16_ties() -> None:
    mag = torch.tensor([1.0, 2.0, 2.0, 1.0, 2.0], dtype=torch.bfloat16)
    assert torch.equal(topk_mask(mag, 2), torch.tensor([F, T, T, F, F]))
    assert torch.equal(topk_mask(mag, 4), torch.tensor([T, T, T, F, T]))


# --- threshold_mask ---------------------------------------------------------------------------

@pytest.mark.parametrize(("ties", "expected"), [
    # magnitudes [1, 2, 2, 3, 2], threshold 2: strictly above is index 3; ties are 1, 2, 4
    (0, [F, F, F, T, F]),
    (1, [F, T, F, T, F]),
    (2, [F, T, T, T, F]),
    (3, [F, T, T, T, T]),
    (9, [F, T, T, T, T]),
])
def test_threshold_mask(ties: int, expected: list[bool]) -> None:
    mag = torch.tensor([1.0, 2.0, 2.0, 3.0, 2.0])
    assert torch.equal(threshold_mask(mag, 2.0, ties), torch.tensor(expected))
    assert torch.equal(threshold_mask(mag, torch.tensor(2.0), ties), torch.tensor(expected))


def test_threshold_mask_2d() -> None:
    mag = torch.tensor([[0.5, 1.0], [1.0, 0.25]])
    assert torch.equal(threshold_mask(mag, 0.5, 1), torch.tensor([[T, T], [T, F]]))
    assert torch.equal(threshold_mask(mag, 1.0, 1), torch.tensor([[F, T], [F, F]]))


# --- properties -------------------------------------------------------------------------------

def _reference_topk(mag: torch.Tensor, k: int) -> torch.Tensor:
    """First k entries of a stable descending sort: largest values, ties to the lowest index."""
    flat = mag.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(mag.shape)


@settings(max_examples=50, deadline=None)
@given(values=st.lists(st.integers(0, 3), min_size=1, max_size=40), data=st.data())
def test_topk_mask_matches_stable_sort(values: list[int], data: st.DataObject) -> None:
    mag = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(0, len(values) + 1))
    mask = topk_mask(mag, k)
    assert int(mask.sum()) == min(k, len(values))
    assert torch.equal(mask, _reference_topk(mag, k))


@settings(max_examples=50, deadline=None)
@given(fraction=st.floats(0.0, 1.0), n=st.integers(0, 1000))
def test_keep_count_is_nearest_count_half_up(fraction: float, n: int) -> None:
    from fractions import Fraction

    k = keep_count(fraction, n)
    assert 0 <= k <= n
    if fraction == 0 or n == 0:
        assert k == 0
        return
    assert k >= 1
    exact = Fraction(repr(fraction)) * n  # the decimal density the user wrote, times n
    if k > 1:
        # round-half-up: k - 1/2 <= density * n < k + 1/2
        assert k - Fraction(1, 2) <= exact < k + Fraction(1, 2)
    else:
        assert exact < Fraction(3, 2)
