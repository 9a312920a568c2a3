"""Diagonal Fisher capture: per-prediction squared gradients of the model's own log-likelihood.

F[θ] = (1/P) Σ_predictions Σ_y w(y) (∂ log p(y|x)/∂θ)², one "prediction" being one example of a
classifier (logits (batch, classes)) or one real token of a per-token head (logits (batch, seq,
classes): a causal LM's next-token head, a token classifier; padded tokens, attention_mask 0,
are no predictions). It is the mean of per-prediction squared gradients, never the square of a
batch gradient: each example runs alone (batch of one, its padding masked by its own mask) and
each label's gradient is squared before it is added. The labels come from the model itself
(label-free; no data labels are read), ``labels``:

| labels       | w(y)                              | gradients / prediction | estimates           |
|--------------|-----------------------------------|------------------------|---------------------|
| ``expected`` | p(y\\|x) for every class y         | one per class          | the Fisher exactly  |
| ``sample``   | 1 for one y ~ p(·\\|x) (seeded)     | one                    | the Fisher, unbiased |
| ``argmax``   | 1 for y = argmax p                | one                    | not the Fisher (a shortcut) |
| ``auto``     | ``expected`` up to 64 classes, else ``sample`` |           |                     |

``expected`` is refused above 1024 classes (a vocabulary: 49k backward passes per token). The
model runs in eval mode (no dropout) in float32; sums are float64. Parameters no gradient
reaches (frozen ones, a pooler a head never reads) are not stored: the merge's fallback applies.
A tied parameter (embedding and LM head) is stored once, under its first name, its other names
recorded as aliases. A 1-logit (regression) head has no label-free Fisher and is refused.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import FeatureError
from ..recipe import Calibration
from .calibration import Batch
from .capture import PROBE_TENSORS, CaptureReport, prepare_expert
from .fisherfile import PREFIX, FisherStats, load_fisher
from .sources import StatsKind
from .statsfile import probe_hash

LABELS = ("auto", "expected", "sample", "argmax")
AUTO_EXPECTED_MAX = 64  # classes up to which ``auto`` takes the exact expectation
EXPECTED_MAX = 1024  # classes above which ``expected`` is refused (one backward per class)


def fisher_capture(module: nn.Module, batches: Iterable[Batch], *, labels: str = "auto",
                   seed: int = 0, label: str = "model",
                   calibration: Mapping[str, object] | None = None,
                   probe_from: Iterable[str] | None = None) -> FisherStats:
    """The diagonal Fisher of ``module`` on ``batches`` (dicts of model inputs, or tensors).

    Keys are ``module.named_parameters()`` names. ``seed`` seeds the ``sample`` labels. The
    module's training flag and gradients are restored afterwards."""
    if labels not in LABELS:
        raise FeatureError(f"calibration.labels {labels!r}: use one of {', '.join(LABELS)}")
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if not params:
        raise FeatureError(f"{label}: has no trainable parameter to compute a Fisher of")
    sums = {n: torch.zeros(p.shape, dtype=torch.float64, device=p.device)
            for n, p in params.items()}
    touched: set[str] = set()
    gen = torch.Generator().manual_seed(seed)
    was_training = module.training
    module.eval()
    examples = predictions = 0
    used = labels
    try:
        for example in _examples(batches, _device(module)):
            log_probs = _log_probs(module, example, label)
            used = _resolve(labels, log_probs.shape[-1], label)
            for weight, target in _terms(log_probs, used, gen):
                grads = torch.autograd.grad(target, list(params.values()), retain_graph=True,
                                            allow_unused=True)
                for (name, _), g in zip(params.items(), grads, strict=True):
                    if g is not None:
                        touched.add(name)
                        sums[name].add_(g.detach().to(torch.float64).square_(), alpha=weight)
            examples += 1
            predictions += log_probs.shape[0]
    finally:
        module.train(was_training)
    if examples == 0 or predictions == 0:
        raise FeatureError(f"{label}: got no calibration prediction ({examples} examples; is every "
                           "token masked out by attention_mask?); the Fisher needs at least one")
    # float32, as the stats file stores it: a merge from memory equals one from the file
    fisher = {n: (sums[n] / predictions).to("cpu", torch.float32) for n in params if n in touched}
    return _stats(module, fisher, examples=examples, predictions=predictions, labels=used,
                  label=label, calibration=calibration, probe_from=probe_from)


def _device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def _examples(batches: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    """Every example of every batch alone (a batch of one), on ``device``."""
    for batch in batches:
        if isinstance(batch, torch.Tensor):
            for r in range(batch.shape[0]):
                yield batch[r:r + 1].to(device)
            continue
        size = next((v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor)), 0)
        for r in range(size):
            yield {k: v[r:r + 1].to(device) if isinstance(v, torch.Tensor) and v.dim() >= 1
                   and v.shape[0] == size else v for k, v in batch.items()}


def _log_probs(module: nn.Module, example: Batch, label: str) -> torch.Tensor:
    """(predictions, classes) log-softmax of one example's logits, padded tokens removed."""
    out = module(example) if isinstance(example, torch.Tensor) else module(**example)
    logits = getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)) and logits:
        logits = logits[0]
    if not isinstance(logits, torch.Tensor) or logits.dim() not in (2, 3):
        raise FeatureError(f"{label}: the Fisher needs a model with a head returning logits of "
                           "shape (batch, classes) or (batch, tokens, classes); this one returns "
                           f"{_shape_text(logits)} (load it with its head: a "
                           "...ForSequenceClassification or ...ForCausalLM directory)")
    if logits.shape[-1] < 2:
        raise FeatureError(f"{label}: its head has {logits.shape[-1]} logit (a regression head); "
                           "a label-free Fisher needs a softmax over 2 or more classes")
    rows = logits.reshape(-1, logits.shape[-1])
    mask = example.get("attention_mask") if isinstance(example, Mapping) else None
    if logits.dim() == 3 and isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(
            logits.shape[:2]):
        rows = logits[mask.bool()]
    return torch.log_softmax(rows.float(), dim=-1)


