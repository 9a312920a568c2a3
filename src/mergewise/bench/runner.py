"""Merge the zoo's experts with every method, tune on validation, report test accuracy.

Protocol (why each choice):
- Every candidate merge is scored on the **validation** splits; the candidate with the best mean
  validation accuracy (ties: the first in grid order) is merged again and scored once on
  **test**. Nothing is ever tuned on test.
- Heads are not merged: a merged encoder is scored with each task's own expert head.
- Rows come from the method registry. A method's grid is derived from what it declares, so a
  later method (EMR, LOT, RegMean...) gets a row without any change here:
  ``lambda`` in its parameters -> the λ grid (``Grids.lambda_mean`` for mean-like methods: TIES
  family (they declare ``aggregate``) and data-aware solves (``features``); ``lambda_sum``
  otherwise); a default trim step -> that sparsifier's density grid (``Grids.density``; not for
  ``Grids.untrimmed`` methods, whose paper form keeps every entry: Task Arithmetic);
  ``Grids.method`` adds a method's own choices (LOT's ``tasks``); ``Grids.paper`` fixes the
  settings that make a method the paper's variant where mergewise's defaults follow mergekit
  (DARE: 1/density rescale and, for DARE-TIES, the disjoint mean). "X + tadrop"
  replaces X's trim step with ``sparsify: {method: tadrop}`` and searches ``drop_rate`` × λ.
  Task-specific methods (EMR) are scored task-aware: each task through its own encoder.
  Weight averaging (``linear``) takes no sparsify block, so its TADrop row is the identical
  merge written as ``task_arithmetic`` with ``normalize: true, lambda: 1`` (= mean of task
  vectors) plus TADrop.
- Issue 16's methods (``RECENT_METHODS``, each with its ``+tadrop`` row, and ``RECENT_DATA_AWARE``)
  take their grids from the papers' defaults, kept small for the run's cost: ``Grids.lambdas``
  (TSV λ 0.7/1/1.4 around FusionBench's 1; Iso-C/Iso-CTS 1/1.5/2 around the official 1.3-1.9;
  WUDI λ = 1 only, its Adam result used as is; Consensus 0.3-1.0 of the official 0.1-1.0), TALL
  masks' one λ_t for all tasks 0.6/0.4/0.2 (``Grids.method``), their TADrop rows p̄ 0.7/0.9
  (``Grids.drop_rate_recent``), RegMean++ its registry alpha 0.95 (statistics captured through
  the merged blocks, once per alpha). TALL masks are scored task-aware like EMR. ``fisher`` is in
  the default rows but skipped with a note while no ``fisher`` method is registered.
- Validation scoring stops a candidate as soon as it provably cannot be selected (``selection``);
  the selected candidate and every reported test number are those of full scoring.
- Every evaluation is cached as one JSON file in ``OUT/cache`` keyed by a hash of everything it
  depends on, so an interrupted run resumes where it stopped and a re-run is instant; results do
  not depend on where they were computed (``--ray`` fills the same cache, ``dispatch``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..registry import METHODS, MergeMethod
from ..version import __version__
from .data import load_task_data
from .evaluate import Evaluator, summarize
from .model import Head, load_encoder, load_minilm_tokenizer, sorted_batches, tokenize
from .report import selected_text, write_outputs
from .results_cache import ResultCache
from .rows import (  # noqa: F401  (re-exported: the rows' public names, as before the split)
    CORE_METHODS,
    DATA_AWARE_METHODS,
    OPTIONAL_ROWS,
    RECENT_DATA_AWARE,
    RECENT_METHODS,
    SAME_AS,
    TADROP,
    Grids,
    Variant,
    available_rows,
    paper_settings,
    variant,
)
from .selection import MARGIN, bounded_accuracies
from .spread import bits
from .zoo import FULL, SMOKE, Expert, ZooConfig, find_expert, find_probe, probe_key


@dataclass(frozen=True)
class RunConfig:
    zoo: ZooConfig = FULL
    grids: Grids = field(default_factory=Grids)
    val_limit: int | None = None  # None: the whole split
    test_limit: int | None = None
    seed: int = 0  # DARE / random TADrop masks
    stop_early: bool = True  # stop scoring a candidate once it cannot be selected (exact)
    methods: tuple[str, ...] = (*(m for c in CORE_METHODS for m in (c, c + TADROP) if m not in SAME_AS),
                                *DATA_AWARE_METHODS, *(m for c in RECENT_METHODS for m in (c, c + TADROP)),
                                *RECENT_DATA_AWARE)


SMOKE_RUN = RunConfig(zoo=SMOKE, grids=Grids(lambda_sum=(0.5, 1.0), lambda_mean=(1.0,),
                                             density={"magnitude": (0.2,), "random": (0.4,),
                                                      "breadcrumbs": (0.9,)},
                                             drop_rate=(0.8,)),
                      val_limit=64, test_limit=128,
                      methods=("linear", "task_arithmetic", "ties", "ties" + TADROP, "emr", "lot"))


# ---------------------------------------------------------------- the run
@dataclass
class Zoo:
    """Everything loaded once per run: base and expert encoders, heads, probes, evaluators."""

    tasks: list[str]
    base: dict[str, torch.Tensor]
    experts: dict[str, Expert]
    expert_sd: dict[str, dict[str, torch.Tensor]]
    heads: dict[str, Head]
    probes: dict[str, Head]
    val: Evaluator
    test: Evaluator
    calibration: dict[str, list[dict[str, torch.Tensor]]] = field(default_factory=dict)
    probe_keys: dict[str, str] = field(default_factory=dict)  # part of every cache key
    context: dict[str, Any] = field(default_factory=dict)  # more of it (the vision zoo's recipe)
    _features: dict[str, Any] | None = None
    _sequential: dict[float, dict[str, Any]] = field(default_factory=dict)

    def features(self) -> dict[str, Any]:
        """Each expert's layer statistics on its own calibration batches (LOT, RegMean);
        captured once per run, on first use."""
        if self._features is None:
            from ..features import capture_experts

            self._features = capture_experts(self.val.model, self.expert_sd, self.calibration)
        return self._features

    def fisher_features(self) -> dict[str, Any]:
        """Each expert's diagonal Fisher (label-free, the registry's defaults) of its encoder +
        its own head on its calibration batches; captured once per run."""
        if "fisher" not in self._sequential:
            from ..features.fisher import fisher_capture

            self._sequential["fisher"] = {  # type: ignore[index]
                t: fisher_capture(self.classifier(t), self.calibration[t], label=t) for t in self.tasks}
        return self._sequential["fisher"]  # type: ignore[index]

    def sequential_features(self, alpha: float) -> dict[str, Any]:
        """RegMean++'s statistics (block l on the merged blocks < l), captured once per alpha."""
        if alpha not in self._sequential:
            import copy

            from ..features.sequential import capture_sequential

            experts = {}
            for t in self.tasks:
                experts[t] = copy.deepcopy(self.val.model)
                experts[t].load_state_dict(self.expert_sd[t], strict=True)
            self._sequential[alpha] = capture_sequential(experts, self.calibration, alpha=alpha)
        return self._sequential[alpha]

    def classifier(self, task: str) -> torch.nn.Module:
        """Expert ``task``'s encoder + its head as one module (what its Fisher is taken of)."""
        return _classifier(self.val.model, self.expert_sd[task], self.heads[task])


