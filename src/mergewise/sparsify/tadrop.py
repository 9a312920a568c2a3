"""TADrop: tensor-wise adaptive drop rates from each tensor's magnitude distribution.

For task t and tensor i: d_i = Q_0.50(|tau|) / Q_0.95(|tau|) (``quantiles``), a scale- and
sign-invariant flatness score (near 0 for heavy-tailed, sparse tensors; Gaussian 0.344, uniform
0.526). Drop rate p_i = clip(p̄ (d_i / d_ref)^γ, min_drop, max_drop) (``drop_rate`` p̄,
``strength`` γ), so flat, redundant tensors are pruned harder and sparse, critical ones kept.

- ``budget: median`` (default): d_ref is the median d over the task's tensors, so the median
  tensor is dropped at exactly p̄; the realised element-weighted rate is reported.
- ``budget: elements``: d_ref is found by bisection so the element-weighted mean drop rate over
  the tensors that get a rate equals p̄ (equal-sparsity comparisons). Beware: one huge
  heavy-tailed tensor (a word embedding) then forces every other tensor towards ``max_drop``.

Selection keeps the largest (1 - p_i) fraction (``mode: magnitude``, exact count, ties by index)
or a seeded Bernoulli(1 - p_i) mask (``mode: random``; the default under the DARE methods). Kept
values are scaled by ||tau||₂ / ||kept||₂ (``rescale: l2``; ``none`` for the ablation; no scaling
when either norm is below 1e-12). γ = 0 gives the uniform sparsifier exactly (same kept entries
as ``magnitude``/``random`` at density 1 - p̄). Tensors matching ``skip`` globs, and tensors with
Q_high = 0 (all zero or mostly zero), are kept as they are.

Large CPU tensors (``chunked``) take the magnitude mode without ever making tau whole
(``TADropStep``): the same kept set from a streamed top-k, ||kept|| from one more pass over the
chunks in ``Float64Norm``'s bits (``streamnorm``), and ||tau|| from the stats pass, which computes
it beside d (and caches both). The random mode is drawn on the whole tensor.

The mapping from d to p is the paper's open point (its formula is not public); it lives in
``drop_rate_for`` alone so another mapping can be dropped in.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import RecipeError
from ..numerics import Float64Norm
from ..registry import SPARSIFIERS, Param, Sparsifier
from ..selection import keep_count_from_drop, keep_fraction_from_drop, quantile_ratio, quantiles, topk_mask
from ..statspass import UNCACHED, StatsPass
from ..streamnorm import StreamedNorm, float64_norm
from ..streamselect import BandStep

NORM_EPS = 1e-12


def drop_rate_for(d: float, d_ref: float, target: float, strength: float, min_drop: float,
                  max_drop: float) -> float:
    """The replaceable mapping: p = clip(target * (d / d_ref)^strength, min_drop, max_drop)."""
    if strength == 0.0:
        ratio = 1.0
    elif d_ref <= 0.0:
        ratio = 1.0 if d <= 0.0 else math.inf
    else:
        ratio = (d / d_ref) ** strength
    return min(max_drop, max(min_drop, target * ratio))


@dataclass
class TensorDrop:
    """What the stats pass decided for one tensor of one task vector."""

    numel: int
    d: float | None
    drop_rate: float
    skipped: bool
    norm: float | None = None  # ||tau||, Float64Norm of the whole task vector (l2 rescale)


def _skip(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def median(values: list[float]) -> float:
    """Linear-interpolation median (rank 0.5 (n - 1)), the same convention as ``quantiles``."""
    return quantiles(torch.tensor(values, dtype=torch.float64), [0.5])[0]


class TADropStats(StatsPass):
    """Per task vector: d of every tensor, then d_ref and every tensor's drop rate."""

    passes = 1

    def __init__(self, budget: str = "median"):
        self.budget = budget
        # name -> (numel, d, skipped, params, ||tau|| or None when skipped)
        self.entries: dict[str, tuple[int, float | None, bool, dict[str, Any], float | None]] = {}
        self.result: dict[str, TensorDrop] = {}
        self.d_ref: float | None = None

    def observe(self, pass_index: int, name: str, delta: torch.Tensor,
                params: dict[str, Any]) -> None:
        skipped = _skip(name, params.get("skip") or [])
        d = None if skipped or delta.numel() == 0 else quantile_ratio(delta, *params["quantiles"])
        # ||tau|| as l2_rescale computes it, so the chunked path never needs tau whole
        norm = None if skipped else float64_norm(delta.contiguous())
        self.entries[name] = (delta.numel(), d, skipped, params, norm)

    def cache_tag(self, params: dict[str, Any]) -> str | None:
        """d and ||tau|| depend on the task vector and the quantile levels only (a skipped
        tensor's on nothing), so a sweep over drop_rate, strength, budget or clipping reuses
        them."""
        return f"tadrop-d-norm:{list(params['quantiles'])!r}"

    def observed(self, name: str) -> Any:
        _, d, skipped, _, norm = self.entries[name]
        return UNCACHED if skipped else [d, norm]  # a skipped tensor's were never computed

    def cached_ok(self, value: Any) -> bool:
        """[d, ||tau||]: d a finite number or None, the norm a finite number >= 0."""
        return (isinstance(value, list) and len(value) == 2 and super().cached_ok(value[0])
                and value[1] is not None and super().cached_ok(value[1]) and value[1] >= 0)

    def observe_cached(self, pass_index: int, name: str, value: Any, numel: int,
                       params: dict[str, Any]) -> None:
        skipped = _skip(name, params.get("skip") or [])
        d, norm = (None, None) if skipped else value
        self.entries[name] = (numel, d, skipped, params, norm)

    def _rates(self, d_ref: float) -> dict[str, float]:
        return {name: drop_rate_for(d, d_ref, p["drop_rate"], p["strength"], p["min_drop"],
                                    p["max_drop"])
                for name, (_, d, _, p, _) in self.entries.items() if d is not None}

    def end_pass(self, pass_index: int) -> None:
        ds = [d for _, d, _, _, _ in self.entries.values() if d is not None]
        rates: dict[str, float] = {}
        if ds:
            self.d_ref = median(ds) if self.budget == "median" else self._solve_elements()
            rates = self._rates(self.d_ref)
        self.result = {n: TensorDrop(k, d, rates.get(n, 0.0), s, norm)
                       for n, (k, d, s, _, norm) in self.entries.items()}

    def _solve_elements(self) -> float:
        """d_ref such that the element-weighted mean drop rate equals the target (bisection)."""
        rated = [(k, d, p) for k, d, _, p, _ in self.entries.values() if d is not None]
        total = sum(k for k, _, _ in rated)
        target = sum(k * p["drop_rate"] for k, _, p in rated) / total

        def mean_rate(d_ref: float) -> float:
            return sum(k * drop_rate_for(d, d_ref, p["drop_rate"], p["strength"], p["min_drop"],
                                         p["max_drop"]) for k, d, p in rated) / total

        positive = [d for _, d, _ in rated if d > 0] or [1.0]
        lo, hi = math.log(min(positive)) - 60.0, math.log(max(positive)) + 60.0
        # mean_rate decreases as d_ref grows; bisect on log d_ref.
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if mean_rate(math.exp(mid)) > target:
                lo = mid
            else:
                hi = mid
        return math.exp(0.5 * (lo + hi))

    def for_tensor(self, name: str) -> TensorDrop | None:
        return self.result.get(name)

    def realised_drop_rate(self) -> float:
        """Element-weighted mean drop rate over every observed tensor (skipped ones count as 0)."""
        total = sum(r.numel for r in self.result.values())
        return sum(r.numel * r.drop_rate for r in self.result.values()) / max(total, 1)


