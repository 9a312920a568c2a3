"""SCE: select the highest-variance entries, weight the tasks by mean(tau^2), erase entries
against the elected sign; a ``sparsify:`` block (TADrop) runs first."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from value_helpers import assert_values

from mergewise import METHODS, RecipeError, merge_state_dicts
from mergewise.methods.sce import sce, task_weights

# Three task vectors of one 2 x 2 tensor
T1 = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=torch.float64)
T2 = torch.tensor([[1.0, -2.0], [0.0, 3.0]], dtype=torch.float64)
T3 = torch.tensor([[1.0, 4.0], [0.0, -1.0]], dtype=torch.float64)
ZERO = torch.zeros(2, 2, dtype=torch.float64)


def variances(tvs: list[list[float]]) -> list[Fraction]:
    """Exact population variance of each entry across the tasks."""
    n = len(tvs)
    out = []
    for j in range(len(tvs[0])):
        values = [Fraction(t[j]) for t in tvs]
        mean = sum(values) / n
        out.append(sum((v - mean) ** 2 for v in values) / n)
    return out


def select_count(select_topk: float, count: int) -> int:
    return max(1, math.floor(select_topk * count + 0.5)) if count else 0


def reference(tvs: list[list[float]], select_topk: float = 1.0) -> list[float]:
    """The note's formulas on flat Python lists (k by round-half-up, ties by index)."""
    n, m = len(tvs), len(tvs[0])
    tvs = [list(t) for t in tvs]
    if select_topk < 1:
        var = variances(tvs)
        k = select_count(select_topk, sum(v != 0 for v in var))
        keep = set(sorted(range(m), key=lambda j: (-var[j], j))[:k])
        tvs = [[t[j] if j in keep else 0.0 for j in range(m)] for t in tvs]
    energy = [sum(v * v for v in t) / m for t in tvs]
    total = sum(energy)
    w = [e / total for e in energy] if total else [1.0 / n] * n
    out = []
    for j in range(m):
        sign = 1.0 if sum(t[j] for t in tvs) >= 0 else -1.0
        agree = [i for i in range(n) if tvs[i][j] * sign > 0]
        num = sum(w[i] * tvs[i][j] for i in agree)
        out.append(num / max(sum(w[i] for i in agree), 1e-6))
    return out


def test_registration() -> None:
    m = METHODS.get("sce")
    assert m.func is sce
    assert m.space == "delta" and m.requires_base
    assert m.sparsifier is None and m.accepts_sparsify
    assert [(p.name, p.default) for p in m.params] == [("select_topk", 1.0), ("int8_mask", False)]
    assert m.model_params == ()


def test_without_selection() -> None:
    # energies mean(tau^2): T1 (1 + 4 + 0 + 1)/4 = 1.5, T2 (1 + 4 + 0 + 9)/4 = 3.5,
    # T3 (1 + 16 + 0 + 1)/4 = 4.5 -> w = [3, 7, 9] / 19
    # (0,0) [1, 1, 1]: all agree -> (3 + 7 + 9)/19 / (19/19) = 1
    # (0,1) [2, -2, 4]: sum 4 -> +, T1 and T3 -> (2*3 + 4*9) / (3 + 9) = 42/12 = 3.5
    # (1,0) [0, 0, 0]: nobody (zeros never agree) -> 0
    # (1,1) [-1, 3, -1]: sum 1 -> +, T2 alone -> 3
    assert_values(sce(ZERO, [T1, T2, T3], [1.0] * 3), [[1.0, 3.5], [0.0, 3.0]])
    base = torch.tensor([[10.0, -10.0], [1.0, 2.0]], dtype=torch.float64)
    assert_values(sce(base, [T1, T2, T3], [1.0] * 3), [[11.0, -6.5], [1.0, 5.0]])


def test_task_weights() -> None:
    tv = torch.stack([T1, T2, T3])
    assert_values(task_weights(tv), [3 / 19, 7 / 19, 9 / 19])
    # all zero: uniform
    assert_values(task_weights(torch.zeros(2, 3, dtype=torch.float64)), [0.5, 0.5])


