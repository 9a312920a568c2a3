"""DELLA MagPrune: per-row rank keep probabilities density - eps .. density + eps, a seeded
mask, L1 rescale; the density ± epsilon window is checked before the merge pass."""

from __future__ import annotations

import pytest
import torch
from value_helpers import assert_values

from mergewise import SPARSIFIERS, RecipeError
from mergewise.sparsify.magprune import check_window, keep_probabilities, magprune


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_registration() -> None:
    sp = SPARSIFIERS.get("magprune")
    assert sp.func is magprune
    assert sp.random and sp.stats is not None
    assert [(p.name, p.default) for p in sp.params] == [("density", 1.0), ("epsilon", 0.15),
                                                        ("rescale", True)]


def test_probabilities_of_a_row() -> None:
    # |.| = [3, 1, 2, 0]: ranks [3, 1, 2, 0] of m - 1 = 3; density 0.5, epsilon 0.3:
    # p = 0.2 + 0.6 rank / 3 = [0.8, 0.4, 0.6, 0.2]
    p = keep_probabilities(torch.tensor([3.0, -1.0, 2.0, 0.0]), 0.5, 0.3)
    assert p.dtype == torch.float32 and p.shape == (1, 4)
    assert_values(p, [[0.8, 0.4, 0.6, 0.2]])


def test_ties_by_index_and_rows() -> None:
    # equal magnitudes rank by index: [0, 1, 2] -> [0.2, 0.5, 0.8]
    assert_values(keep_probabilities(torch.tensor([1.0, -1.0, 1.0]), 0.5, 0.3), [[0.2, 0.5, 0.8]])
    # per row: [[1, 2], [4, 3]] -> ranks [[0, 1], [1, 0]]
    assert_values(keep_probabilities(torch.tensor([[1.0, 2.0], [4.0, 3.0]]), 0.5, 0.3),
           [[0.2, 0.8], [0.8, 0.2]])


def test_ranks_run_along_dimension_one() -> None:
    # a (1, 3, 2) tensor: dimension 1 holds [1, 2, 3] (ranks 0, 1, 2) and [6, 5, 4] (2, 1, 0)
    x = torch.tensor([[[1.0, 6.0], [2.0, 5.0], [3.0, 4.0]]])
    assert_values(keep_probabilities(x, 0.5, 0.3), [[[0.2, 0.8], [0.5, 0.5], [0.8, 0.2]]])


@pytest.mark.parametrize(("shape", "rows"), [((3, 1), 3), ((1,), 1), ((), 1)])
def test_one_entry_rows_keep_with_density(shape: tuple[int, ...], rows: int) -> None:
    # mergekit: rank_norm = 0/0 = NaN (and a 0-d tensor fails); here p = density
    p = keep_probabilities(torch.full(shape, 2.0), 0.5, 0.3)
    assert_values(p.reshape(-1), [0.5] * rows)


def test_mask_from_the_generator_and_l1_rescale() -> None:
    delta = torch.tensor([[3.0, -1.0, 2.0, 0.5], [0.25, -4.0, 1.0, 2.0]])
    out = magprune(delta, density=0.5, epsilon=0.3, generator=_gen(7))
    p = keep_probabilities(delta, 0.5, 0.3)
    keep = torch.rand(delta.shape, generator=_gen(7)) < p
    kept = delta * keep
    assert torch.equal(out, kept * (delta.abs().sum() / kept.abs().sum()))
    out = magprune(delta, density=0.5, epsilon=0.3, rescale=False, generator=_gen(7))
    assert torch.equal(out, kept)


def test_larger_magnitudes_are_kept_more_often() -> None:
    # 2000 rows of [1, 2, ..., 8]: keep rates follow 0.2 .. 0.8
    delta = torch.arange(1.0, 9.0).repeat(2000, 1)
    keep = magprune(delta, density=0.5, epsilon=0.3, rescale=False, generator=_gen(0)) != 0
    rates = keep.float().mean(0)
    expected = torch.tensor([0.2 + 0.6 * r / 7 for r in range(8)])
    torch.testing.assert_close(rates, expected, rtol=0, atol=0.03)


def test_epsilon_zero_is_a_uniform_drop() -> None:
    delta = torch.arange(1.0, 9.0).reshape(2, 4)
    out = magprune(delta, density=0.5, epsilon=0.0, rescale=False, generator=_gen(2))
    assert torch.equal(out != 0, torch.rand(2, 4, generator=_gen(2)) < 0.5)


def test_density_one_and_empty() -> None:
    delta = torch.tensor([1.0, -2.0])
    assert magprune(delta, density=1.0) is delta  # no draw, no window check
    empty = torch.zeros(0, 3)
    assert magprune(empty, density=0.5, generator=_gen(0)) is empty


@pytest.mark.parametrize(("density", "epsilon"), [(0.9, 0.15), (0.85, 0.15), (0.1, 0.1),
                                                  (0.5, 0.5)])
def test_window_outside_zero_one_is_an_error(density: float, epsilon: float) -> None:
    # mergekit raises ValueError mid-merge (density + eps >= 1 or density - eps <= 0)
    with pytest.raises(RecipeError, match=f"density {density:g} ± epsilon {epsilon:g}"):
        check_window(density, epsilon)
    with pytest.raises(RecipeError, match="must lie inside"):
        magprune(torch.ones(4), density=density, epsilon=epsilon, generator=_gen(0))
    with pytest.raises(RecipeError, match="must lie inside"):
        SPARSIFIERS.get("magprune").stats(density=density, epsilon=epsilon)


def test_window_inside_is_fine() -> None:
    check_window(0.84, 0.15)
    check_window(1.0, 0.15)  # no pruning at density 1
    assert SPARSIFIERS.get("magprune").stats(density=0.5, epsilon=0.15) is None


def test_does_not_touch_the_global_generator() -> None:
    state = torch.get_rng_state()
    magprune(torch.randn(4, 5, generator=_gen(1)), density=0.5, generator=_gen(2))
    assert torch.equal(torch.get_rng_state(), state)


def test_needs_a_generator() -> None:
    with pytest.raises(ValueError, match="generator"):
        magprune(torch.ones(3), density=0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    delta = torch.tensor([[3.0, -1.0, 2.0, 0.5], [0.25, -4.0, 1.0, 2.0]], dtype=dtype)
    out = magprune(delta, density=0.5, epsilon=0.3, rescale=False, generator=_gen(7))
    assert out.dtype == dtype
    # the same mask in every dtype: the probabilities are float32 from the same ranks
    keep = torch.rand(2, 4, generator=_gen(7)) < keep_probabilities(delta.float(), 0.5, 0.3)
    assert torch.equal(out, delta * keep)
