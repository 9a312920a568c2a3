"""runtime: the malloc tuning is applied only where it can be and never against the user's
own setting; the thread count comes back after the block, also after an error."""

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
