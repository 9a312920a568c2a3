"""mergewise against mergekit 0.1.5: whole CLI processes, the same YAML recipes, one table (issue 13).

Builds (once, cached under ``--work`` by a hash of the spec) a seeded bf16 Llama base with 415.2M
parameters (hidden 896, 24 layers, intermediate 4864, 14 heads / 2 KV heads, vocab 32000, untied
embeddings; 219 tensors, one ``model.safetensors`` each) and four fine-tunes whose task vectors are
heavy-tailed and bf16-quantized, as real bf16 fine-tunes are. Then it runs ``mergekit-yaml`` (from
its own venv) and ``mergewise merge`` on the same recipes in mergekit's own form, interleaved
(which tool goes first alternates between repeats), each as a whole process:

- wall time is taken by this parent around the child; peak RSS is the child's own ``ru_maxrss``
  from ``os.wait4`` (this parent never imports torch, so the part of ``ru_maxrss`` Linux carries
  over ``exec`` from the parent is its ~20 MB, printed);
- every measurement waits for an idle machine first (1-minute load average, less what our own
  finished children still account for in it, below ``--max-load``, and a quiet second of
  ``/proc/stat``; ``os.sync()`` first, so no earlier write is flushed during the run). During
  the run, the CPU time of everything else is the machine's busy time (``/proc/stat``, steal
  included) minus the child's own user + sys time; a run during which others used more than
  ``--max-other`` of one core is "under load" and is run again (up to ``--max-retries`` times);
  cells still under load are marked in the table;
- the floors are measured in the same run: ``cat`` of all five inputs from the page cache, and
  writing one base-sized file (0.83 GB) without and with ``fsync``;
- mergewise is installed editable, so a hash of its source is taken before each of its runs, and
  the output says when rows ran different code.

mergekit runs as ``HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 mergekit-yaml CFG OUT --random-seed 0
--no-cuda -j <cores> --quiet --out-shard-size 5B --no-copy-tokenizer`` (the inputs have no
tokenizer: without the flag it logs a traceback and still succeeds); mergewise as ``mergewise
merge CFG --out OUT --overwrite --no-progress``. The linear recipe lists the base with weight 0:
mergekit 0.1.5 appends an unlisted ``base_model`` to the inputs and then fails for want of its
weight.

    python benchmarks/vs_mergekit.py                          # full size, 3 repeats
    python benchmarks/vs_mergekit.py --repeats 1 --methods linear,ties --json out.json
    python benchmarks/vs_mergekit.py --scale tiny --skip-mergekit --repeats 1   # tests the script
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MERGEKIT_VERSION = "0.1.5"
TORCH_PIN = "torch==2.13.0"

# --- the inputs ---------------------------------------------------------------------------------

SCALES: dict[str, dict[str, int]] = {
    "full": dict(hidden=896, layers=24, intermediate=4864, heads=14, kv_heads=2, vocab=32000),
    "tiny": dict(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, vocab=256),
}
EXPECTED_COUNTS = {"full": (415_214_464, 219)}  # (parameters, tensors) per model, from the issue
M_K = (0.5, 0.79, 1.26, 2.0)  # per fine-tune scale of its task vector
SUPPORTS = (1.0, 0.5, 0.1)  # Bernoulli support of a tensor's task vector, one drawn per tensor
EMBED_SUPPORT = 0.1  # the embedding's task vector is ~93% exact zeros, as the issue states
DELTA_SCALE = 1e-2  # x std(base tensor) x m_k x u_t
INPUTS_VERSION = 1  # bump when the generator below changes: the cache key changes with it
SEED = 0
MODELS = ("base", "ft0", "ft1", "ft2", "ft3")


def tensor_shapes(s: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    """HF Llama tensor names and shapes, in the order the checkpoints store them."""
    h, i, kv = s["hidden"], s["intermediate"], s["kv_heads"] * (s["hidden"] // s["heads"])
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (s["vocab"], h))]
    for n in range(s["layers"]):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (s["vocab"], h))]
    return out


def hf_config(s: dict[str, int]) -> dict[str, Any]:
    """A config.json that transformers and mergekit load as LlamaForCausalLM."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": s["hidden"], "intermediate_size": s["intermediate"],
            "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
            "num_key_value_heads": s["kv_heads"], "vocab_size": s["vocab"],
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "dtype": "bfloat16"}


def input_spec(scale: str) -> dict[str, Any]:
    """Everything the inputs depend on; its hash names the cache directory."""
    return {"version": INPUTS_VERSION, "scale": scale, "shape": SCALES[scale], "seed": SEED,
            "m_k": list(M_K), "supports": list(SUPPORTS), "embed_support": EMBED_SUPPORT,
            "delta_scale": DELTA_SCALE, "u_t": [0.5, 2.0], "base_std": 0.02, "norm_gain": 0.05,
            "dists": ["laplace", "student_t3"], "dtype": "bfloat16"}


def spec_key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def safetensors_counts(path: Path) -> tuple[int, int, set[str]]:
    """(parameters, tensors, dtypes) from a safetensors header, without torch."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    params = 0
    for v in header.values():
        count = 1
        for d in v["shape"]:
            count *= d
        params += count
    return params, len(header), {v["dtype"] for v in header.values()}


def ensure_inputs(work: Path, scale: str) -> tuple[Path, dict[str, Any]]:
    """Build the five checkpoints in a child process (this parent stays small), once per spec."""
    spec = input_spec(scale)
    directory = work / "inputs" / f"{scale}-{spec_key(spec)}"
    marker = directory / "inputs.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("spec") == spec:
            print(f"inputs: cached in {directory}", flush=True)
            return directory, info
    tmp = directory.with_name(directory.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"inputs: building base + 4 fine-tunes ({scale}) in {directory} ...", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--build-child", str(tmp), json.dumps(spec)],
                   check=True)
    info = json.loads((tmp / "inputs.json").read_text())
    tmp.rename(directory)
    print(f"inputs: built in {time.perf_counter() - start:.0f} s", flush=True)
    return directory, info


def verify_inputs(directory: Path, scale: str) -> dict[str, Any]:
    """Parameter and tensor counts of every checkpoint, checked against the issue's numbers."""
    counts = {m: safetensors_counts(directory / m / "model.safetensors") for m in MODELS}
    (params, tensors, dtypes) = counts["base"]
    for m, c in counts.items():
        if c[:2] != (params, tensors) or c[2] != {"BF16"}:
            raise SystemExit(f"input {m} has {c}, base has {counts['base']}")
    expected = EXPECTED_COUNTS.get(scale)
    if expected and expected != (params, tensors):
        raise SystemExit(f"inputs have {params:,} parameters / {tensors} tensors, the issue says "
                         f"{expected[0]:,} / {expected[1]}")
    sizes = {m: (directory / m / "model.safetensors").stat().st_size for m in MODELS}
    return {"parameters": params, "tensors": tensors, "bytes_per_model": sizes["base"],
            "bytes_all": sum(sizes.values()), "matches_issue": expected is not None}


