"""``mergewise bench run --zoo vision``: the vision zoo behind the text benchmark's row machinery.

Why it is built this way:
- **One runner.** ``runner`` (rows, validation-selected grids, the per-evaluation result cache,
  early stop, zoo seeds, ``--ray``) only reads what a ``runner.Zoo`` holds: the base and expert
  state dicts, the heads and probes, a validation and a test evaluator, calibration batches and
  the cache-key context. ``VisionZoo`` is that object for EfficientNet-Lite backbones; the one
  text-specific piece, how a batch becomes pooled features, is ``VisionEvaluator.encode``.
- **Heads kept, backbone merged**, as in text: a merged backbone is scored on each task with
  that task's expert head; the pretrained rows use linear probes on the frozen base backbone.
- **Calibration for the data-aware rows** (LOT, RegMean, RegMean++, Fisher): ``CALIBRATION``
  images drawn (seeded) from each task's training split. More than text's 64: at 64 px the late
  layers see 4 positions per image, and their Grams are up to 1152 wide. The capture covers the
  stem, pointwise and head convolutions (unfold Grams); depthwise convolutions (groups > 1) and
  BatchNorm get none and follow each method's fallback (RegMean, LOT: the mean task vector).
- **What differs from text** is written into the results (``NOTES``), never left implicit.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .evaluate import Evaluator, _Prepared
from .report import markdown_table, selected_text, write_outputs
from .results_cache import ResultCache
from .rows import variant
from .runner import SMOKE_RUN, CachedZoo, RunConfig, Zoo, merge, merge_spec, run_benchmark, run_context
from .vision_merge import format_kind_table, kind_table
from .vision_tasks import VisionTask, batch_pixels, load_vision_task
from .vision_zoo import (
    VISION_PROBE,
    ProbeConfig,
    VisionExpert,
    VisionTrainConfig,
    base_backbone,
    build_vision_zoo,
    find_vision_expert,
    find_vision_probe,
    vision_probe_key,
)
from .zoo import with_seed, with_steps
from .zoos import markdown as zoos_markdown


@dataclass(frozen=True)
class VisionZooConfig:
    """The vision zoo's recipe: expert training, probes, and the base (``lite0`` | ``tiny``)."""

    train: VisionTrainConfig = field(default_factory=VisionTrainConfig)
    probe: ProbeConfig = VISION_PROBE
    arch: str = "lite0"


VISION_FULL = VisionZooConfig()
# CI smoke: the tiny random-init backbone, a few steps, small probes (accuracies mean little)
VISION_SMOKE = VisionZooConfig(VisionTrainConfig(steps=8, batch_size=16, lr=3e-3, head_lr=3e-2),
                               ProbeConfig(train_limit=256, val_limit=64, iters=50), "tiny")
VISION_SMOKE_TASKS = ("digits", "mnist5k")
VISION_SMOKE_METHODS = ("task_arithmetic", "ties", "ties+tadrop", "regmean", "lot")
CALIBRATION = {"examples": 512, "split": "train", "seed": 0, "batch_size": 64}
NOTES = (  # (the rows a note is about, the note): written into results.md when one of them ran
    (("lot", "regmean", "regmean_plusplus"),
     "depthwise convolutions (groups > 1) and BatchNorm layers get no feature statistics: the "
     "data-aware rows (LOT, RegMean, RegMean++) merge those tensors by their fallback rule "
     "(the mean task vector)"),
    (("regmean_plusplus",),
     "regmean_plusplus: the backbone's blocks are an nn.Sequential, not a ModuleList, so the "
     "sequential capture sees one unit and RegMean++ is RegMean with its own alpha"),
)


def notes_for(doc: dict[str, Any]) -> list[str]:
    """The skipped rows' notes, then the ``NOTES`` about rows this run has."""
    methods = {r["label"].removesuffix("+tadrop") for r in doc["rows"]}
    return [*doc.get("skipped", []), *(n for rows, n in NOTES if methods.intersection(rows))]


def vision_run_config(smoke: bool) -> RunConfig:
    """The default vision run: the text run's rows and grids on the vision zoo (``smoke``: the
    smoke grids, a TADrop row and two data-aware rows on the tiny zoo)."""
    if smoke:
        return replace(SMOKE_RUN, zoo=VISION_SMOKE, methods=VISION_SMOKE_METHODS)
    return RunConfig(zoo=VISION_FULL)


