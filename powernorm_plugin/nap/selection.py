"""Which parameters NaP projects, decided from parameter names (and module types).

Pure PyTorch: no fairseq import.

Every parameter gets a *kind*:

``matrix``       a weight with two or more dimensions longer than 1 (linear, convolution,
                 attention)
``vector``       any other parameter (biases, gates, ...; also those stored with extra
                 dimensions of 1, as attention's ``bias_k`` or weight norm's ``weight_g``)
``embedding``    the weight of an embedding table (token or learned positional)
``output``       the output projection onto the vocabulary (when not tied to an embedding)
``norm_scale``   the scale (gain, ``weight``) of a normalization layer
``norm_offset``  the offset (``bias``) of a normalization layer

The default projection set is every ``matrix``. ``include`` / ``exclude`` regular
expressions (``re.search`` over the full parameter name) add and remove parameters,
and ``norm_params="joint"`` adds each normalization layer's scale and offset as one
group projected jointly to its initial norm.
"""
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

KINDS = ("matrix", "vector", "embedding", "output", "norm_scale", "norm_offset")
NORM_PARAMS_CHOICES = ("free", "joint")

#: Modules whose parameters are the output projection onto the vocabulary.
OUTPUT_PROJECTION_RE = re.compile(
    r"(^|\.)(output_projection|embed_out|adaptive_softmax|lm_head|output_layer)(\.|$)"
)
#: Names that look like embedding tables (used when module types are unknown).
EMBEDDING_RE = re.compile(r"(^|\.)(embed_tokens|embed_positions|embeddings?|\w*_embed(ding)?s?)(\.|$)")
#: Names that look like normalization layers (used when module types are unknown).
NORM_NAME_RE = re.compile(r"(^|\.|_)(\w*norm\w*|ln(_\w+)?|\w+_ln)\.(weight|bias|gamma|beta|scale|offset)$", re.I)

_SCALE_LEAVES = {"weight", "scale", "gamma", "gain", "g"}
_OFFSET_LEAVES = {"bias", "beta", "offset", "b"}

