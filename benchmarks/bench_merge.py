"""Merge throughput and peak memory on synthetic Llama-style checkpoints (issue 2, "Performance").

Builds (once, cached under ``--root``) a bf16 base and 4 fine-tuned experts with seeded,
heavy-tailed task vectors (``mergewise.synthetic``), sharded so the sharded-input path is used.
Then times, in this one run and each in a fresh subprocess (so every peak RSS belongs to exactly
one measurement):

- ``io_floor``: read every tensor of all 5 inputs with mergewise's checkpoint reader and write one
  output of the base's size with mergewise's ``ShardedWriter`` (no arithmetic);
- one merge per recipe variant (``VARIANTS`` below; ``--methods`` picks them), via
  ``mergewise.merge``.

Every row reads the same 5 checkpoints (``linear`` averages base + 4 experts, so its I/O equals
the delta-space methods'), so "params/s" is 5 x (parameters of one model) / wall time for all.
Wall time is measured inside the child around the operation only (no interpreter start-up or
imports); peak RSS is the child's own high-water mark (``VmHWM``, imports of torch included;
not ``ru_maxrss``, which Linux carries over ``exec`` from the parent that forked the child).

    python benchmarks/bench_merge.py                       # full size, ~0.45B params per model
    python benchmarks/bench_merge.py --scale small         # ~50M params, to test the script
    python benchmarks/bench_merge.py --methods ties,ties_tadrop --repeats 3 --json out.json
    python benchmarks/bench_merge.py --variant 'ties_d05={"merge_method":"ties",
        "sparsify":{"method":"magnitude","density":0.05}}'
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# --- what is measured ---------------------------------------------------------------------------

N_EXPERTS = 4

# Named recipe variants. Each is a partial recipe: base_model / models are filled in by
# ``build_recipe``. ``parameters`` go to the recipe's method-wide parameters (per-model parameters
# such as density are accepted there too); a ``sparsify`` block replaces the method's own
# trim/drop step, so a sparsifier is benchmarked against plain TIES by adding one entry (as
# ``ties_tadrop`` below; or ad hoc with --variant NAME=JSON).
# ``include_base_as_model``: the base is one of the averaged models (weight-space methods), so the
# run reads the same 5 checkpoints as the delta-space methods.
VARIANTS: dict[str, dict[str, Any]] = {
    "linear": {"merge_method": "linear", "include_base_as_model": True},
    "task_arithmetic": {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.5}},
    "ties": {"merge_method": "ties", "parameters": {"density": 0.2, "lambda": 1.0}},
    "dare_ties": {"merge_method": "dare_ties", "parameters": {"density": 0.1, "lambda": 1.0}},
    # Opt-in extras (not in the default --methods):
    "ties_block": {"merge_method": "ties",
                   "sparsify": {"method": "magnitude", "density": 0.2}},
    "ties_global": {"merge_method": "ties",
                    "parameters": {"density": 0.2, "scope": "global"}},
    "ties_tadrop": {"merge_method": "ties",
                    "sparsify": {"method": "tadrop", "drop_rate": 0.8}},
    "ties_tadrop_elements": {"merge_method": "ties",
                             "sparsify": {"method": "tadrop", "drop_rate": 0.8,
                                          "budget": "elements"}},
}
DEFAULT_METHODS = ["linear", "task_arithmetic", "ties", "dare_ties"]
IO_FLOOR = "io_floor"

# Llama-style shapes. full: 32000 x 1024 embeddings, 34 layers of 1024/2816 -> 0.449B parameters,
# 0.90 GB in bf16, in 3 shards. small: ~50M parameters, for testing this script.
SCALES: dict[str, dict[str, Any]] = {
    "full": {"shape": dict(vocab=32000, hidden=1024, intermediate=2816, layers=34, heads=16,
                           kv_heads=4), "shard_size": 400_000_000},
    "small": {"shape": dict(vocab=8000, hidden=512, intermediate=1408, layers=15, heads=8,
                            kv_heads=2), "shard_size": 40_000_000},
}
SEED = 0


# --- checkpoints --------------------------------------------------------------------------------

def generator_version() -> str:
    """Hash of mergewise.synthetic's source: a changed generator gets freshly built checkpoints."""
    import mergewise.synthetic

    return hashlib.sha256(Path(mergewise.synthetic.__file__).read_bytes()).hexdigest()[:8]


def family_dir(root: Path, scale: str, layers: int | None) -> tuple[Path, dict[str, Any]]:
    spec = json.loads(json.dumps(SCALES[scale]))
    if layers is not None:
        spec["shape"]["layers"] = layers
    s = spec["shape"]
    key = (f"{scale}-v{s['vocab']}-h{s['hidden']}-i{s['intermediate']}-l{s['layers']}"
           f"-g{generator_version()}")
    return root / "checkpoints" / key, spec


