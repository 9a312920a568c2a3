"""Synthetic Llama-style HF checkpoints: a base and fine-tuned variants, written tensor by tensor.

Used by the built-in example (tiny) and the performance benchmark (~0.45B parameters). Weights
are seeded per tensor name, so any expert can regenerate the base tensor it perturbs without
holding the base in memory. Task vectors are heavy-tailed (Student-t, df = 3) with a per-tensor
scale and a task-specific block of rows that moved more, like real fine-tunes; embedding and
head rows move only for the ~20% of tokens "seen" in fine-tuning; norm scales move as Gaussians.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .tensors import TensorInfo, dtype_name
from .writer import ShardedWriter

TOKENIZER_CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                    "model_max_length": 2048, "tokenizer_class": "LlamaTokenizerFast"}
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


@dataclass(frozen=True)
class LlamaShape:
    vocab: int = 256
    hidden: int = 64
    intermediate: int = 160
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i, hd = self.hidden, self.intermediate, self.hidden // self.heads
        kv = self.kv_heads * hd
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def config(self, dtype: torch.dtype) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab, "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "tie_word_embeddings": False, "torch_dtype": dtype_name(dtype),
        }

    @property
    def parameters(self) -> int:
        total = 0
        for _, shape in self.tensors():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total


def _gen(seed: int, *parts: object) -> torch.Generator:
    key = "\x00".join(str(p) for p in (seed, *parts)).encode()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)
    return g


def base_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    if len(shape) == 1:
        return 1.0 + 0.05 * torch.randn(shape, generator=_gen(seed, "base", name))
    return torch.randn(shape, generator=_gen(seed, "base", name)) * (shape[-1] ** -0.5)


def task_vector(name: str, shape: tuple[int, ...], seed: int, task: int, n_tasks: int,
                scale: float = 0.02) -> torch.Tensor:
    g = _gen(seed, "task", task, name)
    # Student-t(3) from normals and a chi-square, all drawn from our own generator.
    z = torch.randn(shape, generator=g)
    chi = sum(torch.randn(shape, generator=g) ** 2 for _ in range(3))
    t = z / torch.sqrt(chi / 3.0)
    base_scale = scale * (shape[-1] ** -0.5 if len(shape) > 1 else 1.0)
    per_tensor = float(torch.empty(()).uniform_(0.5, 2.0, generator=g))
    t = t * (base_scale * per_tensor)
    if len(shape) == 1:  # norm scales move smoothly: Gaussian, not heavy-tailed
        t = torch.randn(shape, generator=g) * (base_scale * per_tensor)
    elif "embed" in name or "lm_head" in name:  # only the rows of tokens seen in fine-tuning
        t[torch.rand(shape[0], generator=g) > 0.2] = 0.0
    elif shape[0] >= n_tasks:  # a task-specific block of rows moved more
        rows = shape[0] // n_tasks
        t[task * rows:(task + 1) * rows] *= 3.0
    return t


def write_checkpoint(directory: Path, shape: LlamaShape, seed: int, dtype: torch.dtype,
                     task: int | None = None, n_tasks: int = 1,
                     shard_size: int = 5_000_000_000) -> Path:
    """Write one HF-style directory (base when ``task`` is None, else base + task vector)."""
    directory.mkdir(parents=True, exist_ok=True)
    specs = shape.tensors()
    writer = ShardedWriter(directory, [TensorInfo(n, s, dtype) for n, s in specs], shard_size)
    for name, s in specs:
        w = base_tensor(name, s, seed)
        if task is not None:
            w += task_vector(name, s, seed, task, n_tasks)
        writer.write(name, w.to(dtype))
    writer.finalize()
    (directory / "config.json").write_text(json.dumps(shape.config(dtype), indent=2) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2))
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2))
    return directory


def write_family(root: Path, shape: LlamaShape, n_experts: int, seed: int = 0,
                 dtype: torch.dtype = torch.bfloat16, shard_size: int = 5_000_000_000
                 ) -> tuple[Path, list[Path]]:
    """A base and ``n_experts`` fine-tuned variants under ``root``."""
    base = write_checkpoint(root / "base", shape, seed, dtype, shard_size=shard_size)
    experts = [write_checkpoint(root / f"expert_{t}", shape, seed, dtype, task=t,
                                n_tasks=n_experts, shard_size=shard_size)
               for t in range(n_experts)]
    return base, experts
