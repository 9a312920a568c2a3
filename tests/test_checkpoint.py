"""Checkpoint reading: every supported layout, bit-for-bit against the safetensors library, and
every kind of bad input refused with a one-line CheckpointError naming the file."""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from ckpt_helpers import TINY, Family
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mergewise import CheckpointError
from mergewise.checkpoint import open_checkpoint
from mergewise.tensors import SAFETENSORS_CODES, torch_dtype

TINY_NAMES = [n for n, _ in TINY.tensors()]


def as_bytes(t: torch.Tensor) -> bytes:
    """Raw bytes of a tensor of any dtype (bool and float8 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert as_bytes(a) == as_bytes(b)


def raw_safetensors(header: dict, data: bytes = b"", header_len: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    assert "\x1b" not in msg, msg  # no terminal escape codes leak into messages
    return msg


def sample_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"layer.weight": torch.randn(3, 4, generator=g),
            "layer.bias": torch.randn(3, generator=g),
            "position_ids": torch.arange(5)}


# --- supported layouts ------------------------------------------------------------------------

@pytest.mark.parametrize("fam_name", ["family_f32", "family_bf16"])
def test_hf_dir_single_file_matches_safetensors_library(fam_name: str,
                                                        request: pytest.FixtureRequest) -> None:
    fam: Family = request.getfixturevalue(fam_name)
    reference = load_file(fam.base / "model.safetensors")
    with open_checkpoint(fam.base) as ckpt:
        assert sorted(ckpt.names()) == sorted(TINY_NAMES)
        assert ckpt.directory == fam.base
        assert ckpt.label == str(fam.base)
        assert ckpt.config["architectures"] == ["LlamaForCausalLM"]
        for name, shape in TINY.tensors():
            info = ckpt.info(name)
            assert info.shape == shape
            assert info.dtype == fam.dtype
            assert info.nbytes == reference[name].numel() * fam.dtype.itemsize
            t = ckpt.read(name)
            assert_bit_equal(t, reference[name])
            assert torch.equal(t, reference[name])


def test_sharded_dir_reads_same_tensors_as_unsharded(family_sharded_f32: Family,
                                                     family_f32: Family) -> None:
    base = family_sharded_f32.base
    shards = sorted(base.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    assert not (base / "model.safetensors").exists()
    index = json.loads((base / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(TINY_NAMES)
    by_library: dict[str, torch.Tensor] = {}
    for s in shards:
        by_library.update(load_file(s))
    unsharded = load_file(family_f32.base / "model.safetensors")
    for path in (base, base / "model.safetensors.index.json"):
        with open_checkpoint(path) as ckpt:
            assert sorted(ckpt.names()) == sorted(TINY_NAMES)
            assert ckpt.directory == base
            for name in TINY_NAMES:
                t = ckpt.read(name)
                assert_bit_equal(t, by_library[name])
                assert_bit_equal(t, unsharded[name])  # same seed, same weights


def test_single_safetensors_file(family_bf16: Family) -> None:
    path = family_bf16.experts[0] / "model.safetensors"
    reference = load_file(path)
    with open_checkpoint(path) as ckpt:
        assert ckpt.directory is None
        assert ckpt.config is None
        assert sorted(ckpt.names()) == sorted(reference)
        for name, t in reference.items():
            assert_bit_equal(ckpt.read(name), t)


def test_reads_are_fresh_and_repeatable(family_f32: Family) -> None:
    name = "model.layers.0.mlp.up_proj.weight"
    with open_checkpoint(family_f32.base) as ckpt:
        first = ckpt.read(name)
        expected = first.clone()
        first.add_(1.0)  # a caller scribbling on a read must not change what the next read sees
        assert torch.equal(ckpt.read(name), expected)
        ckpt.close()
        ckpt.close()  # closing twice is fine
        assert torch.equal(ckpt.read(name), expected)  # and it reopens on demand


@pytest.mark.parametrize("filename", ["pytorch_model.bin", "model.pt", "model.pth"])
def test_torch_state_dict_in_dir(tmp_path: Path, filename: str) -> None:
    sd = sample_state_dict()
    (tmp_path / "ckpt").mkdir()
    torch.save(sd, tmp_path / "ckpt" / filename)
    (tmp_path / "ckpt" / "config.json").write_text('{"architectures": ["Toy"]}')
    with open_checkpoint(tmp_path / "ckpt") as ckpt:
        assert sorted(ckpt.names()) == sorted(sd)
        assert ckpt.config == {"architectures": ["Toy"]}
        for k, v in sd.items():
            assert_bit_equal(ckpt.read(k), v)
            assert ckpt.info(k).shape == tuple(v.shape)


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "module", None])
@pytest.mark.parametrize("suffix", [".pt", ".bin", ".ckpt"])
def test_torch_file_with_and_without_wrapper(tmp_path: Path, wrapper: str | None,
                                             suffix: str) -> None:
    sd = sample_state_dict()
    obj = sd if wrapper is None else {wrapper: sd, "epoch": 3, "optimizer_name": "adamw"}
    path = tmp_path / f"weights{suffix}"
    torch.save(obj, path)
    with open_checkpoint(path) as ckpt:
        assert ckpt.directory is None
        assert sorted(ckpt.names()) == sorted(sd)
        for k, v in sd.items():
            assert_bit_equal(ckpt.read(k), v)


def test_torch_legacy_serialization(tmp_path: Path) -> None:
    sd = sample_state_dict()
    path = tmp_path / "old.bin"
    torch.save(sd, path, _use_new_zipfile_serialization=False)  # cannot be memory-mapped
    with open_checkpoint(path) as ckpt:
        for k, v in sd.items():
            assert_bit_equal(ckpt.read(k), v)


def test_sharded_torch_bin_with_index(tmp_path: Path) -> None:
    sd = sample_state_dict()
    d = tmp_path / "ckpt"
    d.mkdir()
    torch.save({"layer.weight": sd["layer.weight"]}, d / "pytorch_model-00001-of-00002.bin")
    torch.save({"layer.bias": sd["layer.bias"], "position_ids": sd["position_ids"]},
               d / "pytorch_model-00002-of-00002.bin")
    weight_map = {"layer.weight": "pytorch_model-00001-of-00002.bin",
                  "layer.bias": "pytorch_model-00002-of-00002.bin",
                  "position_ids": "pytorch_model-00002-of-00002.bin"}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with open_checkpoint(d) as ckpt:
        assert sorted(ckpt.names()) == sorted(sd)
        for k, v in sd.items():
            assert_bit_equal(ckpt.read(k), v)


def test_every_dtype_and_edge_shape_matches_library(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    tensors: dict[str, torch.Tensor] = {}
    for code, dtype in ((c, torch_dtype(c)) for c in SAFETENSORS_CODES):
        if dtype == torch.bool:
            t = torch.rand(3, 5, generator=g) > 0.5
        elif dtype.is_floating_point:
            t = (torch.randn(3, 5, generator=g) * 4).to(dtype)
        else:
            info = torch.iinfo(dtype)
            t = torch.randint(info.min, info.max, (3, 5), generator=g, dtype=torch.int64).to(dtype)
        tensors[f"t_{code}"] = t
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 7)
    tensors["vector"] = torch.arange(11, dtype=torch.float64)
    path = tmp_path / "all.safetensors"
    save_file(tensors, path, metadata={"note": "x"})
    reference = load_file(path)
    with open_checkpoint(path) as ckpt:
        assert sorted(ckpt.names()) == sorted(tensors)
        for name, t in reference.items():
            assert_bit_equal(ckpt.read(name), t)
            assert_bit_equal(ckpt.read(name), tensors[name])


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int8,
           torch.uint8, torch.bool]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(st.tuples(st.sampled_from(_DTYPES),
                                st.lists(st.integers(0, 5), min_size=0, max_size=3)),
                      min_size=1, max_size=6),
       seed=st.integers(0, 2**16))
def test_reader_agrees_with_library_on_random_files(specs: list, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, (dtype, shape) in enumerate(specs):
        raw = torch.randint(0, 256, (int(torch.tensor(shape).prod()) * dtype.itemsize,),
                            generator=g, dtype=torch.uint8) if shape else \
            torch.randint(0, 256, (dtype.itemsize,), generator=g, dtype=torch.uint8)
        t = raw.view(dtype).reshape(shape)
        if dtype == torch.bool:
            t = raw.reshape(shape) > 127
        tensors[f"tensor.{i}"] = t
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.safetensors"
        save_file(tensors, path)
        reference = load_file(path)
        with open_checkpoint(path) as ckpt:
            assert sorted(ckpt.names()) == sorted(reference)
            for name, t in reference.items():
                assert_bit_equal(ckpt.read(name), t)


# --- unsafe pickles -----------------------------------------------------------------------------

class WritesMarker:
    """Unpickling this would run ``exec`` and create a marker file: the classic malicious pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # noqa: D105
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


