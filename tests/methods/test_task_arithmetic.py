"""Task Arithmetic: theta = theta0 + lambda * sum_k w_k tau_k (optionally / sum w, trimmed)."""

from __future__ import annotations

import pytest
import torch

from mergewise import METHODS, RecipeError, merge_state_dicts
from mergewise.methods.task_arithmetic import task_arithmetic

BASE = torch.ones(2, 2)
D1 = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
D2 = torch.tensor([[3.0, 2.0], [-0.5, 4.0]])


def test_registration() -> None:
    m = METHODS.get("task_arithmetic")
    assert m.space == "delta"
    assert m.sparsifier == "magnitude"
    assert m.sparsifier_defaults == {"density": 1.0}


def test_weighted_sum_with_lambda() -> None:
    # D1 + 3 D2 = [[1+9, -2+6], [0.5-1.5, 0+12]] = [[10, 4], [-1, 12]]
    # 1 + 0.5 * that = [[6, 3], [0.5, 7]]
    out = task_arithmetic(BASE, [D1, D2], [1.0, 3.0], lam=0.5)
    assert torch.equal(out, torch.tensor([[6.0, 3.0], [0.5, 7.0]]))


def test_normalize() -> None:
    # [[10, 4], [-1, 12]] / (1 + 3) = [[2.5, 1], [-0.25, 3]]; 1 + 0.5 * that
    out = task_arithmetic(BASE, [D1, D2], [1.0, 3.0], lam=0.5, normalize=True)
    assert torch.equal(out, torch.tensor([[2.25, 1.5], [0.875, 2.5]]))


def test_defaults_plain_sum() -> None:
    # lam 1, no normalisation: 1 + D1 + D2 = [[5, 1], [1, 5]]
    out = task_arithmetic(BASE, [D1, D2], [1.0, 1.0])
    assert torch.equal(out, torch.tensor([[5.0, 1.0], [1.0, 5.0]]))


def test_negative_lambda_and_weight() -> None:
    # 1 - (2 D1 - D2) = 1 - [[-1, -6], [1.5, -4]] = [[2, 7], [-0.5, 5]]
    out = task_arithmetic(BASE, [D1, D2], [2.0, -1.0], lam=-1.0)
    assert torch.equal(out, torch.tensor([[2.0, 7.0], [-0.5, 5.0]]))


def test_zero_task_vectors_give_base() -> None:
    base = torch.tensor([[0.3, -1.7], [2.9, 1e-8]])
    z = torch.zeros(2, 2)
    assert torch.equal(task_arithmetic(base, [z, z], [0.7, 0.6], lam=1.3, normalize=True), base)


def test_normalize_zero_weights_raises() -> None:
    with pytest.raises(RecipeError, match="normalize"):
        task_arithmetic(BASE, [D1, D2], [1.0, -1.0], normalize=True)


def test_one_element() -> None:
    out = task_arithmetic(torch.tensor([1.0]), [torch.tensor([2.0]), torch.tensor([-4.0])],
                          [1.0, 1.0], lam=0.25)
    assert torch.equal(out, torch.tensor([0.5]))  # 1 + 0.25 * (2 - 4)


# --- through the public API (sparsifier + method) --------------------------------------------

BASE_23 = torch.ones(2, 3)
T1 = torch.tensor([[1.0, -2.0, 3.0], [0.0, 4.0, -1.0]])
T2 = torch.tensor([[2.0, -3.0, -3.0], [0.0, -4.0, -1.0]])


def _sds() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    return {"w": BASE_23.clone()}, [{"w": BASE_23 + T1}, {"w": BASE_23 + T2}]


def test_api_default_no_trim() -> None:
    base, models = _sds()
    out = merge_state_dicts(base, models, "task_arithmetic")
    # 1 + T1 + T2 = 1 + [[3, -5, 0], [0, 0, -2]]
    assert torch.equal(out["w"], torch.tensor([[4.0, -4.0, 1.0], [1.0, 1.0, -1.0]]))


def test_api_trim_weights_lambda() -> None:
    base, models = _sds()
    # density 0.5 on 6 -> 3 kept per model:
    #   T1 |.| = 1 2 3 0 4 1 -> 4, 3, 2 -> [[0, -2, 3], [0, 4, 0]]
    #   T2 |.| = 2 3 3 0 4 1 -> 4, 3 (flat 1), 3 (flat 2) -> [[0, -3, -3], [0, -4, 0]]
    # weights 2, 1: [[0, -7, 3], [0, 4, 0]]; lambda 0.5 -> [[0, -3.5, 1.5], [0, 2, 0]]; + 1
    out = merge_state_dicts(base, models, "task_arithmetic",
                            parameters={"density": 0.5, "lambda": 0.5},
                            model_parameters=[{"weight": 2.0}, {"weight": 1.0}])
    assert torch.equal(out["w"], torch.tensor([[1.0, -2.5, 2.5], [1.0, 3.0, 1.0]]))


