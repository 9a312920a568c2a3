"""TADrop: exact values on a hand-made task vector, budgets, invariants, plug-in equivalences."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mergewise as mw
from mergewise.selection import keep_count_from_drop
from mergewise.sparsify.tadrop import TADropStats, drop_rate_for, tadrop

PARAMS = {"drop_rate": 0.5, "strength": 1.0, "quantiles": [0.5, 0.95], "min_drop": 0.0,
          "max_drop": 0.99, "skip": []}


def shuffled_signed(values: list[float], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(values, dtype=torch.float64)[torch.randperm(len(values), generator=g)]
    signs = torch.where(torch.rand(len(values), generator=g) < 0.5, -1.0, 1.0).double()
    return t * signs


def run_stats(tensors: dict[str, torch.Tensor], budget: str = "median", **overrides):
    stats = TADropStats(budget)
    params = {**PARAMS, **overrides}
    for name, t in tensors.items():
        stats.observe(0, name, t, params)
    stats.end_pass(0)
    return stats


# Hand-made 3-tensor task vector, 21 entries each, so rank 0.5*20 = 10 and 0.95*20 = 19 are exact:
#   a: |tau| = 1..21   -> Q.5 = 11,   Q.95 = 20    -> d = 0.55
#   b: |tau| = k^2     -> Q.5 = 121,  Q.95 = 400   -> d = 0.3025 (the median d)
#   c: |tau| = k^3     -> Q.5 = 1331, Q.95 = 8000  -> d = 0.166375
K = list(range(1, 22))
HAND = {"a": shuffled_signed([float(k) for k in K], 0),
        "b": shuffled_signed([float(k * k) for k in K], 1),
        "c": shuffled_signed([float(k ** 3) for k in K], 2)}


def test_hand_made_drop_rates_and_kept_values():
    stats = run_stats(HAND)
    assert stats.d_ref == pytest.approx(0.3025, rel=1e-12)
    a, b, c = (stats.for_tensor(n) for n in "abc")
    assert a.d == pytest.approx(0.55) and b.d == pytest.approx(0.3025)
    assert c.d == pytest.approx(0.166375)
    # p = 0.5 * d / 0.3025
    assert a.drop_rate == pytest.approx(0.5 * 0.55 / 0.3025)   # 0.90909...
    assert b.drop_rate == 0.5                                    # the median tensor: exactly p̄
    assert c.drop_rate == pytest.approx(0.275)
    # kept counts: round-half-up((1-p) * 21): a 1.909 -> 2, b 10.5 -> 11, c 15.225 -> 15
    out_a = tadrop(HAND["a"], stats=a, rescale="none")
    assert sorted(out_a[out_a != 0].abs().tolist()) == [20.0, 21.0]
    out_b = tadrop(HAND["b"], stats=b, rescale="none")
    assert sorted(out_b[out_b != 0].abs().tolist()) == [float(k * k) for k in range(11, 22)]
    out_c = tadrop(HAND["c"], stats=c, rescale="none")
    assert sorted(out_c[out_c != 0].abs().tolist()) == [float(k ** 3) for k in range(7, 22)]
    # signs survive, and L2 rescale multiplies by ||tau|| / ||kept||:
    # a: sum k^2 (1..21) = 3311, kept 20^2 + 21^2 = 841
    scaled_a = tadrop(HAND["a"], stats=a)
    assert torch.equal(torch.sign(scaled_a), torch.sign(out_a))
    torch.testing.assert_close(scaled_a, out_a * math.sqrt(3311 / 841), rtol=1e-12, atol=0)


def test_clipping_and_mapping():
    assert drop_rate_for(1.0, 0.5, 0.8, 1.0, 0.0, 0.99) == 0.99
    assert drop_rate_for(0.0, 0.5, 0.8, 1.0, 0.1, 0.99) == 0.1
    assert drop_rate_for(0.25, 0.5, 0.8, 2.0, 0.0, 0.99) == pytest.approx(0.2)
    assert drop_rate_for(0.9, 0.1, 0.8, 0.0, 0.0, 0.99) == 0.8  # strength 0: uniform


def test_skip_and_zero_tensors_are_kept():
    tensors = {**HAND, "embed.weight": torch.arange(1.0, 22.0), "z": torch.zeros(21)}
    stats = run_stats(tensors, skip=["embed*"])
    assert stats.for_tensor("embed.weight").skipped
    assert stats.for_tensor("z").d is None
    for name in ("embed.weight", "z"):
        assert torch.equal(tadrop(tensors[name], stats=stats.for_tensor(name)), tensors[name])
    assert stats.d_ref == pytest.approx(0.3025)  # skipped / zero tensors do not move d_ref


def make_family(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = 4000
    heavy = torch.randn(n, generator=g) / torch.randn(n, generator=g).abs().clamp_min(0.05)
    return {"heavy": heavy, "gauss": torch.randn(n, generator=g),
            "uniform": torch.rand(n, generator=g) * 2 - 1}


def test_heavy_tailed_dropped_less_than_gaussian_less_than_uniform():
    for budget in ("median", "elements"):
        stats = run_stats(make_family(), budget, drop_rate=0.6)
        p = {n: stats.for_tensor(n).drop_rate for n in ("heavy", "gauss", "uniform")}
        assert p["heavy"] < p["gauss"] < p["uniform"], (budget, p)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(5, 400), min_size=3, max_size=9),
       target=st.floats(0.05, 0.95), strength=st.sampled_from([0.5, 1.0, 2.0]),
       seed=st.integers(0, 10_000))
def test_element_budget_is_met(sizes, target, strength, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, n in enumerate(sizes):
        shape_power = 0.5 + 2.5 * float(torch.rand((), generator=g))  # flatter or heavier tails
        tensors[f"t{i}"] = torch.randn(n, generator=g).sign() * torch.rand(n, generator=g) ** shape_power
    stats = run_stats(tensors, "elements", drop_rate=target, strength=strength)
    total = sum(sizes)
    mean = sum(stats.for_tensor(f"t{i}").drop_rate * n for i, n in enumerate(sizes)) / total
    assert mean == pytest.approx(target, rel=0.005)


@settings(max_examples=40, deadline=None)
@given(ntensors=st.integers(1, 7).map(lambda k: 2 * k - 1), target=st.floats(0.0, 0.95),
       seed=st.integers(0, 10_000))
def test_median_tensor_gets_exactly_the_target(ntensors, target, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}": torch.randn(50, generator=g) * torch.rand(50, generator=g) ** (i + 1)
               for i in range(ntensors)}
    stats = run_stats(tensors, drop_rate=target)
    ds = sorted((stats.for_tensor(n).d, n) for n in tensors)
    median_name = ds[len(ds) // 2][1]
    assert stats.for_tensor(median_name).drop_rate == min(target, 0.99)


@settings(max_examples=50, deadline=None)
@given(values=st.lists(st.floats(-100, 100, allow_nan=False, allow_subnormal=False, width=32)
                       .filter(lambda v: abs(v) > 1e-3), min_size=3, max_size=60),
       p=st.floats(0.0, 0.98))
def test_l2_norm_preserved_and_count_exact(values, p):
    delta = torch.tensor(values, dtype=torch.float32)
    stats = run_stats({"x": delta, "y": delta * 2, "z": delta.flip(0)}, drop_rate=p)
    decided = stats.for_tensor("x")
    out = tadrop(delta, stats=decided)
    if decided.drop_rate > 0:
        assert int(torch.count_nonzero(out)) == keep_count_from_drop(decided.drop_rate, delta.numel())
    torch.testing.assert_close(torch.linalg.vector_norm(out), torch.linalg.vector_norm(delta),
                               rtol=1e-5, atol=0)


# --- through the engine: every method, equivalences, determinism, errors ---------------------

def family(n_models: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {"emb": torch.randn(40, 8, generator=g), "w1": torch.randn(16, 8, generator=g),
            "w2": torch.randn(8, 16, generator=g), "ln": torch.ones(8),
            "ids": torch.arange(8)}
    models = []
    for _ in range(n_models):
        m = {}
        for k, v in base.items():
            if v.is_floating_point():
                tv = torch.randn(v.shape, generator=g) ** 3 * 0.01
                m[k] = v + tv
            else:
                m[k] = v.clone()
        models.append(m)
    return base, models


@pytest.mark.parametrize("method, uniform", [
    ("ties", {"parameters": {"density": 0.2}}),
    ("task_arithmetic", {"parameters": {"density": 0.2}}),
    ("breadcrumbs", None),
    ("dare_linear", {"parameters": {"density": 0.2, "rescale": False}}),
    ("dare_ties", {"parameters": {"density": 0.2, "rescale": False}}),
])
def test_strength_zero_equals_uniform_sparsifier(method, uniform):
    base, models = family()
    block = {"method": "tadrop", "drop_rate": 0.8, "strength": 0.0, "rescale": "none"}
    out = mw.merge_state_dicts(base, models, method, sparsify=block)
    if uniform is None:  # breadcrumbs has no uniform top-k twin; compare with ties-free TA top-k
        ref = mw.merge_state_dicts(base, models, "task_arithmetic", parameters={"density": 0.2})
    else:
        ref = mw.merge_state_dicts(base, models, method, **uniform)
    for k in out:
        assert torch.equal(out[k], ref[k]), k


def test_tadrop_changes_the_merge_and_random_mode_is_order_free():
    base, models = family()
    plain = mw.merge_state_dicts(base, models, "ties", parameters={"density": 0.2})
    ta = mw.merge_state_dicts(base, models, "ties", sparsify={"method": "tadrop"})
    assert any(not torch.equal(plain[k], ta[k]) for k in ("emb", "w1", "w2"))
    block = {"method": "tadrop", "mode": "random"}
    a = mw.merge_state_dicts(base, models, "dare_ties", sparsify=block, seed=3)
    rev = [dict(reversed(list(m.items()))) for m in models]
    b = mw.merge_state_dicts(dict(reversed(list(base.items()))), rev, "dare_ties",
                             sparsify=block, seed=3)
    c = mw.merge_state_dicts(base, models, "dare_ties", sparsify=block, seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in ("emb", "w1", "w2"))


def test_dare_methods_default_tadrop_to_random_mode():
    base, models = family()
    a = mw.merge_state_dicts(base, models, "dare_ties", sparsify={"method": "tadrop"})
    b = mw.merge_state_dicts(base, models, "dare_ties",
                             sparsify={"method": "tadrop", "mode": "random"})
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_per_model_block_and_skip():
    base, models = family(2)
    out = mw.merge_state_dicts(base, models, "task_arithmetic",
                               sparsify={"method": "tadrop", "skip": ["emb"]})
    ref = mw.merge_state_dicts(base, models, "task_arithmetic")
    assert torch.equal(out["emb"], ref["emb"])  # kept dense
    assert not torch.equal(out["w1"], ref["w1"])


def test_nan_input_is_a_clear_error():
    base, models = family(2)
    models[1]["w2"][0, 0] = float("nan")
    with pytest.raises(mw.NonFiniteError, match="'w2'"):
        mw.merge_state_dicts(base, models, "ties", sparsify={"method": "tadrop"})


@pytest.mark.parametrize("block, key", [
    ({"method": "tadrop", "drop_rate": 1.0}, "drop_rate"),
    ({"method": "tadrop", "quantiles": [0.95, 0.5]}, "quantiles"),
    ({"method": "tadrop", "mode": "sometimes"}, "mode"),
    ({"method": "tadrop", "budjet": "median"}, "budget"),
    ({"method": "tadrop", "strength": -1}, "strength"),
    ({"method": "tadrop", "min_drop": 0.5, "max_drop": 0.4}, "min_drop"),
])
def test_bad_tadrop_parameters_are_rejected(block, key):
    base, models = family(2)
    with pytest.raises(mw.RecipeError, match=key):
        mw.merge_state_dicts(base, models, "ties", sparsify=block)


def test_density_beside_a_sparsify_block_is_rejected():
    base, models = family(2)
    with pytest.raises(mw.RecipeError, match="sparsify block"):
        mw.merge_state_dicts(base, models, "ties", parameters={"density": 0.3},
                             sparsify={"method": "tadrop"})