def _classifier(encoder: torch.nn.Module, state: dict[str, torch.Tensor], head: Head) -> torch.nn.Module:
    """A copy of ``encoder`` holding ``state`` whose forward returns ``head`` logits of the
    pooled features: the parameter names stay the encoder's (what the merge looks up)."""
    import copy

    from .model import mean_pool

    module = copy.deepcopy(encoder)
    module.load_state_dict(state, strict=True)
    encode_only = module.forward

    def logits(**batch: torch.Tensor) -> torch.Tensor:
        return head(mean_pool(encode_only(**batch).last_hidden_state, batch["attention_mask"]))

    module.forward = logits  # type: ignore[method-assign]
    return module


CALIBRATION = {"examples": 64, "split": "train", "seed": 0, "batch_size": 16}


def task_calibration_batches(task: Any, tokenizer: Any, max_len_cap: int) -> list[dict[str, torch.Tensor]]:
    """``CALIBRATION['examples']`` unlabeled texts drawn (seeded) from the task's **training**
    split only, tokenised like the evaluation data (length-sorted batches). The recipe path,
    ``mergewise.features.calibration_batches``, draws from a calibration file instead."""
    from ..features import draw_examples

    train = task.split(CALIBRATION["split"])
    pick = draw_examples(len(train), CALIBRATION["examples"], CALIBRATION["seed"])
    ids = tokenize(tokenizer, [train.texts[i] for i in pick], min(task.max_len, max_len_cap))
    return sorted_batches(ids, CALIBRATION["batch_size"], tokenizer.pad_token_id)[0]


