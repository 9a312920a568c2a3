"""Passthrough: one model's tensors as they are, or times its ``scale``; the base is no input."""

from __future__ import annotations

import pytest
import torch

from mergewise import METHODS, RecipeError, merge_state_dicts
from mergewise.methods.passthrough import passthrough

W = torch.tensor([[1.0, -2.0], [3.0, 0.5]])


def test_registration() -> None:
    m = METHODS.get("passthrough")
    assert m.func is passthrough
    assert m.space == "weight"
    assert not m.requires_base and not m.uses_base
    assert (m.min_models, m.max_models) == (1, 1)
    assert m.params == ()
    assert [(p.name, p.default) for p in m.model_params] == [("scale", None)]
    assert not m.accepts_sparsify


def test_copy_without_scale() -> None:
    out = passthrough(None, [W], [1.0], scale=[None])
    assert torch.equal(out, W)
    assert out.data_ptr() != W.data_ptr()  # a copy, never the caller's tensor


def test_scale() -> None:
    # 0.5 x [[1, -2], [3, 0.5]]
    assert torch.equal(passthrough(None, [W], [1.0], scale=[0.5]),
                       torch.tensor([[0.5, -1.0], [1.5, 0.25]]))
    assert torch.equal(passthrough(None, [W], [1.0], scale=[0.0]), torch.zeros(2, 2))
    assert torch.equal(passthrough(None, [W], [1.0], scale=[-1.0]), -W)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    out = passthrough(None, [W.to(dtype)], [1.0], scale=[2.0])
    assert out.dtype == dtype
    assert torch.equal(out, torch.tensor([[2.0, -4.0], [6.0, 1.0]], dtype=dtype))


def test_api_scale_per_model_and_buffers() -> None:
    sd = {"w": W.clone(), "b": torch.tensor([1.0, 2.0, 4.0]), "ids": torch.arange(3)}
    out = merge_state_dicts(None, [sd], "passthrough", model_parameters=[{"scale": 0.25}])
    assert torch.equal(out["w"], 0.25 * W)
    assert torch.equal(out["b"], torch.tensor([0.25, 0.5, 1.0]))
    assert torch.equal(out["ids"], torch.arange(3))  # integer buffers are copied
    out = merge_state_dicts(None, [sd], "passthrough")
    assert all(torch.equal(out[k], sd[k]) for k in sd)
    out["w"].add_(1.0)
    assert torch.equal(sd["w"], W)  # the input is not aliased


def test_scale_by_tensor_filter() -> None:
    sd = {"a.w": W.clone(), "b.w": W.clone()}
    out = merge_state_dicts(None, [sd], "passthrough", model_parameters=[
        {"scale": [{"glob": "a.*", "value": 2.0}]}])
    assert torch.equal(out["a.w"], 2 * W) and torch.equal(out["b.w"], W)


def test_base_is_not_an_input() -> None:
    # mergekit appends a base_model as a second input and refuses it; here it is ignored
    base = {"w": torch.full((2, 2), 100.0)}
    out = merge_state_dicts(base, [{"w": W.clone()}], "passthrough")
    assert torch.equal(out["w"], W)


def test_two_models_refused() -> None:
    with pytest.raises(RecipeError, match="passthrough needs exactly 1 models"):
        merge_state_dicts(None, [{"w": W}, {"w": W}], "passthrough")


def test_sparsify_refused() -> None:
    with pytest.raises(RecipeError, match="takes no sparsify block"):
        merge_state_dicts(None, [{"w": W}], "passthrough", sparsify={"method": "magnitude"})
