"""Karcher mean: the Riemannian mean of the models' directions times their mean norm; the base
is never averaged in (mergekit appends an unlisted base as an input)."""

from __future__ import annotations

import math

import pytest
import torch
from value_helpers import assert_values

from mergewise import METHODS, merge_state_dicts
from mergewise.methods.karcher import karcher

S2 = math.sqrt(2.0)
S3 = math.sqrt(3.0)


def test_registration() -> None:
    m = METHODS.get("karcher")
    assert m.func is karcher
    assert m.space == "weight"
    assert not m.requires_base and not m.uses_base
    assert (m.min_models, m.max_models) == (1, None)
    assert [(p.name, p.default) for p in m.params] == [("max_iter", 10), ("tol", 1e-5)]
    assert m.model_params == () and not m.accepts_sparsify


def test_two_orthogonal_directions() -> None:
    # directions [1, 0] and [0, 1], norms 2 and 4: the mean direction is at 45 degrees (the
    # tangent steps cancel at once); scale = (2 + 4) / 2 = 3 -> 3 [1/sqrt2, 1/sqrt2]
    out = karcher(None, [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 4.0]])], [])
    assert_values(out, [[3 / S2, 3 / S2]])


def test_three_points_converge_to_the_angular_mean() -> None:
    # on the unit circle at 0, 90 and 90 degrees: the Karcher mean is at 60 degrees (the
    # Euclidean average [1, 2] / 3 points at 63.4 degrees, where it starts); norms 1 -> scale 1
    x = [torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]]),
         torch.tensor([[0.0, 1.0], [0.0, 0.0]])]
    assert_values(karcher(None, x, []), [[0.5, S3 / 2], [0.0, 0.0]])
    # max_iter 0: no step, the normalised average [1, 2] / sqrt5
    assert_values(karcher(None, x, [], max_iter=0), [[1 / math.sqrt(5), 2 / math.sqrt(5)], [0.0, 0.0]])


def test_float64() -> None:
    x = [torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64),
         torch.tensor([0.0, 1.0], dtype=torch.float64)]
    out = karcher(None, x, [], tol=1e-12, max_iter=50)
    assert out.dtype == torch.float64
    assert_values(out, [0.5, S3 / 2], tol=1e-12)


def test_one_model_is_returned_as_it_is() -> None:
    x = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    out = karcher(None, [x], [])
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


def test_zero_tensors() -> None:
    z = torch.zeros(2, 2)
    assert torch.equal(karcher(None, [z, z.clone()], []), z)  # every norm <= tol: zeros
    # a zero model takes no part in the direction but counts in the mean norm:
    # direction of [2, 0] and [0, 2] at 45 degrees, scale (2 + 2 + 0) / 3 = 4/3
    out = karcher(None, [torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0]), torch.zeros(2)], [])
    assert_values(out, [4 / 3 / S2, 4 / 3 / S2])


def test_antipodal_starts_at_the_first_direction() -> None:
    # [1, 0] and [-1, 0]: the average is 0, so the mean starts at the first direction; the step
    # towards the second is theta / sin(theta) (u - cos m) = (...) ([-1, 0] + [1, 0]) = 0
    out = karcher(None, [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])], [])
    assert torch.equal(out, torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes(dtype: torch.dtype) -> None:
    out = karcher(None, [torch.tensor([[2.0, 0.0]], dtype=dtype),
                         torch.tensor([[0.0, 4.0]], dtype=dtype)], [])
    assert out.dtype == dtype
    assert_values(out, [[3 / S2, 3 / S2]], tol=1e-2)


def test_api_base_is_not_averaged() -> None:
    # mergekit appends an unlisted base_model as a third input here and averages it in
    models = [{"w": torch.tensor([[2.0, 0.0]])}, {"w": torch.tensor([[0.0, 4.0]])}]
    base = {"w": torch.tensor([[-5.0, 7.0]])}
    with_base = merge_state_dicts(base, models, "karcher")
    without = merge_state_dicts(None, models, "karcher", parameters={"max_iter": 10, "tol": 1e-5})
    assert torch.equal(with_base["w"], without["w"])
    assert_values(without["w"], [[3 / S2, 3 / S2]])