class CustomConfig:
    def __init__(self) -> None:
        self.hidden = 16


def test_pickle_that_runs_code_is_refused_and_nothing_executes(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.ones(2), "payload": WritesMarker(marker)}, path)
    # the payload is live: loading without weights_only would run it
    live = tmp_path / "live"
    torch.save({"payload": WritesMarker(live)}, tmp_path / "live.bin")
    torch.load(tmp_path / "live.bin", weights_only=False)
    assert live.exists()

    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(path)
    msg = one_line(exc)
    assert str(path) in msg
    assert "weights_only" in msg and "code" in msg
    assert "exec" in msg  # names what it refused
    assert not marker.exists()


@pytest.mark.parametrize("payload", [CustomConfig(), argparse.Namespace(lr=0.1), print],
                         ids=["custom-class-instance", "namespace", "function"])
def test_pickle_with_custom_objects_is_refused(tmp_path: Path, payload: object) -> None:
    d = tmp_path / "ckpt"
    d.mkdir()
    torch.save({"state_dict": {"w": torch.ones(2)}, "config": payload}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(d)
    msg = one_line(exc)
    assert str(d / "pytorch_model.bin") in msg
    assert "weights_only" in msg and "code" in msg


def test_plain_python_values_next_to_tensors_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2), "step": 3, "names": ["a", "b"], "lr": 1e-4}, path)
    with open_checkpoint(path) as ckpt:
        assert ckpt.names() == ["w"]


