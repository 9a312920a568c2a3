"""DARE + Task Arithmetic: per-(seed, model, tensor) Bernoulli keep mask, rescale (mergekit's L1
norm matching by default, the paper's 1/density with ``rescale_rule: density``), weighted sum."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergewise import METHODS, merge_state_dicts
from mergewise.methods.task_arithmetic import task_arithmetic
from mergewise.rng import tensor_generator


def _mask(seed: int, model: int, name: str, shape: tuple[int, ...], density: float
          ) -> torch.Tensor:
    """The documented draw: uniforms from the (seed, model index, tensor name) CPU generator."""
    return torch.rand(shape, generator=tensor_generator(seed, model, name)) < density


def test_registration() -> None:
    m = METHODS.get("dare_linear")
    assert m.func is task_arithmetic
    assert m.sparsifier == "random"
    assert m.sparsifier_defaults == {"density": 1.0}  # mergekit: no drop unless asked


def test_density_one_is_task_arithmetic() -> None:
    base = {"w": torch.ones(2, 2)}
    models = [{"w": torch.tensor([[2.0, -1.0], [1.0, 5.0]])},
              {"w": torch.tensor([[0.0, 3.0], [1.0, 1.0]])}]
    # tau1 = [[1, -2], [0, 4]], tau2 = [[-1, 2], [0, 0]]; weights 2, 1: [[1, -2], [0, 8]]
    # lambda 0.5 -> [[0.5, -1], [0, 4]]; + 1
    out = merge_state_dicts(base, models, "dare_linear",
                            parameters={"density": 1.0, "lambda": 0.5},
                            model_parameters=[{"weight": 2.0}, {"weight": 1.0}])
    assert torch.equal(out["w"], torch.tensor([[1.5, 0.0], [1.0, 5.0]]))


def test_masks_rescale_and_weights() -> None:
    shape = (4, 8)
    base = {"w": torch.zeros(shape)}
    models = [{"w": torch.full(shape, 1.0)}, {"w": torch.full(shape, 4.0)}]
    # density 0.5 -> kept entries doubled; weights 1 and 0.5, lambda 1:
    #   out = 2 * 1 * m0 + 2 * 4 * 0.5 * m1 = 2 m0 + 4 m1  (each entry in {0, 2, 4, 6})
    out = merge_state_dicts(base, models, "dare_linear",
                            parameters={"density": 0.5, "rescale_rule": "density"},
                            model_parameters=[{"weight": 1.0}, {"weight": 0.5}], seed=7)["w"]
    m0 = _mask(7, 0, "w", shape, 0.5)
    m1 = _mask(7, 1, "w", shape, 0.5)
    assert torch.equal(out, 2.0 * m0 + 4.0 * m1)
    # both masks are non-trivial (32 coin flips each)
    assert 0 < int(m0.sum()) < 32 and 0 < int(m1.sum()) < 32 and not torch.equal(m0, m1)


def test_no_rescale_and_normalize() -> None:
    shape = (3, 5)
    base = {"w": torch.ones(shape)}
    models = [{"w": torch.full(shape, 3.0)}, {"w": torch.full(shape, -1.0)}]
    # tau = 2 and -2; no rescale; weights 1, 3 normalised by 4: (2 m0 - 6 m1) / 4; + 1
    out = merge_state_dicts(base, models, "dare_linear",
                            parameters={"density": 0.3, "rescale": False, "normalize": True},
                            model_parameters=[{"weight": 1.0}, {"weight": 3.0}], seed=1)["w"]
    m0 = _mask(1, 0, "w", shape, 0.3)
    m1 = _mask(1, 1, "w", shape, 0.3)
    assert torch.equal(out, 1.0 + 0.5 * m0 - 1.5 * m1)


def test_default_density_and_seed_zero() -> None:
    shape = (10, 10)
    base = {"w": torch.zeros(shape)}
    models = [{"w": torch.full(shape, 0.5)}]
    # mergekit's default density 1.0: no drop, the task vector as it is
    assert torch.equal(merge_state_dicts(base, models, "dare_linear")["w"], models[0]["w"])
    out = merge_state_dicts(base, models, "dare_linear",  # seed 0
                            parameters={"density": 0.1, "rescale_rule": "density"})["w"]
    m = _mask(0, 0, "w", shape, 0.1)
    assert torch.equal(out, torch.where(m, 5.0, 0.0))  # 0.5 / 0.1 = 5 (float32: 5.0 exactly)


def test_l1_rescale_is_mergekits_default() -> None:
    """rescale: true keeps each task vector's L1 norm: kept entries x (sum|tau| / sum|kept|)."""
    shape = (10, 10)
    base = {"w": torch.zeros(shape)}
    tau = torch.arange(1.0, 101.0).reshape(shape) / 64  # exact in float32
    out = merge_state_dicts(base, [{"w": tau}], "dare_linear", parameters={"density": 0.3},
                            seed=4)["w"]
    m = _mask(4, 0, "w", shape, 0.3)
    kept = tau * m
    factor = tau.abs().sum() / kept.abs().sum()
    assert torch.equal(out, kept * factor)
    assert float(out.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-6)


