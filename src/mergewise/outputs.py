"""One output directory, written in one order by one writer (merges and ``materialize``).

``OutputDirectory`` owns the sequence: atomic temp directory next to the target -> streamed
safetensors shards (+ index) -> files written during the run (EMR's modulators) -> tag-along
files (config, tokenizer, generation config) -> ``config.json`` with the written dtype -> model
card -> report tables; then one rename (or atomic exchange) makes it the target
(``target.py``: the checks, the lock, the swap). Any error, Ctrl-C or SIGTERM before that
leaves nothing behind; an existing target is replaced only with ``overwrite``; an input is
never the target.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch

from .errors import OutputError
from .modulators import FILE_NAME as MODULATORS_FILE
from .registry import MergeMethod
from .report import write_tables
from .target import atomic_directory
from .tensors import TensorInfo, dtype_name
from .version import __version__
from .writer import BackgroundWriter, ShardedWriter, copy_tagalong

if TYPE_CHECKING:
    from .recipe import Recipe

# Files of a Hugging Face model directory that an output takes from its inputs.
HF_TAGALONG_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "preprocessor_config.json",
)
TOKENIZER_FILES = tuple(n for n in HF_TAGALONG_FILES if "token" in n)
CONFIG = "config.json"
CARD = "README.md"
# (directory to copy from or None, file names): tag-along files, in copy order
Tagalong = tuple[Path | None, Sequence[str]]


def config_with_dtype(config: dict[str, Any], tensors: Sequence[TensorInfo]) -> dict[str, Any]:
    """``config`` with ``torch_dtype`` (and ``dtype``, when present) naming the dtype of the
    written floating-point tensors, when they all share one."""
    float_out = {t.dtype for t in tensors if t.is_float}
    if len(float_out) == 1:
        name = dtype_name(next(iter(float_out)))
        config["torch_dtype"] = name
        if "dtype" in config:
            config["dtype"] = name
    return config


class OutputDirectory(AbstractContextManager["OutputDirectory"]):
    """``with OutputDirectory(target, ...) as out``: ``out.write`` takes the tensors in plan
    order, ``out.path(name)`` is where a file produced during the run goes, ``out.finish``
    writes the rest; leaving the block without an error commits the directory."""

    def __init__(self, target: Path, tensors: Sequence[TensorInfo], *, shard_size: int,
                 metadata: dict[str, str], overwrite: bool = False,
                 inputs: Sequence[tuple[str, Path]] = ()):
        self.target = target
        self.tensors = list(tensors)
        self._atomic = atomic_directory(target, overwrite, inputs)
        self._shard_size = shard_size
        self._metadata = metadata
        self.files: list[str] = []
        self.tensor_bytes = 0

    def __enter__(self) -> OutputDirectory:
        self.tmp = self._atomic.__enter__()
        self._shards = ShardedWriter(self.tmp, self.tensors, self._shard_size, self._metadata)
        self._writes: BackgroundWriter | None = BackgroundWriter(self._shards.write)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool | None:
        if self._writes is not None:  # stop writing before the temp dir is removed
            self._writes.close(abort=True)
        done = self._atomic.__exit__(kind, exc, tb)
        if isinstance(exc, OSError):  # disk full, quota, I/O error: one line, nothing left
            what = "no space left on the device" if exc.errno == errno.ENOSPC else (
                exc.strerror or str(exc))
            raise OutputError(f"{self.target}: {what} while writing the output; nothing was "
                              "written (the temp directory is removed)") from None
        return done

    def write(self, name: str, tensor: torch.Tensor) -> None:
        assert self._writes is not None, "write after end_shards"
        self._writes.write(name, tensor)

    def end_shards(self) -> list[str]:
        """Finish the writes, close the last shard and write the index; returns the output's
        file names."""
        assert self._writes is not None
        writes, self._writes = self._writes, None
        writes.close()
        self.files[:0] = self._shards.finalize()
        self.tensor_bytes = self._shards.total_size
        return self.files

    def path(self, name: str) -> Path:
        """Where an extra file of the output (written by the caller) goes; it is listed."""
        self.files.append(name)
        return self.tmp / name

    def finish(self, *, tagalong: Sequence[Tagalong] = (), config: dict[str, Any] | None = None,
               texts: dict[str, str] | None = None, card: str | None = None,
               report: tuple[dict[str, Any], list[dict[str, Any]]] | None = None) -> None:
        """Everything after the tensors, in order: tag-along files, ``config.json`` with the
        written dtype, extra text files (the recipe copy), the model card, the report."""
        for directory, names in tagalong:
            copy_tagalong(directory, self.tmp, names)
        if config is not None:
            config = config_with_dtype(config, self.tensors)
            (self.tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        for name, text in (texts or {}).items():
            (self.tmp / name).write_text(text)
        if card is not None:
            (self.tmp / CARD).write_text(card)
        if report is not None:
            write_tables(self.tmp, *report)


def merge_card(recipe: Recipe, method: MergeMethod, tasks: Sequence[str]) -> str:
    """The model card (README.md) of a merge: inputs, the recipe, the method's semantics."""
    base = recipe.base_model or "(none)"
    models = "\n".join(f"- `{m.model}` (task: {m.task_name})" for m in recipe.models)
    note = ""
    if method.task_specific:
        note = (f"These weights are the unified model of a task-specific merge; each task's model "
                f"({', '.join(tasks)}) is assembled from them, the base and `{MODULATORS_FILE}`:\n"
                f"`mergewise materialize DIR --task NAME --out TASK_DIR`.\n\n")
    return f"""---
library_name: transformers
tags:
- mergewise
- merge
base_model: {base}
---
# {recipe.name or "Merged model"}

This model was merged with [mergewise](https://pypi.org/project/mergewise/) {__version__}
using the **{recipe.merge_method}** method.

## Inputs
Base model: `{base}`

{models}

## Recipe
```yaml
{recipe.to_yaml().rstrip()}
```

{note}Method semantics:
{(method.doc or "").strip()}
"""


def task_card(task: str, merged: Path, rescaler: float, base_label: str) -> str:
    """The model card of one task's model materialized from an EMR merge."""
    return (f"# {task}\n\nTask model materialized by mergewise {__version__} from the "
            f"EMR merge `{merged}`: theta0 + lambda * (mask * (unified - theta0)), "
            f"lambda = {rescaler!r}, base `{base_label}`.\n")
