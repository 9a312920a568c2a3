"""Python API mirroring the CLI: ``merge`` (files in, files out), ``compute_features``,
``merge_state_dicts`` and, for task-specific methods (EMR), ``merge_task_state_dicts``.

All of them run the very same ``MergeJob`` tensor loop; only the sources (files vs dicts) and
the sink (the output directory vs a dict) differ, which is why their outputs are identical bit
for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import features as features_pkg  # its modules load on first use (a parameter is named ``features``)
from .chat import chat_template, template_files
from .checkpoint import Checkpoint, StateDictCheckpoint
from .engine import MergeJob
from .errors import FeatureError, RecipeError, UnknownTaskError
from .inputs import (
    InputPaths,
    open_inputs,
    protected_paths,
    resolve_inputs,
    resolve_path,
    without_listed_base,
)
from .lora import LoraCheckpoint
from .lora_out import RankRule, merge_to_adapter
from .modulators import FILE_NAME as MODULATORS_FILE
from .modulators import ModulatorCollector, ModulatorFileWriter, Modulators, modulator_metadata
from .outputs import CONFIG, HF_TAGALONG_FILES, TOKENIZER_FILES, OutputDirectory, Tagalong, merge_card
from .params import base_is_special, check_listed_base
from .plan import PlanSummary
from .progress import merge_progress
from .recipe import Recipe, load_recipe, parse_recipe
from .registry import METHODS, MergeMethod
from .report import tensor_rows
from .slicejobs import open_sliced
from .statspass import StatsCache
from .target import check_output_target
from .task_models import TaskModels
from .version import __version__
from .vocab import TOKENIZER_JSON, alignment_for, tokenizer_text
from .writer import DEFAULT_SHARD_SIZE, parse_size

if TYPE_CHECKING:  # the features modules load on first use (torch.nn, transformers): not on a dry run
    from .features import CaptureReport, FeatureSource, FeatureStats
    from .features.sources import StatsKind


@dataclass
class MergeResult:
    out: Path | None
    summary: PlanSummary
    files: list[str] = field(default_factory=list)
    report_path: Path | None = None
    seconds: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)
    modulators: dict[str, Any] | None = None  # task-specific methods: sizes and rescalers
    lora: dict[str, Any] | None = None  # out_format "lora": ranks and truncation errors


def _coerce_recipe(recipe: Recipe | Mapping[str, Any] | str | Path) -> tuple[Recipe, Path | None]:
    if isinstance(recipe, Recipe):
        return recipe, None
    if isinstance(recipe, Mapping):
        return parse_recipe(dict(recipe)), None
    return load_recipe(recipe)


def merge(recipe: Recipe | Mapping[str, Any] | str | Path, out: str | Path | None = None, *,
          overwrite: bool = False, device: str = "cpu",
          shard_size: int | str = DEFAULT_SHARD_SIZE, dry_run: bool = False,
          progress: bool = False, stats_cache: str | Path | None = None,
          out_format: str = "hf", lora_rank: int | None = None,
          lora_energy: float | None = None) -> MergeResult:
    """Merge the checkpoints a recipe names and write a HF-style directory to ``out``.

    Everything that can be checked without reading tensor data (recipe, paths, formats, names,
    shapes, dtypes, output path) is checked first; ``dry_run`` stops there and returns the plan.
    ``stats_cache`` (default ``$MERGEWISE_STATS_CACHE``): a directory keeping per-tensor stats
    (TADrop's d) across runs, so a sweep over drop rates skips the stats pass's work.
    ``out_format="lora"``: write the merge as a PEFT LoRA adapter, each module's merged task
    vector truncated to ``lora_rank`` or to the ``lora_energy`` share (``lora_out``).
    """
    rec, root = _coerce_recipe(recipe)
    size = parse_size(shard_size)
    target = Path(out).expanduser().absolute() if out is not None else None
    if target is None and not dry_run:
        raise RecipeError("merge needs an output directory (--out)")
    cache_dir = stats_cache or os.environ.get("MERGEWISE_STATS_CACHE")
    recipe_file = Path(recipe) if isinstance(recipe, (str, Path)) else None
    protect = protected_paths(rec, root, recipe_file, [("the stats cache", Path(cache_dir))]
                              if cache_dir else [])
    if target is not None:  # a dry run with --out checks the output path like a real run
        check_output_target(target, overwrite, protect)
    if rec.slices is not None:
        return _merge_sliced(rec, root, target, overwrite=overwrite, device=device, size=size,
                             dry_run=dry_run, progress=progress, protect=protect)
    if out_format not in ("hf", "lora"):
        raise RecipeError(f"--out-format {out_format!r}: give hf (full weights) or lora")
    rule = RankRule(lora_rank, lora_energy) if out_format == "lora" else None
    rec, paths = without_listed_base(rec, resolve_inputs(rec, root))
    if rule is not None:
        done = merge_to_adapter(rec, paths, target, rule, overwrite=overwrite, device=device,
                                dry_run=dry_run, protect=protect)
        return MergeResult(out=target, summary=done["summary"], files=done.get("files", []),
                           report_path=None if dry_run else target / "report.json",  # type: ignore[operator]
                           seconds=done.get("seconds", 0.0), records=done.get("records", []),
                           lora=done["lora"])
    if rec.method.sequential_features:
        _refuse_stats_files(rec)
        _one_alpha(rec)  # checked before any model is loaded
    sources = (features_pkg.plan_sources(rec, root, paths.models, adapter_bases=paths.adapter_targets())
               if rec.method.features else None)
    with open_inputs(paths.base, paths.models, paths.adapter_bases) as (base, models), \
            contextlib.ExitStack() as stack:
        inputs = [*models, *([base] if base is not None else [])]
        alignment = (alignment_for(rec.vocabulary, inputs, len(models) if base else None,
                                   lambda text, key: resolve_path(text, root, key))
                     if rec.vocabulary is not None else None)
        job = MergeJob(rec, base, models, device=device, vocab=alignment,
                       stats_cache=StatsCache(Path(cache_dir)) if cache_dir else None)
        template = (chat_template(rec.chat_template, [c.directory for c in inputs])
                    if rec.chat_template is not None else None)  # checked before merging
        summary = job.summary()
        if dry_run:
            return MergeResult(out=target, summary=summary)
        assert target is not None
        start = time.perf_counter()
        if sources is not None:
            _attach_features(job, sources, paths, root, device, stack)
        metadata = {"mergewise_version": __version__, "mergewise_recipe": rec.to_yaml()}
        with OutputDirectory(target, [t.out for t in job.tensors], shard_size=size,
                             metadata=metadata, overwrite=overwrite, inputs=protect) as output:
            mod_writer = _modulator_writer(output, job, paths)
            with merge_progress(progress, job.tensors, summary) as (on_tensor, on_stats):
                records = job.run(output.write, on_tensor, on_stats, modulator_sink=(
                    mod_writer.collector if mod_writer is not None else None))
            output.end_shards()
            modulators = None
            if mod_writer is not None:
                mod_writer.finalize()
                modulators = modulator_report(output.tmp / MODULATORS_FILE, job,
                                              output.tensor_bytes, mod_writer.collector)
            report = _merge_report(job, records, time.perf_counter() - start, modulators)
            tagalong, config, texts = _side_files(rec, job, paths, inputs, alignment, template)
            output.finish(tagalong=tagalong, config=config, texts=texts,
                          card=merge_card(rec, job.method, [s.task for s in job.slots]),
                          report=(report, tensor_rows(records, report["tasks"])))
        return MergeResult(out=target, summary=summary, files=output.files,
                           report_path=target / "report.json",
                           seconds=time.perf_counter() - start, records=records,
                           modulators=modulators)


def _attach_features(job: MergeJob, sources: list[FeatureSource], paths: InputPaths,
                     root: Path | None, device: str, stack: contextlib.ExitStack) -> None:
    """Every model's feature statistics (reused or captured now), attached to the job."""
    if job.method.sequential_features:  # RegMean++: captured jointly, in memory
        from .features.sequential import obtain_sequential

        stats = obtain_sequential(sources, seed=job.recipe.seed, alpha=_one_alpha(job.recipe),
                                  tokenizer_paths=paths.tokenizer_candidates(), root=root,
                                  device=device)
        job.set_features(stats)
        return
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mergewise-")))
    stats, _ = features_pkg.obtain(sources, seed=job.recipe.seed, tokenizer_paths=paths.tokenizer_candidates(),
                      root=root, workdir=workdir, device=device, kind=_stats_kind(job.method))
    for st in stats:
        stack.callback(st.close)
    job.set_features(stats)


def _stats_kind(method: MergeMethod) -> StatsKind:
    """How the method's statistics are captured and read: Grams, or the Fisher."""
    if method.feature_stats == "fisher":
        from .features.fisher import FISHER

        return FISHER
    from .features.sources import GRAMS

    return GRAMS


def _refuse_stats_files(rec: Recipe) -> None:
    """A method whose statistics depend on every expert (RegMean++) reads no stats file."""
    given = [f"models.{i}.features" for i, m in enumerate(rec.models) if m.features is not None]
    if given:
        raise FeatureError(f"{rec.method.name} captures its statistics during the merge (block l "
                           f"on the merged blocks < l), so it reads no stats file: remove "
                           f"{', '.join(given)} and give each model a calibration block")


def _one_alpha(rec: Recipe) -> float:
    """The merge's alpha, which the sequential capture merges every block with: one number."""
    value = rec.parameters.get("alpha", 0.95)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{rec.method.name}: parameters.alpha must be one number (the "
                          "sequential capture merges every block with it), not a filter list")
    return float(value)


def _side_files(rec: Recipe, job: MergeJob, paths: InputPaths, inputs: list[Checkpoint],
                alignment: Any, template: str | None
                ) -> tuple[list[Tagalong], dict[str, Any] | None, dict[str, str]]:
    """The output's tag-along files, config and generated text files: the recipe copy, an
    aligned vocabulary's tokenizer.json and vocab_size, the chat template."""
    config, texts = job.reference.config, {"mergewise_recipe.yaml": rec.to_yaml()}
    tagalong = _tagalong(rec, job.reference, paths)
    tok_dir = tagalong[-1][0]
    if alignment is not None:
        tok_dir = inputs[alignment.source_index].directory
        tagalong = [tagalong[0], (tok_dir, TOKENIZER_FILES)]
        texts[TOKENIZER_JSON] = tokenizer_text(alignment, tok_dir, alignment.vocabs)
        if config is not None:
            config["vocab_size"] = alignment.rows
    if template is not None:
        texts.update(template_files(template, tok_dir))
    return tagalong, config, texts


def _merge_sliced(rec: Recipe, root: Path | None, target: Path | None, *, overwrite: bool,
                  device: str, size: int, dry_run: bool, progress: bool,
                  protect: list[tuple[str, Path]]) -> MergeResult:
    """A ``slices:`` recipe: one job per slice, written in order into one output."""
    with contextlib.ExitStack() as stack:
        sliced = open_sliced(rec, root, stack, device)
        summary = sliced.summary()
        if dry_run:
            return MergeResult(out=target, summary=summary)
        assert target is not None
        start = time.perf_counter()
        tensors = [p for job in sliced.jobs for p in job.tensors]
        metadata = {"mergewise_version": __version__, "mergewise_recipe": rec.to_yaml()}
        records: list[dict[str, Any]] = []
        rows: list[dict[str, Any]] = []
        with OutputDirectory(target, [t.out for t in tensors], shard_size=size,
                             metadata=metadata, overwrite=overwrite, inputs=protect) as output:
            with merge_progress(progress, tensors, summary) as (on_tensor, on_stats):
                for job in sliced.jobs:
                    done = job.run(output.write, on_tensor, on_stats)
                    records += done
                    rows += tensor_rows(done, [s.task for s in job.slots])
            output.end_shards()
            base = resolve_path(rec.base_model, root, "base_model") if rec.base_model else None
            paths = InputPaths(base, [], _tokenizer_path(rec, root))
            report = {**_merge_report(sliced.jobs[0], records, time.perf_counter() - start, None),
                      "plan": summary.__dict__, "tasks": [],
                      "slices": [{"tasks": [s.task for s in job.slots],
                                  "sparsifiers": job.sparsifier_summary()}
                                 for job in sliced.jobs]}
            output.finish(tagalong=_tagalong(rec, sliced.reference, paths),
                          config=sliced.config(), texts={"mergewise_recipe.yaml": rec.to_yaml()},
                          card=merge_card(rec, sliced.jobs[0].method, []),
                          report=(report, rows))
        return MergeResult(out=target, summary=summary, files=output.files,
                           report_path=target / "report.json",
                           seconds=time.perf_counter() - start, records=records)


def _tokenizer_path(rec: Recipe, root: Path | None) -> Path | None:
    source = rec.vocabulary.source if rec.vocabulary is not None else None
    if source is not None and source not in ("base", "union"):
        return resolve_path(source, root, "tokenizer_source")
    return None


def _tagalong(rec: Recipe, reference: Checkpoint, paths: InputPaths) -> list[Tagalong]:
    """Config-free HF files from the reference; tokenizer files from ``tokenizer_source``
    (a path, or the base) when it is set."""
    if rec.vocabulary is None:
        names = [n for n in HF_TAGALONG_FILES if n != CONFIG]
        return [(d, names) for d in _file_dirs(reference)]
    others = [n for n in HF_TAGALONG_FILES if n != CONFIG and n not in TOKENIZER_FILES]
    found = paths.tokenizer_candidates()
    tok_dir = (found[0] if found[0].is_dir() else found[0].parent) if found else None
    return [*((d, others) for d in _file_dirs(reference)), (tok_dir, TOKENIZER_FILES)]


def _file_dirs(reference: Checkpoint) -> list[Path | None]:
    """Where the reference's tokenizer / generation files are, later ones overriding: a LoRA
    adapter (a ``base+adapter`` first model of a base-less SLERP) takes the model it applies
    to, then whatever the adapter directory itself holds (PEFT saves no tokenizer by default)."""
    if isinstance(reference, LoraCheckpoint):
        return [reference.base.directory, reference.directory]
    return [reference.directory]


def _modulator_writer(output: OutputDirectory, job: MergeJob, paths: InputPaths
                      ) -> ModulatorFileWriter | None:
    if not job.method.task_specific:
        return None
    assert paths.base is not None
    return ModulatorFileWriter(output.path(MODULATORS_FILE), [s.task for s in job.slots],
                               [(t.name, t.shape) for t in job.tensors if t.merged],
                               job.compute_dtype, str(paths.base.resolve()))


def modulator_report(path: Path, job: MergeJob, unified_bytes: int,
                     collector: ModulatorCollector) -> dict[str, Any]:
    """Sizes of a task-specific merge's output next to what K full experts take (tensor
    bytes; ``bytes`` is the whole file, header included, ``mask_bytes`` the packed masks)."""
    experts = sum(s.ckpt.info(n).nbytes for s in job.slots for n in s.ckpt.names())
    size = path.stat().st_size
    tasks = [s.task for s in job.slots]
    return {"file": MODULATORS_FILE, "bytes": size, "mask_bytes": collector.mask_bytes,
            "unified_bytes": unified_bytes, "experts_bytes": experts,
            "ratio_to_experts": size / experts if experts else None, "tasks": tasks,
            "rescalers": dict(zip(tasks, collector.rescalers(), strict=True))}


def _merge_report(job: MergeJob, records: list[dict[str, Any]], seconds: float,
                  modulators: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "mergewise_version": __version__,
        "merge_method": job.recipe.merge_method,
        "tasks": [s.task for s in job.slots],
        "seconds": round(seconds, 3),
        "plan": job.summary().__dict__,
        "sparsifiers": job.sparsifier_summary(),
        **({"modulators": modulators} if modulators is not None else {}),
        "features": [{"task": slot.task, "stats": st.label, "examples": st.metadata.get("examples"),
                      "rows": st.metadata.get("rows"),
                      "calibration": json.loads(st.metadata.get("calibration", "{}"))}
                     for slot, st in zip(job.slots, job.features or [], strict=False)],
        "tensors": records,
    }


def compute_features(recipe: Recipe | Mapping[str, Any] | str | Path,
                     out_dir: str | Path | None = None, *, overwrite: bool = False,
                     device: str = "cpu",
                     progress: Callable[[CaptureReport], None] | None = None
                     ) -> list[CaptureReport]:
    """``mergewise features``: capture and write the stats file of every model of a recipe
    that has a calibration block (to its ``features:`` path, else ``out_dir/TASK...``).
    Existing stats files are kept unless ``overwrite``."""
    rec, root = _coerce_recipe(recipe)
    if rec.method.sequential_features:
        raise FeatureError(f"{rec.method.name}: its statistics depend on every expert and are "
                           "captured during `mergewise merge`; there are no per-model stats "
                           "files to compute")
    todo = [i for i, m in enumerate(rec.models) if m.calibration is not None]
    if not todo:
        raise RecipeError("no model of the recipe has a 'calibration:' block; nothing to compute")
    nowhere = [f"models.{i}" for i in todo if rec.models[i].features is None]
    if nowhere and out_dir is None:
        raise RecipeError(f"{', '.join(nowhere)} name no 'features:' stats file; give --out-dir")
    sub = rec.model_copy(update={"models": [rec.models[i] for i in todo]})
    paths = resolve_inputs(sub, root)
    sources: list[FeatureSource] = features_pkg.plan_sources(sub, root, paths.models, overwrite=True,
                                                adapter_bases=paths.adapter_targets())
    if not overwrite:
        sources = [s for s in sources if not s.cached]
    workdir = Path(out_dir).expanduser() if out_dir is not None else None
    stats, reports = features_pkg.obtain(sources, seed=rec.seed, tokenizer_paths=paths.tokenizer_candidates(),
                            root=root, workdir=workdir, overwrite=True, device=device,
                            progress=progress, kind=_stats_kind(rec.method))
    for st in stats:
        st.close()
    return reports


StateDict = Mapping[str, "torch.Tensor"]


def merge_state_dicts(base: StateDict | None,
                      models: Sequence[StateDict] | Mapping[str, StateDict],
                      method: str = "ties", *, parameters: Mapping[str, Any] | None = None,
                      model_parameters: Sequence[Mapping[str, Any]] | None = None,
                      sparsify: Mapping[str, Any] | None = None, dtype: str | None = None,
                      out_dtype: str | None = None, seed: int = 0,
                      device: str = "cpu", task: str | None = None,
                      records: list[dict[str, Any]] | None = None,
                      features: Sequence[FeatureStats | str | Path]
                      | Mapping[str, FeatureStats | str | Path] | None = None
                      ) -> dict[str, torch.Tensor]:
    """Merge state dicts already in memory (e.g. from loaded torch modules); returns a new dict.

    ``models`` is a list of state dicts, or a {task name: state dict} mapping. Parameters follow
    the recipe's rules (``parameters`` method-wide, ``model_parameters`` per model). A
    task-specific method (``emr``) yields one model per task: pass ``task`` to get that task's
    model (see ``merge_task_state_dicts`` for all of them); without it such a method is refused.
    Pass a list as ``records`` to receive the per-tensor report rows (kept counts, norms,
    TADrop d and p). Data-aware methods (``lot``, ``regmean``) take ``features``: one
    ``FeatureStats`` (from ``features.capture``) or stats file path per model, in the same order
    or keyed by task; ``fisher`` takes ``FisherStats`` (``features.fisher.fisher_capture``) or
    Fisher stats file paths the same way.
    """
    job = _memory_job(base, models, method, parameters=parameters,
                      model_parameters=model_parameters, sparsify=sparsify, dtype=dtype,
                      out_dtype=out_dtype, seed=seed, device=device, features=features)
    with contextlib.ExitStack() as stack:
        for st in job.features or []:
            stack.callback(st.close)  # file-backed statistics: release the handles
        return _run_memory_job(job, base, task, records)


def _run_memory_job(job: MergeJob, base: StateDict | None, task: str | None,
                    records: list[dict[str, Any]] | None) -> dict[str, torch.Tensor]:
    if task is not None:
        if not job.method.task_specific:
            raise RecipeError(f"task='{task}' applies to task-specific methods (emr) only; "
                              f"{job.method.name} yields a single merged model")
        tasks = [s.task for s in job.slots]
        if task not in tasks:  # before any tensor is merged
            raise UnknownTaskError(f"merge_state_dicts: no task '{task}'; known tasks: "
                                   f"{', '.join(tasks)}")
        return _run_task_specific(job, base, records).task_state_dict(task)
    out: dict[str, torch.Tensor] = {}
    rows = job.run(out.__setitem__)
    if records is not None:
        records.extend(rows)
    return out


def merge_task_state_dicts(base: StateDict, models: Sequence[StateDict] | Mapping[str, StateDict],
                           method: str = "emr", *, parameters: Mapping[str, Any] | None = None,
                           model_parameters: Sequence[Mapping[str, Any]] | None = None,
                           sparsify: Mapping[str, Any] | None = None, dtype: str | None = None,
                           out_dtype: str | None = None, seed: int = 0,
                           device: str = "cpu",
                           records: list[dict[str, Any]] | None = None) -> TaskModels:
    """Task-specific merge (EMR) of in-memory state dicts: a read-only {task: state dict} mapping.

    Runs the same engine loop as ``mergewise merge``; ``result[task]`` assembles that task's
    weights (theta0 + lambda_t * (M_t * tau_uni)) on access, bit for bit equal to
    ``mergewise materialize`` on the files. ``result.unified`` is the unified state dict,
    ``result.rescalers`` the lambda_t, ``result.load_into(module, task)`` loads a task's weights.
    """
    job = _memory_job(base, models, method, parameters=parameters,
                      model_parameters=model_parameters, sparsify=sparsify, dtype=dtype,
                      out_dtype=out_dtype, seed=seed, device=device)
    if not job.method.task_specific:
        raise RecipeError(f"merge_method {job.method.name} yields a single merged model; use "
                          "merge_state_dicts (task-specific methods: "
                          f"{', '.join(m.name for m in METHODS if m.task_specific)})")
    return _run_task_specific(job, base, records)


def _run_task_specific(job: MergeJob, base: StateDict | None,
                       records: list[dict[str, Any]] | None = None) -> TaskModels:
    tasks = [s.task for s in job.slots]
    unified: dict[str, torch.Tensor] = {}
    store: dict[str, torch.Tensor] = {}
    collector = ModulatorCollector(tasks, store.__setitem__)
    rows = job.run(unified.__setitem__, modulator_sink=collector)
    if records is not None:
        records.extend(rows)
    collector.finish()
    merged = [(t.name, t.shape) for t in job.tensors if t.merged]
    mods = Modulators(StateDictCheckpoint("modulators", store),
                      modulator_metadata(tasks, merged, job.compute_dtype, None),
                      "<memory:modulators>")
    return TaskModels(unified, mods, StateDictCheckpoint("base", base or {}), job.device)


def _memory_job(base: StateDict | None, models: Sequence[StateDict] | Mapping[str, StateDict],
                method: str, *, parameters: Mapping[str, Any] | None,
                model_parameters: Sequence[Mapping[str, Any]] | None,
                sparsify: Mapping[str, Any] | None, dtype: str | None, out_dtype: str | None,
                seed: int, device: str, features: Any = None) -> MergeJob:
    named = (list(models.items()) if isinstance(models, Mapping)
             else [(f"model_{i}", m) for i, m in enumerate(models)])
    if base is not None and method in METHODS and base_is_special(METHODS.get(method)):
        # the base dict itself listed as a model is the base (as a listed base_model path)
        listed = [i for i, (_, sd) in enumerate(named) if sd is base]
        if listed:
            check_listed_base(METHODS.get(method), True, len(named) - len(listed))
            named = [nm for i, nm in enumerate(named) if i not in listed]
            if model_parameters is not None:
                model_parameters = [p for i, p in enumerate(model_parameters) if i not in listed]
    if method in METHODS and METHODS.get(method).features and features is None:
        raise FeatureError(f"{method} needs the calibration statistics of every model: pass "
                           "features=[...] (from mergewise.features.capture) or stats file paths")
    entries = []
    for i, (task, _) in enumerate(named):
        entry: dict[str, Any] = {"model": f"<memory:{task}>", "name": task}
        if model_parameters is not None:
            entry["parameters"] = dict(model_parameters[i])
        if features is not None:
            entry["features"] = f"<memory:{task}>"
        entries.append(entry)
    data: dict[str, Any] = {"merge_method": method, "models": entries,
                            "parameters": dict(parameters or {}), "seed": seed}
    if dtype is not None:
        data["dtype"] = dtype
    if base is not None:
        data["base_model"] = "<memory:base>"
    if sparsify is not None:
        data["sparsify"] = dict(sparsify)
    if out_dtype is not None:
        data["out_dtype"] = out_dtype
    rec = parse_recipe(data, "merge_state_dicts")
    base_ckpt = StateDictCheckpoint("base", base) if base is not None else None
    model_ckpts = [StateDictCheckpoint(task, sd) for task, sd in named]
    load = _stats_kind(METHODS.get(method)).load if method in METHODS else features_pkg.load_stats
    stats = _memory_features(features, [task for task, _ in named], load)
    return MergeJob(rec, base_ckpt, model_ckpts, device=device, features=stats)


def _memory_features(given: Any, tasks: list[str],
                     load: Callable[[Path], FeatureStats] | None = None) -> list[FeatureStats] | None:
    load = load or features_pkg.load_stats
    if given is None:
        return None
    if isinstance(given, Mapping):
        missing = [t for t in tasks if t not in given]
        if missing:
            raise FeatureError(f"features: no statistics for task(s) {', '.join(missing)}; "
                               f"got {', '.join(map(str, given))}")
        given = [given[t] for t in tasks]
    if len(given) != len(tasks):
        raise FeatureError(f"features: {len(given)} given for {len(tasks)} models")
    return [g if isinstance(g, features_pkg.FeatureStats) else load(Path(g)) for g in given]
