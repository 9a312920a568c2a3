"""Docs that are derived from code must match it; README and CI must agree on the test command."""

from __future__ import annotations

import re
from pathlib import Path

from mergewise.docs import methods_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_methods_doc_is_generated_from_registry():
    assert (ROOT / "docs" / "methods.md").read_text() == methods_markdown(), (
        "docs/methods.md is stale: run `mergewise methods --markdown > docs/methods.md`")


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    setup, test = blocks[0].strip(), blocks[1].strip()
    assert "torch==2.13.0" in setup and "mergewise example" in setup
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test in ci_lines
