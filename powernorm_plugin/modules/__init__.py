"""Normalization layers of the PowerNorm paper, in pure PyTorch (no fairseq import).

All layers take ``(x, padding_mask=None)`` with x of shape (T, B, C) and padding_mask of shape
(B, T), bool, True = padding (fairseq's conventions).
"""
from ._util import ignored_batch
from .fold import IdentityNorm, fold_norm_into_linear, norm_residual
from .group_scaling import GroupScaling, group_rms_scale
from .masked_batch_norm import MaskedBatchNorm
from .norm_factory import NORM_KINDS, LayerNorm, RMSNorm, build_norm, norm_uses_padding
from .power_norm import MODES as POWERNORM_MODES
from .power_norm import PowerNorm, PowerNormFunction

__all__ = [
    "PowerNorm", "PowerNormFunction", "POWERNORM_MODES", "MaskedBatchNorm", "GroupScaling",
    "group_rms_scale", "LayerNorm", "RMSNorm", "build_norm", "NORM_KINDS", "norm_uses_padding",
    "fold_norm_into_linear", "norm_residual", "IdentityNorm", "ignored_batch",
]
