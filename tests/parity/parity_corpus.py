"""The parity corpus: mergekit-format recipes, what mergewise must do with each, and why.

Each ``Entry`` is one recipe in mergekit's own language. ``$name`` placeholders stand for the
absolute paths of the checkpoints ``parity_fixtures`` builds (absolute, because mergekit's model
card step calls the hub for short relative paths). ``seed: 0`` is appended for mergewise; mergekit
ignores unknown top-level keys and gets ``--random-seed 0`` instead.

``expect``:

- ``exact``: every tensor within 1 ulp of the output dtype (and same names, dtypes, config).
- ``topk``: as exact, except entries at a top-k selection threshold: both tools keep the largest
  |delta| but mergekit keeps ``max(1, int(density*n))`` entries in unstable-argsort order,
  mergewise ``round-half-up(density*n)`` with ties broken by index. Every entry differing by
  more than 1 ulp must have, in some model, a |delta| between the two tools' threshold values
  (a tie or the k rounding rule); they are counted and reported.
- ``distribution``: random methods (DARE, della). Per tensor, the fraction of changed entries
  and the mean and second moment of the merged delta agree within 5 standard errors; when the
  recipe has a single non-base model, the kept mask and the rescale factor are recovered and the
  rescale rule (mergekit: L1-norm matching) is checked exactly.
- ``refused``: mergekit silently ignores part of the recipe (its output is still recorded);
  mergewise must refuse it with a one-line error containing ``refusal``.

``pending`` names mergewise work that has not landed yet: the entry is an ``xfail(strict=False)``
and flips to a pass when it lands. ``finding`` names a deliberate, documented difference (an
xfail too, reported as *explained* with what differed).
"""

from __future__ import annotations

from dataclasses import dataclass
from string import Template
from typing import Literal

Expect = Literal["exact", "topk", "distribution", "refused"]

# features other engineers are landing (names used in ``pending``)
SUBSTRING_FILTERS = "substring filters"
GRADIENTS = "gradients"
SLICES = "slices/layer_range"
PASSTHROUGH = "passthrough"
UNION = "tokenizer_source: union"
TOKENIZER_BASE = "tokenizer_source: base over another vocabulary"
TOKENIZER_BLOCK = "tokenizer: block"
CHAT_TEMPLATE = "chat_template"
NORMALIZE = "mergekit normalize defaults"
DARE_L1 = "DARE rescale as L1-norm matching"
DENSITY_DEFAULT = "density default 1.0"

# differences the harness found that are not on that list (see docs/mergekit-parity.md)
OUT_DTYPE = ("without out_dtype, mergewise writes the base's dtype; mergekit writes the compute "
             "dtype (`dtype:`)")
LINEAR_F32 = ("mergewise computes linear in `dtype` (fp16/bf16 rounding at every step); mergekit "
              "accumulates linear in float32 and rounds once")
WEIGHTED_SUM = ("mergewise sums task vectors with add_(delta, alpha=w), a fused multiply-add; "
                "mergekit rounds each w*delta, then sums (1 rounding of tau differs)")
SLERP_F64 = ("mergewise computes slerp's angle and coefficients in float64; mergekit in float32 "
             "(norms, dot, acos, sin)")
BASE_LISTED = ("a base listed under models is a task model in mergewise (zero delta, its weight "
               "in the normalisation); mergekit drops it from the task models")
COMPUTE_DTYPE = ("without dtype, mergewise computes in float32 (its documented default, more "
                 "precise) where mergekit computes task-vector methods in the inputs' dtype (bf16 "
                 "here); with dtype: bfloat16 the two agree (ties_bf16_tie_family)")
DTYPE_NAME = ("mergekit copies the dtype name as written ('torch.bfloat16') into config.json; "
              "mergewise writes 'bfloat16', the name transformers reads; the tensors agree")
INT8_MASK = "int8_mask is refused as an unknown parameter (mergekit accepts it; no numeric effect)"


@dataclass(frozen=True)
class Entry:
    name: str
    recipe: str
    expect: Expect
    why: str
    pending: tuple[str, ...] = ()
    finding: tuple[str, ...] = ()
    refusal: str | None = None

    def render(self, paths: dict[str, str], seed: int = 0) -> str:
        """The recipe with absolute checkpoint paths and mergewise's ``seed``."""
        text = Template(self.recipe).substitute(paths).strip() + "\n"
        return text if "\nseed:" in f"\n{text}" else f"{text}seed: {seed}\n"

    @property
    def xfail_reason(self) -> str | None:
        parts = [f"needs {', '.join(self.pending)}"] if self.pending else []
        if self.finding:
            parts.append(f"a deliberate difference: {'; '.join(self.finding)}")
        return "; ".join(parts) or None


