"""Batch normalization over the non-padding tokens of a (T, B, C) batch (Table 1's "BN").

Training, per feature over the N tokens x_i (padding excluded):

    mu = mean_i x_i,   sigma^2 = mean_i (x_i - mu)^2
    y  = gamma * (x - mu) / sqrt(sigma^2 + eps) + beta        (padding rows: the same map)
    running_mean <- (1 - momentum) running_mean + momentum mu
    running_var  <- (1 - momentum) running_var  + momentum sigma^2 * N / (N - 1)

Inference: y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta.
The gradient is exact (autograd through mu and sigma^2); with ``sync`` the sums behind mu and
sigma^2 are all-reduced with a differentiable all-reduce, so the gradient is the global one.
"""
import torch
from torch import nn

from ._util import (
    FP32BuffersMixin, check_input, compute_dtype, distributed_world, register_affine, token_mask,
)


def _global_sum(t, group):
    if group is None:
        return t
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t, group=group)


class MaskedBatchNorm(FP32BuffersMixin, nn.Module):
    """Padding-aware batch norm for sequence batches; see the module docstring."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, sync=False,
                 process_group=None):
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"MaskedBatchNorm momentum must lie in (0, 1], got {momentum!r}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.sync = sync
        self.process_group = process_group
        self.name = "MaskedBatchNorm"
        register_affine(self, num_features, affine)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def forward(self, x, padding_mask=None):
        check_input(x, self.num_features, self.name)
        T, B, C = x.shape
        cd = compute_dtype(x)
        xc = x.reshape(T * B, C).to(cd)
        if self.training:
            mask = token_mask(padding_mask, T, B, x.device, cd, self.name)
            group = distributed_world(self.sync, self.process_group)
            w = torch.ones(T * B, dtype=cd, device=x.device) if mask.weights is None else mask.weights
            sums = _global_sum(torch.cat([w @ xc, w.sum().view(1)]), group)
            count = sums[-1].detach()
            if float(count) > 0:
                mean = sums[:C] / count
                centered = xc - mean
                var = _global_sum(w @ (centered * centered), group) / count
                if not torch.isfinite(var).all():
                    raise FloatingPointError(
                        f"{self.name}: the batch mean/variance is not finite (the input holds "
                        "NaN or Inf); its running statistics were left unchanged"
                    )
                with torch.no_grad():
                    n = float(count)
                    unbiased = var * (n / (n - 1)) if n > 1 else var
                    self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                    self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), self.momentum)
                    self.num_batches_tracked.add_(1)
            else:  # padding only: use (and keep) the running statistics
                mean, var = self.running_mean.to(cd), self.running_var.to(cd)
        else:
            mean, var = self.running_mean.to(cd), self.running_var.to(cd)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(cd)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.to(cd)
        return torch.addcmul(shift, xc, scale).to(x.dtype).view(T, B, C)

    def affine_parameters(self):
        """(scale, shift) of the inference map y = scale * x + shift."""
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(scale.dtype)
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias.to(scale.dtype)
        return scale, shift

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.weight is not None}, sync={self.sync}")
