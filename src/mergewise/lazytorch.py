"""torch imported on first use, for the commands that usually need none of it.

``import torch`` costs 1.3-1.7 s on a 2-core machine, more than a whole ``merge --dry-run``
otherwise takes: planning reads JSON headers and checks names, shapes and dtype codes, and
imports no torch on the CPU (``tensors``, ``plan``, ``readers.checked_device``). But most
modules ``import torch`` at the top for the work they do later. ``defer()`` puts a stand-in
module under the name ``torch``: those imports bind the stand-in, and the first attribute read
from it (``torch.zeros``, ``from torch import nn``) imports the real torch, copies its names
into the stand-in and hands the real module to every later import. Nothing can come out
different: a dry run that needs torch after all (a pickled ``.bin`` checkpoint's header, a
``cuda`` device, a data-aware method's calibration check) simply loads it then.

Only the command line calls ``defer()``, for commands that plan without computing; the Python
API imports torch as usual.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any

_LOCK = threading.RLock()


class DeferredTorch(types.ModuleType):
    """The stand-in: every attribute it does not hold yet comes from the real torch."""

    _real: types.ModuleType | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._load(), name)

    def _load(self) -> types.ModuleType:
        with _LOCK:
            if self._real is None:
                if sys.modules.get("torch") is self:
                    del sys.modules["torch"]
                try:
                    real = importlib.import_module("torch")
                except BaseException:
                    sys.modules.setdefault("torch", self)
                    raise
                # the stand-in's own ``__spec__``/``__file__`` go too: it now reads as torch
                self.__dict__.update(real.__dict__)
                self.__dict__["_real"] = real
            return self._real  # type: ignore[return-value]


def defer() -> bool:
    """Install the stand-in unless torch is imported already (or not installed); True if
    installed. Idempotent."""
    current = sys.modules.get("torch")
    if current is not None:
        return isinstance(current, DeferredTorch)
    spec = importlib.util.find_spec("torch")
    if spec is None:
        return False
    stand_in = DeferredTorch("torch")
    stand_in.__spec__ = spec
    stand_in.__file__ = spec.origin
    # no __path__: ``import torch.nn`` reads it, which must load the real torch first
    sys.modules["torch"] = stand_in
    return True


def loaded() -> bool:
    """Whether the real torch has been imported (tests: a dry run must not)."""
    current = sys.modules.get("torch")
    if current is None:
        return False
    return not isinstance(current, DeferredTorch) or current._real is not None
