"""The benchmark's rows: which registry methods are run, and the grids searched on validation.

Why a module of its own: what a row *is* (method, fixed paper settings, grid) is decided from
the method registry alone, without loading a model, so it is testable in milliseconds and the
runner only executes it. The grids and their sources are documented in ``runner``'s docstring.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..registry import METHODS, SPARSIFIERS, MergeMethod

TADROP = "+tadrop"
CORE_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "emr", "lot")
DATA_AWARE_METHODS = ("regmean",)  # no sparsify block: no TADrop row
# issue 16's methods: data-free ones with a TADrop row each (they all take a sparsify block) ...
RECENT_METHODS = ("tsv", "iso_c", "iso_cts", "wudi", "tall_masks", "consensus")
# ... and data-aware ones (no sparsify block). Fisher is another branch's work: its row is skipped
# with a note until ``fisher`` is registered (OPTIONAL_ROWS), so the default run never fails on it.
RECENT_DATA_AWARE = ("regmean_plusplus", "fisher")
OPTIONAL_ROWS = ("fisher",)
# Rows that are the very same merges as another row, left out of the default run: TADrop replaces
# Breadcrumbs' whole trim step and Breadcrumbs then sums like Task Arithmetic.
SAME_AS = {"breadcrumbs" + TADROP: "task_arithmetic" + TADROP}


@dataclass(frozen=True)
class Grids:
    """The documented hyperparameter grids (searched on validation only)."""

    lambda_sum: tuple[float, ...] = (0.2, 0.3, 0.5, 0.7, 1.0)
    lambda_mean: tuple[float, ...] = (0.4, 0.6, 1.0, 1.4, 1.8)
    density: dict[str, tuple[float, ...]] = field(default_factory=lambda: {
        "magnitude": (0.05, 0.1, 0.2, 0.4),  # TIES: fraction kept by |tau|
        "random": (0.2, 0.4, 0.6),  # DARE: keep probability
        "breadcrumbs": (0.7, 0.9),  # kept after dropping the top 1 % outliers
    })
    drop_rate: tuple[float, ...] = (0.5, 0.7, 0.9, 0.95)  # TADrop target p̄
    untrimmed: tuple[str, ...] = ("task_arithmetic",)
    # the papers' variants, where the defaults follow mergekit (measured as published)
    paper: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "dare_ties": {"aggregate": "mean", "rescale_rule": "density"},
        "dare_linear": {"rescale_rule": "density"},
    })
    # A method's own choices searched too (default value first): LOT's Gram weighting
    method: dict[str, tuple[tuple[str, tuple[Any, ...]], ...]] = field(default_factory=lambda: {
        "lot": (("tasks", ("rows", "equal")),),  # raw token sums (paper) | each task weighs the same
        # TALL masks' lambda_t (paper: per task from 0.2-0.6 on validation; here one for all
        # tasks, FusionBench's 0.6 first so its cached evaluation is the registry default's)
        "tall_masks": (("mask_lambda", (0.6, 0.4, 0.2)),),
    })
    # A method's own λ grid where the papers' scale differs from lambda_sum / lambda_mean:
    # TSV: α on validation over 0.1-3.0 (official), 1.0 (FusionBench) -> around 1;
    # Iso-C / Iso-CTS: flat spectrum of the sum, official α 1.3-1.9 -> 1.0-2.0;
    # WUDI: the Adam result is used as is (official, no scaling): λ = 1 only (and its 300 Adam
    # steps per matrix make every candidate costly); Consensus: λ on 0.1-1.0 (official).
    lambdas: dict[str, tuple[float, ...]] = field(default_factory=lambda: {
        "tsv": (0.7, 1.0, 1.4), "iso_c": (1.0, 1.5, 2.0), "iso_cts": (1.0, 1.5, 2.0),
        "wudi": (1.0,), "consensus": (0.3, 0.5, 0.7, 1.0),
    })
    # TADrop p̄ for issue 16's methods: the two values the core rows selected most (0.7, 0.9),
    # to keep the default run's cost in bounds (every TADrop row multiplies its λ grid by this)
    drop_rate_recent: tuple[float, ...] = (0.7, 0.9)


@dataclass(frozen=True)
class Variant:
    """One table row: a registry method, fixed settings, and the grid searched on validation."""

    label: str
    method: str
    parameters: dict[str, Any]
    sparsify: dict[str, Any] | None
    grid: tuple[tuple[str, tuple[Any, ...]], ...]  # ("lambda", ...), ("sparsify.drop_rate", ...)
    # grid parameters left out of a candidate when at this (registry default) value, so adding a
    # choice to the grid keeps every cached evaluation of the default
    omit_defaults: tuple[tuple[str, Any], ...] = ()

    def candidates(self) -> list[dict[str, Any]]:
        names = [n for n, _ in self.grid]
        out = []
        for values in itertools.product(*(v for _, v in self.grid)):
            params, sparsify = dict(self.parameters), dict(self.sparsify) if self.sparsify else None
            for name, value in zip(names, values, strict=True):
                if name.startswith("sparsify."):
                    assert sparsify is not None
                    sparsify[name.removeprefix("sparsify.")] = value
                elif (name, value) not in self.omit_defaults:
                    params[name] = value
            out.append({"parameters": params, "sparsify": sparsify})
        return out


def paper_settings(method: str, grids: Grids, sparsify: bool) -> dict[str, Any]:
    """The settings that make ``method`` its paper's variant; a ``sparsify`` block replaces the
    trim step, so the trim's own rescale rule is left out then."""
    fixed = dict(grids.paper.get(method, {}))
    return {k: v for k, v in fixed.items() if k != "rescale_rule"} if sparsify else fixed


