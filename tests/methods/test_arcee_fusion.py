"""Arcee Fusion: importance |b - a| * KL(softmax b || softmax a) per row, threshold median +
1.5 IQR with truncating quartile indices, exact (never sampled) for any size."""

from __future__ import annotations

import math

import pytest
import torch

from mergewise import METHODS, RecipeError, merge_state_dicts
from mergewise.methods.arcee_fusion import arcee_fusion, importance, quartiles

# Row 0 unchanged (KL = 0, importance 0); row 1 moves by d = [1, 2, 3, 40] from a uniform row,
# so its KL is c = KL(softmax([1, 2, 3, 40]) || uniform) ~ ln 4 and its importances are
# [c, 2c, 3c, 40c]. Sorted: [0, 0, 0, 0, c, 2c, 3c, 40c]; n - 1 = 7, indices floor(7/4) = 1,
# floor(7/2) = 3, floor(21/4) = 5 -> q1 = 0, median = 0, q3 = 2c; threshold = 0 + 1.5 * 2c = 3c.
# Kept: 3c (>= is inclusive) and 40c. (numpy's interpolated q3 = 2.25c would drop the 3.)
BASE = torch.zeros(2, 4)
MODEL = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 40.0]])
EXPECTED = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 40.0]])


def test_registration() -> None:
    m = METHODS.get("arcee_fusion")
    assert m.func is arcee_fusion
    assert m.space == "weight"
    assert m.requires_base and m.uses_base
    assert (m.min_models, m.max_models) == (1, 1)
    assert m.params == () and m.model_params == () and not m.accepts_sparsify


def test_importance_of_one_row() -> None:
    # softmax([0, ln 3]) = [1/4, 3/4], softmax([0, 0]) = [1/2, 1/2]:
    # KL = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.13081...; importance = |d| KL = [0, ln 3 * KL]
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    out = importance(torch.tensor([0.0, math.log(3.0)]), torch.zeros(2))
    torch.testing.assert_close(out, torch.tensor([0.0, math.log(3.0) * kl]), rtol=1e-6, atol=0)


def test_quartiles_truncate() -> None:
    # sorted 0..7: indices 1, 3, 5
    assert [float(q) for q in quartiles(torch.tensor([5.0, 1, 4, 2, 3, 0, 6, 7]))] == [1, 3, 5]
    # n = 5: indices 1, 2, 3
    assert [float(q) for q in quartiles(torch.tensor([50.0, 10, 40, 20, 30]))] == [20, 30, 40]
    # n = 1: everything is index 0
    assert [float(q) for q in quartiles(torch.tensor([7.0]))] == [7, 7, 7]


def test_hand_values() -> None:
    assert torch.equal(arcee_fusion(BASE, [MODEL], [1.0]), EXPECTED)
    # a non-zero base: the kept entries are base + (model - base)
    base = BASE + 1.0
    assert torch.equal(arcee_fusion(base, [MODEL + 1.0], [1.0]), EXPECTED + 1.0)


def test_identical_and_zero_tensors() -> None:
    # no change: all importances 0 = threshold, every entry "kept", base + 0
    a = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    assert torch.equal(arcee_fusion(a, [a.clone()], [1.0]), a)
    assert torch.equal(arcee_fusion(torch.zeros(3), [torch.zeros(3)], [1.0]), torch.zeros(3))
    assert torch.equal(arcee_fusion(torch.zeros(0, 4), [torch.zeros(0, 4)], [1.0]),
                       torch.zeros(0, 4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_stays_in_the_compute_dtype(dtype: torch.dtype) -> None:
    # mergekit returns float32 for bfloat16/float16 inputs (its mask is float32)
    out = arcee_fusion(BASE.to(dtype), [MODEL.to(dtype)], [1.0])
    assert out.dtype == dtype
    assert torch.equal(out, EXPECTED.to(dtype))


def test_float16_importance_has_no_nan() -> None:
    # in float16 the 1e-8 is 0: softmax([1, 2, 3, 40]) underflows to [0, 0, 0, 1] and 0 log 0
    # is NaN, which kept mergekit's whole row at the base; computed in float32 it is finite
    scores = importance(MODEL.half(), BASE.half())
    assert scores.dtype == torch.float32 and bool(torch.isfinite(scores).all())


def test_large_tensor_exact_and_deterministic() -> None:
    # over 1M entries mergekit samples 1M quartile points from the global RNG; here the
    # quartiles are the exact order statistics of all entries at floor(q (n - 1))
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1001, 1000, generator=g)
    model = base + 0.05 * torch.randn(1001, 1000, generator=g) ** 3
    state = torch.get_rng_state()
    out = arcee_fusion(base, [model], [1.0])
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is not touched
    assert torch.equal(arcee_fusion(base, [model], [1.0]), out)
    # reference: a full sort, indices in exact integer arithmetic
    scores = importance(model, base)
    ordered = torch.sort(scores.reshape(-1)).values
    n = ordered.numel()
    assert n > 1_000_000
    q1, med, q3 = (ordered[(k * (n - 1)) // 4] for k in (1, 2, 3))
    keep = scores >= med + 1.5 * (q3 - q1)
    assert 0 < int(keep.sum()) < n
    assert torch.equal(out, base + (model - base) * keep)


def test_api() -> None:
    out = merge_state_dicts({"w": BASE, "b": torch.zeros(4)},
                            [{"w": MODEL, "b": torch.tensor([1.0, 2.0, 3.0, 40.0])}],
                            "arcee_fusion")
    assert torch.equal(out["w"], EXPECTED)
    # a 1-D tensor is one row: KL c > 0, importances [c, 2c, 3c, 40c], sorted indices 0, 1, 2
    # -> q1 = c, median = 2c, q3 = 3c, threshold 2c + 1.5 * 2c = 5c: only 40 kept
    assert torch.equal(out["b"], torch.tensor([0.0, 0.0, 0.0, 40.0]))
    out = merge_state_dicts({"w": BASE}, [{"w": MODEL}], "arcee_fusion", dtype="bfloat16",
                            out_dtype="float32")
    assert out["w"].dtype == torch.float32 and torch.equal(out["w"], EXPECTED)


def test_needs_base_and_one_model() -> None:
    with pytest.raises(RecipeError, match="needs base_model"):
        merge_state_dicts(None, [{"w": MODEL}], "arcee_fusion")
    with pytest.raises(RecipeError, match="needs exactly 1 models"):
        merge_state_dicts({"w": BASE}, [{"w": MODEL}, {"w": MODEL}], "arcee_fusion")
