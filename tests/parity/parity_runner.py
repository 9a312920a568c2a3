"""Run both tools: mergekit in its own virtualenv (never the project's), mergewise in-process.

mergekit runs offline (``HF_HUB_OFFLINE=1``: nothing may reach a hub), single-threaded (CPU
reductions can depend on the thread count) and seeded with ``--random-seed 0``; the whole corpus
goes through one ``mergekit_driver.py`` process, and ``run_mergekit_cli`` runs one recipe
through the real ``mergekit-yaml`` for spot checks. mergewise runs with torch pinned to one
thread too, restored afterwards (the rest of the test session keeps its setting).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DRIVER = HERE / "mergekit_driver.py"
SEED = 0
INSTALL = ("python3 -m venv .venv-mergekit && .venv-mergekit/bin/pip install -q torch==2.13.0 && "
           ".venv-mergekit/bin/pip install -q torch==2.13.0 mergekit==0.1.5")


def mergekit_venv() -> Path:
    """``$MERGEKIT_VENV``, else ``<repo>/.venv-mergekit``."""
    return Path(os.environ.get("MERGEKIT_VENV") or REPO / ".venv-mergekit")


def missing_mergekit(venv: Path) -> str | None:
    """Why the parity suite cannot run (None when it can): the venv or its mergekit-yaml."""
    if not (venv / "bin" / "python").exists() or not (venv / "bin" / "mergekit-yaml").exists():
        return (f"no mergekit virtualenv at {venv} (set MERGEKIT_VENV, or create it from the "
                f"repository root: {INSTALL})")
    return None


def offline_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):  # nothing of the project's venv
        env.pop(var, None)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


@dataclass(frozen=True)
class MergekitJob:
    name: str
    config: Path
    out: Path
    seed: int = SEED


def run_mergekit_corpus(venv: Path, jobs: list[MergekitJob], workdir: Path,
                        timeout: float = 600) -> dict[str, Any]:
    """Every job through one driver process; its results JSON."""
    manifest = workdir / "manifest.json"
    results = workdir / "mergekit_results.json"
    manifest.write_text(json.dumps({"seed": SEED, "threads": 1, "recipes": [
        {"name": j.name, "config": str(j.config), "out": str(j.out), "seed": j.seed}
        for j in jobs]}, indent=1))
    proc = subprocess.run([str(venv / "bin" / "python"), str(DRIVER), str(manifest), str(results)],
                          env=offline_env(), capture_output=True, text=True, timeout=timeout)
    (workdir / "mergekit_driver.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not results.exists():
        raise RuntimeError(f"mergekit driver failed (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-1500:]}")
    return json.loads(results.read_text())


def mergekit_cli(venv: Path, config: Path, out: Path) -> list[str]:
    """The ``mergekit-yaml`` command line for one recipe, as the driver emulates it."""
    return [str(venv / "bin" / "mergekit-yaml"), str(config), str(out), "--random-seed", str(SEED),
            "-j", "1", "--quiet", "--no-cuda"]


def run_mergekit_cli(venv: Path, config: Path, out: Path, timeout: float = 300
                     ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(mergekit_cli(venv, config, out), env=offline_env(), capture_output=True,
                          text=True, timeout=timeout)


@dataclass
class MergewiseOutcome:
    ok: bool
    seconds: float
    refused: str | None = None  # a MergewiseError's message (a refusal is a user-facing error)
    error: str | None = None  # anything else: a crash


def run_mergewise(config: Path, out: Path) -> MergewiseOutcome:
    """``mergewise.merge(config, out)`` with torch on one thread; errors are outcomes."""
    import mergewise
    from mergewise.errors import MergewiseError

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        mergewise.merge(config, out=out, overwrite=True)
        return MergewiseOutcome(True, time.perf_counter() - start)
    except MergewiseError as exc:
        return MergewiseOutcome(False, time.perf_counter() - start, refused=str(exc))
    except Exception as exc:  # noqa: BLE001 - a crash is reported in the table, not raised
        return MergewiseOutcome(False, time.perf_counter() - start,
                                error=f"{type(exc).__name__}: {str(exc).strip()[:300]}")
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":  # spot check: python parity_runner.py CONFIG OUT
    if len(sys.argv) != 3:
        sys.exit("usage: python tests/parity/parity_runner.py CONFIG.yml OUT_DIR")
    done = run_mergekit_cli(mergekit_venv(), Path(sys.argv[1]), Path(sys.argv[2]))
    print(done.stdout + done.stderr)
    sys.exit(done.returncode)
