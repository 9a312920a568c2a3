"""CLI end to end on tiny HF-style checkpoints built in the test: merge, dry run, shards,
methods, one-line errors with exit 1, the example, and the installed console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ckpt_helpers import Family, leftovers, load_dir, recipe_for, tree_hashes, write_recipe
from cli_helpers import assert_one_line_error
from safetensors.torch import load_file
from typer.testing import CliRunner

import mergewise
from mergewise import merge_state_dicts
from mergewise.checkpoint import open_checkpoint
from mergewise.cli import app

METHODS = ["arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "consensus", "dare_linear",
           "dare_ties", "della", "della_linear", "emr", "fisher", "iso_c", "iso_cts", "karcher",
           "linear", "lot", "model_stock", "multislerp", "nearswap", "nuslerp", "passthrough", "ram",
           "ramplus_tl", "regmean", "regmean_plusplus",
           "sce", "slerp", "tall_masks", "task_arithmetic", "ties", "tsv",
           "wudi"]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def run(runner: CliRunner, *args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def test_merge_end_to_end(runner: CliRunner, family_bf16: Family, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_for(
        family_bf16, "ties", parameters={"density": 0.3}, seed=1))
    out = tmp_path / "merged"
    result = run(runner, "merge", recipe, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert f"output: {out}" in result.stdout
    assert f"report: {out / 'report.json'}" in result.stdout
    assert "merged 21 tensors" in result.stdout
    merged = load_dir(out)
    expected = merge_state_dicts(load_file(family_bf16.base / "model.safetensors"),
                                 [load_file(e / "model.safetensors") for e in family_bf16.experts],
                                 "ties", parameters={"density": 0.3}, seed=1)
    assert sorted(merged) == sorted(expected)
    for k in merged:
        assert merged[k].dtype == torch.bfloat16 and torch.equal(merged[k], expected[k])
    with open_checkpoint(out) as ckpt:  # the output loads back as a checkpoint
        assert len(ckpt.names()) == 21
        assert ckpt.config["torch_dtype"] == "bfloat16"
    assert json.loads((out / "report.json").read_text())["merge_method"] == "ties"


def test_merge_with_progress_bar(runner: CliRunner, family_f32: Family, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", recipe_for(family_f32, "dare_ties"))
    result = run(runner, "merge", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_dry_run_prints_plan_and_writes_nothing(runner: CliRunner, family_f32: Family,
                                                tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_for(family_f32, "ties"))
    before = sorted(tmp_path.iterdir())
    inputs = tree_hashes(family_f32.root)
    result = run(runner, "merge", recipe, "--out", tmp_path / "merged", "--dry-run")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "plan" in text and "nothing written" in text
    assert "tensors: 21 (21 merged, 0 copied from the base)" in text
    assert f"parameters: {family_f32.shape.parameters:,}" in text
    assert "largest tensor: model.embed_tokens.weight [32, 16]" in text
    assert "estimated peak working memory" in text
    assert sorted(tmp_path.iterdir()) == before
    assert tree_hashes(family_f32.root) == inputs
    # --out is optional with --dry-run
    result = run(runner, "merge", recipe, "--dry-run")
    assert result.exit_code == 0 and "tensors: 21" in result.stdout


def test_shard_size(runner: CliRunner, family_small_f32: Family, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_for(family_small_f32, "task_arithmetic"))
    out = tmp_path / "merged"
    result = run(runner, "merge", recipe, "--out", out, "--shard-size", "20KB", "--no-progress")
    assert result.exit_code == 0, result.output
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n >= 4
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    for s in shards:
        # no shard exceeds 20 kB unless it holds a single larger tensor
        tensors = load_file(out / s)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 20_000 or len(tensors) == 1
    run(runner, "merge", recipe, "--out", tmp_path / "single", "--no-progress")
    a, b = load_dir(out), load_dir(tmp_path / "single")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_shard_size(runner: CliRunner, family_f32: Family, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_for(family_f32, "ties"))
    result = run(runner, "merge", recipe, "--out", tmp_path / "o", "--shard-size", "lots")
    assert_one_line_error(result, "shard size 'lots'")
    assert not (tmp_path / "o").exists()


def test_methods_lists_all_methods_and_parameters(runner: CliRunner) -> None:
    result = run(runner, "methods")
    assert result.exit_code == 0, result.output
    text = result.stdout
    headers = [ln.split(" ")[0] for ln in text.splitlines() if ln and not ln.startswith(" ")
               and "space" in ln]
    assert headers == METHODS
    for m in mergewise.METHODS:  # each header says whether a sparsify: block is accepted
        line = next(ln for ln in text.splitlines() if ln.startswith(f"{m.name} ("))
        assert ("sparsify: block accepted" if m.accepts_sparsify
                else "sparsify: block not accepted") in line, line
    for m in mergewise.METHODS:
        for p in (*m.params, *m.model_params):
            assert p.describe() in text, p.name
    assert "t (float in [0, 1], default 0.5)" in text
    assert "density (float in (0, 1], default 1.0)" in text  # mergekit's: no trim unless asked
    assert "weight (float, default 1.0): per-model factor on its task vector (or weights, for " \
           "linear) [per model]" in text
    assert "[per model, magnitude step]" in text
    assert "aggregate (mean|sum|weighted_mean, default None)" in text
    assert "normalize (bool, default True)" in text and "normalize (bool, default False)" in text
    for s in ("magnitude", "random", "breadcrumbs"):
        assert f"\n{s}\n" in text


@pytest.mark.parametrize("recipe_text, key", [
    ("merge_method: ties\nbase_model: b\nmodels: [a]\nparameters: {densty: 0.2}\n", "densty"),
    ("merge_method: tis\nbase_model: b\nmodels: [a]\n", "merge_method"),
    ("merge_method: ties\nbase_model: b\nmodels: [a]\nparameters: {density: 1.5}\n", "density"),
    ("merge_method: ties\nmodels:\n  - model: a\n   - model: b\n", "line 4"),
    ("merge_method: ties\nbase_model: does/not/exist\nmodels: [a]\n", "base_model"),
])
def test_bad_recipe_exits_1_with_one_line(runner: CliRunner, tmp_path: Path, recipe_text: str,
                                          key: str) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_text)
    result = run(runner, "merge", recipe, "--out", tmp_path / "out")
    assert_one_line_error(result, key)
    assert not (tmp_path / "out").exists()


def test_brackets_in_error_messages_survive(runner: CliRunner, tmp_path: Path) -> None:
    recipe = tmp_path / "run[red]" / "recipe[v2].yaml"
    result = run(runner, "merge", recipe, "--out", tmp_path / "out")
    assert_one_line_error(result, str(recipe))


def test_missing_recipe_and_missing_out(runner: CliRunner, family_f32: Family,
                                        tmp_path: Path) -> None:
    assert_one_line_error(run(runner, "merge", tmp_path / "nope.yaml", "--out", tmp_path / "o"),
                          str(tmp_path / "nope.yaml"), "cannot read")
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_for(family_f32, "ties"))
    assert_one_line_error(run(runner, "merge", recipe), "--out")


def test_checkpoint_errors_exit_1(runner: CliRunner, family_f32: Family, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "config.json").write_text("{}")
    data = recipe_for(family_f32, "ties")
    data["models"][1]["model"] = str(bogus)
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    assert_one_line_error(run(runner, "merge", recipe, "--out", tmp_path / "out"), str(bogus),
                          "not a checkpoint")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(runner: CliRunner, family_f32: Family,
                                         tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_for(family_f32, "ties"))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier model: --overwrite may replace it
    result = run(runner, "merge", recipe, "--out", out)
    assert_one_line_error(result, str(out), "already exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["config.json"]
    result = run(runner, "merge", recipe, "--out", out, "--overwrite", "--no-progress")
    assert result.exit_code == 0, result.output
    assert (out / "config.json").read_text() != "{}" and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path, "merged") == []


def test_unwritable_output(runner: CliRunner, family_f32: Family, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_for(family_f32, "ties"))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = run(runner, "merge", recipe, "--out", blocker / "merged")
    assert_one_line_error(result, str(blocker), "not a directory")


def test_interrupt_exits_130(runner: CliRunner, family_f32: Family, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_for(family_f32, "ties"))

    def interrupted(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(mergewise.api, "merge", interrupted)
    result = run(runner, "merge", recipe, "--out", tmp_path / "out")
    assert result.exit_code == 130
    assert "nothing was written" in result.stderr and "Traceback" not in result.output


def test_example_end_to_end(runner: CliRunner, tmp_path: Path) -> None:
    target = tmp_path / "ex"
    result = run(runner, "example", target)
    assert result.exit_code == 0, result.output
    assert f"merged model: {target / 'merged'}" in result.stdout
    assert (target / "recipe.yaml").is_file()
    assert sorted(p.name for p in (target / "models").iterdir()) == \
        ["base", "expert_0", "expert_1", "expert_2"]
    report = json.loads((target / "merged" / "report.json").read_text())
    assert report["merge_method"] == "ties" and len(report["tasks"]) == 3
    with open_checkpoint(target / "merged") as ckpt, \
            open_checkpoint(target / "models" / "base") as base:
        assert ckpt.names() == base.names()
        assert all(ckpt.info(n).dtype == torch.bfloat16 for n in ckpt.names())


def test_version(runner: CliRunner) -> None:
    result = run(runner, "version")
    assert result.exit_code == 0 and result.stdout.strip() == mergewise.__version__


def test_installed_console_script(family_f32: Family, tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "mergewise"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "mergewise.cli"]
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    helped = subprocess.run([*cmd, "--help"], capture_output=True, text=True, env=env,
                            timeout=60)
    assert helped.returncode == 0, helped.stderr
    for command in ("merge", "methods", "example"):
        assert command in helped.stdout
    # a real process: an error is one line on stderr, exit 1, no traceback
    recipe = write_recipe(tmp_path / "r.yaml", {**recipe_for(family_f32, "ties"), "sed": 1})
    failed = subprocess.run([*cmd, "merge", str(recipe), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, env=env, timeout=60)
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr
    lines = [ln for ln in failed.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'sed'" in lines[0]
    assert "did you mean 'seed'" in lines[0]