# --- the build child (imports torch) ------------------------------------------------------------

def _gen(*parts: object) -> Any:
    """One seeded generator per (purpose, model, tensor): any tensor can be rebuilt alone."""
    import torch

    key = "\x00".join(str(p) for p in parts).encode()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)
    return g


def base_tensor(name: str, shape: tuple[int, ...], spec: dict[str, Any]) -> Any:
    """~N(0, 0.02) weights; norm gains uniform in 1 +- 0.05; rounded to bf16."""
    import torch

    g = _gen(spec["seed"], "base", name)
    if len(shape) == 1:
        t = 1 + spec["norm_gain"] * (2 * torch.rand(shape, generator=g) - 1)
    else:
        t = torch.randn(shape, generator=g) * spec["base_std"]
    return t.to(torch.bfloat16)


def tensor_props(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Per-tensor choices shared by the four fine-tunes: distribution, support, u_t."""
    import torch

    g = _gen(spec["seed"], "props", name)
    dist = spec["dists"][int(torch.randint(len(spec["dists"]), (1,), generator=g))]
    support = spec["supports"][int(torch.randint(len(spec["supports"]), (1,), generator=g))]
    if name == "model.embed_tokens.weight":
        support = spec["embed_support"]
    lo, hi = spec["u_t"]
    u = lo + (hi - lo) * float(torch.rand((), generator=g))
    return {"dist": dist, "support": support, "u": u}


def heavy_noise(shape: tuple[int, ...], dist: str, g: Any) -> Any:
    """Unit-scale Laplace or Student-t(3) noise, float32, from one generator."""
    import torch

    if dist == "laplace":
        e = torch.empty(shape).exponential_(generator=g)
        return torch.where(torch.rand(shape, generator=g) < 0.5, e, -e)
    z = torch.randn((4, *shape), generator=g)
    return z[0] / torch.sqrt((z[1:] ** 2).sum(0) / 3)


def finetune_tensor(base: Any, name: str, k: int, props: dict[str, Any],
                    spec: dict[str, Any]) -> Any:
    """base + delta, added in float32 and rounded to bf16 (so the delta is bf16-quantized)."""
    import torch

    g = _gen(spec["seed"], "delta", k, name)
    b = base.float()
    delta = heavy_noise(tuple(base.shape), props["dist"], g)
    if props["support"] < 1:
        delta *= torch.rand(tuple(base.shape), generator=g) < props["support"]
    delta *= spec["delta_scale"] * float(b.std()) * spec["m_k"][k] * props["u"]
    return (b + delta).to(torch.bfloat16)


class StreamingSafetensors:
    """One bf16 safetensors file: header first, then tensors appended in order (low memory)."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...]]]):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in entries:
            nbytes = 2 * _numel(shape)
            header[name] = {"dtype": "BF16", "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.order = [name for name, _ in entries]
        self.fh = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.fh.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: Any) -> None:
        import torch

        if name != self.order.pop(0) or tensor.dtype != torch.bfloat16:
            raise RuntimeError(f"unexpected tensor {name} {tensor.dtype}")
        self.fh.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))

    def close(self) -> None:
        if self.order:
            raise RuntimeError(f"{len(self.order)} tensors not written")
        self.fh.close()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def delta_stats(name: str, base: Any, ft: Any) -> dict[str, Any]:
    """What the issue promises about the task vectors: exact zeros, distinct magnitudes."""
    delta = ft.float() - base.float()
    out: dict[str, Any] = {"zeros": float((delta == 0).float().mean())}
    if ".mlp." in name:
        out["distinct_magnitudes"] = int(delta.abs().unique().numel())
    return out


def build_child(directory: Path, spec: dict[str, Any]) -> None:
    """Write base + 4 fine-tunes tensor by tensor, all five files at once (one pass)."""
    import torch

    torch.manual_seed(0)
    entries = tensor_shapes(spec["shape"])
    writers = {}
    for m in MODELS:
        (directory / m).mkdir()
        (directory / m / "config.json").write_text(json.dumps(hf_config(spec["shape"]), indent=2))
        writers[m] = StreamingSafetensors(directory / m / "model.safetensors", entries)
    first_mlp = next(n for n, _ in entries if ".mlp." in n)
    stats: dict[str, Any] = {"props": {}, "embed_tokens": [], "first_mlp": [], "norm_zeros": []}
    start = time.perf_counter()
    for j, (name, shape) in enumerate(entries):
        base = base_tensor(name, shape, spec)
        writers["base"].write(name, base)
        props = tensor_props(name, spec)
        stats["props"][name] = props
        for k in range(len(spec["m_k"])):
            ft = finetune_tensor(base, name, k, props, spec)
            writers[f"ft{k}"].write(name, ft)
            if name in ("model.embed_tokens.weight", first_mlp) or len(shape) == 1:
                s = delta_stats(name, base, ft)
                key = ("embed_tokens" if "embed" in name else "first_mlp" if name == first_mlp
                       else "norm_zeros")
                stats[key].append(s if key != "norm_zeros" else s["zeros"])
        if j % 20 == 0:
            print(f"  {j + 1}/{len(entries)} tensors, {time.perf_counter() - start:.0f} s",
                  flush=True)
    for w in writers.values():
        w.close()
    stats["first_mlp_name"] = first_mlp
    stats["first_mlp_props"] = stats["props"][first_mlp]
    stats["norm_zeros"] = statistics.mean(stats["norm_zeros"])
    (directory / "inputs.json").write_text(json.dumps({"spec": spec, "stats": stats}, indent=1))


