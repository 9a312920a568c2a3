"""Model Breadcrumbs + Task Arithmetic: drop top-gamma outliers, keep the next density, sum."""

from __future__ import annotations

import torch

from mergewise import METHODS, merge_state_dicts
from mergewise.methods.task_arithmetic import task_arithmetic

# 10-element task vectors; gamma 0.1 drops 1 outlier, density 0.35 keeps the next 4:
#   D1: drop 10, keep -9 8 -7 6            -> [0, -9, 8, -7, 6, 0, 0, 0, 0, 0]
#   D2: drop the 5 (flat 9), keep the first four |1| (ties by index) -> [1, 1, 1, 1, 0 ...]
D1 = torch.tensor([10.0, -9.0, 8.0, -7.0, 6.0, -5.0, 4.0, -3.0, 2.0, -1.0])
D2 = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 5.0])
BASE = torch.ones(10)


def _models() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    return {"w": BASE.clone()}, [{"w": BASE + D1}, {"w": BASE + D2}]


def test_registration() -> None:
    m = METHODS.get("breadcrumbs")
    assert m.func is task_arithmetic
    assert m.sparsifier == "breadcrumbs"


def test_api_weights_and_lambda() -> None:
    base, models = _models()
    # weights 1, 3: [0, -9, 8, -7, 6, 0...] + [3, 3, 3, 3, 0...] = [3, -6, 11, -4, 6, 0...]
    # lambda 0.5 -> [1.5, -3, 5.5, -2, 3, 0...]; + 1
    out = merge_state_dicts(base, models, "breadcrumbs",
                            parameters={"density": 0.35, "gamma": 0.1, "lambda": 0.5},
                            model_parameters=[{"weight": 1.0}, {"weight": 3.0}])
    assert torch.equal(out["w"], torch.tensor([2.5, -2.0, 6.5, -1.0, 4.0, 1, 1, 1, 1, 1]))


def test_api_normalize() -> None:
    base, models = _models()
    # [3, -6, 11, -4, 6, 0...] / 4 = [0.75, -1.5, 2.75, -1, 1.5, 0...]; + 1
    out = merge_state_dicts(base, models, "breadcrumbs",
                            parameters={"density": 0.35, "gamma": 0.1, "normalize": True},
                            model_parameters=[{"weight": 1.0}, {"weight": 3.0}])
    assert torch.equal(out["w"], torch.tensor([1.75, -0.5, 3.75, 0.0, 2.5, 1, 1, 1, 1, 1]))


def test_api_defaults() -> None:
    base, models = _models()
    # mergekit's defaults: density 1.0 keeps every entry (gamma included): base + D1 + D2
    out = merge_state_dicts(base, models, "breadcrumbs")
    assert torch.equal(out["w"], base["w"] + (models[0]["w"] - base["w"])
                       + (models[1]["w"] - base["w"]))
    # density 0.9: gamma 0.01 on 10 -> 0 outliers; 9 kept: the smallest |tau| is dropped
    #   D1 -> drops -1 (flat 9); D2 -> drops the last |1| (flat 8)
    #   sum: [11, -8, 9, -6, 7, -4, 5, -2, 2, 5]; + 1
    out = merge_state_dicts(base, models, "breadcrumbs", parameters={"density": 0.9})
    assert torch.equal(out["w"], torch.tensor([12.0, -7.0, 10.0, -5.0, 8.0, -3.0, 6.0, -1.0,
                                               3.0, 6.0]))


def test_api_per_model_gamma() -> None:
    base, models = _models()
    # model 0 gamma 0 -> plain top-4: [10, -9, 8, -7, 0 ...]; model 1 as before [1, 1, 1, 1, 0...]
    out = merge_state_dicts(base, models, "breadcrumbs",
                            parameters={"density": 0.35},
                            model_parameters=[{"gamma": 0.0}, {"gamma": 0.1}])
    assert torch.equal(out["w"], torch.tensor([12.0, -7.0, 10.0, -5.0, 1, 1, 1, 1, 1, 1]))


def test_api_zero_task_vectors_and_one_element() -> None:
    base = {"w": torch.tensor([[0.5, -0.25]]), "s": torch.tensor([3.0])}
    out = merge_state_dicts(base, [dict(base), dict(base)], "breadcrumbs")
    for n in base:
        assert torch.equal(out[n], base[n])
    # a 1-element tensor is never an outlier: 3 + (2 + 4)
    models = [{"w": base["w"], "s": torch.tensor([5.0])}, {"w": base["w"], "s": torch.tensor([7.0])}]
    out = merge_state_dicts(base, models, "breadcrumbs", parameters={"gamma": 0.5})
    assert torch.equal(out["s"], torch.tensor([9.0]))
