"""``mergewise merge --dry-run`` and ``mergewise methods`` plan without importing torch
(``lazytorch``, issue 13's start-up target): headers are planned from their safetensors dtype
codes, and torch loads only when something needs it after all, with the same result.

The command runs in a fresh interpreter (torch is already imported in this one), which reports
whether the real torch was loaded; its output must equal the in-process dry run's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ckpt_helpers import Family, recipe_for, write_recipe
from safetensors.torch import load_file

from mergewise.tensors import FLOAT_DTYPE_NAMES, SAFETENSORS_CODES, TensorInfo, code_of, itemsize

# Runs the CLI as the console script does, then prints whether the real torch is loaded.
_PROBE = """
import json, sys
from mergewise import lazytorch
from mergewise.entry import main
sys.argv = ["mergewise", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit as exc:
    code = exc.code or 0
else:
    code = 0
print("TORCH-LOADED" if lazytorch.loaded() else "TORCH-NOT-LOADED")
print("torch._C" in sys.modules)
sys.exit(code)
"""


def _cli(*args: str | Path) -> tuple[int, str, bool]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps([str(a) for a in args])],
                          capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    loaded_flag, c_ext = lines[-2], lines[-1]
    assert (loaded_flag == "TORCH-LOADED") == (c_ext == "True"), proc.stdout
    return proc.returncode, "\n".join(lines[:-2]) + proc.stderr, loaded_flag == "TORCH-LOADED"


def _plan_lines(recipe: dict, **kw) -> list[str]:
    from mergewise import merge

    return merge(recipe, dry_run=True, **kw).summary.lines()


@pytest.mark.parametrize("extra", [{}, {"dtype": "float64", "out_dtype": "bfloat16"},
                                   {"sparsify": {"method": "tadrop", "drop_rate": 0.8}}])
def test_a_dry_run_imports_no_torch_and_prints_the_same_plan(family_bf16: Family, tmp_path: Path,
                                                            extra: dict) -> None:
    params = {} if "sparsify" in extra else {"density": 0.3}  # the block replaces TIES's trim
    recipe = recipe_for(family_bf16, "ties", parameters=params, **extra)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    code, text, loaded = _cli("merge", path, "--dry-run")
    assert code == 0, text
    assert not loaded, text
    for line in _plan_lines(recipe):
        assert line in text, (line, text)


def test_a_dry_run_refuses_bad_input_the_same_way_without_torch(family_f32: Family,
                                                               tmp_path: Path) -> None:
    recipe = recipe_for(family_f32, "ties", parameters={"density": 1.5})
    code, text, loaded = _cli("merge", write_recipe(tmp_path / "r.yaml", recipe), "--dry-run")
    assert code == 1 and not loaded
    assert "density" in text and "out of range" in text and "Traceback" not in text
    code, text, loaded = _cli("merge", write_recipe(tmp_path / "d.yaml", recipe_for(family_f32)),
                              "--dry-run", "--device", "tpu")
    assert code == 1 and "--device 'tpu'" in text and "Traceback" not in text


def test_a_dry_run_that_needs_torch_loads_it_and_still_plans(family_f32: Family,
                                                             tmp_path: Path) -> None:
    """A pickled checkpoint's header is torch.load (weights_only): the stand-in loads torch."""
    expert = tmp_path / "expert_bin"
    expert.mkdir()
    for f in family_f32.experts[0].iterdir():
        if f.suffix != ".safetensors":
            (expert / f.name).write_bytes(f.read_bytes())
    state = load_file(family_f32.experts[0] / "model.safetensors")
    torch.save(state, expert / "pytorch_model.bin")
    recipe = {"merge_method": "task_arithmetic", "base_model": str(family_f32.base),
              "models": [{"model": str(expert)}, {"model": str(family_f32.experts[1])}]}
    code, text, loaded = _cli("merge", write_recipe(tmp_path / "r.yaml", recipe), "--dry-run")
    assert code == 0, text
    assert loaded
    for line in _plan_lines(recipe):
        assert line in text


def test_methods_lists_without_torch() -> None:
    code, text, loaded = _cli("methods")
    assert code == 0 and not loaded
    assert "ties" in text and "tadrop" in text


def test_a_real_merge_is_unchanged_by_the_code_based_plan(family_bf16: Family,
                                                         tmp_path: Path) -> None:
    code, text, loaded = _cli("merge", write_recipe(tmp_path / "r.yaml", recipe_for(
        family_bf16, "ties", parameters={"density": 0.3}, out_dtype="float16")),
        "--out", tmp_path / "out", "--no-progress")
    assert code == 0 and loaded, text
    assert {t.dtype for t in load_file(tmp_path / "out" / "model.safetensors").values()} == {
        torch.float16}


def test_the_stand_in_is_torch_once_used() -> None:
    script = """
import sys
from mergewise import lazytorch
assert lazytorch.defer() and lazytorch.defer()
import torch
assert not lazytorch.loaded()
from mergewise.tensors import TensorInfo
assert TensorInfo("w", (2, 3), "BF16").nbytes == 12 and not lazytorch.loaded()
x = torch.zeros(3)
assert lazytorch.loaded() and isinstance(x, torch.Tensor)
from torch import nn
import torch as again
assert again is sys.modules["torch"] and again.nn is nn and torch.nn is nn
assert TensorInfo("w", (2,), "BF16").dtype is torch.bfloat16
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert proc.stdout.strip() == "ok", proc.stderr


def test_tensor_info_keeps_the_safetensors_code() -> None:
    a, b = TensorInfo("w", (2, 3), torch.bfloat16), TensorInfo("w", (2, 3), "BF16")
    assert a == b and a.code == "BF16" and a.dtype is torch.bfloat16
    assert (a.nbytes, a.itemsize, a.is_float) == (12, 2, True)
    assert TensorInfo("w", (4,), "bfloat16").code == "BF16"  # a dtype name is its code
    ints = TensorInfo("p", (5,), torch.int64)
    assert (ints.code, ints.is_float, ints.nbytes) == ("I64", False, 40)
    for code in SAFETENSORS_CODES:  # every code: torch's own itemsize and float-ness
        info = TensorInfo("t", (3,), code)
        assert info.itemsize == info.dtype.itemsize and itemsize(info.dtype) == info.itemsize
        assert info.is_float == info.dtype.is_floating_point and code_of(info.dtype) == code
    odd = TensorInfo("c", (2,), torch.complex64)  # outside the table: kept by torch's name
    assert (odd.code, odd.dtype, odd.nbytes, odd.is_float) == ("complex64", torch.complex64, 16,
                                                              False)
    assert set(FLOAT_DTYPE_NAMES) == {"float32", "float64", "bfloat16", "float16"}


def test_the_writer_refuses_a_dtype_safetensors_cannot_store(tmp_path: Path) -> None:
    from mergewise.writer import StreamingSafetensorsFile

    with pytest.raises(ValueError, match="'c' has dtype complex64, which safetensors cannot"):
        StreamingSafetensorsFile(tmp_path / "x.safetensors",
                                 [TensorInfo("c", (2,), torch.complex64)], {})


def test_the_features_package_exports_every_name_from_its_module() -> None:
    import importlib

    import mergewise.features as features

    assert sorted(features.__all__) == sorted(features._HOMES)
    for name, home in features._HOMES.items():
        assert getattr(features, name) is getattr(
            importlib.import_module(f"mergewise.features.{home}"), name)
    with pytest.raises(AttributeError):
        features.no_such_name  # noqa: B018
