"""Merges written as PEFT LoRA adapters (mergewise.lora_out, ``--out-format lora``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ckpt_helpers import load_dir, make_family, write_recipe
from cli_helpers import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_lora_inputs import DOWN, Q, V, lora_pair, write_adapter

from mergewise import merge
from mergewise.checkpoint import open_checkpoint
from mergewise.errors import RecipeError
from mergewise.lora import PREFIX, LoraCheckpoint
from mergewise.lora_out import RankRule, factor


def test_factor_keeps_a_low_rank_delta_and_splits_symmetrically() -> None:
    gen = torch.Generator().manual_seed(0)
    b0, a0 = torch.randn(12, 3, generator=gen), torch.randn(3, 9, generator=gen)
    delta = b0 @ a0
    f = factor(delta, RankRule(rank=3))
    assert f.rank == 3 and f.relative_error < 1e-6
    torch.testing.assert_close(f.b @ f.a, delta, rtol=0, atol=1e-5)
    # symmetric split: the columns of B and rows of A have equal norms (sqrt of S each)
    torch.testing.assert_close(f.b.norm(dim=0), f.a.norm(dim=1), rtol=1e-5, atol=0)
    s = torch.linalg.svdvals(delta.double())
    one = factor(delta, RankRule(rank=1))
    want = float(s[1:].square().sum().sqrt() / s.square().sum().sqrt())
    assert one.rank == 1 and abs(one.relative_error - want) < 1e-6
    t = factor(delta.T.contiguous(), RankRule(rank=3), transpose=True)  # stored (in, out)
    torch.testing.assert_close(t.b @ t.a, delta, rtol=0, atol=1e-5)
    assert factor(delta, RankRule(rank=50)).rank == 9  # at most min(out, in)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 100.0), min_size=1, max_size=12).map(
    lambda v: sorted(v, reverse=True)), st.floats(0.05, 1.0))
def test_energy_rule_is_the_least_rank_reaching_the_share(values: list[float],
                                                          energy: float) -> None:
    s = torch.tensor(values, dtype=torch.float64)
    if float(s.square().sum()) == 0.0:
        return
    r = RankRule(energy=energy).of(s)
    share = (s.square().cumsum(0) / s.square().sum()).tolist()
    assert 1 <= r <= len(values)
    assert share[r - 1] >= energy - 1e-9
    assert r == 1 or share[r - 2] < energy - 1e-12 or values[r - 1] == 0.0


@pytest.mark.parametrize(("rank", "energy"), [(None, None), (2, 0.9), (0, None), (None, 1.5)])
def test_rank_rule_needs_exactly_one_valid_setting(rank, energy) -> None:
    with pytest.raises(RecipeError, match="--lora-"):
        RankRule(rank, energy)


def two_adapters(tmp_path: Path):
    fam = make_family(tmp_path / "fam", dtype=torch.float32)
    base = load_file(fam.base / "model.safetensors")
    ads = []
    for i in range(2):
        gen = torch.Generator().manual_seed(20 + i)
        mods = {m: tuple(t * 0.1 for t in lora_pair(base, m, 4, gen)) for m in (Q, V, DOWN)}
        head = base["lm_head.weight"] + 0.01 * torch.randn(base["lm_head.weight"].shape,
                                                           generator=gen)
        ads.append(write_adapter(tmp_path / f"ad{i}", mods, {"modules_to_save": ["lm_head"]},
                                 {f"{PREFIX}lm_head.weight": head}))
    return fam, ads


def recipe_for(fam, ads, method: str = "task_arithmetic", **params) -> dict:
    return {"merge_method": method, "base_model": str(fam.base),
            "models": [{"model": str(a), "parameters": {"weight": 0.5}} for a in ads],
            "parameters": params}


def read_back(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The full weights our own reader makes of a written adapter (rank_pattern included)."""
    with open_checkpoint(base_dir) as b, LoraCheckpoint(adapter_dir, b) as ck:
        return {n: ck.read(n) for n in ck.names()}


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_adapter_out_reproduces_the_full_merge(tmp_path: Path, method: str) -> None:
    """Rank 8 holds the sum of two rank-4 deltas exactly: base + B @ A from the written
    adapter equals the full-weights merge of the same recipe (to float32 SVD rounding); the
    changed head goes to modules_to_save whole; other tensors are left out."""
    fam, ads = two_adapters(tmp_path)
    params = {"density": 0.5} if method == "ties" else {}
    r = write_recipe(tmp_path / "r.yaml", recipe_for(fam, ads, method, **params))
    merge(r, tmp_path / "full")
    result = merge(r, tmp_path / "lora", out_format="lora", lora_rank=8)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8 and cfg["peft_type"] == "LORA"
    assert sorted(cfg["target_modules"]) == sorted([Q, V, DOWN])
    assert cfg["modules_to_save"] == ["lm_head"]
    keys = set(load_file(tmp_path / "lora" / "adapter_model.safetensors"))
    assert keys == {f"{PREFIX}{m}.lora_{x}.weight" for m in (Q, V, DOWN) for x in "AB"} | {
        f"{PREFIX}lm_head.weight"}
    full, back = load_dir(tmp_path / "full"), read_back(fam.base, tmp_path / "lora")
    base = load_file(fam.base / "model.safetensors")
    report = json.loads((tmp_path / "lora" / "report.json").read_text())
    errors = {m["tensor"]: m["relative_error"] for m in report["lora"]["per_module"]}
    assert set(errors) == {f"{m}.weight" for m in (Q, V, DOWN)}
    for name, want in full.items():
        if name in errors:  # the reported error is the one the written adapter makes
            merged = (want - base[name]).double()
            got = float((back[name] - want).double().norm() / merged.norm())
            assert abs(got - errors[name]) < 1e-4, name
        if name not in errors or method == "task_arithmetic":
            torch.testing.assert_close(back[name], want, rtol=0, atol=2e-6)
    assert result.lora["modules"] == 3
    if method == "task_arithmetic":
        assert result.lora["relative_error_max"] < 1e-5
    else:  # TIES' trim makes the merged delta full rank: rank 8 is a truncation
        assert result.lora["relative_error_max"] > 1e-3


