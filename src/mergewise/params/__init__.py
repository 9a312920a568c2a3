"""Every parameter rule, in one place: ``values.py`` says what a value means at one tensor
(scalars, gradients over layer depth, substring and glob filter lists: mergekit's language);
``job.py`` validates a recipe's parameters against the plug-ins' declarations and resolves
them once per job into a typed ``JobParams`` that the engine asks one question per tensor."""

from .job import (
    JobParams,
    ModelParams,
    Scope,
    Setting,
    SparsifyStep,
    base_is_first_input,
    base_is_special,
    check_listed_base,
    resolve_job,
    sparsify_step,
    step_specs,
)
from .slices import SliceRecipe, SliceSpec, slice_specs
from .values import MAX_FILTERS, FilterValue, ListValue, ParamValue, check_filter_total, resolve

__all__ = ["MAX_FILTERS", "FilterValue", "check_filter_total",
           "JobParams", "Scope", "ListValue", "ModelParams", "ParamValue", "Setting",
           "SliceRecipe", "SliceSpec", "SparsifyStep", "base_is_first_input", "base_is_special", "check_listed_base",
           "resolve", "resolve_job", "slice_specs", "sparsify_step", "step_specs"]