# --- recipes ------------------------------------------------------------------------------------

METHODS: dict[str, str] = {  # key -> table label
    "linear": "linear",
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
    "dare_ties": "dare_ties",
    "breadcrumbs": "breadcrumbs",
    "ties_tadrop": "ties + TADrop (p̄ 0.8)",
    "ties_tadrop_cached": "ties + TADrop, statistics cached",
}
MERGEWISE_ONLY = {"ties_tadrop", "ties_tadrop_cached"}
PER_MODEL: dict[str, dict[str, float]] = {
    "linear": {"weight": 0.25}, "task_arithmetic": {"weight": 0.25},
    "ties": {"weight": 0.25, "density": 0.2}, "dare_ties": {"weight": 0.25, "density": 0.2},
    "breadcrumbs": {"weight": 0.25, "density": 0.9, "gamma": 0.01},
    "ties_tadrop": {"weight": 0.25}, "ties_tadrop_cached": {"weight": 0.25},
}


def recipe(method: str, inputs: Path) -> dict[str, Any]:
    """mergekit's own form, absolute paths (mergekit's card step calls the hub for short ones)."""
    merge_method = "ties" if method in MERGEWISE_ONLY else method
    r: dict[str, Any] = {
        "merge_method": merge_method,
        "base_model": str(inputs / "base"),
        "models": [{"model": str(inputs / f"ft{k}"), "parameters": dict(PER_MODEL[method])}
                   for k in range(len(M_K))],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    if method == "linear":  # mergekit 0.1.5 appends an unlisted base_model and then wants its
        # weight (semantics note, section 9.13): list it with weight 0; both tools read 5 inputs
        r["models"].insert(0, {"model": str(inputs / "base"), "parameters": {"weight": 0.0}})
    if method in MERGEWISE_ONLY:
        r["sparsify"] = {"method": "tadrop", "drop_rate": 0.8}
    return r


def write_recipes(work: Path, inputs: Path, methods: list[str]) -> dict[str, Path]:
    import yaml

    directory = work / "recipes"
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for m in methods:
        paths[m] = directory / f"{m}.yml"
        paths[m].write_text(yaml.safe_dump(recipe(m, inputs), sort_keys=False))
    return paths


# --- tools --------------------------------------------------------------------------------------

@dataclass
class Tools:
    mergewise: Path
    mergekit: Path | None
    mergekit_versions: dict[str, str] = field(default_factory=dict)


def find_mergewise() -> Path:
    """The mergewise console script next to this interpreter (the project venv)."""
    here = Path(sys.executable).parent / "mergewise"
    found = here if here.exists() else shutil.which("mergewise")
    if not found:
        raise SystemExit("mergewise is not installed next to this Python nor on PATH")
    return Path(found)


def mergekit_candidates(explicit: Path | None) -> list[Path]:
    if explicit:
        return [explicit]
    out = [Path(os.environ["MERGEKIT_VENV"])] if os.environ.get("MERGEKIT_VENV") else []
    return out + [REPO / ".venv-mergekit", REPO.parent / "mergekit-venv",
                  REPO.parent / ".venv-mergekit"]


def install_mergekit(venv: Path) -> None:
    """A separate venv: mergekit's pins must never touch the project's environment."""
    print(f"installing mergekit {MERGEKIT_VERSION} into {venv} ...", flush=True)
    subprocess.run([shutil.which("python3") or sys.executable, "-m", "venv", str(venv)],
                   check=True)
    pip = str(venv / "bin" / "pip")
    subprocess.run([pip, "install", TORCH_PIN], check=True)
    subprocess.run([pip, "install", TORCH_PIN, f"mergekit=={MERGEKIT_VERSION}"], check=True)


def find_mergekit(explicit: Path | None, install: bool) -> tuple[Path, dict[str, str]]:
    """mergekit-yaml from its own venv, with the versions it runs on."""
    candidates = mergekit_candidates(explicit)
    venv = next((c for c in candidates if (c / "bin" / "mergekit-yaml").exists()), None)
    if venv is None:
        if not install:
            raise SystemExit("no mergekit venv found (looked in "
                             + ", ".join(map(str, candidates))
                             + "); pass --mergekit-venv, --install-mergekit or --skip-mergekit")
        venv = candidates[0]
        install_mergekit(venv)
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('mergekit', 'torch', 'transformers')}))")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True,
                         text=True, check=True).stdout
    versions = json.loads(out)
    if versions["mergekit"] != MERGEKIT_VERSION:
        print(f"warning: {venv} has mergekit {versions['mergekit']}, not {MERGEKIT_VERSION}",
              flush=True)
    return venv / "bin" / "mergekit-yaml", versions


def base_env() -> dict[str, str]:
    """Offline for both tools; no stats cache unless a row asks for it."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("MERGEWISE_STATS_CACHE", None)
    return env


def mergewise_code() -> str:
    """Hash of the installed mergewise package's source files. The package is installed editable
    and may be edited while the benchmark runs; rows measured with different code are flagged."""
    spec = importlib.util.find_spec("mergewise")
    if spec is None or spec.origin is None:
        return "?"
    h = hashlib.sha256()
    for path in sorted(Path(spec.origin).parent.rglob("*.py")):
        h.update(str(path).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:10]


def git_head() -> str | None:
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def mergekit_cmd(tools: Tools, cfg: Path, out: Path) -> list[str]:
    assert tools.mergekit is not None
    return [str(tools.mergekit), str(cfg), str(out), "--random-seed", "0", "--no-cuda",
            "-j", str(os.cpu_count() or 1), "--quiet", "--out-shard-size", "5B",
            "--no-copy-tokenizer"]


def mergewise_cmd(tools: Tools, cfg: Path, out: Path) -> list[str]:
    return [str(tools.mergewise), "merge", str(cfg), "--out", str(out), "--overwrite",
            "--no-progress"]


# --- measuring one process ----------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")
# /proc/stat counts whole ticks per CPU: a run of a few ms can show a few ticks of "others"
# that are only rounding, so that much is forgiven before a run counts as under load
TICK_SLACK = 2 * (os.cpu_count() or 1) / CLK_TCK


def busy_cpu_seconds() -> float:
    """Busy CPU time of the whole machine (all cores, steal included) from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class Run:
    """One whole-process measurement and the load the machine was under during it."""

    wall_s: float
    peak_rss_gb: float
    cpu_s: float
    other_core_frac: float  # CPU time of everything else / wall time, in cores
    load_before: float
    load_after: float
    gate_wait_s: float
    gate_ok: bool
    rc: int
    gate_load: float = 0.0  # load average less our own children's share, when the gate let it go
    inner_s: float | None = None  # a floor's own timing, printed by the child
    out_gb: float | None = None
    attempts: int = 1
    under_load: bool = False
    error: str = ""
    code: str = ""  # hash of mergewise's source when this ran (it is installed editable)


