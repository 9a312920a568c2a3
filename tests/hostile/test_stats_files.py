"""Malformed statistics: a LOT stats file with garbled metadata, missing or misshapen tensors,
NaN/Inf or negative sums of squares fails the merge in one line naming the file and the problem;
a corrupt TADrop stats cache is ignored and recomputed with at most one warning line and the
very same merge (a cache never changes results nor breaks a run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from ckpt_helpers import Family, load_dir, recipe_for, write_recipe
from cli_helpers import assert_one_line_error, run_cli
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import mergewise
from mergewise.features import capture
from mergewise.statspass import StatsCache

Tensors = dict[str, torch.Tensor]
Meta = dict[str, str]


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.LayerNorm(4))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base, experts a and b (plain torch layers) and their stats files, captured here."""
    root = tmp_path_factory.mktemp("lot")
    torch.manual_seed(0)
    module = net()
    base = {n: v.detach().clone() for n, v in module.state_dict().items()}
    save_file(base, str(root / "base.safetensors"))
    (root / "stats").mkdir()
    for k, task in enumerate("ab"):
        expert = {n: v + 0.1 * (k + 1) * torch.randn(v.shape) for n, v in base.items()}
        save_file(expert, str(root / f"{task}.safetensors"))
        module.load_state_dict(expert)
        stats = capture(module, [torch.randn(6, 3, generator=torch.Generator().manual_seed(k))],
                        label=task)
        stats.save(root / "stats" / f"{task}.safetensors")
    return root


def lot_recipe(project: Path, tmp_path: Path, stats_a: Path) -> Path:
    return write_recipe(tmp_path / "lot.yaml", {
        "merge_method": "lot", "base_model": str(project / "base.safetensors"),
        "models": [{"model": str(project / "a.safetensors"), "name": "a", "features": str(stats_a)},
                   {"model": str(project / "b.safetensors"), "name": "b",
                    "features": str(project / "stats" / "b.safetensors")}]})


def read_stats(path: Path) -> tuple[Meta, Tensors]:
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_the_intact_stats_files_merge(project: Path, tmp_path: Path) -> None:
    recipe = lot_recipe(project, tmp_path, project / "stats" / "a.safetensors")
    result = run_cli("merge", recipe, "--out", tmp_path / "out", "--no-progress")
    assert result.exit_code == 0, result.output


# --- stats files --------------------------------------------------------------------------------

Edit = Callable[[Meta, Tensors], tuple[Meta | None, Tensors]]


def meta(**changes: str | None) -> Edit:
    def edit(m: Meta, t: Tensors) -> tuple[Meta, Tensors]:
        out = {**m, **{k: v for k, v in changes.items() if v is not None}}
        return {k: v for k, v in out.items() if changes.get(k, "") is not None}, t
    return edit


def tensor(key: str, value: torch.Tensor | None) -> Edit:
    def edit(m: Meta, t: Tensors) -> tuple[Meta, Tensors]:
        out = {k: v for k, v in t.items() if k != key}
        return m, out if value is None else {**out, key: value}
    return edit


