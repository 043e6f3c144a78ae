"""Parameter names for NaP optimizers.

fairseq hands optimizers bare parameters, never their names. NaP needs the names
(``--nap-include``/``--nap-exclude``, the default selection, saving targets by name),
so the plugin wraps ``fairseq.trainer.Trainer._build_optimizer``: while the trainer
builds its optimizer, the names, parameters and kinds of its model and criterion are
published here (:func:`param_names_context`). A NaP optimizer then matches the
parameters it receives against them:

* by identity (fp32 training, ``--amp``, ``--memory-efficient-fp16/bf16``),
* by position and shape (the fp32 master copies of ``--fp16 --fp16-no-flatten-grads``
  and ``--bf16``, made in the trainer's parameter order),
* as views into one flat buffer (the flattened fp32 master copy of ``--fp16``).

Python code that builds optimizers itself uses the same context manager::

    with param_names_context(model):
        opt = FP16Optimizer.build_optimizer(cfg, params)
"""
import contextlib
import functools
import logging
from typing import Dict, List, Optional, Tuple

import torch

from ..nap.selection import classify_by_name, named_parameter_list

logger = logging.getLogger(__name__)

_STACK: List[Tuple[List[str], List[torch.Tensor], Dict[str, str]]] = []


@contextlib.contextmanager
def param_names_context(model, criterion=None, criterion_prefix: str = "criterion."):
    """Publish the names of ``model``'s (and ``criterion``'s) trainable parameters,
    in the order fairseq's trainer hands them to the optimizer."""
    mods = [("", model)]
    if criterion is not None:
        mods.append((criterion_prefix, criterion))
    _STACK.append(named_parameter_list(mods))
    try:
        yield
    finally:
        _STACK.pop()


def current_names():
    return _STACK[-1] if _STACK else None


def resolve_names(params: List[torch.Tensor]):
    """Names, tensors, kinds and mode for the parameters an optimizer receives.

    Returns ``(names, tensors, kinds, mode, flat)``; ``tensors[i]`` is ``params``'
    tensor for ``names[i]`` (a view into the flat buffer in mode ``"flat"``) and
    ``flat`` is that buffer (else ``None``).
    """
    ctx = current_names()
    if ctx is not None:
        ref_names, ref_params, kinds = ctx
        by_id = {id(p): n for n, p in zip(ref_names, ref_params)}
        if params and all(id(p) in by_id for p in params):
            return [by_id[id(p)] for p in params], list(params), kinds, "identity", None
        if len(params) == len(ref_params) and all(
            tuple(p.shape) == tuple(r.shape) for p, r in zip(params, ref_params)
        ):
            return list(ref_names), list(params), kinds, "position", None
        total = sum(r.numel() for r in ref_params)
        if len(params) == 1 and params[0].dim() == 1 and params[0].numel() == total:
            flat = params[0]
            return list(ref_names), flat_views(flat, ref_params), kinds, "flat", flat
        logger.warning(
            "NaP: could not match the %d optimizer parameters to the model's %d named "
            "parameters; falling back to generic names",
            len(params),
            len(ref_params),
        )
    else:
        logger.warning(
            "NaP: optimizer built outside fairseq's trainer and outside "
            "powernorm_plugin.optim.param_names_context(model); parameters get generic "
            "names param.<i> and the default selection keeps every tensor with >= 2 dims"
        )
    names = [f"param.{i}" for i in range(len(params))]
    kinds = {n: classify_by_name(n, tuple(p.shape)) for n, p in zip(names, params)}
    return names, list(params), kinds, "generic", None


def flat_views(flat: torch.Tensor, like: List[torch.Tensor]) -> List[torch.Tensor]:
    """Views of the flat buffer ``flat`` shaped like ``like`` (in order)."""
    data = flat.detach()
    out, off = [], 0
    for r in like:
        n = r.numel()
        out.append(data[off : off + n].view(r.shape))
        off += n
    return out


_PATCHED = False


def patch_trainer() -> None:
    """Make fairseq's Trainer publish parameter names while it builds its optimizer."""
    global _PATCHED
    if _PATCHED:
        return
    from fairseq.trainer import Trainer

    original = Trainer._build_optimizer
    if getattr(original, "_nap_patched", False):
        _PATCHED = True
        return

    @functools.wraps(original)
    def _build_optimizer(self, *args, **kwargs):
        model = getattr(self, "_model", None)
        criterion = getattr(self, "_criterion", None)
        if model is None:
            return original(self, *args, **kwargs)
        with param_names_context(model, criterion):
            return original(self, *args, **kwargs)

    _build_optimizer._nap_patched = True
    Trainer._build_optimizer = _build_optimizer
    _PATCHED = True
