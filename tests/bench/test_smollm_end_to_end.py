"""The long SmolLM2 end to end (issue 15, part 3), opt-in: the CI test's pipeline
(test_smollm_ci.py) at the benchmark's ``slow`` budget, LOT included: three LoRA experts (r 8 on
all seven projections, 12 steps each), each written as a PEFT adapter only; TIES+TADrop, SLERP
(t over depth) and LOT all take the adapter directories as model entries (LOT's calibration
capture runs the base with each adapter applied); every output loaded by transformers.

The lower bounds on the gain fractions are the measured values of this budget (seeded; see
docs/benchmarks.md, "SmolLM2 end to end") with a margin, not guesses. 4.5 min wall on an idle
2-core VM with one torch thread (17 min at load 4); most of it is LOT (capture + 210
pseudo-inverses) and the fine-tuning steps. Run it with
MERGEWISE_SLOW_TESTS=1 .venv/bin/python -m pytest tests/bench/test_smollm_end_to_end.py
"""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("MERGEWISE_SLOW_TESTS") != "1",
                                reason="slow (4.5 min idle): set MERGEWISE_SLOW_TESTS=1")

# Lowest gain fraction measured at SLOW_BUDGET over the tasks (docs/benchmarks.md, two runs, 1
# and 2 torch threads, full fine-tunes as inputs): ties+tadrop 0.855 (french), slerp 0.933
# (shout), lot 0.985 (french). The bounds sit ~0.1 below, room for thread-count rounding (and
# the adapters' exact task vectors), far above 0 (= no better than the base).
MIN_GAIN = {"ties+tadrop": 0.75, "slerp": 0.8, "lot": 0.9}


@pytest.fixture(scope="module")
def run(smollm_base, offline, tmp_path_factory):
    import torch

    from mergewise.bench import lm_e2e as e2e

    torch.manual_seed(0)
    run = e2e.run_all(smollm_base, tmp_path_factory.mktemp("smollm-e2e"), e2e.SLOW_BUDGET)
    return smollm_base, run.experts, run.merged, run.doc


def test_experts_are_adapters_and_every_merge_reads_them(run):
    _, experts, _, doc = run
    for name, ft in experts.items():
        assert (ft.adapter / "adapter_config.json").is_file()
        assert (ft.adapter / "adapter_model.safetensors").is_file()
        assert ft.full is None  # no full fine-tune is written: no merge needs one
        assert ft.heldout[name] < doc["base"]["loss"][name], name  # each expert learnt its task


def test_outputs_load_tied_with_the_base_files(run):
    from mergewise.bench.lm_e2e import output_files_report

    base, _, merged, doc = run
    assert set(merged) == {"ties+tadrop", "slerp", "lot"}
    for label, path in merged.items():
        report = output_files_report(base, path)
        assert all(report.values()), (label, report)
        assert doc["merged"][label]["tied"], label


def test_merges_keep_a_measured_share_of_each_gain(run):
    _, _, _, doc = run
    print(json.dumps({label: row["gain"] for label, row in doc["merged"].items()}))  # pytest -s
    for label, row in doc["merged"].items():
        for task, gain in row["gain"].items():
            assert gain >= MIN_GAIN[label], (label, task, gain, row["loss"])


def test_greedy_answers_are_text(run):
    _, _, _, doc = run
    for label, row in doc["merged"].items():
        assert all(isinstance(s, str) and s for s in row["sample"].values()), label