def ensure_family(root: Path, scale: str, layers: int | None) -> tuple[Path, dict[str, Any]]:
    """Build base + experts once; a ``family.json`` written last marks a complete build."""
    import torch

    from mergewise.synthetic import LlamaShape, write_family

    directory, spec = family_dir(root, scale, layers)
    marker = directory / "family.json"
    shape = LlamaShape(**spec["shape"])
    want = {"shape": spec["shape"], "shard_size": spec["shard_size"], "seed": SEED,
            "experts": N_EXPERTS, "dtype": "bfloat16", "parameters": shape.parameters,
            "generator": generator_version()}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return directory, want
    if directory.exists():
        shutil.rmtree(directory)
    tmp = directory.with_name(directory.name + ".building")
    if tmp.exists():
        shutil.rmtree(tmp)
    print(f"building checkpoints: base + {N_EXPERTS} experts, {shape.parameters / 1e9:.3f}B "
          f"parameters each, bf16, shards of {spec['shard_size'] / 1e6:.0f} MB -> {directory}",
          flush=True)
    start = time.perf_counter()
    write_family(tmp, shape, N_EXPERTS, seed=SEED, dtype=torch.bfloat16,
                 shard_size=spec["shard_size"])
    (tmp / "family.json").write_text(json.dumps(want, indent=1))
    tmp.rename(directory)
    print(f"built in {time.perf_counter() - start:.0f} s", flush=True)
    return directory, want


def build_recipe(variant: dict[str, Any], family: Path) -> dict[str, Any]:
    v = dict(variant)
    include_base = v.pop("include_base_as_model", False)
    experts = [{"model": str(family / f"expert_{t}"), "name": f"task_{t}"}
               for t in range(N_EXPERTS)]
    recipe: dict[str, Any] = {"merge_method": v.pop("merge_method"), "seed": SEED}
    if include_base:
        recipe["models"] = [{"model": str(family / "base"), "name": "base"}, *experts]
    else:
        recipe["base_model"] = str(family / "base")
        recipe["models"] = experts
    recipe.update(v)
    return recipe


# --- the child: one measurement per process -----------------------------------------------------

