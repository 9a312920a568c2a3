"""Feature capture: forward pre-hooks turn the inputs of every layer into float64 accumulators.

Each expert runs as a torch module on its own task's calibration data; the hooks add each batch's
layer inputs into the statistics of ``statsfile`` (a Gram per Linear, Conv2d and Conv1D, an
energy per norm) and drop the features at once.

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
- ``capture``: one module on its batches; ``capture_experts``: one module, each expert's weights
  in turn; ``capture_expert``: an expert on disk on its calibration file (``mergewise features``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FeatureError
from .calibration import (
    TEXT_SUFFIXES,
    Batch,
    Tokenizer,
    adapted_names,
    calibration_draw,
    calibration_settings,
    check_token_ids,
    load_module,
    load_tokenizer,
    token_vocabulary,
)
from .statsfile import FeatureStats, LayerInfo, probe_hash

PROBE_TENSORS = 4
ACCUMULATE = {"float64": torch.float64, "float32": torch.float32}  # the Grams' sum dtype


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
    """The hooks' shared state: the current batch's token mask, the sums, and which layers read
    another layer's input (their Gram is that layer's: stored once)."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype  # of the Grams; energies are always float64
        self.mask: torch.Tensor | None = None
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.alias: dict[str, str] = {}  # layer -> the layer whose Gram it reads
        # the last Linear input, its Gram, rows, the layer that computed it and the layers that
        # took it since: Q, K and V receive the very same tensor object, so its Gram is computed
        # and added once (the reference keeps the object, and its id, alive)
        self.last: tuple[torch.Tensor, torch.Tensor, int, str, set[str]] | None = None

    def linear_input(self, name: str, x: torch.Tensor) -> None:
        """Add a Linear input's Gram; a layer reading the input its predecessor read shares
        that layer's sum (checked in every batch: the pairing must hold in each call)."""
        last = self.last
        if last is not None and last[0] is x and name not in last[4]:
            gram, rows, owner = last[1], last[2], last[3]
            last[4].add(name)
            if name not in self.calls:  # its first call: it reads ``owner``'s input
                self.alias[name] = owner
            if self.alias.get(name) == owner:
                self._count(name, rows)  # the owner has added the Gram
                return
            if name in self.alias:
                raise FeatureError(f"layer '{name}' read the input of '{self.alias[name]}' in "
                                   f"one call and of '{owner}' in another; its Gram cannot be "
                                   "shared (capture with share_grams=False)")
            self.add(f"gram:{name}", name, gram, rows)  # a layer of its own, on a shared input
            return
        if name in self.alias:
            raise FeatureError(f"layer '{name}' read the input of '{self.alias[name]}' in one "
                               "call but its own in another; its Gram cannot be shared (capture "
                               "with share_grams=False)")
        xs = self.rows_of(x, 1).to(self.dtype)
        self.last = (x, xs.T @ xs, xs.shape[0], name, {name})
        self.add(f"gram:{name}", name, self.last[1], xs.shape[0])

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
            self.sums[key] = value.clone()  # the batch's Gram may be another layer's too
        self._count(module, rows)

    def _count(self, module: str, rows: int) -> None:
        self.rows[module] = self.rows.get(module, 0) + rows
        self.calls[module] = self.calls.get(module, 0) + 1

    def checked_alias(self, kept: Mapping[str, LayerInfo]) -> dict[str, str]:
        """The sharing of the layers kept: a layer shares its owner's Gram only if it ran
        exactly as often, on the same rows (each of its calls took one of the owner's)."""
        for m, owner in self.alias.items():
            if owner not in kept or self.calls.get(m) != self.calls.get(owner) \
                    or self.rows.get(m) != self.rows.get(owner):
                raise FeatureError(f"layer '{m}' read the input of '{owner}' in some calls but "
                                   "not all; its Gram cannot be shared (capture with "
                                   "share_grams=False)")
        return {m: o for m, o in self.alias.items() if m in kept}


def _hook(acc: _Accumulator, name: str, m: nn.Module, kind: str, share: bool
          ) -> Callable[..., None]:
    def linear(_: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        if isinstance(m, nn.Conv2d):
            cols = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)  # (B, C·k·k, L)
            xs = cols.transpose(1, 2).reshape(-1, cols.shape[1]).to(acc.dtype)
            acc.add(f"gram:{name}", name, xs.T @ xs, xs.shape[0])
        elif share:
            acc.linear_input(name, x)
        else:
            xs = acc.rows_of(x, 1).to(acc.dtype)
            acc.add(f"gram:{name}", name, xs.T @ xs, xs.shape[0])

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

    return norm if kind == "norm" else linear


