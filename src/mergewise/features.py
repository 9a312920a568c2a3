"""Feature capture for data-aware merging (LOT, RegMean): layer inputs -> float64 accumulators.

Each expert runs as a torch module on its own task's calibration data; forward pre-hooks turn the
inputs of every layer into small statistics and drop the features at once:

| layer                     | accumulators (float64)                  | serve                      |
|---------------------------|-----------------------------------------|----------------------------|
| ``nn.Linear``             | G = Σ xᵀx over all rows (tokens), rows n | weight (matmul), bias     |
| ``nn.Conv2d`` (groups 1)  | G of the unfolded patches, rows n       | weight (out, C·kh·kw), bias |
| transformers ``Conv1D``   | G, weight stored (in, out)              | weight (matmul), bias      |
| LayerNorm, RMSNorm        | s = Σ x̂² per dim of the normalized input | weight (scale), bias (shift) |

- Rows: a dict batch with an ``attention_mask`` of shape (batch, seq) masks the padded tokens out
  of every layer input whose leading dimensions are (batch, seq); inputs of any other shape (a
  pooler or classifier on the first token, (batch, hidden)) count all their rows.
- x̂ is the input of the scale op: (x − mean)/sqrt(var + eps) for LayerNorm, x/sqrt(mean(x²) + eps)
  for RMSNorm (``eps`` or ``variance_epsilon`` of the module). Other norms (BatchNorm, GroupNorm),
  embeddings, grouped or padding="same" convolutions get no statistics: the merge method's
  fallback rule applies.
- A layer that never ran (zero rows) is not stored, so its parameters also follow the fallback.
  ``nn.MultiheadAttention`` (open_clip) calls its projections functionally, so its
  ``in_proj_weight`` and ``out_proj`` get no statistics; Hugging Face attention uses plain Linears.
- Stats file: one safetensors file per expert, tensors ``gram:<module>``, ``energy:<module>`` and
  ``rows:<module>`` (float64), metadata ``mergewise_features`` (format version), ``layers`` (JSON:
  module -> kind/layout), ``calibration`` (JSON settings), ``model``, ``rows`` and ``probe`` (a
  hash of a few small parameter tensors, checked against the expert at merge time). A merge reads
  it lazily, one layer's accumulators at a time.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import Checkpoint, SafetensorsFile, open_checkpoint
from .errors import CheckpointError, FeatureError, first_line
from .writer import atomic_file

FORMAT_VERSION = "1"
PROBE_TENSORS = 4
Batch = Mapping[str, torch.Tensor] | torch.Tensor


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
                 metadata: Mapping[str, Any] | None = None, label: str = "features"):
        self.layers = dict(layers)
        self._tensors = dict(tensors or {})
        self._source = source
        self.metadata = dict(metadata or {})
        self.label = label
        self._resolved: dict[str, str | None] = {}

    # accumulators, read one at a time from the file when file-backed
    def tensor(self, key: str) -> torch.Tensor:
        if key in self._tensors:
            return self._tensors[key]
        if self._source is None or key not in self._source.names():
            raise FeatureError(f"{self.label}: no statistics '{key}'; the stats file is "
                               "incomplete, recompute it with `mergewise features`")
        return self._source.read(key)

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
        if key in self._tensors:
            return tuple(self._tensors[key].shape)
        return self._source.info(key).shape if self._source is not None else ()

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
                                 in_out=self.layers[module].layout == "in_out")
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
        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.metadata.items()}
        meta["mergewise_features"] = FORMAT_VERSION
        meta["layers"] = json.dumps({m: {"kind": i.kind, "layout": i.layout}
                                     for m, i in self.layers.items()})
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    def keys(self) -> list[str]:
        out = []
        for m, info in self.layers.items():
            out += [f"rows:{m}", f"gram:{m}" if info.kind == "linear" else f"energy:{m}"]
        return out


def load_stats(path: str | Path) -> FeatureStats:
    """Open a stats file lazily (only its header is read now)."""
    p = Path(path)
    try:
        source = SafetensorsFile(p)
    except CheckpointError as exc:
        raise FeatureError(f"stats file {exc}") from None
    meta = source.metadata
    if meta.get("mergewise_features") != FORMAT_VERSION:
        source.close()
        raise FeatureError(f"{p}: not a mergewise stats file of format {FORMAT_VERSION} "
                           f"(found {meta.get('mergewise_features')!r}); recompute it with "
                           "`mergewise features`")
    layers = {m: LayerInfo(d["kind"], d.get("layout", "out_in"))
              for m, d in json.loads(meta["layers"]).items()}
    return FeatureStats(layers, source=source, metadata=meta, label=str(p))


def probe_hash(tensors: Sequence[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t64 = t.detach().to("cpu", torch.float64).contiguous()
        h.update(str(list(t64.shape)).encode())
        h.update(t64.numpy().tobytes())
    return h.hexdigest()[:32]


# --- capture -------------------------------------------------------------------------------

def _is_rmsnorm(m: nn.Module) -> bool:
    return (isinstance(m, getattr(nn, "RMSNorm", ())) or type(m).__name__.endswith("RMSNorm")) \
        and isinstance(getattr(m, "weight", None), torch.Tensor)


def _layer_kind(m: nn.Module) -> LayerInfo | None:
    if isinstance(m, nn.Linear):
        return LayerInfo("linear")
    if isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros" \
            and not isinstance(m.padding, str):  # padding="same" has no unfold equivalent
        return LayerInfo("linear")
    if type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None \
            and m.weight.dim() == 2:
        return LayerInfo("linear", "in_out")  # transformers GPT-2 Conv1D: x @ W, W is (in, out)
    if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
        return LayerInfo("norm")
    if _is_rmsnorm(m):
        return LayerInfo("norm")
    return None


class _Accumulator:
    """The hooks' shared state: the current batch's token mask and the float64 sums."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        # the last Linear input and its Gram: Q, K and V receive the very same tensor object,
        # so its Gram is computed once (the reference keeps the object, and its id, alive)
        self.last: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def gram_of(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self.last is not None and self.last[0] is x:
            return self.last[1], self.last[2]
        xs = self.rows_of(x, 1).to(torch.float64)
        self.last = (x, xs.T @ xs, xs.shape[0])
        return self.last[1], self.last[2]

    def rows_of(self, x: torch.Tensor, feature_dims: int) -> torch.Tensor:
        """(n, features) rows of a layer input, padded tokens removed where the mask fits."""
        lead = x.shape[: x.dim() - feature_dims]
        if self.mask is not None and tuple(lead) == tuple(self.mask.shape):
            return x[self.mask]
        return x.reshape(-1, *x.shape[x.dim() - feature_dims:])

    def add(self, key: str, module: str, value: torch.Tensor, rows: int) -> None:
        if key in self.sums:
            self.sums[key] += value
        else:
            self.sums[key] = value.clone()  # never alias a Gram shared by Q, K and V
        if key.startswith(("gram:", "energy:")):
            self.rows[module] = self.rows.get(module, 0) + rows


def _hook(acc: _Accumulator, name: str, m: nn.Module) -> Callable[..., None]:
    def linear(_: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        if isinstance(m, nn.Conv2d):
            cols = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)  # (B, C·k·k, L)
            xs = cols.transpose(1, 2).reshape(-1, cols.shape[1]).to(torch.float64)
            gram, rows = xs.T @ xs, xs.shape[0]
        else:
            gram, rows = acc.gram_of(x)
        acc.add(f"gram:{name}", name, gram, rows)

    def norm(_: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        if isinstance(m, nn.LayerNorm):
            dims = len(m.normalized_shape)
            xh = F.layer_norm(x.to(torch.float64), m.normalized_shape, eps=m.eps)
        else:
            dims = 1
            eps = getattr(m, "eps", None) or getattr(m, "variance_epsilon", None) \
                or torch.finfo(x.dtype).eps
            x64 = x.to(torch.float64)
            xh = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
        rows = acc.rows_of(xh, dims)
        acc.add(f"energy:{name}", name, rows.pow(2).sum(0), rows.shape[0])

    return norm if _layer_kind(m).kind == "norm" else linear  # type: ignore[union-attr]


def capture(module: nn.Module, batches: Iterable[Batch], *, label: str = "model",
            calibration: Mapping[str, Any] | None = None,
            probe_from: Iterable[str] | None = None) -> FeatureStats:
    """Run ``module`` on ``batches`` and return the float64 accumulators of every layer.

    A batch is a dict of model inputs (``module(**batch)``; its ``attention_mask`` excludes
    padded tokens) or a tensor (``module(batch)``). Keys are ``module.named_modules()`` names,
    so they match the parameter names of ``module.state_dict()``. The module is run in eval
    mode under ``torch.inference_mode``; its training flag is restored afterwards. The probe
    (a hash of the few smallest parameters, checked against the expert at merge time) is taken
    among ``probe_from`` when given (the names the checkpoint really holds).
    """
    acc = _Accumulator()
    layers: dict[str, LayerInfo] = {}
    handles = []
    for name, m in module.named_modules():
        info = _layer_kind(m)
        if info is not None:
            layers[name] = info
            handles.append(m.register_forward_pre_hook(_hook(acc, name, m)))
    if not layers:
        raise FeatureError(f"{label}: has no Linear, Conv2d or norm layer to capture features of")
    was_training = module.training
    module.eval()
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    examples = 0
    try:
        with torch.inference_mode():
            for batch in batches:
                acc.last = None
                if isinstance(batch, torch.Tensor):
                    acc.mask = None
                    examples += batch.shape[0]
                    module(batch.to(device))
                    continue
                inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                          for k, v in batch.items()}
                mask = inputs.get("attention_mask")
                acc.mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
                examples += next(iter(v.shape[0] for v in inputs.values()
                                      if isinstance(v, torch.Tensor)), 0)
                module(**inputs)
    finally:
        acc.last = None
        for h in handles:
            h.remove()
        module.train(was_training)
    kept = {m: info for m, info in layers.items() if acc.rows.get(m, 0) > 0}
    tensors: dict[str, torch.Tensor] = {}
    for m in kept:
        key = f"gram:{m}" if kept[m].kind == "linear" else f"energy:{m}"
        tensors[key] = acc.sums[key].cpu().clone()  # a normal tensor, not an inference one
        tensors[f"rows:{m}"] = torch.tensor(float(acc.rows[m]), dtype=torch.float64)
    params = dict(module.named_parameters())
    allowed = set(probe_from) if probe_from is not None else set(params)
    candidates = sorted((params[n].numel(), n) for m in kept for n in (f"{m}.weight", f"{m}.bias")
                        if n in params and n in allowed)
    probe = [n for _, n in candidates[:PROBE_TENSORS]]
    metadata = {"model": label, "examples": str(examples),
                "rows": str(max(acc.rows.values(), default=0)),
                "calibration": json.dumps(dict(calibration or {}), sort_keys=True),
                "probe_tensors": json.dumps(probe),
                "probe": probe_hash([params[n] for n in probe])}
    return FeatureStats(kept, tensors, metadata=metadata, label=f"features of {label}")


def capture_experts(module: nn.Module, experts: Mapping[str, Mapping[str, torch.Tensor]],
                    batches: Mapping[str, Iterable[Batch]]) -> dict[str, FeatureStats]:
    """{task: statistics}: each expert's state dict loaded (strictly) into one ``module`` and run
    on its own task's batches. The module's own weights are restored afterwards."""
    missing = [t for t in experts if t not in batches]
    if missing:
        raise FeatureError(f"no calibration batches for task(s) {', '.join(missing)}")
    original = {k: v.detach().clone() for k, v in module.state_dict().items()}
    try:
        out = {}
        for task, state in experts.items():
            module.load_state_dict(state, strict=True)
            out[task] = capture(module, batches[task], label=task)
        return out
    finally:
        module.load_state_dict(original)


# --- calibration data ----------------------------------------------------------------------

TEXT_SUFFIXES = (".txt", ".jsonl")
TENSOR_SUFFIXES = (".pt", ".pth", ".safetensors", ".npy")


def draw_examples(n: int, num_examples: int, seed: int) -> list[int]:
    """``num_examples`` distinct indices out of ``n`` (all of them when n is smaller), seeded."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[: min(n, num_examples)].tolist()


def read_texts(path: Path, text_field: str = "text") -> list[str]:
    """One example per non-empty line (.txt) or the ``text_field`` of each JSON line (.jsonl)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FeatureError(f"{path}: cannot read calibration texts ({exc})") from None
    if path.suffix == ".txt":
        texts = [ln for ln in lines if ln.strip()]
    else:
        texts = []
        for i, ln in enumerate(lines, 1):
            if not ln.strip():
                continue
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as exc:
                raise FeatureError(f"{path}: line {i} is not JSON ({exc.msg})") from None
            value = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(value, str):
                raise FeatureError(f"{path}: line {i} has no string field '{text_field}' "
                                   "(set calibration.text_field)")
            texts.append(value)
    if not texts:
        raise FeatureError(f"{path}: holds no calibration examples")
    return texts


def read_tensor_inputs(path: Path) -> torch.Tensor | dict[str, torch.Tensor]:
    """A tensor of model inputs (first dim = examples), or a dict of them (``input_ids``...)."""
    try:
        if path.suffix == ".npy":
            import numpy as np

            obj: Any = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every reader has its own error types
        raise FeatureError(f"{path}: cannot read calibration inputs ({first_line(exc)})") from None
    if isinstance(obj, Mapping) and len(obj) == 1:
        obj = next(iter(obj.values()))
    if isinstance(obj, torch.Tensor) and obj.dim() >= 1:
        return obj
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sizes = {v.shape[0] for v in obj.values()}
        if len(sizes) == 1:
            return dict(obj)
    raise FeatureError(f"{path}: calibration inputs must be a tensor or a dict of tensors with "
                       "one first dimension (examples)")


def calibration_batches(path: Path, *, num_examples: int = 64, batch_size: int = 8,
                        max_length: int = 128, seed: int = 0, tokenizer: Any = None,
                        text_field: str = "text") -> list[Batch]:
    """The seeded draw of ``num_examples`` examples, cut into batches of model inputs."""
    if path.suffix in TEXT_SUFFIXES:
        texts = read_texts(path, text_field)
        picked = [texts[i] for i in draw_examples(len(texts), num_examples, seed)]
        if tokenizer is None:
            raise FeatureError(f"{path}: text calibration data needs a tokenizer (the base "
                               "model directory, or tokenizer_source, must hold one)")
        return [dict(tokenizer(picked[s:s + batch_size], truncation=True, max_length=max_length,
                               padding=True, return_tensors="pt"))
                for s in range(0, len(picked), batch_size)]
    if path.suffix in TENSOR_SUFFIXES:
        data = read_tensor_inputs(path)
        n = data.shape[0] if isinstance(data, torch.Tensor) else next(iter(data.values())).shape[0]
        idx = torch.tensor(draw_examples(n, num_examples, seed), dtype=torch.long)
        out: list[Batch] = []
        for s in range(0, len(idx), batch_size):
            part = idx[s:s + batch_size]
            out.append(data[part] if isinstance(data, torch.Tensor)
                       else {k: v[part] for k, v in data.items()})
        return out
    raise FeatureError(f"{path}: unknown calibration data format; use "
                       f"{', '.join(TEXT_SUFFIXES + TENSOR_SUFFIXES)}")


# --- loading an expert as a module ----------------------------------------------------------

def load_factory(spec: str, root: Path | None = None) -> Callable[[], nn.Module]:
    """Import ``package.module:function`` (the recipe's directory is searched first)."""
    mod_name, _, func_name = spec.partition(":")
    if not mod_name or not func_name:
        raise FeatureError(f"factory '{spec}' must look like 'module:function'")
    added = root is not None and str(root) not in sys.path
    if added:
        sys.path.insert(0, str(root))
    try:
        func = getattr(importlib.import_module(mod_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise FeatureError(f"factory '{spec}': cannot import it ({exc})") from None
    finally:
        if added:
            sys.path.remove(str(root))
    return func


def load_module(path: Path, factory: str | None = None, root: Path | None = None) -> nn.Module:
    """An expert as a float32 module: ``factory()`` with the checkpoint's tensors loaded
    (strict names), or a Hugging Face directory through transformers (its ``architectures``
    class, so parameter names match the checkpoint)."""
    if factory is not None:
        module = load_factory(factory, root)()
        if not isinstance(module, nn.Module):
            raise FeatureError(f"factory '{factory}' returned a {type(module).__name__}, "
                               "not a torch.nn.Module")
        with open_checkpoint(path) as ckpt:
            state = {n: ckpt.read(n) for n in ckpt.names()}
        result = module.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            what = (f"missing '{result.missing_keys[0]}'" if result.missing_keys
                    else f"unexpected '{result.unexpected_keys[0]}'")
            raise FeatureError(f"{path}: does not fit the module factory '{factory}' builds "
                               f"({what}; {len(result.missing_keys)} missing, "
                               f"{len(result.unexpected_keys)} unexpected)")
        return module.float().eval()
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise FeatureError(f"{path}: features need the expert as a torch module: a Hugging Face "
                           "directory with config.json, or calibration.factory: 'module:function'")
    transformers = _transformers(path)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        cls = cls or transformers.AutoModel
        return cls.from_pretrained(str(path), dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise FeatureError(f"{path}: transformers cannot load it as a model "
                           f"({first_line(exc)})") from None


def _transformers(path: Path) -> Any:
    """The transformers module, or a one-line error: it is optional (the ``bench`` extra)."""
    try:
        import transformers
    except ImportError:
        raise FeatureError(f"{path}: loading a Hugging Face model or tokenizer needs transformers; "
                           "install it (pip install 'transformers>=4.56', or the mergewise[bench] "
                           "extra) or use calibration.factory with tensor inputs") from None
    return transformers


def load_tokenizer(path: Path | None) -> Any:
    if path is None:
        return None
    directory = path if path.is_dir() else path.parent
    transformers = _transformers(directory)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, KeyError):
        return None


@dataclass
class CaptureReport:
    """What one capture did (for the CLI, the report and the benchmark)."""

    task: str
    examples: int
    rows: int
    layers: int
    seconds: float
    path: Path | None = None


def capture_expert(model_path: Path, data_path: Path, *, num_examples: int = 64,
                   batch_size: int = 8, max_length: int = 128, seed: int = 0,
                   text_field: str = "text", tokenizer_paths: Sequence[Path] = (),
                   factory: str | None = None, root: Path | None = None, task: str = "",
                   device: str = "cpu") -> tuple[FeatureStats, CaptureReport]:
    """Load one expert, run it on its seeded calibration draw, return its statistics.

    Text data is tokenized with the first of ``tokenizer_paths`` (the base's) that holds a
    tokenizer, else the expert's own. ``seconds`` times the forward passes alone.
    """
    settings = calibration_settings(data_path, num_examples, batch_size, max_length, seed,
                                    text_field)
    tokenizer = None
    if data_path.suffix in TEXT_SUFFIXES:
        for candidate in (*tokenizer_paths, model_path):
            tokenizer = load_tokenizer(candidate)
            if tokenizer is not None:
                break
    batches = calibration_batches(data_path, num_examples=num_examples, batch_size=batch_size,
                                  max_length=max_length, seed=seed, tokenizer=tokenizer,
                                  text_field=text_field)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FeatureError("--device cuda was asked for, but torch sees no CUDA device; "
                           "use --device cpu")
    module = load_module(model_path, factory, root).to(device)
    with open_checkpoint(model_path) as ckpt:
        held = ckpt.names()  # a module may hold more (a freshly initialised pooler)
    start = time.perf_counter()
    stats = capture(module, batches, label=str(model_path), calibration=settings,
                    probe_from=held)
    seconds = time.perf_counter() - start
    del module
    report = CaptureReport(task or str(model_path), int(stats.metadata["examples"]),
                           stats.total_rows, len(stats.layers), seconds)
    return stats, report


def calibration_settings(data_path: Path, num_examples: int, batch_size: int, max_length: int,
                         seed: int, text_field: str) -> dict[str, Any]:
    """What the statistics depend on besides the model (recorded in the stats file). The data
    is identified by its content (``data_sha256``), so a moved project keeps its stats files;
    ``data`` (the path) is informative only."""
    digest = None
    if data_path.is_file():
        h = hashlib.sha256()
        with open(data_path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
    return {"data": str(data_path.resolve()), "data_sha256": digest,
            "num_examples": num_examples, "batch_size": batch_size, "max_length": max_length,
            "seed": seed, "text_field": text_field}


@dataclass
class FeatureSource:
    """Where one model's statistics come from: an existing stats file, or a capture."""

    task: str
    model: Path
    stats_path: Path | None  # read if it exists, else written by the capture
    data: Path | None
    calibration: Any = None  # recipe.Calibration

    @property
    def cached(self) -> bool:
        return self.stats_path is not None and self.stats_path.is_file()


def plan_sources(recipe: Any, root: Path | None, model_paths: Sequence[Path],
                 overwrite: bool = False) -> list[FeatureSource]:
    """Resolve every stats file and calibration data path of a recipe; report all that is
    missing at once, before any model is loaded."""
    anchor = root if root is not None else Path.cwd()
    sources, missing = [], []
    for i, (entry, model) in enumerate(zip(recipe.models, model_paths, strict=True)):
        stats_path = None
        if entry.features:
            stats_path = Path(entry.features).expanduser()
            stats_path = stats_path if stats_path.is_absolute() else anchor / stats_path
        data = None
        cal = entry.calibration
        if cal is not None:
            data = Path(cal.data).expanduser()
            data = data if data.is_absolute() else anchor / data
        src = FeatureSource(entry.task_name, model, stats_path, data, cal)
        needs_capture = overwrite or not src.cached
        if needs_capture and cal is None:
            missing.append(f"models.{i}.features: stats file {stats_path} does not exist and "
                           "the model has no calibration block to compute it")
        elif needs_capture and not data.is_file():  # type: ignore[union-attr]
            missing.append(f"models.{i}.calibration.data: {data} does not exist")
        sources.append(src)
    if missing:
        raise FeatureError("; ".join(missing))
    return sources


def obtain(sources: Sequence[FeatureSource], *, seed: int, tokenizer_paths: Sequence[Path] = (),
           root: Path | None = None, workdir: Path | None = None, overwrite: bool = False,
           device: str = "cpu", progress: Callable[[CaptureReport], None] | None = None
           ) -> tuple[list[FeatureStats], list[CaptureReport]]:
    """Every model's statistics, file-backed (read lazily): existing stats files are reused
    (their calibration settings must match the block), the others captured and written to the
    model's ``features:`` path, or to ``workdir``."""
    out, reports = [], []
    for src in sources:
        cal = src.calibration
        if src.cached and not overwrite:
            stats = load_stats(src.stats_path)  # type: ignore[arg-type]
            if cal is not None:
                want = calibration_settings(src.data, cal.num_examples, cal.batch_size,  # type: ignore[arg-type]
                                            cal.max_length, seed, cal.text_field)
                have = json.loads(stats.metadata.get("calibration", "{}"))
                skip = {"data"} | ({"data_sha256"} if want["data_sha256"] is None else set())
                diff = sorted(k for k in want if k not in skip and have.get(k) != want[k])
                if diff:
                    stats.close()
                    raise FeatureError(f"{src.stats_path}: was computed with other calibration "
                                       f"settings ({', '.join(diff)} differ); delete it, or "
                                       "recompute with `mergewise features --overwrite`")
            out.append(stats)
            continue
        stats, report = capture_expert(
            src.model, src.data, num_examples=cal.num_examples,  # type: ignore[arg-type]
            batch_size=cal.batch_size, max_length=cal.max_length, seed=seed,
            text_field=cal.text_field, tokenizer_paths=tokenizer_paths, factory=cal.factory,
            root=root, task=src.task, device=device)
        target = src.stats_path or (workdir or Path.cwd()) / f"{src.task.replace(os.sep, '_')}.features.safetensors"
        report.path = stats.save(target)
        del stats
        out.append(load_stats(target))
        reports.append(report)
        if progress is not None:
            progress(report)
    return out, reports
