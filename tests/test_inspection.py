"""``mergewise inspect``: the same statistics a TADrop merge computes, tables, plots, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from ckpt_helpers import Family, tree_hashes
from typer.testing import CliRunner

from mergewise import RecipeError, merge_state_dicts
from mergewise.checkpoint import open_checkpoint
from mergewise.cli import app
from mergewise.inspection import inspect_experts

PNG = b"\x89PNG\r\n\x1a\n"


def _state(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as c:
        return {n: c.read(n).clone() for n in c.names()}


@pytest.mark.parametrize("budget", ["median", "elements"])
def test_inspect_equals_the_merge_stats_pass(family_f32: Family, budget: str) -> None:
    """d and drop rate per (expert, tensor) are exactly those a task_arithmetic + TADrop merge
    records, for both budgets."""
    options = {"drop_rate": 0.7, "strength": 1.5, "budget": budget}
    result = inspect_experts([str(e) for e in family_f32.experts], str(family_f32.base),
                             tadrop=options)
    records: list[dict] = []
    merge_state_dicts(_state(family_f32.base), {e.name: _state(e) for e in family_f32.experts},
                      "task_arithmetic", sparsify={"method": "tadrop", **options},
                      records=records)
    merged = [r for r in records if r["merged"]]
    assert len(result.rows) == len(merged) * len(family_f32.experts)
    want = {(task, r["name"]): (info["d"], info["drop_rate"])
            for r in merged for task, info in zip([e.name for e in family_f32.experts],
                                                   r["models"], strict=True)}
    got = {(row["task"], row["tensor"]): (row["d"], row["drop_rate"]) for row in result.rows}
    assert got == want
    assert all(d is not None and d > 0 for d in result.d_ref)


def test_inspect_writes_tables_and_plots(family_f32: Family, tmp_path: Path) -> None:
    before = tree_hashes(family_f32.root)
    out = tmp_path / "diag"
    result = inspect_experts([str(e) for e in family_f32.experts], str(family_f32.base), out)
    names = sorted(p.name for p in result.files)
    assert names == ["d_by_layer.png", "drop_vs_d.png", "hist_extremes.png", "inspect.csv",
                     "inspect.json"]
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5_000
    report = json.loads((out / "inspect.json").read_text())
    assert report["tadrop"]["drop_rate"] == 0.8 and len(report["rows"]) == len(result.rows)
    # inspect decides rates without dropping: no realised drop rate is claimed
    assert all(k["realised_drop_rate"] is None for k in report["by_kind"] + report["by_task"])
    with open(out / "inspect.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(result.rows)
    assert tree_hashes(family_f32.root) == before  # inputs untouched


@pytest.mark.parametrize(("options", "needle"), [
    ({"drop_rate": 1.5}, "'drop_rate' = 1.5 is out of range"),
    ({"budget": "most"}, "'budget' must be one of median, elements"),
    ({"strenght": 1.0}, "did you mean 'strength'"),
])
def test_inspect_refuses_bad_options(family_f32: Family, options: dict, needle: str) -> None:
    with pytest.raises(RecipeError) as exc:
        inspect_experts([str(family_f32.experts[0])], str(family_f32.base), tadrop=options)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_inspect_cli(family_f32: Family, tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["inspect", *map(str, family_f32.experts), "--base",
                             str(family_f32.base), "--out", str(tmp_path / "d")])
    assert ok.exit_code == 0, ok.output
    assert "d_ref" in ok.output and "wrote" in ok.output
    bad = runner.invoke(app, ["inspect", str(family_f32.experts[0]), "--base",
                              str(family_f32.base), "--budget", "most"])
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert len([ln for ln in bad.stderr.splitlines() if ln.strip()]) == 1