def capture(module: nn.Module, batches: Iterable[Batch], *, label: str = "model",
            calibration: Mapping[str, object] | None = None,
            probe_from: Iterable[str] | None = None,
            include: Callable[[str], bool] | None = None,
            stop_before: nn.Module | None = None, accumulate: str = "float64",
            share_grams: bool = True) -> FeatureStats:
    """Run ``module`` on ``batches`` and return the accumulators of every layer.

    A batch is a dict of model inputs (``module(**batch)``; its ``attention_mask`` excludes
    padded tokens) or a tensor (``module(batch)``). Keys are ``module.named_modules()`` names,
    so they match the parameter names of ``module.state_dict()``. The module is run in eval
    mode under ``torch.inference_mode``; its training flag is restored afterwards. The probe
    (a hash of the few smallest parameters, checked against the expert at merge time) is taken
    among ``probe_from`` when given (the names the checkpoint really holds). ``include`` keeps
    only the layers whose names it accepts; ``stop_before`` (a submodule) ends each forward pass
    where that submodule would run (the sequential RegMean++ capture of one block).
    ``accumulate``: the dtype of the Gram sums (``float32`` halves their memory and file; the
    solves are float64 either way). ``share_grams``: layers that read the very same input
    tensor (q/k/v) share one Gram, stored once.
    """
    if accumulate not in ACCUMULATE:
        raise FeatureError(f"{label}: accumulate is {accumulate!r}; use "
                           f"{' or '.join(ACCUMULATE)}")
    acc = _Accumulator(ACCUMULATE[accumulate])
    layers: dict[str, LayerInfo] = {}
    handles = []
    for name, m in module.named_modules():
        info = _layer_kind(m)
        if info is not None and (include is None or include(name)):
            layers[name] = info
            handles.append(m.register_forward_pre_hook(_hook(acc, name, m, info.kind,
                                                             share_grams)))
    if not layers:
        raise FeatureError(f"{label}: has no Linear, Conv2d or norm layer to capture features of")
    if stop_before is not None:
        handles.append(stop_before.register_forward_pre_hook(_stop))
    try:
        examples = _run(module, batches, acc)
    except FeatureError as exc:  # from a hook: name the model
        raise FeatureError(f"{label}: {exc}") from None
    finally:
        acc.last = None
        for h in handles:
            h.remove()
    return _collect(module, layers, acc, examples, label=label, calibration=calibration,
                    probe_from=probe_from)


class _Stop(Exception):
    """Raised by the ``stop_before`` hook: the rest of the forward pass is not needed."""


def _stop(_: nn.Module, __: tuple[Any, ...]) -> None:
    raise _Stop


def _forward(module: nn.Module, *args: Any, **kwargs: Any) -> None:
    try:
        module(*args, **kwargs)
    except _Stop:
        pass


def _run(module: nn.Module, batches: Iterable[Batch], acc: _Accumulator) -> int:
    """Forward every batch (eval mode, no autograd; the training flag is restored afterwards),
    keeping ``acc.mask`` the batch's token mask; the number of examples seen."""
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
                    _forward(module, batch.to(device))
                    continue
                inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                          for k, v in batch.items()}
                mask = inputs.get("attention_mask")
                acc.mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
                examples += next(iter(v.shape[0] for v in inputs.values()
                                      if isinstance(v, torch.Tensor)), 0)
                _forward(module, **inputs)
    finally:
        module.train(was_training)
    return examples


def _collect(module: nn.Module, layers: Mapping[str, LayerInfo], acc: _Accumulator, examples: int,
             *, label: str, calibration: Mapping[str, object] | None,
             probe_from: Iterable[str] | None) -> FeatureStats:
    """The accumulators of the layers that ran, with the stats file's metadata and probe."""
    if examples == 0:
        raise FeatureError(f"{label}: got zero calibration examples; the statistics need at "
                           "least one")
    kept = {m: info for m, info in layers.items() if acc.rows.get(m, 0) > 0}
    if not kept:
        raise FeatureError(f"{label}: no layer received a calibration row ({examples} examples; "
                           "is every token masked out by attention_mask?)")
    shared = acc.checked_alias(kept)
    tensors: dict[str, torch.Tensor] = {}
    for m in kept:
        key = f"gram:{m}" if kept[m].kind == "linear" else f"energy:{m}"
        if m not in shared:
            tensors[key] = acc.sums[key].cpu().clone()  # a normal tensor, not an inference one
        tensors[f"rows:{m}"] = torch.tensor(float(acc.rows[m]), dtype=torch.float64)
    metadata = {"model": label, "examples": str(examples),
                "rows": str(max(acc.rows.values(), default=0)),
                "calibration": json.dumps(dict(calibration or {}), sort_keys=True),
                **probe_metadata(module, kept, probe_from)}
    if acc.dtype != torch.float64:
        metadata["accumulate"] = str(acc.dtype).removeprefix("torch.")
    return FeatureStats(kept, tensors, metadata=metadata, label=f"features of {label}",
                        shared=shared)


