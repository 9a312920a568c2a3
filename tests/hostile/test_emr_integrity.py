"""EMR integrity: ``materialize`` refuses, in one line, a base, unified model or modulators file
that is not what the merge used or wrote (permuted or nudged base rows, flipped mask bits, edited
rescalers, renamed tasks, garbled metadata, old files without digests), before anything is
written; a merge whose rescaler is out of bounds is refused too.

The digests are recomputed here from the documented scheme (``mergewise.modulators``), not with
the package's own helper, so a test that forges a consistent file checks the bound checks alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from ckpt_helpers import Family, edit_weights, leftovers, make_family, recipe_for, write_recipe
from cli_helpers import assert_one_line_error, run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergewise import ModulatorError, merge, merge_task_state_dicts, task_state_dict

TASKS = ["alpha", "beta", "gamma"]
Q = "model.layers.0.self_attn.q_proj.weight"  # (16, 16)
OPROJ = "model.layers.0.self_attn.o_proj.weight"  # (16, 16): same shape as Q
MODS = "modulators.safetensors"
Tensors = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def fam3(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return make_family(tmp_path_factory.mktemp("fam3"), n_experts=3, dtype=torch.float32)


def emr_recipe(fam: Family) -> dict[str, Any]:
    data = recipe_for(fam, "emr")
    for entry, task in zip(data["models"], TASKS, strict=False):
        entry["name"] = task
    return data


@pytest.fixture(scope="module")
def merged(fam3: Family, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("emr") / "out"
    merge(emr_recipe(fam3), out)
    return out


@pytest.fixture
def work(merged: Path, tmp_path: Path) -> Path:
    """A writable copy of the merge output."""
    return Path(shutil.copytree(merged, tmp_path / "merged"))


# --- the documented digest scheme, re-implemented ----------------------------------------------

def digest(label: str, t: torch.Tensor) -> bytes:
    t = t.contiguous()
    h = hashlib.sha256(f"{label}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


def labels(meta: dict[str, str]) -> list[str]:
    tasks, shapes = json.loads(meta["tasks"]), json.loads(meta["tensors"])
    out = ["header", "rescalers"]
    for name in shapes:
        out += [f"base:{name}", f"unified:{name}", *(f"mask.{t}.{name}" for t in range(len(tasks)))]
    return out


def read_mods(directory: Path) -> tuple[dict[str, str], Tensors]:
    with safe_open(str(directory / MODS), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def write_mods(directory: Path, meta: dict[str, str] | None, tensors: Tensors) -> None:
    save_file(tensors, str(directory / MODS), metadata=meta)


def redigest(meta: dict[str, str], tensors: Tensors, key: str) -> None:
    """Make entry ``key``'s digest row match its (edited) payload: a consistent forgery."""
    row = labels(meta).index(key)
    tensors["digests"][row] = torch.frombuffer(bytearray(digest(key, tensors[key])),
                                               dtype=torch.uint8)


def materialize_cli(merged: Path, tmp_path: Path, *extra: str | Path, task: str = "beta") -> Any:
    return run_cli("materialize", merged, "--task", task, "--out", tmp_path / "task", *extra)


def refused(result: Any, tmp_path: Path, *needles: str) -> str:
    line = assert_one_line_error(result, *needles)
    assert not (tmp_path / "task").exists() and leftovers(tmp_path, "task") == []
    return line


def test_the_untouched_output_materializes_and_digests_follow_the_scheme(
        fam3: Family, merged: Path, tmp_path: Path) -> None:
    meta, tensors = read_mods(merged)
    assert meta["format_version"] == "2" and meta["digest"] == "sha256"
    rows = tensors["digests"]
    assert rows.dtype == torch.uint8 and list(rows.shape) == [len(labels(meta)), 32]
    unified = load_file(merged / "model.safetensors")
    base = load_file(fam3.base / "model.safetensors")
    header = json.dumps({"tasks": TASKS, "tensors": [[n, s] for n, s in
                                                     json.loads(meta["tensors"]).items()]},
                        separators=(",", ":"))
    assert bytes(rows[0].tolist()) == hashlib.sha256(f"header|{header}".encode()).digest()
    for i, label in enumerate(labels(meta)[1:], 1):
        kind, _, name = label.partition(":")
        payload = (base[name] if kind == "base" else unified[name] if kind == "unified"
                   else tensors[label])
        assert bytes(rows[i].tolist()) == digest(label, payload), label
    result = materialize_cli(merged, tmp_path)
    assert result.exit_code == 0, result.output


