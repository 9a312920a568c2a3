"""TALL masks: hand-made masks (strict > at the threshold, all-zero entries, per-task lambda,
the TIES multi-task vector), task models theta0 + m_t * tau_MTL with rescaler 1, against the
official flat-weight rule, TADrop in front, and a CLI merge + materialize of the tiny family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ckpt_helpers import Family, load_dir, recipe_for, write_recipe
from typer.testing import CliRunner

from mergewise import METHODS, materialize, merge_state_dicts, merge_task_state_dicts
from mergewise.methods.tall_masks import multi_task_vector, tall_masks_merge, task_masks

# K = 3, lambda = 0.4: tau_MTL = [3, 2, 0.05, 0]; entry 1 is "selfish" (task 1 only), entry 3
# "catastrophic" (all zero: 0 > 0 is false)
T1 = torch.tensor([1.0, 2.0, 1.0, 0.0], dtype=torch.float64)
T2 = torch.tensor([1.0, 0.1, -1.0, 0.0], dtype=torch.float64)
T3 = torch.tensor([1.0, -0.1, 0.05, 0.0], dtype=torch.float64)
MTL = torch.tensor([3.0, 2.0, 0.05, 0.0], dtype=torch.float64)
MASKS = [[1, 1, 1, 0], [1, 0, 1, 0], [1, 0, 1, 0]]
BASE = torch.tensor([10.0, -1.0, 0.5, 2.0], dtype=torch.float64)


def test_registration() -> None:
    m = METHODS.get("tall_masks")
    assert m.task_specific and m.space == "delta" and m.requires_base
    assert m.accepts_sparsify and m.sparsifier is None and not m.elementwise
    assert [p.name for p in m.params] == ["tau_mtl", "ties_density"]
    assert [(p.name, p.default) for p in m.model_params] == [("mask_lambda", 0.6)]


def test_hand_masks_and_unified() -> None:
    out = tall_masks_merge(BASE, [T1, T2, T3], [1.0] * 3, mask_lambda=[0.4] * 3)
    torch.testing.assert_close(out.merged, BASE + MTL, rtol=0, atol=1e-15)
    assert [m.int().tolist() for m in out.modulators.masks] == MASKS
    assert out.modulators.abs_means is None  # no rescalers


def test_strict_greater_at_the_threshold_and_per_task_lambda() -> None:
    """tau = [1], [2]: tau_MTL = 3; task 1: |1| > lambda |2|, task 2: |2| > lambda |1|."""
    t1, t2 = torch.tensor([1.0]), torch.tensor([2.0])
    mtl = multi_task_vector([t1, t2])
    assert task_masks([t1, t2], mtl, [0.5, 2.0]) == [torch.tensor([False]),
                                                     torch.tensor([False])]  # 1 > 1, 2 > 2
    assert [bool(m) for m in task_masks([t1, t2], mtl, [0.4999, 1.9999])] == [True, True]
    assert [bool(m) for m in task_masks([t1, t2], mtl, [0.5, 1.0])] == [False, True]
    assert [bool(m) for m in task_masks([t1, t2], mtl, [0.0, 0.0])] == [True, True]
    zero = torch.zeros(1)
    assert [bool(m) for m in task_masks([zero, zero], zero, [0.0, 0.0])] == [False, False]


def test_ties_multi_task_vector() -> None:
    """Without a trim (density 1): elect the sum's sign, disjoint **sum** (dis-sum); with 0.5
    each task keeps its 2 largest of 4 first."""
    a = torch.tensor([2.0, -1.0, 3.0, 0.5])
    b = torch.tensor([1.0, 4.0, -1.5, -0.25])
    # signs of a + b: + + + +; agreeing: (2, 1) (4) (3) (0.5)
    assert torch.equal(multi_task_vector([a, b], tau_mtl="ties", ties_density=1.0),
                       torch.tensor([3.0, 4.0, 3.0, 0.5]))
    # trimmed: a -> [2, 0, 3, 0], b -> [0, 4, -1.5, 0]; signs + + + + (0 counts as +)
    assert torch.equal(multi_task_vector([a, b], tau_mtl="ties", ties_density=0.5),
                       torch.tensor([2.0, 4.0, 3.0, 0.0]))
    out = tall_masks_merge(torch.zeros(4), [a, b], [1.0, 1.0], mask_lambda=[0.5, 0.5],
                           tau_mtl="ties", ties_density=0.5)
    # masks use the untrimmed task vectors: |a| = [2, 1, 3, .5] > 0.5 |mtl - a| = [0, 2.5, 0, .25]
    assert out.modulators.masks[0].tolist() == [True, False, True, True]
    # |b| = [1, 4, 1.5, .25] > 0.5 |mtl - b| = [.5, 0, 2.25, .125]
    assert out.modulators.masks[1].tolist() == [True, True, False, True]


def test_api_task_models_are_base_plus_masked_multi_task_vector() -> None:
    base = {"v": BASE.float(), "ids": torch.arange(3)}
    experts = {t: {"v": (BASE + d).float(), "ids": torch.arange(3)}
               for t, d in zip("abc", (T1, T2, T3), strict=True)}
    models = merge_task_state_dicts(base, experts, "tall_masks",
                                    model_parameters=[{"mask_lambda": 0.4}] * 3)
    assert models.rescalers == {"a": 1.0, "b": 1.0, "c": 1.0}
    taus = [experts[t]["v"] - base["v"] for t in "abc"]
    mtl = taus[0] + taus[1] + taus[2]
    assert torch.equal(models.unified["v"], base["v"] + mtl)
    for t, mask in zip("abc", MASKS, strict=True):
        stored = models.unified["v"] - base["v"]
        assert torch.equal(models[t]["v"], base["v"] + stored * torch.tensor(mask))
        assert torch.equal(models[t]["ids"], torch.arange(3))
    # per-task lambda: task a at 2.0 keeps only its selfish entry 1 (|2| > 2 |2 - 2| = 0)
    other = merge_task_state_dicts(base, experts, "tall_masks", model_parameters=[
        {"mask_lambda": 2.0}, {"mask_lambda": 0.4}, {"mask_lambda": 0.4}])
    assert other.modulators.mask(0, "v").tolist() == [False, True, False, False]
    assert other.modulators.mask(1, "v").tolist() == [True, False, True, False]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masks_match_the_official_flat_weight_rule(seed: int) -> None:
    """generate_task_masks: |theta0 - theta_t| > lambda |(theta0 + tau_MTL) - theta_t|, in
    float64 with theta0 = 0 (where the two forms are the same numbers)."""
    g = torch.Generator().manual_seed(seed)
    taus = [torch.randn(50, generator=g, dtype=torch.float64) for _ in range(4)]
    lams = [0.2, 0.3, 0.5, 0.6]
    flat_ptm = torch.zeros(50, dtype=torch.float64)
    tv = torch.stack(taus).sum(0)
    want = [(flat_ptm - (flat_ptm + t)).abs() > ((flat_ptm + tv) - (flat_ptm + t)).abs() * lam
            for t, lam in zip(taus, lams, strict=True)]
    got = tall_masks_merge(flat_ptm, taus, [1.0] * 4, mask_lambda=lams).modulators.masks
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_api_tadrop_block_runs_in_front() -> None:
    """The unified model is theta0 + the sum of the task vectors tall_masks is given: task
    arithmetic behind the same TADrop block."""
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)}
    experts = {f"t{i}": {n: v + torch.randn(v.shape, generator=g) for n, v in base.items()}
               for i in range(3)}
    block = {"method": "tadrop", "drop_rate": 0.5}
    models = merge_task_state_dicts(base, experts, "tall_masks", sparsify=block)
    ta = merge_state_dicts(base, experts, "task_arithmetic", sparsify=block)
    plain = merge_task_state_dicts(base, experts, "tall_masks")
    assert all(torch.equal(models.unified[n], ta[n]) for n in base)
    assert not torch.equal(models.unified["w"], plain.unified["w"])


def test_cli_merge_and_materialize_tiny_family(family_f32: Family, tmp_path: Path) -> None:
    runner = CliRunner()
    from mergewise.cli import app

    outs = {}
    for label, dtype in (("a", "float32"), ("b", "float32"), ("c", "float64")):
        data = recipe_for(family_f32, "tall_masks", dtype=dtype)
        for entry, task in zip(data["models"], ("x", "y"), strict=True):
            entry["name"] = task
        data["models"][1]["parameters"] = {"mask_lambda": 0.3}
        recipe = write_recipe(tmp_path / f"{label}.yaml", data)
        result = runner.invoke(app, ["merge", str(recipe), "--out", str(tmp_path / label),
                                     "--no-progress"])
        assert result.exit_code == 0, result.output
        outs[label] = {t: load_dir(materialize(tmp_path / label, t, tmp_path / f"{label}-{t}"))
                       for t in ("x", "y")}
    base = load_dir(family_f32.base)
    experts = [load_dir(e) for e in family_f32.experts]
    for i, (task, lam) in enumerate((("x", 0.6), ("y", 0.3))):
        a, b, c = outs["a"][task], outs["b"][task], outs["c"][task]
        assert sorted(a) == sorted(base)
        for n in base:
            assert torch.equal(a[n], b[n]) and a[n].dtype == base[n].dtype  # deterministic
            taus = [e[n].double() - base[n].double() for e in experts]
            mtl = taus[0] + taus[1]
            mask = taus[i].abs() > lam * (mtl - taus[i]).abs()
            want = base[n].double() + mask * mtl
            torch.testing.assert_close(a[n].double(), want, rtol=0, atol=1e-6)
            torch.testing.assert_close(c[n].double(), want, rtol=0, atol=1e-6)
        assert not torch.equal(outs["a"]["x"][n], outs["a"]["y"][n])
