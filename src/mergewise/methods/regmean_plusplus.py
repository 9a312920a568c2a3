"""RegMean++ (Nguyen et al. 2025): RegMean on Grams captured through the merged layers.

The solve is RegMean's, the very function (``regmean.regmean_merge``): for every matmul weight
W* = (Σ_k W_k G̃_k)(Σ_k G̃_k)⁻¹ with G_k = Σ xᵀx / n_k and the off-diagonal × ``alpha`` (0.95,
FusionBench's CLIP config; the official fork's generic yaml says 0.1 and its scripts sweep it).
Only the inputs x differ: the statistics of block l are captured by running expert k's own
block l on the inputs that the *already merged* blocks < l compute from task k's data, and
block l is merged before block l + 1 is captured (``features.sequential``). So every model
needs a ``calibration:`` block: the statistics depend on all experts and are captured during
the merge (``features:`` files and ``mergewise features`` are refused for this method).

| question            | mergewise                                                          |
|---------------------|--------------------------------------------------------------------|
| space               | full weights (no task vectors, no sparsify block), no base needed  |
| blocks              | numbered ``layers``/``layer``/``h``/``blocks``/... ModuleList children |
| block l's inputs    | merged blocks < l (stem: merged by RegMean) on task k's data        |
| inside a block      | expert k's own earlier sub-layers (as FusionBench)                  |
| layers outside blocks | as RegMean: each expert end to end on its own data               |
| Gram, solve         | RegMean's: per task / n_k, off-diagonal × ``alpha``, float64 solve  |
| other parameters    | mean of the experts (final norms too; FusionBench keeps CLIP's post_layernorm pretrained) |
| rows                | every token, padded ones excluded, as the calibration block draws  |
| calibration options | ``pack``, ``accumulate: float32`` (every Gram sum); ``blocks_per_pass`` refused |
| cost                | ≈ L²/2 block forwards per task; all experts in memory at once       |

A model without such blocks is one unit, and RegMean++ equals RegMean.
"""

from __future__ import annotations

from ..registry import METHODS, MergeMethod
from .lot import GRAM_WHY
from .regmean import ALPHA, regmean_merge

METHODS.register(MergeMethod(
    name="regmean_plusplus",
    func=regmean_merge,
    space="weight",
    params=(ALPHA,),
    doc=__doc__ or "",
    requires_base=False,
    model_params=(),
    accepts_sparsify=False,
    features=True,
    sequential_features=True,
    calibration_options=("pack", "accumulate"),
    calibration_why={**GRAM_WHY, "blocks_per_pass": (
        "holds every expert's Grams of every block in memory until the merge reads them (they "
        "depend on all experts and are never written), so streaming passes would save nothing")},
))
