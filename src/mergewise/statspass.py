"""The stats pass: per-model statistics over the whole model, gathered before the merge pass.

Methods and sparsifiers that need global information (global TIES top-k, TADrop's budget) return
a ``StatsPass`` for each model. The engine streams every tensor's task vector through
``observe`` once per declared pass, calls ``end_pass`` after each, and hands ``for_tensor(name)``
to the sparsifier in the merge pass. Only small per-tensor results are kept.
"""

from __future__ import annotations

from typing import Any

import torch


class StatsPass:
    passes: int = 1

    def observe(self, pass_index: int, name: str, delta: torch.Tensor,
                params: dict[str, Any]) -> None:
        raise NotImplementedError

    def end_pass(self, pass_index: int) -> None:
        """Called after every tensor was observed in ``pass_index``."""

    def for_tensor(self, name: str) -> Any:
        raise NotImplementedError