def entry(key: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Edit:
    return lambda m, t: (m, {**t, key: change(t[key].clone())})


def _set(index: tuple[int, ...], value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def change(x: torch.Tensor) -> torch.Tensor:
        x[index] = value
        return x
    return change


FIX = "recompute it with `mergewise features --overwrite`"
STATS_CASES: dict[str, tuple[Edit, list[str]]] = {
    "no-metadata": (lambda m, t: (None, t), ["not a mergewise stats file of format 1"]),
    "layers-missing": (meta(layers=None), ["metadata 'layers' is missing or not JSON", FIX]),
    "layers-garbled": (meta(layers='{"0": {"kind": "lin'), ["metadata 'layers' is missing or not"]),
    "layers-a-list": (meta(layers='["0", "2"]'), ["metadata 'layers' is not a JSON object"]),
    "layers-empty": (meta(layers="{}"), ["holds the statistics of no layer"]),
    "layer-kind-conv": (meta(layers=json.dumps({"0": {"kind": "conv"}})),
                        ["layer '0' is {\"kind\": \"conv\"}, expected kind 'linear'"]),
    "layer-layout-bad": (meta(layers=json.dumps({"0": {"kind": "linear", "layout": "x"}})),
                         ["layer '0' is", "expected kind 'linear' (layout 'out_in' or 'in_out')"]),
    "layer-not-a-dict": (meta(layers=json.dumps({"0": "linear"})), ["layer '0' is \"linear\""]),
    "probe-garbled": (meta(probe_tensors="[0.weight"), ["metadata 'probe_tensors' is missing or"]),
    "probe-a-dict": (meta(probe_tensors="{}"), ["metadata 'probe_tensors' is not a JSON list"]),
    "probe-numbers": (meta(probe_tensors="[1, 2]"), ["'probe_tensors' is not a list of tensor"]),
    "probe-hash-missing": (meta(probe=None), ["or 'probe' is missing"]),
    "calibration-garbled": (meta(calibration="{"), ["metadata 'calibration' is missing or not"]),
    "examples-not-a-count": (meta(examples="six"), ["metadata 'examples' = 'six' is not a count"]),
    "rows-negative": (meta(rows="-6"), ["metadata 'rows' = '-6' is not a count"]),
    "gram-missing": (tensor("gram:0", None), ["layer '0' has no 'gram:0' tensor", FIX]),
    "rows-missing": (tensor("rows:2", None), ["layer '2' has no 'rows:2' tensor"]),
    "gram-not-square": (tensor("gram:0", torch.zeros(3, 4, dtype=torch.float64)),
                        ["tensor 'gram:0' is float64 [3, 4], expected float64 (n, n), n > 0"]),
    "gram-1d": (tensor("gram:0", torch.zeros(3, dtype=torch.float64)),
                ["tensor 'gram:0' is float64 [3], expected float64 (n, n)"]),
    "gram-float32": (entry("gram:0", lambda x: x.float()),
                     ["tensor 'gram:0' is float32 [3, 3], expected float64 (n, n)"]),
    "rows-int64": (entry("rows:0", lambda x: x.long()), ["tensor 'rows:0' is int64 [], expected "
                                                         "a float64 scalar"]),
    "rows-a-vector": (entry("rows:0", lambda x: x.reshape(1)), ["tensor 'rows:0' is float64 [1]"]),
    "energy-scalar": (tensor("energy:2", torch.tensor(1.0, dtype=torch.float64)),
                      ["tensor 'energy:2' is float64 [], expected float64, 1-D or more"]),
    "gram-nan": (entry("gram:0", _set((0, 1), float("nan"))), ["tensor 'gram:0' has NaN/Inf"]),
    "gram-inf": (entry("gram:0", _set((2, 2), float("inf"))), ["tensor 'gram:0' has NaN/Inf"]),
    "energy-nan": (entry("energy:2", _set((1,), float("nan"))), ["tensor 'energy:2' has NaN/Inf"]),
    "rows-inf": (entry("rows:0", lambda x: x * float("inf")), ["tensor 'rows:0' has NaN/Inf"]),
    "rows-negative-value": (entry("rows:0", lambda x: -x), ["tensor 'rows:0' has negative values"]),
    "gram-negative-diagonal": (entry("gram:0", _set((1, 1), -1.0)),
                               ["tensor 'gram:0' has negative diagonal entries"]),
    "energy-negative": (entry("energy:2", _set((0,), -0.5)), ["tensor 'energy:2' has negative"]),
    "gram-of-another-width": (tensor("gram:0", torch.eye(5, dtype=torch.float64)),
                              ["layer '0' has a 5-wide Gram", "belongs to another model"]),
}


@pytest.mark.parametrize("case", list(STATS_CASES))
def test_a_malformed_stats_file_fails_in_one_line(project: Path, tmp_path: Path,
                                                  case: str) -> None:
    edit, needles = STATS_CASES[case]
    path = tmp_path / "a.safetensors"
    m, t = edit(*read_stats(project / "stats" / "a.safetensors"))
    save_file(t, str(path), metadata=m)
    result = run_cli("merge", lot_recipe(project, tmp_path, path), "--out", tmp_path / "out",
                     "--no-progress")
    assert_one_line_error(result, str(path), *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cut", [0, 7, 50, -8], ids=["empty", "7-bytes", "in-header", "in-data"])
def test_a_truncated_or_garbage_stats_file_fails_in_one_line(project: Path, tmp_path: Path,
                                                             cut: int) -> None:
    path = tmp_path / "a.safetensors"
    raw = (project / "stats" / "a.safetensors").read_bytes()
    path.write_bytes(raw[:cut])
    result = run_cli("merge", lot_recipe(project, tmp_path, path), "--out", tmp_path / "out",
                     "--no-progress")
    assert_one_line_error(result, "stats file", str(path))


def test_a_non_string_metadata_value_fails_in_one_line(project: Path, tmp_path: Path) -> None:
    raw = (project / "stats" / "a.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"]["rows"] = 6
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    path = tmp_path / "a.safetensors"
    path.write_bytes(raw[:8] + text + b" " * (n - len(text)) + raw[8 + n:])
    result = run_cli("merge", lot_recipe(project, tmp_path, path), "--out", tmp_path / "out",
                     "--no-progress")
    # the safetensors parser (as strict as the library) refuses it before the stats checks
    assert_one_line_error(result, str(path), "__metadata__ gives 'rows' a JSON number")


# --- the TADrop stats cache ---------------------------------------------------------------------

def tadrop_merge(fam: Family, tmp_path: Path, out: str, cache: Path | None) -> Any:
    recipe = write_recipe(tmp_path / "tadrop.yaml", recipe_for(
        fam, "ties", sparsify={"method": "tadrop", "drop_rate": 0.7}))
    extra = ["--stats-cache", cache] if cache is not None else []
    return run_cli("merge", recipe, "--out", tmp_path / out, "--no-progress", *extra)


@pytest.fixture(scope="module")
def reference(family_f32: Family, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The merge without a cache, and a valid cache file's entries."""
    root = tmp_path_factory.mktemp("tadrop")
    assert tadrop_merge(family_f32, root, "plain", None).exit_code == 0
    assert tadrop_merge(family_f32, root, "cached", root / "cache").exit_code == 0
    entries = json.loads((root / "cache" / StatsCache.FILE).read_text())
    assert all(set(e) == {"value", "check"} for e in entries.values())
    return load_dir(root / "plain"), entries


def _first(entries: dict[str, Any], value: Any) -> dict[str, Any]:
    key = next(iter(entries))
    return {**entries, key: value(key, entries[key])}


CACHE_CASES: dict[str, Callable[[Path, dict[str, Any]], None]] = {
    "garbage-text": lambda p, e: p.write_text("this is not json"),
    "garbage-bytes": lambda p, e: p.write_bytes(b"\xff\xfe\x00garbage"),
    "truncated": lambda p, e: p.write_text(json.dumps(e)[: len(json.dumps(e)) // 2]),
    "a-list": lambda p, e: p.write_text(json.dumps(list(e))),
    "entry-a-number": lambda p, e: p.write_text(json.dumps(_first(e, lambda k, v: 5))),
    "entry-no-check": lambda p, e: p.write_text(json.dumps(_first(
        e, lambda k, v: {"value": v["value"]}))),
    "value-tampered": lambda p, e: p.write_text(json.dumps(_first(
        e, lambda k, v: {**v, "value": 0.9}))),
    "value-string-forged-check": lambda p, e: p.write_text(json.dumps(_first(
        e, lambda k, v: {"value": "abc", "check": StatsCache.check(k, "abc")}))),
    "value-nan-forged-check": lambda p, e: p.write_text(json.dumps(_first(
        e, lambda k, v: {"value": float("nan"), "check": StatsCache.check(k, float("nan"))}))),
    "value-bool-forged-check": lambda p, e: p.write_text(json.dumps(_first(
        e, lambda k, v: {"value": True, "check": StatsCache.check(k, True)}))),
}


@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_a_corrupt_cache_is_recomputed_with_one_warning(
        family_f32: Family, tmp_path: Path, reference: tuple[dict, dict[str, Any]],
        caplog: pytest.LogCaptureFixture, case: str) -> None:
    plain, entries = reference
    cache = tmp_path / "cache"
    cache.mkdir()
    CACHE_CASES[case](cache / StatsCache.FILE, entries)
    with caplog.at_level("WARNING", logger="mergewise.stats_cache"):
        result = tadrop_merge(family_f32, tmp_path, "out", cache)
    assert result.exit_code == 0, result.output
    warnings = [r.getMessage() for r in caplog.records if r.name == "mergewise.stats_cache"]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: stats cache {cache}"), warnings
    got = load_dir(tmp_path / "out")
    assert all(torch.equal(got[n], plain[n]) for n in plain)
    assert json.loads((cache / StatsCache.FILE).read_text()) == entries  # rewritten whole
    caplog.clear()
    with caplog.at_level("WARNING", logger="mergewise.stats_cache"):
        assert tadrop_merge(family_f32, tmp_path, "again", cache).exit_code == 0
    assert not caplog.records


@pytest.mark.parametrize("where", ["dir-is-a-file", "file-is-a-dir"])
def test_an_unusable_cache_location_warns_once_and_merges(
        family_f32: Family, tmp_path: Path, reference: tuple[dict, dict[str, Any]],
        caplog: pytest.LogCaptureFixture, where: str) -> None:
    plain, _ = reference
    cache = tmp_path / "cache"
    if where == "dir-is-a-file":
        cache.write_text("a file")
    else:
        (cache / StatsCache.FILE).mkdir(parents=True)
    with caplog.at_level("WARNING", logger="mergewise.stats_cache"):
        result = tadrop_merge(family_f32, tmp_path, "out", cache)
    assert result.exit_code == 0, result.output
    warnings = [r.getMessage() for r in caplog.records if r.name == "mergewise.stats_cache"]
    assert len(warnings) == 1 and "cannot be read" in warnings[0], warnings
    got = load_dir(tmp_path / "out")
    assert all(torch.equal(got[n], plain[n]) for n in plain)


def test_the_warning_is_one_stderr_line_from_the_real_cli(family_f32: Family,
                                                          tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / StatsCache.FILE).write_text("{truncated")
    recipe = write_recipe(tmp_path / "tadrop.yaml", recipe_for(
        family_f32, "ties", sparsify={"method": "tadrop", "drop_rate": 0.7}))
    src = str(Path(mergewise.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-c", "from mergewise.cli import main; main()", "merge",
                          str(recipe), "--out", str(tmp_path / "out"), "--no-progress",
                          "--stats-cache", str(cache)], capture_output=True, text=True, env=env,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert lines == [f"warning: stats cache {cache / StatsCache.FILE} is not valid JSON "
                     "(truncated or garbled); ignored, the statistics are recomputed (the merge "
                     "is unchanged)"], run.stderr