def test_api_normalize_per_model_density() -> None:
    base, models = _sds()
    # model 0 density 0.5 -> [[0, -2, 3], [0, 4, 0]]; model 1 density 0.2 -> 1 kept: -4 (flat 4)
    # weights 1, 3: [[0, -2, 3], [0, 4 - 12, 0]] / 4 = [[0, -0.5, 0.75], [0, -2, 0]]; + 1
    out = merge_state_dicts(base, models, "task_arithmetic",
                            parameters={"normalize": True},
                            model_parameters=[{"weight": 1.0, "density": 0.5},
                                              {"weight": 3.0, "density": 0.2}])
    assert torch.equal(out["w"], torch.tensor([[1.0, 0.5, 1.75], [1.0, -1.0, 1.0]]))


def test_api_lambda_per_tensor_filter() -> None:
    base = {"a.weight": torch.zeros(2), "b.weight": torch.zeros(2)}
    models = [{"a.weight": torch.tensor([1.0, 2.0]), "b.weight": torch.tensor([3.0, 4.0])}]
    out = merge_state_dicts(base, models, "task_arithmetic",
                            parameters={"lambda": [{"glob": "a.*", "value": 2.0},
                                                   {"value": 0.0}]})
    assert torch.equal(out["a.weight"], torch.tensor([2.0, 4.0]))
    assert torch.equal(out["b.weight"], torch.tensor([0.0, 0.0]))


def test_api_global_scope() -> None:
    base = {"a": torch.full((2, 2), 0.5), "b": torch.full((3,), 0.5)}
    m1 = {"a": base["a"] + torch.tensor([[1.0, -1.0], [1.0, 0.0]]),
          "b": base["b"] + torch.tensor([3.0, -2.0, 3.0])}
    m2 = {"a": base["a"] + torch.tensor([[-2.0, 1.0], [1.0, 1.0]]),
          "b": base["b"] + torch.tensor([-1.0, 2.0, -2.0])}
    # N = 7, density 0.4 -> 3 kept per model, model-wide:
    #   m1 |tau| = 1 1 1 0 | 3 2 3 -> all of b, nothing of a
    #   m2 |tau| = 2 1 1 1 | 1 2 2 -> a[0,0], b[1], b[2]
    # sum: a = [[-2, 0], [0, 0]], b = [3, -2 + 2, 3 - 2] = [3, 0, 1]; + 0.5
    out = merge_state_dicts(base, [m1, m2], "task_arithmetic",
                            parameters={"density": 0.4, "scope": "global"})
    assert torch.equal(out["a"], torch.tensor([[-1.5, 0.5], [0.5, 0.5]]))
    assert torch.equal(out["b"], torch.tensor([3.5, 0.5, 1.5]))


@pytest.mark.parametrize(("dtype", "compute"), [
    (torch.float32, "float32"), (torch.bfloat16, "float32"), (torch.float64, "float64"),
    (torch.float16, "float32"),
])
def test_api_zero_task_vectors_give_base(dtype: torch.dtype, compute: str) -> None:
    base = {"w": torch.tensor([[0.3, -1.7, 2.9], [1e-8, -0.0, 123.4]], dtype=dtype),
            "v": torch.tensor([0.1], dtype=dtype)}
    models = [{k: v.clone() for k, v in base.items()} for _ in range(2)]
    out = merge_state_dicts(base, models, "task_arithmetic",
                            parameters={"lambda": 1.7, "normalize": True, "density": 0.5},
                            model_parameters=[{"weight": 0.3}, {"weight": 2.0}], dtype=compute,
                            out_dtype=str(dtype).removeprefix("torch."))
    for k in base:
        assert out[k].dtype == dtype
        assert torch.equal(out[k], base[k])


def test_api_bf16_matches_float64_reference() -> None:
    g = torch.Generator().manual_seed(11)
    base = {"w": torch.randn(8, 8, generator=g).bfloat16()}
    models = [{"w": (base["w"].float() + 0.1 * torch.randn(8, 8, generator=g)).bfloat16()}
              for _ in range(3)]
    params = {"lambda": 0.7}
    weights = [{"weight": 0.5}, {"weight": 1.0}, {"weight": 0.25}]
    out = merge_state_dicts(base, models, "task_arithmetic", parameters=params,
                            model_parameters=weights)
    ref = merge_state_dicts({"w": base["w"].double()}, [{"w": m["w"].double()} for m in models],
                            "task_arithmetic", parameters=params, model_parameters=weights,
                            dtype="float64")
    assert out["w"].dtype == torch.bfloat16
    # float32 math on exactly upcast inputs, then one rounding to bf16: within one bf16 ulp
    torch.testing.assert_close(out["w"].double(), ref["w"], rtol=2.0**-8, atol=1e-6)
    out32 = merge_state_dicts(base, models, "task_arithmetic", parameters=params,
                              model_parameters=weights, out_dtype="float32")
    assert out32["w"].dtype == torch.float32
    torch.testing.assert_close(out32["w"].double(), ref["w"], rtol=1e-6, atol=1e-6)