def test_select_topk() -> None:
    # population variances across the tasks: (0,0) 0; (0,1) of [2, -2, 4]: 168/27;
    # (1,0) 0; (1,1) of [-1, 3, -1]: 96/27. Two are non-zero; select_topk 0.5 keeps 1: (0,1).
    # Selected: T1 [[0, 2], [0, 0]], T2 [[0, -2], [0, 0]], T3 [[0, 4], [0, 0]];
    # energies 1, 1, 4 -> w = [1, 1, 4]/6; (0,1): sum 4 -> +: T1, T3 -> (2 + 16)/6 / (5/6) = 3.6
    assert_values(sce(ZERO, [T1, T2, T3], [1.0] * 3, select_topk=0.5), [[0.0, 3.6], [0.0, 0.0]])


def test_select_count_rounds_half_up_ties_by_index() -> None:
    # 1-D, two tasks: variances [1, 1, 2.25, 0] (3 non-zero); select_topk 0.5 keeps
    # round-half-up(1.5) = 2 (mergekit: int(1.5) = 1): entry 2, and of the tie at 1 entry 0.
    # Selected: [1, 0, 3, 0] and [-1, 0, 0, 0]; energies 10/4, 1/4 -> w = [10, 1]/11.
    # entry 0: sum 0 -> +: first task alone -> 1; entry 2: 3
    a = torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=torch.float64)
    b = torch.tensor([-1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert_values(sce(torch.zeros(4, dtype=torch.float64), [a, b], [1.0, 1.0], select_topk=0.5),
           [1.0, 0.0, 3.0, 0.0])


def test_small_task_vectors_keep_their_weights() -> None:
    # tau ~ 1e-4: energies 1e-8 and 5e-8, sum 6e-8 < 1e-6, where mergekit falls back to uniform
    # weights ((1 + 3)/2 = 2e-4 at entry 0). Here w = [1, 5]/6:
    # entry 0 [1, 3]e-4: both agree -> (1 * 1 + 3 * 5)/6 e-4 = 16/6 e-4
    # entry 1 [1, -1]e-4: sum 0 -> +: the first -> 1e-4
    a = torch.tensor([1e-4, 1e-4], dtype=torch.float64)
    b = torch.tensor([3e-4, -1e-4], dtype=torch.float64)
    base = torch.zeros(2, dtype=torch.float64)
    out = sce(base, [a, b], [1.0, 1.0])
    assert_values(out, [16 / 6 * 1e-4, 1e-4], tol=1e-15)
    # and the result scales with the task vectors
    assert_values(sce(base, [a * 1e4, b * 1e4], [1.0, 1.0]), (out * 1e4).tolist(), tol=1e-12)


def test_one_model() -> None:
    # without selection: the model itself (its own weight 1 over its own weight)
    base = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    tv = torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64)
    assert_values(sce(base, [tv], [1.0]), [1.5, 1.0, 3.0])
    # with selection: one model's variance is 0 everywhere (mergekit: nothing kept, the base)
    with pytest.raises(RecipeError, match="two or more models"):
        sce(base, [tv], [1.0], select_topk=0.5)


def test_int8_mask_has_no_effect() -> None:
    for topk in (1.0, 0.5):
        assert torch.equal(sce(ZERO, [T1, T2, T3], [1.0] * 3, select_topk=topk, int8_mask=True),
                           sce(ZERO, [T1, T2, T3], [1.0] * 3, select_topk=topk))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype: torch.dtype) -> None:
    out = sce(ZERO.to(dtype), [T1.to(dtype), T2.to(dtype), T3.to(dtype)], [1.0] * 3)
    assert out.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert_values(out, [[1.0, 3.5], [0.0, 3.0]], tol=tol)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), k=st.integers(2, 4), m=st.integers(1, 10),
       topk=st.sampled_from([0.25, 0.5, 0.75, 1.0]))