def _trim_step(method: MergeMethod, grids: Grids) -> str | None:
    """The sparsifier of the method's own trim step, if its paper form trims."""
    if not method.sparsifier or method.name in grids.untrimmed:
        return None
    sp = SPARSIFIERS.get(method.sparsifier)
    return sp.name if any(p.name == "density" for p in sp.params) else None


def available_rows(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(rows to run, notes on skipped ones): an ``OPTIONAL_ROWS`` method that is not registered
    (yet) is skipped with a note; any other unknown name is left to ``variant`` to refuse."""
    run, notes = [], []
    for n in names:
        base = n.removesuffix(TADROP)
        if base in OPTIONAL_ROWS and base not in METHODS:
            notes.append(f"{n}: skipped, method '{base}' is not registered in this build")
        else:
            run.append(n)
    return run, notes


def variant(name: str, grids: Grids) -> Variant:
    """The row for ``name`` (a registry method, optionally with the ``+tadrop`` suffix)."""
    tadrop = name.endswith(TADROP)
    method = METHODS.get(name.removesuffix(TADROP))
    fixed = paper_settings(method.name, grids, sparsify=tadrop)
    grid: list[tuple[str, tuple[Any, ...]]] = []
    param_names = {p.name for p in method.params}
    if tadrop and not method.accepts_sparsify:
        if method.name != "linear":
            raise ValueError(f"'{method.name}' takes no sparsify block, so it has no TADrop row")
        return Variant(name, "task_arithmetic", {"normalize": True, "lambda": 1.0},
                       {"method": "tadrop"}, (("sparsify.drop_rate", grids.drop_rate),))
    if method.name in grids.lambdas:
        grid.append(("lambda", grids.lambdas[method.name]))
    elif "lambda" in param_names:  # mean-like merged vectors (TIES-style, data-aware solves): λ ≈ 1
        mean_like = "aggregate" in param_names or method.features
        grid.append(("lambda", grids.lambda_mean if mean_like else grids.lambda_sum))
    own = grids.method.get(method.name, ())
    grid.extend(own)
    defaults = {p.name: p.default for p in method.params}
    omit = tuple((n, defaults[n]) for n, _ in own if n in defaults)
    if tadrop:
        rates = grids.drop_rate_recent if method.name in RECENT_METHODS else grids.drop_rate
        grid.append(("sparsify.drop_rate", rates))
        return Variant(name, method.name, fixed, {"method": "tadrop"}, tuple(grid), omit)
    trim = _trim_step(method, grids)
    if trim is not None and trim in grids.density:
        grid.append(("density", grids.density[trim]))
    return Variant(name, method.name, fixed, None, tuple(grid), omit)
