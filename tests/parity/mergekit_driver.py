"""Run many mergekit recipes in one process, as ``mergekit-yaml`` would run each of them.

Executed with the mergekit virtualenv's python, never imported by the test suite (the project's
venv has no mergekit). Importing mergekit costs ~6 s per process, so the parity suite runs the
whole corpus through this one process instead of one ``mergekit-yaml`` per recipe.

For each recipe it does what ``mergekit/scripts/run_yaml.py:main`` does with
``--random-seed SEED -j THREADS --quiet``: ``MergeOptions.apply_global_options()`` (which seeds
``random``/numpy/torch), ``MergeConfiguration.model_validate(yaml.safe_load(text))`` and
``run_merge(config, out, options=..., config_source=text)`` (which seeds again). The thread
count is applied on the first recipe only: torch refuses a second ``set_num_interop_threads``
in one process, and the setting persists anyway. ``test_mergekit_parity`` checks that this
gives the same bytes as the real CLI for a few recipes.

usage: python mergekit_driver.py MANIFEST.json RESULTS.json
MANIFEST: {"seed": 0, "threads": 1,
           "recipes": [{"name": ..., "config": PATH, "out": DIR, "seed"?: int}]}
RESULTS:  {"mergekit_version": ..., "torch_version": ..., "import_seconds": ...,
           "recipes": {name: {"ok": bool, "seconds": float, "error": str | None}}}
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from importlib.metadata import version
from typing import Any


def run_one(config_path: str, out: str, options: Any, first: bool) -> None:
    """One recipe, the way ``mergekit-yaml CONFIG OUT`` runs it."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge

    (options if first else options.model_copy(update={"num_threads": None})).apply_global_options()
    with open(config_path, encoding="utf-8") as f:
        source = f.read()
    config = MergeConfiguration.model_validate(yaml.safe_load(source))
    run_merge(config, out, options=options, config_source=source)


def main(manifest_path: str, results_path: str) -> int:
    start = time.perf_counter()
    import mergekit.merge  # noqa: F401 - the import cost, measured once
    from mergekit.options import MergeOptions

    import_seconds = time.perf_counter() - start
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    options = MergeOptions(random_seed=manifest.get("seed", 0), num_threads=manifest.get("threads", 1),
                           quiet=True, cuda=False)
    results: dict[str, Any] = {}
    for i, recipe in enumerate(manifest["recipes"]):
        t0 = time.perf_counter()
        own = options.model_copy(update={"random_seed": recipe.get("seed", options.random_seed)})
        try:
            run_one(recipe["config"], recipe["out"], own, first=i == 0)
            results[recipe["name"]] = {"ok": True, "error": None}
        except Exception as exc:  # a recipe mergekit rejects is a result, not a driver failure
            lines = str(exc).strip().splitlines()
            results[recipe["name"]] = {
                "ok": False, "error": f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300],
                "traceback": traceback.format_exc(limit=4)[-2000:]}
        results[recipe["name"]]["seconds"] = round(time.perf_counter() - t0, 3)
    import torch

    with open(results_path, "w", encoding="utf-8") as f:
        json.dump({"mergekit_version": version("mergekit"), "torch_version": torch.__version__,
                   "transformers_version": version("transformers"),
                   "import_seconds": round(import_seconds, 3),
                   "total_seconds": round(time.perf_counter() - start, 3), "recipes": results}, f,
                  indent=1)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
