"""Hostile ``--device`` values: only ``cpu``, ``cuda`` and ``cuda:N`` of a GPU torch sees; anything
else is one line saying what torch sees, checked once (``readers.compute_device``) before any
tensor is read, by merge (also --dry-run), inspect and materialize."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ckpt_helpers import Family, recipe_for, write_recipe
from cli_helpers import assert_one_line_error, run_cli

from mergewise import MergewiseError
from mergewise.readers import compute_device

CUDA = torch.cuda.device_count() if torch.cuda.is_available() else 0
BAD = ["foo", "meta", "mps", "CPU", "cuda:", "cuda:-1", "cuda:0:1", " cpu", "cpu:0", "cuda:1x",
       "x" * 10_000, ""]


@pytest.mark.parametrize("device", BAD, ids=lambda d: repr(d[:12]))
def test_unknown_device_is_refused(device: str) -> None:
    with pytest.raises(MergewiseError) as exc:
        compute_device(device)
    msg = str(exc.value)
    assert "\n" not in msg and len(msg) < 200, msg
    assert "give cpu, cuda or cuda:N" in msg and "torch sees" in msg


def test_cuda_index_past_the_devices() -> None:
    with pytest.raises(MergewiseError) as exc:
        compute_device(f"cuda:{CUDA + 98}")
    assert str(exc.value).startswith(f"--device 'cuda:{CUDA + 98}': torch sees ")


@pytest.mark.skipif(CUDA > 0, reason="a CUDA device is present")
def test_cuda_without_cuda() -> None:
    with pytest.raises(MergewiseError) as exc:
        compute_device("cuda")
    assert str(exc.value) == "--device 'cuda': torch sees no CUDA device; use --device cpu"


def test_cpu_is_fine() -> None:
    assert compute_device("cpu") == torch.device("cpu")
    assert compute_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("device", ["foo", "meta", "cuda:99"] + ([] if CUDA else ["cuda"]))
def test_merge_refuses_device_before_reading(family_f32: Family, tmp_path: Path, device: str) -> None:
    path = write_recipe(tmp_path / "r.yaml", recipe_for(family_f32, "ties"))
    for extra in (["--dry-run"], ["--out", str(tmp_path / "out")]):
        result = run_cli("merge", path, "--device", device, *extra)
        assert_one_line_error(result, f"--device {device!r}: ", "torch sees")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", ["foo", "meta", "cuda:99"])
def test_inspect_refuses_device(family_f32: Family, tmp_path: Path, device: str) -> None:
    result = run_cli("inspect", family_f32.experts[0], "--base", family_f32.base, "--out",
                     tmp_path / "plots", "--device", device)
    assert_one_line_error(result, f"--device {device!r}: ")
    assert not (tmp_path / "plots").exists()


@pytest.mark.parametrize("device", ["foo", "meta", "cuda:99"])
def test_materialize_refuses_device_first(tmp_path: Path, device: str) -> None:
    """The device is checked before the merge directory is even opened."""
    result = run_cli("materialize", tmp_path / "no-such-merge", "--task", "a", "--out",
                     tmp_path / "task", "--device", device)
    assert_one_line_error(result, f"--device {device!r}: ")
    assert not (tmp_path / "task").exists()
