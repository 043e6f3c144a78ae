"""``build_norm``: the one place architectures get a normalization layer from.

Every layer it returns is called as ``norm(x, padding_mask=None)`` on (T, B, C) input.
"""
from torch import nn

from .masked_batch_norm import MaskedBatchNorm
from .power_norm import PowerNorm

NORM_KINDS = ("layer", "rms", "batch", "power", "power_vanilla")

# Options each kind accepts; an option of another kind is ignored (so architectures can pass
# one set of --powernorm-* options to every site), an option no kind knows is an error.
_POWER_OPTIONS = {"alpha_fwd", "alpha_bkw", "warmup_updates", "group_num", "mode", "affine",
                  "sync", "process_group", "causal"}
_BATCH_OPTIONS = {"momentum", "affine", "sync", "process_group"}
_OPTIONS = {
    "layer": {"elementwise_affine"},
    "rms": {"elementwise_affine"},
    "batch": _BATCH_OPTIONS,
    "power": _POWER_OPTIONS,
    "power_vanilla": _POWER_OPTIONS - {"mode"},
}
_KNOWN = set().union(*_OPTIONS.values())


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm with the common ``(x, padding_mask=None)`` signature (mask unused)."""

    def forward(self, x, padding_mask=None):
        return super().forward(x)


class RMSNorm(nn.RMSNorm):
    """torch's RMSNorm with the common ``(x, padding_mask=None)`` signature (mask unused)."""

    def forward(self, x, padding_mask=None):
        return super().forward(x)


def build_norm(kind, dim, eps=1e-5, **options):
    """Build the normalization layer ``kind`` over ``dim`` features.

    kind: ``layer`` (LayerNorm), ``rms`` (RMSNorm), ``batch`` (:class:`MaskedBatchNorm`),
    ``power`` (:class:`PowerNorm`, ``mode`` default "paper") or ``power_vanilla``
    (PowerNorm with mode="vanilla").
    """
    if kind not in NORM_KINDS:
        raise ValueError(f"unknown norm kind {kind!r}; choose one of: {', '.join(NORM_KINDS)}")
    unknown = sorted(set(options) - _KNOWN)
    if unknown:
        raise TypeError(f"build_norm got unknown option(s) {unknown}; known: {sorted(_KNOWN)}")
    if kind == "power_vanilla" and options.get("mode", "vanilla") != "vanilla":
        raise ValueError(f"kind 'power_vanilla' is PowerNorm with mode='vanilla', got mode={options['mode']!r}")
    kw = {k: v for k, v in options.items() if k in _OPTIONS[kind]}
    if kind == "layer":
        return LayerNorm(dim, eps=eps, **kw)
    if kind == "rms":
        return RMSNorm(dim, eps=eps, **kw)
    if kind == "batch":
        return MaskedBatchNorm(dim, eps=eps, **kw)
    if kind == "power_vanilla":
        kw["mode"] = "vanilla"
    return PowerNorm(dim, eps=eps, **kw)


def norm_uses_padding(module):
    """True for layers whose training output depends on which rows are padding."""
    return isinstance(module, (PowerNorm, MaskedBatchNorm))
