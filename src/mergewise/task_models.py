"""Task models of a task-specific merge (EMR), from files or from memory.

``mergewise merge`` with ``merge_method: emr`` writes the unified model (theta0 + tau_uni) and
``modulators.safetensors``; ``materialize`` writes task t's model theta0 + lambda_t (M_t tau_uni)
as a normal checkpoint directory (atomically), ``task_state_dict`` returns it without writing,
``load_task`` loads it into a torch module. ``TaskModels`` is the in-memory counterpart returned
by ``merge_task_state_dicts``. All of them assemble tensors with ``Modulators.task_tensors``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint, StateDictCheckpoint, open_checkpoint
from .errors import ModulatorError, OutputError
from .modulators import FILE_NAME, Modulators
from .outputs import CONFIG, HF_TAGALONG_FILES, OutputDirectory, task_card
from .readers import compute_device
from .version import __version__
from .writer import DEFAULT_SHARD_SIZE, parse_size


class TaskModels(Mapping[str, dict[str, "torch.Tensor"]]):
    """{task: state dict} of an in-memory task-specific merge; each is assembled on access."""

    def __init__(self, unified: dict[str, torch.Tensor], modulators: Modulators, base: Checkpoint,
                 device: str | torch.device = "cpu"):
        self.unified = unified
        self.modulators = modulators
        self._unified = StateDictCheckpoint("unified", unified)
        self._base = base
        self.device = device

    @property
    def tasks(self) -> list[str]:
        return list(self.modulators.tasks)

    @property
    def rescalers(self) -> dict[str, float]:
        return dict(self.modulators.rescalers)

    @property
    def modulator_bytes(self) -> int:
        """Tensor bytes of the modulators (masks at 1 bit per entry per task, rescalers, 32-byte
        digests): ``modulators.safetensors`` minus its header."""
        return self.modulators.nbytes

    def task_state_dict(self, task: str) -> dict[str, torch.Tensor]:
        return dict(self.modulators.task_tensors(task, self._unified, self._base, self.device))

    def load_into(self, module: torch.nn.Module, task: str, strict: bool = True) -> Any:
        return module.load_state_dict(self.task_state_dict(task), strict=strict)

    def __getitem__(self, task: str) -> dict[str, torch.Tensor]:
        return self.task_state_dict(task)

    def __contains__(self, task: object) -> bool:
        return task in self.modulators.tasks

    def __iter__(self) -> Iterator[str]:
        return iter(self.modulators.tasks)

    def __len__(self) -> int:
        return len(self.modulators.tasks)


class _Opened:
    """The unified model, its modulators and the base of one merge output directory."""

    def __init__(self, merged: str | Path, base: str | Path | None):
        self.directory = Path(merged).expanduser()
        if not self.directory.is_dir():
            raise ModulatorError(f"{self.directory}: no such directory; pass the --out of a "
                                 "`mergewise merge` with merge_method: emr")
        path = self.directory / FILE_NAME
        if not path.is_file():
            raise ModulatorError(f"{self.directory}: has no {FILE_NAME}; it is not the output of "
                                 "a task-specific merge (merge_method: emr)")
        self.mods = Modulators.open(path)
        self.unified = self.base = None
        try:
            base_path = base if base is not None else self.mods.base_model
            if base_path is None:
                raise ModulatorError(f"{path}: records no base model; pass it with --base")
            self.unified = open_checkpoint(self.directory)
            self.base = open_checkpoint(base_path)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for c in (self.unified, self.base, self.mods):
            if c is not None:
                c.close()

    def __enter__(self) -> _Opened:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def task_state_dict(merged: str | Path, task: str, *, base: str | Path | None = None,
                    device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Task ``task``'s weights from a task-specific merge's output directory (nothing written).

    ``base`` defaults to the base model path recorded at merge time.
    """
    device = compute_device(device)
    with _Opened(merged, base) as o:
        return dict(o.mods.task_tensors(task, o.unified, o.base, device))  # type: ignore[arg-type]


def load_task(module: torch.nn.Module, merged: str | Path, task: str, *,
              base: str | Path | None = None, strict: bool = True) -> Any:
    """Load task ``task``'s weights into ``module`` (``load_state_dict``'s result is returned)."""
    return module.load_state_dict(task_state_dict(merged, task, base=base), strict=strict)


def materialize(merged: str | Path, task: str, out: str | Path, *,
                base: str | Path | None = None, overwrite: bool = False,
                shard_size: int | str = DEFAULT_SHARD_SIZE, device: str | torch.device = "cpu") -> Path:
    """Write task ``task``'s model as a normal checkpoint directory ``out`` (atomically), with
    the unified model's config and tokenizer files; returns ``out``."""
    size = parse_size(shard_size)
    device = compute_device(device)  # before anything is opened or written
    target = Path(out).expanduser().absolute()
    with _Opened(merged, base) as o:
        o.mods.task_index(task)  # an unknown task fails before anything is written
        inputs = [o.directory.resolve()]
        if o.base is not None and o.base.directory is not None:
            inputs.append(o.base.directory.resolve())
        if target.resolve() in inputs:
            raise OutputError(f"{target}: is an input of materialize; choose another --out")
        unified, base_ckpt = o.unified, o.base
        assert unified is not None and base_ckpt is not None
        tensors = [unified.info(n) for n in unified.names()]
        lam = o.mods.rescalers[task]
        metadata = {"mergewise_version": __version__, "mergewise_task": task,
                    "mergewise_rescaler": repr(lam)}
        with OutputDirectory(target, tensors, shard_size=size, metadata=metadata,
                             overwrite=overwrite) as output:
            for name, tensor in o.mods.task_tensors(task, unified, base_ckpt, device):
                output.write(name, tensor)
            output.end_shards()
            output.finish(tagalong=[(o.directory, [n for n in HF_TAGALONG_FILES if n != CONFIG]
                                     + ["mergewise_recipe.yaml"])],
                          config=unified.config,
                          card=task_card(task, o.directory, lam, base_ckpt.label))
    return target


__all__ = ["TaskModels", "load_task", "materialize", "task_state_dict"]
