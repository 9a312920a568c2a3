"""Consensus Merging: hand-made counts (k = 0, 1, 2, K and > K; >= k at a tie), lambda, the
TIES variant, the official construct_consensus_mask rule, TADrop in front, and a CLI merge of
the tiny family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ckpt_helpers import Family, load_dir, recipe_for, write_recipe
from typer.testing import CliRunner

from mergewise import METHODS, merge_state_dicts
from mergewise.cli import app
from mergewise.methods.consensus import consensus_mask, consensus_merge
from mergewise.methods.tall_masks import multi_task_vector

D64 = torch.float64
# K = 3, lambda = 0.4 (the TALL test's data): masks [1,1,1,0] [1,0,1,0] [1,0,1,0],
# counts [3, 1, 3, 0], tau_MTL = [3, 2, 0.05, 0]
TAUS = [torch.tensor([1.0, 2.0, 1.0, 0.0], dtype=D64), torch.tensor([1.0, 0.1, -1.0, 0.0], dtype=D64),
        torch.tensor([1.0, -0.1, 0.05, 0.0], dtype=D64)]
MTL = torch.tensor([3.0, 2.0, 0.05, 0.0], dtype=D64)
BASE = torch.tensor([10.0, -1.0, 0.5, 2.0], dtype=D64)
LAM = [0.4] * 3


def test_registration() -> None:
    m = METHODS.get("consensus")
    assert m.space == "delta" and m.requires_base and not m.task_specific
    assert m.accepts_sparsify and m.sparsifier is None
    assert [(p.name, p.default) for p in m.params] == [
        ("lambda", 1.0), ("k", 2), ("tau_mtl", "sum"), ("ties_density", 0.2)]
    assert [(p.name, p.default) for p in m.model_params] == [("mask_lambda", 0.6)]


@pytest.mark.parametrize(("k", "keep"), [(0, [1, 1, 1, 1]), (1, [1, 1, 1, 0]),
                                         (2, [1, 0, 1, 0]), (3, [1, 0, 1, 0]),
                                         (4, [0, 0, 0, 0])])
def test_counts_and_k(k: int, keep: list[int]) -> None:
    assert consensus_mask(TAUS, MTL, LAM, k).int().tolist() == keep
    out = consensus_merge(BASE, TAUS, [1.0] * 3, mask_lambda=LAM, k=k)
    torch.testing.assert_close(out, BASE + MTL * torch.tensor(keep, dtype=D64), rtol=0,
                               atol=1e-15)


def test_k0_is_task_arithmetic_and_k_over_tasks_is_the_base() -> None:
    assert torch.equal(consensus_merge(BASE, TAUS, [1.0] * 3, mask_lambda=LAM, k=0),
                       BASE + (TAUS[0] + TAUS[1] + TAUS[2]))
    assert torch.equal(consensus_merge(BASE, TAUS, [1.0] * 3, mask_lambda=LAM, k=4), BASE)


def test_count_exactly_k_is_kept_and_mask_ties_are_off() -> None:
    """tau = [1, 1], [1, 3]: tau_MTL = [2, 4]. lambda 1: task 1 |1| > |1| off, |1| > |3| off;
    task 2 |1| > |1| off, |3| > |1| on. Counts [0, 1]: k = 1 keeps entry 1 only (count == k)."""
    taus = [torch.tensor([1.0, 1.0]), torch.tensor([1.0, 3.0])]
    mtl = multi_task_vector(taus)
    assert consensus_mask(taus, mtl, [1.0, 1.0], 1).tolist() == [False, True]
    assert consensus_mask(taus, mtl, [1.0, 1.0], 2).tolist() == [False, False]
    # lambda just under 1: entry 0 is on for both tasks
    assert consensus_mask(taus, mtl, [0.99, 0.99], 2).tolist() == [True, False]


def test_lambda_scales_the_masked_vector() -> None:
    out = consensus_merge(BASE, TAUS, [1.0] * 3, mask_lambda=LAM, k=2, lam=0.3)
    torch.testing.assert_close(out, BASE + 0.3 * torch.tensor([3.0, 0.0, 0.05, 0.0], dtype=D64),
                               rtol=0, atol=1e-15)


def test_ties_variant() -> None:
    """TIES dis-sum (no trim): a + b = [3, -3], signs + -; agreeing sums [3, -4] (the sum
    variant has [3, -3]); each entry is claimed by one task, so k = 1 keeps both, k = 2 none."""
    a, b = torch.tensor([2.0, 1.0]), torch.tensor([1.0, -4.0])
    mtl = multi_task_vector([a, b], tau_mtl="ties", ties_density=1.0)
    assert mtl.tolist() == [3.0, -4.0]
    # a: [2 > 0.5, 1 > 2.5] = [on, off]; b: [1 > 1, 4 > 0] = [off, on]
    out = consensus_merge(torch.zeros(2), [a, b], [1.0, 1.0], mask_lambda=[0.5, 0.5], k=1,
                          tau_mtl="ties", ties_density=1.0)
    assert out.tolist() == [3.0, -4.0]
    out = consensus_merge(torch.zeros(2), [a, b], [1.0, 1.0], mask_lambda=[0.5, 0.5], k=2,
                          tau_mtl="ties", ties_density=1.0)
    assert out.tolist() == [0.0, 0.0]
    sum_variant = consensus_merge(torch.zeros(2), [a, b], [1.0, 1.0], mask_lambda=[0.5, 0.5],
                                  k=1)
    assert sum_variant.tolist() == [3.0, -3.0]


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_official_construction(seed: int) -> None:
    """generate_task_masks + construct_consensus_mask + merged_tv * mask, transcribed (float64,
    theta0 = 0, where the flat-weight and task-vector forms are the same numbers)."""
    g = torch.Generator().manual_seed(seed)
    tv_flat_checks = torch.randn(5, 200, generator=g, dtype=D64) * torch.rand(5, 1, generator=g,
                                                                            dtype=D64)
    lams = [0.2, 0.3, 0.4, 0.5, 0.6]
    ptm = torch.zeros(200, dtype=D64)
    tv = tv_flat_checks[0] + tv_flat_checks[1] + tv_flat_checks[2] + tv_flat_checks[3] \
        + tv_flat_checks[4]  # in model order (torch's sum(0) may round differently)
    masks = [(ptm - (ptm + t)).abs() > ((ptm + tv) - (ptm + t)).abs() * lam
             for t, lam in zip(tv_flat_checks, lams, strict=True)]
    count = torch.zeros(200, dtype=D64)
    for m in masks:
        count = count + m.float()
    for k in (1, 2, 3):
        want = tv * (count.float() >= k)
        got = consensus_merge(ptm, list(tv_flat_checks), [1.0] * 5, mask_lambda=lams, k=k)
        assert torch.equal(got, want)


def state(seed: int) -> tuple[dict, list]:
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(7, 5, generator=g), "b": torch.randn(5, generator=g)}
    experts = [{n: v + torch.randn(v.shape, generator=g) for n, v in base.items()}
               for _ in range(3)]
    return base, experts


def test_api_tadrop_block_runs_in_front() -> None:
    """k = 0 keeps everything: task arithmetic of what the TADrop block left."""
    base, experts = state(0)
    block = {"method": "tadrop", "drop_rate": 0.5}
    got = merge_state_dicts(base, experts, "consensus", parameters={"k": 0}, sparsify=block)
    want = merge_state_dicts(base, experts, "task_arithmetic", sparsify=block)
    assert all(torch.equal(got[n], want[n]) for n in base)
    dropped = merge_state_dicts(base, experts, "consensus", sparsify=block)
    plain = merge_state_dicts(base, experts, "consensus")
    assert not torch.equal(dropped["w"], plain["w"])


def test_cli_merge_tiny_family(family_f32: Family, tmp_path: Path) -> None:
    runner = CliRunner()
    outs = {}
    for label, dtype in (("a", "float32"), ("b", "float32"), ("c", "float64")):
        data = recipe_for(family_f32, "consensus", dtype=dtype,
                          parameters={"k": 2, "lambda": 0.5, "mask_lambda": 0.3})
        recipe = write_recipe(tmp_path / f"{label}.yaml", data)
        result = runner.invoke(app, ["merge", str(recipe), "--out", str(tmp_path / label),
                                     "--no-progress"])
        assert result.exit_code == 0, result.output
        outs[label] = load_dir(tmp_path / label)
    base = load_dir(family_f32.base)
    experts = [load_dir(e) for e in family_f32.experts]
    a, b, c = outs["a"], outs["b"], outs["c"]
    assert sorted(a) == sorted(base)
    dropped = 0
    for n in base:
        assert torch.equal(a[n], b[n]) and a[n].dtype == base[n].dtype  # deterministic
        taus = [e[n].double() - base[n].double() for e in experts]
        mtl = taus[0] + taus[1]
        keep = sum((t.abs() > 0.3 * (mtl - t).abs()).int() for t in taus) >= 2
        dropped += int((~keep & (mtl != 0)).sum())
        want = base[n].double() + 0.5 * keep * mtl
        torch.testing.assert_close(a[n].double(), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(c[n].double(), want, rtol=0, atol=1e-6)
    assert dropped > 0  # the consensus mask removed moved entries
