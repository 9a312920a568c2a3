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
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .lm_tasks import TASK_NAMES, LMTask, make_task
from .lm_train import FineTune, LoraConfig, answer_loss, finetune, greedy, load_lm, load_tok


@dataclass(frozen=True)
class Budget:
    """How much of everything: data, LoRA training (``lora``, the very config ``finetune``
    takes; its ``seed`` also seeds the tasks and the recipes), calibration, which merges run."""

    lora: LoraConfig = LoraConfig(steps=12)
    n_train: int = 400
    n_heldout: int = 32
    calib_examples: int = 32
    calib_max_length: int = 48
    full: bool = False  # also write each expert's full fine-tune (merge_and_unload; no merge reads it)
    lot: bool = True

    def as_dict(self) -> dict[str, Any]:
        """One flat dict (a results file's ``budget``): the training fields beside the others."""
        return {**asdict(self.lora),
                **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "lora"}}


# The default test command's budget (tests/bench/test_smollm_ci.py): r 4 on q/v/up/down, 10
# steps of 8 texts; no full fine-tunes written, no LOT (its 210 solves alone take minutes).
CI_BUDGET = Budget(LoraConfig(steps=10, rank=4, alpha=8, lr=3e-3, warmup=3,
                              targets=("q_proj", "v_proj", "up_proj", "down_proj")),
                   n_train=200, n_heldout=16, full=False, lot=False)
SLOW_BUDGET = Budget()  # the opt-in test (MERGEWISE_SLOW_TESTS=1) and `--budget slow`
LONG_BUDGET = Budget(LoraConfig(steps=40), n_heldout=64, calib_examples=64)
BUDGETS = {"ci": CI_BUDGET, "slow": SLOW_BUDGET, "long": LONG_BUDGET}
SLERP_TASKS = ("shout", "json")


def tasks_for(budget: Budget) -> dict[str, LMTask]:
    return {n: make_task(n, budget.n_train, budget.n_heldout, budget.lora.seed)
            for n in TASK_NAMES}


def build_experts(base: Path, tasks: dict[str, LMTask], root: Path, budget: Budget
                  ) -> dict[str, FineTune]:
    """One LoRA expert per task, each scored in memory on every task's held-out answers."""
    return {n: finetune(base, t, root / n, budget.lora, full=budget.full,
                        heldout=list(tasks.values()))
            for n, t in tasks.items()}


def write_calibration(tasks: dict[str, LMTask], root: Path, n: int) -> dict[str, Path]:
    """One .txt per task (one example a line): LOT's unlabelled calibration texts."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, task in tasks.items():
        texts = [t.replace("\n", " ") for t in task.calibration_texts(n)]
        out[name] = root / f"{name}.txt"
        out[name].write_text("\n".join(texts) + "\n", encoding="utf-8")
    return out


def recipes(base: Path, experts: dict[str, FineTune], calib: dict[str, Path], budget: Budget,
            stats_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """The recipes, mergekit's language plus mergewise's ``sparsify:`` / ``calibration:``.

    Every merge takes the PEFT adapters themselves as model entries, as a LoRA user writes
    them: an adapter directory on ``base_model`` (TIES+TADrop, LOT: its calibration capture runs
    the base with the adapter applied); SLERP, which has no base, mergekit's ``base+adapter``."""
    adapters = [{"model": str(ft.adapter), "name": n} for n, ft in experts.items()]
    a, b = SLERP_TASKS
    out: dict[str, dict[str, Any]] = {
        "ties+tadrop": {"merge_method": "ties", "base_model": str(base), "models": adapters,
                        "parameters": {"lambda": 1.0},
                        "sparsify": {"method": "tadrop", "drop_rate": 0.8}, "seed": budget.lora.seed},
        "slerp": {"merge_method": "slerp",
                  "models": [{"model": f"{base}+{experts[a].adapter}"},
                             {"model": f"{base}+{experts[b].adapter}"}],
                  "parameters": {"t": [0, 0.5, 1]}},
    }
    if budget.lot:
        out["lot"] = {"merge_method": "lot", "base_model": str(base),
                      "models": [_lot_entry(n, ft, calib, budget, stats_dir)
                                 for n, ft in experts.items()],
                      "parameters": {"lambda": 1.0}, "seed": budget.lora.seed}
    return out


def _lot_entry(name: str, ft: FineTune, calib: dict[str, Path], budget: Budget,
               stats_dir: Path | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"model": str(ft.adapter), "name": name, "calibration": {
        "data": str(calib[name]), "num_examples": budget.calib_examples,
        "max_length": budget.calib_max_length, "batch_size": 8}}
    if stats_dir is not None:
        entry["features"] = str(stats_dir / f"{name}.safetensors")
    return entry


def run_merge(recipe: dict[str, Any], out: Path) -> float:
    """Merge into ``out``; the wall time in seconds."""
    from mergewise import merge

    t0 = time.perf_counter()
    merge(recipe, out=out, overwrite=True)
    return time.perf_counter() - t0


def score(path: Path, tasks: dict[str, LMTask], tok: Any, new_tokens: int = 12
          ) -> dict[str, Any]:
    """Load ``path`` with transformers: held-out answer loss per task, a greedy answer to each
    task's first held-out prompt, and whether lm_head came out tied to the embeddings."""
    model = load_lm(path)
    return {"loss": {n: answer_loss(model, tok, t.heldout) for n, t in tasks.items()},
            "sample": {n: greedy(model, tok, t.heldout[0][0], new_tokens)
                       for n, t in tasks.items()},
            "tied": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()}


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


def evaluate_all(base: Path, experts: dict[str, FineTune], merged: dict[str, Path],
                 tasks: dict[str, LMTask], new_tokens: int = 12) -> dict[str, Any]:
    """Losses of base, experts (as scored in memory after training) and merges; gain
    fractions; one greedy sample per (merged model, task)."""
    tok = load_tok(base)
    doc: dict[str, Any] = {"base": score(base, tasks, tok, new_tokens), "merged": {},
                           "experts": {n: {"loss": ft.heldout} for n, ft in experts.items()}}
    own = {n: ft.heldout[n] for n, ft in experts.items()}
    for label, path in merged.items():
        row = score(path, tasks, tok, new_tokens)
        covered = SLERP_TASKS if label == "slerp" else tuple(tasks)
        row["gain"] = gain_fractions(doc["base"]["loss"], own, row["loss"], covered)
        doc["merged"][label] = row
    return doc


@dataclass
class Run:
    """Everything one end-to-end run made, and the seconds each phase took."""

    experts: dict[str, FineTune]
    recipes: dict[str, dict[str, Any]]
    merged: dict[str, Path]
    doc: dict[str, Any]
    seconds: dict[str, float]


def run_all(base: Path, root: Path, budget: Budget, new_tokens: int = 12) -> Run:
    """Experts, calibration files, every merge of ``budget`` in this process, and the scores."""
    tasks = tasks_for(budget)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    experts = build_experts(base, tasks, root / "experts", budget)
    seconds["finetune"] = time.perf_counter() - t0
    calib = write_calibration(tasks, root / "calib", budget.calib_examples) if budget.lot else {}
    plan = recipes(base, experts, calib, budget)
    merged = {}
    for label, recipe in plan.items():
        merged[label] = root / "merged" / label.replace("+", "_")
        seconds[label] = run_merge(recipe, merged[label])
    t0 = time.perf_counter()
    doc = evaluate_all(base, experts, merged, tasks, new_tokens)
    seconds["evaluate"] = time.perf_counter() - t0
    return Run(experts, plan, merged, doc, seconds)
