"""--out as a hostile or careless user gives it: an input, inside one, around one, the current
directory, a stranger's directory, a target someone else is writing or creating, a swap cut
short, leftovers of killed runs, a full disk. Nothing an input holds may change, and nothing
may be left behind."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
from ckpt_helpers import Family, copy_family, leftovers, load_dir, recipe_for, tree_hashes, write_recipe
from cli_helpers import assert_one_line_error, run_cli

from mergewise import target as target_mod
from mergewise.errors import OutputError
from mergewise.target import atomic_directory, target_lock
from mergewise.writer import StreamingSafetensorsFile


@pytest.fixture
def fam(family_f32: Family, tmp_path: Path) -> Family:
    """A writable family under tmp_path/work with its recipe at work/recipe.yaml."""
    fam = copy_family(family_f32, tmp_path / "work")
    write_recipe(fam.root / "recipe.yaml", recipe_for(fam, "ties", parameters={"density": 0.5}))
    return fam


def _merge(fam: Family, out: Path | str, *extra: str):
    return run_cli("merge", fam.root / "recipe.yaml", "--out", out, "--no-progress", *extra)


@pytest.mark.parametrize("where", ["base", "expert", "inside_base", "inside_expert", "root",
                                   "recipe_dir_parent"])
def test_out_that_is_or_holds_an_input_is_refused(fam: Family, where: str) -> None:
    out = {"base": fam.base, "expert": fam.experts[0], "inside_base": fam.base / "merged",
           "inside_expert": fam.experts[1] / "sub" / "merged", "root": fam.root,
           "recipe_dir_parent": fam.root.parent}[where]
    before = tree_hashes(fam.root)
    msg = assert_one_line_error(_merge(fam, out, "--overwrite"), str(out), "choose another --out")
    assert "input" in msg or "recipe" in msg or "current directory" in msg
    assert tree_hashes(fam.root) == before


def test_out_dot_in_the_recipes_directory_deletes_nothing(fam: Family,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(fam.root)
    before = tree_hashes(fam.root)
    assert_one_line_error(_merge(fam, ".", "--overwrite"), "current directory")
    assert_one_line_error(_merge(fam, "..", "--overwrite"), "current directory")
    assert tree_hashes(fam.root) == before


def test_out_through_a_symlink_to_the_base_is_refused(fam: Family, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(fam.base, target_is_directory=True)
    before = tree_hashes(fam.root)
    assert_one_line_error(_merge(fam, link / "merged", "--overwrite"), "lies inside")
    assert tree_hashes(fam.root) == before


def test_a_features_file_inside_out_is_protected(fam: Family, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    data = recipe_for(fam, "regmean")
    data["models"][0]["features"] = str(out / "stats.safetensors")
    data["models"][1]["features"] = str(tmp_path / "stats1.safetensors")
    recipe = write_recipe(tmp_path / "r.yaml", data)
    assert_one_line_error(run_cli("merge", recipe, "--out", out), "features file of model 0")


def test_overwrite_refuses_a_directory_that_is_no_model(fam: Family, tmp_path: Path) -> None:
    out = tmp_path / "documents"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert_one_line_error(_merge(fam, out, "--overwrite"), "holds no model files")
    assert (out / "thesis.tex").read_text() == "years of work"


def test_a_second_run_into_a_locked_target_fails_at_once(fam: Family, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    with target_lock(out):
        assert_one_line_error(_merge(fam, out), "another mergewise", f"pid {os.getpid()}")
    assert not out.exists()
    assert _merge(fam, out).exit_code == 0  # the lock is gone with its holder
    assert leftovers(tmp_path, "merged") == []


def test_something_created_at_out_meanwhile_is_never_touched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="appeared while merging"):
        with atomic_directory(out, overwrite=False) as tmp:
            (tmp / "model.safetensors").write_bytes(b"merged")
            out.mkdir()
            (out / "theirs.txt").write_text("not ours")
    assert (out / "theirs.txt").read_text() == "not ours"
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_overwrite_swaps_in_the_new_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           exchange: bool) -> None:
    if not exchange:
        monkeypatch.setattr(target_mod, "_renameat2", lambda *a: False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("old")
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "config.json").write_text("new")
    assert (out / "config.json").read_text() == "new"
    assert leftovers(tmp_path, "out") == []


def test_a_swap_cut_short_is_repaired_by_the_next_run(fam: Family, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "merged"
    assert _merge(fam, out).exit_code == 0
    good = load_dir(out)
    os.rename(out, target_mod.old_name(out, 999_999))  # killed between the two renames
    with caplog.at_level(logging.WARNING, logger="mergewise"):
        assert_one_line_error(_merge(fam, out), "already exists")  # put back, then refused
    assert "restored the previous output" in caplog.text
    assert load_dir(out).keys() == good.keys()
    assert leftovers(tmp_path, "merged") == []


def test_leftovers_of_killed_runs_are_removed_by_the_next_run(fam: Family, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture
                                                              ) -> None:
    out = tmp_path / "merged"
    stale = tmp_path / ".merged.mergewise-tmp-424242-abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1_000_000)
    with caplog.at_level(logging.WARNING, logger="mergewise"):
        assert _merge(fam, out).exit_code == 0
    assert "removed 1 temp directory of killed runs (1.0 MB)" in caplog.text
    assert leftovers(tmp_path, "merged") == []


def test_disk_full_is_one_line_and_leaves_nothing(fam: Family, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self, name, tensor):  # noqa: ANN001 - the writer's signature
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(StreamingSafetensorsFile, "write", full)
    out = tmp_path / "merged"
    assert_one_line_error(_merge(fam, out), str(out), "no space left", "nothing was written")
    assert not out.exists() and leftovers(tmp_path, "merged") == []


@pytest.mark.parametrize("size", ["1e400", "nan", "inf", "1e16", "0.5", "-3GB", "5 GB GB"])
def test_shard_size_nonsense_is_one_line(fam: Family, tmp_path: Path, size: str) -> None:
    assert_one_line_error(_merge(fam, tmp_path / "merged", "--shard-size", size), "shard size")
    assert not (tmp_path / "merged").exists()
