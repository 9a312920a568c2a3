"""Compare a mergekit output directory with a mergewise one, tensor by tensor.

Values are compared in ulps of mergekit's output dtype (the spacing of that dtype at each value,
the smaller of the two values' spacings, so adjacent floats are exactly 1 ulp apart). Vocabulary
tensors are aligned by token string when the recipe builds a tokenizer (mergekit's union ids
are nondeterministic). Only config keys that change the model are compared.
Everything here reads files with the safetensors and tokenizers libraries, never mergewise,
so the harness does not grade mergewise with its own code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")  # mergekit's llama vocab axes
CONFIG_KEYS = ("num_hidden_layers", "vocab_size", "dtype")
Z = 5.0  # standard errors allowed by the distribution checks (see ``compare_distribution``)


@dataclass
class Output:
    """One merge output directory, loaded."""

    path: Path
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    vocab: dict[str, int] | None
    chat_template: str | None

    @property
    def dtype_name(self) -> str | None:
        return self.config.get("dtype") or self.config.get("torch_dtype")


def load_output(path: Path) -> Output:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        if f.name != "modulators.safetensors":
            tensors.update(load_file(f))
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    vocab = None
    if (path / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab(with_added_tokens=True)
    template = None
    if (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text()
    elif (path / "tokenizer_config.json").exists():
        template = json.loads((path / "tokenizer_config.json").read_text()).get("chat_template")
    return Output(path, tensors, config, vocab, template)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at each value of ``x`` (float64): 2^(floor(log2|x|)) * eps, and
    the subnormal spacing below the smallest normal."""
    fi = torch.finfo(dtype)
    _, exp = torch.frexp(x.abs())
    lead = torch.ldexp(torch.ones_like(x), (exp - 1).to(x.dtype))  # 2^floor(log2|x|)
    lead = torch.where(x == 0, torch.full_like(x, fi.tiny), lead).clamp(min=fi.tiny)
    return lead * fi.eps


@dataclass
class TensorDiff:
    name: str
    numel: int
    max_abs: float
    max_ulps: float
    over: int  # entries more than 1 ulp apart
    unexplained: int = 0  # topk: entries over 1 ulp not at a selection threshold
    padding_ulps: float = 0.0  # union with padding: the padding rows' largest gap


@dataclass
class Comparison:
    """What differed; ``problems`` empty means the expectation holds."""

    tensors: list[TensorDiff] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checks: int = 0  # distribution: statistical checks run
    failed_checks: int = 0

    def headline(self) -> str:
        """One line: the first problem, with the worst tensor when entries differ."""
        if not self.problems:
            return ""
        first = self.problems[0].removesuffix("; worst:").removesuffix("; first:")
        if len(self.problems) > 1 and self.problems[0].endswith(":"):
            first += f"; {self.problems[1].strip()}"
        return first

    @property
    def max_abs(self) -> float:
        return max((t.max_abs for t in self.tensors), default=0.0)

    @property
    def max_ulps(self) -> float:
        return max((t.max_ulps for t in self.tensors), default=0.0)

    @property
    def differing(self) -> int:
        return sum(t.over for t in self.tensors)

    @property
    def total(self) -> int:
        return sum(t.numel for t in self.tensors)

    def worst(self, n: int = 3) -> list[TensorDiff]:
        return sorted((t for t in self.tensors if t.over), key=lambda t: -t.max_ulps)[:n]


def _row_order(mk: Output, mw: Output, rows_mk: int, rows_mw: int) -> torch.Tensor | str:
    """Index into mergewise's rows for each of mergekit's rows (by token string; padding rows
    past the vocabulary by position), or a one-line reason they cannot be aligned."""
    if mk.vocab is None or mw.vocab is None:
        return "an output has no tokenizer.json to align vocabulary rows"
    if rows_mk != rows_mw:
        return f"{rows_mk} vocabulary rows in mergekit's output, {rows_mw} in mergewise's"
    by_id = {i: tok for tok, i in mk.vocab.items()}
    order, missing = [], []
    for i in range(rows_mk):
        tok = by_id.get(i)
        if tok is None:
            order.append(i)
        elif tok in mw.vocab and mw.vocab[tok] < rows_mw:
            order.append(mw.vocab[tok])
        else:
            missing.append(tok)
            order.append(i)
    if missing:
        return f"tokens {missing[:4]} of mergekit's vocabulary have no row in mergewise's output"
    return torch.tensor(order)


