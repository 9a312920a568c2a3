"""Python API mirroring the CLI: ``merge`` (files in, files out), ``merge_state_dicts`` and,
for task-specific methods (EMR), ``merge_task_state_dicts``.

Both run the very same ``MergeJob`` tensor loop; only the sources (files vs dicts) and the sink
(streaming writer vs dict) differ, which is why their outputs are identical bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__, features
from .checkpoint import HF_TAGALONG_FILES, Checkpoint, StateDictCheckpoint, open_checkpoint
from .engine import MergeJob, PlanSummary
from .errors import FeatureError, RecipeError, UnknownTaskError
from .materialize import TaskModels
from .modulators import FILE_NAME as MODULATORS_FILE
from .modulators import ModulatorCollector, ModulatorFileWriter, Modulators, modulator_metadata
from .progress import merge_progress
from .recipe import Recipe, load_recipe, parse_recipe
from .registry import METHODS
from .report import tensor_rows, write_tables
from .tensors import TensorInfo, dtype_name
from .writer import (
    DEFAULT_SHARD_SIZE,
    ShardedWriter,
    atomic_directory,
    check_output_target,
    copy_tagalong,
    parse_size,
)


@dataclass
class MergeResult:
    out: Path | None
    summary: PlanSummary
    files: list[str] = field(default_factory=list)
    report_path: Path | None = None
    seconds: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)
    modulators: dict[str, Any] | None = None  # task-specific methods: sizes and rescalers


def _resolve_path(path: str, root: Path | None, key: str) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute():
        candidates = [p]
    else:
        candidates = ([root / p] if root is not None else []) + [Path.cwd() / p]
    for c in candidates:
        if c.exists():
            return c
    tried = " or ".join(str(c) for c in dict.fromkeys(candidates))
    raise RecipeError(f"{key}: '{path}' does not exist (looked for {tried})")


def _coerce_recipe(recipe: Recipe | Mapping[str, Any] | str | Path) -> tuple[Recipe, Path | None]:
    if isinstance(recipe, Recipe):
        return recipe, None
    if isinstance(recipe, Mapping):
        return parse_recipe(dict(recipe)), None
    return load_recipe(recipe)


def open_recipe_checkpoints(recipe: Recipe, root: Path | None
                            ) -> tuple[Checkpoint | None, list[Checkpoint], dict[str, Path]]:
    """Resolve every path first (all missing files are reported before anything is opened)."""
    paths: dict[str, Path] = {}
    if recipe.base_model:
        paths["base_model"] = _resolve_path(recipe.base_model, root, "base_model")
    for i, m in enumerate(recipe.models):
        paths[f"models.{i}"] = _resolve_path(m.model, root, f"models.{i}.model")
    if recipe.tokenizer_source and recipe.tokenizer_source != "base":
        paths["tokenizer_source"] = _resolve_path(recipe.tokenizer_source, root,
                                                  "tokenizer_source")
    opened: list[Checkpoint] = []
    try:
        base = open_checkpoint(paths["base_model"]) if "base_model" in paths else None
        if base is not None:
            opened.append(base)
        models = []
        for i in range(len(recipe.models)):
            models.append(open_checkpoint(paths[f"models.{i}"]))
            opened.append(models[-1])
    except BaseException:
        for c in opened:
            c.close()
        raise
    return base, models, paths


def merge(recipe: Recipe | Mapping[str, Any] | str | Path, out: str | Path | None = None, *,
          overwrite: bool = False, device: str = "cpu",
          shard_size: int | str = DEFAULT_SHARD_SIZE, dry_run: bool = False,
          progress: bool = False) -> MergeResult:
    """Merge the checkpoints a recipe names and write a HF-style directory to ``out``.

    Everything that can be checked without reading tensor data (recipe, paths, formats, names,
    shapes, dtypes, output path) is checked first; ``dry_run`` stops there and returns the plan.
    """
    rec, root = _coerce_recipe(recipe)
    size = parse_size(shard_size)
    target = Path(out).expanduser().absolute() if out is not None else None
    if target is None and not dry_run:
        raise RecipeError("merge needs an output directory (--out)")
    if target is not None:  # a dry run with --out checks the output path like a real run
        check_output_target(target, overwrite)
    sources = _feature_sources(rec, root) if rec.method.features else None
    base, models, paths = open_recipe_checkpoints(rec, root)
    with contextlib.ExitStack() as stack:
        for c in ([base] if base is not None else []) + models:
            stack.callback(c.close)
        job = MergeJob(rec, base, models, device=device)
        summary = job.summary()
        if dry_run:
            return MergeResult(out=target, summary=summary)
        assert target is not None
        start = time.perf_counter()
        if sources is not None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mergewise-")))
            stats, _ = features.obtain(sources, seed=rec.seed, tokenizer_paths=_tokenizer_paths(
                rec, paths), root=root, workdir=workdir, device=device)
            for st in stats:
                stack.callback(st.close)
            job.set_features(stats)
        out_tensors = [TensorInfo(t.name, t.shape, t.out_dtype) for t in job.tensors]
        metadata = {"mergewise_version": __version__, "mergewise_recipe": rec.to_yaml()}
        with atomic_directory(target, overwrite) as tmp:
            writer = ShardedWriter(tmp, out_tensors, size, metadata)
            mod_writer = _modulator_writer(tmp, job, paths)
            with merge_progress(progress, job, summary) as (on_tensor, on_stats):
                records = job.run(writer.write, on_tensor, on_stats, modulator_sink=(
                    mod_writer.collector if mod_writer is not None else None))
            files = writer.finalize()
            modulators = None
            if mod_writer is not None:
                mod_writer.finalize()
                files.append(MODULATORS_FILE)
                modulators = modulator_report(tmp / MODULATORS_FILE, job, writer.total_size,
                                              mod_writer.collector)
            _write_sidecars(tmp, rec, job, paths, records, time.perf_counter() - start,
                            modulators)
        seconds = time.perf_counter() - start
        return MergeResult(out=target, summary=summary, files=files,
                           report_path=target / "report.json", seconds=seconds, records=records,
                           modulators=modulators)


def _modulator_writer(tmp: Path, job: MergeJob, paths: dict[str, Path]
                      ) -> ModulatorFileWriter | None:
    if not job.method.task_specific:
        return None
    return ModulatorFileWriter(tmp / MODULATORS_FILE, [s.task for s in job.slots],
                               [(t.name, t.shape) for t in job.tensors if t.merged],
                               job.compute_dtype, str(paths["base_model"].resolve()))


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


def _feature_sources(rec: Recipe, root: Path | None,
                     overwrite: bool = False) -> list[features.FeatureSource]:
    """Every model's stats file / calibration data, all checked before any model is loaded."""
    model_paths = [_resolve_path(m.model, root, f"models.{i}.model")
                   for i, m in enumerate(rec.models)]
    return features.plan_sources(rec, root, model_paths, overwrite)


