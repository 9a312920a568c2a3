"""EMR through files: unified model + modulators.safetensors, materialize (CLI and API),
streaming == in memory bit for bit, TADrop in front, validation of the modulators."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ckpt_helpers import (
    Family,
    copy_family,
    leftovers,
    make_family,
    recipe_for,
    tree_hashes,
    write_recipe,
)
from ckpt_helpers import load_dir as load_all
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergewise import (
    ModulatorError,
    OutputError,
    UnknownTaskError,
    load_task,
    materialize,
    merge,
    merge_task_state_dicts,
    task_state_dict,
)
from mergewise.cli import app
from mergewise.modulators import unpack_mask

TASKS = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def fam3(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Base + 3 float32 experts (read-only)."""
    return make_family(tmp_path_factory.mktemp("fam3"), n_experts=3, dtype=torch.float32)


def emr_recipe(fam: Family, **extra: object) -> dict:
    data = recipe_for(fam, "emr", **extra)
    for entry, task in zip(data["models"], TASKS, strict=False):
        entry["name"] = task
    return data


def load_dir(directory: Path) -> dict[str, torch.Tensor]:
    """The model's tensors (every *.safetensors but the modulators)."""
    return {k: v for k, v in load_all(directory).items() if not k.startswith("mask.")
            and k not in ("rescalers", "digests")}


def state_dicts(fam: Family) -> tuple[dict, dict]:
    base = load_dir(fam.base)
    return base, {t: load_dir(e) for t, e in zip(TASKS, fam.experts, strict=False)}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def formula(base_dir: Path, out: Path, task: str) -> dict[str, torch.Tensor]:
    """theta0 + lambda_t * (M_t * (unified - theta0)), computed here from the files."""
    base, unified = load_dir(base_dir), load_dir(out)
    with safe_open(str(out / "modulators.safetensors"), "pt") as f:
        meta = f.metadata()
        tasks, shapes = json.loads(meta["tasks"]), json.loads(meta["tensors"])
        t = tasks.index(task)
        lam = float(f.get_tensor("rescalers")[t])
        masks = {n: unpack_mask(f.get_tensor(f"mask.{t}.{n}"), s) for n, s in shapes.items()}
    result = {}
    for name, stored in unified.items():
        if name not in masks:
            result[name] = stored
            continue
        theta0 = base[name].float()
        result[name] = (theta0 + (stored.float() - theta0) * masks[name] * lam).to(stored.dtype)
    return result


