"""The stats file: round trip, lazy reads, the probe, shape checks and the format version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mergewise import FeatureError
from mergewise.checkpoint import SafetensorsFile, StateDictCheckpoint
from mergewise.features import FORMAT_VERSION, FeatureStats, LayerInfo, capture, load_stats


def small_stats() -> tuple[nn.Module, FeatureStats]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.LayerNorm(4))
    return model, capture(model, [torch.randn(6, 3)], label="small", calibration={"seed": 0})


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    _, stats = small_stats()
    path = stats.save(tmp_path / "small.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["small.safetensors"]  # no temp file left
    loaded = load_stats(path)
    assert loaded.keys() == stats.keys() == ["rows:0", "gram:0", "rows:2", "energy:2"]
    assert all(torch.equal(loaded.tensor(k), stats.tensor(k)) for k in stats.keys())
    assert all(loaded.tensor(k).dtype == torch.float64 for k in loaded.keys())
    assert loaded.layers == stats.layers == {"0": LayerInfo("linear"), "2": LayerInfo("norm")}
    assert loaded.metadata["mergewise_features"] == FORMAT_VERSION == "2"
    assert json.loads(loaded.metadata["calibration"]) == {"seed": 0}
    assert loaded.metadata["probe"] == stats.metadata["probe"]
    assert loaded.total_rows == stats.total_rows == 6
    assert loaded.label == str(path) and stats.label == "features of small"
    loaded.close()


def test_a_stats_file_is_read_lazily(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, stats = small_stats()
    path = stats.save(tmp_path / "small.safetensors")
    reads: list[str] = []
    read = SafetensorsFile.read

    def counted(self: SafetensorsFile, name: str) -> torch.Tensor:
        reads.append(name)
        return read(self, name)

    monkeypatch.setattr(SafetensorsFile, "read", counted)
    loaded = load_stats(path)
    assert loaded.kind_of("0.weight", (4, 3)) == ("matmul", "0")
    assert loaded.kind_of("2.weight", (4,)) == ("scale", "2")
    assert reads == []  # headers only
    feat = loaded.for_tensor("0.weight", (4, 3))
    assert sorted(reads) == ["gram:0", "rows:0"]  # that layer's accumulators, nothing else
    assert feat is not None and feat.kind == "matmul" and feat.rows == 6 and not feat.in_out
    torch.testing.assert_close(feat.gram, stats.gram("0"))
    shift = loaded.for_tensor("2.bias", (4,))
    assert shift is not None and shift.kind == "shift" and shift.gram is None and shift.energy is None
    loaded.close()


def test_statistics_of_another_model_are_refused(tmp_path: Path) -> None:
    model, stats = small_stats()
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    stats.check_model(StateDictCheckpoint("same", sd))
    stats.check_model(StateDictCheckpoint("prefixed", {f"encoder.{k}": v for k, v in sd.items()}))
    load_stats(stats.save(tmp_path / "s.safetensors")).check_model(StateDictCheckpoint("same", sd))
    with pytest.raises(FeatureError, match="captured from another model than other .model 'small'"):
        stats.check_model(StateDictCheckpoint("other", {k: v + 1 for k, v in sd.items()}))
    probe = json.loads(stats.metadata["probe_tensors"])
    assert sorted(probe) == ["0.bias", "0.weight", "2.bias", "2.weight"]  # the smallest four
    lacking = {k: v for k, v in sd.items() if k != probe[0]}
    with pytest.raises(FeatureError, match=f"with tensor '{probe[0]}', which lacking lacks"):
        stats.check_model(StateDictCheckpoint("lacking", lacking))


def test_statistics_that_do_not_fit_a_tensor_are_refused() -> None:
    _, stats = small_stats()
    with pytest.raises(FeatureError, match=r"layer '0' has a 3-wide Gram but tensor '0.weight' has "
                                           r"shape \[4, 5\]; the stats file belongs to another model"):
        stats.kind_of("0.weight", (4, 5))
    with pytest.raises(FeatureError, match=r"layer '2' has norm statistics of shape \[4\] but "
                                           r"tensor '2.weight' has \[5\]"):
        stats.kind_of("2.weight", (5,))
    assert stats.kind_of("0.bias", (4,)) == ("shift", "0")
    assert stats.kind_of("0.bias", (4, 1)) is None
    assert stats.kind_of("1.weight", (4,)) is None  # the ReLU: no layer
    assert stats.kind_of("0.scale", (4,)) is None  # neither weight nor bias


def test_parameter_names_with_another_prefix_find_their_layer() -> None:
    _, stats = small_stats()
    assert stats.module_for("bert.0.weight") == "0"
    assert stats.module_for("0.weight") == "0"
    assert stats.module_for("weight") is None
    grams = {"rows:model.dense": torch.tensor(1.0, dtype=torch.float64)}
    prefixed = FeatureStats({"model.dense": LayerInfo("linear"), "a.x": LayerInfo("linear"),
                             "b.x": LayerInfo("linear")}, grams)
    assert prefixed.module_for("dense.weight") == "model.dense"
    assert prefixed.module_for("x.weight") is None  # two candidates: ambiguous, no statistics


def test_an_incomplete_stats_file_is_said_so() -> None:
    stats = FeatureStats({"0": LayerInfo("linear")}, {}, label="partial")
    with pytest.raises(FeatureError, match="partial: no statistics 'rows:0'; the stats file is incomplete"):
        stats.rows("0")


def test_a_file_of_another_format_is_refused(tmp_path: Path) -> None:
    save_file({"gram:0": torch.eye(2, dtype=torch.float64)}, str(tmp_path / "old.safetensors"),
              metadata={"mergewise_features": "0"})
    with pytest.raises(FeatureError, match=r"not a mergewise stats file of format 1 or 2 \(found '0'\)"):
        load_stats(tmp_path / "old.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(FeatureError, match=r"format 1 or 2 \(found None\); recompute it with `mergewise features`"):
        load_stats(tmp_path / "plain.safetensors")
    with pytest.raises(FeatureError, match=r"^stats file .*nowhere\.safetensors: cannot read"):
        load_stats(tmp_path / "nowhere.safetensors")
