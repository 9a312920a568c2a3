"""Breadcrumbs trim, then TIES sign election and disjoint merge."""

from __future__ import annotations

import pytest
import torch

from mergewise import METHODS, merge_state_dicts
from mergewise.methods.breadcrumbs_ties import breadcrumbs_ties_merge

# gamma 0.1 / density 0.35 on 10 entries: drop 1 outlier, keep the next 4 (see test_breadcrumbs)
#   T1 = [0, -9, 8, -7, 6, 0, 0, 0, 0, 0]
#   T2 = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
D1 = torch.tensor([10.0, -9.0, 8.0, -7.0, 6.0, -5.0, 4.0, -3.0, 2.0, -1.0])
D2 = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 5.0])
BASE = torch.full((10,), 2.0)
PARAMS = {"density": 0.35, "gamma": 0.1}


def _models() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    return {"w": BASE.clone()}, [{"w": BASE + D1}, {"w": BASE + D2}]


def test_registration() -> None:
    m = METHODS.get("breadcrumbs_ties")
    assert m.func is breadcrumbs_ties_merge
    assert m.sparsifier == "breadcrumbs"
    assert m.sparsifier_defaults == {"density": 1.0}  # mergekit: no trim unless asked
    normalize = next(p for p in m.params if p.name == "normalize")
    assert normalize.default is False  # mergekit: breadcrumbs_ties sums the agreeing entries


# weights 1, 1: sums [1, -8, 9, -6, 6, 0 ...] -> signs + - + - + (+ ...)
#   flat 0: 1 ; flat 1: -9 (the +1 disagrees) ; flat 2: 8, 1 ; flat 3: -7 ; flat 4: 6
@pytest.mark.parametrize(("aggregate", "tau"), [
    ("mean", [1.0, -9.0, 4.5, -7.0, 6.0, 0, 0, 0, 0, 0]),
    ("sum", [1.0, -9.0, 9.0, -7.0, 6.0, 0, 0, 0, 0, 0]),
    ("weighted_mean", [1.0, -9.0, 4.5, -7.0, 6.0, 0, 0, 0, 0, 0]),
])
def test_api_aggregates(aggregate: str, tau: list[float]) -> None:
    base, models = _models()
    out = merge_state_dicts(base, models, "breadcrumbs_ties",
                            parameters={**PARAMS, "aggregate": aggregate})
    assert torch.equal(out["w"], BASE + torch.tensor(tau))


def test_api_weights_weighted_mean_and_lambda() -> None:
    base, models = _models()
    # weights 1, 3: weighted T2 = [3, 3, 3, 3, 0...]; sums [3, -6, 11, -4, 6, 0...]
    #   flat 0: 3 / 3 = 1 ; flat 1: -9 / 1 ; flat 2: (8 + 3) / (1 + 3) = 2.75 ;
    #   flat 3: -7 / 1 ; flat 4: 6 / 1
    # lambda 2: [2, -18, 5.5, -14, 12, 0...]; + 2
    out = merge_state_dicts(base, models, "breadcrumbs_ties",
                            parameters={**PARAMS, "aggregate": "weighted_mean", "lambda": 2.0},
                            model_parameters=[{"weight": 1.0}, {"weight": 3.0}])
    assert torch.equal(out["w"], torch.tensor([4.0, -16.0, 7.5, -12.0, 14.0, 2, 2, 2, 2, 2]))


def test_api_zero_sum_counts_as_plus() -> None:
    base = {"w": torch.zeros(4)}
    models = [{"w": torch.tensor([-2.0, 1.0, 0.5, 8.0])}, {"w": torch.tensor([2.0, -1.0, 0.5, 9.0])}]
    # gamma 0.25 -> 1 outlier (8 resp. 9), density 0.5 -> next 2 kept:
    #   T1 = [-2, 1, 0, 0], T2 = [2, -1, 0, 0]; sums [0, 0, 0, 0] -> all + -> [2, 1, 0, 0]
    out = merge_state_dicts(base, models, "breadcrumbs_ties",
                            parameters={"density": 0.5, "gamma": 0.25})
    assert torch.equal(out["w"], torch.tensor([2.0, 1.0, 0.0, 0.0]))


def test_api_zero_task_vectors_give_base() -> None:
    base = {"w": torch.tensor([[0.3, -0.7], [1.1, 0.0]]).bfloat16()}
    out = merge_state_dicts(base, [dict(base), dict(base), dict(base)], "breadcrumbs_ties")
    assert out["w"].dtype == torch.bfloat16
    assert torch.equal(out["w"], base["w"])
