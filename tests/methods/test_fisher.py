"""Fisher merging: exact values of the weighted average on hand-made Fisher tensors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergewise import METHODS, FeatureError, RecipeError, merge_state_dicts
from mergewise.features import TensorFeature
from mergewise.features.fisherfile import FisherFeature, FisherStats
from mergewise.methods.fisher import fisher_merge

D64 = torch.float64


def feat(values: list[float], norm: float = 1.0) -> FisherFeature:
    return FisherFeature("fisher", 4.0, fisher=torch.tensor(values), norm=norm)


def test_registration() -> None:
    m = METHODS.get("fisher")
    assert m.space == "weight" and m.features and m.feature_stats == "fisher"
    assert not m.requires_base and not m.accepts_sparsify
    assert [(p.name, p.default) for p in m.params] == [("normalize", True),
                                                       ("minimal_fisher_weight", 1e-6)]
    assert [(p.name, p.default, p.low) for p in m.model_params] == [("weight", 1.0, 0.0)]


def test_fisher_weighted_average_by_hand() -> None:
    # entry 0: (3*1 + 1*5)/(3 + 1) = 2; entry 1: (0*2 + 4*6)/(0 + 4) = 6; no eps, no normalize
    out = fisher_merge(None, [torch.tensor([1.0, 2.0]), torch.tensor([5.0, 6.0])], [1.0, 1.0],
                       features=[feat([3.0, 0.0]), feat([1.0, 4.0])], normalize=False,
                       minimal_fisher_weight=0.0)
    assert torch.equal(out, torch.tensor([2.0, 6.0]))


def test_scaling_coefficients_and_eps_by_hand() -> None:
    # lambda = (1, 3), F = (1, 1), eps 1: weights 1*2 and 3*2 -> (2*0 + 6*8)/8 = 6
    out = fisher_merge(None, [torch.tensor([0.0]), torch.tensor([8.0])], [1.0, 3.0],
                       features=[feat([1.0]), feat([1.0])], normalize=False,
                       minimal_fisher_weight=1.0)
    assert torch.equal(out, torch.tensor([6.0]))


def test_normalize_divides_by_the_whole_model_norm() -> None:
    # norms 1 and 3: c = 1/1, 1/3; F = (2, 6) -> weights 2 and 2 -> plain mean (1 + 7)/2 = 4
    out = fisher_merge(None, [torch.tensor([1.0]), torch.tensor([7.0])], [1.0, 1.0],
                       features=[feat([2.0], norm=1.0), feat([6.0], norm=3.0)],
                       minimal_fisher_weight=0.0)
    assert torch.equal(out, torch.tensor([4.0]))
    # without normalize the larger Fisher wins: (2*1 + 6*7)/8 = 5.5
    out = fisher_merge(None, [torch.tensor([1.0]), torch.tensor([7.0])], [1.0, 1.0],
                       features=[feat([2.0], norm=1.0), feat([6.0], norm=3.0)],
                       normalize=False, minimal_fisher_weight=0.0)
    assert torch.equal(out, torch.tensor([5.5]))


def test_without_any_fisher_the_weighted_mean() -> None:
    out = fisher_merge(None, [torch.tensor([1.0, 2.0]), torch.tensor([4.0, 8.0])], [2.0, 1.0],
                       features=[None, None])
    assert torch.equal(out, torch.tensor([2.0, 4.0]))  # (2*1 + 4)/3, (2*2 + 8)/3


def test_entries_without_fisher_mass_take_the_weighted_mean() -> None:
    # eps 0: entry 1 has F = 0 in both experts -> the plain mean (2 + 6)/2, never NaN
    out = fisher_merge(None, [torch.tensor([1.0, 2.0]), torch.tensor([5.0, 6.0])], [1.0, 1.0],
                       features=[feat([1.0, 0.0]), feat([3.0, 0.0])], normalize=False,
                       minimal_fisher_weight=0.0)
    assert torch.equal(out, torch.tensor([4.0, 4.0]))  # (1 + 15)/4 = 4 and (2 + 6)/2 = 4
    # normalize with an all-zero Fisher and eps 0: that expert adds nothing
    out = fisher_merge(None, [torch.tensor([1.0]), torch.tensor([5.0])], [1.0, 1.0],
                       features=[feat([0.0], norm=0.0), feat([2.0], norm=2.0)],
                       minimal_fisher_weight=0.0)
    assert torch.equal(out, torch.tensor([5.0]))


def test_an_expert_without_fisher_counts_nothing() -> None:
    out = fisher_merge(None, [torch.tensor([1.0]), torch.tensor([9.0]), torch.tensor([3.0])],
                       [1.0, 1.0, 1.0], features=[feat([1.0]), None, feat([1.0])],
                       normalize=False, minimal_fisher_weight=0.0)
    assert torch.equal(out, torch.tensor([2.0]))


def test_bad_inputs_are_one_line_errors() -> None:
    with pytest.raises(RecipeError, match="weights sum to 0"):
        fisher_merge(None, [torch.ones(1), torch.ones(1)], [0.0, 0.0], features=[None, None])
    gram = TensorFeature("matmul", 2.0, gram=torch.eye(1, dtype=D64))
    with pytest.raises(FeatureError, match="needs Fisher statistics, got 'matmul'"):
        fisher_merge(None, [torch.ones(1, 1)], [1.0], features=[gram], name="w")


def test_recipe_values_are_checked() -> None:
    stats = [FisherStats({"w": (1,)}, {"fisher:w": torch.ones(1)},
                         metadata={"examples": "1", "rows": "1", "fisher_norm": "1.0"})
             for _ in range(2)]
    sds = [{"w": torch.ones(1)}, {"w": torch.zeros(1)}]
    with pytest.raises(RecipeError, match="weight"):
        merge_state_dicts(None, sds, "fisher", model_parameters=[{"weight": -1.0}, {}],
                          features=stats)
    with pytest.raises(RecipeError, match="minimal_fisher_weight"):
        merge_state_dicts(None, sds, "fisher", parameters={"minimal_fisher_weight": -1e-3},
                          features=stats)
    out = merge_state_dicts(None, sds, "fisher", features=stats)
    torch.testing.assert_close(out["w"], torch.tensor([0.5]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-5, 5), st.floats(0, 1e38), st.floats(0, 1e300)),
                min_size=1, max_size=4).filter(lambda rows: any(lam > 0 for *_, lam in rows)),
       st.booleans(), st.floats(0, 1))
def test_result_lies_between_the_experts(rows, normalize, eps) -> None:
    """A convex combination per entry: between the smallest and the largest expert value, and
    the very value when every expert agrees; subnormal or huge Fisher values and weights
    included (no overflow to inf, no NaN)."""
    tensors = [torch.tensor([v], dtype=D64) for v, _, _ in rows]
    feats = [FisherFeature("fisher", 1.0, fisher=torch.tensor([f], dtype=D64), norm=f)
             for _, f, _ in rows]
    lams = [lam for _, _, lam in rows]
    out = fisher_merge(None, tensors, lams, features=feats, normalize=normalize,
                       minimal_fisher_weight=eps)
    values = [v for v, _, _ in rows]
    assert min(values) - 1e-9 <= float(out) <= max(values) + 1e-9
    same = fisher_merge(None, [tensors[0]] * len(rows), lams, features=feats,
                        normalize=normalize, minimal_fisher_weight=eps)
    torch.testing.assert_close(same, tensors[0], rtol=1e-12, atol=1e-12)


def test_a_subnormal_fisher_does_not_make_nan() -> None:
    # found by hypothesis: 1/(5e-324) is inf, and inf·F·0 was NaN
    out = fisher_merge(None, [torch.tensor([0.0], dtype=D64)], [1.0],
                       features=[FisherFeature("fisher", 1.0, fisher=torch.tensor([5e-324], dtype=D64),
                                               norm=5e-324)], minimal_fisher_weight=0.0)
    assert torch.equal(out, torch.tensor([0.0], dtype=D64))
