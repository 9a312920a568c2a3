"""NearSwap: w = clamp(t / max(|a - b|, 1e-6), 0, 1), theta = w b + (1 - w) a; t required."""

from __future__ import annotations

import pytest
import torch

from mergewise import METHODS, RecipeError, merge_state_dicts
from mergewise.methods.nearswap import nearswap

# a = base, b = model; b - a = [[0.125, -0.5], [2, 0]]
A = torch.tensor([[1.0, 1.0], [-1.0, 2.0]])
B = torch.tensor([[1.125, 0.5], [1.0, 2.0]])
# t = 0.25: |a - b| = [[0.125, 0.5], [2, 0 -> 1e-6]], t / |a - b| = [[2, 0.5], [0.125, 250000]]
#   w = [[1, 0.5], [0.125, 1]]
#   (0,0): b = 1.125
#   (0,1): 0.5 * 0.5 + 0.5 * 1 = 0.75
#   (1,0): 0.125 * 1 + 0.875 * (-1) = -0.75
#   (1,1): b = a = 2
EXPECTED = torch.tensor([[1.125, 0.75], [-0.75, 2.0]])


def test_registration() -> None:
    m = METHODS.get("nearswap")
    assert m.func is nearswap
    assert m.space == "weight"
    assert m.requires_base and m.uses_base
    assert (m.min_models, m.max_models) == (1, 1)
    (t,) = m.params
    assert t.name == "t" and t.required and t.low == 0.0
    assert m.model_params == () and not m.accepts_sparsify


def test_hand_values() -> None:
    assert torch.equal(nearswap(A, [B], [1.0], t=0.25), EXPECTED)


def test_t_zero_is_the_base_and_large_t_the_model() -> None:
    assert torch.equal(nearswap(A, [B], [1.0], t=0.0), A)
    assert torch.equal(nearswap(A, [B], [1.0], t=10.0), B)  # every distance is below 10


def test_equal_tensors_no_division_by_zero() -> None:
    out = nearswap(A, [A.clone()], [1.0], t=0.0)  # 0 / 1e-6 = 0: the base
    assert torch.equal(out, A)
    out = nearswap(torch.zeros(3), [torch.zeros(3)], [1.0], t=0.5)
    assert torch.equal(out, torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    # every value above is exact in all three dtypes; in float16, 0.25 / 1e-6 overflows to inf
    # and is clamped to 1
    out = nearswap(A.to(dtype), [B.to(dtype)], [1.0], t=0.25)
    assert out.dtype == dtype
    assert torch.equal(out, EXPECTED.to(dtype))


def test_api() -> None:
    out = merge_state_dicts({"w": A}, [{"w": B}], "nearswap", parameters={"t": 0.25})
    assert torch.equal(out["w"], EXPECTED)
    # t per tensor name
    out = merge_state_dicts({"x": A, "y": A}, [{"x": B, "y": B}], "nearswap",
                            parameters={"t": [{"filter": "x", "value": 0.0}, {"value": 0.25}]})
    assert torch.equal(out["x"], A) and torch.equal(out["y"], EXPECTED)


def test_t_is_required() -> None:
    with pytest.raises(RecipeError, match="nearswap needs 't'"):
        merge_state_dicts({"w": A}, [{"w": B}], "nearswap")


def test_negative_t_refused() -> None:
    # mergekit accepts t < 0 (w = 0 everywhere: the base); here it is a recipe error
    with pytest.raises(RecipeError, match="'t' = -0.1 is out of range"):
        merge_state_dicts({"w": A}, [{"w": B}], "nearswap", parameters={"t": -0.1})


def test_needs_base_and_one_model() -> None:
    with pytest.raises(RecipeError, match="needs base_model"):
        merge_state_dicts(None, [{"w": B}], "nearswap", parameters={"t": 0.1})
    with pytest.raises(RecipeError, match="needs exactly 1 models"):
        merge_state_dicts({"w": A}, [{"w": B}, {"w": B}], "nearswap", parameters={"t": 0.1})