def merge_spec(v: Variant, cand: dict[str, Any], split: str) -> dict[str, Any]:
    """What one cached evaluation depends on besides the run context."""
    spec = {"method": v.method, **cand, "split": split}
    if METHODS.get(v.method).features:
        spec["calibration"] = CALIBRATION
    return spec


def load_zoo(tasks: list[str], cache: Path, config: RunConfig) -> Zoo:
    loaded = [load_task_data(t) for t in tasks]
    missing = [t.name for t in loaded if find_expert(cache, t, config.zoo.train) is None
               or find_probe(cache, t, config.zoo.probe) is None]
    if missing:
        smoke = " --smoke" if replace(config.zoo, train=replace(config.zoo.train, seed=0)) == SMOKE else ""
        smoke += f" --seed {config.zoo.train.seed}" if config.zoo.train.seed else ""
        raise FileNotFoundError(
            f"no cached expert/probe for {', '.join(missing)} in {cache} with this recipe; run "
            f"`mergewise bench build --cache {cache} --tasks {' '.join(tasks)}{smoke}` first")
    experts = {t.name: find_expert(cache, t, config.zoo.train) for t in loaded}
    probe_keys = {t.name: probe_key(t, config.zoo.probe) for t in loaded}
    tokenizer = load_minilm_tokenizer()
    cap = config.zoo.train.max_len_cap
    model = load_encoder()  # one module for both evaluators; the base weights are cloned first
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Zoo(tasks=tasks, base=base, experts=experts,  # type: ignore[arg-type]
               expert_sd={n: e.state_dict() for n, e in experts.items()},  # type: ignore[union-attr]
               heads={n: e.head() for n, e in experts.items()},  # type: ignore[union-attr]
               probes={t.name: find_probe(cache, t, config.zoo.probe) for t in loaded},  # type: ignore[misc]
               val=Evaluator(loaded, "val", config.val_limit, cap, tokenizer=tokenizer, model=model),
               test=Evaluator(loaded, "test", config.test_limit, cap, tokenizer=tokenizer, model=model),
               calibration={t.name: task_calibration_batches(t, tokenizer, cap) for t in loaded},
               probe_keys=probe_keys)


@dataclass(frozen=True)
class CachedZoo:
    """Picklable recipe of the zoo built by ``mergewise bench build`` (what Ray workers load)."""

    tasks: tuple[str, ...]
    cache: Path
    config: RunConfig

    def load(self) -> Zoo:
        return load_zoo(list(self.tasks), self.cache, self.config)


def method_features(zoo: Zoo, method: MergeMethod, cand: dict[str, Any]) -> Any:
    """The statistics a data-aware merge reads: RegMean++'s are captured through the merged
    blocks with the candidate's alpha (once per alpha); Fisher's (``feature_stats: fisher``) are
    each expert's diagonal Fisher through its own head; LOT's and RegMean's each expert's own
    activation Grams. Each is captured once per run, on the same calibration batches."""
    if method.sequential_features:
        alpha = cand["parameters"].get("alpha", next(p.default for p in method.params if p.name == "alpha"))
        return zoo.sequential_features(float(alpha))
    if getattr(method, "feature_stats", "inputs") == "fisher":
        return zoo.fisher_features()
    return zoo.features()


