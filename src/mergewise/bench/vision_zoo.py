"""The vision zoo: one fine-tuned EfficientNet-Lite0 expert per image task, linear probes on the
frozen ImageNet backbone, and per-task accuracy of any backbone with a task's head.

Why it is built this way (the text zoo's protocol, ``zoo.py``, carried over):
- **Heads kept, backbone merged.** Each expert is the whole backbone fine-tuned with a fresh
  linear head; the head is saved apart (``head.safetensors``) and never merged. A merged backbone
  is scored on each task with that task's expert head; the pretrained row uses linear probes.
- **Seeded.** The batch order is a pure function of (seed, step) (``zoo.batch_indices``), the
  head's initialisation and every step's dropout / stochastic-depth masks are seeded, so a
  rebuild gives the same expert; a different ``seed`` gives another zoo member.
- **BatchNorm statistics frozen by default** (``bn_stats="frozen"``: BN layers stay in eval mode,
  their affine parameters train). With batches of 32 grey images the running statistics would
  otherwise drift per task, and merging averages of variances is not a merge of features; the
  other choice (``"train"``) is kept for the ablation. Their task vectors are then exactly zero.
- **Cached by content** under ``<cache>/vision``: the key hashes the task's split fingerprint, the
  training config and the package versions, like the text zoo (``keys.key_hash``).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .keys import key_hash
from .model import Head
from .vision_model import (
    WEIGHTS_DIST,
    EfficientNetLite,
    load_checkpoint,
    load_pretrained,
    save_checkpoint,
    tiny_backbone,
)
from .vision_tasks import VISION_DISTS, ImageSplit, VisionTask, batch_pixels
from .zoo import Manifest, ProbeConfig, _lr_factor, _optimizer, accuracy, batch_indices, fit_probe

VISION_RECIPE_VERSION = 1  # bump when the training code changes in a way the config does not show


@dataclass(frozen=True)
class VisionTrainConfig:
    """Full fine-tuning of the backbone + a linear head (AdamW, linear warmup then decay)."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3  # backbone
    head_lr: float = 1e-2
    weight_decay: float = 1e-4  # convolutions and the head's weight (not BN, not biases)
    warmup: float = 0.1
    grad_clip: float = 1.0
    bn_stats: str = "frozen"  # "frozen": BN in eval mode while training; "train": update them
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bn_stats not in ("frozen", "train"):
            raise ValueError(f"bn_stats must be 'frozen' or 'train', not {self.bn_stats!r}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("lr", "head_lr", "weight_decay", "warmup", "grad_clip"):
            value = getattr(self, name)
            if not (value == value and 0 <= value < float("inf")):
                raise ValueError(f"{name} must be finite and >= 0, not {value}")


VISION_PROBE = ProbeConfig(train_limit=2000, val_limit=None, l2_grid=(1e-4, 1e-3, 1e-2, 1e-1),
                           iters=200)


def vision_versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "recipe": str(VISION_RECIPE_VERSION)}
    for dist in VISION_DISTS:
        out[dist] = md.version(dist)
    return out


ARCHS = ("lite0", "tiny")


def _arch(arch: str) -> dict[str, str]:
    """The base's part of a cache key: none for Lite0 (the keys built before ``arch`` existed)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown vision base {arch!r}; known: {', '.join(ARCHS)}")
    return {} if arch == "lite0" else {"arch": arch}


def vision_expert_key(task: VisionTask, cfg: VisionTrainConfig, arch: str = "lite0") -> str:
    return key_hash({"kind": "vision-expert", "task": task.name, "data": task.fingerprint(),
                     "train": asdict(cfg), "versions": vision_versions(), **_arch(arch)})


def vision_probe_key(task: VisionTask, cfg: ProbeConfig, arch: str = "lite0") -> str:
    return key_hash({"kind": "vision-probe", "task": task.name, "data": task.fingerprint(),
                     "probe": asdict(cfg), "versions": vision_versions(), **_arch(arch)})


def base_backbone(arch: str = "lite0") -> EfficientNetLite:
    """The zoo's base: the pretrained Lite0 backbone, or ``tiny`` (the CI smoke zoo): the
    ``tiny_config`` backbone initialised at seed 0 (no weights file, the same in any process;
    the global RNG is left as it was)."""
    _arch(arch)
    if arch == "lite0":
        return load_pretrained(num_classes=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return tiny_backbone().eval()


# ---------------------------------------------------------------- features and accuracy
@torch.inference_mode()
def split_features(backbone: EfficientNetLite, split: ImageSplit, batch_size: int = 128) -> torch.Tensor:
    """Pooled features of every image of ``split`` (eval mode; the flag is restored)."""
    was = backbone.training
    backbone.eval()
    try:
        out = [backbone.features(batch_pixels(split.images[s:s + batch_size]))
               for s in range(0, len(split), batch_size)]
    finally:
        backbone.train(was)
    return torch.cat(out) if out else torch.empty(0, backbone.config.head_channels)


def evaluate(backbone: EfficientNetLite, heads: dict[str, Head], tasks: list[VisionTask],
             split: str = "test", limit: int | None = None) -> dict[str, float]:
    """{task: accuracy} of one backbone with each task's own head on ``split`` (first ``limit``)."""
    out = {}
    for task in tasks:
        s = task.split(split).head(limit)
        out[task.name] = accuracy(heads[task.name], split_features(backbone, s), s.labels)
    return out


