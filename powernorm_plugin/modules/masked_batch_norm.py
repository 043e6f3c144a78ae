"""Batch normalization over the non-padding tokens of a (T, B, C) batch (Table 1's "BN").

Training, per feature over the N tokens x_i (padding excluded; m_i = 1 for a token, else 0):

    mu = mean_i x_i,   sigma^2 = mean_i (x_i - mu)^2,   inv = 1 / sqrt(sigma^2 + eps)
    y  = gamma * (x - mu) * inv + beta                         (padding rows: the same map)
    running_mean <- (1 - momentum) running_mean + momentum mu
    running_var  <- (1 - momentum) running_var  + momentum sigma^2 * N / (N - 1)

and the exact gradient through mu and sigma^2, with xhat = (x - mu) inv and g = dL/dy:

    dL/dx_j = gamma inv (g_j - (m_j / N) (sum_i g_i + xhat_j sum_i g_i xhat_i))
    dL/dgamma = sum_i g_i xhat_i,   dL/dbeta = sum_i g_i

where the sums run over every row i, padding included, since every output depends on mu and
sigma^2. Inference: y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta.

With ``sync`` the sums behind mu and sigma^2 and those behind the gradient are all-reduced
over the process group, so statistics and input gradient are the global ones (SyncBatchNorm).
Without it a training call does not wait for a GPU: N is the padding mask's token count,
counted once per mask for all the layers that get it, and a non-finite statistic is kept out of
the running buffers on the device and reported at the layer's next training call.
Where no row is padding (and without ``sync``) torch's batch norm kernels run the call.
"""
import torch
import torch.distributed as dist
from torch import nn

from ._util import (
    FP32BuffersMixin, autocast_off, check_input, checked_eps, checked_float, checked_int,
    compute_dtype, distributed_world, register_affine, token_mask,
)
from .host_mirrors import DeferredFiniteCheck, defers_checks
from .kernels import kernels_for


class GlobalSum(torch.autograd.Function):
    """y = the sum of ``t`` over the ranks of ``group``, on every rank, differentiably (twice
    too: the backward's recomputed graph under create_graph=True goes through it).

    Each rank's loss depends on y, so dL/dt is the same sum of every rank's dL/dy.
    """

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    @staticmethod
    def backward(ctx, grad):
        return GlobalSum.apply(grad, ctx.group), None


def _global_sum(t, group):
    """``t`` summed over ``group`` (None: ``t``), differentiably."""
    return t if group is None else GlobalSum.apply(t, group)


def token_statistics(xc, weights, count, group, passes=None):
    """(mu, sigma^2, N, xc - mu) over the token rows of the 2-D ``xc``, over ``group`` where
    given; (None, None, 0.0, None) where there is no token.

    ``weights`` is 1.0 for tokens and 0.0 for padding (None: every row a token) and ``count``
    the local token count. The variance is the mean square about mu (two passes), which stays
    accurate where |mu| is large against sigma. N is a host float: the local count, or the
    all-reduced one (read from the device, the one wait of a synchronized call).
    ``passes``: the kernels' passes (kernels.py), which sum the squares in one read (no
    gradient); None: differentiable torch operators.
    """
    with autocast_off(xc.device.type):  # (fp16 sums of many tokens would overflow)
        return _token_statistics(xc, weights, count, group, passes)


def _token_statistics(xc, weights, count, group, passes):
    C = xc.size(1)
    total = weights @ xc if weights is not None else xc.sum(0)
    if group is not None:
        sums = _global_sum(torch.cat([total, total.new_tensor([count])]), group)
        total, count = sums[:C], float(sums[C].detach())
    if count == 0:
        return None, None, 0.0, None
    mean = total / count
    centered = xc - mean
    if passes is not None:
        sq_sum = passes.forward(centered, weights, 0, 0.0, sums=True, all_rows=False)[1]
    else:
        sq = centered * centered
        sq_sum = weights @ sq if weights is not None else sq.sum(0)
    return mean, _global_sum(sq_sum, group) / count, float(count), centered