def probe_metadata(module: nn.Module, kept: Iterable[str], probe_from: Iterable[str] | None
                   ) -> dict[str, str]:
    """``probe_tensors`` (the few smallest parameters of the layers ``kept``, among the names
    ``probe_from`` when given) and ``probe``, their hash."""
    params = dict(module.named_parameters())
    allowed = set(probe_from) if probe_from is not None else set(params)
    candidates = sorted((params[n].numel(), n) for m in kept for n in (f"{m}.weight", f"{m}.bias")
                        if n in params and n in allowed)
    probe = [n for _, n in candidates[:PROBE_TENSORS]]
    return {"probe_tensors": json.dumps(probe), "probe": probe_hash([params[n] for n in probe])}


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


def check_device(device: str) -> None:
    """``cpu``, ``cuda`` or ``cuda:N`` of a CUDA device torch sees: else a one-line error
    before any model is loaded (the forward passes and the Gram sums run there; the sums come
    back to the CPU to be written)."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise FeatureError(f"device {device!r} is not cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise FeatureError("--device cuda was asked for, but torch sees no CUDA device; "
                           "use --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise FeatureError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA "
                           "device(s)")


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
                   device: str = "cpu", pack: bool = False, accumulate: str = "float64",
                   adapter_base: Path | None = None) -> tuple[FeatureStats, CaptureReport]:
    """Load one expert, run it on its seeded calibration draw, return its statistics.

    Text data is tokenized with the first of ``tokenizer_paths`` (the base's) that holds a
    tokenizer, else the expert's own. ``seconds`` times the forward passes alone.
    """
    module, batches, settings, held = prepare_expert(
        model_path, data_path, num_examples=num_examples, batch_size=batch_size,
        max_length=max_length, seed=seed, text_field=text_field,
        tokenizer_paths=tokenizer_paths, factory=factory, root=root, device=device, pack=pack,
        accumulate=accumulate, adapter_base=adapter_base)
    start = time.perf_counter()
    stats = capture(module, batches, label=str(model_path), calibration=settings,
                    probe_from=held, accumulate=accumulate)
    seconds = time.perf_counter() - start
    del module
    report = CaptureReport(task or str(model_path), int(stats.metadata["examples"]),
                           stats.total_rows, len(stats.layers), seconds)
    return stats, report


def prepare_expert(model_path: Path, data_path: Path, *, num_examples: int = 64,
                   batch_size: int = 8, max_length: int = 128, seed: int = 0,
                   text_field: str = "text", tokenizer_paths: Sequence[Path] = (),
                   factory: str | None = None, root: Path | None = None, device: str = "cpu",
                   pack: bool = False, accumulate: str = "float64",
                   adapter_base: Path | None = None
                   ) -> tuple[nn.Module, list[Batch], dict[str, Any], set[str]]:
    """An expert as a module on ``device``, its seeded calibration batches (token ids checked),
    its calibration settings and the tensor names its checkpoint holds (a LoRA adapter: the
    model ``adapter_base`` with the adapter applied, tokenized as that model)."""
    check_device(device)
    settings = calibration_settings(data_path, num_examples, batch_size, max_length, seed,
                                    text_field, pack=pack, accumulate=accumulate)
    tokenizer: Tokenizer | None = None
    if data_path.suffix in TEXT_SUFFIXES:
        for candidate in (*tokenizer_paths, model_path, *([adapter_base] if adapter_base else [])):
            tokenizer = load_tokenizer(candidate)
            if tokenizer is not None:
                break
    batches, origins = calibration_draw(data_path, num_examples=num_examples,
                                        batch_size=batch_size, max_length=max_length, seed=seed,
                                        tokenizer=tokenizer, text_field=text_field, pack=pack)
    module = load_module(model_path, factory, root, adapter_base)
    check_token_ids(batches, origins, token_vocabulary(module), data_path, str(model_path))
    module = module.to(device)
    held = adapted_names(model_path, adapter_base)  # a module may hold more (a fresh pooler)
    return module, batches, settings, set(held)
