"""DELLA: MagPrune (seeded, rank probabilities, L1 rescale), then TIES election and disjoint
merge with mergekit's normalize default (true); a TADrop block replaces MagPrune."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ckpt_helpers import Family, recipe_for

from mergewise import METHODS, RecipeError, merge, merge_state_dicts
from mergewise.methods.della import della_merge
from mergewise.rng import tensor_generator

# Two task vectors of a 2 x 4 tensor whose rows rank 3, 2, 1, 0 or 0, 1, 2, 3 by |tau|;
# density 0.5, epsilon 0.3: p = 0.2 + 0.6 rank / 3, i.e. 0.8, 0.6, 0.4, 0.2 or the reverse
TV1 = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
TV2 = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-4.0, -3.0, -2.0, -1.0]])
P1 = torch.tensor([[0.8, 0.6, 0.4, 0.2], [0.2, 0.4, 0.6, 0.8]])
P2 = torch.tensor([[0.2, 0.4, 0.6, 0.8], [0.8, 0.6, 0.4, 0.2]])
BASE = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]])


def pruned(tv: torch.Tensor, p: torch.Tensor, seed: int, model: int) -> torch.Tensor:
    """MagPrune by hand: keep where the generator's uniforms are below p, scale to the L1 norm."""
    keep = torch.rand(tv.shape, generator=tensor_generator(seed, model, "w")) < p
    kept = tv * keep
    return kept * (tv.abs().sum() / kept.abs().sum())