@pytest.fixture(scope="module")
def merged(fam3: Family, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("emr") / "out"
    merge(emr_recipe(fam3), out)
    return out


def test_output_layout_and_report(fam3: Family, merged: Path) -> None:
    files = {p.name for p in merged.iterdir()}
    assert {"README.md", "config.json", "mergewise_recipe.yaml", "model.safetensors",
            "modulators.safetensors", "report.csv", "report.json"} <= files
    report = json.loads((merged / "report.json").read_text())
    mods = report["modulators"]
    assert mods["tasks"] == TASKS and set(mods["rescalers"]) == set(TASKS)
    assert mods["bytes"] == (merged / "modulators.safetensors").stat().st_size
    experts = sum((e / "model.safetensors").stat().st_size for e in fam3.experts)
    assert abs(mods["experts_bytes"] - experts) < 3 * 4096  # headers differ
    params = fam3.shape.parameters
    assert mods["mask_bytes"] <= 3 * (params // 8 + 21)  # 1 bit per parameter per task
    # tiny: headers and the 32-byte digests (header, rescalers, per tensor base, unified, 3 masks)
    raw = (merged / "modulators.safetensors").read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")
    assert mods["bytes"] - header == mods["mask_bytes"] + 3 * 8 + (2 + 21 * (2 + 3)) * 32
    assert mods["bytes"] / mods["experts_bytes"] == mods["ratio_to_experts"] < 0.25
    with safe_open(str(merged / "modulators.safetensors"), "pt") as f:
        meta = f.metadata()
        assert meta["format"] == "mergewise-emr-modulators" and meta["format_version"] == "2"
        assert meta["bit_order"] == "little" and json.loads(meta["tasks"]) == TASKS
        assert meta["base_model"] == str(fam3.base.resolve())
        assert f.get_tensor("rescalers").tolist() == [mods["rescalers"][t] for t in TASKS]
        shapes = json.loads(meta["tensors"])
        for name, shape in shapes.items():
            n = 1
            for s in shape:
                n *= s
            assert f.get_slice(f"mask.2.{name}").get_shape() == [(n + 7) // 8]


def test_model_card_and_dry_run(fam3: Family, merged: Path, tmp_path: Path) -> None:
    card = (merged / "README.md").read_text()
    assert "mergewise materialize DIR --task NAME" in card and "alpha, beta, gamma" in card
    result = merge(emr_recipe(fam3), tmp_path / "dry", dry_run=True)
    assert result.summary.merged == 21 and not (tmp_path / "dry").exists()


def test_load_task_into_a_module(merged: Path) -> None:
    want = task_state_dict(merged, "gamma")
    root = torch.nn.Module()
    for name, t in want.items():  # a module tree with the checkpoint's names
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        mod.register_buffer(leaf, torch.zeros_like(t))
    load_task(root, merged, "gamma")
    assert_same(dict(root.state_dict()), want)


def test_unified_model_is_base_plus_unified_vector(fam3: Family, merged: Path) -> None:
    base, experts = state_dicts(fam3)
    mem = merge_task_state_dicts(base, experts)
    assert_same(load_dir(merged), mem.unified)


@pytest.mark.parametrize("task", TASKS)
def test_materialize_equals_the_formula_and_the_in_memory_merge(
        fam3: Family, merged: Path, tmp_path: Path, task: str) -> None:
    written = materialize(merged, task, tmp_path / task)
    from_files = load_dir(written)
    assert_same(from_files, formula(fam3.base, merged, task))
    assert_same(task_state_dict(merged, task), from_files)
    base, experts = state_dicts(fam3)
    mem = merge_task_state_dicts(base, experts)
    assert_same(mem[task], from_files)  # streaming == in memory, bit for bit
    report = json.loads((merged / "report.json").read_text())
    assert mem.rescalers == report["modulators"]["rescalers"]
    assert (written / "config.json").is_file() and (written / "mergewise_recipe.yaml").is_file()
    assert task in (written / "README.md").read_text()


def test_bf16_sharded_with_tadrop_streaming_equals_in_memory(tmp_path: Path) -> None:
    fam = make_family(tmp_path / "fam", n_experts=3, dtype=torch.bfloat16, shard_size=2_000)
    before = tree_hashes(fam.root)
    sparsify = {"method": "tadrop", "drop_rate": 0.6}
    out = tmp_path / "out"
    result = merge(emr_recipe(fam, sparsify=sparsify), out, shard_size="4KB")
    assert result.modulators is not None and len(result.files) > 2
    report = json.loads((out / "report.json").read_text())
    assert all(s["sparsifier"] == "tadrop" for s in report["sparsifiers"])
    base, experts = state_dicts(fam)
    mem = merge_task_state_dicts(base, experts, sparsify=sparsify)
    assert_same(load_dir(out), mem.unified)
    plain = merge_task_state_dicts(base, experts)
    assert plain.rescalers != mem.rescalers  # TADrop changed what EMR saw
    for task in TASKS:
        from_files = task_state_dict(out, task)
        assert_same(from_files, mem[task])
        assert_same(from_files, formula(fam.base, out, task))
        assert {t.dtype for t in from_files.values()} == {torch.bfloat16}
    assert tree_hashes(fam.root) == before


def test_materialize_errors(fam3: Family, merged: Path, tmp_path: Path) -> None:
    with pytest.raises(UnknownTaskError, match="no task 'delta'; known tasks: alpha, beta, gamma"):
        materialize(merged, "delta", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        materialize(merged, "alpha", tmp_path / "taken")
    with pytest.raises(OutputError, match="is an input of materialize"):
        materialize(merged, "alpha", merged, overwrite=True)
    with pytest.raises(ModulatorError, match="has no modulators.safetensors"):
        task_state_dict(fam3.base, "alpha")
    with pytest.raises(ModulatorError, match="differs from the base this merge used"):
        task_state_dict(merged, "alpha", base=fam3.experts[0])
    other = make_family(tmp_path / "other", n_experts=1)
    other_out = tmp_path / "ties"
    merge(recipe_for(other, "ties"), other_out)
    with pytest.raises(ModulatorError, match="not the output of a task-specific merge"):
        materialize(other_out, "alpha", tmp_path / "y")
    assert leftovers(tmp_path, "x") == [] and leftovers(tmp_path, "y") == []


def test_corrupt_or_mismatched_modulators_are_named(fam3: Family, merged: Path,
                                                   tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    fam = copy_family(Family(merged.parent, merged, [], fam3.shape, fam3.dtype), broken)
    path = fam.base / "modulators.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    name = next(iter(json.loads(meta["tensors"])))
    short = dict(tensors)
    short[f"mask.1.{name}"] = tensors[f"mask.1.{name}"][:-1].clone()
    save_file(short, path, metadata=meta)
    with pytest.raises(ModulatorError, match=f"entry 'mask.1.{name}' is uint8 .* expected uint8"):
        task_state_dict(fam.base, "alpha")
    missing = {k: v for k, v in tensors.items() if k != "rescalers"}
    save_file(missing, path, metadata=meta)
    with pytest.raises(ModulatorError, match="entry 'rescalers' is missing"):
        task_state_dict(fam.base, "alpha")
    save_file(tensors, path, metadata={**meta, "format_version": "9"})
    with pytest.raises(ModulatorError, match="format version '9'"):
        task_state_dict(fam.base, "alpha")
    save_file(tensors, path, metadata=meta)
    unified = load_file(fam.base / "model.safetensors")
    unified[name] = unified[name].flatten()
    save_file(unified, fam.base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModulatorError, match=f"tensor '{name}' of the unified model has shape"):
        task_state_dict(fam.base, "alpha")


def test_cli_merge_then_materialize(fam3: Family, tmp_path: Path) -> None:
    runner = CliRunner()
    recipe = write_recipe(tmp_path / "recipe.yaml", emr_recipe(fam3))
    result = runner.invoke(app, ["merge", str(recipe), "--out", str(tmp_path / "o"),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "modulators:" in result.stdout and "full experts'" in result.stdout
    assert "mergewise materialize" in result.stdout
    result = runner.invoke(app, ["materialize", str(tmp_path / "o"), "--task", "beta",
                                 "--out", str(tmp_path / "beta")])
    assert result.exit_code == 0, result.output
    assert_same(load_dir(tmp_path / "beta"), formula(fam3.base, tmp_path / "o", "beta"))
    result = runner.invoke(app, ["materialize", str(tmp_path / "o"), "--task", "nope",
                                 "--out", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0
    assert "no task 'nope'; known tasks: alpha, beta, gamma" in result.stderr
    helped = runner.invoke(app, ["materialize", "--help"])
    assert "--task" in helped.stdout and "EMR" in helped.stdout
