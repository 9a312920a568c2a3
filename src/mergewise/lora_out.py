"""A merge written as a PEFT LoRA adapter (``--out-format lora``) instead of full weights.

The merge runs as usual (same job, same task vectors, computed in the compute dtype); each
output tensor's *merged task vector* ``merged - base`` (the difference taken in float64, so
only the merge's own rounding remains) then goes one of three ways:

- a LoRA target (every module an input adapter adapts, Linear or Embedding; with full
  checkpoints only, every 2-D ``*.weight`` except embeddings) is re-factored by a truncated
  SVD ``delta ~ U_r S_r V_r^T``, split symmetrically: ``lora_B = U_r sqrt(S_r)``,
  ``lora_A = sqrt(S_r) V_r^T`` (PEFT's ``add_weighted_adapter(combination_type="svd")`` puts
  all of S into B; the product is the same, the symmetric split keeps both factors at one
  scale). Transposed first where PEFT stores it so (``fan_in_fan_out``, embeddings). The rank is
  ``--lora-rank R`` (at most min(out, in)) or, with ``--lora-energy e``, the smallest r keeping
  a fraction e of ``||delta||_F^2``; ``lora_alpha = r`` per module (scale 1; ``rank_pattern`` and
  ``alpha_pattern`` list the modules whose r differs from the config's ``r``);
- a module's changed bias becomes its ``lora_B.bias`` (``lora_bias: true``);
- any other tensor that moved goes, with its module's other tensors, to ``modules_to_save``
  (full merged weights);
- tensors whose merged task vector is zero are left out (the base's).

Per module, the report gives the rank and the measured relative Frobenius error
``||delta - B @ A||_F / ||delta||_F`` (float64). ``lora_A``/``lora_B`` are written in float32
(``out_dtype`` when given), ``modules_to_save`` tensors in the base's dtype (or ``out_dtype``).
The adapter is held in memory until written (it is small by construction; ``modules_to_save``
tensors are whole), into an atomic output directory (``target.atomic_directory``).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .engine import MergeJob
from .errors import RecipeError
from .inputs import InputPaths, open_inputs
from .lora import PREFIX, LoraCheckpoint
from .recipe import Recipe
from .report import tensor_rows, write_tables
from .target import atomic_directory
from .tensors import float_dtype
from .version import __version__

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|embeddings?|word_embeddings|wte|wpe|embed_in)$")


@dataclass(frozen=True)
class RankRule:
    """How many singular directions a module keeps: a fixed ``rank`` or an ``energy`` share."""

    rank: int | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.energy is None):
            raise RecipeError("--out-format lora: give one of --lora-rank R or --lora-energy E")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int)
                                      or self.rank < 1):
            raise RecipeError(f"--lora-rank {self.rank!r}: give a positive integer")
        if self.energy is not None and not (0 < self.energy <= 1):
            raise RecipeError(f"--lora-energy {self.energy!r}: give a fraction in (0, 1]")

    def of(self, singular: torch.Tensor) -> int:
        """The rank kept of a spectrum (descending singular values)."""
        if self.rank is not None:
            return min(self.rank, singular.numel())
        power = singular.double().square()
        kept = torch.cumsum(power, 0) / power.sum()
        # the energy reached is compared with a little slack for the float64 cumsum
        return min(int(torch.searchsorted(kept, torch.tensor(self.energy - 1e-12,
                                                            dtype=kept.dtype))) + 1,
                   singular.numel())

    def describe(self) -> str:
        return f"rank {self.rank}" if self.rank is not None else f"energy {self.energy}"


@dataclass(frozen=True)
class Factored:
    """One module's truncated SVD: ``delta ~ b @ a`` (in the stored orientation)."""

    b: torch.Tensor
    a: torch.Tensor
    rank: int
    relative_error: float


def factor(delta: torch.Tensor, rule: RankRule, transpose: bool = False) -> Factored:
    """``delta`` (or ``delta.T``) as ``B @ A`` of the rule's rank, singular values split
    symmetrically, with the measured relative Frobenius error of the truncation."""
    m = delta.T if transpose else delta
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    r = max(1, rule.of(s))
    root = s[:r].sqrt()
    b = (u[:, :r] * root).contiguous()
    a = (root[:, None] * vh[:r]).contiguous()
    return Factored(b, a, r, relative_error(m, b, a))


