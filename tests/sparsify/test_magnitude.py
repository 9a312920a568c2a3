"""Magnitude top-k sparsifier: exact counts, ties by index, per tensor and model-wide."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergewise import SPARSIFIERS
from mergewise.selection import keep_count
from mergewise.sparsify.magnitude import GlobalTopK, magnitude


def test_registered() -> None:
    sp = SPARSIFIERS.get("magnitude")
    assert sp.func is magnitude
    assert not sp.random


def test_keeps_largest_half() -> None:
    delta = torch.tensor([[0.5, -3.0, 1.0], [-2.0, 0.25, 2.0]])
    # |tau| = 0.5 3 1 / 2 0.25 2 ; 0.5 * 6 = 3 kept: 3 (flat 1), 2 (flat 3), 2 (flat 5)
    out = magnitude(delta, density=0.5)
    assert torch.equal(out, torch.tensor([[0.0, -3.0, 0.0], [-2.0, 0.0, 2.0]]))
    assert delta[0, 0] == 0.5  # input untouched


def test_density_035_on_10_keeps_4_ties_by_index() -> None:
    delta = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    # all |tau| equal: round-half-up(3.5) = 4 kept, the four lowest indices
    out = magnitude(delta, density=0.35)
    assert torch.equal(out, torch.tensor([1.0, -1.0, 1.0, -1.0, 0, 0, 0, 0, 0, 0]))


def test_ties_at_threshold_go_to_lowest_index() -> None:
    delta = torch.tensor([2.0, -5.0, -2.0, 2.0, 1.0, 5.0])
    # 0.5 * 6 = 3: both 5s, then the first 2 (flat 0); flats 2 and 3 (|2|) are dropped
    out = magnitude(delta, density=0.5)
    assert torch.equal(out, torch.tensor([2.0, -5.0, 0.0, 0.0, 0.0, 5.0]))


def test_tiny_density_keeps_one() -> None:
    delta = torch.tensor([[0.1, -0.4], [0.3, 0.2]])
    out = magnitude(delta, density=0.01)  # 0.04 rounds to 0, at least one: -0.4
    assert torch.equal(out, torch.tensor([[0.0, -0.4], [0.0, 0.0]]))


def test_density_one_is_identity_and_no_rescale() -> None:
    delta = torch.tensor([[1.5, -2.0], [0.0, 3.0]])
    assert torch.equal(magnitude(delta, density=1.0), delta)
    # kept values are not rescaled: density 0.75 keeps 3, values unchanged
    assert torch.equal(magnitude(delta, density=0.75), torch.tensor([[1.5, -2.0], [0.0, 3.0]]))


def test_one_element_and_empty_and_zero() -> None:
    assert torch.equal(magnitude(torch.tensor([-2.5]), density=0.1), torch.tensor([-2.5]))
    assert magnitude(torch.zeros(0, 3), density=0.5).shape == (0, 3)
    assert torch.equal(magnitude(torch.zeros(2, 2), density=0.5), torch.zeros(2, 2))


def test_float64_and_bfloat16() -> None:
    d64 = torch.tensor([1.0, 1.0 + 2.0**-40, -1.0, 0.5], dtype=torch.float64)
    # 1 + 2^-40 is the largest; then the two |1| ties: flat 0 wins
    assert torch.equal(magnitude(d64, density=0.5),
                       torch.tensor([1.0, 1.0 + 2.0**-40, 0.0, 0.0], dtype=torch.float64))
    bf = torch.tensor([1.0, -2.0, 2.0, 0.5], dtype=torch.bfloat16)
    out = magnitude(bf, density=0.25)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.tensor([0.0, -2.0, 0.0, 0.0], dtype=torch.bfloat16))


# --- model-wide (scope: global) through the stats object -----------------------------------

def _run_global(tensors: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """Drive GlobalTopK's two passes the way the engine does, then sparsify each tensor."""
    stats = GlobalTopK(density)
    for p in range(stats.passes):
        for name, delta in tensors.items():
            stats.observe(p, name, delta, {"density": density, "scope": "global"})
        stats.end_pass(p)
    return {name: magnitude(delta, density=density, scope="global",
                            stats=stats.for_tensor(name))
            for name, delta in tensors.items()}


