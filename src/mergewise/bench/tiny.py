"""A seconds-sized stand-in for the MiniLM zoo: what the runner's own tests merge and score.

Why in the package and not in tests/: Ray workers rebuild the zoo from a picklable description
(``TinyZoo``), so its code must be importable wherever they run. Everything is seeded and built
in memory: a 2-layer BertModel with hidden size 16, experts = base + seeded task vectors, random
linear heads, and texts of random "words" hashed to token ids (crc32, so stable across
processes; no tokenizer files, no downloads). Accuracies mean nothing; equality between code
paths is what it is for.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .data import Split, Task

VOCAB = 97


class WordTokenizer:
    """Tokenizer-shaped: ``tok(texts, truncation=True, max_length=n)["input_ids"]``, pad id 0."""

    pad_token_id = 0

    def __call__(self, texts: list[str], truncation: bool = True, max_length: int = 16
                 ) -> dict[str, list[list[int]]]:
        ids = [[1, *(2 + zlib.crc32(w.encode()) % (VOCAB - 2) for w in t.split())] for t in texts]
        return {"input_ids": [x[:max_length] if truncation else x for x in ids]}


def tiny_encoder(seed: int = 0) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    from .model import quiet_transformers

    quiet_transformers()
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    return BertModel(cfg, add_pooling_layer=False).eval()


def tiny_task(name: str, seed: int, sizes: tuple[int, int, int] = (8, 40, 50)) -> Task:
    """Texts of 1-12 random words; label = number of words with an even first letter, mod 2."""
    rng = np.random.default_rng(seed)
    words = [f"{chr(97 + i % 26)}{i}" for i in range(60)]

    def split(n: int) -> Split:
        texts = tuple(" ".join(rng.choice(words, rng.integers(1, 13))) for _ in range(n))
        labels = np.array([sum(ord(w[0]) % 2 == 0 for w in t.split()) % 2 for t in texts], np.int64)
        return Split(texts, labels)

    return Task(name, ("odd", "even"), 12, split(sizes[0]), split(sizes[1]), split(sizes[2]), "tiny")


@dataclass(frozen=True)
class TinyZoo:
    """Picklable recipe of a tiny zoo; ``load()`` builds the same zoo in any process."""

    tasks: tuple[str, ...] = ("tiny_a", "tiny_b")
    seed: int = 0
    scale: float = 0.05  # task-vector entries ~ N(0, scale^2)

    def load(self) -> Any:
        from .evaluate import Evaluator
        from .model import Head, sorted_batches
        from .runner import Zoo
        from .zoo import Expert

        model = tiny_encoder(0)
        base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        tasks = [tiny_task(t, 100 + i) for i, t in enumerate(self.tasks)]
        g = torch.Generator().manual_seed(1000 + self.seed)
        expert_sd, heads = {}, {}
        for t in self.tasks:
            expert_sd[t] = {k: (v + self.scale * torch.randn(v.shape, generator=g) if v.is_floating_point()
                                else v.clone()) for k, v in base.items()}
            heads[t] = Head(torch.randn(2, 16, generator=g), torch.randn(2, generator=g))
        tok = WordTokenizer()
        calibration = {t.name: sorted_batches(tok(list(t.train.texts))["input_ids"], 4)[0] for t in tasks}
        return Zoo(tasks=list(self.tasks), base=base,
                   experts={t: Expert(t, f"tiny-{self.seed}-{t}", None) for t in self.tasks},  # type: ignore[arg-type]
                   expert_sd=expert_sd, heads=heads, probes=heads,
                   val=Evaluator(tasks, "val", None, 12, batch_size=8, tokenizer=tok, model=model),
                   test=Evaluator(tasks, "test", None, 12, batch_size=8, tokenizer=tok, model=model),
                   calibration=calibration, probe_keys={t: f"tiny-probe-{t}" for t in self.tasks})