def _maxrss_bytes() -> int:
    """Peak RSS of this process image: VmHWM (per address space, reset by exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: best effort


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    import mergewise
    from mergewise.checkpoint import open_checkpoint
    from mergewise.tensors import TensorInfo
    from mergewise.writer import ShardedWriter

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    family, out = Path(spec["family"]), Path(spec["out"])
    import_rss = _maxrss_bytes()
    if spec["name"] == IO_FLOOR:
        inputs = [open_checkpoint(family / "base")] + [
            open_checkpoint(family / f"expert_{t}") for t in range(N_EXPERTS)]
        start = time.perf_counter()
        base = inputs[0]
        names = base.names()
        out.mkdir(parents=True)
        writer = ShardedWriter(out, [TensorInfo(n, base.info(n).shape, base.info(n).dtype)
                                     for n in names], spec["shard_size"])
        for name in names:
            tensors = [c.read(name) for c in inputs]
            writer.write(name, tensors[0])
            del tensors
        writer.finalize()
        seconds = time.perf_counter() - start
        for c in inputs:
            c.close()
    else:
        recipe = build_recipe(spec["variant"], family)
        start = time.perf_counter()
        mergewise.merge(recipe, out, overwrite=True, progress=False,
                        shard_size=spec["shard_size"])
        seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": seconds, "peak_rss": _maxrss_bytes(), "import_rss": import_rss,
            "minor_faults": usage.ru_minflt, "cpu_seconds": usage.ru_utime + usage.ru_stime}


def measure(name: str, variant: dict[str, Any] | None, family: Path, out_root: Path,
            shard_size: int, threads: int | None) -> dict[str, Any]:
    out = out_root / name
    if out.exists():
        shutil.rmtree(out)  # outside the timed region
    spec = {"name": name, "variant": variant, "family": str(family), "out": str(out),
            "shard_size": shard_size, "threads": threads}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"measurement '{name}' failed (exit {proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["loadavg_1min_after"] = os.getloadavg()[0]
    shutil.rmtree(out, ignore_errors=True)
    return result


def warm_page_cache(family: Path) -> float:
    """Read every input file once (untimed), so every measurement sees the same warm cache."""
    total = 0
    for path in sorted(family.rglob("*.safetensors")):
        with open(path, "rb") as fh:
            while chunk := fh.read(64 << 20):
                total += len(chunk)
    return total / 1e9


# --- machine and report -------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_1min_at_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = ("method", "wall s", "peak RSS GB", "Mparams/s (5 inputs)", "x io_floor", "x linear")
    lines = [f"| {' | '.join(head)} |", "|" + "|".join("---" if i == 0 else "---:"
                                                     for i in range(len(head))) + "|"]
    for r in rows:
        cells = (r["method"], f"{r['seconds']:.1f}", f"{r['peak_rss_gb']:.2f}",
                 f"{r['params_per_s'] / 1e6:.1f}",
                 f"{r['x_io_floor']:.2f}" if r["x_io_floor"] is not None else "-",
                 f"{r['x_linear']:.2f}" if r["x_linear"] is not None else "-")
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("bench-out"),
                    help="cache of checkpoints and scratch outputs (default ./bench-out)")
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--layers", type=int, default=None,
                    help="override the number of layers (same largest tensor, other model size)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma-separated variants (known: {', '.join(VARIANTS)}); "
                         f"'{IO_FLOOR}' always runs")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                    help="add a recipe variant (a partial recipe as JSON) and run it")
    ap.add_argument("--repeats", type=int, default=1, help="runs per measurement; median reported")
    ap.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in each measurement (default: torch's own default)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    variants = dict(VARIANTS)
    extra = []
    for item in args.variant:
        name, sep, text = item.partition("=")
        if not sep:
            ap.error(f"--variant wants NAME=JSON, got {item!r}")
        variants[name] = json.loads(text)
        extra.append(name)
    methods = [m for m in args.methods.split(",") if m and m != IO_FLOOR] + extra
    unknown = [m for m in methods if m not in variants]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(variants)}")
    methods = list(dict.fromkeys(methods))

    info = machine()
    if args.threads:
        info["torch_threads"] = args.threads
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM; "
          f"torch {info['torch']} ({info['torch_threads']} threads), Python {info['python']}, "
          f"{info['os']}; {info['date']}; load average {info['loadavg_1min_at_start']:.2f}",
          flush=True)
    if info["loadavg_1min_at_start"] > 0.5:
        print("warning: the machine is busy (1-minute load average above 0.5); timings will be "
              "slower and noisier than on an idle machine", flush=True)
    root = args.root.absolute()
    family, fam = ensure_family(root, args.scale, args.layers)
    n_params = fam["parameters"]
    n_inputs = 1 + N_EXPERTS
    gb = warm_page_cache(family)
    print(f"inputs: {n_inputs} checkpoints x {n_params:,} parameters (bf16, {gb:.2f} GB on disk "
          f"in all, page cache warmed); output shards of {fam['shard_size'] / 1e6:.0f} MB; "
          f"{args.repeats} repeat(s), median reported", flush=True)

    names = [IO_FLOOR, *methods]
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    out_root = root / "outputs"
    for r in range(args.repeats):
        for name in names:
            res = measure(name, variants.get(name), family, out_root, fam["shard_size"],
                          args.threads)
            runs[name].append(res)
            print(f"  [{r + 1}/{args.repeats}] {name:<16} {res['seconds']:7.2f} s  "
                  f"peak RSS {res['peak_rss'] / 1e9:5.2f} GB  cpu {res['cpu_seconds']:6.1f} s  "
                  f"{res['minor_faults'] / 1e6:5.2f}M page faults  "
                  f"(load average {res['loadavg_1min_after']:.2f})", flush=True)
    shutil.rmtree(out_root, ignore_errors=True)

    med = {n: statistics.median(x["seconds"] for x in runs[n]) for n in names}
    rows = []
    for name in names:
        rows.append({
            "method": name,
            "recipe": None if name == IO_FLOOR else build_recipe(variants[name], Path("<family>")),
            "seconds": med[name],
            "peak_rss_gb": statistics.median(x["peak_rss"] for x in runs[name]) / 1e9,
            "import_rss_gb": statistics.median(x["import_rss"] for x in runs[name]) / 1e9,
            "params_per_s": n_inputs * n_params / med[name],
            "x_io_floor": med[name] / med[IO_FLOOR],
            "x_linear": med[name] / med["linear"] if "linear" in med else None,
            "runs": runs[name],
        })
    print()
    print(table(rows))
    print(f"\nparams/s = {n_inputs} inputs x {n_params:,} parameters / wall s; peak RSS includes "
          f"the Python+torch process baseline (~{rows[0]['import_rss_gb']:.2f} GB after imports)")
    checks = []
    merge_rows = [r for r in rows if r["method"] != IO_FLOOR]
    if merge_rows:
        worst = max(merge_rows, key=lambda r: r["peak_rss_gb"])
        checks.append(f"peak RSS < 3 GB: {'met' if worst['peak_rss_gb'] < 3 else 'MISSED'} "
                      f"(max {worst['peak_rss_gb']:.2f} GB, {worst['method']})")
    if "ties" in med and "linear" in med:
        ratio = med["ties"] / med["linear"]
        checks.append(f"ties <= 2.5x linear: {'met' if ratio <= 2.5 else 'MISSED'} "
                      f"({ratio:.2f}x)")
    for c in checks:
        print("target " + c)

    if args.json:
        payload = {
            "benchmark": "merge throughput and memory (issue 2)",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": info, "scale": args.scale, "family": fam, "inputs": n_inputs,
            "repeats": args.repeats, "rows": rows, "targets": checks,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
