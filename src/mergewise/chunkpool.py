"""The cores for a chunked merge: chunks (or models) handed to a few threads, results in order.

On 2^18-entry chunks torch's own intra-op threads cost more than they give (its OpenMP workers
spin between the many small kernels, against the reader and writer threads; see ``runtime``),
so a chunked merge runs torch on one intra-op thread and spreads the *chunks* over Python
threads instead: torch and numpy release the GIL inside their kernels, so two threads merge
about twice as fast on 2 cores (measured in docs/benchmarks.md).

Bit identity does not depend on the thread count: every chunk's arithmetic is the same, each
chunk writes only its own slice of the output, and whatever is summed across chunks (report
norms, kept counts) is returned per chunk and added in chunk order by the caller. Work whose
order matters within a stream (a tensor's random mask drawn from its generator, a top-k
search fed chunk by chunk) is parallel across models instead (``each``), in order within one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}
_workers = threading.local()  # the worker count of the active ``cores`` block, per thread


def _pool(workers: int) -> ThreadPoolExecutor:
    """One long-lived pool per size (threads are started once per process, not per tensor)."""
    with _lock:
        pool = _pools.get(workers)
        if pool is None:
            pool = _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="mergewise-chunk")
        return pool


@contextmanager
def cores() -> Iterator[int]:
    """Inside the block torch runs one intra-op thread and ``ordered``/``each`` use as many
    threads as torch had (the user's ``torch.set_num_threads`` / ``OMP_NUM_THREADS``); the
    thread count is restored afterwards. Yields the worker count."""
    import torch

    before, outer = torch.get_num_threads(), workers()
    if before > 1:
        torch.set_num_threads(1)
    _workers.n = before
    try:
        yield before
    finally:
        _workers.n = outer  # a block inside another gives the outer one back its count
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def workers() -> int:
    """The worker count of the active ``cores`` block in this thread (1 outside one)."""
    return int(getattr(_workers, "n", 1))


def ordered(func: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """``map(func, items)`` on the block's threads, yielding results in the items' order.

    Stopping early (a ``break``, an exception, an interrupt) cancels the items not started;
    those running finish their chunk (each writes only its own slice)."""
    n = workers()
    if n <= 1:
        yield from map(func, items)
        return
    results = _pool(n).map(func, items)
    try:
        yield from results
    finally:
        results.close()  # cancels the pending futures (Executor.map's own cleanup)


def each(func: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[func(x) for x in items]`` with the items on the block's threads (one item's work
    stays on one thread, in its own order)."""
    if workers() <= 1 or len(items) <= 1:
        return [func(x) for x in items]
    return list(_pool(workers()).map(func, items))