Explainer = Callable[[str, torch.Tensor], torch.Tensor]


def compare_outputs(mk: Output, mw: Output, *, by_token: bool = False,
                    explain: Explainer | None = None) -> Comparison:
    """Every tensor within 1 ulp of mergekit's dtype; with ``explain`` (topk), entries beyond
    1 ulp are allowed where ``explain(name, over_mask)`` says they sit at a threshold."""
    cmp = Comparison()
    missing = sorted(set(mk.tensors) - set(mw.tensors))
    extra = sorted(set(mw.tensors) - set(mk.tensors))
    if missing:
        cmp.problems.append(f"{len(missing)} tensor(s) missing from mergewise's output: {missing[:3]}")
    if extra:
        cmp.problems.append(f"{len(extra)} extra tensor(s) in mergewise's output: {extra[:3]}")
    for key in CONFIG_KEYS:
        a = mk.dtype_name if key == "dtype" else mk.config.get(key)
        b = mw.dtype_name if key == "dtype" else mw.config.get(key)
        if a != b:
            cmp.problems.append(f"config.json {key}: mergekit {a!r}, mergewise {b!r}")
    if _rendered(mk.chat_template) != _rendered(mw.chat_template):
        cmp.problems.append("chat template renders differently: mergekit "
                            f"{_short(mk.chat_template)}, mergewise {_short(mw.chat_template)}")
    dtype_notes: list[str] = []
    for name in sorted(set(mk.tensors) & set(mw.tensors)):
        a, b = mk.tensors[name], mw.tensors[name]
        if a.dtype != b.dtype:
            dtype_notes.append(f"{name}: {str(a.dtype)[6:]} vs {str(b.dtype)[6:]}")
        if by_token and name in VOCAB_TENSORS:
            order = _row_order(mk, mw, a.shape[0], b.shape[0])
            if isinstance(order, str):
                cmp.problems.append(f"{name}: {order}")
                continue
            b = b[order]
        if a.shape != b.shape:
            cmp.problems.append(f"{name}: shape {list(a.shape)} (mergekit) vs {list(b.shape)}")
            continue
        padded = _padding_rows(mk, a.shape[0]) if by_token and name in VOCAB_TENSORS else 0
        diff = _diff(name, a, b, explain, padded)
        if padded and diff.padding_ulps:
            cmp.notes.append(f"{name}: the {padded} padding rows agree to "
                             f"{diff.padding_ulps:.3g} ulp (each is a mean over the rows in that "
                             "tool's token order; mergekit's new-token order varies per run)")
        cmp.tensors.append(diff)
    if dtype_notes:
        cmp.problems.append(f"tensor dtype differs in {len(dtype_notes)} tensor(s), e.g. "
                            f"{dtype_notes[0]} (mergekit vs mergewise)")
    over = [t for t in cmp.tensors if (t.unexplained if explain else t.over)]
    if over:
        n = sum(t.unexplained if explain else t.over for t in over)
        what = "not at a top-k threshold" if explain else "more than 1 ulp apart"
        cmp.problems.append(f"{n} of {cmp.total} entries {what}, in {len(over)} tensor(s); worst:")
        for t in sorted(over, key=lambda t: -t.max_ulps)[:3]:
            cmp.problems.append(f"  {t.name}: max |diff| {t.max_abs:.3g} ({t.max_ulps:.3g} ulp), "
                                f"{t.over}/{t.numel} entries over 1 ulp")
    if explain is not None and cmp.differing:
        cmp.notes.append(f"{cmp.differing} entries differ at a top-k threshold (tie or k rounding)")
    return cmp


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]


