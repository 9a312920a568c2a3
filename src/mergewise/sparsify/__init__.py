"""Sparsifiers: one file each, registered in ``SPARSIFIERS`` when this package is imported."""

from __future__ import annotations

import importlib
import pkgutil

from ..registry import SPARSIFIERS

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["SPARSIFIERS"]
