"""Merge methods: one file each, registered in ``METHODS`` when this package is imported."""

from __future__ import annotations

import importlib
import pkgutil

from ..registry import METHODS

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["METHODS"]
