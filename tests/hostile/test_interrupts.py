"""Real processes stopped mid-merge: SIGTERM, SIGHUP and Ctrl-C end in one line with nothing
written and nothing left; ``kill -9`` leaves at most a temp directory (never a partial
output), which the next run removes. ``MERGEWISE_HOSTILE_KILLS`` sets the number of random
``kill -9`` runs (4 by default; docs/reliability.md reports a larger census)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ckpt_helpers import Family, leftovers, load_dir, make_family, recipe_for, write_recipe

from mergewise.synthetic import LlamaShape

# ~17M parameters per model in float32 (68 MB): a merge takes about a second after start-up.
MEDIUM = LlamaShape(vocab=4096, hidden=512, intermediate=1408, layers=4, heads=8, kv_heads=2)
KILLS = int(os.environ.get("MERGEWISE_HOSTILE_KILLS", "4"))
SCRIPT = [sys.executable, "-c", "from mergewise.entry import main; main()"]


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> tuple[Family, Path]:
    fam = make_family(tmp_path_factory.mktemp("medium"), MEDIUM, n_experts=2,
                      dtype=torch.float32)
    recipe = write_recipe(fam.root / "recipe.yaml",
                          recipe_for(fam, "ties", parameters={"density": 0.3}))
    return fam, recipe


def _sigint_as_at_a_terminal() -> None:
    """In the child, before exec: SIGINT back to its default. A test run started in the
    background of a non-interactive shell (``.ci/run &``) inherits SIGINT ignored, and a
    program started with it ignored rightly keeps ignoring it (so would mergewise)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(recipe: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.Popen([*SCRIPT, "merge", str(recipe), "--out", str(out), "--no-progress",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, preexec_fn=_sigint_as_at_a_terminal)


def _wait_for_temp(proc: subprocess.Popen[str], out: Path, timeout: float = 120.0) -> bool:
    """True once the run's temp directory exists (the merge is under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if leftovers(out.parent, out.name) and any(
                n.startswith(f".{out.name}.mergewise-tmp-") for n in leftovers(out.parent, out.name)):
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT],
                         ids=["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_signal_mid_merge_leaves_nothing(medium: tuple[Family, Path], tmp_path: Path,
                                           sig: signal.Signals) -> None:
    _, recipe = medium
    out = tmp_path / "merged"
    proc = _start(recipe, out)
    assert _wait_for_temp(proc, out), proc.communicate()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines == [f"interrupted ({sig.name}): nothing was written"], stderr
    assert not out.exists()
    assert leftovers(tmp_path, "merged") == []


def test_a_signal_during_start_up_is_one_line(medium: tuple[Family, Path], tmp_path: Path) -> None:
    _, recipe = medium
    proc = _start(recipe, tmp_path / "merged")
    time.sleep(0.3)  # still importing
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert "Traceback" not in stderr
    if proc.returncode != 0:  # (a very fast machine may have finished)
        assert proc.returncode == 128 + signal.SIGTERM, stderr
        assert [ln for ln in stderr.splitlines() if ln.strip()] == [
            "interrupted (SIGTERM): nothing was written"]


def test_kill_9_never_leaves_a_partial_output(medium: tuple[Family, Path], tmp_path: Path) -> None:
    fam, recipe = medium
    reference = tmp_path / "reference"
    done = subprocess.run([*SCRIPT, "merge", str(recipe), "--out", str(reference),
                           "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = load_dir(reference)
    rng = random.Random(14)
    out = tmp_path / "merged"
    for _ in range(KILLS):
        proc = _start(recipe, out, "--overwrite")
        assert _wait_for_temp(proc, out)
        time.sleep(rng.uniform(0.0, 1.0))
        proc.kill()
        proc.communicate(timeout=60)
        if out.exists():  # it finished first: then it is complete and right
            got = load_dir(out)
            assert got.keys() == expected.keys()
            assert all(torch.equal(got[k], expected[k]) for k in got)
    final = _start(recipe, out, "--overwrite")
    _, stderr = final.communicate(timeout=300)
    assert final.returncode == 0, stderr
    got = load_dir(out)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert leftovers(tmp_path, "merged") == []  # the killed runs' temp dirs are gone
    assert "Traceback" not in stderr
