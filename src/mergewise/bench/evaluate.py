"""Accuracy of an encoder state dict on every task, each task scored with its own head.

Why: the protocol of GLUE-style merging benchmarks is that heads are never merged; a merged
encoder is judged by plugging each task's expert head (or, for the pretrained row, a linear
probe fitted on the frozen pretrained encoder) on top of it. Each split is tokenised once and
cut into length-sorted, dynamically padded batches, and one encoder module is reused (only its
weights are swapped), because a full run scores a hundred or so candidate encoders.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..task_models import TaskModels
from .data import Task
from .model import Head, encode, load_encoder, load_minilm_tokenizer, sorted_batches, tokenize


@dataclass
class _Prepared:
    batches: list[dict[str, torch.Tensor]]
    order: torch.Tensor
    labels: torch.Tensor


class Evaluator:
    """Scores encoders on one split (``val`` or ``test``) of the given tasks, optionally capped."""

    def __init__(self, tasks: list[Task], split: str, limit: int | None = None,
                 max_len_cap: int = 128, batch_size: int = 64, tokenizer: Any = None,
                 model: torch.nn.Module | None = None):
        self.split = split
        self.tasks = [t.name for t in tasks]
        tokenizer = tokenizer or load_minilm_tokenizer()
        self.model = model if model is not None else load_encoder()  # shareable: weights are swapped
        self.data: dict[str, _Prepared] = {}
        for t in tasks:
            s = t.split(split).head(limit)
            ids = tokenize(tokenizer, s.texts, min(t.max_len, max_len_cap))
            batches, order = sorted_batches(ids, batch_size, tokenizer.pad_token_id)
            self.data[t.name] = _Prepared(batches, order, torch.as_tensor(s.labels, dtype=torch.long))
        self.seconds = 0.0  # total forward time, for the report

    def sizes(self) -> dict[str, int]:
        return {name: len(p.labels) for name, p in self.data.items()}

    def features(self, state_dict: Mapping[str, torch.Tensor] | TaskModels,
                 tasks: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Pooled features of each task's examples under ``state_dict`` (strict load).

        A task-specific merge (``TaskModels``, e.g. EMR) is evaluated task-aware: each task's
        examples go through that task's own assembled encoder.
        """
        out = {}
        if not isinstance(state_dict, TaskModels):
            self.model.load_state_dict(state_dict, strict=True)
        for name in tasks or self.tasks:
            if isinstance(state_dict, TaskModels):
                self.model.load_state_dict(state_dict[name], strict=True)
            t0 = time.perf_counter()
            prepared = self.data[name]
            with torch.inference_mode():
                rows = torch.cat([self.encode(b) for b in prepared.batches])
            out[name] = torch.empty_like(rows)
            out[name][prepared.order] = rows  # back in split order
            self.seconds += time.perf_counter() - t0
        return out

    def encode(self, batch: Any) -> torch.Tensor:
        """Pooled features of one prepared batch (the vision evaluator's are images)."""
        return encode(self.model, batch)

    def accuracies(self, state_dict: Mapping[str, torch.Tensor] | TaskModels, heads: dict[str, Head],
                   tasks: list[str] | None = None) -> dict[str, float]:
        """{task: accuracy} with ``heads[task]`` on top of the encoder ``state_dict``."""
        feats = self.features(state_dict, tasks)
        return {name: self.score(heads[name], name, f) for name, f in feats.items()}

    def correct(self, state_dict: Mapping[str, torch.Tensor] | TaskModels, heads: dict[str, Head],
                tasks: list[str] | None = None) -> dict[str, torch.Tensor]:
        """{task: bool per example (split order)}: what re-selection on subsets and paired
        bootstrap need, at the cost of one evaluation."""
        feats = self.features(state_dict, tasks)
        return {name: head_correct(heads[name], f, self.data[name].labels) for name, f in feats.items()}

    def score(self, head: Head, task: str, feats: torch.Tensor) -> float:
        return float(head_correct(head, feats, self.data[task].labels).float().mean())


def head_correct(head: Head, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return head(feats).argmax(-1) == labels


def summarize(acc: dict[str, float], expert_acc: dict[str, float]) -> dict[str, float]:
    """Average accuracy and normalized accuracy (mean over tasks of merged / expert)."""
    tasks = list(acc)
    avg = sum(acc.values()) / len(tasks)
    norm = sum(acc[t] / expert_acc[t] for t in tasks if expert_acc.get(t)) / len(tasks)
    return {"average": avg, "normalized": norm}
