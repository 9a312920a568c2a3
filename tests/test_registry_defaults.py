"""Each plug-in's declared parameters agree with its Python function.

Recipe validation, ``mergewise methods`` and the docs read the declared ``Param`` defaults; a
direct caller of the function gets the signature's. They must be the same value.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

import mergewise
from mergewise.registry import Param

METHODS = list(mergewise.METHODS)
SPARSIFIERS = list(mergewise.SPARSIFIERS)
PLUGINS = [pytest.param(m, id=f"method:{m.name}") for m in METHODS] + [
    pytest.param(s, id=f"sparsifier:{s.name}") for s in SPARSIFIERS]


def _keywords(func: Any) -> dict[str, inspect.Parameter]:
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {n: p for n, p in inspect.signature(func).parameters.items() if p.kind in kinds}


def _declared(plugin: Any) -> list[Param]:
    return [*plugin.params, *getattr(plugin, "model_params", ())]


def test_the_registries_are_filled():
    assert {"linear", "task_arithmetic", "ties", "dare_ties", "emr", "lot", "regmean"} <= {
        m.name for m in METHODS}
    assert {"magnitude", "random", "breadcrumbs", "tadrop"} <= {s.name for s in SPARSIFIERS}


@pytest.mark.parametrize("plugin", PLUGINS)
def test_declared_defaults_match_the_signature(plugin):
    keywords = _keywords(plugin.func)
    for p in _declared(plugin):
        arg = keywords.get(p.python_name)
        if arg is None:  # e.g. the per-model ``weight``: a positional ``weights`` sequence
            continue
        if arg.default is inspect.Parameter.empty:
            # a required keyword: the engine always passes the declared (or the method's) value
            continue
        if p.kind is list and arg.default is None:
            # None stands in for a mutable list default (TADrop's quantiles / skip, which only
            # its stats pass reads, from the resolved parameters)
            continue
        assert arg.default == p.default and type(arg.default) is type(p.default), (
            f"{plugin.name}: '{p.name}' is declared with default {p.default!r} but "
            f"{plugin.func.__name__}({p.python_name}=...) defaults to {arg.default!r}")


def test_lambda_is_compared_under_its_python_name():
    ties = mergewise.METHODS.get("ties")
    lam = next(p for p in ties.params if p.name == "lambda")
    assert lam.python_name == "lam" and _keywords(ties.func)["lam"].default == lam.default


@pytest.mark.parametrize("plugin", PLUGINS)
def test_every_declared_parameter_is_a_keyword_of_the_function(plugin):
    """The engine passes the resolved parameters by their python names."""
    keywords = _keywords(plugin.func)
    missing = [p.python_name for p in plugin.params if p.python_name not in keywords]
    assert not missing, f"{plugin.name}: {plugin.func.__name__} takes no {missing}"


@pytest.mark.parametrize("plugin", PLUGINS)
def test_declared_defaults_pass_their_own_checks(plugin):
    for p in _declared(plugin):
        if p.default is None:  # an optional parameter: not given unless the recipe gives it
            continue
        p.check(p.default, plugin.name)  # raises RecipeError when out of range / wrong type


@pytest.mark.parametrize("method", [pytest.param(m, id=m.name) for m in METHODS
                                    if m.sparsifier_defaults])
def test_sparsifier_defaults_are_parameters_of_the_methods_sparsifier(method):
    assert method.sparsifier is not None, f"{method.name}: sparsifier_defaults but no sparsifier"
    specs = {p.name: p for p in mergewise.SPARSIFIERS.get(method.sparsifier).params}
    for key, value in method.sparsifier_defaults.items():
        assert key in specs, f"{method.name}: '{key}' is no parameter of '{method.sparsifier}'"
        specs[key].check(value, method.name)


@pytest.mark.parametrize("method", [pytest.param(m, id=m.name) for m in METHODS
                                    if m.block_defaults])
def test_block_defaults_are_parameters_of_a_sparsifier(method):
    """``block_defaults`` go to whichever sparsifier a ``sparsify:`` block names, when it has
    that parameter (the DARE methods give TADrop ``mode: random``; their own trim step,
    ``random``, has no ``mode``), so each key must belong to some sparsifier, with a valid value."""
    assert method.accepts_sparsify, f"{method.name}: block_defaults but no sparsify block"
    for key, value in method.block_defaults.items():
        owners = [p for s in SPARSIFIERS for p in s.params if p.name == key]
        assert owners, f"{method.name}: no sparsifier has a parameter '{key}'"
        for p in owners:
            p.check(value, method.name)