def run_process(cmd: list[str], env: dict[str, str], capture: bool = True) -> Run:
    """Popen + os.wait4: wall time by the parent, peak RSS and CPU of this child alone.

    Output goes to temporary files, not pipes: ``communicate`` would reap the child itself and
    its rusage would be lost."""
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        sink: Any = out_f if capture else subprocess.DEVNULL
        load_before = os.getloadavg()[0]
        busy0, own0 = busy_cpu_seconds(), own_cpu_seconds()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=sink,
                                stderr=err_f if capture else subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        busy, own = busy_cpu_seconds() - busy0, own_cpu_seconds() - own0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out_f.seek(0)
        err_f.seek(0)
        text, err = out_f.read().decode(errors="replace"), err_f.read().decode(errors="replace")
    cpu = usage.ru_utime + usage.ru_stime
    run = Run(wall_s=wall, peak_rss_gb=usage.ru_maxrss * 1024 / 1e9, cpu_s=cpu,
              other_core_frac=max(0.0, busy - cpu - own) / max(wall, 1e-9),
              load_before=load_before, load_after=os.getloadavg()[0], gate_wait_s=0.0,
              gate_ok=True, rc=proc.returncode)
    if run.rc != 0:
        run.error = (text + err)[-3000:]
    elif text.strip().startswith("inner_s="):
        run.inner_s = float(text.strip().split("=", 1)[1])
    return run


def quiet_second() -> float:
    """Cores' worth of CPU used by everything over one second while we sleep."""
    busy0, t0 = busy_cpu_seconds(), time.perf_counter()
    time.sleep(1.0)
    return (busy_cpu_seconds() - busy0) / (time.perf_counter() - t0)


# (end time, average cores in use, duration) of this script's own recent children
_OWN_RUNS: list[tuple[float, float, float]] = []


def own_load() -> float:
    """How much of the 1-minute load average our own finished children still account for.

    The load average is an exponential average (time constant 60 s) of the runnable count, so a
    2-thread merge leaves ~2 in it that takes ~80 s to decay below 0.5; subtracting that lets the
    gate see other processes' load without waiting for our own to fade."""
    now = time.perf_counter()
    return sum(c * (1 - math.exp(-d / 60)) * math.exp(-(now - end) / 60)
               for end, c, d in _OWN_RUNS[-20:])


def wait_idle(opts: argparse.Namespace) -> tuple[float, bool, float]:
    """Wait until the load average, less our own (``own_load``), is under --max-load and one
    second of /proc/stat is quiet; give up after --gate-timeout (0: no gate, for tests).
    Returns (seconds waited, whether the machine got idle, the corrected load)."""
    start = time.perf_counter()
    if opts.gate_timeout <= 0:
        return 0.0, True, os.getloadavg()[0]
    while True:
        load = max(0.0, os.getloadavg()[0] - own_load())
        if load < opts.max_load and quiet_second() < opts.max_other:
            return time.perf_counter() - start, True, load
        if time.perf_counter() - start > opts.gate_timeout:
            return time.perf_counter() - start, False, load
        time.sleep(2.0)


def measure(cmd: list[str], env: dict[str, str], opts: argparse.Namespace,
            out: Path | None = None, capture: bool = True) -> Run:
    """Idle-gated; re-run while others used more than --max-other of a core; keep the quietest.
    No re-run after the gate timed out: the machine is busy for longer than a re-run can wait."""
    best: Run | None = None
    for attempt in range(1, opts.max_retries + 2):
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)
        os.sync()  # no dirty pages left from earlier writes to throttle or flush during this run
        waited, ok, load = wait_idle(opts)
        run = run_process(cmd, env, capture)
        _OWN_RUNS.append((time.perf_counter(), run.cpu_s / max(run.wall_s, 1e-9), run.wall_s))
        run.gate_wait_s, run.gate_ok, run.gate_load, run.attempts = waited, ok, load, attempt
        run.under_load = run.other_core_frac * run.wall_s > opts.max_other * run.wall_s + TICK_SLACK
        if out is not None:
            run.out_gb = sum(p.stat().st_size for p in out.rglob("*.safetensors")) / 1e9 \
                if out.exists() else None
            shutil.rmtree(out, ignore_errors=True)
        if best is None or run.other_core_frac < best.other_core_frac:
            best = run
        if run.rc != 0 or not run.under_load or not ok or attempt > opts.max_retries:
            break
        print(f"      under load (others used {run.other_core_frac:.0%} of a core); "
              "running it again", flush=True)
    assert best is not None
    best.attempts = attempt
    return best


def describe(run: Run) -> str:
    flag = "  UNDER LOAD" if run.under_load else ""
    fail = f"  FAILED rc={run.rc}" if run.rc else ""
    inner = f" (timed inside: {run.inner_s:.2f} s)" if run.inner_s is not None else ""
    inner += f"  out {run.out_gb:.3f} GB" if run.out_gb is not None else ""
    return (f"{run.wall_s:7.2f} s{inner}  peak {run.peak_rss_gb:5.2f} GB  cpu {run.cpu_s:6.1f} s  "
            f"others {run.other_core_frac:4.0%} of a core  load {run.load_before:.2f}->"
            f"{run.load_after:.2f} (not ours {run.gate_load:.2f})  waited {run.gate_wait_s:.0f} s"
            f"{'' if run.gate_ok else ' (gate timed out)'}"
            f"{f'  (quietest of {run.attempts} runs)' if run.attempts > 1 else ''}{flag}{fail}")