def test_energy_rule_writes_rank_pattern_our_reader_applies(tmp_path: Path) -> None:
    fam, ads = two_adapters(tmp_path)
    r = write_recipe(tmp_path / "r.yaml", recipe_for(fam, ads))
    merge(r, tmp_path / "lora", out_format="lora", lora_energy=0.9)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    report = json.loads((tmp_path / "lora" / "report.json").read_text())["lora"]
    ranks = {m["module"]: m["rank"] for m in report["per_module"]}
    assert all(1 <= k <= 8 for k in ranks.values())
    for module, rank in ranks.items():
        with open_checkpoint(fam.base) as b, LoraCheckpoint(tmp_path / "lora", b) as ck:
            item = ck.low_rank[f"{module}.weight"]
            assert (item.r, item.scale) == (rank, 1.0)
    assert set(cfg["rank_pattern"].values()) <= set(ranks.values())
    assert all(m["relative_error"] <= (1 - 0.9) ** 0.5 + 1e-6 for m in report["per_module"])


def test_full_checkpoints_in_adapter_out(tmp_path: Path) -> None:
    """Without adapter inputs every changed 2-D weight but embeddings is factored; the rest
    that moved (norms, embeddings) goes to modules_to_save."""
    fam = make_family(tmp_path / "fam", dtype=torch.float32)
    r = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(fam.base),
        "models": [{"model": str(e)} for e in fam.experts]})
    merge(r, tmp_path / "lora", out_format="lora", lora_rank=16)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert "model.embed_tokens" not in cfg["target_modules"]
    assert Q in cfg["target_modules"] and "lm_head" in cfg["target_modules"]
    assert "model.embed_tokens" in (cfg["modules_to_save"] or [])
    merge(r, tmp_path / "full")
    full, back = load_dir(tmp_path / "full"), read_back(fam.base, tmp_path / "lora")
    for name, want in full.items():  # rank 16 = full rank of these tiny matrices
        torch.testing.assert_close(back[name], want, rtol=0, atol=1e-5)


def test_cli_prints_one_summary_line_and_refuses_in_one(tmp_path: Path) -> None:
    fam, ads = two_adapters(tmp_path)
    r = write_recipe(tmp_path / "r.yaml", recipe_for(fam, ads))
    res = run_cli("merge", str(r), "--out", str(tmp_path / "o"), "--out-format", "lora",
                   "--lora-rank", "4", "--no-progress")
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("lora adapter:"))
    assert "3 modules, rank 4 (rank 4)" in line and "modules_to_save: lm_head" in line
    bad = run_cli("merge", str(r), "--out", str(tmp_path / "o2"), "--out-format", "lora")
    assert bad.exit_code == 1 and "error: --out-format lora: give one of" in bad.output
    assert not (tmp_path / "o2").exists()
    emr = write_recipe(tmp_path / "e.yaml", {"merge_method": "emr", "base_model": str(fam.base),
                                             "models": [{"model": str(a), "name": f"t{i}"}
                                                        for i, a in enumerate(ads)]})
    bad = run_cli("merge", str(emr), "--out", str(tmp_path / "o3"), "--out-format", "lora",
                   "--lora-rank", "4")
    assert bad.exit_code == 1 and "one model per task" in bad.output
