"""NaP (Normalize-and-Project) projection math, pure PyTorch (no fairseq import).

After each optimizer step, NaP rescales every scale-invariant weight back to the norm
it had at the start of training, so that the effective learning rate lr / ||W||^2
follows the learning-rate schedule exactly.

Plain PyTorch use::

    from powernorm_plugin.nap import NormProjector
    proj = NormProjector.from_module(model)          # default selection: weight matrices
    proj.attach(optimizer)                           # project after every optimizer.step()

The fairseq optimizers ``nap_<name>`` (:mod:`powernorm_plugin.optim`) build on this.
"""
from .projector import NormProjector
from .selection import (
    KINDS,
    NORM_PARAMS_CHOICES,
    OUTPUT_PROJECTION_RE,
    ProjectionGroup,
    classify_by_name,
    classify_parameters,
    is_norm_module,
    named_parameter_list,
    select_groups,
)

__all__ = [
    "KINDS",
    "NORM_PARAMS_CHOICES",
    "OUTPUT_PROJECTION_RE",
    "NormProjector",
    "ProjectionGroup",
    "classify_by_name",
    "classify_parameters",
    "is_norm_module",
    "named_parameter_list",
    "select_groups",
]