# --- floors and start-up ------------------------------------------------------------------------

WRITE_CHILD = """
import os, sys, time
src, dst, sync = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
data = open(src, "rb").read()
start = time.perf_counter()
with open(dst, "wb") as fh:
    view = memoryview(data)
    for i in range(0, len(data), 64 << 20):
        fh.write(view[i:i + (64 << 20)])
    fh.flush()
    if sync:
        os.fsync(fh.fileno())
print(f"inner_s={time.perf_counter() - start}")
"""


def floors(inputs: Path, scratch: Path, env: dict[str, str], opts: argparse.Namespace,
           tag: str) -> dict[str, Run]:
    """cat of all five inputs (after a warm-up read), one base-sized write with and without fsync."""
    files = [str(inputs / m / "model.safetensors") for m in MODELS]
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)  # warm-up read
    out: dict[str, Run] = {"cat": measure(["cat", *files], env, opts, capture=False)}
    print(f"  {tag} floor cat (5 inputs)     {describe(out['cat'])}", flush=True)
    scratch.mkdir(parents=True, exist_ok=True)
    target = scratch / "write-floor.safetensors"
    for key, sync in (("write", "0"), ("write_fsync", "1")):
        out[key] = measure([sys.executable, "-c", WRITE_CHILD, files[0], str(target), sync], env,
                           opts)
        target.unlink(missing_ok=True)
        print(f"  {tag} floor {key:<18} {describe(out[key])}", flush=True)
    return out


def startups(tools: Tools, cfg: Path, env: dict[str, str], opts: argparse.Namespace,
             tag: str) -> dict[str, Run]:
    """Start-up cost of each CLI: --help, and mergewise's dry run of a full recipe."""
    cmds = {"mergewise --help": [str(tools.mergewise), "--help"],
            "mergewise merge --dry-run": [str(tools.mergewise), "merge", str(cfg), "--dry-run"]}
    if tools.mergekit:
        cmds["mergekit-yaml --help"] = [str(tools.mergekit), "--help"]
    out = {}
    for key, cmd in cmds.items():
        code = mergewise_code() if key.startswith("mergewise") else ""
        out[key] = measure(cmd, env, opts)
        out[key].code = code
        print(f"  {tag} {key:<27} {describe(out[key])}", flush=True)
    return out


