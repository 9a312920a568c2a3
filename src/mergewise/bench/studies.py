"""The benchmark's studies: the questions the TADrop paper leaves open, answered on our zoo.

- ``matched``: TADrop against the uniform sparsifier at the *same* target drop rate p̄, in front
  of each method, under both budgets (``median``, ``elements``), with the realised sparsity.
- ``ablation``: TADrop's L2 rescale off (``rescale: none``) and its ``strength`` γ swept over
  0, 0.5, 1, 2 (γ = 0 is uniform magnitude drop plus the L2 rescale).
- ``tasks``: average accuracy when merging 2, 4 and 6 tasks (TA, TIES, each + TADrop).

Protocol (why):
- Every arm tunes λ (and nothing it compares on) on validation, then is scored once on test.
- Spread: "seed s" is a redraw of the validation split used for selection: each task's
  validation examples are resampled with replacement (a bootstrap draw, seeded). Each candidate
  is evaluated once and its per-example correctness cached, so re-selection under another seed
  costs nothing; only a newly selected candidate costs a test evaluation. Random sparsifiers
  (DARE, TADrop ``mode: random``) keep seed 0's masks unless ``RESEED_RANDOM_MASKS`` (then they
  redraw them with seed s, at three times the cost). We report mean ± s.d. over
  seeds, and, for each gain, the paired bootstrap s.d. of the test-set estimate (test examples
  resampled within each task), because test sets of 300-1000 examples are themselves noisy.
- ``tasks`` uses the main run's protocol (full validation split, no reseeding) on seeded task
  subsets; the spread there is over which tasks are merged.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..registry import METHODS, SPARSIFIERS
from .report import selected_text
from .runner import (
    TADROP,
    Grids,
    ResultCache,
    RunConfig,
    Variant,
    Zoo,
    _Session,
    load_zoo,
    merge,
    merge_spec,
    paper_settings,
    realised_drop_rate,
    run_context,
    variant,
)
from .spread import bits as _bits
from .spread import unbits as _unbits

STUDIES = ("matched", "ablation", "tasks")
SEEDS = (0, 1, 2)
LAMBDA_SUM = (0.3, 0.5, 0.7, 1.0)  # the main grid's neighbourhood of every selected value
LAMBDA_MEAN = (0.6, 1.0, 1.4, 1.8)
# breadcrumbs is left out: TADrop replaces its whole trim step and its merge is TA's sum, so
# "breadcrumbs + tadrop" is exactly "task_arithmetic + tadrop" (the main table shows both).
MATCHED_METHODS = ("task_arithmetic", "ties", "dare_ties")
ABLATION_METHODS = ("ties",)  # the best data-free merge on validation
# True: random sparsifiers (DARE) also redraw their masks with seed s. Off by default: it triples
# those arms' merges and evaluations, more than a 2-core run can afford next to everything else.
RESEED_RANDOM_MASKS = False
STRENGTHS = (0.0, 0.5, 1.0, 2.0)
DROP_RATE = 0.9  # the p̄ (and TIES 1 - density) the main run selected on validation
TASK_COUNTS = (2, 4)  # 6 = all tasks, from the same grid
TASK_SUBSET_SEEDS = (0, 1)  # two seeded subsets per size
TASKS_GRIDS = Grids(lambda_sum=(0.3, 0.5, 1.0), lambda_mean=(0.6, 1.0, 1.4),
                    density={"magnitude": (0.1,)}, drop_rate=(0.9,))
TASKS_METHODS = ("task_arithmetic", "task_arithmetic" + TADROP, "ties", "ties" + TADROP)
BOOTSTRAP = 1000


def _lambdas(method: str) -> tuple[float, ...]:
    names = {p.name for p in METHODS.get(method).params}
    return LAMBDA_MEAN if "aggregate" in names else LAMBDA_SUM


def arm(label: str, method: str, parameters: dict[str, Any] | None = None,
        sparsify: dict[str, Any] | None = None) -> Variant:
    fixed = {**paper_settings(method, Grids(), sparsify is not None), **(parameters or {})}
    return Variant(label, method, fixed, sparsify, (("lambda", _lambdas(method)),))


def uniform_arm(method: str, p: float) -> Variant:
    """The method with its usual uniform trim at density 1 - p̄ (TA: its magnitude top-k)."""
    return arm(f"{method} (uniform)", method, {"density": round(1.0 - p, 6)})


def tadrop_arm(method: str, p: float, **settings: Any) -> Variant:
    extra = "".join(f", {k}={v}" for k, v in settings.items())
    return arm(f"{method} + tadrop({p:g}{extra})", method,
               sparsify={"method": "tadrop", "drop_rate": p, **settings})


def matched_arms(p: float = DROP_RATE) -> list[tuple[str, list[Variant]]]:
    return [(m, [uniform_arm(m, p), tadrop_arm(m, p), tadrop_arm(m, p, budget="elements")])
            for m in MATCHED_METHODS]


def ablation_arms(p: float = DROP_RATE) -> list[tuple[str, list[Variant]]]:
    return [(m, [*(tadrop_arm(m, p, strength=g) if g != 1.0 else tadrop_arm(m, p) for g in STRENGTHS),
                 tadrop_arm(m, p, rescale="none")]) for m in ABLATION_METHODS]


def is_random(v: Variant) -> bool:
    """Whether the merge draws random masks (then the merge seed is part of the arm)."""
    method = METHODS.get(v.method)
    name = v.sparsify["method"] if v.sparsify else method.sparsifier
    if name is None:
        return False
    sp = SPARSIFIERS.get(name)
    modes = [p for p in sp.params if p.name == "mode"]
    if not modes:  # a sparsifier without a mode switch is random or not, full stop
        return sp.random
    given = v.sparsify or {}
    return given.get("mode", method.block_defaults.get("mode", modes[0].default)) == "random"


# ---------------------------------------------------------------- per-example evaluations
def val_redraw(sizes: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    """Seed s's validation split: each task's examples resampled with replacement."""
    g = torch.Generator().manual_seed(7919 + seed)
    return {t: torch.randint(0, n, (n,), generator=g) for t, n in sizes.items()}


def _avg(correct: dict[str, torch.Tensor], idx: dict[str, torch.Tensor] | None = None) -> float:
    accs = [float((c if idx is None else c[idx[t]]).float().mean()) for t, c in correct.items()]
    return sum(accs) / len(accs)


def paired_bootstrap_sd(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], reps: int = BOOTSTRAP,
                        seed: int = 0) -> float:
    """S.d. of avg(a) - avg(b) when test examples are resampled within each task (paired)."""
    g = torch.Generator().manual_seed(seed)
    diffs = torch.zeros(reps, dtype=torch.float64)
    for t in a:
        n = len(a[t])
        idx = torch.randint(0, n, (reps, n), generator=g)
        da = a[t].double()[idx].mean(1)
        db = b[t].double()[idx].mean(1)
        diffs += (da - db) / len(a)
    return float(diffs.std())


@dataclass
class ArmResult:
    label: str
    method: str
    seeds: dict[int, dict[str, Any]]  # seed -> selected, val, test (avg), bits

    def test_avgs(self) -> list[float]:
        return [s["test_average"] for s in self.seeds.values()]


class StudySession:
    """Cached per-example evaluations of arms, with selection under each validation redraw."""

    def __init__(self, zoo: Zoo, cache: ResultCache, log: Callable[[str], None]):
        self.zoo, self.cache, self.log = zoo, cache, log
        self.evaluations = 0

    def _spec(self, v: Variant, cand: dict[str, Any], seed: int, split: str) -> dict[str, Any]:
        reseed = RESEED_RANDOM_MASKS and is_random(v)
        return {"study": 1, **merge_spec(v, cand, split), "merge_seed": seed if reseed else 0}

    def _evaluate(self, v: Variant, cand: dict[str, Any], seed: int, split: str) -> dict[str, Any]:
        spec = self._spec(v, cand, seed, split)
        hit = self.cache.get("study", spec)
        if hit is not None:
            return hit
        records: list[dict[str, Any]] = []
        merged, secs = merge(self.zoo, v, cand, spec["merge_seed"], records)
        evaluator = self.zoo.val if split == "val" else self.zoo.test
        t0 = time.perf_counter()
        correct = evaluator.correct(merged, self.zoo.heads)
        result = {"bits": _bits(correct), "merge_seconds": secs,
                  "eval_seconds": time.perf_counter() - t0,
                  "realised_drop_rate": realised_drop_rate(records)}
        self.cache.put("study", spec, result)
        self.evaluations += 1
        return result

    def run_arm(self, v: Variant, seeds: Sequence[int] | None = None) -> ArmResult:
        sizes = self.zoo.val.sizes()
        out: dict[int, dict[str, Any]] = {}
        for seed in SEEDS if seeds is None else seeds:
            redraw = val_redraw(sizes, seed)
            scored = []
            for cand in v.candidates():
                r = self._evaluate(v, cand, seed, "val")
                scored.append((_avg(_unbits(r["bits"]), redraw), cand, r))
            best_score, best, r_val = max(scored, key=lambda x: x[0])  # first of equals
            r_test = self._evaluate(v, best, seed, "test")
            correct = _unbits(r_test["bits"])
            out[seed] = {"selected": best, "val_average": best_score, "test_average": _avg(correct),
                         "test": {t: float(c.float().mean()) for t, c in correct.items()},
                         "realised_drop_rate": r_val["realised_drop_rate"],
                         "merge_seconds": r_val["merge_seconds"], "correct": correct}
        res = ArmResult(v.label, v.method, out)
        avgs = res.test_avgs()
        self.log(f"{v.label}: test avg {100 * statistics.mean(avgs):.2f} ± {100 * statistics.pstdev(avgs):.2f}"
                 f"  (selected: {'; '.join(selected_text(s['selected']) for s in out.values())})")
        return res


def _mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def compare(arm_result: ArmResult, baseline: ArmResult) -> dict[str, float]:
    """Gain of ``arm_result`` over ``baseline``: per-seed test differences and bootstrap s.d."""
    gains = [arm_result.seeds[s]["test_average"] - baseline.seeds[s]["test_average"] for s in arm_result.seeds]
    boot = [paired_bootstrap_sd(arm_result.seeds[s]["correct"], baseline.seeds[s]["correct"], seed=s)
            for s in arm_result.seeds]
    mean, sd = _mean_sd(gains)
    return {"gain": mean, "gain_sd_seeds": sd, "gain_sd_test_bootstrap": statistics.mean(boot),
            "seeds_positive": sum(g > 0 for g in gains), "seeds": len(gains)}


def _arm_row(r: ArmResult, base: ArmResult | None) -> dict[str, Any]:
    avgs = r.test_avgs()
    mean, sd = _mean_sd(avgs)
    drops = [s["realised_drop_rate"] for s in r.seeds.values() if s["realised_drop_rate"] is not None]
    row: dict[str, Any] = {
        "arm": r.label, "method": r.method, "test_average": mean, "test_average_sd": sd,
        "realised_drop_rate": statistics.mean(drops) if drops else None,
        "selected": {s: selected_text(v["selected"]) for s, v in r.seeds.items()},
        "per_seed": {s: {k: v[k] for k in ("test_average", "val_average", "test", "merge_seconds")}
                     for s, v in r.seeds.items()}}
    if base is not None and base is not r:
        row["vs_first"] = compare(r, base)
    return row


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def arms_table(groups: list[tuple[str, list[dict[str, Any]]]], first: str) -> str:
    lines = ["| method | arm | realised drop | test avg (mean ± s.d., 3 seeds) | "
             f"gain vs {first} | s.d. over seeds | test-bootstrap s.d. | seeds > 0 | λ selected (seeds 0, 1, 2) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for method, rows in groups:
        for row in rows:
            cmp = row.get("vs_first")
            lams = ", ".join(s.split("lambda=")[1].split(",")[0] if "lambda=" in s else "-"
                             for s in row["selected"].values())
            lines.append("| " + " | ".join([
                method, row["arm"], _pct(row["realised_drop_rate"]),
                f"{_pct(row['test_average'], 2)} ± {_pct(row['test_average_sd'], 2)}",
                "" if cmp is None else f"{100 * cmp['gain']:+.2f}",
                "" if cmp is None else _pct(cmp["gain_sd_seeds"], 2),
                "" if cmp is None else _pct(cmp["gain_sd_test_bootstrap"], 2),
                "" if cmp is None else f"{cmp['seeds_positive']}/{cmp['seeds']}", lams]) + " |")
    return "\n".join(lines) + "\n"


def run_arm_groups(session: StudySession, groups: list[tuple[str, list[Variant]]]
                   ) -> list[tuple[str, list[dict[str, Any]]]]:
    out = []
    for method, arms in groups:
        results = [session.run_arm(v) for v in arms]
        out.append((method, [_arm_row(r, results[0]) for r in results]))
    return out


# ---------------------------------------------------------------- number of tasks
def task_subsets(tasks: Sequence[str], size: int, seeds: Sequence[int] | None = None) -> list[list[str]]:
    """Seeded subsets of ``size`` tasks (all tasks once when size = len(tasks))."""
    if size >= len(tasks):
        return [list(tasks)]
    subsets = []
    for s in TASK_SUBSET_SEEDS if seeds is None else seeds:
        g = torch.Generator().manual_seed(104729 + s)
        perm = torch.randperm(len(tasks), generator=g).tolist()
        subsets.append([tasks[i] for i in sorted(perm[:size])])
    return subsets


def run_task_counts(tasks: Sequence[str], cache_root: Path, out: Path, config: RunConfig,
                    log: Callable[[str], None]) -> dict[str, Any]:
    cfg = replace(config, grids=TASKS_GRIDS)
    variants = [variant(m, cfg.grids) for m in TASKS_METHODS]
    rows: list[dict[str, Any]] = []
    experts: dict[str, float] = {}  # each expert on its own task, from the all-task session
    for size in (len(tasks), *TASK_COUNTS):
        for subset in task_subsets(tasks, size):
            zoo = load_zoo(subset, cache_root, cfg)
            session = _Session(zoo, ResultCache(out, run_context(zoo, config)), cfg, lambda: None)
            if not experts:
                experts = session.reference_rows()[2]["test"]
            for v in variants:
                r = session.variant_row(v)
                avg = sum(r["test"].values()) / len(subset)
                norm = sum(r["test"][t] / experts[t] for t in subset) / len(subset)
                rows.append({"size": size, "tasks": subset, "label": v.label, "test_average": avg,
                             "normalized": norm, "selected": selected_text(r["selected"]),
                             "experts_average": sum(experts[t] for t in subset) / len(subset)})
                log(f"{size} tasks {subset}: {v.label} {100 * avg:.1f} ({r['selected']})")
    return {"rows": rows}


def task_counts_table(doc: dict[str, Any]) -> str:
    sizes = sorted({r["size"] for r in doc["rows"]})
    labels = list(dict.fromkeys(r["label"] for r in doc["rows"]))
    head = "| method | " + " | ".join(f"{k} tasks: avg (norm)" for k in sizes) + " |"
    lines = [head, "|---|" + "---:|" * len(sizes)]
    for label in labels:
        cells = []
        for k in sizes:
            rs = [r for r in doc["rows"] if r["size"] == k and r["label"] == label]
            a, sd = _mean_sd([r["test_average"] for r in rs])
            n, _ = _mean_sd([r["normalized"] for r in rs])
            cells.append(f"{100 * a:.1f}" + (f" ± {100 * sd:.1f}" if len(rs) > 1 else "") + f" ({100 * n:.1f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    subsets = {k: [r["tasks"] for r in doc["rows"] if r["size"] == k and r["label"] == labels[0]] for k in sizes}
    notes = "; ".join(f"{k} tasks: " + " / ".join("+".join(s) for s in subs) for k, subs in subsets.items())
    return "\n".join(lines) + f"\n\nSubsets: {notes}.\n"


# ---------------------------------------------------------------- entry point
def run_study(name: str, tasks: Sequence[str], cache_root: Path, out: Path,
              config: RunConfig = RunConfig(), log: Callable[[str], None] = print,
              load: Callable[[list[str], Path, RunConfig], Zoo] = load_zoo) -> dict[str, Any]:
    """Run one study, write ``OUT/study-NAME.{md,json}`` (evaluations cached in ``OUT/cache``).
    ``load``: the zoo (``vision_run.load_vision_zoo`` for the vision zoo; the ``tasks`` study
    is the text zoo's)."""
    if name not in STUDIES:
        raise ValueError(f"unknown study '{name}'; known: {', '.join(STUDIES)}")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if name == "tasks":
        doc = run_task_counts(list(tasks), cache_root, out, config, log)
        table = task_counts_table(doc)
    else:
        zoo = load(list(tasks), cache_root, config)
        session = StudySession(zoo, ResultCache(out, run_context(zoo, config)), log)
        groups = matched_arms() if name == "matched" else ablation_arms()
        results = run_arm_groups(session, groups)
        doc = {"groups": [{"method": m, "arms": rows} for m, rows in results]}
        table = arms_table(results, "the first arm")
    doc.update(study=name, tasks=list(tasks), seconds=round(time.perf_counter() - t0, 1))
    (out / f"study-{name}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (out / f"study-{name}.md").write_text(table)
    return doc