# --- the base: permuted rows, one ulp, another dtype, swapped tensors ---------------------------

def _permute_rows(t: Tensors) -> None:
    t[Q] = t[Q].flip(0).contiguous()  # the same values: a float64 sum cannot tell


def _one_ulp(t: Tensors) -> None:
    t[Q] = t[Q].clone()
    t[Q][3, 5] = torch.nextafter(t[Q][3, 5], torch.tensor(math.inf))


def _bfloat16(t: Tensors) -> None:
    for n in t:
        t[n] = t[n].to(torch.bfloat16)


def _swap_same_shape(t: Tensors) -> None:
    t[Q], t[OPROJ] = t[OPROJ], t[Q]


@pytest.mark.parametrize("edit", [_permute_rows, _one_ulp, _bfloat16, _swap_same_shape],
                         ids=["permuted-rows", "one-ulp", "bfloat16", "swapped-tensors"])
def test_a_base_other_than_the_merges_is_refused(fam3: Family, merged: Path, tmp_path: Path,
                                                 edit: Callable[[Tensors], None]) -> None:
    base = Path(shutil.copytree(fam3.base, tmp_path / "base"))
    edit_weights(base, edit)
    result = materialize_cli(merged, tmp_path, "--base", base)
    line = refused(result, tmp_path, str(base), "differs from the base this merge used",
                   "--base")
    if edit is not _bfloat16:
        assert f"tensor '{Q}'" in line


def test_the_api_checks_the_base_too(fam3: Family, merged: Path, tmp_path: Path) -> None:
    base = Path(shutil.copytree(fam3.base, tmp_path / "base"))
    edit_weights(base, _permute_rows)
    with pytest.raises(ModulatorError, match=f"tensor '{Q}' differs from the base this merge"):
        task_state_dict(merged, "alpha", base=base)


# --- the unified model ----------------------------------------------------------------------

def test_an_edited_unified_model_is_refused(work: Path, tmp_path: Path) -> None:
    edit_weights(work, _one_ulp)
    refused(materialize_cli(work, tmp_path), tmp_path, f"tensor '{Q}' of the unified model",
            "is not the one this merge wrote")


def test_an_expert_in_place_of_the_unified_model_is_refused(fam3: Family, work: Path,
                                                           tmp_path: Path) -> None:
    shutil.copyfile(fam3.experts[0] / "model.safetensors", work / "model.safetensors")
    refused(materialize_cli(work, tmp_path), tmp_path, "of the unified model",
            "is not the one this merge wrote")


def test_in_memory_task_models_check_their_unified_tensors(fam3: Family) -> None:
    base = load_file(fam3.base / "model.safetensors")
    experts = {t: load_file(e / "model.safetensors") for t, e in zip(TASKS, fam3.experts,
                                                                     strict=True)}
    models = merge_task_state_dicts(base, experts)
    models["beta"]  # noqa: B018 - assembles and verifies
    models.unified[Q][0, 0] += 1.0
    with pytest.raises(ModulatorError, match=f"tensor '{Q}' of the unified model is not the one"):
        models["beta"]  # noqa: B018


# --- the modulators' payloads ------------------------------------------------------------------

@pytest.mark.parametrize("flip", [0xFF, 0x01], ids=["byte", "bit"])
def test_a_flipped_mask_is_refused(work: Path, tmp_path: Path, flip: int) -> None:
    meta, tensors = read_mods(work)
    key = f"mask.1.{Q}"
    tensors[key][0] ^= flip
    write_mods(work, meta, tensors)
    refused(materialize_cli(work, tmp_path), tmp_path, str(work / MODS), f"entry '{key}'",
            "does not match its sha256 digest", "re-run the merge")
    assert materialize_cli(work, tmp_path, task="alpha").exit_code == 0  # mask.0 is intact