def _models(*rows: str) -> str:
    return "models:\n" + "".join(f"  - {row}\n" for row in rows)


CORPUS: list[Entry] = [
    # --- linear --------------------------------------------------------------------------
    Entry("linear_weights", """
merge_method: linear
base_model: $base
""" + _models("{model: $base, parameters: {weight: 0.2}}", "{model: $m1, parameters: {weight: 0.5}}",
              "{model: $m2, parameters: {weight: 0.9}}") + "dtype: float32", "exact",
          "weights != 1, normalize default true; the base listed, as mergekit always adds it"),
    Entry("linear_no_normalize", """
merge_method: linear
base_model: $base
""" + _models("{model: $base, parameters: {weight: 0.1}}", "{model: $m1, parameters: {weight: 0.3}}",
              "{model: $m2, parameters: {weight: 0.6}}") + """
parameters: {normalize: false}
dtype: float32""", "exact", "normalize false: a plain weighted sum"),
    Entry("linear_bf16_compute", """
merge_method: linear
base_model: $base
""" + _models("{model: $base, parameters: {weight: 0.5}}", "{model: $m1, parameters: {weight: 0.5}}") + """
dtype: bfloat16""", "exact",
          "float32 inputs, dtype bfloat16: mergekit casts at load, sums in f32, writes bf16"),
    Entry("linear_fp16_compute", """
merge_method: linear
base_model: $base
""" + _models("{model: $base, parameters: {weight: 0.3}}", "{model: $m1, parameters: {weight: 0.7}}") + """
dtype: float16
out_dtype: float16""", "exact", "float32 inputs computed and written in float16"),
    Entry("linear_bf16_inputs", """
merge_method: linear
base_model: $bf16_base
""" + _models("{model: $bf16_base, parameters: {weight: 0.4}}", "{model: $bf16_m1, parameters: {weight: 0.6}}"),
          "exact", "bf16 checkpoints, no dtype: both upcast and round once to bf16"),
    Entry("linear_weight_gradient", """
merge_method: linear
base_model: $base
""" + _models("{model: $base, parameters: {weight: 0.5}}", "{model: $m1, parameters: {weight: [0.2, 1.0]}}",
              "{model: $m2, parameters: {weight: 0.4}}") + """
parameters: {normalize: false}
dtype: float32""", "exact",
          "a global gradient: weight interpolated over the layer index (t = 0 for embed/norm/head)"),
    # --- task arithmetic -----------------------------------------------------------------
    Entry("task_arithmetic_lambda", """
merge_method: task_arithmetic
base_model: $base
""" + _models("{model: $m1, parameters: {weight: 0.7}}", "{model: $m2, parameters: {weight: 0.4}}") + """
parameters: {lambda: 0.9}
dtype: float32""", "exact", "weights != 1 and lambda; normalize default false"),
    Entry("task_arithmetic_fp16", """
merge_method: task_arithmetic
base_model: $fp16_base
""" + _models("{model: $fp16_m1, parameters: {weight: 0.7}}", "{model: $fp16_m2, parameters: {weight: 0.4}}") + """
dtype: float16""", "exact", "fp16 checkpoints computed in fp16 (mergekit rounds weights to fp16)"),
    Entry("task_arithmetic_base_listed", """
merge_method: task_arithmetic
base_model: $base
""" + _models("{model: $base, parameters: {weight: 0.5}}", "{model: $m1, parameters: {weight: 0.3}}",
              "{model: $m2, parameters: {weight: 0.6}}") + """
parameters: {normalize: true}
dtype: float32""", "exact",
          "the base listed under models with a weight (Hub style): mergekit drops it from the "
          "non-base inputs, so its weight is not in the normalisation"),
    # --- TIES ----------------------------------------------------------------------------
    Entry("ties_issue_four_models", """
merge_method: ties
base_model: $base
""" + _models(*(f"{{model: $m{i}, parameters: {{weight: 0.25, density: 0.2}}}}" for i in range(1, 5))) + """
dtype: float32""", "topk",
          "issue 12 failure 1: four models at weight 0.25, density 0.2; normalize default true "
          "divides by the agreeing weights"),
    Entry("ties_normalize_false", """
merge_method: ties
base_model: $base
""" + _models("{model: $m1, parameters: {weight: 0.6, density: 0.4}}",
              "{model: $m2, parameters: {weight: 0.8, density: 0.4}}") + """
parameters: {normalize: false}
dtype: float32""", "topk", "normalize false: the agreeing weighted deltas summed"),
    Entry("ties_mixed_density", """
merge_method: ties
base_model: $base
""" + _models("{model: $m1, parameters: {weight: 1.0, density: 0.3}}",
              "{model: $m2, parameters: {weight: 0.5, density: 0.7}}") + """
parameters: {lambda: 1.2}
dtype: float32""", "topk", "per-model densities and weights, lambda after normalisation"),
    Entry("ties_base_listed", """
merge_method: ties
base_model: $base
""" + _models("{model: $base}", "{model: $m1, parameters: {weight: 0.5, density: 0.5}}",
              "{model: $m2, parameters: {weight: 0.5, density: 0.5}}") + """
dtype: float32""", "topk", "Hub style: the base listed under models without parameters"),
    Entry("ties_int8_mask", """
merge_method: ties
base_model: $base
""" + _models("{model: $m1, parameters: {weight: 1.0, density: 0.5}}",
              "{model: $m2, parameters: {weight: 1.0, density: 0.5}}") + """
parameters: {int8_mask: true}
dtype: float32""", "topk", "int8_mask has no numeric effect in mergekit (weights 1: normalize "
          "defaults do not matter)"),
    Entry("ties_bf16_tie_family", """
merge_method: ties
base_model: $tie_base
""" + _models("{model: $tie_t1, parameters: {weight: 1.0, density: 0.3}}",
              "{model: $tie_t2, parameters: {weight: 1.0, density: 0.3}}") + """
dtype: bfloat16""", "topk",
          "bf16 deltas on a coarse grid: most threshold entries are ties, broken differently"),
    Entry("ties_bf16_no_dtype", """
merge_method: ties
base_model: $bf16_base
""" + _models("{model: $bf16_m1, parameters: {weight: 1.0, density: 0.3}}",
              "{model: $bf16_m2, parameters: {weight: 1.0, density: 0.3}}"), "topk",
          "bf16 checkpoints, no dtype: mergekit computes TIES in bf16 (weights 1: normalize "
          "defaults do not matter)", finding=(COMPUTE_DTYPE,)),
    # --- DARE ----------------------------------------------------------------------------
    Entry("dare_ties", """
merge_method: dare_ties
base_model: $base
""" + _models("{model: $m1, parameters: {weight: 0.6, density: 0.5}}",
              "{model: $m2, parameters: {weight: 0.4, density: 0.5}}") + """
dtype: float32""", "distribution", "Bernoulli drop + L1 rescale + sign election; normalize default false"),
    Entry("dare_linear_single", """
merge_method: dare_linear
base_model: $base
""" + _models("{model: $m1, parameters: {weight: 1.0, density: 0.3}}") + """
dtype: float32""", "distribution", "one model: the kept mask and the rescale factor are recoverable"),
    Entry("dare_linear_no_rescale", """
merge_method: dare_linear
base_model: $base
""" + _models("{model: $m1, parameters: {weight: 0.8, density: 0.3}}") + """
parameters: {rescale: false}
dtype: float32""", "distribution", "rescale false: kept entries unscaled (one model, recoverable)"),
    Entry("dare_linear_two", """
merge_method: dare_linear
base_model: $base
""" + _models("{model: $m1, parameters: {weight: 0.5, density: 0.5}}",
              "{model: $m2, parameters: {weight: 0.5, density: 0.5}}") + """
dtype: float32""", "distribution",
          "two models, weights 0.5, density 0.5 (L1 matching vs 1/density is within sampling noise "
          "here: dare_linear_single checks the rule)"),
    Entry("dare_linear_density_default", """
merge_method: dare_linear
base_model: $base
""" + _models("{model: $m1, parameters: {weight: 0.5}}", "{model: $m2, parameters: {weight: 0.5}}") + """
dtype: float32""", "exact", "no density: mergekit's default 1.0 drops nothing (deterministic)"),
    # --- breadcrumbs ---------------------------------------------------------------------
    Entry("breadcrumbs", """
merge_method: breadcrumbs
base_model: $base
""" + _models("{model: $m1, parameters: {weight: 0.5, density: 0.8, gamma: 0.05}}",
              "{model: $m2, parameters: {weight: 0.5, density: 0.8, gamma: 0.05}}") + """
dtype: float32""", "topk", "density + gamma: two thresholds per tensor (outliers, then the rest)"),
    Entry("breadcrumbs_ties", """
merge_method: breadcrumbs_ties
base_model: $base
""" + _models("{model: $m1, parameters: {weight: 1.0, density: 0.7, gamma: 0.02}}",
              "{model: $m2, parameters: {weight: 0.8, density: 0.7, gamma: 0.02}}") + """
dtype: float32""", "topk", "breadcrumbs trim + sign election; normalize default false"),
    # --- della ---------------------------------------------------------------------------
    Entry("della_single", """
merge_method: della
base_model: $base
""" + _models("{model: $m1, parameters: {weight: 1.0, density: 0.5, epsilon: 0.15}}") + """
parameters: {lambda: 1.1}
dtype: float32""", "distribution",
          "rank-dependent keep probability per row, L1 rescale; one model: mask recoverable"),
    Entry("della_linear", """
merge_method: della_linear
base_model: $base
""" + _models("{model: $m1, parameters: {weight: 0.5, density: 0.5, epsilon: 0.1}}",
              "{model: $m2, parameters: {weight: 0.5, density: 0.5, epsilon: 0.1}}") + """
dtype: float32""", "distribution", "della without sign election, normalize default false"),
    # --- the other mergekit methods ------------------------------------------------------
    Entry("sce", """
merge_method: sce
base_model: $base
""" + _models("{model: $m1}", "{model: $m2}", "{model: $m3}") + """
parameters: {select_topk: 0.5}
dtype: float32""", "exact",
          "variance top-k (k = n/2 exactly for even n, so no rounding or tie question)"),
    Entry("model_stock", """
merge_method: model_stock
base_model: $base
""" + _models("{model: $m1}", "{model: $m2}", "{model: $m3}") + """
dtype: float32""", "exact", "interpolation ratio from the mean pairwise cosine of the deltas"),
    Entry("nuslerp", """
merge_method: nuslerp
base_model: $base
""" + _models("{model: $m1, parameters: {weight: 0.3}}", "{model: $m2, parameters: {weight: 0.7}}") + """
dtype: float32""", "exact", "slerp of the two deltas, t = w2/(w1+w2), whole tensor flattened"),
    Entry("multislerp", """
merge_method: multislerp
base_model: $base
""" + _models("{model: $m1, parameters: {weight: 0.2}}", "{model: $m2, parameters: {weight: 0.3}}",
              "{model: $m3, parameters: {weight: 0.5}}") + """
dtype: float32""", "exact", "spherical barycentre of three deltas"),
    Entry("karcher", """
merge_method: karcher
base_model: $base
""" + _models("{model: $base}", "{model: $m1}", "{model: $m2}") + """
dtype: float32""", "exact",
          "Riemannian mean of base, m1, m2 (mergekit adds the base as an input anyway: listed)"),
    Entry("nearswap", """
merge_method: nearswap
base_model: $base
""" + _models("{model: $m1}") + """
parameters: {t: 0.004}
dtype: float32""", "exact", "per-entry interpolation weight clamp(t/|base - m1|, 0, 1)"),
    Entry("arcee_fusion", """
merge_method: arcee_fusion
base_model: $base
""" + _models("{model: $m1}") + """
dtype: float32""", "exact", "importance = |delta| x row KL; keep above median + 1.5 IQR"),
    Entry("ram", """
merge_method: ram
base_model: $base
""" + _models("{model: $m1}", "{model: $m2}", "{model: $m3}") + """
parameters: {epsilon: 0.005}
dtype: float32""", "exact", "unique contributions kept, shared ones averaged (|tau| > epsilon)"),
    Entry("ramplus_tl", """
merge_method: ramplus_tl
base_model: $base
""" + _models("{model: $m1}", "{model: $m2}", "{model: $m3}") + """
parameters: {epsilon: 0.005, r: 0.2, alpha: 0.5}
dtype: float32""", "exact", "RAM with each model's unique entries boosted by its overlap ratio"),
    Entry("ties_torch_dtype_name", """
merge_method: ties
base_model: $base
""" + _models("{model: $m1, parameters: {weight: 0.7, density: 0.3}}",
              "{model: $m2, parameters: {weight: 0.3, density: 0.3}}") + """
dtype: torch.float32
out_dtype: torch.bfloat16""", "topk", "mergekit's torch.-prefixed dtype names; written in bf16",
          finding=(DTYPE_NAME,)),
    # --- slerp ---------------------------------------------------------------------------
    Entry("slerp_models", """
merge_method: slerp
base_model: $base
""" + _models("{model: $m1}") + """
parameters: {t: 0.3}
dtype: float32""", "exact", "slerp base -> m1 at t = 0.3 (the base is v0)"),
    Entry("slerp_slices_gradient", """
merge_method: slerp
base_model: $m1
slices:
  - sources:
      - {model: $m1, layer_range: [0, 4]}
      - {model: $m2, layer_range: [0, 4]}
parameters:
  t:
    - {filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}
    - {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}
    - {value: 0.5}
dtype: float32""", "exact",
          "issue 12 failure 2, the most common Hub recipe: slerp over slices, t gradients per "
          "substring filter"),
    Entry("slerp_filters_no_slices", """
merge_method: slerp
base_model: $base
""" + _models("{model: $m1}") + """
parameters:
  t: [{filter: self_attn, value: 0.2}, {filter: mlp, value: 0.9}, {value: 0.5}]
dtype: float32""", "exact",
          "issue 12 failure 3: substring filters without slices"),
    Entry("slerp_global_gradient", """
merge_method: slerp
base_model: $base
""" + _models("{model: $m1}") + """
parameters: {t: [0, 0.5, 1]}
dtype: float32""", "exact", "one gradient for every tensor: t = i/(L-1) per layer, 0 elsewhere"),
    # --- passthrough ---------------------------------------------------------------------
    Entry("passthrough_stack", """
merge_method: passthrough
slices:
  - sources: [{model: $m1, layer_range: [0, 3]}]
  - sources: [{model: $m2, layer_range: [1, 4]}]
dtype: float32""", "exact",
          "frankenmerge: m1 layers 0-2 then m2 layers 1-3, 6 layers (no base_model: mergekit's "
          "passthrough takes one input per slice)"),
    # --- tokenizers ----------------------------------------------------------------------
    Entry("tokenizer_union", """
merge_method: linear
base_model: $base
""" + _models("{model: $base, parameters: {weight: 0.5}}", "{model: $mu, parameters: {weight: 0.5}}") + """
tokenizer_source: union
dtype: float32""", "exact",
          "260-token union; rows compared by token string (mergekit's new-token ids vary per run)"),
    Entry("tokenizer_block_pad", """
merge_method: linear
base_model: $base
""" + _models("{model: $base, parameters: {weight: 0.5}}", "{model: $mu, parameters: {weight: 0.5}}") + """
tokenizer: {source: union, pad_to_multiple_of: 8}
dtype: float32""", "exact", "union padded to 264 rows: padding rows are each model's mean row"),
    Entry("tokenizer_base", """
merge_method: linear
base_model: $base
""" + _models("{model: $base, parameters: {weight: 0.3}}", "{model: $m1, parameters: {weight: 0.7}}") + """
tokenizer_source: base
dtype: float32""", "exact", "the base's tokenizer, same vocabulary everywhere"),
    Entry("tokenizer_base_other_vocab", """
merge_method: linear
base_model: $base
""" + _models("{model: $base, parameters: {weight: 0.5}}", "{model: $mu, parameters: {weight: 0.5}}") + """
tokenizer_source: base
dtype: float32""", "exact", "the 260-vocab expert aligned to the base's 256 tokens"),
    Entry("chat_template", """
merge_method: linear
base_model: $base
""" + _models("{model: $base, parameters: {weight: 0.5}}", "{model: $m1, parameters: {weight: 0.5}}") + """
chat_template: chatml
dtype: float32""", "exact", "a built-in chat template written with the tokenizer"),
    # --- what mergekit silently ignores and mergewise refuses ----------------------------
    Entry("refused_permodel_lambda", """
merge_method: ties
base_model: $base
""" + _models("{model: $m1, parameters: {weight: 0.5, density: 0.5, lambda: 2.0}}",
              "{model: $m2, parameters: {weight: 0.5, density: 0.5}}") + """
dtype: float32""", "refused", "lambda is shared: mergekit ignores it under a model",
          refusal="'lambda' is method-wide"),
    Entry("refused_unknown_key", """
merge_method: ties
base_model: $base
""" + _models("{model: $m1, parameters: {weight: 0.5, density: 0.5}}") + """
dtype: float32
out_dtpye: float16""", "refused", "a typo'd top-level key: mergekit ignores it (writes float32)",
          refusal="unknown key 'out_dtpye'"),
    Entry("refused_typo_parameter", """
merge_method: ties
base_model: $base
""" + _models("{model: $m1, parameters: {weight: 0.5, densty: 0.5}}") + """
dtype: float32""", "refused", "a typo'd parameter: mergekit keeps density 1.0",
          refusal="unknown parameter 'densty'"),
    Entry("refused_gamma_on_ties", """
merge_method: ties
base_model: $base
""" + _models("{model: $m1, parameters: {weight: 0.5, density: 0.5}}") + """
parameters: {gamma: 0.1}
dtype: float32""", "refused", "gamma is breadcrumbs' parameter: mergekit's ties ignores it",
          refusal="unknown parameter 'gamma'"),
]

BY_NAME = {e.name: e for e in CORPUS}
assert len(BY_NAME) == len(CORPUS), "corpus names must be unique"