def merge(zoo: Zoo, v: Variant, cand: dict[str, Any], seed: int,
          records: list[dict[str, Any]] | None = None) -> tuple[Any, float]:
    """One merge of the zoo: a state dict, or for a task-specific method (EMR) a ``TaskModels``
    mapping each task to its own encoder (the evaluator then scores each task with its own)."""
    from ..api import merge_state_dicts, merge_task_state_dicts

    method = METHODS.get(v.method)
    run = merge_task_state_dicts if method.task_specific else merge_state_dicts
    extra = {"features": method_features(zoo, method, cand)} if method.features else {}  # not timed
    t0 = time.perf_counter()
    merged = run(zoo.base, {t: zoo.expert_sd[t] for t in zoo.tasks}, v.method,
                 parameters=cand["parameters"], sparsify=cand["sparsify"], seed=seed, records=records,
                 **extra)
    return merged, time.perf_counter() - t0


def realised_drop_rate(records: list[dict[str, Any]]) -> float | None:
    """Element-weighted fraction of task-vector entries the sparsifiers set to 0 (all models)."""
    numel = kept = 0
    for r in records:
        for info in r.get("models", ()):
            numel += r["numel"]
            kept += info["kept"]
    return None if numel == 0 else 1.0 - kept / numel


def score_merge(zoo: Zoo, merged: Any, split: str, best: float | None = None) -> dict[str, Any]:
    """Validation: accuracies (or a stop once ``best`` cannot be beaten, see ``selection``);
    test: accuracies and per-example correctness (``test_bits``, for paired statistics)."""
    if split == "val":
        return bounded_accuracies(zoo.val, merged, zoo.heads, best)
    correct = zoo.test.correct(merged, zoo.heads)
    return {"test": {t: float(c.float().mean()) for t, c in correct.items()}, "test_bits": bits(correct)}


def evaluate_candidate(zoo: Zoo, v: Variant, cand: dict[str, Any], split: str, seed: int,
                       best: float | None = None) -> tuple[dict[str, Any], Any]:
    """One cached evaluation's result (merge + score, with timings) and the merged model."""
    merged, secs = merge(zoo, v, cand, seed)
    t0 = time.perf_counter()
    r = score_merge(zoo, merged, split, best)
    return {**r, "merge_seconds": secs, "eval_seconds": time.perf_counter() - t0}, merged