def _shape_text(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"


def _resolve(labels: str, classes: int, label: str) -> str:
    if labels == "auto":
        return "expected" if classes <= AUTO_EXPECTED_MAX else "sample"
    if labels == "expected" and classes > EXPECTED_MAX:
        raise FeatureError(f"{label}: labels: expected needs one backward pass per class and "
                           f"prediction, and the head has {classes} classes; use labels: sample")
    return labels


def _terms(log_probs: torch.Tensor, labels: str, gen: torch.Generator
           ) -> Iterator[tuple[float, torch.Tensor]]:
    """(w(y), log p(y|x)) of every label whose squared gradient enters the Fisher."""
    probs = log_probs.detach().exp().to("cpu", torch.float64)
    for i in range(log_probs.shape[0]):
        if labels == "expected":
            for c in range(log_probs.shape[1]):
                if probs[i, c] > 0:
                    yield float(probs[i, c]), log_probs[i, c]
            continue
        c = (int(torch.multinomial(probs[i], 1, generator=gen)) if labels == "sample"
             else int(probs[i].argmax()))
        yield 1.0, log_probs[i, c]


def _stats(module: nn.Module, fisher: dict[str, torch.Tensor], *, examples: int,
           predictions: int, labels: str, label: str,
           calibration: Mapping[str, object] | None,
           probe_from: Iterable[str] | None) -> FisherStats:
    """The Fisher with its stats file's metadata: norm, tied-name aliases, probe."""
    if not fisher:
        raise FeatureError(f"{label}: no parameter received a gradient; nothing to store")
    every = dict(module.named_parameters(remove_duplicate=False))
    aliases = {}
    for name, p in every.items():
        if name not in fisher:
            first = next((n for n in fisher if every[n] is p), None)
            if first is not None:
                aliases[name] = first
    allowed = set(probe_from) if probe_from is not None else set(every)
    probe = [n for _, n in sorted((every[n].numel(), n) for n in fisher if n in allowed)
             ][:PROBE_TENSORS]
    norm = math.sqrt(sum(float(t.double().square().sum()) for t in fisher.values()))
    metadata = {"model": label, "examples": str(examples), "rows": str(predictions),
                "labels": labels, "fisher_norm": repr(norm),
                "calibration": json.dumps(dict(calibration or {}), sort_keys=True),
                "probe_tensors": json.dumps(probe),
                "probe": probe_hash([every[n] for n in probe])}
    tensors = {PREFIX + n: t for n, t in fisher.items()}
    return FisherStats({n: t.shape for n, t in fisher.items()}, tensors, aliases=aliases,
                       metadata=metadata, label=f"fisher of {label}")


def capture_fisher_expert(model_path: Path, data_path: Path, *, num_examples: int = 64,
                          batch_size: int = 8, max_length: int = 128, seed: int = 0,
                          text_field: str = "text", tokenizer_paths: Sequence[Path] = (),
                          factory: str | None = None, root: Path | None = None, task: str = "",
                          device: str = "cpu", labels: str = "auto", pack: bool = False,
                          adapter_base: Path | None = None) -> tuple[FisherStats, CaptureReport]:
    """Load one expert, compute its Fisher on its seeded calibration draw (``mergewise
    features`` with merge_method: fisher). ``pack``: the draw packed into full ``max_length``
    rows (causal LMs), each row one example whose every token is a prediction, as it is
    for the Gram capture. ``seconds`` times the gradient passes alone."""
    module, batches, settings, held = prepare_expert(
        model_path, data_path, num_examples=num_examples, batch_size=batch_size,
        max_length=max_length, seed=seed, text_field=text_field,
        tokenizer_paths=tokenizer_paths, factory=factory, root=root, device=device, pack=pack,
        adapter_base=adapter_base)
    start = time.perf_counter()
    stats = fisher_capture(module, batches, labels=labels, seed=seed, label=str(model_path),
                           calibration={**settings, **fisher_settings(labels)}, probe_from=held)
    seconds = time.perf_counter() - start
    del module
    report = CaptureReport(task or str(model_path), int(stats.metadata["examples"]),
                           stats.total_rows, len(stats.shapes), seconds)
    return stats, report


def fisher_settings(labels: str) -> dict[str, Any]:
    """What a Fisher depends on besides the calibration settings (compared on reuse)."""
    return {"statistic": "fisher", "labels": labels}


def _capture_for(src_cal: Calibration) -> dict[str, Any]:
    return {"labels": src_cal.labels, "pack": src_cal.pack}


def _settings_for(cal: Calibration) -> dict[str, Any]:
    """``pack`` recorded only when set (as ``calibration_settings`` does), so Fisher files
    written before packing existed still match an unpacked block."""
    return fisher_settings(cal.labels) | ({"pack": True} if cal.pack else {})


FISHER = StatsKind(name="fisher", capture=capture_fisher_expert, load=load_fisher,
                   capture_args=_capture_for, settings=_settings_for)
