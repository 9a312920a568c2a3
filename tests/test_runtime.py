"""runtime: the malloc tuning is applied only where it can be and never against the user's
own setting (thresholds, arena count)."""

from __future__ import annotations

import sys

import pytest

from mergewise import runtime


def test_keep_freed_buffers_respects_the_users_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert runtime.keep_freed_buffers() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_buffers_applies_on_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert runtime.keep_freed_buffers() is True


class _FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


@pytest.mark.parametrize("user_arenas", [None, "4"])
def test_one_arena_unless_the_user_chose(user_arenas: str | None,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    libc = _FakeLibc()
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: libc)
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX"):
        monkeypatch.delenv(var, raising=False)
    if user_arenas is not None:
        monkeypatch.setenv("MALLOC_ARENA_MAX", user_arenas)
    assert runtime.keep_freed_buffers() is True
    arena = [(p, v) for p, v in libc.calls if p == runtime._M_ARENA_MAX]
    assert arena == ([] if user_arenas else [(runtime._M_ARENA_MAX, 1)])
    assert (runtime._M_MMAP_THRESHOLD, runtime.MMAP_THRESHOLD) in libc.calls
    assert (runtime._M_TRIM_THRESHOLD, runtime.TRIM_THRESHOLD) in libc.calls