# ---------------------------------------------------------------- training
def _train_mode(backbone: EfficientNetLite, cfg: VisionTrainConfig) -> None:
    backbone.train()
    if cfg.bn_stats == "frozen":
        for m in backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()


def train_expert(task: VisionTask, cfg: VisionTrainConfig,
                 backbone: EfficientNetLite | None = None,
                 on_step: Callable[[int, float], None] | None = None
                 ) -> tuple[EfficientNetLite, Head, dict[str, Any]]:
    """Fine-tune ``backbone`` (default: the pretrained Lite0) and a fresh head on ``task.train``."""
    backbone = backbone if backbone is not None else load_pretrained(num_classes=None)
    torch.manual_seed(cfg.seed)
    head = torch.nn.Linear(backbone.config.head_channels, len(task.classes))
    dropout = torch.nn.Dropout(backbone.config.dropout)
    # zoo's AdamW groups (no decay on 1-D parameters: here the BN affine ones; head at head_lr)
    opt = _optimizer(backbone, head, cfg)  # type: ignore[arg-type]  # TrainConfig's fields
    labels = torch.as_tensor(task.train.labels, dtype=torch.long)
    losses: list[float] = []
    t0 = time.perf_counter()
    _train_mode(backbone, cfg)
    for step in range(cfg.steps):
        idx = batch_indices(len(labels), cfg.batch_size, cfg.seed, step)
        torch.manual_seed(cfg.seed * 1_000_003 + step + 7)  # dropout masks: a function of the step
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * _lr_factor(step, cfg.steps, cfg.warmup)
        logits = head(dropout(backbone.features(batch_pixels(task.train.images[idx]))))
        loss = torch.nn.functional.cross_entropy(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*backbone.parameters(), *head.parameters()], cfg.grad_clip)
        opt.step()
        losses.append(round(float(loss.detach()), 5))
        if on_step is not None:
            on_step(step + 1, losses[-1])
    backbone.eval()
    info = {"train_seconds": round(time.perf_counter() - t0, 1), "losses": losses,
            "train_examples": len(labels)}
    return backbone, Head(head.weight.detach().clone(), head.bias.detach().clone()), info


# ---------------------------------------------------------------- the zoo on disk
@dataclass
class VisionExpert:
    task: str
    key: str
    path: Path  # model.safetensors + config.json (the backbone), head.safetensors, expert.json

    def backbone(self) -> EfficientNetLite:
        return load_checkpoint(self.path)

    def head(self) -> Head:
        return Head.load(self.path / "head.safetensors")


def vision_cache(cache: Path) -> Path:
    return Path(cache) / "vision"


def find_vision_expert(cache: Path, task: VisionTask, cfg: VisionTrainConfig,
                       arch: str = "lite0") -> VisionExpert | None:
    key = vision_expert_key(task, cfg, arch)
    entry = Manifest(vision_cache(cache)).get("experts", key)
    return None if entry is None else VisionExpert(task.name, key, vision_cache(cache) / entry["path"])