def test_a_garbled_digest_row_is_refused(work: Path, tmp_path: Path) -> None:
    meta, tensors = read_mods(work)
    key = f"mask.1.{Q}"
    tensors["digests"][labels(meta).index(key)][7] ^= 0x10
    write_mods(work, meta, tensors)
    refused(materialize_cli(work, tmp_path), tmp_path, f"entry '{key}' does not match its sha256")


def test_an_edited_rescaler_is_refused_by_its_digest(work: Path, tmp_path: Path) -> None:
    meta, tensors = read_mods(work)
    tensors["rescalers"][1] = 1e30
    write_mods(work, meta, tensors)
    refused(materialize_cli(work, tmp_path), tmp_path, str(work / MODS),
            "entry 'rescalers' does not match its sha256 digest")


@pytest.mark.parametrize("value", [1e30, math.nextafter(1e4, math.inf), math.nan, math.inf,
                                   -1.0, 0.0])
def test_an_out_of_bounds_rescaler_is_refused_even_with_a_matching_digest(
        work: Path, tmp_path: Path, value: float) -> None:
    meta, tensors = read_mods(work)
    tensors["rescalers"][1] = value
    redigest(meta, tensors, "rescalers")
    write_mods(work, meta, tensors)
    refused(materialize_cli(work, tmp_path), tmp_path, str(work / MODS),
            "task 'beta' has rescaler", "outside (0, 10000]")


def test_the_rescaler_bound_itself_is_accepted(work: Path, tmp_path: Path) -> None:
    meta, tensors = read_mods(work)
    tensors["rescalers"][1] = 1e4
    redigest(meta, tensors, "rescalers")
    write_mods(work, meta, tensors)
    result = materialize_cli(work, tmp_path)
    assert result.exit_code == 0, result.output


def test_a_merge_with_an_out_of_bounds_rescaler_is_refused(tmp_path: Path) -> None:
    """Task b agrees with the elected sign in one entry only, where the unified vector is tiny:
    lambda_b ~ 1e7, a task model of noise."""
    n = 10
    base = {"w": torch.zeros(n)}
    a = torch.ones(n)
    a[0] = 1e-9
    b = torch.full((n,), -1e-3)
    b[0] = 1e-9
    with pytest.raises(ModulatorError, match=r"EMR merge: task 'b' has rescaler .*outside "
                                             r"\(0, 10000\]"):
        merge_task_state_dicts(base, {"a": {"w": a}, "b": {"w": b}})
    for name, tensors in (("base", base), ("a", {"w": a}), ("b", {"w": b})):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "emr", "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / t), "name": t} for t in "ab"]})
    result = run_cli("merge", recipe, "--out", tmp_path / "out", "--no-progress")
    assert_one_line_error(result, "task 'b' has rescaler", "outside (0, 10000]")
    assert not (tmp_path / "out").exists()


# --- the modulators' metadata and entries -------------------------------------------------------

Edit = Callable[[dict[str, str], Tensors], tuple[dict[str, str] | None, Tensors]]


def _meta(**changes: str | None) -> Edit:
    def edit(meta: dict[str, str], tensors: Tensors) -> tuple[dict[str, str], Tensors]:
        out = {**meta, **{k: v for k, v in changes.items() if v is not None}}
        for k in [k for k, v in changes.items() if v is None]:
            del out[k]
        return out, tensors
    return edit


def _old_format(meta: dict[str, str], tensors: Tensors) -> tuple[dict[str, str], Tensors]:
    """A file of format 1: base checksums, no digests."""
    old = {k: v for k, v in tensors.items() if k != "digests"}
    old["base_checksums"] = torch.zeros(len(json.loads(meta["tensors"])), 2, dtype=torch.float64)
    return {k: v for k, v in {**meta, "format_version": "1"}.items() if k != "digest"}, old


def _drop(key: str) -> Edit:
    return lambda meta, tensors: (meta, {k: v for k, v in tensors.items() if k != key})


def _replace(key: str, value: torch.Tensor) -> Edit:
    return lambda meta, tensors: (meta, {**tensors, key: value})


def _no_metadata(meta: dict[str, str], tensors: Tensors) -> tuple[None, Tensors]:
    return None, tensors


