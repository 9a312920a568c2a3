"""``bench build|run`` option checks: bad seeds and Ray settings are one-line errors."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mergewise.bench import INSTALL_HINT, missing_requirements
from mergewise.bench.zoo import FULL, expert_key, with_seed
from mergewise.cli import app

MISSING = missing_requirements()


def test_seed_zero_is_the_default_zoo_and_other_seeds_change_only_the_seed():
    assert with_seed(FULL, 0) == FULL and with_seed(FULL, None) is FULL
    assert with_seed(FULL, 2).train.seed == 2 and with_seed(FULL, 2).probe == FULL.probe
    with pytest.raises(ValueError, match="non-negative integer"):
        with_seed(FULL, -1)


@pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)}: {INSTALL_HINT}")
def test_seed_zero_keeps_the_expert_cache_key():
    from mergewise.bench.data import load_task_data

    task = load_task_data("gi_word_polarity")
    assert expert_key(task, with_seed(FULL, 0).train) == expert_key(task, FULL.train)
    assert expert_key(task, with_seed(FULL, 1).train) != expert_key(task, FULL.train)


@pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)}: {INSTALL_HINT}")
@pytest.mark.parametrize(("args", "message"), [
    (["--zoo-seeds", "0,x"], "--zoo-seeds: comma-separated non-negative integers"),
    (["--zoo-seeds", "0,0"], "--zoo-seeds: distinct non-negative integers"),
    (["--seed", "1", "--zoo-seeds", "0,1"], "give --seed or --zoo-seeds, not both"),
    (["--workers", "0"], "--workers: a positive integer"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, message):
    res = CliRunner().invoke(app, ["bench", "run", "--cache", str(tmp_path / "c"), "--out",
                                   str(tmp_path / "o"), *args])
    assert res.exit_code == 1
    assert message in res.output and "Traceback" not in res.output
