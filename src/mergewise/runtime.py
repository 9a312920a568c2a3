"""Process settings that a streaming merge on a few cores needs (measured in docs/benchmarks.md).

A merge allocates and frees buffers of 1-60 MB all the time (each tensor read, each task
vector, each chunk's temporaries). glibc's malloc gives such blocks back to the kernel on free
(mmap above a moving threshold, heap trimming above 128 KiB), so every new buffer is faulted in
and zeroed again by the kernel: on the 415M-parameter benchmark that is a third of the CPU time
of a linear merge. ``keep_freed_buffers`` makes blocks up to 32 MiB come from the heap and keeps
up to 1 GiB of freed heap for reuse; peak memory is unchanged (the blocks are reused, not added).
The command line calls it; library users may call it too (or set ``MALLOC_MMAP_THRESHOLD_``).

It also keeps every thread on one malloc arena: glibc gives each new thread an arena of its own,
and with freed heap kept for reuse each arena holds on to what its thread freed, out of reach of
the others. The chunk workers (``chunkpool``) and the reader and writer threads allocate all the
time, so per-thread arenas raised the peak of a TIES + TADrop merge of the 415M-parameter
benchmark from 1.23 to 1.43 GB (measured, same output bits); one arena costs no time there
(a few allocations per 2^18-entry chunk take its lock). ``MALLOC_ARENA_MAX`` set by the user wins.

(The thread settings of chunked merges live in ``chunkpool``.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value
TRIM_THRESHOLD = 1 << 30


def keep_freed_buffers() -> bool:
    """Tune glibc's malloc as described above; True when applied (Linux with glibc, and the
    user set neither ``MALLOC_MMAP_THRESHOLD_`` nor ``MALLOC_TRIM_THRESHOLD_``; the arena
    limit is left alone when ``MALLOC_ARENA_MAX`` is set)."""
    if not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt, nothing to tune
        return False
    if "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(_M_ARENA_MAX, 1)
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
