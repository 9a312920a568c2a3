"""Running the CLI in-process and checking the one-line error contract (shared by test_cli.py and
tests/hostile/): exit 1, exactly one stderr line starting with ``error: `` that names what the
test expects, no traceback, nothing on stdout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from mergewise.cli import app


def run_cli(*args: str | Path, runner: CliRunner | None = None) -> Any:
    """``mergewise ARGS`` in this process (typer's runner); returns the click ``Result``."""
    return (runner or CliRunner()).invoke(app, [str(a) for a in args])


def assert_one_line_error(result: Any, *must_contain: str) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for text in must_contain:
        assert text in lines[0], (text, lines[0])
    assert result.stdout == ""
    return lines[0]