def _targets(models: list[Any], names: list[str]) -> dict[str, str]:
    """Output tensor -> how it is factored ("linear", "linear_t" (fan_in_fan_out) or
    "embedding"): the modules input adapters adapt; without adapters, 2-D weights except
    embeddings."""
    adapters = [m for m in models if isinstance(m, LoraCheckpoint)]
    if adapters:
        out: dict[str, str] = {}
        for ad in adapters:
            for name, item in ad.low_rank.items():
                if item.a_key is None:
                    continue
                kind = ("embedding" if "lora_embedding" in item.a_key
                        else "linear_t" if item.transpose else "linear")
                out.setdefault(name, kind)
        return out
    return {n: "linear" for n in names
            if n.endswith(".weight") and not _EMBEDDING.search(n.removesuffix(".weight"))}


class AdapterSink:
    """Takes the merged tensors in plan order; keeps the adapter's tensors and records."""

    def __init__(self, job: MergeJob, targets: dict[str, str], rule: RankRule,
                 out_dtype: torch.dtype | None):
        assert job.base is not None
        self.job, self.targets, self.rule = job, targets, rule
        self.lora_dtype = out_dtype or torch.float32
        self.out_dtype = out_dtype
        self.tensors: dict[str, torch.Tensor] = {}
        self.modules: list[dict[str, Any]] = []
        self.moved: dict[str, torch.Tensor] = {}  # merged weights of moved non-target tensors
        self.lora_bias = False

    def __call__(self, name: str, merged: torch.Tensor) -> None:
        plan = self._plans.get(name)
        if plan is None or not plan.merged:
            return
        base = self.job.load(self.job.base, plan.base_name)
        delta = (merged.to(base.device, torch.float64) - base.double())
        if not bool(delta.any()):
            return
        kind = self.targets.get(name)
        module = name.rsplit(".", 1)[0]
        if kind is not None and delta.dim() == 2:
            f = factor(delta.to(base.dtype), self.rule, transpose=kind != "linear")
            a_name, b_name = (("lora_embedding_A", "lora_embedding_B") if kind == "embedding"
                              else ("lora_A.weight", "lora_B.weight"))
            self.tensors[f"{PREFIX}{module}.{a_name}"] = f.a.to(self.lora_dtype).cpu()
            self.tensors[f"{PREFIX}{module}.{b_name}"] = f.b.to(self.lora_dtype).cpu()
            self.modules.append({"module": module, "tensor": name, "kind": kind,
                                 "shape": list(delta.shape), "rank": f.rank,
                                 "relative_error": f.relative_error,
                                 "delta_norm": float(torch.linalg.vector_norm(delta))})
        elif name.endswith(".bias") and f"{module}.weight" in self.targets and delta.dim() == 1:
            self.tensors[f"{PREFIX}{module}.lora_B.bias"] = delta.to(self.lora_dtype).cpu()
            self.lora_bias = True
        else:
            self.moved[name] = merged

    def start(self) -> None:
        self._plans = {p.name: p for p in self.job.tensors}

    def modules_to_save(self) -> list[str]:
        """The modules of moved non-target tensors; all their tensors are written whole."""
        modules = sorted({n.rsplit(".", 1)[0] for n in self.moved})
        for plan in self.job.tensors:
            module = plan.name.rsplit(".", 1)[0]
            if module in modules and plan.merged:
                merged = self.moved.get(plan.name)
                if merged is None:  # unchanged tensor of a saved module: the base's
                    merged = self.job.base.read(plan.base_name)  # type: ignore[union-attr]
                dtype = self.out_dtype or self.job.base.info(plan.base_name).dtype  # type: ignore[union-attr]
                self.tensors[f"{PREFIX}{plan.name}"] = merged.to(dtype).contiguous().cpu()
        return modules


def adapter_config(sink: AdapterSink, base_path: Path, fan_in_fan_out: bool,
                   modules_to_save: list[str]) -> dict[str, Any]:
    """PEFT's adapter_config.json: r the most common rank, lora_alpha = r (scale 1), the
    other modules' r and alpha in rank_pattern / alpha_pattern (regex-escaped full names)."""
    ranks = Counter(m["rank"] for m in sink.modules)
    r = ranks.most_common(1)[0][0] if ranks else 1
    pattern = {re.escape(m["module"]): m["rank"] for m in sink.modules if m["rank"] != r}
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": str(base_path),
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(m["module"] for m in sink.modules),
        "modules_to_save": modules_to_save or None, "lora_dropout": 0.0,
        "fan_in_fan_out": fan_in_fan_out, "bias": "none", "lora_bias": sink.lora_bias,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "revision": None,
    }  # no key of our own: PEFT warns about unknown keys (the rank rule is in the report)


def summary_of(modules: list[dict[str, Any]], saved: list[str], rule: RankRule
               ) -> dict[str, Any]:
    errors = [m["relative_error"] for m in modules]
    ranks = [m["rank"] for m in modules]
    return {"rank_rule": rule.describe(), "modules": len(modules),
            "rank_min": min(ranks, default=0), "rank_max": max(ranks, default=0),
            "relative_error_max": max(errors, default=0.0),
            "relative_error_mean": sum(errors) / len(errors) if errors else 0.0,
            "modules_to_save": saved}