def _rendered(template: str | None) -> str | None:
    """What a template renders for a fixed conversation, as transformers renders chat templates
    (jinja2 with trim_blocks and lstrip_blocks): equal renderings are the same template."""
    if template is None:
        return None
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=CONVERSATION, add_generation_prompt=True)


def _short(text: str | None) -> str:
    return "none" if text is None else f"{len(text)} chars starting {text[:30]!r}"


PADDING_ULPS = 8.0  # a mean of ~260 rows summed in another order: a few roundings


def _padding_rows(mk: Output, rows: int) -> int:
    """Rows past the vocabulary (pad_to_multiple_of) in mergekit's output."""
    return max(0, rows - len(mk.vocab)) if mk.vocab is not None else 0


def _diff(name: str, a: torch.Tensor, b: torch.Tensor, explain: Explainer | None,
          padded: int = 0) -> TensorDiff:
    x, y = a.double(), b.double()
    same = (x == y) | (torch.isnan(x) & torch.isnan(y))
    gap = torch.where(same, torch.zeros_like(x), (x - y).abs())
    spacing = torch.minimum(ulp(x, a.dtype), ulp(y, a.dtype))
    ulps = torch.where(same, torch.zeros_like(x), gap / spacing)
    ulps = torch.nan_to_num(ulps, nan=math.inf)
    padding_ulps = 0.0
    if padded:  # padding rows: within PADDING_ULPS, reported, not counted as over
        pad = ulps[-padded:]
        padding_ulps = float(pad.max())
        ulps = ulps.clone()
        ulps[-padded:] = torch.where(pad <= PADDING_ULPS, torch.zeros_like(pad), pad)
    over = ulps > 1.0
    unexplained = 0
    if explain is not None and bool(over.any()):
        unexplained = int((over & ~explain(name, over)).sum())
    return TensorDiff(name, a.numel(), float(torch.nan_to_num(gap, nan=math.inf).max()) if a.numel() else 0.0,
                      float(ulps.max()) if a.numel() else 0.0, int(over.sum()), unexplained,
                      padding_ulps)


# --- top-k thresholds --------------------------------------------------------------------

def round_half_up(fraction: float, n: int) -> int:
    """mergewise's documented keep count: round-half-up(fraction * n), exact in rationals."""
    return int(Fraction(repr(float(fraction))) * n + Fraction(1, 2))


def _band(sorted_desc: torch.Tensor, k1: int, k2: int) -> tuple[float, float] | None:
    """|delta| values between the two tools' k-th largest (the entries a k rounding or a tie
    can move in or out); None when neither cuts."""
    n = sorted_desc.numel()
    ks = [k for k in (k1, k2) if 0 < k < n]
    if not ks:
        return None
    lo = float(sorted_desc[max(min(max(k1, k2), n), 1) - 1])
    hi = float(sorted_desc[max(min(k1, k2), 1) - 1]) if min(k1, k2) > 0 else math.inf
    return lo, hi


def magnitude_cuts(n: int, density: float) -> list[tuple[int, int]]:
    """(mergekit k, mergewise k) for TIES' magnitude trim."""
    if density >= 1.0:
        return []
    return [(max(1, int(density * n)), max(1, round_half_up(density, n)))]


def breadcrumbs_cuts(n: int, density: float, gamma: float) -> list[tuple[int, int]]:
    """(mergekit, mergewise) descending ranks where breadcrumbs cuts: the outliers' end and the
    kept band's end. mergekit keeps ascending positions [bot, bot + int(d n)) with
    bot = max(0, n - int(d n) - int(g n)); mergewise drops round(g n) (< n) and keeps the next
    round(d n) (at least 1, capped by what is left)."""
    if density >= 1.0:
        return []
    target = int(density * n)
    bot = max(0, n - target - int(gamma * n))
    mk_top, mk_end = n - bot - target, n - bot
    outliers = min(round_half_up(gamma, n), n - 1)
    kept = min(max(1, round_half_up(density, n)), n - outliers)
    return [(mk_top, outliers), (mk_end, outliers + kept)]


