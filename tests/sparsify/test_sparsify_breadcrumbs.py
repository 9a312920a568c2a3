"""Breadcrumbs sparsifier: drop the top gamma fraction as outliers, keep the next density."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergewise import SPARSIFIERS
from mergewise.selection import keep_count, round_half_up
from mergewise.sparsify.breadcrumbs import breadcrumbs


def test_registered() -> None:
    sp = SPARSIFIERS.get("breadcrumbs")
    assert sp.func is breadcrumbs
    assert not sp.random


def test_outlier_and_keep_count() -> None:
    delta = torch.tensor([10.0, -9.0, 8.0, -7.0, 6.0, -5.0, 4.0, -3.0, 2.0, -1.0])
    # gamma 0.1 -> 1 outlier (the 10); density 0.35 -> round-half-up(3.5) = 4 kept: -9 8 -7 6
    out = breadcrumbs(delta, density=0.35, gamma=0.1)
    assert torch.equal(out, torch.tensor([0.0, -9.0, 8.0, -7.0, 6.0, 0, 0, 0, 0, 0]))


def test_ties_by_index_for_outliers_and_kept() -> None:
    delta = torch.tensor([5.0, 5.0, -5.0, 1.0, -1.0, 1.0])
    # gamma 0.2 -> round-half-up(1.2) = 1 outlier: the first 5 (flat 0);
    # density 0.5 -> 3 kept: flat 1 and 2 (|5|), then flat 3 (first of the |1|)
    out = breadcrumbs(delta, density=0.5, gamma=0.2)
    assert torch.equal(out, torch.tensor([0.0, 5.0, -5.0, 1.0, 0.0, 0.0]))


def test_gamma_zero_is_plain_top_k() -> None:
    delta = torch.tensor([[0.5, -3.0, 1.0], [-2.0, 0.25, 2.0]])
    out = breadcrumbs(delta, density=0.5, gamma=0.0)  # 3 kept: -3, -2 (flat 3), 2 (flat 5)
    assert torch.equal(out, torch.tensor([[0.0, -3.0, 0.0], [-2.0, 0.0, 2.0]]))


def test_defaults_drop_smallest_ten_percent_on_ten() -> None:
    delta = torch.tensor([10.0, -9.0, 8.0, -7.0, 6.0, -5.0, 4.0, -3.0, 2.0, -1.0])
    # gamma 0.01 -> round-half-up(0.1) = 0 outliers; density 0.9 -> 9 kept: all but the -1
    out = breadcrumbs(delta, density=0.9)
    assert torch.equal(out, torch.tensor([10.0, -9.0, 8.0, -7.0, 6.0, -5.0, 4.0, -3.0, 2.0, 0.0]))


def test_default_gamma_on_hundred_drops_one_outlier() -> None:
    delta = torch.arange(1.0, 101.0)  # 1..100
    out = breadcrumbs(delta, density=0.5)  # 1 outlier (100), then 50 kept: 99 .. 50
    expected = torch.where((delta >= 50) & (delta <= 99), delta, torch.zeros_like(delta))
    assert torch.equal(out, expected)


def test_outliers_capped_by_what_the_kept_leave() -> None:
    """As mergekit: density >= 1 keeps everything (gamma included); when density + gamma
    exceed 1 the outliers shrink, never the kept count."""
    delta = torch.tensor([4.0, -1.0, 3.0, 2.0])
    assert torch.equal(breadcrumbs(delta, density=1.0, gamma=0.25), delta)
    # density 0.75 -> 3 kept; gamma 0.5 -> 2 outliers wanted, 1 left: drop the 4 only
    assert torch.equal(breadcrumbs(delta, density=0.75, gamma=0.5),
                       torch.tensor([0.0, -1.0, 3.0, 2.0]))
    # density 0.5 -> 2 kept; gamma 0.99 -> 4 wanted, 2 left: the two smallest survive
    assert torch.equal(breadcrumbs(delta, density=0.5, gamma=0.99),
                       torch.tensor([0.0, -1.0, 0.0, 2.0]))


def test_one_element_empty_zero() -> None:
    # one element: at least one kept, so never an outlier
    assert torch.equal(breadcrumbs(torch.tensor([-2.0]), density=0.1, gamma=0.5),
                       torch.tensor([-2.0]))
    assert breadcrumbs(torch.zeros(0), density=0.5).shape == (0,)
    assert torch.equal(breadcrumbs(torch.zeros(3, 2), density=0.5, gamma=0.2), torch.zeros(3, 2))


def test_no_rescale_float64() -> None:
    delta = torch.tensor([[0.125, -8.0], [0.5, 0.25]], dtype=torch.float64)
    out = breadcrumbs(delta, density=0.5, gamma=0.25)  # drop -8, keep 0.5 and 0.25
    assert out.dtype == torch.float64
    assert torch.equal(out, torch.tensor([[0.0, 0.0], [0.5, 0.25]], dtype=torch.float64))


@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.3])
@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.integers(1, 4), min_size=1, max_size=30),
       density=st.floats(0.05, 1.0))
def test_property_kept_are_ranks_after_outliers(gamma: float, values: list[int],
                                                density: float) -> None:
    delta = torch.tensor(values, dtype=torch.float32)  # positive, many ties
    n = delta.numel()
    out = breadcrumbs(delta, density=density, gamma=gamma)
    kept = n if density >= 1.0 else keep_count(density, n)
    outliers = 0 if density >= 1.0 else min(round_half_up(gamma, n), n - kept)
    order = torch.sort(delta, descending=True, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[outliers:outliers + kept]] = True
    assert int((out != 0).sum()) == kept
    assert torch.equal(out, delta * mask)