def _reordered_tasks(meta: dict[str, str], tensors: Tensors) -> tuple[dict[str, str], Tensors]:
    return {**meta, "tasks": json.dumps(["beta", "alpha", "gamma"])}, tensors


SHAPES = {"{not json": "metadata 'tensors' is missing or not JSON",
          json.dumps({Q: "ab"}): "metadata 'tasks' (distinct names) or 'tensors'",
          json.dumps({Q: [-1, 16]}): "metadata 'tasks' (distinct names) or 'tensors'",
          json.dumps({Q: [16.0, 16]}): "metadata 'tasks' (distinct names) or 'tensors'",
          json.dumps([Q]): "metadata 'tasks' (distinct names) or 'tensors'"}

CASES: dict[str, tuple[Edit, list[str]]] = {
    "old-format-1": (_old_format, ["written by an older mergewise (modulators format 1",
                                   "re-run the merge"]),
    "format-9": (_meta(format_version="9"), ["format version '9'"]),
    "no-metadata": (_no_metadata, ["not an EMR modulators file"]),
    "digest-md5": (_meta(digest="md5"), ["digest 'md5', expected 'sha256'"]),
    "no-digest-key": (_meta(digest=None), ["digest None, expected 'sha256'"]),
    "tasks-missing": (_meta(tasks=None), ["metadata 'tasks' is missing or not JSON"]),
    "tasks-garbled": (_meta(tasks='["alpha", "be'), ["metadata 'tasks' is missing or not JSON"]),
    "tasks-a-dict": (_meta(tasks='{"alpha": 1}'), ["metadata 'tasks' (distinct names)"]),
    "tasks-duplicated": (_meta(tasks=json.dumps(["beta", "beta", "gamma"])),
                         ["metadata 'tasks' (distinct names)"]),
    "tasks-reordered": (_reordered_tasks, ["do not match their digest (tasks renamed or "
                                           "reordered?)"]),
    **{f"tensors-{i}": (_meta(tensors=text), [needle]) for i, (text, needle)
       in enumerate(SHAPES.items())},
    "compute-int8": (_meta(compute_dtype="int8"), ["metadata 'compute_dtype' = 'int8'"]),
    "compute-garbled": (_meta(compute_dtype="float 32"), ["metadata 'compute_dtype'"]),
    "digests-missing": (_drop("digests"), ["entry 'digests' is missing"]),
    "digests-short": (_replace("digests", torch.zeros(3, 32, dtype=torch.uint8)),
                      ["entry 'digests' is uint8 [3, 32], expected uint8"]),
    "rescalers-float32": (_replace("rescalers", torch.ones(3)),
                          ["entry 'rescalers' is float32 [3], expected float64 [3]"]),
    "mask-float32": (_replace(f"mask.1.{Q}", torch.zeros(32)),
                     [f"entry 'mask.1.{Q}' is float32 [32], expected uint8 [32]"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_modulators_are_refused_in_one_line(work: Path, tmp_path: Path,
                                                      case: str) -> None:
    edit, needles = CASES[case]
    meta, tensors = edit(*read_mods(work))
    write_mods(work, meta, tensors)
    refused(materialize_cli(work, tmp_path), tmp_path, str(work / MODS), *needles)


@pytest.mark.parametrize("cut", [0, 5, 100, -40], ids=["empty", "5-bytes", "header", "data"])
def test_a_truncated_modulators_file_is_refused(work: Path, tmp_path: Path, cut: int) -> None:
    raw = (work / MODS).read_bytes()
    (work / MODS).write_bytes(raw[:cut] if cut >= 0 else raw[:cut])
    refused(materialize_cli(work, tmp_path), tmp_path, str(work / MODS))


def test_garbage_metadata_values_are_refused(work: Path, tmp_path: Path) -> None:
    """A header whose ``__metadata__`` holds a non-string (not writable with safetensors)."""
    raw = (work / MODS).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"]["tasks"] = ["alpha", "beta", "gamma"]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text)) if len(text) <= n else b""
    assert len(text) == n, "the edited header must keep its length"
    (work / MODS).write_bytes(raw[:8] + text + raw[8 + n:])
    refused(materialize_cli(work, tmp_path), tmp_path, "__metadata__ gives 'tasks' a JSON list")
