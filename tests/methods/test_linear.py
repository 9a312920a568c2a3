"""Linear (model soup): weighted average of full weights; normalize true/false."""

from __future__ import annotations

import pytest
import torch

from mergewise import METHODS, RecipeError, merge_state_dicts
from mergewise.methods.linear import linear

A = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
B = torch.tensor([[0.0, 4.0], [-2.0, 8.0]])
C = torch.tensor([[3.0, 0.0], [1.0, -4.0]])


def test_registration() -> None:
    m = METHODS.get("linear")
    assert m.space == "weight"
    assert not m.requires_base
    assert not m.accepts_sparsify


def test_weighted_mean_normalized() -> None:
    # A + 2B + C = [[1+0+3, 2+8+0], [3-4+1, 4+16-4]] = [[4, 10], [0, 16]]; / (1+2+1) = 4
    out = linear(None, [A, B, C], [1.0, 2.0, 1.0], normalize=True)
    assert torch.equal(out, torch.tensor([[1.0, 2.5], [0.0, 4.0]]))


def test_weighted_sum_not_normalized() -> None:
    out = linear(None, [A, B, C], [1.0, 2.0, 1.0], normalize=False)
    assert torch.equal(out, torch.tensor([[4.0, 10.0], [0.0, 16.0]]))


def test_default_is_normalized_plain_mean() -> None:
    # (A + B) / 2 = [[0.5, 3], [0.5, 6]]
    assert torch.equal(linear(None, [A, B], [1.0, 1.0]), torch.tensor([[0.5, 3.0], [0.5, 6.0]]))


def test_inputs_untouched_and_single_model() -> None:
    a = A.clone()
    out = linear(None, [a], [3.0])  # 3A / 3 = A
    assert torch.equal(out, A)
    assert torch.equal(a, A)
    assert torch.equal(linear(None, [a], [3.0], normalize=False), 3 * A)


def test_weights_summing_to_zero() -> None:
    with pytest.raises(RecipeError, match="normalize"):
        linear(None, [A, B], [1.0, -1.0], normalize=True)
    # without normalisation it is just A - B = [[1, -2], [5, -4]]
    assert torch.equal(linear(None, [A, B], [1.0, -1.0], normalize=False),
                       torch.tensor([[1.0, -2.0], [5.0, -4.0]]))


def test_one_element() -> None:
    out = linear(None, [torch.tensor([2.0]), torch.tensor([-6.0])], [3.0, 1.0])
    assert torch.equal(out, torch.tensor([0.0]))  # (6 - 6) / 4


# --- through the public API --------------------------------------------------------------------

def test_api_weights_and_no_base() -> None:
    sd = [{"w": A, "b": torch.tensor([1.0])}, {"w": B, "b": torch.tensor([5.0])}]
    out = merge_state_dicts(None, sd, "linear",
                            model_parameters=[{"weight": 1.0}, {"weight": 3.0}])
    # (A + 3B) / 4 = [[(1+0)/4, (2+12)/4], [(3-6)/4, (4+24)/4]] ; b: (1 + 15) / 4
    assert torch.equal(out["w"], torch.tensor([[0.25, 3.5], [-0.75, 7.0]]))
    assert torch.equal(out["b"], torch.tensor([4.0]))
    assert list(out) == ["w", "b"]


def test_api_base_is_not_averaged() -> None:
    base = {"w": torch.full((2, 2), 100.0)}
    out = merge_state_dicts(base, [{"w": A}, {"w": C}], "linear",
                            parameters={"normalize": False})
    assert torch.equal(out["w"], torch.tensor([[4.0, 2.0], [4.0, 0.0]]))  # A + C


def test_api_integer_buffer_copied_and_dtype_kept() -> None:
    ids = torch.tensor([0, 1, 2])
    sds = [{"w": A.double(), "ids": ids}, {"w": B.double(), "ids": torch.tensor([7, 7, 7])}]
    out = merge_state_dicts(None, sds, "linear")
    assert out["w"].dtype == torch.float64
    assert torch.equal(out["w"], torch.tensor([[0.5, 3.0], [0.5, 6.0]], dtype=torch.float64))
    assert torch.equal(out["ids"], ids)  # copied from the reference (the first model)


def test_api_bf16_in_bf16_out() -> None:
    sds = [{"w": A.bfloat16()}, {"w": C.bfloat16()}]
    out = merge_state_dicts(None, sds, "linear")
    assert out["w"].dtype == torch.bfloat16
    # (A + C) / 2 = [[2, 1], [2, 0]]
    assert torch.equal(out["w"], torch.tensor([[2.0, 1.0], [2.0, 0.0]], dtype=torch.bfloat16))
    out32 = merge_state_dicts(None, sds, "linear", out_dtype="float32")
    assert out32["w"].dtype == torch.float32
    assert torch.equal(out32["w"], torch.tensor([[2.0, 1.0], [2.0, 0.0]]))
