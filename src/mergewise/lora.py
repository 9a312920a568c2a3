"""PEFT LoRA adapters as merge inputs: the fine-tuned model an adapter makes of its base.

An adapter directory (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``, PEFT's
layout: ``base_model.model.<module>.lora_A.weight`` ...) is read as a ``Checkpoint`` over its
base that presents full weights one tensor at a time, as PEFT's ``merge_and_unload`` would:

- a LoRA module's weight W0 (read from the base) becomes ``W0 + delta`` with
  ``delta = (B @ A) * scale`` (transposed under ``fan_in_fan_out``, and always for embedding
  LoRA, ``lora_embedding_B @ lora_embedding_A``), ``scale = alpha / r`` or ``alpha / sqrt(r)``
  with ``use_rslora``; r and alpha per module from ``rank_pattern`` / ``alpha_pattern`` with
  PEFT's rule (the first pattern p, in file order, such that ``re.match(rf"(.*\\.)?({p})$",
  module)``), else ``r`` / ``lora_alpha``. A ``lora_B.bias`` (``lora_bias: true``) adds
  ``bias * scale`` to the module's bias;
- full tensors in the adapter (``modules_to_save``, biases under ``bias: all|lora_only``,
  saved embeddings) replace the base's;
- every other tensor is the base's, bit for bit.

Precision. The task vector a merge sees of a LoRA tensor is ``delta`` itself, computed in the
merge's compute dtype straight from A and B (``delta_over``): no round trip through ``W0 +
delta``, which in float32 would lose ``delta``'s low bits and in bfloat16 most of it. Full
weights (``read``: weight-space methods, an adapter on another model than the merge's base)
are ``W0`` upcast to float32 (float64 for a float64 base) plus ``delta``, never rounded to a
half-precision base's dtype; ``info`` reports that dtype.

Refused, in one line naming the file and key: other PEFT types (IA3, LoHa, LoKr, AdaLoRA,
prompt tuning...), DoRA, LoRA variants whose update is not ``B @ A`` on a base tensor (layer
replication, parameter targeting, trainable tokens, aLoRA...), adapters trained on a modified
base (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA initialisation), convolution LoRA, modules missing
from the base, shape or rank mismatches.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint, SafetensorsCheckpoint, StateDictCheckpoint
from .errors import CheckpointError, first_line, printable
from .tensors import TensorInfo
from .torch_files import load_torch_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
# PEFT's defaults (LoraConfig) for keys an adapter_config.json may omit
DEFAULT_R, DEFAULT_ALPHA = 8, 8
_LORA_PART = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|"
                        r"lora_embedding_A|lora_embedding_B)$")
_OTHER_TYPES = {
    "ADALORA": "AdaLoRA keeps an SVD triplet (lora_E) with a learned rank mask",
    "IA3": "IA3 rescales activations, it adds no B @ A",
    "LOHA": "LoHa is a Hadamard product of two low-rank pairs",
    "LOKR": "LoKr is a Kronecker product",
    "PROMPT_TUNING": "prompt tuning changes no weight",
    "PREFIX_TUNING": "prefix tuning changes no weight",
    "P_TUNING": "p-tuning changes no weight",
}
# config keys of LoRA variants whose update is not B @ A added to a base tensor
_VARIANTS = ("use_dora", "layer_replication", "target_parameters", "trainable_token_indices",
             "alora_invocation_tokens", "use_qalora", "use_bdlora", "arrow_config", "kasa_config",
             "monteclora_config", "velora_config")
# initialisations that change the base (the adapter is relative to a residual model)
_MODIFIED_BASE_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def is_adapter_dir(path: Path) -> bool:
    """A PEFT adapter directory: it has ``adapter_config.json``."""
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def _q(text: str) -> str:
    return f"'{printable(text)}'"


def pattern_key(patterns: dict[str, Any], module: str, where: Path) -> str | None:
    """The ``rank_pattern`` / ``alpha_pattern`` key PEFT applies to ``module``: the first key
    ``p`` (in the file's order) with ``re.match(rf"(.*\\.)?({p})$", module)``; None if none."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error as exc:
            raise CheckpointError(f"{where}: pattern {_q(key)} is not a valid regular expression "
                                  f"({exc}); fix the adapter config") from None
    return None


@dataclass(frozen=True)
class AdapterConfig:
    """What of ``adapter_config.json`` the delta depends on, validated."""

    path: Path
    r: int
    alpha: float
    rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    raw: dict[str, Any]

    def rank_and_scale(self, module: str) -> tuple[int, float]:
        """(r, scale) of ``module``, as PEFT's ``LoraLayer.update_layer`` sets them."""
        rk = pattern_key(self.rank_pattern, module, self.path)
        ak = pattern_key(self.alpha_pattern, module, self.path)
        r = self.rank_pattern[rk] if rk is not None else self.r
        alpha = self.alpha_pattern[ak] if ak is not None else self.alpha
        return r, alpha / math.sqrt(r) if self.rslora else alpha / r


def _number(value: Any, path: Path, key: str, *, integer: bool = False) -> float:
    ok = (isinstance(value, int) if integer else isinstance(value, (int, float)))
    if not ok or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise CheckpointError(f"{path}: {key} is {json.dumps(value)[:40]}, not {kind}; fix the "
                              "adapter config")
    return value


def _pattern(value: Any, path: Path, key: str, integer: bool) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {key} is a {type(value).__name__}, not an object of "
                              "module patterns; fix the adapter config")
    return {k: _number(v, path, f"{key}[{k!r}]", integer=integer) for k, v in value.items()}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path}: not valid UTF-8 JSON ({first_line(exc, 100)}); fix or "
                              "re-save the adapter") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: a JSON {type(cfg).__name__}, not an object")
    return cfg


