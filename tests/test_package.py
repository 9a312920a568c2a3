"""The package's public names: lazy (importing mergewise loads no torch), and each name stays
what it is after every submodule was imported (a submodule named like a function would shadow
it on the package)."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import types

import mergewise


def test_importing_mergewise_loads_no_torch() -> None:
    code = ("import sys, mergewise, mergewise.cli; "
            "print('torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_public_names_survive_importing_every_submodule() -> None:
    for mod in pkgutil.walk_packages(mergewise.__path__, "mergewise."):
        if ".bench." in mod.name or mod.name.endswith(".bench"):
            continue  # the benchmark's optional dependencies
        importlib.import_module(mod.name)
    for name in mergewise.__all__:
        value = getattr(mergewise, name)
        assert not isinstance(value, types.ModuleType), f"mergewise.{name} is a module"
    assert callable(mergewise.materialize) and callable(mergewise.merge)
