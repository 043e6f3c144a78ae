"""Per-token RMS scaling over channel groups (the authors' ``group_num`` pre-scaling).

For a token x in R^C split into k groups of C/k channels, every group is divided by its own
root mean square:

    r_g = 1 / sqrt(mean_{c in g} x_c^2 + eps),        z_c = x_c * r_g(c)

It has no parameters and no batch statistics, so padding plays no part. Backward:

    dL/dx_c = r_g * (dL/dz_c - z_c * mean_{c' in g} dL/dz_c' * z_c')
"""
import torch
from torch import nn

from ._util import check_input, checked_eps, checked_int
from .kernels import EAGER, kernels_for


class GroupRMSScaleFunction(torch.autograd.Function):
    """``z = x * r`` on a 2-D input (tokens, channels), with the closed-form backward above.

    Saves z and r (not x): the PowerNorm that follows saves z too, so the pair keeps one
    activation-sized tensor alive instead of two.
    """

    @staticmethod
    def forward(ctx, x, groups, eps, kernels=EAGER):
        z, r = kernels.group_scale(x, groups, eps)
        ctx.kernels = kernels
        ctx.save_for_backward(z, r)
        return z.view(x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, dz):
        z, r = ctx.saved_tensors
        return ctx.kernels.group_scale_grad(dz.contiguous(), z, r), None, None, None


def group_rms_scale(x, groups, eps=1e-5, backend="auto"):
    """Apply per-token group RMS scaling to ``x`` of shape (..., C); C must divide by groups."""
    shape = x.shape
    kernels = kernels_for(backend)
    z = GroupRMSScaleFunction.apply(x.reshape(-1, shape[-1]), groups, eps, kernels)
    return z.view(shape)


def traceable_group_rms_scale(x, groups, eps=1e-5):
    """The same map in tensor operators alone, differentiated by autograd: what inference runs,
    so that torch.jit.trace and torch.export record it (they cannot save a Python
    autograd.Function)."""
    shape = x.shape
    return EAGER.group_scale(x.reshape(-1, shape[-1]), groups, eps)[0].to(x.dtype).view(shape)


def check_groups(num_features, group_num):
    """Validate ``group_num`` for ``num_features`` channels; returns it (None = no scaling)."""
    if group_num is None:
        return None
    group_num = checked_int(group_num, "group_num (None: no scaling)", 1)
    if num_features % group_num != 0:
        raise ValueError(
            f"group_num={group_num} must divide num_features={num_features} "
            "(each group holds num_features / group_num channels)"
        )
    return group_num


class GroupScaling(nn.Module):
    """The parameter-free group RMS scaling as a module (what remains of a folded PowerNorm)."""

    def __init__(self, num_features, group_num, eps=1e-5):
        super().__init__()
        self.num_features = checked_int(num_features, "GroupScaling num_features", 1)
        self.group_num = check_groups(num_features, group_num)
        self.eps = checked_eps(eps, "GroupScaling")

    def forward(self, x, padding_mask=None):
        check_input(x, self.num_features, "GroupScaling")
        if not self.training:
            return traceable_group_rms_scale(x, self.group_num, self.eps)
        return group_rms_scale(x, self.group_num, self.eps)

    def extra_repr(self):
        return f"{self.num_features}, group_num={self.group_num}, eps={self.eps}"