def affine_map(weight, bias, mean, var, eps):
    """(scale, shift) per feature, with scale x + shift = gamma (x - mu) / sqrt(sigma^2 + eps)
    + beta, in the statistics' dtype (differentiable)."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(scale.dtype)
    return scale, shift


def batch_norm_map(xc, weight, bias, mean, var, eps):
    """gamma (xc - mu) / sqrt(sigma^2 + eps) + beta, per feature (differentiable)."""
    scale, shift = affine_map(weight, bias, mean, var, eps)
    return torch.addcmul(shift, xc, scale)


class MaskedBatchNormFunction(torch.autograd.Function):
    """Training-mode MaskedBatchNorm on the 2-D ``xc``, normalized by the token statistics
    ``mean`` and ``var`` that :func:`token_statistics` computed from ``xc`` (with
    ``centered`` = xc - mean; ``counts``: the local token count it was given and the N it
    returned; N = 0: the running statistics, constants, and ``centered`` None), with the
    gradient of the module docstring in closed form: two of ``passes``' sweeps over the
    activations (the sums, then dL/dx) where autograd through the forward's operators takes
    about a dozen.

    Under ``create_graph=True`` the backward recomputes the forward with differentiable
    operators and differentiates it, so that second derivatives are exact.
    """

    @staticmethod
    def forward(ctx, xc, weight, bias, mean, var, centered, weights, counts, group, eps, passes):
        y = batch_norm_map(xc, weight, bias, mean, var, eps)
        ctx.save_for_backward(xc, weight, bias, mean, var, centered, weights)
        ctx.counts, ctx.group, ctx.eps, ctx.passes = counts, group, eps, passes
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, weight, bias, mean, var, d, weights = ctx.saved_tensors
        (local_count, count), group, eps = ctx.counts, ctx.group, ctx.eps
        if torch.is_grad_enabled():  # create_graph=True
            grads = _recomputed_gradients(dy, xc, weight, bias, mean, var, weights, local_count,
                                          count > 0, group, eps, ctx.needs_input_grad[:3])
            return (*grads, *[None] * 8)
        passes, dy = ctx.passes, dy.contiguous()
        inv = torch.rsqrt(var + eps)
        scale = inv * weight.to(inv.dtype) if weight is not None else inv
        d = d if d is not None else xc - mean
        # sum_i g_i (x_i - mu) and sum_i g_i, over every row
        _, _, dy_d, dy_sum = passes.backward(dy, d, None, None, 0, token_rows=False)
        grad_w = (dy_d * inv).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b = dy_sum.to(bias.dtype) if ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            if count == 0:  # the running statistics: constants
                dx = dy * scale
            else:
                if group is not None:
                    C = dy_sum.numel()
                    sums = torch.cat([dy_sum, dy_d])
                    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
                    dy_sum, dy_d = sums[:C], sums[C:]
                # dx = scale g - m (scale / N) ((x - mu) inv^2 sum g (x - mu) + sum g)
                k = scale / count
                dx = passes.backward(dy, d, None, weights, 0, scale, k * inv * inv * dy_d,
                                     sums=False)[0]
                if weights is not None:
                    dx.addr_(weights, k * dy_sum, alpha=-1)
                else:
                    dx.sub_(k * dy_sum)
        return (dx, grad_w, grad_b, *[None] * 8)


def _recomputed_gradients(dy, xc, weight, bias, mean, var, weights, local_count, batch_stats,
                          group, eps, needed):
    """(dL/dxc, dL/dgamma, dL/dbeta) by autograd through the forward recomputed from ``xc``
    (its statistics too, where ``batch_stats``), kept differentiable (create_graph)."""
    inputs = [t for t, need in zip((xc, weight, bias), needed) if need]
    with torch.enable_grad():
        if batch_stats:
            mean, var, _, _ = token_statistics(xc, weights, local_count, group)
        y = batch_norm_map(xc, weight, bias, mean, var, eps)
        found = iter(torch.autograd.grad(y, inputs, dy, create_graph=True))
    return [next(found) if need else None for need in needed]


class MaskedBatchNorm(FP32BuffersMixin, nn.Module):
    """Padding-aware batch norm for sequence batches; see the module docstring."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, sync=False,
                 process_group=None):
        super().__init__()
        self.num_features = checked_int(num_features, "MaskedBatchNorm num_features", 1)
        self.eps = eps  # (checked as they are assigned: __setattr__)
        self.momentum = momentum
        self.sync = sync
        self.process_group = process_group
        self.name = "MaskedBatchNorm"
        register_affine(self, self.num_features, affine)
        self.register_buffer("running_mean", torch.zeros(self.num_features))
        self.register_buffer("running_var", torch.ones(self.num_features))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))
        self._checks = DeferredFiniteCheck()

    def __setattr__(self, name, value):
        if name == "eps":
            value = checked_eps(value, "MaskedBatchNorm")
        elif name == "momentum":  # (None, torch's cumulative average, is not implemented)
            value = checked_float(value, "MaskedBatchNorm momentum", lambda v: 0 < v <= 1,
                                  "a number in (0, 1]")
        super().__setattr__(name, value)

    def forward(self, x, padding_mask=None):
        check_input(x, self.num_features, self.name)
        T, B, C = x.shape
        cd = compute_dtype(x)
        xc = x.reshape(T * B, C).to(cd)
        if not self.training:
            y = batch_norm_map(xc, self.weight, self.bias, self.running_mean.to(cd),
                               self.running_var.to(cd), self.eps)
            return y.to(x.dtype).view(T, B, C)
        deferred = defers_checks(x)
        if deferred and self._checks.failed():
            raise FloatingPointError(self._not_finite("of its previous training call "))
        mask = token_mask(padding_mask, T, B, x.device, cd, self.name)
        group = distributed_world(self.sync, self.process_group)
        if mask.weights is None and group is None and mask.count > 1:
            return self._dense_call(xc, deferred).to(x.dtype).view(T, B, C)
        passes = kernels_for("auto").passes
        with torch.no_grad():
            mean, var, count, centered = token_statistics(xc, mask.weights, mask.count, group,
                                                          passes)
            if count > 0:
                unbiased = var * (count / (count - 1)) if count > 1 else var
                self._store_running(self._moved(self.running_mean, mean),
                                    self._moved(self.running_var, unbiased), deferred)
            else:  # padding only: use (and keep) the running statistics
                # (copies: saved for the backward, they must not change with the buffers)
                mean = self.running_mean.to(cd, copy=True)
                var = self.running_var.to(cd, copy=True)
        y = MaskedBatchNormFunction.apply(xc, self.weight, self.bias, mean, var, centered,
                                          mask.weights, (mask.count, count), group, self.eps,
                                          passes)
        return y.to(x.dtype).view(T, B, C)

    def _dense_call(self, xc, deferred):
        """A training call where every row is a token, without synchronization: the same
        equations as torch's batch norm, whose fused kernels then run it (one pass each way
        after the statistics) and update copies of the running statistics."""
        cd = xc.dtype
        new_mean = self.running_mean.to(cd, copy=True)
        new_var = self.running_var.to(cd, copy=True)
        weight = self.weight.to(cd) if self.weight is not None else None
        bias = self.bias.to(cd) if self.bias is not None else None
        y = torch.batch_norm(xc, weight, bias, new_mean, new_var, True, self.momentum, self.eps,
                             torch.backends.cudnn.enabled)
        self._store_running(new_mean, new_var, deferred)
        return y

    def _moved(self, buffer, value):
        """(1 - momentum) buffer + momentum value."""
        return torch.lerp(buffer, value.to(buffer.dtype), self.momentum)

    def _store_running(self, new_mean, new_var, deferred):
        """Take the moved running statistics where they are finite: otherwise raise (CPU), or
        keep the old ones and report at the next call (CUDA)."""
        ok = torch.isfinite(new_var.max())  # NaN propagates through max; Inf in x makes var NaN
        if not deferred and not ok:
            raise FloatingPointError(self._not_finite(""))
        for buffer, new in ((self.running_mean, new_mean), (self.running_var, new_var)):
            new = new.to(buffer.dtype)
            buffer.copy_(torch.where(ok, new, buffer) if deferred else new)
        self.num_batches_tracked.add_(ok.to(self.num_batches_tracked.dtype) if deferred else 1)
        if deferred:
            self._checks.record(ok)

    def _not_finite(self, when):
        return (f"{self.name}: the batch mean/variance {when}is not finite (the input holds NaN "
                "or Inf); its running statistics were left unchanged")

    def affine_parameters(self):
        """(scale, shift) of the inference map y = scale * x + shift."""
        return affine_map(self.weight, self.bias, self.running_mean, self.running_var, self.eps)

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.weight is not None}, sync={self.sync}")
