"""A 2-worker local Ray run gives the very table of a serial run (tiny in-memory zoo).

Costs a local Ray start (~10 s) plus two worker processes importing torch/transformers; CI
installs the ``ray`` extra (.ci/run), elsewhere the test is skipped without ray.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("ray")

import mergewise  # noqa: E402,F401  (fills the registries)
from mergewise.bench.dispatch import RaySettings  # noqa: E402
from mergewise.bench.runner import Grids, RunConfig, run_zoo  # noqa: E402
from mergewise.bench.tiny import TinyZoo  # noqa: E402
from mergewise.errors import MergewiseError  # noqa: E402

RUN = RunConfig(grids=Grids(lambda_sum=(0.3, 1.0, 3.0), lambda_mean=(1.0, 4.0),
                            density={"magnitude": (0.2,)}), methods=("task_arithmetic", "ties"))


def _table(doc):
    return [(r["label"], r.get("selected"), r["test"], r.get("test_bits")) for r in doc["rows"]]


def test_two_local_ray_workers_give_the_serial_table(tmp_path):
    serial = run_zoo(TinyZoo(), tmp_path / "serial", RUN, progress=False, log=lambda s: None)
    log: list[str] = []
    on_ray = run_zoo(TinyZoo(), tmp_path / "ray", RUN, progress=False, log=log.append,
                     ray=RaySettings(workers=2))
    assert _table(on_ray) == _table(serial)
    assert "ray: 2 workers" in log and "ray: 5 evaluations computed" in log  # 3 TA + 2 TIES on val
    # on workers every candidate is scored in full (no rival known yet): nothing stopped
    assert not any(c.get("stopped") for r in on_ray["rows"] for c in r.get("candidates", ()))
    again: list[str] = []  # everything cached now: a re-run starts no cluster at all
    rerun = run_zoo(TinyZoo(), tmp_path / "ray", RUN, progress=False, log=again.append,
                    ray=RaySettings(workers=2))
    assert _table(rerun) == _table(serial) and not any(s.startswith("ray:") for s in again)


def test_ray_settings_are_checked():
    with pytest.raises(MergewiseError, match="--workers: a positive integer"):
        RaySettings(workers=0)
