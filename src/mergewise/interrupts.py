"""SIGTERM and SIGHUP end a run the way Ctrl-C does: as an exception in the main thread, so
every ``finally`` and ``except BaseException`` runs (the output's temp directory is deleted, the
target's lock released) and the CLI prints one line. Without this, ``kill``, a closed terminal
or a job scheduler's time limit end the process at once and leave the temp directory behind.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

HANDLED = (signal.SIGTERM,) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())


class Interrupted(KeyboardInterrupt):
    """A KeyboardInterrupt that says which signal caused it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def install() -> None:
    """Make SIGTERM/SIGHUP raise ``Interrupted`` (main thread only, where Python allows it)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in HANDLED:
        signal.signal(sig, _raise)


def describe(exc: BaseException) -> str:
    signum = getattr(exc, "signum", signal.SIGINT)
    return f"interrupted ({signal.Signals(signum).name})"


def exit_code(exc: BaseException) -> int:
    """The shell's convention: 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + int(getattr(exc, "signum", signal.SIGINT))