def threshold_explainer(deltas: Callable[[str], list[tuple[torch.Tensor, list[tuple[int, int]]]]]
                        ) -> Explainer:
    """``explain(name, over)``: True where some model's |delta| lies in the band between the
    two tools' thresholds of one of its cuts. ``deltas(name)`` gives each model's delta (in the
    compute dtype) and its cuts."""

    def explain(name: str, over: torch.Tensor) -> torch.Tensor:
        ok = torch.zeros_like(over)
        for delta, cuts in deltas(name):
            mag = delta.abs().float().reshape(over.shape)
            ordered = torch.sort(mag.flatten(), descending=True).values
            for k_mk, k_mw in cuts:
                band = _band(ordered, k_mk, k_mw)
                if band is not None:
                    ok |= (mag >= band[0]) & (mag <= band[1])
        return ok

    return explain


# --- distributions -----------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """One tool's merged delta of one tensor (float64, output minus base), and the input delta
    when the recipe has a single non-base model (then the kept mask and rescale factor are
    recoverable). ``atol``: the rounding of the output (a few ulps of its largest value)."""

    merged: torch.Tensor
    single: torch.Tensor | None = None
    atol: float = 0.0


def _moments_problems(name: str, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    """Changed fraction, mean and second moment of two tools' merged deltas.

    Under the null hypothesis (same distribution per entry, independent draws), entry j of the
    two tools are i.i.d., so Var(mean_x - mean_y) = 2 sum_j Var(X_j)/n^2 <= (sum x^2 + sum y^2)/n^2
    (the second moment bounds the variance; the observed sums estimate it), and likewise with
    fourth powers for the second moment. The changed fraction is a difference of two binomial
    proportions. Z = 5 standard errors: with ~40 tensors x 4 statistics x 4 recipes, a false
    alarm has probability ~1e-4 per run, while a missing rescale (factor 1/density on the
    second moment) or a 2x normalisation difference is tens of standard errors away on every
    matrix."""
    n = x.numel()
    out = []
    fx, fy = float((x != 0).double().mean()), float((y != 0).double().mean())
    f = (fx + fy) / 2
    se = math.sqrt(max(f * (1 - f), 1 / n) * 2 / n)
    if abs(fx - fy) > Z * se + 1 / n:
        out.append(f"{name}: changed fraction {fx:.4f} (mergekit) vs {fy:.4f}, {abs(fx - fy) / se:.1f} SE")
    se_mean = math.sqrt(float((x * x).sum() + (y * y).sum())) / n
    if se_mean > 0 and abs(float(x.mean() - y.mean())) > Z * se_mean:
        out.append(f"{name}: mean delta {float(x.mean()):.3g} vs {float(y.mean()):.3g}, "
                   f"{abs(float(x.mean() - y.mean())) / se_mean:.1f} SE")
    m2x, m2y = float((x * x).mean()), float((y * y).mean())
    se_m2 = math.sqrt(float((x ** 4).sum() + (y ** 4).sum())) / n
    if se_m2 > 0 and abs(m2x - m2y) > Z * se_m2:
        out.append(f"{name}: mean square delta {m2x:.3g} vs {m2y:.3g} (ratio {m2y / m2x if m2x else math.inf:.3f}), "
                   f"{abs(m2x - m2y) / se_m2:.1f} SE")
    return out


def _recovered(s: Sample) -> tuple[torch.Tensor, float, float]:
    """(kept mask, coefficient c = merged/delta on kept entries, max |merged - c delta| in
    units of the output's rounding ``atol``)."""
    assert s.single is not None
    kept = (s.merged != 0) & (s.single != 0)
    if not bool(kept.any()):
        return kept, 0.0, 0.0
    c = float((s.merged[kept] / s.single[kept]).median())
    residual = float((s.merged[kept] - c * s.single[kept]).abs().max())
    return kept, c, residual / s.atol if s.atol else residual


def _l1_factor(delta: torch.Tensor, kept: torch.Tensor) -> float:
    after = float(delta[kept].abs().sum())
    return float(delta.abs().sum()) / after if after else math.nan


def _single_problems(name: str, mk: Sample, mw: Sample) -> list[str]:
    """One model: the kept fraction in each half of the per-row magnitude ranks (della keeps
    large entries more often), and the rescale rule: merged = c * delta on kept entries. With
    L1-norm matching (mergekit's ``rescale: true``) c / (L1 factor of the kept mask) is the
    recipe's constant (weight, lambda), so it must agree between the tools although the masks
    differ; without rescaling, c itself is that constant. Agreement of either (to 1e-4, far
    below the ~1% sampling spread of an L1 factor) passes; a 1/density rescale against L1
    matching agrees in neither."""
    assert mk.single is not None and mw.single is not None
    out = []
    rows = mk.single.reshape(-1, mk.single.shape[-1]) if mk.single.ndim > 1 else mk.single.reshape(1, -1)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).reshape(mk.single.shape)
    top = ranks >= (rows.shape[1] // 2)
    stats = {}
    for tool, s in (("mergekit", mk), ("mergewise", mw)):
        kept, c, residual = _recovered(s)
        if residual > 1.0:
            out.append(f"{name}: {tool}'s merged delta is not one factor times the input delta "
                       f"on kept entries (residual {residual:.3g} x the output rounding)")
        stats[tool] = (kept, c, c / _l1_factor(s.single, kept) if c else 0.0)  # type: ignore[arg-type]
    for part, sel in (("top half", top), ("bottom half", ~top)):
        m = int(sel.sum())
        if m == 0:
            continue
        fx = float(stats["mergekit"][0][sel].double().mean())
        fy = float(stats["mergewise"][0][sel].double().mean())
        f = (fx + fy) / 2
        se = math.sqrt(max(f * (1 - f), 1 / m) * 2 / m)
        if abs(fx - fy) > Z * se + 1 / m:
            out.append(f"{name}: kept fraction ({part} of row ranks) {fx:.4f} (mergekit) vs {fy:.4f}, "
                       f"{abs(fx - fy) / se:.1f} SE")
    (_, ck, rk), (_, cw, rw) = stats["mergekit"], stats["mergewise"]

    def agree(a: float, b: float) -> bool:
        return a == b or (a != 0 and abs(b / a - 1) <= 1e-4)

    if not (agree(ck, cw) or agree(rk, rw)):
        out.append(f"{name}: rescale rule differs: merged/delta = {cw:.6g} in mergewise, {ck:.6g} in "
                   f"mergekit; per L1 factor of the kept mask {rw:.6g} vs {rk:.6g} (ratio "
                   f"{rw / rk if rk else math.inf:.5f})")
    return out


def compare_distribution(mk: Output, mw: Output, samples: Callable[[str, Output], Sample]) -> Comparison:
    """Random methods: per tensor moments (and, with one model, mask and rescale) of the merged
    delta; the tensor list and config as for exact entries."""
    cmp = Comparison()
    names = sorted(set(mk.tensors) & set(mw.tensors))
    if set(mk.tensors) != set(mw.tensors):
        cmp.problems.append(f"tensor names differ: {sorted(set(mk.tensors) ^ set(mw.tensors))[:3]}")
    for key in CONFIG_KEYS:
        a = mk.dtype_name if key == "dtype" else mk.config.get(key)
        b = mw.dtype_name if key == "dtype" else mw.config.get(key)
        if a != b:
            cmp.problems.append(f"config.json {key}: mergekit {a!r}, mergewise {b!r}")
    found: list[str] = []
    for name in names:
        a, b = samples(name, mk), samples(name, mw)
        diff = _diff(name, mk.tensors[name], mw.tensors[name], None)
        cmp.tensors.append(diff)
        found += _moments_problems(name, a.merged, b.merged)
        cmp.checks += 3
        if a.single is not None:
            found += _single_problems(name, a, b)
            cmp.checks += 3
    cmp.failed_checks = len(found)
    if found:
        cmp.problems.append(f"{len(found)} distribution check(s) failed; first:")
        cmp.problems += [f"  {p}" for p in found[:4]]
    return cmp
