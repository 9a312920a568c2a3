"""DARE + TIES: seeded Bernoulli drop with rescale, then TIES election and merge; mergekit's
defaults (density 1.0, L1 rescale, normalize false = dis-sum); the paper's 1/density rescale and
disjoint mean by ``rescale_rule: density`` and ``aggregate: mean``."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergewise import METHODS, merge_state_dicts
from mergewise.methods.dare_ties import dare_ties_merge
from mergewise.rng import tensor_generator


def _mask(seed: int, model: int, name: str, shape: tuple[int, ...], density: float
          ) -> torch.Tensor:
    return torch.rand(shape, generator=tensor_generator(seed, model, name)) < density


def test_registration() -> None:
    m = METHODS.get("dare_ties")
    assert m.func is dare_ties_merge
    assert m.sparsifier == "random"
    assert m.sparsifier_defaults == {"density": 1.0}
    assert next(p for p in m.params if p.name == "normalize").default is False


def test_density_one_is_ties_without_trim() -> None:
    base = {"w": torch.zeros(2, 3)}
    models = [{"w": torch.tensor([[1.0, -2.0, 3.0], [0.0, 4.0, -1.0]])},
              {"w": torch.tensor([[2.0, -3.0, -3.0], [0.0, -4.0, -1.0]])},
              {"w": torch.tensor([[-1.0, 1.0, 1.0], [0.0, 0.0, 2.0]])}]
    # sums [[2, -4, 1], [0, 0, 0]] -> [[+, -, +], [+, +, +]]
    # sum aggregate: [[1+2, -2-3, 3+1], [0, 4, 2]]
    out = merge_state_dicts(base, models, "dare_ties",
                            parameters={"density": 1.0, "aggregate": "sum"})
    assert torch.equal(out["w"], torch.tensor([[3.0, -5.0, 4.0], [0.0, 4.0, 2.0]]))
    # mean: [[1.5, -2.5, 2], [0, 4, 2]], lambda 2
    out = merge_state_dicts(base, models, "dare_ties",
                            parameters={"density": 1.0, "lambda": 2.0, "aggregate": "mean"})
    assert torch.equal(out["w"], torch.tensor([[3.0, -5.0, 4.0], [0.0, 8.0, 4.0]]))
    # the default (mergekit's normalize: false) is the sum, as aggregate: sum
    out = merge_state_dicts(base, models, "dare_ties")
    assert torch.equal(out["w"], torch.tensor([[3.0, -5.0, 4.0], [0.0, 4.0, 2.0]]))
    # normalize: true divides by the sum of the agreeing models' weights (here their count)
    out = merge_state_dicts(base, models, "dare_ties", parameters={"normalize": True})
    assert torch.equal(out["w"], torch.tensor([[1.5, -2.5, 2.0], [0.0, 4.0, 2.0]]))


def test_election_on_dropped_and_rescaled_vectors() -> None:
    shape = (5, 6)
    base = {"w": torch.ones(shape)}
    models = [{"w": torch.full(shape, 2.0)}, {"w": torch.full(shape, -2.0)}]
    # tau = +1 and -3; density 0.5 -> kept ones become +2 and -6.
    #   both kept: sum -4 -> -, only -6 agrees -> -6
    #   only model 0: +2;  only model 1: -6;  neither: 0
    out = merge_state_dicts(base, models, "dare_ties", parameters={
        "density": 0.5, "rescale_rule": "density"}, seed=5)["w"]
    m0 = _mask(5, 0, "w", shape, 0.5)
    m1 = _mask(5, 1, "w", shape, 0.5)
    tau = torch.where(m1, -6.0, torch.where(m0, 2.0, 0.0))
    assert torch.equal(out, 1.0 + tau)
    # all four cases occur among these 30 entries
    assert bool((m0 & m1).any() and (m0 & ~m1).any() and (~m0 & m1).any() and (~m0 & ~m1).any())


def test_weights_flip_the_election_weighted_mean() -> None:
    shape = (4, 4)
    base = {"w": torch.zeros(shape)}
    models = [{"w": torch.full(shape, 1.0)}, {"w": torch.full(shape, -3.0)}]
    # density 0.5, weights 4 and 1: weighted kept values +8 and -6.
    #   both: sum +2 -> +, only model 0 agrees: 8 / 4 = 2 (weighted_mean divides by its weight)
    #   only model 0: 8 / 4 = 2;  only model 1: -6 / 1 = -6;  neither: 0
    out = merge_state_dicts(base, models, "dare_ties",
                            parameters={"density": 0.5, "normalize": True,
                                        "rescale_rule": "density"},
                            model_parameters=[{"weight": 4.0}, {"weight": 1.0}], seed=2)["w"]
    m0 = _mask(2, 0, "w", shape, 0.5)
    m1 = _mask(2, 1, "w", shape, 0.5)
    assert torch.equal(out, torch.where(m0, 2.0, torch.where(m1, -6.0, 0.0)))
    assert bool((m0 & m1).any())


def test_zero_task_vectors_give_base() -> None:
    base = {"w": torch.tensor([[0.1, -0.2], [0.3, 7.0]]), "b": torch.tensor([1.5])}
    out = merge_state_dicts(base, [dict(base), dict(base)], "dare_ties",
                            parameters={"density": 0.3})
    for n in base:
        assert torch.equal(out[n], base[n])


def _sds(order: list[str], seed: int = 0) -> tuple[dict[str, torch.Tensor],
                                                    list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"x.weight": (4, 3), "y.weight": (6,), "z": (1,)}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    models = [{n: base[n] + torch.randn(base[n].shape, generator=g) for n in shapes}
              for _ in range(3)]
    return ({n: base[n] for n in order}, [{n: m[n] for n in order} for m in models])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), perm=st.permutations(["x.weight", "y.weight", "z"]))
def test_property_order_free_and_seeded(seed: int, perm: list[str]) -> None:
    params = {"density": 0.5, "aggregate": "sum"}
    ref = merge_state_dicts(*_sds(["x.weight", "y.weight", "z"]), "dare_ties",
                            parameters=params, seed=seed)
    out = merge_state_dicts(*_sds(list(perm)), "dare_ties", parameters=params, seed=seed)
    for n in ref:
        assert torch.equal(out[n], ref[n]), n
    other = merge_state_dicts(*_sds(list(perm)), "dare_ties", parameters=params, seed=seed + 1)
    assert any(not torch.equal(other[n], ref[n]) for n in ref)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), data_seed=st.integers(0, 1000))
def test_property_sign_agrees_with_election(seed: int, data_seed: int) -> None:
    base, models = _sds(["x.weight", "y.weight", "z"], data_seed)
    out = merge_state_dicts(base, models, "dare_ties", parameters={
        "density": 0.5, "rescale_rule": "density"}, seed=seed)
    for n in base:
        dropped = [(m[n] - base[n]) * _mask(seed, i, n, tuple(base[n].shape), 0.5) / 0.5
                   for i, m in enumerate(models)]
        total = torch.stack(dropped).sum(0)
        elected = torch.where(total >= 0, 1.0, -1.0)
        agree = torch.stack([d * elected > 0 for d in dropped]).any(0)
        merged = out[n] - base[n]
        assert bool((merged * elected >= 0).all()), n
        assert torch.equal(merged == 0, ~agree), n
