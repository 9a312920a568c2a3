"""Multi-SLERP: normalised weighted mean of the unit vectors, tangent step, times the weighted
mean norm; task vectors with a base; weights summing to 0 refused."""

from __future__ import annotations

import math

import pytest
import torch
from value_helpers import assert_values

from mergewise import METHODS, RecipeError, merge_state_dicts
from mergewise.methods.multislerp import multislerp

S2 = math.sqrt(2.0)
S5 = math.sqrt(5.0)


def test_registration() -> None:
    m = METHODS.get("multislerp")
    assert m.func is multislerp
    assert m.space == "weight"
    assert not m.requires_base and m.uses_base
    assert (m.min_models, m.max_models) == (1, None)
    assert [(p.name, p.default) for p in m.params] == [("normalize_weights", True),
                                                       ("eps", 1e-8)]
    assert [(p.name, p.default) for p in m.model_params] == [("weight", 1.0)]
    assert not m.accepts_sparsify


def test_one_model_is_returned_as_it_is() -> None:
    x = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    out = multislerp(torch.zeros(2, 2), [x], [3.0])
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


def test_two_orthogonal_vectors() -> None:
    # x = [3, 0], [0, 1], weights 1/2 each: units [1, 0], [0, 1]; mean [1/2, 1/2] -> m at 45
    # degrees; the tangents [1/2, -1/2] and [-1/2, 1/2] cancel; scale 3/2 + 1/2 = 2 -> [sqrt2, sqrt2]
    out = multislerp(None, [torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 1.0]])], [1.0, 1.0])
    assert_values(out, [[S2, S2]])


def test_three_vectors() -> None:
    # units [1, 0], [0, 1], [0, 1], weights 1/3: mean [1, 2] / 3 -> m = [1, 2] / sqrt5 (not the
    # Karcher mean at 60 degrees: the weighted tangents sum to 0 at m); scale 1
    x = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0])]
    assert_values(multislerp(None, x, [1.0, 1.0, 1.0]), [1 / S5, 2 / S5])
    # weights 2, 1, 1 (sum 4): mean [1/2, 1/2] -> 45 degrees, scale 1
    assert_values(multislerp(None, x, [2.0, 1.0, 1.0]), [S2 / 2, S2 / 2])


def test_with_base_task_vectors() -> None:
    base = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    models = [base + torch.tensor([[3.0, 0.0], [0.0, 0.0]]),
              base + torch.tensor([[0.0, 1.0], [0.0, 0.0]])]
    assert_values(multislerp(base, models, [1.0, 1.0]), [[1.0 + S2, -1.0 + S2], [0.5, 2.0]])


def test_weights_not_normalised() -> None:
    # weights 2, 2: mean [2, 2] -> 45 degrees; scale 2 * 1 + 2 * 1 = 4 -> [2 sqrt2, 2 sqrt2]
    out = multislerp(None, [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], [2.0, 2.0],
                     normalize_weights=False)
    assert_values(out, [2 * S2, 2 * S2])


def test_zero_vector_is_a_lerp() -> None:
    # [2, 0] and 0: the zero vector adds weight but no direction: m = [1, 0], scale 1 -> [1, 0]
    out = multislerp(None, [torch.tensor([2.0, 0.0]), torch.zeros(2)], [1.0, 1.0])
    assert_values(out, [1.0, 0.0])


def test_antipodal_pairs() -> None:
    a = torch.tensor([1.0, 2.0])
    # equal weights: the mean is 0, so two models fall back to w0 x0 + w1 x1 = (a - a) / 2
    assert torch.equal(multislerp(None, [a, -a], [1.0, 1.0]), torch.zeros(2))
    # weights 1, 3: mean = (1/4 - 3/4) a/|a| -> m = -a/|a|; scale |a| -> -a
    assert_values(multislerp(None, [a, -a], [1.0, 3.0]), [-1.0, -2.0])