def _tokenizer_paths(rec: Recipe, paths: dict[str, Path]) -> list[Path]:
    """Where text calibration data finds its tokenizer: tokenizer_source, else the base."""
    return [paths[k] for k in ("tokenizer_source", "base_model") if k in paths]


def compute_features(recipe: Recipe | Mapping[str, Any] | str | Path,
                     out_dir: str | Path | None = None, *, overwrite: bool = False,
                     device: str = "cpu",
                     progress: Callable[[features.CaptureReport], None] | None = None
                     ) -> list[features.CaptureReport]:
    """``mergewise features``: capture and write the stats file of every model of a recipe
    that has a calibration block (to its ``features:`` path, else ``out_dir/TASK...``).
    Existing stats files are kept unless ``overwrite``."""
    rec, root = _coerce_recipe(recipe)
    todo = [i for i, m in enumerate(rec.models) if m.calibration is not None]
    if not todo:
        raise RecipeError("no model of the recipe has a 'calibration:' block; nothing to compute")
    nowhere = [f"models.{i}" for i in todo if rec.models[i].features is None]
    if nowhere and out_dir is None:
        raise RecipeError(f"{', '.join(nowhere)} name no 'features:' stats file; give --out-dir")
    sub = rec.model_copy(update={"models": [rec.models[i] for i in todo]})
    sources = _feature_sources(sub, root, overwrite=True)
    tok: list[Path] = []
    if rec.tokenizer_source and rec.tokenizer_source != "base":
        tok.append(_resolve_path(rec.tokenizer_source, root, "tokenizer_source"))
    if rec.base_model:
        tok.append(_resolve_path(rec.base_model, root, "base_model"))
    if not overwrite:
        sources = [s for s in sources if not s.cached]
    workdir = Path(out_dir).expanduser() if out_dir is not None else None
    stats, reports = features.obtain(sources, seed=rec.seed, tokenizer_paths=tok, root=root,
                                     workdir=workdir, overwrite=True, device=device,
                                     progress=progress)
    for st in stats:
        st.close()
    return reports