def read_adapter_config(path: Path) -> AdapterConfig:
    """``adapter_config.json`` of a plain LoRA adapter; anything else is one line naming the key."""
    cfg = _read_json(path)
    kind = cfg.get("peft_type")
    if not isinstance(kind, str) or kind.upper() != "LORA":
        why = _OTHER_TYPES.get(str(kind).upper(), "only LoRA adapters have a B @ A update")
        raise CheckpointError(f"{path}: peft_type {json.dumps(kind)} is not supported ({why}); "
                              "mergewise merges LoRA adapters (peft_type LORA) only")
    for key in _VARIANTS:
        if cfg.get(key):
            what = ("DoRA (a learned magnitude rescales W0 + B @ A)" if key == "use_dora"
                    else "a LoRA variant whose update is not B @ A added to a base tensor")
            raise CheckpointError(f"{path}: {key} is {json.dumps(cfg[key])[:40]}: {what} is not "
                                  "supported; merge it into the model with PEFT "
                                  "(merge_and_unload) and use the full checkpoint")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_MODIFIED_BASE_INITS):
        raise CheckpointError(f"{path}: init_lora_weights {json.dumps(init)}: this adapter is "
                              "relative to a modified (residual) base, not the base model; convert "
                              "it with PEFT's path_initial_model_for_weight_conversion first")
    bias = cfg.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise CheckpointError(f"{path}: bias {json.dumps(bias)[:40]} is not none, all or lora_only")
    flags = {}
    for key in ("use_rslora", "fan_in_fan_out"):
        value = cfg.get(key, False)
        if not isinstance(value, bool):
            raise CheckpointError(f"{path}: {key} is {json.dumps(value)[:40]}, not true or false")
        flags[key] = value
    return AdapterConfig(
        path=path,
        r=int(_number(cfg.get("r", DEFAULT_R), path, "r", integer=True)),
        alpha=float(_number(cfg.get("lora_alpha", DEFAULT_ALPHA), path, "lora_alpha")),
        rslora=flags["use_rslora"], fan_in_fan_out=flags["fan_in_fan_out"],
        rank_pattern=_pattern(cfg.get("rank_pattern"), path, "rank_pattern", True),
        alpha_pattern=_pattern(cfg.get("alpha_pattern"), path, "alpha_pattern", False),
        raw=cfg)


def open_adapter_weights(directory: Path) -> Checkpoint:
    """The adapter's tensors (safetensors by our own parser, or ``.bin`` with weights_only)."""
    st, pt = (directory / n for n in ADAPTER_WEIGHTS)
    if st.is_file():
        return SafetensorsCheckpoint(str(st), [st], None)
    if pt.is_file():
        return StateDictCheckpoint(str(pt), load_torch_file(pt), None)
    raise CheckpointError(f"{directory}: adapter directory without adapter_model.safetensors or "
                          "adapter_model.bin")


@dataclass(frozen=True)
class LowRank:
    """One base tensor a LoRA module adds to: ``name`` (``module.weight``, or ``module.bias``
    for a ``lora_B.bias``), the adapter keys it is made of and how."""

    name: str
    module: str
    b_key: str
    a_key: str | None  # None: a lora_B.bias
    transpose: bool
    r: int
    scale: float

    def delta(self, weights: Checkpoint, dtype: torch.dtype, device: torch.device
              ) -> torch.Tensor:
        """``(B @ A) * scale`` (transposed where PEFT transposes) in ``dtype`` on ``device``, in
        PEFT's order of operations (``get_delta_weight``)."""
        b = weights.read(self.b_key).to(device=device, dtype=dtype)
        if self.a_key is None:
            return b * self.scale
        a = weights.read(self.a_key).to(device=device, dtype=dtype)
        product = b @ a
        return (product.T if self.transpose else product) * self.scale