class _Session:
    """One run: the loaded zoo, the result cache and the progress bar, shared by every row."""

    def __init__(self, zoo: Zoo, results: ResultCache, config: RunConfig,
                 advance: Callable[[], None]):
        self.zoo, self.results, self.config, self.advance = zoo, results, config, advance

    def cached(self, label: str, spec: dict[str, Any], compute: Callable[[], dict[str, Any]],
               force: bool = False) -> dict[str, Any]:
        """The cached result of ``spec``, computed (and stored) if absent or ``force``."""
        hit = None if force else self.results.get(label, spec)
        if hit is None:
            hit = compute()
            self.results.put(label, spec, hit)
        if not force:
            self.advance()
        return hit

    def reference_rows(self) -> list[dict[str, Any]]:
        """Pretrained encoder (probe heads, then expert heads), each expert, experts on own task."""
        zoo = self.zoo
        feats: dict[str, torch.Tensor] = {}  # the base's test features: one pass, two head sets

        def base_scores(heads: dict[str, Head]) -> dict[str, Any]:
            feats.update(feats or zoo.test.features(zoo.base))
            return {"test": {t: zoo.test.score(heads[t], t, f) for t, f in feats.items()}}

        rows = [
            {"label": "pretrained + probe", "kind": "pretrained", **self.cached(
                "pretrained+probe", {"row": "pretrained"}, lambda: base_scores(zoo.probes))},
            {"label": "pretrained + expert heads", "kind": "pretrained", **self.cached(
                "pretrained+heads", {"row": "pretrained"}, lambda: base_scores(zoo.heads))},
        ]
        for t in zoo.tasks:
            sd = zoo.expert_sd[t]
            rows.append({"label": f"expert: {t}", "kind": "expert", **self.cached(
                f"expert-{t}", {"row": "expert", "task": t},
                lambda sd=sd: {"test": zoo.test.accuracies(sd, zoo.heads)})})
        own = {t: rows[2 + i]["test"][t] for i, t in enumerate(zoo.tasks)}
        rows.insert(2, {"label": "experts (each on its own task)", "kind": "experts", "test": own})
        return rows

    def variant_row(self, v: Variant) -> dict[str, Any]:
        """Score every candidate on val (stopping those that can no longer win), then the best
        one (first of equals) once on test."""
        zoo, seed = self.zoo, self.config.seed
        kept: dict[str, Any] = {}  # the best merge computed in this run, reused for test

        def score(cand: dict[str, Any], best: float | None) -> dict[str, Any]:
            r, merged = evaluate_candidate(zoo, v, cand, "val", seed,
                                           best if self.config.stop_early else None)
            if "val" in r and (not kept or sum(r["val"].values()) > kept["score"]):
                kept.update(cand=cand, merged=merged, secs=r["merge_seconds"], score=sum(r["val"].values()))
            return r

        cands = v.candidates()
        results: list[dict[str, Any]] = []
        for c in cands:  # the bound of each candidate: the best full score before it
            results.append(self.cached(v.label, merge_spec(v, c, "val"),
                                       lambda c=c, b=_best_sum(results): score(c, b)))
        for i in _unsafe_stops(results):  # bounds from another grid's cache: score them in full
            results[i] = self.cached(v.label, merge_spec(v, cands[i], "val"),
                                     lambda c=cands[i]: score(c, None), force=True)
        listed = [_candidate_entry(c, r, len(zoo.tasks)) for c, r in zip(cands, results, strict=True)]
        chosen = select_best(listed)
        assert chosen is not None  # the best candidate is never stopped (nothing beats it)
        best = next(c for c in listed if c["parameters"] == chosen["parameters"]
                    and c["sparsify"] == chosen["sparsify"])

        def final() -> dict[str, Any]:
            if kept.get("cand") != chosen:
                return evaluate_candidate(zoo, v, chosen, "test", seed)[0]
            t0 = time.perf_counter()  # merges are deterministic: reuse the kept one, don't redo
            return {**score_merge(zoo, kept["merged"], "test"), "merge_seconds": kept["secs"],
                    "eval_seconds": time.perf_counter() - t0}

        spec = merge_spec(v, chosen, "test")
        r = self.cached(v.label, spec, final)
        if "test_bits" not in r:  # cached before per-example results were kept: one re-score
            r = self.cached(v.label, spec, final, force=True)
        return {"label": v.label, "kind": "tadrop" if v.label.endswith(TADROP) else "merge",
                "method": v.method, "selected": chosen, "val_average": best["val_average"],
                "candidates": listed, **r}


