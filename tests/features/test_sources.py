"""Which model gets which statistics: plan_sources (all that is missing said at once) and the
reuse rules of obtain (stale settings, data identified by content), on plain torch experts."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mergewise import METHODS, FeatureError, RecipeError, parse_recipe
from mergewise.features import FeatureSource, FeatureStats, obtain, plan_sources
from mergewise.recipe import CAPTURE_OPTIONS, Calibration

FACTORY = '''
from torch import nn


def build():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.LayerNorm(4))
'''
CAL = {"num_examples": 8, "batch_size": 4, "factory": "sources_test_factory:build"}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A recipe directory: a module factory, experts a and b, and their tensor calibration data."""
    (tmp_path / "sources_test_factory.py").write_text(FACTORY)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.LayerNorm(4))
    for k, task in enumerate("ab"):
        save_file({n: v.detach() + 0.1 * (k + 1) for n, v in net.state_dict().items()},
                  str(tmp_path / f"{task}.safetensors"))
        torch.save(torch.randn(12, 3, generator=torch.Generator().manual_seed(k)), tmp_path / f"{task}.pt")
    return tmp_path


def plan(project: Path, entries: list[dict[str, Any]], overwrite: bool = False) -> list[FeatureSource]:
    recipe = parse_recipe({"merge_method": "lot", "base_model": "base", "models": entries})
    return plan_sources(recipe, project, [project / e["model"] for e in entries], overwrite)


def entries(tasks: str = "ab", **calibration: Any) -> list[dict[str, Any]]:
    return [{"model": f"{t}.safetensors", "name": t, "features": f"stats/{t}.safetensors",
             "calibration": {**CAL, "data": f"{t}.pt", **calibration}} for t in tasks]


def contents(stats: FeatureStats) -> dict[str, torch.Tensor]:
    return {k: stats.tensor(k) for k in stats.keys()}


def test_what_is_missing_is_reported_all_at_once(project: Path) -> None:
    models = [{"model": "a.safetensors", "calibration": {"data": "nowhere_a.pt"}},
              {"model": "b.safetensors", "features": "stats/b.safetensors"},
              {"model": "c.safetensors", "calibration": {"data": "nowhere_c.pt"}}]
    with pytest.raises(FeatureError) as err:
        plan(project, models)
    message = str(err.value)
    assert f"models.0.calibration.data: {project / 'nowhere_a.pt'} does not exist" in message
    assert (f"models.1.features: stats file {project / 'stats' / 'b.safetensors'} does not exist "
            "and the model has no calibration block to compute it") in message
    assert f"models.2.calibration.data: {project / 'nowhere_c.pt'} does not exist" in message
    assert "\n" not in message


def test_paths_are_taken_from_the_recipe_directory(project: Path) -> None:
    models = entries("a") + [{"model": "b.safetensors", "features": str(project / "abs.safetensors"),
                              "calibration": {"data": str(project / "b.pt")}}]
    a, b = plan(project, models)
    assert (a.task, a.model, a.stats_path, a.data) == (
        "a", project / "a.safetensors", project / "stats" / "a.safetensors", project / "a.pt")
    assert isinstance(a.calibration, Calibration) and a.calibration.num_examples == 8
    assert not a.cached
    assert (b.task, b.stats_path, b.data) == ("b.safetensors", project / "abs.safetensors", project / "b.pt")


def test_a_stats_file_is_reused_only_with_the_same_settings(project: Path) -> None:
    seen = []
    stats, reports = obtain(plan(project, entries()), seed=0, root=project, progress=seen.append)
    assert seen == reports and [(r.task, r.examples) for r in reports] == [("a", 8), ("b", 8)]
    assert [r.path for r in reports] == [project / "stats" / "a.safetensors", project / "stats" / "b.safetensors"]
    first = [contents(s) for s in stats]
    mtime = (project / "stats" / "a.safetensors").stat().st_mtime_ns
    again, reports = obtain(plan(project, entries()), seed=0, root=project)
    assert reports == [] and (project / "stats" / "a.safetensors").stat().st_mtime_ns == mtime
    for s, want in zip(again, first, strict=True):
        assert all(torch.equal(s.tensor(k), v) for k, v in want.items())
    for calibration, seed, differ in (({"num_examples": 6}, 0, "num_examples"), ({}, 1, "seed"),
                                      ({"num_examples": 6, "batch_size": 2}, 0, "batch_size, num_examples")):
        with pytest.raises(FeatureError, match=rf"stats/a\.safetensors: was computed with other calibration "
                                               rf"settings \({differ} differ\); delete it, or recompute"):
            obtain(plan(project, entries(**calibration)), seed=seed, root=project)
    _, reports = obtain(plan(project, entries(num_examples=6), overwrite=True), seed=0, root=project,
                        overwrite=True)
    assert [r.examples for r in reports] == [6, 6]  # overwrite: captured again


def test_the_data_is_identified_by_content_not_by_path(project: Path) -> None:
    def with_data(data: str) -> list[FeatureSource]:
        return plan(project, [{**entries("a")[0], "calibration": {**CAL, "data": data}}])

    (stats,), _ = obtain(with_data("a.pt"), seed=0, root=project)
    (project / "moved").mkdir()
    shutil.copy(project / "a.pt", project / "moved" / "a.pt")
    (moved,), reports = obtain(with_data("moved/a.pt"), seed=0, root=project)
    assert reports == []  # a moved project keeps its stats files
    assert all(torch.equal(moved.tensor(k), v) for k, v in contents(stats).items())
    (_,), reports = obtain(with_data("gone.pt"), seed=0, root=project)
    assert reports == []  # data no longer there: nothing to compare it with, the file is used
    torch.save(torch.randn(12, 3), project / "other.pt")
    with pytest.raises(FeatureError, match=r"\(data_sha256 differ\)"):
        obtain(with_data("other.pt"), seed=0, root=project)
    (plain,), reports = obtain(plan(project, [{"model": "a.safetensors", "features": "stats/a.safetensors"}]),
                               seed=5, root=project)
    assert reports == [] and plain.keys() == stats.keys()  # no calibration block: nothing to check