def _module_and_name(key: str, label: str) -> tuple[str, str]:
    if not key.startswith(PREFIX):
        raise CheckpointError(f"{label}: key {_q(key)} does not start with {PREFIX!r}; not a "
                              "PEFT LoRA adapter of a transformers model (PEFT's save_pretrained "
                              "layout)")
    return key[len(PREFIX):], key


def _full_name(stripped: str) -> str:
    """The base tensor a full adapter tensor replaces (PEFT wraps targets in ``base_layer``
    and modules_to_save in ``modules_to_save``)."""
    return stripped.replace(".base_layer.", ".").replace(".modules_to_save.", ".")


class LoraCheckpoint(Checkpoint):
    """A base checkpoint with a LoRA adapter applied, presented tensor by tensor."""

    def __init__(self, adapter_dir: Path, base: Checkpoint, *, owns_base: bool = False,
                 label: str | None = None):
        self.adapter_dir = adapter_dir
        self.base = base
        self.label = label or str(adapter_dir)
        self.directory = adapter_dir
        self._owns_base = owns_base
        self.settings = read_adapter_config(adapter_dir / ADAPTER_CONFIG)
        self.weights = open_adapter_weights(adapter_dir)
        try:
            self.low_rank, self.full = self._layout()
        except BaseException:
            self.close()
            raise

    # --- layout, from headers only ---------------------------------------------------------
    def _layout(self) -> tuple[dict[str, LowRank], dict[str, str]]:
        label, base = self.weights.label, self.base
        base_names = set(base.names())
        parts: dict[str, dict[str, str]] = {}
        full: dict[str, str] = {}
        for key in self.weights.names():
            stripped, _ = _module_and_name(key, label)
            m = _LORA_PART.match(stripped)
            if m:
                parts.setdefault(m["module"], {})[m["part"]] = key
                continue
            if "lora_magnitude_vector" in stripped:
                raise CheckpointError(f"{label}: key {_q(key)} is a DoRA magnitude vector; DoRA "
                                      "is not supported (merge it with PEFT's merge_and_unload)")
            if re.search(r"(^|\.)(lora_|ranknum|ia3_|hada_|lokr_)", stripped):
                raise CheckpointError(f"{label}: key {_q(key)} is not a plain LoRA tensor "
                                      "(lora_A/lora_B weight, lora_B bias, lora_embedding_A/B)")
            name = _full_name(stripped)
            self._check_full(key, name, base_names)
            full[name] = key
        low_rank: dict[str, LowRank] = {}
        for module, keys in parts.items():
            for item in self._module(module, keys, base_names):
                if item.name in full:
                    raise CheckpointError(f"{label}: tensor {_q(item.name)} is both a LoRA "
                                          f"target and a full tensor ({_q(full[item.name])})")
                low_rank[item.name] = item
        return low_rank, full

    def _check_full(self, key: str, name: str, base_names: set[str]) -> None:
        label = self.weights.label
        if name not in base_names:
            raise CheckpointError(f"{label}: key {_q(key)} replaces tensor {_q(name)}, which the "
                                  f"base {self.base.label} does not have; is this adapter for "
                                  "another model?")
        mine, theirs = self.weights.info(key), self.base.info(name)
        if mine.shape != theirs.shape:
            raise CheckpointError(f"{label}: key {_q(key)} has shape {list(mine.shape)}, the "
                                  f"base's {_q(name)} has {list(theirs.shape)}")
        if not mine.is_float:
            raise CheckpointError(f"{label}: key {_q(key)} is {mine.dtype}, not floating point")

    def _module(self, module: str, keys: dict[str, str], base_names: set[str]) -> list[LowRank]:
        """The base tensors one LoRA module adds to, every shape checked against the base."""
        label, cfg = self.weights.label, self.settings
        embedding = "lora_embedding_A" in keys or "lora_embedding_B" in keys
        pair = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight",
                                                                             "lora_B.weight")
        missing = [p for p in pair if p not in keys]
        present = next(iter(keys.values()))
        if missing:
            raise CheckpointError(f"{label}: module {_q(module)} has {_q(present)} but no "
                                  f"{_q(module + '.' + missing[0])}; the adapter file is incomplete")
        a_key, b_key = keys[pair[0]], keys[pair[1]]
        a, b = self.weights.info(a_key), self.weights.info(b_key)
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise CheckpointError(f"{label}: {_q(a_key)} has shape {list(a.shape)}: only Linear "
                                  "and Embedding LoRA (2-D A and B) are supported, not "
                                  "convolution LoRA")
        if not (a.is_float and b.is_float):
            raise CheckpointError(f"{label}: {_q(a_key)} is {a.dtype}; LoRA weights must be "
                                  "floating point (a quantized adapter?)")
        r, scale = cfg.rank_and_scale(module)
        if a.shape[0] != r or b.shape[1] != r:
            raise CheckpointError(
                f"{label}: {_q(a_key)} has rank {a.shape[0]} and {_q(b_key)} rank {b.shape[1]}, "
                f"but the config gives module {_q(module)} r={r} (r / rank_pattern); the scale "
                "alpha/r would be wrong")
        name = f"{module}.weight"
        if name not in base_names:
            raise CheckpointError(f"{label}: LoRA target module {_q(module)} has no tensor "
                                  f"{_q(name)} in the base {self.base.label}; is this adapter for "
                                  "another model?")
        transpose = embedding or cfg.fan_in_fan_out
        shape = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
        base_shape = self.base.info(name).shape
        if tuple(base_shape) != shape:
            hint = (" (fan_in_fan_out: the base stores it (in, out), as GPT-2's Conv1D?)"
                    if tuple(base_shape) == shape[::-1] else "")
            raise CheckpointError(f"{label}: {_q(b_key)} @ {_q(a_key)} gives a {list(shape)} "
                                  f"update but the base's {_q(name)} is {list(base_shape)}{hint}")
        out = [LowRank(name, module, b_key, a_key, transpose, r, scale)]
        bias_key = keys.get("lora_B.bias")
        if bias_key is not None:
            bias = f"{module}.bias"
            if bias not in base_names:
                raise CheckpointError(f"{label}: {_q(bias_key)} adds to {_q(bias)}, which the base "
                                      "does not have")
            if tuple(self.base.info(bias).shape) != tuple(self.weights.info(bias_key).shape):
                raise CheckpointError(f"{label}: {_q(bias_key)} has shape "
                                      f"{list(self.weights.info(bias_key).shape)}, the base's "
                                      f"{_q(bias)} {list(self.base.info(bias).shape)}")
            out.append(LowRank(bias, module, bias_key, None, False, r, scale))
        return out

    # --- the Checkpoint interface ----------------------------------------------------------
    @property
    def config(self) -> dict | None:
        return self.base.config

    def names(self) -> list[str]:
        return self.base.names()

    def _weight_dtype(self, name: str) -> torch.dtype:
        return torch.promote_types(self.base.info(name).dtype, torch.float32)

    def info(self, name: str) -> TensorInfo:
        if name in self.low_rank:
            return TensorInfo(name, self.base.info(name).shape, self._weight_dtype(name),
                              self.label)
        if name in self.full:
            info = self.weights.info(self.full[name])
            return TensorInfo(name, info.shape, info.dtype, self.label)
        return self.base.info(name)

    def read(self, name: str) -> torch.Tensor:
        item = self.low_rank.get(name)
        if item is not None:
            dtype = self._weight_dtype(name)
            w0 = self.base.read(name).to(dtype)
            return w0.add_(item.delta(self.weights, dtype, w0.device))
        if name in self.full:
            return self.weights.read(self.full[name])
        return self.base.read(name)

    def holds_delta(self, base: Checkpoint, name: str) -> bool:
        return base is self.base and name in self.low_rank

    def delta_over(self, base: Checkpoint, name: str, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor | None:
        if not self.holds_delta(base, name):
            return None
        return self.low_rank[name].delta(self.weights, dtype, device)

    def prefetches(self, name: str) -> bool:
        return name not in self.low_rank  # a LoRA tensor is computed when asked, not ahead

    def identity(self, name: str) -> str | None:
        parts: list[str | None] = [self.base.identity(name)]
        item = self.low_rank.get(name)
        keys = ([item.b_key] + ([item.a_key] if item.a_key else [])) if item else (
            [self.full[name]] if name in self.full else [])
        parts += [self.weights.identity(k) for k in keys]
        if item is not None:
            parts.append(f"{item.scale!r}|{item.transpose}")
        if any(p is None for p in parts):
            return None
        return hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()  # type: ignore[arg-type]

    def close(self) -> None:
        weights = getattr(self, "weights", None)
        if weights is not None:
            weights.close()
        if self._owns_base:
            self.base.close()


def split_plus(text: str) -> tuple[str, str] | None:
    """mergekit's ``model+adapter`` syntax: the (model, adapter) halves at the last ``+`` (an
    adapter path rarely holds one), or None when there is no ``+``."""
    if "+" not in text:
        return None
    model, _, adapter = text.rpartition("+")
    return model, adapter