def test_property_matches_the_reference(data: st.DataObject, k: int, m: int,
                                        topk: float) -> None:
    tvs = [data.draw(st.lists(st.integers(-3, 3), min_size=m, max_size=m)) for _ in range(k)]
    if topk < 1:
        # mathematically equal variances may round apart in float64 (14/9 as ...54 and ...56):
        # only draws without a tie across the selection boundary have one right answer
        var = sorted(variances([[float(v) for v in t] for t in tvs]), reverse=True)
        kept = select_count(topk, sum(v != 0 for v in var))
        assume(kept == 0 or kept == m or var[kept - 1] != var[kept])
    tensors = [torch.tensor(t, dtype=torch.float64) for t in tvs]
    out = sce(torch.zeros(m, dtype=torch.float64), tensors, [1.0] * k, select_topk=topk)
    assert_values(out, reference([[float(v) for v in t] for t in tvs], topk))


def test_api_and_recipe_checks() -> None:
    base = {"w": ZERO.float()}
    models = [{"w": (ZERO + t).float()} for t in (T1, T2, T3)]
    out = merge_state_dicts(base, models, "sce", parameters={"select_topk": 0.5})
    assert_values(out["w"], [[0.0, 3.6], [0.0, 0.0]], tol=1e-6)
    with pytest.raises(RecipeError, match="'select_topk' = 0.0 is out of range"):
        merge_state_dicts(base, models, "sce", parameters={"select_topk": 0.0})
    with pytest.raises(RecipeError, match="'select_topk' = 1.5 is out of range"):
        merge_state_dicts(base, models, "sce", parameters={"select_topk": 1.5})
    with pytest.raises(RecipeError, match="unknown parameter 'weight'"):
        merge_state_dicts(base, models, "sce", parameters={"weight": 1.0})
    with pytest.raises(RecipeError, match="needs base_model"):
        merge_state_dicts(None, models, "sce")


def test_tadrop_block_runs_before_select() -> None:
    # TADrop drop_rate 0.5 on one tensor: d_ref is its own d, so p = 0.5 exactly and each task
    # vector keeps round-half-up(0.5 x 4) = 2 entries (largest |tau|, ties by index):
    #   T1 |.| [1, 2, 0, 1] -> 2 (idx 1) and 1 (idx 0 beats idx 3): [[1, 2], [0, 0]]
    #   T2 |.| [1, 2, 0, 3] -> 3, 2:                                  [[0, -2], [0, 3]]
    #   T3 |.| [1, 4, 0, 1] -> 4, 1 (idx 0):                          [[1, 4], [0, 0]]
    base = {"w": ZERO.float()}
    models = [{"w": (ZERO + t).float()} for t in (T1, T2, T3)]
    records: list = []
    out = merge_state_dicts(base, models, "sce", records=records,
                            sparsify={"method": "tadrop", "drop_rate": 0.5, "rescale": "none"})
    assert [m["kept"] for m in records[0]["models"]] == [2, 2, 2]
    # energies (1 + 4)/4, (4 + 9)/4, (1 + 16)/4 -> w = [5, 13, 17]/35
    # (0,0) [1, 0, 1]: T1, T3 -> (5 + 17)/22 = 1;  (0,1) [2, -2, 4]: T1, T3 -> (10 + 68)/22 = 39/11
    # (1,1) [0, 3, 0]: T2 -> 3  (without the block: [[1, 3.5], [0, 3]])
    assert_values(out["w"], [[1.0, 39 / 11], [0.0, 3.0]], tol=1e-6)
    # with TADrop's default L2 rescale the kept entries grow by |tau| / |kept|:
    # sqrt(6/5), sqrt(14/13), sqrt(18/17)
    out = merge_state_dicts(base, models, "sce", sparsify={"method": "tadrop", "drop_rate": 0.5})
    kept = [[1.0, 2.0, 0.0, 0.0], [0.0, -2.0, 0.0, 3.0], [1.0, 4.0, 0.0, 0.0]]
    factors = [math.sqrt(6 / 5), math.sqrt(14 / 13), math.sqrt(18 / 17)]
    expected = reference([[f * v for v in t] for f, t in zip(factors, kept, strict=True)])
    assert_values(out["w"].reshape(-1), expected, tol=1e-6)