def test_global_hand_values() -> None:
    tensors = {
        "a": torch.tensor([[1.0, -1.0], [1.0, 0.0]]),
        "b": torch.tensor([3.0, -2.0, 3.0]),
    }
    # N = 7, density 0.4: round-half-up(2.8) = 3 kept model-wide: the two 3s and the -2 of "b";
    # per tensor it would keep two entries of "a".
    out = _run_global(tensors, 0.4)
    assert torch.equal(out["a"], torch.zeros(2, 2))
    assert torch.equal(out["b"], torch.tensor([3.0, -2.0, 3.0]))
    # density 0.5: 4 kept; the 4th is one of the four |1| of "a" ... the first: a[0, 0]
    out = _run_global(tensors, 0.5)
    assert torch.equal(out["a"], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(out["b"], torch.tensor([3.0, -2.0, 3.0]))


def test_global_ties_go_to_earliest_tensor() -> None:
    tensors = {
        "x": torch.tensor([2.0, 1.0, -2.0]),
        "y": torch.tensor([-2.0, 2.0, 5.0]),
        "z": torch.tensor([2.0]),
    }
    # N = 7, density 0.5 -> 4 kept: the 5, then three of the five |2| in (tensor, index) order:
    # x[0], x[2], y[0]; y[1] and z[0] lose the tie.
    out = _run_global(tensors, 0.5)
    assert torch.equal(out["x"], torch.tensor([2.0, 0.0, -2.0]))
    assert torch.equal(out["y"], torch.tensor([-2.0, 0.0, 5.0]))
    assert torch.equal(out["z"], torch.tensor([0.0]))


def test_global_candidates_in_one_histogram_bin() -> None:
    # 1 + j * 2^-20 share the top 16 bits of their float32 pattern: the second pass must rank
    # them exactly. Largest four: j = 7 (y), 6 (x), 5 (y), 4 (x).
    tensors = {
        "x": torch.tensor([1.0 + 2 * 2.0**-20, 1.0 + 6 * 2.0**-20, -(1.0 + 4 * 2.0**-20), 0.5]),
        "y": torch.tensor([-(1.0 + 5 * 2.0**-20), 1.0 + 7 * 2.0**-20, 1.0, 1.0 + 3 * 2.0**-20]),
    }
    out = _run_global(tensors, 0.5)  # 8 * 0.5 = 4
    assert torch.equal(out["x"], torch.tensor([0.0, 1.0 + 6 * 2.0**-20, -(1.0 + 4 * 2.0**-20), 0.0]))
    assert torch.equal(out["y"], torch.tensor([-(1.0 + 5 * 2.0**-20), 1.0 + 7 * 2.0**-20, 0.0, 0.0]))


def test_global_float64_one_bin() -> None:
    e = 2.0**-44  # below the 16 top bits of a float64 pattern
    tensors = {
        "x": torch.tensor([1.0 + e, -1.0, 1.0 + 3 * e], dtype=torch.float64),
        "y": torch.tensor([1.0 + 2 * e, 1.0], dtype=torch.float64),
    }
    out = _run_global(tensors, 0.6)  # 5 * 0.6 = 3: 1+3e, 1+2e, 1+e
    assert torch.equal(out["x"], torch.tensor([1.0 + e, 0.0, 1.0 + 3 * e], dtype=torch.float64))
    assert torch.equal(out["y"], torch.tensor([1.0 + 2 * e, 0.0], dtype=torch.float64))


def test_global_keep_all() -> None:
    tensors = {"a": torch.tensor([1.0, 0.0, -2.0]), "b": torch.tensor([[4.0, 0.5]])}
    out = _run_global(tensors, 0.95)  # 5 * 0.95 = 4.75 -> 5 = everything
    assert torch.equal(out["a"], tensors["a"])
    assert torch.equal(out["b"], tensors["b"])


# --- properties -----------------------------------------------------------------------------

small_values = st.lists(st.sampled_from([-3.0, -2.0, -1.0, -0.5, 0.5, 1.0, 2.0, 3.0]),
                        min_size=1, max_size=30)


@settings(max_examples=50, deadline=None)
@given(values=small_values, density=st.floats(0.01, 1.0))
def test_keeps_exactly_keep_count_largest(values: list[float], density: float) -> None:
    delta = torch.tensor(values)  # no zeros: every kept entry is visible as non-zero
    out = magnitude(delta, density=density)
    kept = out != 0
    k = keep_count(density, delta.numel())
    assert int(kept.sum()) == k
    assert torch.equal(out[kept], delta[kept])  # kept values unchanged
    if 0 < k < delta.numel():
        mag = delta.abs()
        assert mag[kept].min() >= mag[~kept].max()
        # at the threshold, every kept tie has a lower index than every dropped tie
        t = mag[kept].min()
        kept_idx = torch.nonzero(kept & (mag == t)).reshape(-1)
        dropped_idx = torch.nonzero(~kept & (mag == t)).reshape(-1)
        if dropped_idx.numel():
            assert kept_idx.max() < dropped_idx.min()


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 8), min_size=1, max_size=4), density=st.floats(0.05, 1.0),
       data=st.data())
def test_global_matches_stable_sort_reference(sizes: list[int], density: float,
                                              data: st.DataObject) -> None:
    tensors = {f"t{i}": torch.tensor(data.draw(st.lists(st.integers(-2, 2), min_size=n,
                                                        max_size=n)), dtype=torch.float32)
               for i, n in enumerate(sizes)}
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    k = keep_count(density, flat.numel())
    order = torch.sort(flat.abs(), descending=True, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    expected = torch.split(flat * mask, sizes)
    out = _run_global(tensors, density)
    for (name, _), exp in zip(tensors.items(), expected, strict=True):
        assert torch.equal(out[name], exp), name


@pytest.mark.parametrize("density", [0.3, 0.5])
def test_global_keeps_exact_count_with_zero_ties(density: float) -> None:
    # many exact zeros: the kept set must still be exactly k entries (zeros included)
    tensors = {"a": torch.zeros(6), "b": torch.tensor([0.0, 1.0, 0.0, 0.0])}
    stats = GlobalTopK(density)
    for p in range(stats.passes):
        for name, delta in tensors.items():
            stats.observe(p, name, delta, {})
        stats.end_pass(p)
    k = keep_count(density, 10)  # 3 or 5
    ties_total = sum(stats.for_tensor(n)[1] for n in tensors)
    assert float(stats.for_tensor("a")[0]) == 0.0
    assert ties_total == k - 1  # the 1.0 is strictly above the 0 threshold
    assert stats.for_tensor("a")[1] == k - 1  # ties go to the earlier tensor first
    assert stats.for_tensor("b")[1] == 0
