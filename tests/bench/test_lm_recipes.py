"""The SmolLM2 end-to-end recipes (bench/lm_e2e.py) read the LoRA adapters themselves, as a
LoRA user writes them: TIES+TADrop and LOT an adapter directory on ``base_model``, SLERP
mergekit's ``base+adapter``. No model is built here; the merges themselves run in
test_smollm_ci.py (TIES, SLERP) and the opt-in test_smollm_end_to_end.py (LOT), and an
adapter's LOT equals its full fine-tune's in tests/features/test_lora_features.py."""

from __future__ import annotations

from pathlib import Path

from mergewise.bench.lm_e2e import SLOW_BUDGET, recipes
from mergewise.bench.lm_train import FineTune


def test_every_merge_of_the_slow_budget_takes_the_adapter_directories(tmp_path: Path) -> None:
    base = tmp_path / "base"
    experts = {n: FineTune(n, tmp_path / n / "adapter", None) for n in ("shout", "json", "french")}
    calib = {n: tmp_path / f"{n}.txt" for n in experts}
    plan = recipes(base, experts, calib, SLOW_BUDGET, stats_dir=tmp_path / "stats")
    assert set(plan) == {"ties+tadrop", "slerp", "lot"}
    lot = plan["lot"]
    assert lot["base_model"] == str(base)
    assert [m["model"] for m in lot["models"]] == [str(ft.adapter) for ft in experts.values()]
    assert [m["calibration"]["data"] for m in lot["models"]] == [str(p) for p in calib.values()]
    assert [m["features"] for m in lot["models"]] == [
        str(tmp_path / "stats" / f"{n}.safetensors") for n in experts]
    assert [m["model"] for m in plan["ties+tadrop"]["models"]] == [str(ft.adapter)
                                                                  for ft in experts.values()]
    assert [m["model"] for m in plan["slerp"]["models"]] == [
        f"{base}+{experts[n].adapter}" for n in ("shout", "json")]


def test_no_budget_writes_full_fine_tunes_by_default() -> None:
    assert SLOW_BUDGET.full is False and SLOW_BUDGET.lot is True
