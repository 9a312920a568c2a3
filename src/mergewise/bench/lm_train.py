"""LoRA fine-tunes of a causal LM on CPU (PEFT), held-out answer loss, greedy generation.

Why this shape: a fine-tune must yield both forms mergewise users have, a PEFT adapter directory
and the full fine-tune (``merge_and_unload``) as an HF directory with the base's tokenizer,
generation config and chat template, so merges read exactly what a user would. Training is
seeded (LoRA init, batch order) and the loss counts answer tokens only (prompt tokens are
labelled -100), so the held-out loss measures the taught behaviour, not the prompt's wording.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .lm_tasks import LMTask

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TAGALONG = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json")


@dataclass(frozen=True)
class LoraConfig:
    steps: int = 30
    batch_size: int = 8
    max_length: int = 32
    lr: float = 2e-3
    rank: int = 8
    alpha: int = 16
    seed: int = 0
    warmup: int = 5
    targets: tuple[str, ...] = LORA_TARGETS


@dataclass
class FineTune:
    """One expert: its PEFT adapter, its full fine-tune (None when not written), its training
    curve, and the held-out loss per task measured on the trained model in memory."""

    task: str
    adapter: Path
    full: Path | None
    step_times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    heldout: dict[str, float] = field(default_factory=dict)


def load_lm(path: Path) -> Any:
    """A causal LM from an HF directory, float32, eval mode."""
    from transformers import AutoModelForCausalLM

    from .model import quiet_transformers

    quiet_transformers()
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def load_tok(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def encode_pairs(tok: Any, pairs: Sequence[tuple[str, str]], max_length: int
                 ) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` and ``labels`` on the answer tokens (+ eos)."""
    rows, labels = [], []
    for prompt, answer in pairs:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (p + a)[:max_length]
        rows.append(ids)
        labels.append(([-100] * len(p) + a)[:max_length])
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id
    out = {"input_ids": torch.full((len(rows), width), pad, dtype=torch.long),
           "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
           "labels": torch.full((len(rows), width), -100, dtype=torch.long)}
    for i, (r, lab) in enumerate(zip(rows, labels, strict=True)):
        out["input_ids"][i, :len(r)] = torch.tensor(r)
        out["attention_mask"][i, :len(r)] = 1
        out["labels"][i, :len(lab)] = torch.tensor(lab)
    return out


@torch.inference_mode()
def answer_loss(model: Any, tok: Any, pairs: Sequence[tuple[str, str]], max_length: int = 48,
                batch_size: int = 16) -> float:
    """Mean cross-entropy per answer token over ``pairs`` (token-weighted across batches)."""
    total, count = 0.0, 0
    for s in range(0, len(pairs), batch_size):
        batch = encode_pairs(tok, pairs[s:s + batch_size], max_length)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        target = batch["labels"][:, 1:]
        lp = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), target,
                                               ignore_index=-100, reduction="sum")
        total += float(lp)
        count += int((target != -100).sum())
    return total / count


@torch.inference_mode()
def greedy(model: Any, tok: Any, prompt: str, new_tokens: int = 12) -> str:
    """The greedy continuation of ``prompt`` (special tokens kept, so a stop is visible)."""
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:])


def copy_tagalong(src: Path, dst: Path) -> None:
    """The base's tokenizer, chat template and generation config, as a user's fine-tune has."""
    for name in TAGALONG:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def finetune(base: Path, task: LMTask, out: Path, cfg: LoraConfig, *, full: bool = True,
             heldout: Sequence[LMTask] = ()) -> FineTune:
    """Train a LoRA adapter on ``task`` and write ``out/adapter`` (PEFT) and, with ``full``,
    ``out/full`` (``merge_and_unload``); score the trained model on each of ``heldout``."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    tok = load_tok(base)
    torch.manual_seed(cfg.seed)
    model = get_peft_model(load_lm(base), PeftLoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=list(cfg.targets),
        task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=0.0)
    rng = random.Random(f"{cfg.seed}:{task.name}:order")
    result = FineTune(task.name, out / "adapter", out / "full" if full else None)
    for step in range(cfg.steps):
        # linear warm-up over cfg.warmup steps, then linear decay
        lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1)) * (1 - step / cfg.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = encode_pairs(tok, rng.sample(task.train, cfg.batch_size), cfg.max_length)
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        result.step_times.append(time.perf_counter() - t0)
        result.losses.append(float(loss.detach()))
    model.eval()
    result.heldout = {t.name: answer_loss(model, tok, t.heldout) for t in heldout}
    model.save_pretrained(str(result.adapter))
    if result.full is not None:
        model.merge_and_unload().save_pretrained(str(result.full))
        copy_tagalong(base, result.full)
    return result
