"""Candidate merges and evaluations on Ray workers, into the very cache the serial run uses.

Why this shape: a run's cost is its candidates (a merge plus a validation scoring each), and
they are independent, so they parallelise over processes or machines. Each Ray actor builds
the zoo once from its picklable description (``CachedZoo`` / ``TinyZoo``) and computes cached
evaluations with the serial code (``runner.evaluate_candidate``); the driver stores them under
the same keys. Then the ordinary serial pass assembles every row from the cache, so the table
is the serial table by construction: where an evaluation ran changes nothing but wall time.
On workers a candidate is always scored in full (no early stop: no rival's score is known
yet); the selected candidate of each row is then scored on test, also on the workers.

``ray`` is an optional dependency (the ``ray`` extra). A local cluster is started on the
machine's cores unless ``address`` names a running one (whose nodes need mergewise, the data
and model wheels and the expert cache at the same path).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MergewiseError


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None  # None: start a local cluster
    workers: int | None = None  # actors; None: the local machine's cores (1 on a cluster: give it)
    threads: int = 1  # torch threads per actor

    def __post_init__(self) -> None:
        for name in ("workers", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise MergewiseError(f"--{name}: a positive integer, got {value!r}")


class _Worker:
    """One Ray actor: the zoo loaded once, then any number of cached-evaluation computations."""

    def __init__(self, source: Any, threads: int):
        import torch

        import mergewise  # noqa: F401  (fills the registries in this process)

        torch.set_num_threads(threads)
        self.zoo = source.load()

    def evaluate(self, v: Any, cand: dict[str, Any], split: str, seed: int) -> dict[str, Any]:
        from .runner import evaluate_candidate

        return evaluate_candidate(self.zoo, v, cand, split, seed)[0]


def _start(settings: RaySettings) -> tuple[Any, int, bool]:
    """(ray module, number of actors, whether this call started the cluster)."""
    try:
        import ray
    except ImportError:
        raise MergewiseError("--ray needs the ray package: pip install 'mergewise[ray]'") from None
    if ray.is_initialized():
        return ray, settings.workers or 1, False
    if settings.address:
        ray.init(address=settings.address, log_to_driver=False)
        return ray, settings.workers or 1, True
    workers = settings.workers or os.cpu_count() or 1
    src = str(Path(__file__).resolve().parents[2])  # this mergewise, importable by the workers
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=workers * settings.threads, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": str(settings.threads),
                                       "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    return ray, workers, True


def _run_jobs(pool: Any, jobs: list[tuple[Any, dict[str, Any], str]], seed: int,
              results: Any, log: Callable[[str], None]) -> None:
    """Compute ``jobs`` (variant, candidate, split) on the pool; store each result as it lands
    (``ActorPool.map`` yields in submission order)."""
    from .runner import merge_spec

    outs = pool.map(lambda a, j: a.evaluate.remote(j[0], j[1], j[2], seed), jobs)
    for (v, cand, split), r in zip(jobs, outs, strict=True):
        results.put(v.label, merge_spec(v, cand, split), r)
    log(f"ray: {len(jobs)} evaluations computed")


def _chosen(v: Any, results: Any, n_tasks: int) -> dict[str, Any] | None:
    """The candidate the serial pass selects, once every candidate of ``v`` is cached."""
    from .runner import _candidate_entry, merge_spec, select_best

    cands = v.candidates()
    rs = [results.get(v.label, merge_spec(v, c, "val")) for c in cands]
    if any(r is None for r in rs):
        return None
    return select_best([_candidate_entry(c, r, n_tasks) for c, r in zip(cands, rs, strict=True)])


def prefill(settings: RaySettings, source: Any, results: Any, config: Any, variants: Sequence[Any],
            n_tasks: int, log: Callable[[str], None] = print) -> int:
    """Fill ``results`` with every candidate's validation scores and each row's selected test
    evaluation that are not cached yet; returns how many were computed."""
    from .runner import merge_spec

    session: dict[str, Any] = {}

    def pool() -> Any:
        if not session:
            ray, workers, started = _start(settings)
            from ray.util import ActorPool

            actor = ray.remote(num_cpus=settings.threads)(_Worker)
            session.update(ray=ray, started=started,
                           pool=ActorPool([actor.remote(source, settings.threads) for _ in range(workers)]))
            log(f"ray: {workers} workers")
        return session["pool"]

    try:
        todo = [(v, c, "val") for v in variants for c in v.candidates()
                if results.get(v.label, merge_spec(v, c, "val")) is None]
        if todo:
            _run_jobs(pool(), todo, config.seed, results, log)
        tests = []
        for v in variants:
            chosen = _chosen(v, results, n_tasks)
            if chosen is not None and results.get(v.label, merge_spec(v, chosen, "test")) is None:
                tests.append((v, chosen, "test"))
        if tests:
            _run_jobs(pool(), tests, config.seed, results, log)
        return len(todo) + len(tests)
    finally:
        if session.get("started"):
            session["ray"].shutdown()