@pytest.mark.parametrize("content, expect", [
    (torch.ones(3), "not a state dict"),
    ({"step": 3, "name": "x"}, "no tensors"),
])
def test_torch_file_without_a_state_dict(tmp_path: Path, content: object, expect: str) -> None:
    path = tmp_path / "x.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(path)
    msg = one_line(exc)
    assert str(path) in msg and expect in msg


@pytest.mark.parametrize("content", [b"\x80\x02garbage" * 20, b"", b"PK\x03\x04 not a zip"],
                         ids=["garbage", "empty", "fake-zip"])
def test_corrupt_torch_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(path)
    msg = one_line(exc)
    assert str(path) in msg
    assert "needs code" not in msg  # corruption is not reported as an unsafe pickle


def test_truncated_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(sample_state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(path)
    msg = one_line(exc)
    assert str(path) in msg and "not a readable PyTorch checkpoint" in msg


# --- corrupt safetensors ------------------------------------------------------------------------

def test_truncated_safetensors_data(single_ckpt: Path) -> None:
    path = single_ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])  # the last tensor loses its tail
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(single_ckpt)
    msg = one_line(exc)
    assert str(path) in msg and "truncated" in msg
    # names the tensor that does not fit: the one stored last in the file
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_len])
    header.pop("__metadata__", None)
    last = max(header, key=lambda n: header[n]["data_offsets"][1])
    assert f"'{last}'" in msg


@pytest.mark.parametrize("keep", [0, 5, 8, 50])
def test_truncated_inside_header(single_ckpt: Path, keep: int) -> None:
    path = single_ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(path)
    msg = one_line(exc)
    assert str(path) in msg
    assert "truncated" in msg or "corrupt" in msg


def test_garbage_header_bytes(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    garbage = bytes(range(256)) * 2
    path.write_bytes(struct.pack("<Q", 100) + garbage)
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(path)
    msg = one_line(exc)
    assert str(path) in msg and "corrupt safetensors header" in msg


def test_random_bytes_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes([0xFF, 0x13, 0x77, 0x01] * 64))  # huge header length
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(path)
    msg = one_line(exc)
    assert str(path) in msg and "corrupt" in msg


@pytest.mark.parametrize("header", [[1, 2], "x", 3], ids=["list", "string", "number"])
def test_header_not_an_object(tmp_path: Path, header: object) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(raw_safetensors(header))  # type: ignore[arg-type]
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(path)
    assert str(path) in one_line(exc)


def test_header_pointing_beyond_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    path.write_bytes(raw_safetensors(header, b"\0" * 12))  # b needs bytes 8..24, only 12 exist
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(path)
    msg = one_line(exc)
    assert str(path) in msg and "'b'" in msg and "truncated" in msg