def test_zero_task_vectors_give_base() -> None:
    base = {"w": torch.tensor([[0.1, -0.2], [0.3, 7.0]]).bfloat16()}
    out = merge_state_dicts(base, [dict(base), dict(base)], "dare_linear",
                            parameters={"density": 0.3, "lambda": 2.0})
    assert out["w"].dtype == torch.bfloat16
    assert torch.equal(out["w"], base["w"])


def _three_tensor_sds(order: list[str]) -> tuple[dict[str, torch.Tensor],
                                                 list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (3, 4), "b.weight": (5,), "c.bias": (2, 2)}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    models = [{n: base[n] + torch.randn(base[n].shape, generator=g) for n in shapes}
              for _ in range(2)]
    return ({n: base[n] for n in order}, [{n: m[n] for n in order} for m in models])


def test_same_output_whatever_the_tensor_order() -> None:
    params = {"density": 0.5}
    out1 = merge_state_dicts(*_three_tensor_sds(["a.weight", "b.weight", "c.bias"]),
                             "dare_linear", parameters=params, seed=3)
    out2 = merge_state_dicts(*_three_tensor_sds(["c.bias", "a.weight", "b.weight"]),
                             "dare_linear", parameters=params, seed=3)
    assert list(out2) == ["c.bias", "a.weight", "b.weight"]
    for n in out1:
        assert torch.equal(out1[n], out2[n]), n
    # a tensor's mask depends on its name, not on which tensors come before it
    out3 = merge_state_dicts(*_three_tensor_sds(["b.weight"]), "dare_linear",
                             parameters=params, seed=3)
    assert torch.equal(out3["b.weight"], out1["b.weight"])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), perm=st.permutations(["a.weight", "b.weight", "c.bias"]))
def test_property_order_free_and_seeded(seed: int, perm: list[str]) -> None:
    ref = merge_state_dicts(*_three_tensor_sds(["a.weight", "b.weight", "c.bias"]),
                            "dare_linear", parameters={"density": 0.5}, seed=seed)
    out = merge_state_dicts(*_three_tensor_sds(list(perm)), "dare_linear",
                            parameters={"density": 0.5}, seed=seed)
    for n in ref:
        assert torch.equal(out[n], ref[n]), n
    other = merge_state_dicts(*_three_tensor_sds(list(perm)), "dare_linear",
                              parameters={"density": 0.5}, seed=seed + 1)
    # 2 models x 25 entries of fair coins: identical masks have probability 2^-50
    assert any(not torch.equal(other[n], ref[n]) for n in ref)


def test_model_index_matters() -> None:
    # the same task vector under model 0 and model 1 draws a different mask
    shape = (6, 6)
    base = {"w": torch.zeros(shape)}
    m = {"w": torch.ones(shape)}
    out = merge_state_dicts(base, [m, m], "dare_linear",
                            parameters={"density": 0.5, "rescale_rule": "density"},
                            model_parameters=[{"weight": 1.0}, {"weight": 10.0}])["w"]
    m0, m1 = _mask(0, 0, "w", shape, 0.5), _mask(0, 1, "w", shape, 0.5)
    assert not torch.equal(m0, m1)
    assert torch.equal(out, 2.0 * m0 + 20.0 * m1)