def rescale_factor(before: float, after: float) -> float | None:
    """||tau|| / ||kept||, or None (no scaling) when either norm is below ``NORM_EPS``."""
    if before < NORM_EPS or after < NORM_EPS:
        return None
    return before / after


def l2_rescale(delta: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Scale ``kept`` so its L2 norm equals ``delta``'s; returns the tensor and the factor."""
    norm = Float64Norm()  # the same float64 norms, through one reused buffer
    factor = rescale_factor(norm(delta), norm(kept))
    if factor is None:
        return kept, 1.0
    return kept * factor, factor


def tadrop(delta: torch.Tensor, *, drop_rate: float = 0.8, strength: float = 1.0,
           quantiles: list[float] | None = None, min_drop: float = 0.0, max_drop: float = 0.99,
           mode: str = "magnitude", rescale: str = "l2", skip: list[str] | None = None,
           budget: str = "median", generator: torch.Generator | None = None,
           stats: TensorDrop | None = None, info: dict[str, Any] | None = None) -> torch.Tensor:
    """Drop this tensor at the rate the stats pass assigned it (kept as is without one)."""
    if stats is None or stats.skipped or stats.d is None or stats.drop_rate <= 0.0:
        if info is not None and stats is not None:
            info.update(d=stats.d, drop_rate=0.0, rescale=1.0)
        return delta
    p = stats.drop_rate
    n = delta.numel()
    if mode == "magnitude":
        mask = topk_mask(delta.abs(), keep_count_from_drop(p, n))
    else:
        if generator is None:
            raise ValueError("tadrop mode=random needs a seeded generator")
        mask = (torch.rand(delta.shape, generator=generator, dtype=torch.float32)
                < keep_fraction_from_drop(p)).to(delta.device)
    kept = delta * mask
    factor = 1.0
    if rescale == "l2":
        kept, factor = l2_rescale(delta, kept)
    if info is not None:
        info.update(d=stats.d, drop_rate=p, rescale=factor)
    return kept


class TADropStep:
    """TADrop's streamed form (``mode: magnitude``) for ``chunked``: the stats pass' keep count
    as a top-k ``BandStep`` (the set of ``topk_mask``), ||kept|| in ``Float64Norm``'s bits
    (``StreamedNorm``) and ||tau|| from the stats pass, so the rescale factor, and every kept
    value, are the whole-tensor path's. While the threshold is unknown, every |tau| at or above
    its sampled bracket (a superset of the kept set) is stored for the norm, and the rule
    zeroes the rest once known: no second pass over the chunks."""

    def __init__(self, n: int, sample_of: Any, stats: TensorDrop, rescale: str):
        self.stats, self.rescale = stats, rescale
        keep = keep_count_from_drop(stats.drop_rate, n)
        self.band = BandStep(n, sample_of, keep)
        rank = self.band.search.ranks.get(keep)
        self.floor = rank.lo if rank is not None else -math.inf  # T >= floor if the bracket hits
        self.n = n
        self.norm: StreamedNorm | None = None
        self.factor: float | None = None

    def feed(self, part: slice, magnitude: torch.Tensor) -> None:
        self.band.feed(part, magnitude)
        if self.rescale == "l2":
            if self.norm is None:
                self.norm = StreamedNorm(self.n, magnitude.dtype)
            candidates = torch.ge(magnitude, self.floor, out=torch.empty_like(magnitude))
            self.norm.add(part, candidates.mul_(magnitude))

    def ready(self, magnitude_at: Any) -> bool:
        if not self.band.ready(magnitude_at):
            return False
        if self.rescale == "l2":
            assert self.stats.norm is not None and self.norm is not None
            rule = self.band.rules[0]
            if rule.threshold < self.floor:  # never when the bracket hit; then no streamed form
                return False
            self.factor = rescale_factor(self.stats.norm, self.norm.value(
                lambda part, v, at: v.mul_(_rule_on(rule, part, v, at))))
        return True

    def apply(self, delta: torch.Tensor, magnitude: torch.Tensor, part: slice) -> torch.Tensor:
        kept = self.band.apply(delta, magnitude, part)
        return kept if self.factor is None else kept.mul_(self.factor)

    def report(self) -> dict[str, Any]:
        """What ``tadrop`` puts in ``info``."""
        factor = 1.0 if self.factor is None else self.factor
        return {"d": self.stats.d, "drop_rate": self.stats.drop_rate, "rescale": factor}


def _rule_on(rule: Any, part: slice, values: torch.Tensor, indices: Any) -> torch.Tensor:
    """``KeepRule.mask`` on values stored from chunk ``part`` (not all of it, so the tie cut
    goes by their flat ``indices()``), as the same ``ge`` / ``gt`` comparisons."""
    if part.stop <= rule.cut:
        return torch.ge(values, rule.threshold)
    if part.start >= rule.cut:
        return torch.gt(values, rule.threshold)
    return torch.where(indices() < rule.cut, torch.ge(values, rule.threshold),
                       torch.gt(values, rule.threshold))


def _streamed(n: int, sample_of: Any, *, mode: str = "magnitude", rescale: str = "l2",
              stats: TensorDrop | None = None, **_: Any) -> TADropStep | None:
    """The streamed form where one exists: a magnitude mask at a positive drop rate (a random
    one, and a tensor kept as it is, take the whole-tensor path)."""
    if (mode != "magnitude" or stats is None or stats.skipped or stats.d is None
            or stats.drop_rate <= 0.0 or (rescale == "l2" and stats.norm is None)):
        return None
    return TADropStep(n, sample_of, stats, rescale)


def _check_quantiles(value: list[float]) -> str | None:
    if len(value) != 2 or not 0.0 <= value[0] < value[1] <= 1.0:
        return "needs two levels [low, high] with 0 <= low < high <= 1"
    return None


def _stats(budget: str = "median", min_drop: float = 0.0, max_drop: float = 0.99,
           **_: Any) -> StatsPass:
    if min_drop > max_drop:
        raise RecipeError(f"tadrop: min_drop ({min_drop}) is above max_drop ({max_drop})")
    return TADropStats(budget)


SPARSIFIERS.register(Sparsifier(
    name="tadrop",
    func=tadrop,
    params=(
        Param("drop_rate", 0.8, float, "target mean drop rate p̄ (the median tensor's rate)",
              low=0.0, high=1.0, high_open=True),
        Param("strength", 1.0, float, "γ: how strongly d moves the rate (0 = uniform)", low=0.0),
        Param("quantiles", [0.5, 0.95], list, "quantile levels [low, high] of d = Q_low/Q_high",
              item_kind=float, validate=_check_quantiles),
        Param("min_drop", 0.0, float, "lowest drop rate of any tensor", low=0.0, high=1.0,
              high_open=True),
        Param("max_drop", 0.99, float, "highest drop rate of any tensor", low=0.0, high=1.0,
              high_open=True),
        Param("mode", "magnitude", str, "keep the largest |tau| or a seeded random subset",
              choices=("magnitude", "random")),
        Param("rescale", "l2", str, "scale kept values to the tensor's L2 norm, or not",
              choices=("l2", "none")),
        Param("skip", [], list, "glob patterns of tensor names kept dense (e.g. '*embed*')",
              item_kind=str),
        Param("budget", "median", str, "d_ref = median d, or solved so the element-weighted "
              "mean drop rate equals drop_rate", choices=("median", "elements")),
    ),
    doc=__doc__ or "",
    random=True,
    reports=True,
    stats=_stats,
    streamed=_streamed,
))
