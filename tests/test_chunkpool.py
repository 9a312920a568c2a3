"""The chunk workers: results in order whatever the thread count, early stops cancel the rest,
errors reach the caller, torch's thread count is restored, and a chunked merge really runs on
several threads (and gives the serial bits, tests/test_chunked.py)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from mergewise import chunked, chunkpool, merge_state_dicts, numerics


@pytest.fixture
def threads() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(before)


def test_cores_sets_one_intra_op_thread_and_restores(threads: int) -> None:
    with chunkpool.cores() as n:
        assert n == 3 and chunkpool.workers() == 3
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 3 and chunkpool.workers() == 1
    with pytest.raises(RuntimeError), chunkpool.cores():
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 3 and chunkpool.workers() == 1


def test_ordered_keeps_the_order_of_the_items(threads: int) -> None:
    def slow_first(i: int) -> int:
        time.sleep(0.02 if i == 0 else 0.0)  # the first finishes last
        return i * i

    with chunkpool.cores():
        assert list(chunkpool.ordered(slow_first, range(20))) == [i * i for i in range(20)]
        assert chunkpool.each(lambda i: -i, [1, 2, 3]) == [-1, -2, -3]


def test_outside_a_block_everything_runs_inline() -> None:
    names: set[str] = set()

    def where(i: int) -> int:
        names.add(threading.current_thread().name)
        return i

    assert list(chunkpool.ordered(where, range(5))) == list(range(5))
    assert names == {threading.current_thread().name}


def test_an_early_stop_cancels_what_has_not_started(threads: int) -> None:
    started: list[int] = []

    def work(i: int) -> int:
        started.append(i)
        time.sleep(0.01)
        return i

    with chunkpool.cores():
        results = chunkpool.ordered(work, range(200))
        for got in results:
            if got == 2:
                break
        results.close()
    time.sleep(0.05)
    assert len(started) < 50  # the pending ones were cancelled


def test_an_error_in_a_chunk_reaches_the_caller(threads: int) -> None:
    def work(i: int) -> int:
        if i == 7:
            raise ValueError("chunk 7")
        return i

    with chunkpool.cores(), pytest.raises(ValueError, match="chunk 7"):
        list(chunkpool.ordered(work, range(20)))


def test_a_chunked_merge_runs_on_several_threads(threads: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunked, "CHUNK", 1024)
    monkeypatch.setattr(chunked, "MIN_NUMEL", 2048)
    monkeypatch.setattr(numerics, "REPORT_CHUNK", 1024)
    names: set[str] = set()
    real = chunked._Source.chunk

    def spy(self: Any, part: slice, base: torch.Tensor, record: bool) -> Any:
        names.add(threading.current_thread().name)
        time.sleep(0.001)  # let the other workers pick up chunks
        return real(self, part, base, record)

    monkeypatch.setattr(chunked._Source, "chunk", spy)
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 512, generator=g)}
    models = [{"w": base["w"] + torch.randn(64, 512, generator=g) * 0.01} for _ in range(2)]
    merge_state_dicts(base, models, "ties", model_parameters=[{"density": 0.3}] * 2)
    assert len({n for n in names if n.startswith("mergewise-chunk")}) >= 2
