"""Writer: shard planning and naming, index contents, streamed files valid for the safetensors
library, sizes, and the atomic output directory (never half-written, never overwritten by
accident, ordinary permissions)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from ckpt_helpers import Family, copy_family, edit_weights, leftovers, recipe_for
from safetensors import safe_open
from safetensors.torch import load_file

import mergewise
import mergewise.inputs
from mergewise import NonFiniteError, OutputError
from mergewise.target import atomic_directory, check_output_target
from mergewise.tensors import TensorInfo
from mergewise.writer import ShardedWriter, parse_size, plan_shards, shard_names


def t(name: str, n: int, dtype: torch.dtype = torch.float32) -> TensorInfo:
    return TensorInfo(name, (n,), dtype)


def names(shards: list[list[TensorInfo]]) -> list[list[str]]:
    return [[x.name for x in s] for s in shards]


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


# --- planning and naming ------------------------------------------------------------------------

def test_plan_shards_greedy_in_order() -> None:
    # 40 + 40 + 20 bytes fill a 100-byte shard exactly; d (4 B) starts a new one, e (120 B) is
    # larger than a shard and goes alone, f (8 B) cannot join it
    tensors = [t("a", 10), t("b", 10), t("c", 5), t("d", 1), t("e", 30), t("f", 2)]
    assert names(plan_shards(tensors, 100)) == [["a", "b", "c"], ["d"], ["e"], ["f"]]
    assert names(plan_shards(tensors, 128)) == [["a", "b", "c", "d"], ["e", "f"]]
    assert names(plan_shards(tensors, 1000)) == [["a", "b", "c", "d", "e", "f"]]


def test_plan_shards_oversized_tensor_gets_own_shard() -> None:
    tensors = [t("small", 2), t("huge", 100), t("tail", 2)]
    assert names(plan_shards(tensors, 16)) == [["small"], ["huge"], ["tail"]]
    # first tensor larger than the shard size: never an empty shard in front of it
    assert names(plan_shards([t("huge", 100), t("x", 1)], 16)) == [["huge"], ["x"]]


def test_plan_shards_counts_dtype_bytes() -> None:
    tensors = [t("a", 5, torch.bfloat16), t("b", 5, torch.bfloat16), t("c", 5, torch.float32)]
    assert [x.nbytes for x in tensors] == [10, 10, 20]
    assert names(plan_shards(tensors, 20)) == [["a", "b"], ["c"]]
    assert names(plan_shards(tensors, 19)) == [["a"], ["b"], ["c"]]


def test_plan_shards_preserves_every_tensor_once() -> None:
    tensors = [t(f"w{i}", (i * 7) % 13 + 1) for i in range(40)]
    for size in (4, 30, 64, 100, 10_000):
        shards = plan_shards(tensors, size)
        assert [x for s in shards for x in s] == tensors
        assert all(s for s in shards)
        for s in shards:
            assert len(s) == 1 or sum(x.nbytes for x in s) <= size


def test_shard_names() -> None:
    assert shard_names(1) == ["model.safetensors"]
    assert shard_names(3) == ["model-00001-of-00003.safetensors",
                              "model-00002-of-00003.safetensors",
                              "model-00003-of-00003.safetensors"]
    assert shard_names(12)[10] == "model-00011-of-00012.safetensors"


# --- sizes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("5GB", 5_000_000_000), ("500MB", 500_000_000), ("20KB", 20_000), ("2GiB", 2 * 2**30),
    ("512MiB", 512 * 2**20), ("1KiB", 1024), ("1.5GB", 1_500_000_000), (" 10 kb ", 10_000),
    ("123", 123), ("123B", 123), ("1e3", 1000), ("1TB", 10**12), (4096, 4096), (2.5e3, 2500),
])
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["abc", "5XB", "", "GB", "-1", "0", "0GB", "1,5GB", -5, 0])
def test_parse_size_rejects(text: str | int) -> None:
    with pytest.raises(OutputError) as exc:
        parse_size(text)
    msg = one_line(exc)
    assert "shard size" in msg and repr(text).strip("'") in msg


# --- streamed files -----------------------------------------------------------------------------

def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "embed.weight": torch.randn(10, 8, generator=g).to(torch.bfloat16),
        "layer.0.weight": torch.randn(8, 8, generator=g),
        "layer.0.bias": torch.randn(8, generator=g).to(torch.float16),
        "position_ids": torch.arange(12),
        "mask": torch.rand(3, 3, generator=g) > 0.5,
        "scalar": torch.tensor(1.25, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "head.weight": torch.randn(10, 8, generator=g),
    }


def write_all(directory: Path, tensors: dict[str, torch.Tensor], shard_size: int,
              metadata: dict[str, str] | None = None) -> ShardedWriter:
    plan = [TensorInfo(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = ShardedWriter(directory, plan, shard_size, metadata)
    for k, v in tensors.items():
        writer.write(k, v)
    return writer


@pytest.mark.parametrize("shard_size", [10**9, 300, 1])
def test_streamed_shards_round_trip_through_safetensors(tmp_path: Path, shard_size: int) -> None:
    tensors = sample_tensors()
    writer = write_all(tmp_path, tensors, shard_size, {"mergewise_version": "9.9"})
    files = writer.finalize()
    expected_count = len(plan_shards([TensorInfo(k, tuple(v.shape), v.dtype)
                                      for k, v in tensors.items()], shard_size))
    assert files == shard_names(expected_count)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == sorted(files)
    seen = {}
    for f in files:
        # via safe_open (memory-mapped, header parsed by the library)...
        with safe_open(tmp_path / f, framework="pt") as fh:
            assert fh.metadata() == {"format": "pt", "mergewise_version": "9.9"}
            for k in fh.keys():  # noqa: SIM118 - safe_open is not a Mapping
                seen[k] = fh.get_tensor(k)
        # ...and via load_file
        for k, v in load_file(tmp_path / f).items():
            assert torch.equal(v, seen[k])
    assert sorted(seen) == sorted(tensors)
    for k, v in tensors.items():
        assert seen[k].dtype == v.dtype and seen[k].shape == v.shape
        assert torch.equal(seen[k], v)
    index_path = tmp_path / "model.safetensors.index.json"
    if expected_count == 1:
        assert not index_path.exists()
        return
    index = json.loads(index_path.read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.dtype.itemsize
                                                  for v in tensors.values())
    assert index["metadata"]["mergewise_version"] == "9.9"
    assert set(index["weight_map"]) == set(tensors)
    for k, f in index["weight_map"].items():
        with safe_open(tmp_path / f, framework="pt") as fh:
            assert k in fh.keys()  # noqa: SIM118


def test_shard_header_is_8_byte_aligned(tmp_path: Path) -> None:
    write_all(tmp_path, sample_tensors(), 10**9).finalize()
    raw = (tmp_path / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert header_len % 8 == 0


def test_writer_refuses_out_of_order_or_wrong_tensor(tmp_path: Path) -> None:
    plan = [TensorInfo("a", (2,), torch.float32), TensorInfo("b", (2,), torch.float32)]
    writer = ShardedWriter(tmp_path, plan, 10**9)
    with pytest.raises(RuntimeError):
        writer.write("b", torch.zeros(2))
    writer = ShardedWriter(tmp_path, plan, 10**9)
    with pytest.raises(RuntimeError):
        writer.write("a", torch.zeros(3))
    writer = ShardedWriter(tmp_path, plan, 10**9)
    with pytest.raises(RuntimeError):
        writer.write("a", torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("written", [0, 1, 3])
def test_finalize_refuses_incomplete_output(tmp_path: Path, written: int) -> None:
    plan = [TensorInfo(n, (4,), torch.float32) for n in "abcd"]
    writer = ShardedWriter(tmp_path, plan, 16)  # one tensor per shard
    for n in "abcd"[:written]:
        writer.write(n, torch.zeros(4))
    with pytest.raises(RuntimeError):
        writer.finalize()


# --- atomic output --------------------------------------------------------------------------------

def test_atomic_directory_success_and_permissions(tmp_path: Path) -> None:
    target = tmp_path / "out"
    old = os.umask(0o022)
    try:
        with atomic_directory(target, overwrite=False) as tmp:
            assert tmp.parent == tmp_path and tmp != target
            assert not target.exists()
            (tmp / "file.txt").write_text("x")
    finally:
        os.umask(old)
    assert (target / "file.txt").read_text() == "x"
    assert target.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_atomic_directory_failure_leaves_nothing(tmp_path: Path, error: type) -> None:
    target = tmp_path / "out"
    with pytest.raises(error):
        with atomic_directory(target, overwrite=False) as tmp:
            (tmp / "half.safetensors").write_bytes(b"x" * 100)
            raise error()
    assert not target.exists()
    assert leftovers(tmp_path, "out") == []
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_failure_keeps_existing_output(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True):
            raise RuntimeError("boom")
    assert (target / "config.json").read_text() == "old"
    assert leftovers(tmp_path, "out") == []


def test_atomic_directory_creates_missing_parents(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out"
    with atomic_directory(target, overwrite=False) as tmp:
        (tmp / "x").write_text("1")
    assert (target / "x").read_text() == "1"


def test_output_under_a_regular_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("I am a file")
    for target in (blocker / "out", blocker / "deeper" / "out"):
        with pytest.raises(OutputError) as exc:
            check_output_target(target, overwrite=False)
        msg = one_line(exc)
        assert str(target) in msg and str(blocker) in msg and "not a directory" in msg
        with pytest.raises(OutputError):
            with atomic_directory(target, overwrite=True):
                pass  # pragma: no cover
    assert blocker.read_text() == "I am a file"


def test_output_that_is_a_file_even_with_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_text("precious")
    with pytest.raises(OutputError) as exc:
        check_output_target(target, overwrite=True)
    assert str(target) in one_line(exc)
    assert target.read_text() == "precious"


# --- atomicity through a real merge -------------------------------------------------------------

def test_nan_in_last_tensor_leaves_no_output(family_f32: Family, tmp_path: Path) -> None:
    fam = copy_family(family_f32, tmp_path / "fam")
    last = fam.shape.tensors()[-1][0]  # lm_head.weight: every other tensor is merged first

    def poison(sd: dict[str, torch.Tensor]) -> None:
        sd[last][3, 5] = float("nan")

    edit_weights(fam.experts[1], poison)
    out = tmp_path / "merged"
    with pytest.raises(NonFiniteError) as exc:
        mergewise.merge(recipe_for(fam, "ties"), out, shard_size=2_000)  # many shards
    msg = one_line(exc)
    assert str(fam.experts[1]) in msg and f"'{last}'" in msg
    assert not out.exists()
    assert leftovers(tmp_path, "merged") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fam"]


def test_existing_output_is_refused_and_untouched(family_f32: Family, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "mine.txt").write_text("do not touch")
    with pytest.raises(OutputError) as exc:
        mergewise.merge(recipe_for(family_f32, "ties"), out)
    msg = one_line(exc)
    assert str(out) in msg and "--overwrite" in msg
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert (out / "mine.txt").read_text() == "do not touch"
    assert leftovers(tmp_path, "merged") == []


def test_overwrite_replaces_existing_output(family_f32: Family, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "mine.txt").write_text("old")
    (out / "model-00001-of-00009.safetensors").write_text("stale shard")
    mergewise.merge(recipe_for(family_f32, "ties"), out, overwrite=True)
    assert not (out / "mine.txt").exists()
    assert not (out / "model-00001-of-00009.safetensors").exists()
    assert (out / "model.safetensors").is_file()
    assert leftovers(tmp_path, "merged") == []


def test_merge_output_under_a_file_reads_nothing(family_f32: Family, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")

    def no_reading(*a: object, **k: object) -> None:  # pragma: no cover - must not be reached
        raise AssertionError("opened a checkpoint before checking the output path")

    monkeypatch.setattr(mergewise.inputs, "open_checkpoint", no_reading)
    with pytest.raises(OutputError) as exc:
        mergewise.merge(recipe_for(family_f32, "ties"), blocker / "merged")
    assert str(blocker) in one_line(exc)


def test_merged_output_permissions_are_ordinary(family_f32: Family, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    old = os.umask(0o022)
    try:
        mergewise.merge(recipe_for(family_f32, "ties"), out)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f
