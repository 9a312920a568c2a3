"""The sequential capture of RegMean++ (Nguyen et al. 2025): block l's Grams on merged inputs.

RegMean captures every expert end to end on its own data. RegMean++ captures block l of expert k
on the inputs that the *already merged* blocks < l produce from task k's data, and merges block
l before going on (merge and capture interleaved, block by block):

1. Every expert runs end to end on its own batches (the plain ``capture``): these statistics
   serve every layer outside the blocks (stem linears, poolers, heads: as RegMean).
2. The merged model starts as a copy of the first expert whose every parameter outside the
   blocks is the RegMean solve of those statistics (embeddings, norms, biases: the mean).
3. For each block l, in module order (``block_names``): for each task k, expert k's own block
   l is put in place of block l of the merged model, which runs on task k's batches up to block
   l + 1 (the forward stops there) with hooks on the block's layers (inside the block the inputs
   of later sub-layers come from expert k's own earlier sub-layers, as FusionBench). Then block
   l of the merged model is solved: ``regmean_merge`` (the very function of the merge, same
   ``alpha``) on every parameter of the block.
4. Each expert's statistics = its plain ones with every block layer's replaced by the
   sequential ones: the merge then solves each tensor with ``regmean_merge`` as usual and gets
   the weights the capture built its prefix from.

Blocks are the numbered children of a ``ModuleList`` named ``layers``, ``layer``, ``h``,
``blocks``, ``block`` or ``resblocks`` (``layers.py``'s names: ``model.layers.N``,
``encoder.layer.N``...), outermost only, in registration order (the forward order of every
stack of Hugging Face models). A model without such blocks is one unit: RegMean++ = RegMean.
Rows and examples are those of the calibration blocks (padded tokens excluded, as ``capture``).
Cost: block l is reached by a forward through blocks < l, so the passes cost about L²/2
block forwards per task, and every expert is held in memory at once (plus the merged copy).

Calibration options: ``pack`` as the plain capture; ``accumulate`` is the dtype of every Gram
sum of that task, plain and sequential (the prefix solves, as the merge's, are float64).
``blocks_per_pass`` is refused (``methods.regmean_plusplus``'s registry entry): the passes
already hook one block at a time, but what they produce, every layer's Grams of every expert,
stays in memory until the merge reads it (it depends on all experts and is never written), and
so does the plain capture; streaming passes would not lower that peak. Honouring it would
mean writing each block's Grams to per-task files as soon as the block is solved.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from torch import nn

from ..errors import FeatureError
from .calibration import Batch
from .capture import capture, prepare_expert
from .sources import FeatureSource
from .statsfile import FeatureStats

_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|resblocks)\.(\d+)$")


def block_names(module: nn.Module) -> list[str]:
    """The repeated blocks of ``module`` (``encoder.layer.0``...), outermost, in module order."""
    out: list[str] = []
    for name, _ in module.named_modules():
        if not _BLOCK.search(name) or any(name.startswith(b + ".") for b in out):
            continue
        parent = module.get_submodule(name.rpartition(".")[0])
        if isinstance(parent, nn.ModuleList):
            out.append(name)
    return out


def _inside(block: str) -> Callable[[str], bool]:
    return lambda name: name == block or name.startswith(block + ".")


def _solve_into(merged: nn.Module, experts: Sequence[nn.Module], stats: Sequence[FeatureStats],
                alpha: float, select: Callable[[str], bool]) -> None:
    """Set the selected parameters of ``merged`` to their RegMean solve from ``stats``."""
    from ..methods.regmean import regmean_merge  # methods import features.statsfile

    own = [dict(e.named_parameters()) for e in experts]
    for name, param in merged.named_parameters():
        if not select(name):
            continue
        tensors = [o[name].detach() for o in own]
        feats = [st.for_tensor(name, tuple(param.shape)) for st in stats]
        value = regmean_merge(None, tensors, [1.0] * len(tensors), features=feats, alpha=alpha,
                              name=name)
        param.data.copy_(value)


def capture_sequential(experts: Mapping[str, nn.Module], batches: Mapping[str, Sequence[Batch]],
                       *, alpha: float = 0.95,
                       calibration: Mapping[str, Mapping[str, object]] | None = None,
                       probe_from: Mapping[str, set[str]] | None = None,
                       accumulate: Mapping[str, str] | None = None
                       ) -> dict[str, FeatureStats]:
    """{task: statistics} for RegMean++: block layers captured on the merged prefix (above).

    ``experts``: one module per task, all of one architecture (left unchanged); ``batches``:
    each task's calibration batches; ``alpha``: the RegMean shrink the prefix is merged with
    (must be the merge's). ``calibration``/``probe_from``/``accumulate``: per task, as
    ``capture``'s (``accumulate``: the dtype of every Gram sum of that task, plain and
    sequential; the prefix solves are float64 either way, as the merge's).
    """
    tasks = list(experts)
    missing = [t for t in tasks if t not in batches]
    if missing:
        raise FeatureError(f"no calibration batches for task(s) {', '.join(missing)}")
    if not tasks:
        raise FeatureError("regmean_plusplus: no experts to capture")
    cal = calibration or {}
    probes = probe_from or {}
    dtype = {t: (accumulate or {}).get(t, "float64") for t in tasks}
    plain = [capture(experts[t], batches[t], label=t, calibration=cal.get(t),
                     probe_from=probes.get(t), accumulate=dtype[t]) for t in tasks]
    merged = copy.deepcopy(experts[tasks[0]]).eval()
    blocks = block_names(merged)
    _solve_into(merged, [experts[t] for t in tasks], plain, alpha,
                lambda n: not any(_inside(b)(n) for b in blocks))
    tensors = [dict(p._tensors) for p in plain]  # fresh in-memory captures
    shared = [dict(p.shared) for p in plain]
    for i, block in enumerate(blocks):
        parent_name, _, index = block.rpartition(".")
        parent = merged.get_submodule(parent_name)
        stop = merged.get_submodule(blocks[i + 1]) if i + 1 < len(blocks) else None
        seq: list[FeatureStats] = []
        for k, t in enumerate(tasks):
            held = parent[int(index)]
            parent[int(index)] = experts[t].get_submodule(block)
            try:
                st = capture(merged, batches[t], label=t, include=_inside(block),
                             stop_before=stop, accumulate=dtype[t])
            finally:
                parent[int(index)] = held
            tensors[k].update(st._tensors)  # this block's layers, on the merged prefix
            shared[k] = {m: o for m, o in shared[k].items() if not _inside(block)(m)}
            shared[k].update(st.shared)
            seq.append(st)
        _solve_into(merged, [experts[t] for t in tasks], seq, alpha, _inside(block))
    out = {}
    for k, t in enumerate(tasks):
        meta = {**plain[k].metadata, "capture": "sequential (regmean_plusplus)",
                "alpha": repr(alpha)}
        out[t] = FeatureStats(plain[k].layers, tensors[k], metadata=meta,
                              label=f"regmean_plusplus features of {t}", shared=shared[k])
    return out


def obtain_sequential(sources: Sequence[FeatureSource], *, seed: int, alpha: float,
                      tokenizer_paths: Sequence[Path] = (), root: Path | None = None,
                      device: str = "cpu") -> list[FeatureStats]:
    """The RegMean++ statistics of a recipe's models (``sources.FeatureSource``, each with a
    calibration block): every expert loaded and its batches drawn as ``capture_expert`` does,
    then ``capture_sequential``. Held in memory, never written (they depend on every expert).
    Honours ``pack`` and ``accumulate``; ``blocks_per_pass`` is refused (``plan_sources``,
    the method's registry entry): see the module docstring."""
    experts: dict[str, nn.Module] = {}
    batches: dict[str, Sequence[Batch]] = {}
    settings: dict[str, Mapping[str, object]] = {}
    held: dict[str, set[str]] = {}
    dtypes: dict[str, str] = {}
    for src in sources:
        cal, data, task = src.calibration, src.data, src.task
        if cal is None or data is None:
            raise FeatureError(f"{task}: regmean_plusplus captures its statistics during the "
                               "merge and needs a calibration block for every model")
        experts[task], batches[task], settings[task], held[task] = prepare_expert(
            src.model, data, num_examples=cal.num_examples,
            batch_size=cal.batch_size, max_length=cal.max_length, seed=seed,
            text_field=cal.text_field, tokenizer_paths=tokenizer_paths, factory=cal.factory,
            root=root, device=device, pack=cal.pack, accumulate=cal.accumulate,
            adapter_base=src.adapter_base)
        dtypes[task] = cal.accumulate
    stats = capture_sequential(experts, batches, alpha=alpha, calibration=settings,
                               probe_from=held, accumulate=dtypes)
    return [stats[src.task] for src in sources]