_NORM_TYPES: Tuple[type, ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = _NORM_TYPES + (nn.RMSNorm,)


def is_norm_module(module: nn.Module) -> bool:
    """True for normalization layers: torch's, and any class whose name says ``Norm``
    (fairseq's ``FusedLayerNorm``, this plugin's PowerNorm, ...)."""
    if isinstance(module, _NORM_TYPES):
        return True
    return "norm" in type(module).__name__.lower()


def _norm_kind(leaf: str) -> str:
    if leaf in _OFFSET_LEAVES:
        return "norm_offset"
    return "norm_scale"


def classify_by_name(name: str, shape: Sequence[int]) -> str:
    """The kind of a parameter known only by its name and shape."""
    if OUTPUT_PROJECTION_RE.search(name):
        return "output"
    if NORM_NAME_RE.search(name):
        return _norm_kind(name.rsplit(".", 1)[-1].lower())
    if len(shape) >= 2 and EMBEDDING_RE.search(name):
        return "embedding"
    return "matrix" if sum(size > 1 for size in shape) >= 2 else "vector"


def classify_parameters(module: nn.Module, prefix: str = "") -> Dict[str, str]:
    """Map each (deduplicated) parameter name of ``module`` to its kind, from module types.

    A parameter shared by several modules (tied embeddings) takes the name
    ``named_parameters`` gives it and the kind of the first module that owns it.
    """
    kinds: Dict[str, str] = {}
    owner: Dict[int, str] = {}
    for mname, mod in module.named_modules():
        for leaf, p in mod.named_parameters(recurse=False):
            if p is None or id(p) in owner:
                continue
            full = (mname + "." + leaf) if mname else leaf
            if isinstance(mod, nn.Embedding) or "embedding" in type(mod).__name__.lower():
                kind = "embedding" if p.dim() >= 2 else "vector"
            elif is_norm_module(mod):
                kind = _norm_kind(leaf.lower())
            elif OUTPUT_PROJECTION_RE.search(full):
                kind = "output"
            else:
                kind = classify_by_name(full, tuple(p.shape))
            owner[id(p)] = full
            kinds[full] = kind
    # named_parameters() is the authority on names; translate if it deduplicated differently
    out: Dict[str, str] = {}
    for name, p in module.named_parameters():
        kind = kinds.get(owner.get(id(p), name)) or classify_by_name(name, tuple(p.shape))
        out[prefix + name] = kind
    return out


@dataclass
class ProjectionGroup:
    """Parameters projected together to their joint initial norm."""

    name: str
    members: List[int] = field(default_factory=list)  # indices into the parameter list


def _compile(pattern: Optional[str], flag: str) -> Optional["re.Pattern"]:
    if pattern is None or pattern == "":
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{flag}: invalid regular expression {pattern!r}: {e}") from None


def select_groups(
    names: Sequence[str],
    kinds: Mapping[str, str],
    include: Optional[str] = None,
    exclude: Optional[str] = None,
    norm_params: str = "free",
) -> List[ProjectionGroup]:
    """Choose the projection groups among the parameters ``names`` (in order).

    Selected = (every ``matrix`` parameter, plus names matching ``include``) minus
    names matching ``exclude``. ``norm_params="joint"`` adds, for each normalization
    layer, its scale and offset as a single group (name ``<module>.{weight+bias}``).
    A regular expression that matches no parameter name is an error.
    """
    if norm_params not in NORM_PARAMS_CHOICES:
        raise ValueError(
            f"--nap-norm-params must be one of {NORM_PARAMS_CHOICES}, got {norm_params!r}"
        )
    inc = _compile(include, "--nap-include")
    exc = _compile(exclude, "--nap-exclude")
    for rx, flag in ((inc, "--nap-include"), (exc, "--nap-exclude")):
        if rx is not None and not any(rx.search(n) for n in names):
            shown = ", ".join(list(names)[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(
                f"{flag} {rx.pattern!r} matches no parameter name (names look like: {shown})"
            )

    def excluded(n: str) -> bool:
        return exc is not None and exc.search(n) is not None

    groups: List[ProjectionGroup] = []
    joint: Dict[str, ProjectionGroup] = {}
    for i, n in enumerate(names):
        kind = kinds.get(n, "vector")
        if kind in ("norm_scale", "norm_offset") and norm_params == "joint":
            mod = n.rsplit(".", 1)[0] if "." in n else ""
            g = joint.get(mod)
            if g is None:
                g = joint[mod] = ProjectionGroup(name=mod)
                groups.append(g)
            g.members.append(i)
            continue
        chosen = kind == "matrix" or (inc is not None and inc.search(n) is not None)
        if chosen and not excluded(n):
            groups.append(ProjectionGroup(name=n, members=[i]))
    out = []
    for g in groups:
        if g.name in joint and joint[g.name] is g:
            if any(excluded(names[i]) for i in g.members):
                continue
            leaves = "+".join(names[i].rsplit(".", 1)[-1] for i in g.members)
            g.name = (g.name + "." if g.name else "") + "{" + leaves + "}"
        out.append(g)
    return out


def named_parameter_list(
    modules: Iterable[Tuple[str, nn.Module]], requires_grad_only: bool = True
) -> Tuple[List[str], List[torch.Tensor], Dict[str, str]]:
    """Names, parameters and kinds of several modules, in ``parameters()`` order.

    ``modules`` is ``[(prefix, module), ...]``; the parameters come in the order
    ``chain(m.parameters() for m in modules)``, the order fairseq's trainer hands
    them to the optimizer.
    """
    names, params, kinds = [], [], {}
    for prefix, m in modules:
        if m is None:
            continue
        kinds.update(classify_parameters(m, prefix))
        for n, p in m.named_parameters():
            if requires_grad_only and not p.requires_grad:
                continue
            names.append(prefix + n)
            params.append(p)
    return names, params, kinds
