"""The stats file of one expert, and what a merge reads from it (LOT, RegMean).

Per-layer float64 accumulators of an expert's layer inputs on its own calibration data (computed
by ``capture``), keyed by module name (``encoder.layer.0.attention.self.query``):

| layer                     | accumulators (float64)                  | serve                      |
|---------------------------|-----------------------------------------|----------------------------|
| ``nn.Linear``             | G = Σ xᵀx over all rows (tokens), rows n | weight (matmul), bias     |
| ``nn.Conv2d`` (groups 1)  | G of the unfolded patches, rows n       | weight (out, C·kh·kw), bias |
| transformers ``Conv1D``   | G, weight stored (in, out)              | weight (matmul), bias      |
| LayerNorm, RMSNorm        | s = Σ x̂² per dim of the normalized input | weight (scale), bias (shift) |

- Stats file: one safetensors file per expert, tensors ``gram:<module>``, ``energy:<module>`` and
  ``rows:<module>`` (float64), metadata ``mergewise_features`` (format version), ``layers`` (JSON:
  module -> kind/layout), ``calibration`` (JSON settings), ``model``, ``examples``, ``rows``,
  ``probe_tensors`` and ``probe`` (a hash of those few small parameter tensors, checked against
  the expert at merge time). A merge reads it lazily, one layer's accumulators at a time.
- Format 2 (format 1 files are still read): layers that read the very same input tensor (q/k/v,
  gate/up of Hugging Face attention and MLPs) share one Gram, stored once under the first
  layer's key; metadata ``shared_grams`` (JSON: layer -> that layer) says which. Grams may be
  float32 (``accumulate: float32``, metadata ``accumulate``); solves promote them to float64.
- ``FeatureStats`` holds the accumulators in memory (fresh from a capture) or reads them from the
  file; ``for_tensor`` maps a parameter of the expert's state dict to its ``TensorFeature``.

Nothing here runs a model or reads calibration data: merge-time code imports this module only.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Checkpoint, SafetensorsFile
from ..errors import CheckpointError, FeatureError
from ..writer import atomic_file

FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")  # format 1: one Gram entry per layer, float64 only
GRAM_DTYPES = ("float64", "float32")  # float32 with ``accumulate: float32`` (format 2)
SHARED_READS = 2  # shared Grams a file-backed FeatureStats keeps after reading: q/k/v's and gate/up's
RECOMPUTE = "recompute it with `mergewise features --overwrite`"
KINDS = {"linear": ("out_in", "in_out"), "norm": ("out_in",)}  # kind -> layouts


# --- what one tensor gets from one expert's statistics -----------------------------------

@dataclass(frozen=True)
class TensorFeature:
    """The statistics one expert offers for one parameter tensor.

    ``kind``: ``matmul`` (linear/conv weight: ``gram`` (in, in) and ``in_out`` when the tensor is
    stored (in, out)), ``scale`` (norm weight: ``energy``), ``shift`` (bias or norm shift: only
    ``rows``). Parameters without statistics get ``None`` instead of a TensorFeature.
    """

    kind: str
    rows: float
    gram: torch.Tensor | None = None
    energy: torch.Tensor | None = None
    in_out: bool = False
    # set when the Gram is stored once for several layers that read the same input (q/k/v,
    # gate/up): its key, and every such layer gets the very same tensor object, so a solver may
    # reuse a factorisation of it (``methods.lot.SharedSolves``)
    shared_gram: str | None = None


# --- the statistics of one expert ----------------------------------------------------------

@dataclass
class LayerInfo:
    kind: str  # "linear" (gram) or "norm" (energy)
    layout: str = "out_in"  # linear: weight stored (out, in...) or "in_out" (transformers Conv1D)


class FeatureStats:
    """Per-layer accumulators of one expert, in memory or lazily in a safetensors stats file.

    Keyed by module name (``encoder.layer.0.attention.self.query``); ``for_tensor`` maps a
    parameter name of the expert's state dict to its statistics.
    """

    def __init__(self, layers: Mapping[str, LayerInfo], tensors: Mapping[str, torch.Tensor] | None
                 = None, *, source: SafetensorsFile | None = None,
                 metadata: Mapping[str, Any] | None = None, label: str = "features",
                 shared: Mapping[str, str] | None = None):
        """``shared``: {layer: layer whose Gram it reads} for the layers that read the very same
        input as another (their Gram is stored once, under the other's key)."""
        self.layers = dict(layers)
        self._tensors = dict(tensors or {})
        self._source = source
        self.shared = dict(shared or {})
        self._owners = set(self.shared.values())  # layers whose Gram others read too
        self._recent: OrderedDict[str, torch.Tensor] = OrderedDict()
        # a stats file's metadata is str -> str; in memory a value may be any JSON value, which
        # save() writes as JSON: hence Any, not str
        self.metadata = dict(metadata or {})
        self.label = label
        self._resolved: dict[str, str | None] = {}

    # accumulators, read one at a time from the file when file-backed
    def tensor(self, key: str) -> torch.Tensor:
        key = self.stored_key(key)
        if key in self._tensors:
            return self._tensors[key]
        if key in self._recent:
            self._recent.move_to_end(key)
            return self._recent[key]
        if self._source is None or key not in self._source.names():
            raise FeatureError(f"{self.label}: no statistics '{key}'; the stats file is "
                               "incomplete, recompute it with `mergewise features`")
        value = _checked_values(self._source.read(key), key, self.label)
        if key.startswith("gram:") and key[5:] in self._owners:
            # q, k and v read one Gram: one read, and one object (a solver keys on it)
            self._recent[key] = value
            while len(self._recent) > SHARED_READS:
                self._recent.popitem(last=False)
        return value

    def stored_key(self, key: str) -> str:
        """The entry a key is stored under: ``gram:k_proj`` -> ``gram:q_proj`` when k_proj reads
        q_proj's input (a shared Gram); any other key is itself."""
        if key.startswith("gram:") and key[5:] in self.shared:
            return f"gram:{self.shared[key[5:]]}"
        return key

    def shared_key(self, module: str) -> str | None:
        """The stored Gram key of a layer whose Gram other layers read too, else None."""
        owner = self.shared.get(module, module)
        return f"gram:{owner}" if owner in self._owners else None

    def rows(self, module: str) -> float:
        return float(self.tensor(f"rows:{module}"))

    def gram(self, module: str) -> torch.Tensor:
        return self.tensor(f"gram:{module}")

    def energy(self, module: str) -> torch.Tensor:
        return self.tensor(f"energy:{module}")

    @property
    def total_rows(self) -> int:
        return int(self.metadata.get("rows", 0))

    def close(self) -> None:
        if self._source is not None:
            self._source.close()

    # parameter name -> layer
    def module_for(self, tensor_name: str) -> str | None:
        """The layer a parameter belongs to: ``a.b.weight`` -> ``a.b``; when the expert's names
        carry another prefix than the capturing module's (``bert.`` or none), the unique layer
        whose name is a dotted suffix of the other is used."""
        if tensor_name in self._resolved:
            return self._resolved[tensor_name]
        module = tensor_name.rpartition(".")[0]
        found: str | None = module if module in self.layers else None
        if found is None and module:
            cands = [m for m in self.layers
                     if module.endswith("." + m) or m.endswith("." + module)]
            found = cands[0] if len(cands) == 1 else None
        self._resolved[tensor_name] = found
        return found

    def shape(self, key: str) -> tuple[int, ...]:
        key = self.stored_key(key)
        if key in self._tensors:
            return tuple(self._tensors[key].shape)
        if self._source is None or key not in self._source.names():
            self.tensor(key)  # the one-line "no statistics" error
        return self._source.info(key).shape  # type: ignore[union-attr]

    def kind_of(self, name: str, shape: Sequence[int]) -> tuple[str, str] | None:
        """(unit kind, layer) of a parameter, checked against the statistics' shapes (headers
        only, nothing is read), or None when the parameter has no statistics."""
        module = self.module_for(name)
        leaf = name.rpartition(".")[2]
        if module is None or leaf not in ("weight", "bias"):
            return None
        if leaf == "bias":
            return ("shift", module) if len(shape) == 1 else None
        info = self.layers[module]
        if info.kind == "norm":
            have = self.shape(f"energy:{module}")
            if have != tuple(shape):
                raise FeatureError(f"{self.label}: layer '{module}' has norm statistics of shape "
                                   f"{list(have)} but tensor '{name}' has {list(shape)}; the "
                                   "stats file belongs to another model")
            return "scale", module
        width = self.shape(f"gram:{module}")[0]
        fan_in = shape[0] if info.layout == "in_out" else math.prod(shape[1:])
        if len(shape) < 2 or width != fan_in:
            raise FeatureError(f"{self.label}: layer '{module}' has a {width}-wide Gram but "
                               f"tensor '{name}' has shape {list(shape)}; the stats file "
                               "belongs to another model")
        return "matmul", module

    def for_tensor(self, name: str, shape: Sequence[int]) -> TensorFeature | None:
        """The statistics of one parameter (its layer's accumulators are read now)."""
        found = self.kind_of(name, shape)
        if found is None:
            return None
        kind, module = found
        rows = self.rows(module)
        if kind == "scale":
            return TensorFeature(kind, rows, energy=self.energy(module))
        if kind == "matmul":
            return TensorFeature(kind, rows, gram=self.gram(module),
                                 in_out=self.layers[module].layout == "in_out",
                                 shared_gram=self.shared_key(module))
        return TensorFeature(kind, rows)

    # identity of the expert the statistics came from
    def check_model(self, ckpt: Checkpoint) -> None:
        """Refuse statistics captured from another model than ``ckpt`` (probe hash mismatch)."""
        names = json.loads(self.metadata.get("probe_tensors", "[]"))
        if not names:
            return
        available = set(ckpt.names())
        mapped = []
        for n in names:
            hit = n if n in available else next(
                (a for a in available if a.endswith("." + n) or n.endswith("." + a)), None)
            if hit is None:
                raise FeatureError(f"{self.label}: the statistics were captured from a model "
                                   f"with tensor '{n}', which {ckpt.label} lacks; recompute them")
            mapped.append(ckpt.read(hit))
        if probe_hash(mapped) != self.metadata.get("probe"):
            raise FeatureError(f"{self.label}: the statistics were captured from another model "
                               f"than {ckpt.label} (model '{self.metadata.get('model', '?')}', "
                               "parameters differ); recompute them with `mergewise features`")

    # persistence
    def save(self, path: str | Path) -> Path:
        """Write the stats file atomically (temp file in the same directory, then rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {k: self.tensor(k).contiguous() for k in self.keys()}
        meta = file_metadata(self.metadata, self.layers, self.shared)
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    def keys(self) -> list[str]:
        """The stored entries: a shared Gram once, under its first layer's key."""
        out = []
        for m, info in self.layers.items():
            out.append(f"rows:{m}")
            if info.kind == "norm":
                out.append(f"energy:{m}")
            elif m not in self.shared:
                out.append(f"gram:{m}")
        return out


def file_metadata(metadata: Mapping[str, Any], layers: Mapping[str, LayerInfo],
                  shared: Mapping[str, str]) -> dict[str, str]:
    """A stats file's header metadata: ``metadata`` as strings (JSON for other values), the
    format version, the layers and the shared-Gram map."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    meta["mergewise_features"] = FORMAT_VERSION
    meta["layers"] = json.dumps({m: {"kind": i.kind, "layout": i.layout}
                                 for m, i in layers.items()})
    meta["shared_grams"] = json.dumps(dict(shared), sort_keys=True)
    return meta


def open_stats_source(p: Path) -> SafetensorsFile:
    """A stats file's safetensors header (Gram or Fisher), or one line naming the file."""
    try:
        return SafetensorsFile(p)
    except CheckpointError as exc:
        raise FeatureError(f"stats file {exc}") from None


def load_stats(path: str | Path) -> FeatureStats:
    """Open a stats file lazily: only its header is read now, and checked whole (metadata,
    every layer's entries, shapes and dtypes), so a garbled file fails here in one line."""
    p = Path(path)
    source = open_stats_source(p)
    try:
        meta = _checked_metadata(source.metadata, p)
        layers = _layers(meta, p)
        shared = _shared(meta, layers, p)
        for module, info in layers.items():
            _check_entries(source, module, info, p, shared.get(module, module),
                           _gram_dtype(meta, p))
    except BaseException:
        source.close()
        raise
    return FeatureStats(layers, source=source, metadata=meta, label=str(p), shared=shared)


def _checked_metadata(meta: object, p: Path) -> dict[str, str]:
    """The header metadata, refused unless every value a merge reads parses."""
    if not isinstance(meta, Mapping) or not all(isinstance(v, str) for v in meta.values()):
        raise FeatureError(f"{p}: header metadata is not a map of strings; the stats file is "
                           f"corrupt: {RECOMPUTE}")
    if meta.get("mergewise_features") not in READABLE_VERSIONS:
        raise FeatureError(f"{p}: not a mergewise stats file of format "
                           f"{' or '.join(READABLE_VERSIONS)} (found "
                           f"{meta.get('mergewise_features')!r}); recompute it with "
                           "`mergewise features`")
    for key, kind in (("probe_tensors", list), ("calibration", dict)):
        if key in meta and not isinstance(_json_value(meta, key, p), kind):
            raise FeatureError(f"{p}: metadata '{key}' is not a JSON {kind.__name__}; the stats "
                               f"file is corrupt: {RECOMPUTE}")
    probe = _json_value(meta, "probe_tensors", p) if "probe_tensors" in meta else []
    if not all(isinstance(n, str) for n in probe) or (probe and "probe" not in meta):
        raise FeatureError(f"{p}: metadata 'probe_tensors' is not a list of tensor names, or "
                           f"'probe' is missing; the stats file is corrupt: {RECOMPUTE}")
    for key in ("examples", "rows"):
        if key in meta and not meta[key].isdigit():
            raise FeatureError(f"{p}: metadata '{key}' = {meta[key]!r} is not a count; the stats "
                               f"file is corrupt: {RECOMPUTE}")
    return dict(meta)


def _json_value(meta: Mapping[str, str], key: str, p: Path) -> Any:
    try:
        return json.loads(meta[key])
    except (KeyError, ValueError):
        raise FeatureError(f"{p}: metadata '{key}' is missing or not JSON; the stats file is "
                           f"corrupt or truncated: {RECOMPUTE}") from None


def _layers(meta: Mapping[str, str], p: Path) -> dict[str, LayerInfo]:
    raw = _json_value(meta, "layers", p)
    if not isinstance(raw, dict):
        raise FeatureError(f"{p}: metadata 'layers' is not a JSON object; {RECOMPUTE}")
    layers = {}
    for module, d in raw.items():
        kind = d.get("kind") if isinstance(d, dict) else None
        layout = d.get("layout", "out_in") if isinstance(d, dict) else None
        if kind not in KINDS or layout not in KINDS[kind]:
            raise FeatureError(f"{p}: layer '{module}' is {json.dumps(d)}, expected kind "
                               "'linear' (layout 'out_in' or 'in_out') or 'norm'; the stats file "
                               f"is corrupt: {RECOMPUTE}")
        layers[module] = LayerInfo(kind, layout)
    if not layers:
        raise FeatureError(f"{p}: holds the statistics of no layer (captured from zero "
                           f"calibration examples?); {RECOMPUTE}")
    return layers


def _shared(meta: Mapping[str, str], layers: Mapping[str, LayerInfo], p: Path) -> dict[str, str]:
    """{layer: layer whose Gram it reads} (format 2; format 1 shares nothing), every name a
    linear layer that is not itself shared."""
    if "shared_grams" not in meta:
        return {}
    raw = _json_value(meta, "shared_grams", p)
    linear = {m for m, i in layers.items() if i.kind == "linear"}
    bad = ([f"{k!r}: {v!r}" for k, v in raw.items()
            if k not in linear or v not in linear or v in raw or k == v]
           if isinstance(raw, dict) else [repr(raw)])
    if bad:
        raise FeatureError(f"{p}: metadata 'shared_grams' maps {bad[0]}, not one linear layer to "
                           f"another that owns its Gram; the stats file is corrupt: {RECOMPUTE}")
    return dict(raw)


def _gram_dtype(meta: Mapping[str, str], p: Path) -> torch.dtype:
    """The dtype the file's Grams were accumulated in (metadata ``accumulate``, format 2)."""
    name = meta.get("accumulate", "float64")
    dtype = getattr(torch, name) if name in GRAM_DTYPES else None
    if dtype is None or (dtype != torch.float64 and meta["mergewise_features"] == "1"):
        raise FeatureError(f"{p}: metadata 'accumulate' = {name!r} is not float64 or float32 "
                           f"(float32 from format 2 on); the stats file is corrupt: {RECOMPUTE}")
    return dtype


def _check_entries(source: SafetensorsFile, module: str, info: LayerInfo, p: Path,
                   owner: str, gram_dtype: torch.dtype) -> None:
    """A layer's accumulators exist as float64 of the right rank (header only, nothing read):
    ``rows`` a scalar, a Gram square (its ``owner``'s when shared; in the file's ``accumulate``
    dtype), an energy at least 1-D."""
    key = f"gram:{owner}" if info.kind == "linear" else f"energy:{module}"
    names = set(source.names())
    for name in (f"rows:{module}", key):
        if name not in names:
            raise FeatureError(f"{p}: layer '{module}' has no '{name}' tensor; the stats file is "
                               f"incomplete or truncated: {RECOMPUTE}")
        shape, dtype = source.info(name).shape, source.info(name).dtype
        ok = (shape == () if name.startswith("rows:") else
              len(shape) == 2 and shape[0] == shape[1] > 0 if info.kind == "linear" else
              len(shape) >= 1 and math.prod(shape) > 0)
        allowed = gram_dtype if name.startswith("gram:") else torch.float64
        if dtype != allowed or not ok:
            kind = str(allowed).removeprefix("torch.")
            want = ("a float64 scalar" if name.startswith("rows:") else
                    f"{kind} (n, n), n > 0" if info.kind == "linear" else "float64, 1-D or more")
            raise FeatureError(f"{p}: tensor '{name}' is {str(dtype).removeprefix('torch.')} "
                               f"{list(shape)}, expected {want}; the stats file is corrupt: "
                               f"{RECOMPUTE}")


def _checked_values(t: torch.Tensor, key: str, label: str) -> torch.Tensor:
    """An accumulator read from a file: finite, and >= 0 where it is a sum of squares (rows,
    energies, a Gram's diagonal); anything else would silently skew the merge."""
    if not bool(torch.isfinite(t).all()):
        raise FeatureError(f"{label}: tensor '{key}' has NaN/Inf values; the stats file is "
                           f"corrupt: {RECOMPUTE}")
    values = t.diagonal() if key.startswith("gram:") else t
    if bool((values < 0).any()):
        what = "diagonal entries" if key.startswith("gram:") else "values"
        raise FeatureError(f"{label}: tensor '{key}' has negative {what} (a sum of squares "
                           f"cannot be); the stats file is corrupt: {RECOMPUTE}")
    return t


def probe_hash(tensors: Sequence[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t64 = t.detach().to("cpu", torch.float64).contiguous()
        h.update(str(list(t64.shape)).encode())
        h.update(t64.numpy().tobytes())
    return h.hexdigest()[:32]
