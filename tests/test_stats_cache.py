"""TADrop's per-tensor statistics cached across runs: the same bytes with and without the cache,
a sweep over drop rates reuses them, a changed input or quantile setting misses."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from ckpt_helpers import Family, copy_family, edit_weights, load_dir, recipe_for

from mergewise import merge
from mergewise.statspass import StatsCache


def _run(fam: Family, out: Path, cache: Path | None, **sparsify) -> dict[str, torch.Tensor]:
    block = {"method": "tadrop", "drop_rate": 0.7, **sparsify}
    merge(recipe_for(fam, "ties", sparsify=block), out, overwrite=True, stats_cache=cache)
    return load_dir(out)


def test_cached_statistics_give_the_same_merge(family_f32: Family, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    plain = _run(family_f32, tmp_path / "plain", None)
    first = _run(family_f32, tmp_path / "first", cache)
    entries = json.loads((cache / StatsCache.FILE).read_text())
    n_tensors = len(plain)
    assert len(entries) == 2 * n_tensors  # one d per (expert, tensor)
    again = _run(family_f32, tmp_path / "again", cache)
    for n in plain:
        assert torch.equal(plain[n], first[n]) and torch.equal(plain[n], again[n]), n
    # a sweep over the drop rate reuses the statistics: no new entries
    swept = _run(family_f32, tmp_path / "swept", cache, drop_rate=0.9, strength=2.0)
    assert json.loads((cache / StatsCache.FILE).read_text()) == entries
    assert torch.equal(swept["model.layers.0.mlp.up_proj.weight"],
                       _run(family_f32, tmp_path / "ref", None, drop_rate=0.9, strength=2.0)[
                           "model.layers.0.mlp.up_proj.weight"])


def test_other_quantiles_or_inputs_miss(family_f32: Family, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _run(family_f32, tmp_path / "a", cache)
    before = len(json.loads((cache / StatsCache.FILE).read_text()))
    _run(family_f32, tmp_path / "b", cache, quantiles=[0.4, 0.9])
    assert len(json.loads((cache / StatsCache.FILE).read_text())) == 2 * before
    fam = copy_family(family_f32, tmp_path / "fam")

    def bump(t: dict[str, torch.Tensor]) -> None:
        t["model.norm.weight"] = t["model.norm.weight"] + 1.0

    edit_weights(fam.experts[0], bump)  # rewritten file: every tensor of it misses
    got = _run(fam, tmp_path / "c", cache)
    want = _run(fam, tmp_path / "d", None)
    assert all(torch.equal(got[n], want[n]) for n in want)