def test_cancelling_mean_of_three_is_an_error() -> None:
    a = torch.tensor([1.0, 0.0])
    with pytest.raises(RecipeError, match="weighted mean of the 3 models' directions is 0"):
        multislerp(None, [a, -a, a.clone()], [1.0, 2.0, 1.0])


@pytest.mark.parametrize("weights", [[1.0, -1.0], [0.5, 0.25, -0.75]])
def test_weights_summing_to_zero_are_an_error(weights: list[float]) -> None:
    # mergekit divides by the 0 sum (inf/NaN weights)
    x = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])]
    with pytest.raises(RecipeError, match="sum to 0"):
        multislerp(None, x[:len(weights)], weights)


def test_weights_summing_to_zero_in_the_compute_dtype() -> None:
    # 1 and -1.001 sum to -0.001, but -1.001 is -1 in bfloat16: the bfloat16 sum is 0
    x = [torch.tensor([1.0, 0.0], dtype=torch.bfloat16), torch.tensor([0.0, 1.0],
                                                                       dtype=torch.bfloat16)]
    with pytest.raises(RecipeError, match="sum to 0"):
        multislerp(None, x, [1.0, -1.001])
    out = multislerp(None, [t.float() for t in x], [1.0, -1.001])  # float32: fine
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    out = multislerp(None, [torch.tensor([[3.0, 0.0]], dtype=dtype),
                            torch.tensor([[0.0, 1.0]], dtype=dtype)], [1.0, 1.0])
    assert out.dtype == dtype
    # float64: the eps in x / (|x| + eps) shifts the result by 1e-8 relative
    assert_values(out, [[S2, S2]], tol=1e-2 if dtype != torch.float64 else 1e-7)
    # float16: the tangents cancel exactly here, so mergekit's r = 0 + 1e-8 is 0 in float16
    # and sin(r) / r NaN; the eps is floored at float16's smallest normal instead
    assert bool(torch.isfinite(out).all())


def test_reference_float64() -> None:
    # against the algorithm written out with Python floats, three random 5-vectors
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(5, generator=g, dtype=torch.float64) for _ in range(3)]
    w = [0.5, 0.3, 0.2]
    vs = [x.tolist() for x in xs]
    norms = [math.sqrt(sum(v * v for v in x)) for x in vs]
    units = [[v / (n + 1e-8) for v in x] for x, n in zip(vs, norms, strict=True)]
    mean = [sum(wi * u[j] for wi, u in zip(w, units, strict=True)) for j in range(5)]
    mn = math.sqrt(sum(v * v for v in mean))
    m = [v / mn for v in mean]
    tangents = [[u[j] - sum(a * b for a, b in zip(u, m, strict=True)) * m[j] for j in range(5)]
                for u in units]
    gt = [sum(wi * t[j] for wi, t in zip(w, tangents, strict=True)) for j in range(5)]
    r = math.sqrt(sum(v * v for v in gt)) + 1e-8
    scale = sum(wi * n for wi, n in zip(w, norms, strict=True))
    expected = [(m[j] * math.cos(r) + gt[j] * math.sin(r) / r) * scale for j in range(5)]
    assert_values(multislerp(None, xs, w), expected, tol=1e-12)


def test_api() -> None:
    base = {"w": torch.tensor([[1.0, -1.0], [0.5, 2.0]])}
    models = [{"w": base["w"] + torch.tensor([[3.0, 0.0], [0.0, 0.0]])},
              {"w": base["w"] + torch.tensor([[0.0, 1.0], [0.0, 0.0]])}]
    out = merge_state_dicts(base, models, "multislerp")
    assert_values(out["w"], [[1.0 + S2, -1.0 + S2], [0.5, 2.0]])
    out = merge_state_dicts(None, models, "multislerp",
                            model_parameters=[{"weight": 1.0}, {"weight": 0.0}])
    assert_values(out["w"], models[0]["w"].tolist())  # all weight on the first model: itself
    with pytest.raises(RecipeError, match="sum to 0"):
        merge_state_dicts(None, models, "multislerp",
                          model_parameters=[{"weight": 1.0}, {"weight": -1.0}])
