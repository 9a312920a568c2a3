"""benchmarks/vs_mergekit.py runs end to end at a tiny scale (mergewise only; mergekit is not run).

The full benchmark takes an hour on 2 cores; this keeps the script itself from rotting: inputs
built and verified, recipes accepted, floors and merges measured, the table and JSON written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_mergekit.py"


def test_tiny_run_prints_the_table(tmp_path: Path) -> None:
    out_json = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--scale", "tiny", "--repeats", "1", "--skip-mergekit",
         "--methods", "linear,ties", "--work", str(tmp_path / "work"), "--json", str(out_json),
         "--gate-timeout", "0", "--max-retries", "0"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "| method (mergekit's YAML) | mergewise s | mergekit s | mergekit / mergewise |" in text
    for row in ("| linear |", "| ties |", "floor: cat of the 5 inputs", "start-up: `--help`"):
        assert row in text
    assert "targets:" in text and "ties <= 2x linear" in text
    payload = json.loads(out_json.read_text())
    assert payload["summary"]["rows"]["ties"]["mergewise"]["seconds"] > 0
    assert payload["machine"]["cores"] >= 1
    assert not (tmp_path / "work" / "out").exists()  # outputs deleted after their runs