@pytest.mark.parametrize("entry, expect", [
    ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "needs 12"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "corrupt"),
    ({"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}, "Q4"),
    ({"dtype": "F32", "shape": [2]}, "malformed"),
    ({"dtype": "F32", "shape": "x", "data_offsets": [0, 8]}, "malformed"),
    ("not-a-dict", "malformed"),
])
def test_bad_header_entries(tmp_path: Path, entry: object, expect: str) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(raw_safetensors({"w": entry}, b"\0" * 16))
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(path)
    msg = one_line(exc)
    assert str(path) in msg and "'w'" in msg and expect in msg


def test_valid_hand_made_file_with_metadata(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    values = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float32)
    header = {"__metadata__": {"format": "pt"},
              "v": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}
    path.write_bytes(raw_safetensors(header, as_bytes(values)))
    assert torch.equal(load_file(path)["v"], values)  # the library agrees the file is valid
    with open_checkpoint(path) as ckpt:
        assert ckpt.names() == ["v"]
        assert torch.equal(ckpt.read("v"), values)


# --- missing / wrong paths ------------------------------------------------------------------------

def test_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "model"
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(path)
    msg = one_line(exc)
    assert str(path) in msg and "no such file" in msg


@pytest.mark.parametrize("files", [[], ["config.json", "tokenizer.json"], ["notes.txt"]],
                         ids=["empty", "config-only", "other-files"])
def test_directory_that_is_not_a_checkpoint(tmp_path: Path, files: list[str]) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    for f in files:
        (d / f).write_text("{}")
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(d)
    msg = one_line(exc)
    assert str(d) in msg and "not a checkpoint directory" in msg


def test_directory_with_unindexed_shards(family_sharded_f32: Family, tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    for s in sorted(family_sharded_f32.base.glob("*.safetensors"))[:2]:
        (d / s.name).write_bytes(s.read_bytes())
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(d)
    msg = one_line(exc)
    assert str(d) in msg and "index" in msg and "2 .safetensors files" in msg


def test_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "weights.txt"
    path.write_text("hello")
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(path)
    msg = one_line(exc)
    assert str(path) in msg and "not a checkpoint" in msg


def test_shard_listed_in_index_missing(family_sharded_f32: Family, tmp_path: Path) -> None:
    d = shutil.copytree(family_sharded_f32.base, tmp_path / "base")
    shards = sorted(d.glob("model-*-of-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(d)
    msg = one_line(exc)
    assert str(d / "model.safetensors.index.json") in msg
    assert shards[1].name in msg and "missing" in msg


def test_index_lists_tensor_absent_from_shards(family_sharded_f32: Family, tmp_path: Path) -> None:
    d = shutil.copytree(family_sharded_f32.base, tmp_path / "base")
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first_shard = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.ghost.weight"] = first_shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(d)
    msg = one_line(exc)
    assert str(d) in msg and "'model.ghost.weight'" in msg


def test_tensor_in_two_shards(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file({"w": torch.ones(2)}, d / "model-00001-of-00002.safetensors")
    save_file({"w": torch.zeros(2)}, d / "model-00002-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "w": "model-00001-of-00002.safetensors", "x": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(d)
    msg = one_line(exc)
    assert "'w'" in msg and "model-00001-of-00002.safetensors" in msg \
        and "model-00002-of-00002.safetensors" in msg


@pytest.mark.parametrize("text", ["{not json", '{"metadata": {}}', '{"weight_map": 3}'])
def test_invalid_index(tmp_path: Path, text: str) -> None:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(d)
    msg = one_line(exc)
    assert str(d / "model.safetensors.index.json") in msg and "index" in msg


def test_invalid_config_json(single_ckpt: Path) -> None:
    (single_ckpt / "config.json").write_text("{oops")
    with open_checkpoint(single_ckpt) as ckpt:  # the weights still open...
        with pytest.raises(CheckpointError) as exc:
            _ = ckpt.config  # ...but the config is reported, naming the file
    msg = one_line(exc)
    assert str(single_ckpt / "config.json") in msg


def test_inputs_opened_read_only(single_ckpt: Path) -> None:
    path = single_ckpt / "model.safetensors"
    path.chmod(0o444)
    before = path.read_bytes()
    with open_checkpoint(single_ckpt) as ckpt:
        for name in ckpt.names():
            ckpt.read(name)
    assert path.read_bytes() == before


def test_index_shard_names_cannot_escape_the_directory(tmp_path):
    import json

    from mergewise.checkpoint import open_checkpoint
    from mergewise.errors import CheckpointError

    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside"):
        open_checkpoint(tmp_path)