def test_a_capture_without_a_features_path_goes_to_the_workdir(project: Path) -> None:
    work = project / "work"
    models = [{"model": "a.safetensors", "name": "sub/a", "calibration": {**CAL, "data": "a.pt"}}]
    _, (report,) = obtain(plan(project, models), seed=0, root=project, workdir=work)
    assert report.path == work / "sub_a.features.safetensors" and report.path.is_file()
    with pytest.raises(FeatureError, match="t: no stats file to read and no calibration block"):
        obtain([FeatureSource("t", project / "a.safetensors", None, None)], seed=0)


def test_streamed_and_float32_captures_from_the_recipe(project: Path) -> None:
    (plain,), _ = obtain(plan(project, entries("a")), seed=0, root=project)
    want = contents(plain)
    (streamed,), (report,) = obtain(plan(project, entries("a", blocks_per_pass=1), overwrite=True),
                                    seed=0, root=project, overwrite=True)
    assert report.path == project / "stats" / "a.safetensors" and report.examples == 8
    assert contents(streamed).keys() == want.keys()
    assert all(torch.equal(streamed.tensor(k), v) for k, v in want.items())
    # accumulate is part of the settings a stats file is reused with; float64 files still match
    with pytest.raises(FeatureError, match=r"\(accumulate differ\)"):
        obtain(plan(project, entries("a", accumulate="float32")), seed=0, root=project)
    (f32,), _ = obtain(plan(project, entries("a", accumulate="float32"), overwrite=True), seed=0,
                       root=project, overwrite=True)
    assert f32.gram("0").dtype == torch.float32 and f32.metadata["accumulate"] == "float32"
    with pytest.raises(FeatureError, match=r"\(accumulate differ\)"):
        obtain(plan(project, entries("a")), seed=0, root=project)
    with pytest.raises(FeatureError, match="tensor calibration data is already in rows"):
        obtain(plan(project, entries("a", pack=True), overwrite=True), seed=0, root=project,
               overwrite=True)


def test_every_calibration_field_is_a_draw_setting_or_a_capture_option() -> None:
    # a new option must be classified: each method's registry entry then says if it honours it
    draw = {"data", "num_examples", "max_length", "batch_size", "text_field", "factory"}
    assert set(Calibration.model_fields) == draw | set(CAPTURE_OPTIONS)
    for m in METHODS:
        assert set(m.calibration_options) <= set(CAPTURE_OPTIONS), m.name
        assert not set(m.calibration_why) & set(m.calibration_options), m.name
    assert METHODS.get("fisher").calibration_options == ("labels", "pack")
    assert METHODS.get("regmean_plusplus").calibration_options == ("pack", "accumulate")
    for name in ("lot", "regmean"):
        assert METHODS.get(name).calibration_options == ("pack", "accumulate", "blocks_per_pass")


def recipe_with(method: str, **calibration: Any):
    models = [{"model": f"{t}.safetensors", "calibration": {"data": f"{t}.pt"}} for t in "ab"]
    models[1]["calibration"].update(calibration)
    return parse_recipe({"merge_method": method, "base_model": "base", "models": models})


@pytest.mark.parametrize(("method", "option", "value", "why"), [
    ("fisher", "blocks_per_pass", 2, "fisher has no Gram to stream"),
    ("fisher", "accumulate", "float32", "fisher has no Gram: its per-parameter sums are always float64"),
    ("regmean_plusplus", "blocks_per_pass", 1, "regmean_plusplus holds every expert's Grams"),
    ("regmean_plusplus", "labels", "sample", "regmean_plusplus captures layer-input Grams, not a Fisher"),
    ("lot", "labels", "argmax", "lot captures layer-input Grams"),
    ("regmean", "labels", "expected", "regmean captures layer-input Grams"),
])
def test_an_option_the_method_does_not_honour_is_refused_in_one_line(
        tmp_path: Path, method: str, option: str, value: Any, why: str) -> None:
    # refused by plan_sources before any data or model is looked at (neither exists here)
    rec = recipe_with(method, **{option: value})
    with pytest.raises(RecipeError) as err:
        plan_sources(rec, tmp_path, [tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    message = str(err.value)
    assert message.startswith(f"models.1.calibration.{option}: merge_method {method} does not "
                              f"honour it ({option}: {CAPTURE_OPTIONS[option]}; {why}")
    assert message.endswith("; remove the option") and "\n" not in message
    assert "models.0" not in message


def test_honoured_options_and_explicit_defaults_pass(tmp_path: Path) -> None:
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for t in "ab":
        (tmp_path / f"{t}.pt").write_bytes(b"")
    for method, options in (
            ("fisher", {"labels": "sample", "accumulate": "float64", "pack": True,
                        "blocks_per_pass": None}),
            ("regmean_plusplus", {"pack": True, "accumulate": "float32", "labels": "auto"}),
            ("lot", {"pack": True, "accumulate": "float32", "blocks_per_pass": 3})):
        assert len(plan_sources(recipe_with(method, **options), tmp_path, paths)) == 2
    # every offender at once
    with pytest.raises(RecipeError, match=r"^models\.1\.calibration\.accumulate: .*; models\.1\."
                                          r"calibration\.blocks_per_pass: .*; remove the options$"):
        plan_sources(recipe_with("fisher", accumulate="float32", blocks_per_pass=1), tmp_path, paths)