def build_vision_expert(cache: Path, task: VisionTask, cfg: VisionTrainConfig,
                        log: Callable[[str], None] = print, arch: str = "lite0") -> VisionExpert:
    """Train (or find) one task's expert; written to a temp dir and renamed, then the manifest."""
    found = find_vision_expert(cache, task, cfg, arch)
    if found is not None:
        return found
    root = vision_cache(cache)
    key = vision_expert_key(task, cfg, arch)
    rel = Path("experts") / f"{task.name}-{key}"
    backbone, head, info = train_expert(task, cfg, base_backbone(arch))
    val_acc = evaluate(backbone, {task.name: head}, [task], "val")[task.name]
    tmp = root / rel.with_name(rel.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(backbone, tmp)
    head.save(tmp / "head.safetensors")
    meta = {"task": task.name, "classes": list(task.classes), "key": key, "config": asdict(cfg), "arch": arch,
            "versions": vision_versions(), "data_fingerprint": task.fingerprint(),
            "val_accuracy": round(val_acc, 4), "train_seconds": info["train_seconds"],
            "final_loss": sum(info["losses"][-20:]) / max(1, len(info["losses"][-20:]))}
    (tmp / "expert.json").write_text(json.dumps({**meta, "losses": info["losses"]}, indent=2) + "\n")
    shutil.rmtree(root / rel, ignore_errors=True)
    os.replace(tmp, root / rel)
    Manifest(root).put("experts", key, {"path": str(rel), **meta})
    log(f"{task.name}: vision expert val accuracy {val_acc:.4f} ({info['train_seconds']:.0f} s, "
        f"{cfg.steps} steps)")
    return VisionExpert(task.name, key, root / rel)


def find_vision_probe(cache: Path, task: VisionTask, cfg: ProbeConfig = VISION_PROBE,
                      arch: str = "lite0") -> tuple[Head, dict[str, Any]] | None:
    root = vision_cache(cache)
    entry = Manifest(root).get("probes", vision_probe_key(task, cfg, arch))
    return None if entry is None else (Head.load(root / entry["path"]), entry)


def build_vision_probe(cache: Path, task: VisionTask, cfg: ProbeConfig = VISION_PROBE,
                       backbone: EfficientNetLite | None = None,
                       arch: str = "lite0") -> tuple[Head, dict[str, Any]]:
    """A linear probe on the frozen base backbone (L2 chosen on val), cached."""
    found = find_vision_probe(cache, task, cfg, arch)
    if found is not None:
        return found
    root = vision_cache(cache)
    key = vision_probe_key(task, cfg, arch)
    backbone = backbone if backbone is not None else base_backbone(arch)
    tr, va = task.train.head(cfg.train_limit), task.val.head(cfg.val_limit)
    t0 = time.perf_counter()
    head, val_acc, l2 = fit_probe(split_features(backbone, tr), tr.labels,
                                  split_features(backbone, va), va.labels, len(task.classes), cfg)
    rel = Path("probes") / f"{task.name}-{key}.safetensors"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    tmp = root / rel.with_suffix(".tmp")
    head.save(tmp)
    os.replace(tmp, root / rel)
    entry = {"task": task.name, "path": str(rel), "val_accuracy": round(val_acc, 4), "l2": l2,
             "seconds": round(time.perf_counter() - t0, 1), "config": asdict(cfg)}
    Manifest(root).put("probes", key, entry)
    return head, entry


def build_vision_zoo(tasks: list[VisionTask], cache: Path, cfg: VisionTrainConfig = VisionTrainConfig(),
                     log: Callable[[str], None] = print, probe: ProbeConfig = VISION_PROBE,
                     arch: str = "lite0") -> dict[str, VisionExpert]:
    """Every task's expert and probe (built or found) on the ``arch`` base; {task: expert}."""
    experts = {t.name: build_vision_expert(cache, t, cfg, log, arch) for t in tasks}
    backbone = base_backbone(arch)
    for t in tasks:
        _, entry = build_vision_probe(cache, t, probe, backbone, arch)
        log(f"{t.name}: linear probe on the frozen backbone, val accuracy {entry['val_accuracy']:.4f}")
    return experts


__all__ = ["ARCHS", "VISION_PROBE", "VisionExpert", "VisionTrainConfig", "WEIGHTS_DIST", "base_backbone",
           "build_vision_expert", "build_vision_probe", "build_vision_zoo", "evaluate", "find_vision_expert",
           "find_vision_probe", "split_features", "train_expert"]