def ties_by_hand(tvs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Elect the sign of sum w tau (0 -> +); mean of the agreeing w tau over their weights."""
    out = torch.zeros_like(tvs[0])
    for j in range(out.numel()):
        values = [w * float(t.reshape(-1)[j]) for w, t in zip(weights, tvs, strict=True)]
        sign = 1.0 if sum(values) >= 0 else -1.0
        agree = [i for i, v in enumerate(values) if v * sign > 0]
        if agree:
            out.view(-1)[j] = sum(values[i] for i in agree) / sum(weights[i] for i in agree)
    return out


def test_registration() -> None:
    m = METHODS.get("della")
    assert m.func is della_merge
    assert m.space == "delta" and m.requires_base
    assert m.sparsifier == "magprune" and m.sparsifier_defaults == {} and m.accepts_sparsify
    assert {p.name: p.default for p in m.params} == {"lambda": 1.0, "normalize": True,
                                                      "aggregate": None, "int8_mask": False}


def test_density_one_is_ties_without_trim() -> None:
    # the TIES hand example: sums [[2, -4, 1], [0, 0, 0]] -> agreeing means
    d1 = torch.tensor([[1.0, -2.0, 3.0], [0.0, 4.0, -1.0]])
    d2 = torch.tensor([[2.0, -3.0, -3.0], [0.0, -4.0, -1.0]])
    d3 = torch.tensor([[-1.0, 1.0, 1.0], [0.0, 0.0, 2.0]])
    out = merge_state_dicts({"w": torch.zeros(2, 3)}, [{"w": d} for d in (d1, d2, d3)], "della")
    assert torch.equal(out["w"], torch.tensor([[1.5, -2.5, 2.0], [0.0, 4.0, 2.0]]))
    assert torch.equal(della_merge(torch.zeros(2, 3), [d1, d2, d3], [1.0] * 3, normalize=False),
                       torch.tensor([[3.0, -5.0, 4.0], [0.0, 4.0, 2.0]]))  # sum of agreeing


@pytest.mark.parametrize("seed", [0, 5])
def test_seeded_magprune_then_ties(seed: int) -> None:
    models = [{"w": BASE + TV1}, {"w": BASE + TV2}]
    out = merge_state_dicts({"w": BASE}, models, "della", seed=seed,
                            parameters={"density": 0.5, "epsilon": 0.3})
    tvs = [pruned(TV1, P1, seed, 0), pruned(TV2, P2, seed, 1)]
    torch.testing.assert_close(out["w"], BASE + ties_by_hand(tvs, [1.0, 1.0]), rtol=1e-6,
                               atol=1e-6)
    # weights 2, 1 and lambda 0.5 (after the division)
    out = merge_state_dicts({"w": BASE}, models, "della", seed=seed,
                            parameters={"density": 0.5, "epsilon": 0.3, "lambda": 0.5},
                            model_parameters=[{"weight": 2.0}, {"weight": 1.0}])
    torch.testing.assert_close(out["w"], BASE + 0.5 * ties_by_hand(tvs, [2.0, 1.0]),
                               rtol=1e-6, atol=1e-6)


def test_rescale_off_and_per_model_epsilon() -> None:
    # model 1 with epsilon 0: p = 0.5 everywhere
    models = [{"w": BASE + TV1}, {"w": BASE + TV2}]
    out = merge_state_dicts({"w": BASE}, models, "della", seed=1,
                            parameters={"density": 0.5, "rescale": False},
                            model_parameters=[{"epsilon": 0.3}, {"epsilon": 0.0}])
    k1 = torch.rand(2, 4, generator=tensor_generator(1, 0, "w")) < P1
    k2 = torch.rand(2, 4, generator=tensor_generator(1, 1, "w")) < 0.5
    assert torch.equal(out["w"], BASE + ties_by_hand([TV1 * k1, TV2 * k2], [1.0, 1.0]))


def test_window_error_before_the_merge(family_f32: Family, tmp_path: Path) -> None:
    # density 0.9 with the default epsilon 0.15: 1.05 > 1 (mergekit raises at the first tensor)
    with pytest.raises(RecipeError, match=r"density 0.9 ± epsilon 0.15 .* inside \(0, 1\)"):
        merge(recipe_for(family_f32, "della", parameters={"density": 0.9}), tmp_path / "out",
              dry_run=True)
    assert not (tmp_path / "out").exists()
    # a value from a tensor filter is checked when its tensor is merged
    sd = {"a": torch.zeros(2, 4), "b": torch.zeros(2, 4)}
    models = [{"a": TV1, "b": TV1}, {"a": TV2, "b": TV2}]
    with pytest.raises(RecipeError, match="density 0.95"):
        merge_state_dicts(sd, models, "della", parameters={
            "density": [{"filter": "b", "value": 0.95}, {"value": 0.5}]})


def test_tadrop_block_replaces_magprune() -> None:
    # drop_rate 0.5 on one tensor: p = 0.5, keep the 2 largest |tau| of 4 (no rescale here):
    #   tau1 [[1, -2], [3, 0]] -> [[0, -2], [3, 0]];  tau2 [[2, 3], [-1, 4]] -> [[0, 3], [0, 4]]
    # TIES: (0,0) nobody -> 0; (0,1) -2 + 3 > 0: 3; (1,0) 3; (1,1) 4
    # (without the block, density 1: [[1.5, 3], [3, 4]])
    base = {"w": torch.ones(2, 2)}
    models = [{"w": 1.0 + torch.tensor([[1.0, -2.0], [3.0, 0.0]])},
              {"w": 1.0 + torch.tensor([[2.0, 3.0], [-1.0, 4.0]])}]
    block = {"method": "tadrop", "drop_rate": 0.5, "rescale": "none"}
    out = merge_state_dicts(base, models, "della", sparsify=block)
    assert torch.equal(out["w"], 1.0 + torch.tensor([[0.0, 3.0], [3.0, 4.0]]))
    assert torch.equal(merge_state_dicts(base, models, "della")["w"],
                       1.0 + torch.tensor([[1.5, 3.0], [3.0, 4.0]]))
    # with TADrop's defaults (L2 rescale): the same election as ties with that block
    block = {"method": "tadrop", "drop_rate": 0.5}
    assert torch.equal(merge_state_dicts(base, models, "della", sparsify=block)["w"],
                       merge_state_dicts(base, models, "ties", sparsify=block)["w"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
def test_compute_dtypes(dtype: str) -> None:
    models = [{"w": BASE + TV1}, {"w": BASE + TV2}]
    out = merge_state_dicts({"w": BASE}, models, "della", seed=3, dtype=dtype,
                            parameters={"density": 0.5, "epsilon": 0.3, "rescale": False})
    # every value is exact in each dtype, the masks are the float32 probabilities' masks
    k1 = torch.rand(2, 4, generator=tensor_generator(3, 0, "w")) < P1
    k2 = torch.rand(2, 4, generator=tensor_generator(3, 1, "w")) < P2
    assert torch.equal(out["w"], BASE + ties_by_hand([TV1 * k1, TV2 * k2], [1.0, 1.0]))
