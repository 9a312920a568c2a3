"""Tiny Llama checkpoint families for the mergekit parity suite, built with transformers.

mergekit reads checkpoints through its own Llama architecture template and transformers'
AutoConfig/AutoTokenizer, so the inputs must be real Hugging Face directories: a
``LlamaForCausalLM`` saved with ``save_pretrained`` (config.json + model.safetensors) and a real
WordLevel tokenizer (tokenizer.json + tokenizer_config.json). Experts are base + 0.01·N(0,1), so
|delta| ties at a top-k threshold are practically absent in float32; the ``tie`` family is built
on a coarse grid in bfloat16, where ties are the rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 128, 4, 4, 2, 256
NEW_TOKENS = ("x0", "x1", "x2", "x3")  # the union expert's extra vocabulary (vocab 260)
NOISE = 0.01


@dataclass(frozen=True)
class Checkpoints:
    """Directories of every checkpoint the corpus may name, keyed by the corpus's names
    (``base``, ``m1``..``m4``, ``mu``, ``bf16_base``, ``fp16_m1``, ``tie_t2``...)."""

    root: Path
    paths: dict[str, Path]

    def __getitem__(self, name: str) -> Path:
        return self.paths[name]


def _tokenizer(extra: tuple[str, ...] = ()):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    vocab.update({tok: VOCAB + j for j, tok in enumerate(extra)})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def _config(vocab_size: int = VOCAB):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                       num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                       num_key_value_heads=KV_HEADS, vocab_size=vocab_size,
                       tie_word_embeddings=False, max_position_embeddings=128,
                       bos_token_id=1, eos_token_id=2, pad_token_id=None)


def _save(state: dict[str, torch.Tensor], path: Path, tokenizer, dtype: torch.dtype,
          vocab_size: int = VOCAB) -> Path:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(_config(vocab_size))
    model.load_state_dict(state)
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def _noisy(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + NOISE * torch.randn(v.shape, generator=g) for k, v in state.items()}


def _tie_grid(state: dict[str, torch.Tensor], seed: int | None) -> dict[str, torch.Tensor]:
    """Base on a 1/64 grid, experts + k/256 (small integer k): exact in bfloat16, so most |delta|
    share a handful of values and every top-k threshold is a tie."""
    g = torch.Generator().manual_seed(seed or 0)
    out = {}
    for k, v in state.items():
        t = torch.round(v * 64) / 64
        if seed is not None:
            t = t + torch.round(2 * torch.randn(v.shape, generator=g)) / 256
        out[k] = t
    return out


def build_checkpoints(root: Path) -> Checkpoints:
    """Write every family under ``root`` (a few seconds): float32 base + m1..m4, the union
    expert mu (vocab 260, own tokenizer), bf16 and fp16 copies of base/m1/m2, and the bf16 tie
    family tie_base/tie_t1/tie_t2."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" bars, one per checkpoint
    try:
        return _build(root)
    finally:
        if bars:
            hf_logging.enable_progress_bar()  # the rest of the session keeps its setting


def _build(root: Path) -> Checkpoints:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(_config())
    with torch.no_grad():  # non-trivial norms, so they are not all ones
        for name, p in base.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    tok = _tokenizer()
    paths: dict[str, Path] = {}
    experts = {f"m{i}": _noisy(sd, 100 + i) for i in range(1, 5)}
    for name, state in {"base": sd, **experts}.items():
        paths[name] = _save(state, root / name, tok, torch.float32)
    for dtype, prefix in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        for name in ("base", "m1", "m2"):
            paths[f"{prefix}_{name}"] = _save(sd if name == "base" else experts[name],
                                              root / f"{prefix}_{name}", tok, dtype)
    for name, seed in (("tie_base", None), ("tie_t1", 201), ("tie_t2", 202)):
        paths[name] = _save(_tie_grid(sd, seed), root / name, tok, torch.bfloat16)
    g = torch.Generator().manual_seed(300)
    mu = {}
    for k, v in _noisy(sd, 300).items():
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            v = torch.cat([v, torch.randn(len(NEW_TOKENS), v.shape[1], generator=g) * 0.02])
        mu[k] = v
    paths["mu"] = _save(mu, root / "mu", _tokenizer(NEW_TOKENS), torch.float32,
                        VOCAB + len(NEW_TOKENS))
    return Checkpoints(root, paths)
