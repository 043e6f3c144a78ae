"""Fold an eval-mode PowerNorm or MaskedBatchNorm into the ``nn.Linear`` that reads its output.

At inference both norms are a fixed per-feature affine map y = s * z + h (for PowerNorm, z is
the input after its optional group scaling). For a following linear layer W y + c:

    W (s * z + h) + c = (W diag(s)) z + (W h + c)

so the linear layer absorbs the norm, which is replaced by its parameter-free part.
"""
import torch
from torch import nn

from .group_scaling import GroupScaling
from .masked_batch_norm import MaskedBatchNorm
from .power_norm import PowerNorm


def _affine_of(norm):
    if not isinstance(norm, (PowerNorm, MaskedBatchNorm)):
        raise TypeError(f"can only fold PowerNorm or MaskedBatchNorm, got {type(norm).__name__}")
    if norm.training:
        raise ValueError(
            f"{norm.name} is in training mode; its output depends on the batch. "
            "Call .eval() before folding it"
        )
    return norm.affine_parameters()


@torch.no_grad()
def fold_norm_into_linear(norm, linear):
    """Return a new ``nn.Linear`` equal to ``linear(norm(x))`` minus the norm's affine map.

    ``norm`` must be in eval mode. Apply :func:`norm_residual` (the norm's parameter-free
    part) before the returned layer, once, and share it across all linears reading the norm.
    """
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
    scale, shift = _affine_of(norm)
    if linear.in_features != scale.numel():
        raise ValueError(
            f"linear.in_features={linear.in_features} does not match the norm's "
            f"{scale.numel()} features"
        )
    W = linear.weight.to(scale.dtype)
    bias = W @ shift
    if linear.bias is not None:
        bias = bias + linear.bias.to(scale.dtype)
    folded = nn.Linear(linear.in_features, linear.out_features, bias=True,
                       device=linear.weight.device, dtype=linear.weight.dtype)
    folded.weight.copy_(W * scale)
    folded.bias.copy_(bias)
    return folded


def norm_residual(norm):
    """The parameter-free part of ``norm`` left after folding (group scaling or identity)."""
    _affine_of(norm)
    if isinstance(norm, PowerNorm) and norm.group_num is not None:
        return GroupScaling(norm.num_features, norm.group_num, norm.eps)
    return IdentityNorm()


class IdentityNorm(nn.Module):
    """Identity with the norms' ``(x, padding_mask=None)`` signature."""

    def forward(self, x, padding_mask=None):
        return x
