"""Model Stock: t = N cos / (1 + (N - 1) cos) from the mean pairwise cosine of the task
vectors, theta = t mean(w_i) + (1 - t) w0; per tensor or per row (``filter_wise``)."""

from __future__ import annotations

import itertools

import pytest
import torch
from value_helpers import assert_values

from mergewise import METHODS, RecipeError, merge_state_dicts
from mergewise.methods.model_stock import model_stock

BASE = torch.ones(2, 2, dtype=torch.float64)
# task vectors a = [[2, 0], [0, 0]], b = [[1, 1], [1, 1]]: a.b = 2, |a| = |b| = 2 -> cos = 1/2;
# t = 2 (1/2) / (1 + 1/2) = 2/3. mean(w) = base + (a + b)/2 = [[2.5, 1.5], [1.5, 1.5]];
# theta = 2/3 mean + 1/3 base = [[2, 4/3], [4/3, 4/3]]
W1 = BASE + torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
W2 = BASE + 1.0
EXPECTED = torch.tensor([[2.0, 4 / 3], [4 / 3, 4 / 3]], dtype=torch.float64)


def test_registration() -> None:
    m = METHODS.get("model_stock")
    assert m.func is model_stock
    assert m.space == "weight"
    assert m.requires_base and m.uses_base
    assert (m.min_models, m.max_models) == (2, None)
    assert [(p.name, p.default) for p in m.params] == [("filter_wise", False)]
    assert m.model_params == () and not m.accepts_sparsify


def test_two_models_hand_values() -> None:
    assert_values(model_stock(BASE, [W1, W2], [1.0, 1.0]), EXPECTED)


def test_parallel_task_vectors_give_the_average() -> None:
    # cos = 1 -> t = N / N = 1: the plain average of the models
    tau = torch.tensor([[1.0, -2.0], [0.5, 0.0]], dtype=torch.float64)
    models = [BASE + tau, BASE + 2 * tau, BASE + 3 * tau]
    assert_values(model_stock(BASE, models, [1.0] * 3), BASE + 2 * tau)


def test_orthogonal_and_zero_task_vectors_keep_the_base() -> None:
    e1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    e2 = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    # cos = 0 -> t = 0
    assert torch.equal(model_stock(BASE, [BASE + e1, BASE + e2], [1.0, 1.0]), BASE)
    # a zero task vector: its norm product is clamped to 1e-6, cos = 0 / 1e-6 = 0
    assert torch.equal(model_stock(BASE, [BASE.clone(), BASE + e2], [1.0, 1.0]), BASE)


def test_singular_denominator_keeps_the_base() -> None:
    # antipodal: cos = -1, 1 + (N - 1) cos = 0: no finite estimate, t = 0 (mergekit's rule)
    e1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    assert torch.equal(model_stock(BASE, [BASE + e1, BASE - e1], [1.0, 1.0]), BASE)


def test_three_models_negative_cosine() -> None:
    # 1-D, base 0; offsets [1, 0], [0, 1], [-1, 0]: cosines 0, -1, 0 -> mean -1/3;
    # t = 3 (-1/3) / (1 + 2 (-1/3)) = -1 / (1/3) = -3; mean = [0, 1/3]; theta = -3 [0, 1/3] = [0, -1]
    base = torch.zeros(2, dtype=torch.float64)
    models = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([-1.0, 0.0])]
    out = model_stock(base, [m.double() for m in models], [1.0] * 3)
    assert_values(out, torch.tensor([0.0, -1.0], dtype=torch.float64))


def test_filter_wise_per_row() -> None:
    # row 0: offsets [1, 0], [2, 0], [3, 0] (parallel) -> t = 1: the mean [2, 0]
    # row 1: offsets [1, 0], [0, 1], [-1, 0] -> t = -3 (as above): [0, -1]
    base = torch.zeros(2, 2, dtype=torch.float64)
    models = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, 1.0]]),
              torch.tensor([[3.0, 0.0], [-1.0, 0.0]])]
    models = [m.double() for m in models]
    assert_values(model_stock(base, models, [1.0] * 3, filter_wise=True),
           torch.tensor([[2.0, 0.0], [0.0, -1.0]], dtype=torch.float64))
    # flattened: the pairwise cosines of [1,0,1,0], [2,0,0,1], [3,0,-1,0] are
    # 2/(sqrt2 sqrt5), 2/(sqrt2 sqrt10), 6/(sqrt5 sqrt10): one t for the whole tensor
    flat = [m.reshape(-1) for m in models]
    cos = sum(float(a @ b) / float(a.norm() * b.norm())
              for a, b in itertools.combinations(flat, 2)) / 3
    t = 3 * cos / (1 + 2 * cos)
    assert_values(model_stock(base, models, [1.0] * 3), t * sum(models) / 3)


def test_filter_wise_1d_is_one_row() -> None:
    base = torch.zeros(2, dtype=torch.float64)
    models = [torch.tensor([1.0, 0.0], dtype=torch.float64),
              torch.tensor([1.0, 1.0], dtype=torch.float64)]
    assert torch.equal(model_stock(base, models, [1.0, 1.0], filter_wise=True),
                       model_stock(base, models, [1.0, 1.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype: torch.dtype) -> None:
    out = model_stock(BASE.to(dtype), [W1.to(dtype), W2.to(dtype)], [1.0, 1.0])
    assert out.dtype == dtype
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(out, EXPECTED.to(dtype), rtol=tol, atol=tol)


def test_api() -> None:
    out = merge_state_dicts({"w": BASE.float()}, [{"w": W1.float()}, {"w": W2.float()}],
                            "model_stock", parameters={"filter_wise": False})
    torch.testing.assert_close(out["w"], EXPECTED.float(), rtol=1e-6, atol=1e-6)


def test_needs_base_and_two_models() -> None:
    with pytest.raises(RecipeError, match="needs base_model"):
        merge_state_dicts(None, [{"w": W1}, {"w": W2}], "model_stock")
    with pytest.raises(RecipeError, match="needs at least 2 models"):
        merge_state_dicts({"w": BASE}, [{"w": W1}], "model_stock")
