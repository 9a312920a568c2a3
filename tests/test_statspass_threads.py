"""The stats pass observes the models of a tensor one per core: the same statistics, the same
merge, bit for bit, as one model at a time; large tensors and vocabulary readers stay serial."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from ckpt_helpers import Family, load_dir, recipe_for

from mergewise import merge, merge_state_dicts, statspass
from mergewise.selection import quantile_ratio
from mergewise.sparsify.magnitude import GlobalTopK
from mergewise.sparsify.tadrop import TADropStats
from mergewise.streamnorm import float64_norm


@pytest.fixture
def torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _on(threads: int, fn: Any) -> Any:
    torch.set_num_threads(threads)
    return fn()


def test_the_observations_kernels_do_not_depend_on_the_thread_count(torch_threads: None) -> None:
    """What the parallel stats pass relies on: d and ||tau|| of a tensor far above torch's
    parallel grain size are the same bits on one thread as on three."""
    g = torch.Generator().manual_seed(0)
    delta = torch.distributions.StudentT(3.0).sample((700, 1500)) * 1e-3
    delta[torch.rand(delta.shape, generator=g) < 0.3] = 0.0
    one = _on(1, lambda: (quantile_ratio(delta), float64_norm(delta)))
    three = _on(3, lambda: (quantile_ratio(delta), float64_norm(delta)))
    assert one == three


def _spy(monkeypatch: pytest.MonkeyPatch, cls: type) -> set[str]:
    names: set[str] = set()
    real = cls.observe

    def observe(self: Any, *args: Any, **kwargs: Any) -> None:
        names.add(threading.current_thread().name)
        real(self, *args, **kwargs)

    monkeypatch.setattr(cls, "observe", observe)
    return names


@pytest.mark.parametrize("sparsify", [{"method": "tadrop", "drop_rate": 0.7},
                                      {"method": "tadrop", "drop_rate": 0.8, "strength": 2.0}])
def test_tadrop_from_files_is_the_serial_merge(family_f32: Family, tmp_path: Path,
                                               torch_threads: None, sparsify: dict[str, Any],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = recipe_for(family_f32, "ties", sparsify=sparsify)
    torch.set_num_threads(1)  # one worker: every observation on the main thread
    merge(recipe, tmp_path / "serial", overwrite=True)
    names = _spy(monkeypatch, TADropStats)
    torch.set_num_threads(3)
    merge(recipe, tmp_path / "parallel", overwrite=True)
    assert len({n for n in names if n.startswith("mergewise-chunk")}) >= 2
    serial, parallel = load_dir(tmp_path / "serial"), load_dir(tmp_path / "parallel")
    assert serial.keys() == parallel.keys()
    for n in serial:
        assert torch.equal(serial[n], parallel[n]), n
    assert ((tmp_path / "serial" / "report.csv").read_text()
            == (tmp_path / "parallel" / "report.csv").read_text())


def test_global_top_k_in_memory_is_the_serial_merge(torch_threads: None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    base = {f"w{i}": torch.randn(96, 128, generator=g) for i in range(4)}
    models = [{k: v + torch.randn(v.shape, generator=g) * 0.02 for k, v in base.items()}
              for _ in range(3)]

    def run() -> dict[str, torch.Tensor]:
        return merge_state_dicts(base, models, "ties",
                                 model_parameters=[{"density": 0.3, "scope": "global"}] * 3)

    serial = _on(1, run)
    names = _spy(monkeypatch, GlobalTopK)
    parallel = _on(3, run)
    assert len({n for n in names if n.startswith("mergewise-chunk")}) >= 2
    assert all(torch.equal(serial[k], parallel[k]) for k in serial)


def test_large_tensors_are_observed_on_the_calling_thread(torch_threads: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statspass, "PARALLEL_MAX", 96 * 128 - 1)
    g = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(96, 128, generator=g)}
    models = [{"w": base["w"] + torch.randn(96, 128, generator=g) * 0.02} for _ in range(3)]
    names = _spy(monkeypatch, TADropStats)
    _on(3, lambda: merge_state_dicts(base, models, "ties", sparsify={"method": "tadrop"}))
    assert names == {threading.current_thread().name}
