"""The Fisher stats file of one expert, and what a Fisher merge reads from it.

The diagonal Fisher information of every parameter that received a gradient (computed by
``features.fisher``), keyed by the capturing module's parameter name:

- Stats file: one safetensors file per expert, tensors ``fisher:<parameter>`` (float32, the
  parameter's shape; accumulated in float64, stored in float32: it only weighs an average, and
  float32's 24-bit mantissa is far finer than the sampling noise of a 64-example estimate),
  metadata ``mergewise_fisher`` (format version), ``fisher_norm`` (the L2 norm over every stored
  entry, for ``normalize``), ``aliases`` (JSON: tied parameter name -> stored name),
  ``labels`` (the label mode used), ``calibration`` (JSON settings), ``model``, ``examples``,
  ``rows`` (predictions: examples, or real tokens of a per-token head), ``probe_tensors`` and
  ``probe`` (as the Gram stats files: the expert is checked at merge time).
- A file of another kind (a Gram file of LOT/RegMean) is refused in one line, either way round:
  the Gram reader wants ``mergewise_features``, which this file does not carry.
- ``FisherStats`` is a ``FeatureStats`` (the engine attaches, checks and closes it the same
  way); ``for_tensor`` maps a parameter of the expert's state dict to a ``FisherFeature``.

Nothing here runs a model: merge-time code imports this module only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import SafetensorsFile
from ..errors import FeatureError
from ..writer import atomic_file
from .statsfile import FeatureStats, TensorFeature, open_stats_source

FISHER_FORMAT = "1"
PREFIX = "fisher:"
RECOMPUTE = "recompute it with `mergewise features --overwrite`"


@dataclass(frozen=True)
class FisherFeature(TensorFeature):
    """One expert's diagonal Fisher for one parameter (``kind`` is ``fisher``), and the L2 norm
    of its whole Fisher (every stored parameter), which ``normalize`` divides by."""

    fisher: torch.Tensor | None = None
    norm: float = 0.0


class FisherStats(FeatureStats):
    """The diagonal Fisher of one expert, in memory or lazily in a Fisher stats file.

    ``shapes``: stored parameter name -> shape; ``aliases``: a tied parameter's other names ->
    the stored one (a tied embedding and head share one Fisher, and merge alike)."""

    def __init__(self, shapes: Mapping[str, Sequence[int]],
                 tensors: Mapping[str, torch.Tensor] | None = None, *,
                 aliases: Mapping[str, str] | None = None, source: SafetensorsFile | None = None,
                 metadata: Mapping[str, Any] | None = None, label: str = "fisher"):
        super().__init__({}, tensors, source=source, metadata=metadata, label=label)
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        self.aliases = dict(aliases or {})

    def tensor(self, key: str) -> torch.Tensor:
        if key in self._tensors:
            return self._tensors[key]
        if self._source is None or key not in self._source.names():
            raise FeatureError(f"{self.label}: no Fisher '{key}'; the stats file is incomplete: "
                               f"{RECOMPUTE}")
        t = self._source.read(key)
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise FeatureError(f"{self.label}: tensor '{key}' has NaN/Inf or negative values (a "
                               f"mean of squares cannot); the stats file is corrupt: {RECOMPUTE}")
        return t

    @property
    def norm(self) -> float:
        return float(self.metadata.get("fisher_norm", 0.0))

    def parameter_for(self, tensor_name: str) -> str | None:
        """The stored parameter of a checkpoint tensor: its own name, a tied alias, or the
        unique stored name that is a dotted suffix of it or it of (``bert.`` prefixes)."""
        if tensor_name in self._resolved:
            return self._resolved[tensor_name]
        names = {**{n: n for n in self.shapes}, **self.aliases}
        found = names.get(tensor_name)
        if found is None:
            cands = {names[n] for n in names
                     if tensor_name.endswith("." + n) or n.endswith("." + tensor_name)}
            found = next(iter(cands)) if len(cands) == 1 else None
        self._resolved[tensor_name] = found
        return found

    def kind_of(self, name: str, shape: Sequence[int]) -> tuple[str, str] | None:
        """("fisher", stored name) of a tensor, checked against the stored shape (headers only),
        or None when the tensor has no Fisher (it got no gradient, or is a buffer)."""
        param = self.parameter_for(name)
        if param is None:
            return None
        if self.shapes[param] != tuple(shape):
            raise FeatureError(f"{self.label}: the Fisher of '{param}' has shape "
                               f"{list(self.shapes[param])} but tensor '{name}' has "
                               f"{list(shape)}; the stats file belongs to another model")
        return "fisher", param

    def for_tensor(self, name: str, shape: Sequence[int]) -> TensorFeature | None:
        found = self.kind_of(name, shape)
        if found is None:
            return None
        return FisherFeature("fisher", float(self.metadata.get("examples", 0)),
                             fisher=self.tensor(PREFIX + found[1]), norm=self.norm)

    def keys(self) -> list[str]:
        return sorted(PREFIX + n for n in self.shapes)

    def save(self, path: str | Path) -> Path:
        """Write the Fisher stats file atomically (temp file in the same directory, renamed)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {k: self.tensor(k).to(torch.float32).contiguous() for k in self.keys()}
        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.metadata.items()}
        meta["mergewise_fisher"] = FISHER_FORMAT
        meta["aliases"] = json.dumps(self.aliases, sort_keys=True)
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path


