"""NuSLERP: t = w1 / (w0 + w1), slerp of the two models (of their task vectors with a base),
whole tensor, per row or per column; lerp where colinear, antipodal or zero."""

from __future__ import annotations

import math

import pytest
import torch
from value_helpers import assert_values

from mergewise import METHODS, RecipeError, merge_state_dicts
from mergewise.methods.nuslerp import interpolation_factor, nuslerp, nuslerp_vectors

S2 = math.sqrt(2.0)
S3 = math.sqrt(3.0)
E1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
E2 = torch.tensor([[0.0, 1.0], [0.0, 0.0]])


def test_registration() -> None:
    m = METHODS.get("nuslerp")
    assert m.func is nuslerp
    assert m.space == "weight"
    assert not m.requires_base and m.uses_base
    assert (m.min_models, m.max_models) == (2, 2)
    assert [(p.name, p.default) for p in m.params] == [("nuslerp_flatten", True),
                                                       ("nuslerp_row_wise", False)]
    assert [(p.name, p.default) for p in m.model_params] == [("weight", 1.0)]
    assert not m.accepts_sparsify


def test_t_from_the_weights() -> None:
    assert interpolation_factor([1.0, 3.0]) == 0.75
    assert interpolation_factor([2.0, 2.0]) == 0.5
    assert interpolation_factor([-1.0, 3.0]) == 1.5  # extrapolation, as mergekit


@pytest.mark.parametrize("weights", [[1.0, -1.0], [0.0, 0.0], [0.5, -0.5000001]])
def test_weights_summing_to_zero_are_an_error(weights: list[float]) -> None:
    # mergekit uses t = 1/2 when abs(w0 + w1) < 1e-6
    with pytest.raises(RecipeError, match="sum to 0"):
        interpolation_factor(weights)


def test_orthogonal_without_base() -> None:
    # Omega = pi/2, sin Omega = 1: sin((1 - t) pi/2) v0 + sin(t pi/2) v1
    assert_values(nuslerp(None, [E1, E2], [1.0, 1.0]), [[S2 / 2, S2 / 2], [0.0, 0.0]])
    # weights 1, 2: t = 2/3 -> sin(pi/6), sin(pi/3)
    assert_values(nuslerp(None, [E1, E2], [1.0, 2.0]), [[0.5, S3 / 2], [0.0, 0.0]])
    # the raw vectors are interpolated, not their unit vectors: 3 E2 -> 3 sin(pi/4)
    assert_values(nuslerp(None, [E1, 3 * E2], [1.0, 1.0]), [[S2 / 2, 3 * S2 / 2], [0.0, 0.0]])


def test_sixty_degrees_float64() -> None:
    a = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    # a.b = 3, |a| = |b| = sqrt6: cos = 1/2, Omega = pi/3; t = 1/2: (a + b) sin(pi/6) / sin(pi/3)
    assert_values(nuslerp(None, [a, b], [1.0, 1.0]), ((a + b) / S3).tolist(), tol=1e-12)


def test_with_base_task_vectors() -> None:
    base = torch.tensor([[1.0, -1.0], [2.0, 0.5]])
    # task vectors E1 and E2: base + (sqrt2/2) (E1 + E2)
    out = nuslerp(base, [base + E1, base + E2], [1.0, 1.0])
    assert_values(out, [[1.0 + S2 / 2, -1.0 + S2 / 2], [2.0, 0.5]])


def test_endpoints() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([2.0, -1.0])
    assert_values(nuslerp(None, [a, b], [1.0, 0.0]), [1.0, 2.0])  # t = 0: the first model
    assert_values(nuslerp(None, [a, b], [0.0, 1.0]), [2.0, -1.0])  # t = 1: the second


def test_colinear_and_antipodal_lerp() -> None:
    a = torch.tensor([1.0, 2.0])
    # cos = 1: (1 - t) a + t b, t = 1/4 -> a + (2a - a)/4
    assert torch.equal(nuslerp(None, [a, 2 * a], [3.0, 1.0]), torch.tensor([1.25, 2.5]))
    # cos = -1: t = 1/2 -> (a - 2a) / 2. In float32 the computed cos is -0.99999994, an angle of
    # 3.5e-4 from pi, and mergekit's spherical formula gives [-2895.35, -5790.71]
    assert torch.equal(nuslerp(None, [a, -2 * a], [1.0, 1.0]), torch.tensor([-0.5, -1.0]))
    # nearly antipodal (cos = -0.99998 < -0.9995): lerp too, (v0 + v1) / 2
    b = torch.tensor([-1.0, -2.03])
    assert torch.equal(nuslerp(None, [a, b], [1.0, 1.0]), (a + b) / 2)
    # above the threshold (cos = -0.99857): the spherical formula, (v0 + v1) / (2 cos(Omega/2))
    b = torch.tensor([-1.0, -2.3])
    omega = math.acos(-5.6 / math.sqrt(5 * 6.29))  # a.b = -1 - 4.6, |a|^2 = 5, |b|^2 = 6.29
    expected = [0.0, -0.3 / (2 * math.cos(omega / 2))]  # a + b = [0, -0.3]: [0, -5.62]
    assert_values(nuslerp(None, [a, b], [1.0, 1.0]), expected, tol=1e-3)