def check_recipes(tools: Tools, recipes: dict[str, Path], work: Path, env: dict[str, str]) -> None:
    """mergewise must take every recipe as mergekit writes it (dry runs, all at once: untimed)."""
    procs = {m: subprocess.Popen([str(tools.mergewise), "merge", str(cfg), "--out",
                                  str(work / "out" / f"dry-run-{m}"), "--overwrite", "--dry-run"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
             for m, cfg in recipes.items()}
    failed = {m: p.communicate()[0] for m, p in procs.items()}
    failed = {m: text for m, text in failed.items() if procs[m].returncode != 0}
    for m, text in failed.items():
        print(f"mergewise rejects the {m} recipe {recipes[m]}:\n{text}", flush=True)
    if failed:
        raise SystemExit(f"mergewise --dry-run rejected: {', '.join(failed)}")
    print(f"recipes: mergewise --dry-run accepts all {len(recipes)} ({', '.join(recipes)})",
          flush=True)


# --- the interleaved merges ---------------------------------------------------------------------

def merge_runs(method: str, r: int, tools: Tools, cfg: Path, work: Path,
               opts: argparse.Namespace, results: dict[str, dict[str, list[Run]]],
               cache_state: dict[str, Any]) -> None:
    """One repeat of one method: both tools, the order alternating with the repeat."""
    env = base_env()
    tag = f"[{r + 1}/{opts.repeats}] {method:<18}"
    if method == "ties_tadrop_cached":
        env["MERGEWISE_STATS_CACHE"] = str(cache_state["dir"])
        if cache_state["owned"]:
            shutil.rmtree(cache_state["dir"], ignore_errors=True)
        cache_state["dir"].mkdir(parents=True, exist_ok=True)
        code = mergewise_code()
        fill = measure(mergewise_cmd(tools, cfg, work / "out" / "mw"), env, opts,
                       out=work / "out" / "mw")
        fill.code = code
        results[method].setdefault("fill", []).append(fill)
        cache_state["files"] = sum(1 for p in cache_state["dir"].rglob("*") if p.is_file())
        print(f"  {tag} mergewise (fill) {describe(fill)}  cache: {cache_state['files']} file(s)",
              flush=True)
    order = ["mergekit", "mergewise"] if r % 2 == 0 else ["mergewise", "mergekit"]
    for tool in order:
        if tool == "mergekit" and (tools.mergekit is None or method in MERGEWISE_ONLY):
            continue
        out = work / "out" / ("mk" if tool == "mergekit" else "mw")
        cmd = (mergekit_cmd if tool == "mergekit" else mergewise_cmd)(tools, cfg, out)
        code = mergewise_code() if tool == "mergewise" else ""
        run = measure(cmd, env, opts, out=out)
        run.code = code
        results[method].setdefault(tool, []).append(run)
        print(f"  {tag} {tool:<16} {describe(run)}", flush=True)
        if run.rc:
            print("      " + run.error.strip().replace("\n", "\n      "), flush=True)


# --- summary ------------------------------------------------------------------------------------

@dataclass
class Cell:
    """The median over repeats of one (row, tool), and whether any repeat was under load."""

    seconds: float | None
    rss_gb: float | None
    under_load: bool
    failed: bool

    @classmethod
    def of(cls, runs: list[Run] | None, inner: bool = False) -> Cell:
        ok = [r for r in runs or [] if r.rc == 0]
        if not ok:
            return cls(None, None, False, bool(runs))
        secs = [r.inner_s if inner and r.inner_s is not None else r.wall_s for r in ok]
        return cls(statistics.median(secs), statistics.median(r.peak_rss_gb for r in ok),
                   any(r.under_load for r in ok), len(ok) < len(runs or []))

    def text(self) -> str:
        if self.seconds is None:
            return "failed" if self.failed else "-"
        digits = 2 if self.seconds >= 0.1 else 4
        return f"{self.seconds:.{digits}f}{'*' if self.under_load else ''}"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(x: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


def summarise(results: dict[str, dict[str, list[Run]]], floor_runs: dict[str, list[Run]],
              start_runs: dict[str, list[Run]]) -> dict[str, Any]:
    """Medians per cell, the ratios the targets use."""
    rows = {}
    for m, by_tool in results.items():
        mw, mk = Cell.of(by_tool.get("mergewise")), Cell.of(by_tool.get("mergekit"))
        rows[m] = {"mergewise": mw, "mergekit": mk, "speedup": ratio(mk.seconds, mw.seconds),
                   "rss_ratio": ratio(mw.rss_gb, mk.rss_gb)}
        if "fill" in by_tool:
            rows[m]["fill"] = Cell.of(by_tool["fill"])
    fl = {k: Cell.of(v, inner=k != "cat") for k, v in floor_runs.items()}
    st = {k: Cell.of(v) for k, v in start_runs.items()}
    return {"rows": rows, "floors": fl, "read_write": _sum_cell(fl, "cat", "write"),
            "read_write_fsync": _sum_cell(fl, "cat", "write_fsync"), "startup": st}


def _sum_cell(cells: dict[str, Cell], a: str, b: str) -> Cell | None:
    x, y = cells.get(a), cells.get(b)
    if x is None or y is None or x.seconds is None or y.seconds is None:
        return None
    return Cell(x.seconds + y.seconds, None, x.under_load or y.under_load, False)


def size_text(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e7 else f"{nbytes / 1e6:.3f} MB"


def table(s: dict[str, Any], info: dict[str, Any]) -> str:
    """The issue's table, Markdown, with floors and start-up rows under the methods."""
    gb = size_text(info["inputs"]["bytes_per_model"])
    lines = ["| method (mergekit's YAML) | mergewise s | mergekit s | mergekit / mergewise "
             "| peak RSS mergewise / mergekit |", "|---|---:|---:|---:|---:|"]
    for m, row in s["rows"].items():
        mw, mk = row["mergewise"], row["mergekit"]
        rss = (f"{fmt(mw.rss_gb)} / {fmt(mk.rss_gb)} GB = {fmt(row['rss_ratio'])}"
               if row["rss_ratio"] is not None else f"{fmt(mw.rss_gb)} GB / -")
        speed = fmt(row["speedup"], 1, "x")
        lines.append(f"| {METHODS[m]} | {mw.text()} | {mk.text()} | {speed} | {rss} |")
    fl = s["floors"]
    if fl:
        lines += [f"| floor: cat of the 5 inputs (page cache) | {fl['cat'].text()} | | | |",
                  f"| floor: write {gb}, no fsync | {fl['write'].text()} | | | |",
                  f"| floor: write {gb} + fsync | {fl['write_fsync'].text()} | | | |"]
        for key, what in (("read_write", "no fsync"), ("read_write_fsync", "+ fsync")):
            if s[key]:
                lines.append(f"| floor: read + write (cat + write, {what}) | {s[key].text()} "
                             "| | | |")
    st = s["startup"]
    if st:
        mk_help = st.get("mergekit-yaml --help")
        mk_text = mk_help.text() if mk_help else "-"
        help_ratio = fmt(ratio(mk_help.seconds if mk_help else None,
                               st["mergewise --help"].seconds), 1, "x")
        lines += [f"| start-up: `--help` | {st['mergewise --help'].text()} | {mk_text} | "
                  f"{help_ratio} | |",
                  f"| start-up: `merge ties.yml --dry-run` | "
                  f"{st['mergewise merge --dry-run'].text()} | | | |"]
    return "\n".join(lines)


def target(name: str, value: float | None, ok: bool | None, shown: str,
           loaded: bool) -> dict[str, Any]:
    verdict = "n/a" if ok is None else "met" if ok else "MISSED"
    note = " (measured under load)" if loaded and ok is not None else ""
    return {"target": name, "value": value, "verdict": verdict, "text":
            f"{name}: {verdict}{'' if ok is None else ' - ' + shown}{note}"}


def _speed(s: dict[str, Any], m: str) -> tuple[float | None, bool]:
    row = s["rows"].get(m)
    if not row:
        return None, False
    return row["speedup"], row["mergewise"].under_load or row["mergekit"].under_load


def targets(s: dict[str, Any]) -> list[dict[str, Any]]:
    """Each of the issue's targets, evaluated with this run's medians."""
    out = []
    compared = [m for m, r in s["rows"].items() if r["speedup"] is not None]
    if compared:
        worst = min(compared, key=lambda m: s["rows"][m]["speedup"])
        v, loaded = _speed(s, worst)
        out.append(target("every method >= 3x faster than mergekit", v, v >= 3,
                          f"slowest ratio {v:.1f}x ({worst})", loaded))
    else:
        out.append(target("every method >= 3x faster than mergekit", None, None, "", False))
    for methods, bound in ((("linear", "task_arithmetic"), 4.0), (("ties", "breadcrumbs"), 8.0)):
        for m in methods:
            v, loaded = _speed(s, m)
            out.append(target(f"{m} >= {bound:.0f}x faster than mergekit", v,
                              None if v is None else v >= bound, f"{fmt(v, 1)}x", loaded))
    floor = _relative(s, "linear", s["read_write"], 4.0,
                      "linear within 4x of the read + write floor (cat + write, no fsync)")
    synced = _relative(s, "linear", s["read_write_fsync"], 4.0, "")
    if floor["value"] is not None and synced["value"] is not None:
        floor["text"] += (f"; {synced['value']:.2f}x the floor with fsync (mergewise fsyncs its "
                          "shards)")
    out.append(floor)
    out.append(_relative(s, "ties", _mw(s, "linear"), 2.0, "ties <= 2x linear"))
    out.append(_relative(s, "ties_tadrop", _mw(s, "ties"), 1.3, "ties + TADrop <= 1.3x ties"))
    out.append(_relative(s, "ties_tadrop_cached", _mw(s, "ties"), 1.05,
                         "ties + TADrop, statistics cached, <= 1.05x ties"))
    rss = [(m, r["rss_ratio"]) for m, r in s["rows"].items() if r["rss_ratio"] is not None]
    if rss:
        m, v = max(rss, key=lambda x: x[1])
        out.append(target("peak RSS <= 1/4 of mergekit's", v, v <= 0.25,
                          f"largest mergewise / mergekit {v:.2f} ({m})", False))
    else:
        out.append(target("peak RSS <= 1/4 of mergekit's", None, None, "", False))
    for key in ("mergewise --help", "mergewise merge --dry-run"):
        c = s["startup"].get(key)
        v = c.seconds if c else None
        out.append(target(f"`{key}` starts in under 1.5 s", v, None if v is None else v < 1.5,
                          f"{fmt(v)} s", bool(c and c.under_load)))
    return out


def _mw(s: dict[str, Any], m: str) -> Cell | None:
    row = s["rows"].get(m)
    return row["mergewise"] if row else None


def _relative(s: dict[str, Any], m: str, ref: Cell | None, bound: float, name: str) -> dict:
    cell = _mw(s, m)
    if cell is None or cell.seconds is None or ref is None or ref.seconds is None:
        return target(name, None, None, "", False)
    v = cell.seconds / ref.seconds
    return target(name, v, v <= bound, f"{v:.2f}x", cell.under_load or ref.under_load)


# --- machine, options, main ---------------------------------------------------------------------

def machine(tools: Tools) -> dict[str, Any]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(),
            "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
            "torch": importlib.metadata.version("torch"),
            "mergewise": importlib.metadata.version("mergewise"),
            "mergewise_git": git_head(), "mergewise_code": mergewise_code(),
            "mergekit_venv": tools.mergekit_versions or None,
            "python": platform.python_version(), "os": f"{platform.system()} {platform.release()}",
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "loadavg_at_start": os.getloadavg()[0]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/mergewise/vs-mergekit",
                    help="inputs (cached by spec hash), recipes and scratch outputs")
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated, from: {', '.join(METHODS)}")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians reported")
    ap.add_argument("--mergekit-venv", type=Path, default=None,
                    help="default: $MERGEKIT_VENV, <repo>/.venv-mergekit, ../mergekit-venv")
    ap.add_argument("--install-mergekit", action="store_true",
                    help=f"create the mergekit venv ({TORCH_PIN}, mergekit=={MERGEKIT_VERSION}) "
                         "when none is found")
    ap.add_argument("--skip-mergekit", action="store_true", help="mergewise rows and floors only")
    ap.add_argument("--tadrop-cache", type=Path, default=None,
                    help="MERGEWISE_STATS_CACHE for the cached TADrop row (default: a directory "
                         "under --work, emptied before each repeat)")
    ap.add_argument("--max-load", type=float, default=0.5,
                    help="wait for a 1-minute load average below this before each measurement")
    ap.add_argument("--max-other", type=float, default=0.10,
                    help="a run is under load when others used more than this many cores")
    ap.add_argument("--max-retries", type=int, default=2, help="re-runs of a run under load")
    ap.add_argument("--gate-timeout", type=float, default=240.0,
                    help="seconds to wait for an idle machine before measuring anyway (0: no gate)")
    ap.add_argument("--json", type=Path, default=None, help="also write everything here as JSON")
    ap.add_argument("--build-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.method_list = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.method_list if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    return args


def check_disk(work: Path, scale: str) -> None:
    """Five inputs (unless cached) and one output at a time, bf16."""
    spec = input_spec(scale)
    cached = (work / "inputs" / f"{scale}-{spec_key(spec)}" / "inputs.json").is_file()
    need = (2 if cached else 7) * 2 * sum(_numel(shape) for _, shape in tensor_shapes(SCALES[scale]))
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"{work} has {free / 1e9:.1f} GB free; inputs + one output need "
                         f"{need / 1e9:.1f} GB")


def print_header(info: dict[str, Any], inputs: dict[str, Any], stats: dict[str, Any]) -> None:
    mk = info["mergekit_venv"]
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM; torch "
          f"{info['torch']}, mergewise {info['mergewise']} (git {info['mergewise_git']}, source "
          f"{info['mergewise_code']}), Python {info['python']}, {info['os']}; "
          f"{info['date']}; load average {info['loadavg_at_start']:.2f}", flush=True)
    if mk:
        print(f"mergekit: {mk['mergekit']} (torch {mk['torch']}, transformers "
              f"{mk['transformers']})", flush=True)
    check = "= the issue's numbers" if inputs["matches_issue"] else "(tiny scale)"
    emb = [f"{e['zeros']:.1%}" for e in stats["embed_tokens"]]
    mlp = [str(e["distinct_magnitudes"]) for e in stats["first_mlp"]]
    print(f"inputs: {inputs['parameters']:,} parameters, {inputs['tensors']} tensors per model "
          f"{check}; bf16, {inputs['bytes_per_model'] / 1e9:.3f} GB each, "
          f"{inputs['bytes_all'] / 1e9:.2f} GB for all 5", flush=True)
    print(f"task vectors (ft0..ft3): embedding exact zeros {', '.join(emb)}; "
          f"{stats['first_mlp_name']} (support {stats['first_mlp_props']['support']}, "
          f"{stats['first_mlp_props']['dist']}) distinct magnitudes {', '.join(mlp)}; "
          f"norm gains' task vectors {stats['norm_zeros']:.0%} zeros", flush=True)


def load_notes(results: dict[str, dict[str, list[Run]]], floor_runs: dict[str, list[Run]],
               start_runs: dict[str, list[Run]], opts: argparse.Namespace) -> list[str]:
    """One line per measurement that stayed under load after its re-runs."""
    notes = []
    groups = [(f"{m} / {t}", rs) for m, d in results.items() for t, rs in d.items()]
    groups += [(f"floor {k}", rs) for k, rs in floor_runs.items()]
    groups += [(k, rs) for k, rs in start_runs.items()]
    for name, runs in groups:
        for i, r in enumerate(runs):
            if r.under_load:
                why = (f"others used {r.other_core_frac:.0%} of a core" +
                       ("" if r.gate_ok else f"; the idle gate timed out (load {r.gate_load:.2f} "
                        "besides ours)"))
                notes.append(f"{name}, repeat {i + 1}: {why} (after {r.attempts} attempt(s))")
    total = sum(len(rs) for _, rs in groups)
    timeouts = sum(1 for _, rs in groups for r in rs if not r.gate_ok)
    head = (f"load: {len(notes)} of {total} measurements still under load after re-runs (others "
            f"used > {opts.max_other:.0%} of a core during the run); their cells are marked *. "
            f"The idle gate (load average less our own < {opts.max_load}) timed out before "
            f"{timeouts} of them.")
    return [head, *notes]


def code_note(results: dict[str, dict[str, list[Run]]], start_runs: dict[str, list[Run]],
              at_start: str) -> str:
    """Whether every mergewise row ran the same mergewise source."""
    seen: dict[str, list[str]] = {}
    groups = [(f"{m}/{t}", rs) for m, d in results.items() for t, rs in d.items()]
    for name, rs in groups + list(start_runs.items()):
        for r in rs:
            if r.code:
                seen.setdefault(r.code, []).append(name)
    if set(seen) <= {at_start}:
        return f"code: every mergewise run used the same source (hash {at_start})"
    parts = [f"{code}: {', '.join(rows)}" for code, rows in seen.items()]
    return ("code: mergewise's source CHANGED during this run (it is installed editable), so its "
            f"rows are not comparable with each other; at start {at_start}; " + "; ".join(parts))


def output_note(results: dict[str, dict[str, list[Run]]], base_bytes: int) -> str:
    """Every merge must have written one bf16 model (the base's size): a sanity check that both
    tools did the same job (a float32 output would be twice the size)."""
    odd = [f"{m} / {t}: {size_text((r.out_gb or 0) * 1e9)}" for m, d in results.items()
           for t, rs in d.items() for r in rs
           if r.rc == 0 and (r.out_gb is None or abs(r.out_gb * 1e9 / base_bytes - 1) > 0.01)]
    if odd:
        return f"outputs: NOT the base's size ({size_text(base_bytes)}): " + "; ".join(odd)
    return (f"outputs: every merge wrote {size_text(base_bytes)} of safetensors, the base's size "
            "(bf16)")


def cache_note(cache_state: dict[str, Any], methods: list[str]) -> str | None:
    if "ties_tadrop_cached" not in methods:
        return None
    if cache_state.get("files"):
        return (f"TADrop statistics cache: {cache_state['files']} file(s) in {cache_state['dir']} "
                "after the fill run; the cached row is the second run")
    return ("TADrop statistics cache: MERGEWISE_STATS_CACHE wrote nothing (not implemented in "
            "this mergewise yet), so the 'statistics cached' row is just a second uncached run "
            "and equals the plain TADrop row up to noise")


def to_json(obj: Any) -> Any:
    if isinstance(obj, (Run, Cell)):
        return asdict(obj)
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.build_child:
        build_child(Path(opts.build_child[0]), json.loads(opts.build_child[1]))
        return 0
    work = opts.work.expanduser().absolute()
    work.mkdir(parents=True, exist_ok=True)
    tools = Tools(mergewise=find_mergewise(), mergekit=None)
    if not opts.skip_mergekit:
        tools.mergekit, tools.mergekit_versions = find_mergekit(opts.mergekit_venv,
                                                                opts.install_mergekit)
    info = machine(tools)
    check_disk(work, opts.scale)
    inputs_dir, built = ensure_inputs(work, opts.scale)
    info["inputs"] = verify_inputs(inputs_dir, opts.scale)
    print_header(info, info["inputs"], built["stats"])
    recipes = write_recipes(work, inputs_dir, opts.method_list)
    env = base_env()
    check_recipes(tools, recipes, work, env)
    dry_cfg = recipes.get("ties") or write_recipes(work, inputs_dir, ["ties"])["ties"]
    cache_state = {"dir": (opts.tadrop_cache or work / "tadrop-stats-cache").expanduser(),
                   "owned": opts.tadrop_cache is None}
    results: dict[str, dict[str, list[Run]]] = {m: {} for m in opts.method_list}
    floor_runs: dict[str, list[Run]] = {}
    start_runs: dict[str, list[Run]] = {}
    print(f"parent peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.3f} GB "
          "(the floor of every child's ru_maxrss)", flush=True)
    for r in range(opts.repeats):
        tag = f"[{r + 1}/{opts.repeats}]"
        for k, v in floors(inputs_dir, work / "out", env, opts, tag).items():
            floor_runs.setdefault(k, []).append(v)
        for k, v in startups(tools, dry_cfg, env, opts, tag).items():
            start_runs.setdefault(k, []).append(v)
        for m in opts.method_list:
            merge_runs(m, r, tools, recipes[m], work, opts, results, cache_state)
    shutil.rmtree(work / "out", ignore_errors=True)

    summary = summarise(results, floor_runs, start_runs)
    checks = targets(summary)
    notes = load_notes(results, floor_runs, start_runs, opts)
    cnote = cache_note(cache_state, opts.method_list)
    notes.append(output_note(results, info["inputs"]["bytes_per_model"]))
    notes.append(code_note(results, start_runs, info["mergewise_code"]))
    print()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM, torch "
          f"{info['torch']}, {info['date']}; mergewise git {info['mergewise_git']}; "
          f"{opts.repeats} interleaved repeat(s), medians; * = measured under load")
    print()
    print(table(summary, info))
    print()
    print("targets:")
    for c in checks:
        print(f"- {c['text']}")
    print()
    for line in [*notes, *([cnote] if cnote else [])]:
        print(line)
    if opts.json:
        payload = {"benchmark": "mergewise vs mergekit (issue 13)", "argv": sys.argv,
                   "machine": info, "inputs_dir": inputs_dir, "input_spec": built["spec"],
                   "input_stats": {k: v for k, v in built["stats"].items() if k != "props"},
                   "recipes": {m: recipe(m, inputs_dir) for m in opts.method_list},
                   "commands": {"mergekit": mergekit_cmd(tools, Path("CFG"), Path("OUT"))
                                if tools.mergekit else None,
                                "mergewise": mergewise_cmd(tools, Path("CFG"), Path("OUT"))},
                   "summary": summary, "targets": checks, "load_notes": notes,
                   "cache_note": cnote, "runs": {"merges": results, "floors": floor_runs,
                                                 "startup": start_runs},
                   "table": table(summary, info)}
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(to_json(payload), indent=1) + "\n")
        print(f"wrote {opts.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