def _write_sidecars(tmp: Path, rec: Recipe, job: MergeJob, paths: dict[str, Path],
                    records: list[dict[str, Any]], seconds: float,
                    modulators: dict[str, Any] | None = None) -> None:
    ref_dir = job.reference.directory
    copy_tagalong(ref_dir, tmp, [n for n in HF_TAGALONG_FILES if n != "config.json"
                                 and (not rec.tokenizer_source or "token" not in n)])
    if rec.tokenizer_source:
        tok_path = (paths["tokenizer_source"] if rec.tokenizer_source != "base"
                    else (Path(paths["base_model"]) if "base_model" in paths else None))
        tok_dir = tok_path if tok_path is None or tok_path.is_dir() else tok_path.parent
        copy_tagalong(tok_dir, tmp, [n for n in HF_TAGALONG_FILES if "token" in n])
    config = job.reference.config
    if config is not None:
        float_out = {t.out_dtype for t in job.tensors if t.merged}
        if len(float_out) == 1:
            name = dtype_name(next(iter(float_out)))
            config["torch_dtype"] = name
            if "dtype" in config:
                config["dtype"] = name
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "mergewise_recipe.yaml").write_text(rec.to_yaml())
    (tmp / "README.md").write_text(model_card(rec, job))
    tasks = [s.task for s in job.slots]
    report = {
        "mergewise_version": __version__,
        "merge_method": rec.merge_method,
        "tasks": tasks,
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
    write_tables(tmp, report, tensor_rows(records, tasks))


def model_card(rec: Recipe, job: MergeJob) -> str:
    base = rec.base_model or "(none)"
    models = "\n".join(f"- `{m.model}` (task: {m.task_name})" for m in rec.models)
    return f"""---
library_name: transformers
tags:
- mergewise
- merge
base_model: {base}
---
# {rec.name or "Merged model"}

This model was merged with [mergewise](https://pypi.org/project/mergewise/) {__version__}
using the **{rec.merge_method}** method.

## Inputs
Base model: `{base}`

{models}

## Recipe
```yaml
{rec.to_yaml().rstrip()}
```

{_task_specific_note(job)}Method semantics:
{(job.method.doc or "").strip()}
"""


def _task_specific_note(job: MergeJob) -> str:
    if not job.method.task_specific:
        return ""
    tasks = ", ".join(s.task for s in job.slots)
    return (f"These weights are the unified model of a task-specific merge; each task's model "
            f"({tasks}) is assembled from them, the base and `{MODULATORS_FILE}`:\n"
            f"`mergewise materialize DIR --task NAME --out TASK_DIR`.\n\n")


StateDict = Mapping[str, torch.Tensor]


def merge_state_dicts(base: StateDict | None,
                      models: Sequence[StateDict] | Mapping[str, StateDict],
                      method: str = "ties", *, parameters: Mapping[str, Any] | None = None,
                      model_parameters: Sequence[Mapping[str, Any]] | None = None,
                      sparsify: Mapping[str, Any] | None = None, dtype: str = "float32",
                      out_dtype: str | None = None, seed: int = 0,
                      device: str = "cpu", task: str | None = None,
                      records: list[dict[str, Any]] | None = None,
                      features: Sequence[features.FeatureStats | str | Path]
                      | Mapping[str, features.FeatureStats | str | Path] | None = None
                      ) -> dict[str, torch.Tensor]:
    """Merge state dicts already in memory (e.g. from loaded torch modules); returns a new dict.

    ``models`` is a list of state dicts, or a {task name: state dict} mapping. Parameters follow
    the recipe's rules (``parameters`` method-wide, ``model_parameters`` per model). A
    task-specific method (``emr``) yields one model per task: pass ``task`` to get that task's
    model (see ``merge_task_state_dicts`` for all of them); without it such a method is refused.
    Pass a list as ``records`` to receive the per-tensor report rows (kept counts, norms,
    TADrop d and p). Data-aware methods (``lot``, ``regmean``) take ``features``: one
    ``FeatureStats`` (from ``features.capture``) or stats file path per model, in the same order
    or keyed by task.
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
                           sparsify: Mapping[str, Any] | None = None, dtype: str = "float32",
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
                sparsify: Mapping[str, Any] | None, dtype: str, out_dtype: str | None,
                seed: int, device: str, features: Any = None) -> MergeJob:
    named = (list(models.items()) if isinstance(models, Mapping)
             else [(f"model_{i}", m) for i, m in enumerate(models)])
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
                            "parameters": dict(parameters or {}), "dtype": dtype, "seed": seed}
    if base is not None:
        data["base_model"] = "<memory:base>"
    if sparsify is not None:
        data["sparsify"] = dict(sparsify)
    if out_dtype is not None:
        data["out_dtype"] = out_dtype
    rec = parse_recipe(data, "merge_state_dicts")
    base_ckpt = StateDictCheckpoint("base", base) if base is not None else None
    model_ckpts = [StateDictCheckpoint(task, sd) for task, sd in named]
    stats = _memory_features(features, [task for task, _ in named])
    return MergeJob(rec, base_ckpt, model_ckpts, device=device, features=stats)


def _memory_features(given: Any, tasks: list[str]) -> list[features.FeatureStats] | None:
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
    return [g if isinstance(g, features.FeatureStats) else features.load_stats(g) for g in given]
