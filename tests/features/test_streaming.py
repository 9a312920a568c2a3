"""Streaming capture: groups of blocks captured pass by pass into one stats file that holds
exactly the one-pass capture's accumulators."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from mergewise import FeatureError
from mergewise.features import capture, load_stats
from mergewise.features.statsfile import file_metadata
from mergewise.features.streaming import capture_to_file, join_shards, pass_plan


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.q, self.k, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.out(torch.tanh(self.q(h)) * self.k(h))


class Stack(nn.Module):
    """stem, five blocks in ``layers``, a final norm and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(3, 4)
        self.layers = nn.ModuleList(Layer() for _ in range(5))
        self.final = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.final(x))


def stack() -> Stack:
    torch.manual_seed(0)
    return Stack()


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(2, 3, 3, generator=g) for _ in range(3)]


@pytest.mark.parametrize("per_pass", [1, 2, 5, 9])
@pytest.mark.parametrize("accumulate", ["float64", "float32"])
def test_a_streamed_file_is_the_one_pass_file(tmp_path: Path, per_pass: int,
                                              accumulate: str) -> None:
    model = stack()
    one = capture(model, batches(), label="m", calibration={"seed": 0}, accumulate=accumulate)
    one.save(tmp_path / "one.safetensors")
    path, examples, rows, layers = capture_to_file(
        model, batches(), tmp_path / "streamed.safetensors", blocks_per_pass=per_pass,
        label="m", calibration={"seed": 0}, accumulate=accumulate)
    assert (examples, rows, layers) == (6, 18, len(one.layers))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors",
                                                          "streamed.safetensors"]  # no scratch
    a, b = load_stats(tmp_path / "one.safetensors"), load_stats(path)
    assert a.layers == b.layers and a.shared == b.shared == {f"layers.{i}.k": f"layers.{i}.q"
                                                             for i in range(5)}
    assert sorted(a.keys()) == sorted(b.keys())
    assert all(torch.equal(a.tensor(k), b.tensor(k)) for k in a.keys())
    assert a.metadata == b.metadata  # probe, rows, examples, calibration, accumulate


def test_the_passes_stop_before_the_next_group() -> None:
    model = stack()
    plan = pass_plan(model, 2)
    assert [stop is model.layers[i] for (_, stop), i in zip(plan[:2], (2, 4), strict=True)] == [True, True]
    assert plan[2][1] is None  # the last pass runs the whole model
    hooked = [[n for n, _ in model.named_modules() if n and include(n)] for include, _ in plan]
    assert "layers.1.q" in hooked[0] and "layers.2.q" not in hooked[0]
    assert {"stem", "final", "head", "layers.4.q"} <= set(hooked[2])
    assert "layers.0.q" not in hooked[2]
    assert len(pass_plan(nn.Sequential(nn.Linear(2, 2)), 3)) == 1
    with pytest.raises(FeatureError, match="blocks_per_pass is 0; it must be at least 1"):
        pass_plan(model, 0)


def test_joined_shards_keep_every_tensor(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"a": torch.arange(3.0), "b": torch.eye(2, dtype=torch.float64)},
              str(tmp_path / "0.st"))
    save_file({"c": torch.tensor([7], dtype=torch.int64)}, str(tmp_path / "1.st"))
    join_shards([tmp_path / "0.st", tmp_path / "1.st"], tmp_path / "all.st", {"k": "v"})
    with safe_open(str(tmp_path / "all.st"), "pt") as f:
        assert f.metadata() == {"k": "v"}
        got = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118
    assert torch.equal(got["a"], torch.arange(3.0)) and torch.equal(got["c"], torch.tensor([7]))
    assert torch.equal(got["b"], torch.eye(2, dtype=torch.float64))
    assert file_metadata({"n": 3}, {}, {})["n"] == "3"