class VisionEvaluator(Evaluator):
    """``Evaluator`` on image splits: batches are uint8 image slices in split order, turned
    into network input per batch (a split's float pixels would be 49 kB per image)."""

    def __init__(self, tasks: list[VisionTask], split: str, limit: int | None,
                 model: torch.nn.Module, batch_size: int = 128):  # no tokenizer: not super()'s
        self.split, self.tasks, self.model, self.seconds = split, [t.name for t in tasks], model, 0.0
        self.data = {}
        for t in tasks:
            s = t.split(split).head(limit)
            batches = [s.images[i:i + batch_size] for i in range(0, len(s), batch_size)]
            self.data[t.name] = _Prepared(batches, torch.arange(len(s)),  # type: ignore[arg-type]
                                          torch.as_tensor(s.labels, dtype=torch.long))

    def encode(self, batch: Any) -> torch.Tensor:
        return self.model(batch_pixels(batch))  # the backbone's forward: pooled features


@dataclass
class VisionZoo(Zoo):
    def classifier(self, task: str) -> torch.nn.Module:
        """Expert ``task``'s backbone with its head on the pooled features (the parameter
        names stay the backbone's, which the merge looks up)."""
        module = copy.deepcopy(self.val.model)
        module.load_state_dict(self.expert_sd[task], strict=True)
        pooled, head = module.forward, self.heads[task]
        module.forward = lambda x: head(pooled(x))  # type: ignore[method-assign]
        return module


def calibration_batches(task: VisionTask) -> list[torch.Tensor]:
    """``CALIBRATION['examples']`` training images (seeded draw), as network-input batches."""
    from ..features import draw_examples

    train = task.split(CALIBRATION["split"])
    pick = np.asarray(draw_examples(len(train), CALIBRATION["examples"], CALIBRATION["seed"]))
    size = CALIBRATION["batch_size"]
    return [batch_pixels(train.images[pick[i:i + size]]) for i in range(0, len(pick), size)]


def build_hint(tasks: list[str], cache: Path, zoo: VisionZooConfig) -> str:
    """The ``bench build`` command that builds the zoo a run asked for."""
    smoke = " --smoke" if replace(zoo, train=replace(zoo.train, seed=0)) == VISION_SMOKE else ""
    seed = f" --seed {zoo.train.seed}" if zoo.train.seed else ""
    return f"mergewise bench build --zoo vision --cache {cache} --tasks {','.join(tasks)}{smoke}{seed}"


def load_vision_zoo(tasks: list[str], cache: Path, config: RunConfig) -> VisionZoo:
    """The cached vision zoo of ``config.zoo``; a missing expert or probe is one line."""
    zc: VisionZooConfig = config.zoo  # type: ignore[assignment]
    loaded = [load_vision_task(t) for t in tasks]
    experts = {t.name: find_vision_expert(cache, t, zc.train, zc.arch) for t in loaded}
    probes = {t.name: find_vision_probe(cache, t, zc.probe, zc.arch) for t in loaded}
    missing = [n for n in tasks if experts[n] is None or probes[n] is None]
    if missing:
        raise FileNotFoundError(f"no cached vision expert/probe for {', '.join(missing)} in {cache} "
                                f"with this recipe; run `{build_hint(tasks, cache, zc)}` first")
    model = base_backbone(zc.arch)  # one module for both evaluators; the base weights cloned first
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    found: dict[str, VisionExpert] = experts  # type: ignore[assignment]
    return VisionZoo(
        tasks=list(tasks), base=base, experts=found,  # type: ignore[arg-type]
        expert_sd={n: e.backbone().state_dict() for n, e in found.items()},
        heads={n: e.head() for n, e in found.items()},
        probes={n: p[0] for n, p in probes.items()},  # type: ignore[index]
        val=VisionEvaluator(loaded, "val", config.val_limit, model),
        test=VisionEvaluator(loaded, "test", config.test_limit, model),
        calibration={t.name: calibration_batches(t) for t in loaded},  # type: ignore[misc]
        probe_keys={t.name: vision_probe_key(t, zc.probe, zc.arch) for t in loaded},
        context={"zoo": "vision", "arch": zc.arch, "calibration": CALIBRATION})


@dataclass(frozen=True)
class CachedVisionZoo(CachedZoo):
    """Picklable recipe of the zoo built by ``bench build --zoo vision`` (what Ray workers load)."""

    def load(self) -> VisionZoo:
        return load_vision_zoo(list(self.tasks), self.cache, self.config)


