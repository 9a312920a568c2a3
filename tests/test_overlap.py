"""Reading ahead and writing behind: the same bytes as a plain loop, errors in the writer
thread surface in order, an aborted merge stops the writer before its temp dir goes, nothing
read ahead is left over."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from ckpt_helpers import Family, leftovers, load_dir, recipe_for

from mergewise import NonFiniteError, merge
from mergewise.checkpoint import open_checkpoint
from mergewise.readers import Prefetcher
from mergewise.writer import BackgroundWriter


def test_background_writer_keeps_order_and_raises_its_errors() -> None:
    seen: list[str] = []

    def write(name: str, t: torch.Tensor) -> None:
        time.sleep(0.001)
        if name == "bad":
            raise OSError("disk full")
        seen.append(name)

    w = BackgroundWriter(write, depth=2)
    for i in range(20):
        w.write(f"t{i}", torch.zeros(1))
    w.close()
    assert seen == [f"t{i}" for i in range(20)]
    w = BackgroundWriter(write)
    w.write("a", torch.zeros(1))
    w.write("bad", torch.zeros(1))
    with pytest.raises(OSError, match="disk full"):
        for _ in range(50):  # the error surfaces at a later write, or at close
            w.write("c", torch.zeros(1))
        w.close()


def test_background_writer_abort_drops_the_rest() -> None:
    started = threading.Event()
    gate = threading.Event()
    done: list[str] = []

    def write(name: str, t: torch.Tensor) -> None:
        started.set()
        gate.wait(5)
        done.append(name)

    w = BackgroundWriter(write, depth=3)
    for name in "abc":
        w.write(name, torch.zeros(1))
    started.wait(5)
    gate.set()
    w.close(abort=True)
    assert done == ["a"]  # the one in progress finishes; the waiting ones are dropped


def test_prefetcher_returns_the_same_tensors(family_f32: Family) -> None:
    with open_checkpoint(family_f32.experts[0]) as c:
        names = c.names()
        p = Prefetcher()
        p.ahead([(c, n) for n in names])
        got = {n: p.take(c, n) for n in names}
        assert all(torch.equal(got[n], c.read(n)) for n in names)
        p.ahead([(c, names[0])])
        p.forget([(c, names[0])])
        assert not p._pending
        p.close()


def test_a_failing_merge_leaves_nothing_with_the_writer_running(family_f32: Family,
                                                                 tmp_path: Path) -> None:
    """A NaN produced mid-merge (lambda overflow) stops the writer thread and removes the
    temp directory; the output never appears."""
    out = tmp_path / "out"
    data = recipe_for(family_f32, "task_arithmetic", parameters={"lambda": 1e38},
                      out_dtype="float16")
    with pytest.raises(NonFiniteError):
        merge(data, out)
    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_threaded_run_equals_the_in_memory_merge(family_f32: Family, tmp_path: Path) -> None:
    """The file path (prefetch + writer threads) and the in-memory path (neither) agree."""
    from mergewise import merge_state_dicts

    merge(recipe_for(family_f32, "ties", parameters={"density": 0.4}), tmp_path / "o")
    mem = merge_state_dicts(load_dir(family_f32.base), [load_dir(e) for e in family_f32.experts],
                            "ties", parameters={"density": 0.4})
    files = load_dir(tmp_path / "o")
    assert all(torch.equal(files[n], mem[n]) for n in mem)