def load_fisher(path: str | Path) -> FisherStats:
    """Open a Fisher stats file lazily: its header is read now and checked whole (metadata,
    every entry's dtype and shape), so a garbled file fails here in one line."""
    p = Path(path)
    source = open_stats_source(p)
    try:
        meta = _checked_metadata(source.metadata, p)
        shapes = {}
        for name in source.names():
            info = source.info(name)
            if not name.startswith(PREFIX) or info.dtype != torch.float32 \
                    or math.prod(info.shape) == 0:
                raise FeatureError(f"{p}: tensor '{name}' is {str(info.dtype).removeprefix('torch.')} "
                                   f"{list(info.shape)}, expected a non-empty float32 "
                                   f"'fisher:<parameter>'; the stats file is corrupt: {RECOMPUTE}")
            shapes[name[len(PREFIX):]] = info.shape
        if not shapes:
            raise FeatureError(f"{p}: holds the Fisher of no parameter; {RECOMPUTE}")
        aliases = json.loads(meta["aliases"])
        if not isinstance(aliases, dict) or not all(
                isinstance(a, str) and v in shapes for a, v in aliases.items()):
            raise FeatureError(f"{p}: metadata 'aliases' does not map names to stored "
                               f"parameters; the stats file is corrupt: {RECOMPUTE}")
    except BaseException:
        source.close()
        raise
    return FisherStats(shapes, aliases=aliases, source=source, metadata=meta, label=str(p))


def _checked_metadata(meta: object, p: Path) -> dict[str, str]:
    """The header metadata, refused unless every value a merge reads parses."""
    if not isinstance(meta, Mapping) or not all(isinstance(v, str) for v in meta.values()):
        raise FeatureError(f"{p}: header metadata is not a map of strings; {RECOMPUTE}")
    if meta.get("mergewise_fisher") != FISHER_FORMAT:
        what = ("a Gram stats file (LOT, RegMean), not a Fisher one"
                if "mergewise_features" in meta else
                f"not a mergewise Fisher stats file of format {FISHER_FORMAT}")
        raise FeatureError(f"{p}: is {what}; compute the Fisher with `mergewise features` and "
                           "merge_method: fisher")
    problems = []
    for key, kind in (("aliases", dict), ("probe_tensors", list), ("calibration", dict)):
        try:
            ok = isinstance(json.loads(meta.get(key, "")), kind)
        except ValueError:
            ok = False
        if not ok:
            problems.append(f"'{key}' is not a JSON {kind.__name__}")
    try:
        norm = float(meta.get("fisher_norm", ""))
    except ValueError:
        norm = math.nan
    if not (math.isfinite(norm) and norm >= 0):
        problems.append("'fisher_norm' is not a finite number >= 0")
    problems += [f"'{k}' is not a count" for k in ("examples", "rows")
                 if not meta.get(k, "").isdigit()]
    if "probe" not in meta:
        problems.append("'probe' is missing")
    if problems:
        raise FeatureError(f"{p}: metadata {problems[0]}; the stats file is corrupt: {RECOMPUTE}")
    return dict(meta)