def build_vision(tasks: list[str], cache: Path, smoke: bool, steps: int | None, seeds: Sequence[int],
                 log: Callable[[str], None] = print) -> None:
    """``bench build --zoo vision``: each seed's experts and probes, built or found by content."""
    zc = with_steps(VISION_SMOKE if smoke else VISION_FULL, steps)
    loaded = [load_vision_task(t) for t in tasks]
    for s in seeds:
        if len(seeds) > 1:
            log(f"zoo seed {s}")
        cfg = with_seed(zc, s)
        build_vision_zoo(loaded, cache, cfg.train, log, probe=cfg.probe, arch=cfg.arch)


# ---------------------------------------------------------------- the run and its extras
def kind_tables(zoo: VisionZoo, doc: dict[str, Any], config: RunConfig,
                results: ResultCache) -> dict[str, list[dict[str, Any]]]:
    """{TADrop row: ``vision_merge.kind_table`` of its selected merge}: d and drop rates per
    task and module kind. The selected candidate is merged once more with per-tensor records
    (merges are deterministic: the very merge that was scored); cached like every evaluation."""
    from ..report import tensor_rows

    out = {}
    for row in doc["rows"]:
        if row["kind"] != "tadrop":
            continue
        v, chosen = variant(row["label"], config.grids), row["selected"]
        spec = merge_spec(v, chosen, "kinds")
        hit = results.get(v.label, spec)
        if hit is None:
            records: list[dict[str, Any]] = []
            merge(zoo, v, chosen, config.seed, records)
            hit = {"kinds": kind_table({"rows": tensor_rows(records, zoo.tasks)})}
            results.put(v.label, spec, hit)
        out[row["label"]] = hit["kinds"]
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def vision_markdown(doc: dict[str, Any]) -> str:
    """The results table, then the notes, then one kind table per TADrop row."""
    lines = [markdown_table(doc) if "zoo_seeds" not in doc else zoos_markdown(doc)]
    if doc.get("notes"):
        lines += ["Notes:", "", *(f"- {n}" for n in doc["notes"]), ""]
    selected = {r["label"]: r.get("selected") for r in doc["rows"]}
    for label, rows in doc.get("kind_tables", {}).items():
        lines += [f"TADrop per module kind, {label} ({selected_text(selected[label])}):", "",
                  format_kind_table(rows), ""]
    return "\n".join(lines)


def run_vision_benchmark(tasks: Sequence[str], cache: Path, out: Path, config: RunConfig, *,
                         progress: bool = True, log: Callable[[str], None] = print,
                         zoo_seeds: Sequence[int] | None = None, ray: Any = None) -> dict[str, Any]:
    """``runner.run_benchmark`` on the vision zoo, then each zoo's TADrop kind tables and the
    notes (``NOTES``, and any skipped row) added to its results.{json,md}."""
    doc = run_benchmark(tasks, cache, out, config, progress=progress, log=log, zoo_seeds=zoo_seeds,
                        ray=ray, source=CachedVisionZoo)
    single = not zoo_seeds or len(zoo_seeds) == 1
    runs = [(out, zoo_seeds[0] if zoo_seeds else None)] if single else \
        [(out / f"zoo-{s}", s) for s in zoo_seeds]  # type: ignore[union-attr]
    notes: list[str] = []
    for where, seed in runs:
        cfg = replace(config, zoo=with_seed(config.zoo, seed))
        one = doc if single else json.loads((where / "results.json").read_text())
        notes = notes_for(one)
        zoo = CachedVisionZoo(tuple(tasks), cache, cfg).load()
        one.update(model="EfficientNet-Lite backbones", notes=notes,
                   kind_tables=kind_tables(zoo, one, cfg, ResultCache(out, run_context(zoo, cfg))))
        write_outputs(where, one)
        _write_atomic(where / "results.md", vision_markdown(one))
    if not single:
        doc["notes"] = notes
        _write_atomic(out / "results.json", json.dumps(doc, indent=1) + "\n")
        _write_atomic(out / "results.md", vision_markdown(doc))
    return doc


__all__ = ["CALIBRATION", "build_vision", "NOTES", "VISION_FULL", "VISION_SMOKE", "VISION_SMOKE_TASKS",
           "CachedVisionZoo", "VisionEvaluator", "VisionZoo", "VisionZooConfig",
           "kind_tables", "load_vision_zoo", "run_vision_benchmark", "vision_run_config"]