def test_zero_vector_lerps() -> None:
    # a task vector of 0 (a tensor one model did not change): lerp, t v1 = [1, 0] at t = 1/2
    # (mergekit: the spherical formula at Omega = pi/2, sin(pi/4) v1 = [1.414, 0])
    base = torch.tensor([3.0, 3.0])
    out = nuslerp(base, [base.clone(), base + torch.tensor([2.0, 0.0])], [1.0, 1.0])
    assert torch.equal(out, torch.tensor([4.0, 3.0]))
    assert torch.equal(nuslerp(None, [torch.zeros(2), torch.zeros(2)], [1.0, 1.0]),
                       torch.zeros(2))


def test_per_row_and_per_column() -> None:
    # rows: row 0 orthogonal ([1, 0] -> [0, 1]), row 1 colinear ([1, 1] -> [2, 2]): lerp
    v0 = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    v1 = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    assert_values(nuslerp_vectors(0.5, v0, v1, flatten=False), [[S2 / 2, S2 / 2], [1.5, 1.5]])
    # columns (row_wise): column 0 [1, 0] -> [0, 1] orthogonal, column 1 [1, 2] -> [2, 4] lerp
    v0 = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    v1 = torch.tensor([[0.0, 2.0], [1.0, 4.0]])
    out = nuslerp(None, [v0, v1], [1.0, 1.0], nuslerp_flatten=False, nuslerp_row_wise=True)
    assert_values(out, [[S2 / 2, 1.5], [S2 / 2, 3.0]])
    # row_wise needs flatten false: with flatten (the default) the whole tensor is one vector
    assert torch.equal(nuslerp(None, [v0, v1], [1.0, 1.0], nuslerp_row_wise=True),
                       nuslerp(None, [v0, v1], [1.0, 1.0]))


def test_reference_float64() -> None:
    # per row, against the formula written out with Python floats
    g = torch.Generator().manual_seed(0)
    v0 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    v1 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    t = 0.3
    out = nuslerp_vectors(t, v0, v1, flatten=False)
    for r in range(3):
        a, b = v0[r].tolist(), v1[r].tolist()
        na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
        omega = math.acos(sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb))
        expected = [(math.sin((1 - t) * omega) * x + math.sin(t * omega) * y) / math.sin(omega)
                    for x, y in zip(a, b, strict=True)]
        assert_values(out[r], expected, tol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    out = nuslerp(None, [E1.to(dtype), E2.to(dtype)], [1.0, 2.0])
    assert out.dtype == dtype
    assert_values(out, [[0.5, S3 / 2], [0.0, 0.0]], tol=1e-2)


def test_api_with_and_without_base() -> None:
    base = {"w": torch.tensor([[1.0, -1.0], [2.0, 0.5]])}
    models = [{"w": base["w"] + E1}, {"w": base["w"] + E2}]
    out = merge_state_dicts(base, models, "nuslerp")
    assert_values(out["w"], [[1.0 + S2 / 2, -1.0 + S2 / 2], [2.0, 0.5]])
    out = merge_state_dicts(None, [{"w": E1}, {"w": E2}], "nuslerp",
                            model_parameters=[{"weight": 1.0}, {"weight": 2.0}])
    assert_values(out["w"], [[0.5, S3 / 2], [0.0, 0.0]])


def test_api_refusals() -> None:
    # the base is not one of the two models (unlike slerp, it is not prepended as an end point)
    with pytest.raises(RecipeError, match="nuslerp needs exactly 2 models, the recipe has 1"):
        merge_state_dicts({"w": E1}, [{"w": E2}], "nuslerp")
    with pytest.raises(RecipeError, match="sum to 0"):
        merge_state_dicts(None, [{"w": E1}, {"w": E2}], "nuslerp",
                          model_parameters=[{"weight": 1.0}, {"weight": -1.0}])