def summary_line(summary: dict[str, Any]) -> str:
    """The CLI's one line about the written adapter."""
    ranks = (f"rank {summary['rank_min']}" if summary["rank_min"] == summary["rank_max"]
             else f"ranks {summary['rank_min']}-{summary['rank_max']}")
    saved = summary["modules_to_save"]
    tail = f"; modules_to_save: {', '.join(saved[:4])}{' ...' if len(saved) > 4 else ''}" if saved else ""
    return (f"lora adapter: {summary['modules']} modules, {ranks} ({summary['rank_rule']}), "
            f"truncation error ||delta - BA||/||delta|| max {summary['relative_error_max']:.3g}, "
            f"mean {summary['relative_error_mean']:.3g}{tail}")


def _check(rec: Recipe) -> None:
    if rec.slices is not None:
        raise RecipeError("--out-format lora: a slices: recipe changes the layer stack; write "
                          "full weights")
    if not rec.base_model:
        raise RecipeError("--out-format lora needs base_model: an adapter is a change of a base")
    if rec.vocabulary is not None:
        raise RecipeError("--out-format lora: a tokenizer/vocabulary change resizes embeddings; "
                          "write full weights")


def merge_to_adapter(rec: Recipe, paths: InputPaths, target: Path | None, rule: RankRule, *,
                     overwrite: bool, device: str, dry_run: bool,
                     protect: list[tuple[str, Path]]) -> dict[str, Any]:
    """Run the recipe's merge and write it to ``target`` as a PEFT LoRA adapter directory;
    returns ``{"summary": plan summary, "lora": adapter summary (None on a dry run), ...}``."""
    _check(rec)
    if rec.method.task_specific:
        raise RecipeError(f"--out-format lora: {rec.merge_method} yields one model per task, "
                          "not one merged model")
    compute = rec.dtype or "float32"
    out_dtype = float_dtype(rec.out_dtype) if rec.out_dtype else None
    # the merged tensors come back in the compute dtype, never rounded to a bf16 base's
    as_computed = rec.model_copy(update={"out_dtype": compute})
    with open_inputs(paths.base, paths.models, paths.adapter_bases) as (base, models):
        job = MergeJob(as_computed, base, models, device=device)
        summary = job.summary()
        if dry_run:
            return {"summary": summary, "lora": None}
        assert target is not None and paths.base is not None
        start = time.perf_counter()
        sink = AdapterSink(job, _targets(models, [t.name for t in job.tensors]), rule, out_dtype)
        sink.start()
        records = job.run(sink)
        saved = sink.modules_to_save()
        fan = any(m["kind"] == "linear_t" for m in sink.modules)
        config = adapter_config(sink, paths.base.resolve(), fan, saved)
        lora = summary_of(sink.modules, saved, rule)
        report = {"mergewise_version": __version__, "merge_method": rec.merge_method,
                  "out_format": "lora", "tasks": [s.task for s in job.slots],
                  "seconds": round(time.perf_counter() - start, 3), "plan": summary.__dict__,
                  "lora": {**lora, "per_module": sink.modules}}
        from safetensors.torch import save_file  # imports torch: not on a dry run

        with atomic_directory(target, overwrite, protect) as tmp:
            save_file(sink.tensors, tmp / ADAPTER_WEIGHTS,
                      metadata={"format": "pt", "mergewise_version": __version__})
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
            (tmp / "mergewise_recipe.yaml").write_text(rec.to_yaml())
            (tmp / "README.md").write_text(_card(rec, lora))
            write_tables(tmp, report, tensor_rows(records, report["tasks"]))
        return {"summary": summary, "lora": lora, "records": records,
                "seconds": time.perf_counter() - start,
                "files": [ADAPTER_WEIGHTS, ADAPTER_CONFIG]}


def _card(rec: Recipe, lora: dict[str, Any]) -> str:
    return (f"---\nlibrary_name: peft\nbase_model: {rec.base_model}\ntags:\n- mergewise\n- lora\n"
            f"---\n# {rec.name or 'Merged LoRA adapter'}\n\nA **{rec.merge_method}** merge by "
            f"mergewise {__version__}, written as a LoRA adapter: {summary_line(lora)}.\n\n"
            f"```yaml\n{rec.to_yaml().rstrip()}\n```\n")


def relative_error(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """``||delta - b @ a||_F / ||delta||_F`` in float64 (0 for a zero delta)."""
    d = delta.double()
    norm = float(torch.linalg.vector_norm(d))
    return float(torch.linalg.vector_norm(d - b.double() @ a.double())) / norm if norm else 0.0
