"""DELLA + task arithmetic: MagPrune (seeded, L1 rescale), then base + lambda sum w tau, with
mergekit's normalize default (false); a TADrop block replaces MagPrune."""

from __future__ import annotations

import pytest
import torch

from mergewise import METHODS, RecipeError, merge_state_dicts
from mergewise.methods.task_arithmetic import task_arithmetic
from mergewise.rng import tensor_generator

TV1 = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
TV2 = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-4.0, -3.0, -2.0, -1.0]])
# density 0.5, epsilon 0.3: p = 0.2 + 0.6 rank / 3 per row
P1 = torch.tensor([[0.8, 0.6, 0.4, 0.2], [0.2, 0.4, 0.6, 0.8]])
P2 = torch.tensor([[0.2, 0.4, 0.6, 0.8], [0.8, 0.6, 0.4, 0.2]])
BASE = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]])
MODELS = [{"w": BASE + TV1}, {"w": BASE + TV2}]


def keep(seed: int, model: int, p: torch.Tensor | float) -> torch.Tensor:
    return torch.rand(2, 4, generator=tensor_generator(seed, model, "w")) < p


def test_registration() -> None:
    m = METHODS.get("della_linear")
    assert m.func is task_arithmetic
    assert m.space == "delta" and m.requires_base
    assert m.sparsifier == "magprune" and m.accepts_sparsify
    assert {p.name: p.default for p in m.params} == {"lambda": 1.0, "normalize": False,
                                                      "int8_mask": False}


def test_density_one_is_task_arithmetic() -> None:
    # base + TV1 + TV2 = base + [[3, 1, -1, -3], [-3, -1, 1, 3]]
    out = merge_state_dicts({"w": BASE}, MODELS, "della_linear")
    assert torch.equal(out["w"], BASE + torch.tensor([[3.0, 1.0, -1.0, -3.0],
                                                      [-3.0, -1.0, 1.0, 3.0]]))


def test_seeded_magprune_then_weighted_sum() -> None:
    out = merge_state_dicts({"w": BASE}, MODELS, "della_linear", seed=4,
                            parameters={"density": 0.5, "epsilon": 0.3, "lambda": 2.0},
                            model_parameters=[{"weight": 0.5}, {"weight": 1.5}])
    expected = BASE.clone()
    for model, (tv, p, w) in enumerate([(TV1, P1, 0.5), (TV2, P2, 1.5)]):
        kept = tv * keep(4, model, p)
        # L1 rescale: sum |tau| = 20 over sum |kept|
        expected += 2.0 * w * kept * (20.0 / float(kept.abs().sum()))
    torch.testing.assert_close(out["w"], expected, rtol=1e-6, atol=1e-6)


def test_normalize_and_zero_weight_sum() -> None:
    out = merge_state_dicts({"w": BASE}, MODELS, "della_linear", seed=4,
                            parameters={"density": 0.5, "epsilon": 0.3, "rescale": False,
                                        "normalize": True},
                            model_parameters=[{"weight": 3.0}, {"weight": 1.0}])
    expected = BASE + (3.0 * TV1 * keep(4, 0, P1) + TV2 * keep(4, 1, P2)) / 4.0
    torch.testing.assert_close(out["w"], expected, rtol=1e-6, atol=1e-6)
    # mergekit divides by 1 when the weights sum to 0; here it is a one-line error
    with pytest.raises(RecipeError, match="sum to 0"):
        merge_state_dicts({"w": BASE}, MODELS, "della_linear", parameters={"normalize": True},
                          model_parameters=[{"weight": 1.0}, {"weight": -1.0}])


def test_tadrop_block_replaces_magprune() -> None:
    # drop_rate 0.5, no rescale: each keeps its 4 largest |tau| of 8:
    #   TV1 |.| [4, 3, 2, 1, 1, 2, 3, 4] -> the 4s and 3s: [[4, 3, 0, 0], [0, 0, 3, 4]]
    #   TV2 |.| [1, 2, 3, 4, 4, 3, 2, 1] -> [[0, 0, -3, -4], [-4, -3, 0, 0]]
    # (without the block: TV1 + TV2 = [[3, 1, -1, -3], [-3, -1, 1, 3]])
    block = {"method": "tadrop", "drop_rate": 0.5, "rescale": "none"}
    out = merge_state_dicts({"w": BASE}, MODELS, "della_linear", sparsify=block)
    assert torch.equal(out["w"], BASE + torch.tensor([[4.0, 3.0, -3.0, -4.0],
                                                      [-4.0, -3.0, 3.0, 4.0]]))
    block = {"method": "tadrop", "drop_rate": 0.5}
    assert torch.equal(merge_state_dicts({"w": BASE}, MODELS, "della_linear", sparsify=block)["w"],
                       merge_state_dicts({"w": BASE}, MODELS, "task_arithmetic",
                                         sparsify=block)["w"])


def test_window_error() -> None:
    with pytest.raises(RecipeError, match="density 0.1 ± epsilon 0.15"):
        merge_state_dicts({"w": BASE}, MODELS, "della_linear", parameters={"density": 0.1})


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
def test_compute_dtypes(dtype: str) -> None:
    out = merge_state_dicts({"w": BASE}, MODELS, "della_linear", seed=3, dtype=dtype,
                            parameters={"density": 0.5, "epsilon": 0.3, "rescale": False})
    expected = BASE + TV1 * keep(3, 0, P1) + TV2 * keep(3, 1, P2)
    assert torch.equal(out["w"], expected)