def select_best(listed: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The selected candidate: best validation average among fully scored ones, first of
    equals (None when none is fully scored)."""
    scored = [c for c in listed if c["val_average"] is not None]
    if not scored:
        return None
    best = max(scored, key=lambda c: c["val_average"])
    return {"parameters": best["parameters"], "sparsify": best["sparsify"]}


def _best_sum(results: list[dict[str, Any]]) -> float | None:
    """The largest validation sum among fully scored results (None before the first)."""
    sums = [sum(r["val"].values()) for r in results if "val" in r]
    return max(sums) if sums else None


def _unsafe_stops(results: list[dict[str, Any]]) -> list[int]:
    """Stopped candidates whose bound does not prove they lose to the final best."""
    best = _best_sum(results)
    return [i for i, r in enumerate(results) if r.get("stopped")
            and not (best is not None and r["val_upper_bound_sum"] < best - MARGIN)]


def _candidate_entry(cand: dict[str, Any], r: dict[str, Any], n_tasks: int) -> dict[str, Any]:
    val = r.get("val")
    return {**cand, "val": val, "merge_seconds": r["merge_seconds"],
            "val_average": None if val is None else sum(val.values()) / n_tasks,
            **({"stopped": True, "val_upper_bound": r["val_upper_bound"]} if val is None else {})}


def run_context(zoo: Zoo, config: RunConfig) -> dict[str, Any]:
    """Everything a cached evaluation depends on besides its own merge spec."""
    return {"tasks": zoo.tasks, "experts": {t: e.key for t, e in zoo.experts.items()},
            "probes": {t: zoo.probe_keys[t] for t in zoo.tasks},
            "val_limit": config.val_limit, "test_limit": config.test_limit, "seed": config.seed,
            "mergewise": __version__, **zoo.context}


def run_zoo(source: Any, out: Path, config: RunConfig = RunConfig(), *, progress: bool = True,
            log: Callable[[str], None] = print, ray: Any = None) -> dict[str, Any]:
    """Every row on the zoo ``source.load()`` builds; evaluations cached in ``out/cache``.
    ``ray`` (a ``dispatch.RaySettings``): candidates are first merged and scored on Ray
    workers into the same cache, then the rows are assembled from it exactly as serially."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    t_start = time.perf_counter()
    names, skipped = available_rows(config.methods)
    for note in skipped:
        log(note)
    variants = [variant(m, config.grids) for m in names]
    zoo = source.load()
    tasks = list(zoo.tasks)
    results = ResultCache(out, run_context(zoo, config))
    if ray is not None:
        from .dispatch import prefill

        prefill(ray, source, results, config, variants, len(tasks), log)
    total = 2 + len(tasks) + sum(len(v.candidates()) + 1 for v in variants)
    columns = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        job = bar.add_task("reference rows", total=total)
        session = _Session(zoo, results, config, lambda: bar.advance(job))
        rows = session.reference_rows()
        own = rows[2]["test"]
        for v in variants:
            bar.update(job, description=v.label)
            row = session.variant_row(v)
            rows.append(row)
            log(f"{v.label}: {selected_text(row['selected'])}  val avg {row['val_average']:.4f}  "
                f"test avg {sum(row['test'].values()) / len(tasks):.4f}")
    for r in rows:
        r.update(summarize(r["test"], own))
    return {"mergewise_version": __version__, "tasks": tasks,
            "test_sizes": zoo.test.sizes(), "val_sizes": zoo.val.sizes(),
            "config": {"run": asdict(config), "experts": {t: e.key for t, e in zoo.experts.items()}},
            "rows": rows, "skipped": skipped, "seconds": round(time.perf_counter() - t_start, 1)}


def run_benchmark(tasks: Sequence[str], cache: Path, out: Path, config: RunConfig = RunConfig(),
                  *, progress: bool = True, log: Callable[[str], None] = print,
                  zoo_seeds: Sequence[int] | None = None, ray: Any = None,
                  source: Callable[..., Any] = CachedZoo) -> dict[str, Any]:
    """Run every row, write results.{json,md,png} into ``out``; returns the JSON document.

    ``zoo_seeds``: one zoo per training seed (built by ``bench build --zoo-seeds``); each zoo's
    own outputs go to ``out/zoo-S/`` and ``out/results.*`` holds mean ± s.d. over zoos and the
    paired gains (``zoos.combine``). Without it: the one zoo of ``config`` (seed 0 by default).
    ``source(tasks, cache, config)``: the zoo's picklable recipe (``vision_run.CachedVisionZoo``).
    """
    from .zoo import with_seed

    if not zoo_seeds or len(zoo_seeds) == 1:  # one zoo: its own table, as always
        config = replace(config, zoo=with_seed(config.zoo, zoo_seeds[0] if zoo_seeds else None))
        doc = run_zoo(source(tuple(tasks), cache, config), out, config, progress=progress,
                      log=log, ray=ray)
        write_outputs(out, doc)
        return doc
    from .zoos import combine, write_combined

    docs = []
    for s in zoo_seeds:
        cfg = replace(config, zoo=with_seed(config.zoo, s))
        log(f"zoo seed {s}")
        d = run_zoo(source(tuple(tasks), cache, cfg), out, cfg, progress=progress, log=log, ray=ray)
        write_outputs(out / f"zoo-{s}", d)
        docs.append(d)
    doc = combine(docs, list(zoo_seeds))
    write_combined(out, doc)
    return doc
