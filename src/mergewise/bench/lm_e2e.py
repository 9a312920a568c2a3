"""SmolLM2 end to end: LoRA experts -> mergewise recipes (TIES+TADrop, SLERP, LOT) -> merged HF
directories -> loaded by transformers, scored on each task's held-out answers.

Why one module for both the CI test and ``benchmarks/smollm_end_to_end.py``: both must build the
experts, write the recipes and score the outputs the same way; only the budget differs. The
score is the gain fraction (loss_base - loss_merged) / (loss_base - loss_expert) per task: 1 =
the merged model is as good on the task as its expert, 0 = no better than the base.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .lm_tasks import TASK_NAMES, LMTask, make_task
from .lm_train import FineTune, LoraConfig, answer_loss, finetune, greedy, load_lm, load_tok


@dataclass(frozen=True)
class Budget:
    steps: int = 12
    n_train: int = 400
    n_heldout: int = 32
    calib_examples: int = 32
    calib_max_length: int = 48
    lr: float = 2e-3
    seed: int = 0


CI_BUDGET = Budget()
LONG_BUDGET = Budget(steps=40, n_heldout=64, calib_examples=64)
SLERP_TASKS = ("shout", "json")


def tasks_for(budget: Budget) -> dict[str, LMTask]:
    return {n: make_task(n, budget.n_train, budget.n_heldout, budget.seed) for n in TASK_NAMES}


def build_experts(base: Path, tasks: dict[str, LMTask], root: Path, budget: Budget
                  ) -> dict[str, FineTune]:
    cfg = LoraConfig(steps=budget.steps, lr=budget.lr, seed=budget.seed)
    return {n: finetune(base, t, root / n, cfg) for n, t in tasks.items()}


def write_calibration(tasks: dict[str, LMTask], root: Path, n: int) -> dict[str, Path]:
    """One .txt per task (one example a line): LOT's unlabelled calibration texts."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, task in tasks.items():
        texts = [t.replace("\n", " ") for t in task.calibration_texts(n)]
        out[name] = root / f"{name}.txt"
        out[name].write_text("\n".join(texts) + "\n", encoding="utf-8")
    return out


def recipes(base: Path, experts: dict[str, Path], calib: dict[str, Path], budget: Budget,
            stats_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """The three recipes, mergekit's language plus mergewise's ``sparsify:`` / ``calibration:``."""
    models = [{"model": str(p), "name": n} for n, p in experts.items()]
    a, b = SLERP_TASKS
    lot_models = []
    for n, p in experts.items():
        entry: dict[str, Any] = {"model": str(p), "name": n, "calibration": {
            "data": str(calib[n]), "num_examples": budget.calib_examples,
            "max_length": budget.calib_max_length, "batch_size": 8}}
        if stats_dir is not None:
            entry["features"] = str(stats_dir / f"{n}.safetensors")
        lot_models.append(entry)
    return {
        "ties+tadrop": {"merge_method": "ties", "base_model": str(base), "models": models,
                        "parameters": {"lambda": 1.0},
                        "sparsify": {"method": "tadrop", "drop_rate": 0.8}, "seed": budget.seed},
        "slerp": {"merge_method": "slerp", "base_model": str(experts[a]),
                  "models": [{"model": str(experts[a])}, {"model": str(experts[b])}],
                  "parameters": {"t": [0, 0.5, 1]}},
        "lot": {"merge_method": "lot", "base_model": str(base), "models": lot_models,
                "parameters": {"lambda": 1.0}, "seed": budget.seed},
    }


def run_merge(recipe: dict[str, Any], out: Path) -> float:
    """Merge into ``out``; the wall time in seconds."""
    from mergewise import merge

    t0 = time.perf_counter()
    merge(recipe, out=out, overwrite=True)
    return time.perf_counter() - t0


def losses(path: Path, tasks: dict[str, LMTask], tok: Any) -> tuple[dict[str, float], dict[str, str]]:
    """Held-out answer loss per task, and a greedy answer to each task's first held-out prompt."""
    model = load_lm(path)
    loss = {n: answer_loss(model, tok, t.heldout) for n, t in tasks.items()}
    sample = {n: greedy(model, tok, t.heldout[0][0]) for n, t in tasks.items()}
    return loss, sample


def gain_fractions(base: dict[str, float], expert: dict[str, float], merged: dict[str, float],
                   tasks: tuple[str, ...]) -> dict[str, float]:
    """(base - merged) / (base - expert), per task: the share of the expert's gain kept."""
    return {n: (base[n] - merged[n]) / (base[n] - expert[n]) for n in tasks}


def output_files_report(base: Path, out: Path) -> dict[str, bool]:
    """What must come out right: tied embeddings, generation config, chat template, tokenizer."""
    from mergewise.checkpoint import open_checkpoint

    with open_checkpoint(out) as ckpt:
        names = set(ckpt.names())
    config = json.loads((out / "config.json").read_text())

    def same_json(name: str) -> bool:
        return json.loads((base / name).read_text()) == json.loads((out / name).read_text())

    def same_bytes(name: str) -> bool:
        return (base / name).read_bytes() == (out / name).read_bytes()

    return {"no lm_head.weight": "lm_head.weight" not in names,
            "embed_tokens present": "model.embed_tokens.weight" in names,
            "tie_word_embeddings": config.get("tie_word_embeddings") is True,
            "generation_config.json": same_json("generation_config.json"),
            "chat_template.jinja": same_bytes("chat_template.jinja"),
            "tokenizer.json": same_bytes("tokenizer.json"),
            "tokenizer_config.json": same_json("tokenizer_config.json")}


def tied_after_load(path: Path) -> bool:
    """transformers ties lm_head to the embeddings when it loads the output."""
    model = load_lm(path)
    return model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def evaluate_all(base: Path, experts: dict[str, FineTune], merged: dict[str, Path],
                 tasks: dict[str, LMTask]) -> dict[str, Any]:
    """Losses of base, experts and merges; gain fractions; one greedy sample per (model, task)."""
    tok = load_tok(base)
    base_loss, base_sample = losses(base, tasks, tok)
    doc: dict[str, Any] = {"base": {"loss": base_loss, "sample": base_sample}, "experts": {},
                           "merged": {}}
    own = {}
    for n, ft in experts.items():
        loss, sample = losses(ft.full, tasks, tok)
        own[n] = loss[n]
        doc["experts"][n] = {"loss": loss, "sample": sample}
    for label, path in merged.items():
        loss, sample = losses(path, tasks, tok)
        covered = SLERP_TASKS if label == "slerp" else tuple(tasks)
        doc["merged"][label] = {"loss": loss, "sample": sample,
                                "gain": gain_fractions(base_loss, own, loss, covered)}
    return doc
