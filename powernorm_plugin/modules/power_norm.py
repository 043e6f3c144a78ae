"""Power Normalization (Shen et al., ICML 2020, Algorithm 2), for (T, B, C) sequence batches.

Per feature c, over the N non-padding tokens z_i of a training batch:

    forward   psi_B^2 = mean_i z_i^2
              zhat    = z / sqrt(psi_{t-1}^2 + eps)
              y       = gamma * zhat + beta
              psi_t^2 = a_f psi_{t-1}^2 + (1 - a_f) psi_B^2
    backward  g       = gamma * dL/dy
              dL/dz   = (g - nu_{t-1} zhat) / sqrt(psi_{t-1}^2 + eps)
              Gamma_t = mean_i zhat_i^2,    Lambda_t = mean_i g_i zhat_i
              nu_t    = nu_{t-1} (1 - (1 - a_b) Gamma_t) + (1 - a_b) Lambda_t
    inference y       = gamma * z / sqrt(psi^2 + eps) + beta

where z is the input, or the input after per-token group RMS scaling when ``group_num`` is set.
Padding rows take the same affine map in the forward but are outside the batch: they add
nothing to psi_B, Gamma or Lambda, and receive no nu correction in the backward.

Modes:

* ``paper``: the equations above. During warm-up the forward and backward use the batch's
  own psi_B in place of psi_{t-1}, and psi^2 is the cumulative mean of the psi_B seen so far.
* ``official``: the authors' released code: the backward divides by the batch's psi_B, Gamma
  and Lambda average over every position (padding included), and during warm-up psi^2 gets
  the cumulative mean and then the EMA update as well.
* ``vanilla`` (PN-V): y = gamma * z / sqrt(psi_B^2 + eps) + beta with the exact gradient
  through psi_B; psi^2 is still tracked for inference, nu is unused.
"""
import math
import types
import warnings
from typing import NamedTuple

import torch
from torch import nn
from torch.autograd import forward_ad
from torch.autograd.function import once_differentiable

from ._util import (
    FP32BuffersMixin,
    all_reduce_sum,
    check_input,
    checked_eps,
    checked_float,
    checked_int,
    compute_dtype,
    distributed_world,
    register_affine,
    token_mask,
)
from .group_scaling import check_groups, traceable_group_rms_scale
from .host_mirrors import DeferredFiniteCheck, StepCounter, defers_checks
from .kernels import kernels_for, resolve_backend

MODES = ("paper", "official", "vanilla")  # in the order of the C++ step's Mode


class PowerNormConfig(NamedTuple):
    """The hyper-parameters one training call needs (see :class:`PowerNorm`)."""

    mode: str
    eps: float
    alpha_fwd: float
    alpha_bkw: float
    warmup_updates: int
    groups: object  # None, or the number of channel groups of the RMS pre-scaling
    sync: bool
    process_group: object
    causal: bool
    name: str
    kernels: object
    train_step: object  # the kernels' C++ training step (an operator), or None
    settings: object  # with train_step: its settings tensor (NativeKernels.step_settings)
    steps: object  # the layer's StepCounter (num_steps on the host)
    checks: object  # the layer's DeferredFiniteCheck (CUDA)


class _ConfigSlot:
    """A layer's PowerNormConfig, kept between training calls (building it costs several
    microseconds of host time per call) and dropped when a setting it holds changes.
    Copies and pickles of the layer get an empty slot: a config refers to its own layer's
    step counter and finite check."""

    __slots__ = ("cfg",)

    def __init__(self):
        self.cfg = None

    def __reduce__(self):
        return type(self), ()


def check_causal(mode, causal):
    """Refuse PN-V in a causal layer (a decoder's): it normalizes by the current batch."""
    if causal and mode == "vanilla":
        raise ValueError(
            "PowerNorm mode='vanilla' normalizes by the current batch's statistic, so a "
            "position would see later tokens; it cannot be causal (use mode='paper')"
        )


def _checked_mode(layer, mode):
    if mode not in MODES:
        raise ValueError(f"PowerNorm mode must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def _checked_rate(name):
    return lambda layer, value: checked_float(value, f"PowerNorm {name}", lambda v: 0 <= v < 1,
                                              "a number in [0, 1)")


#: PowerNorm's settings that are checked (and normalized) whenever they are assigned.
_CHECKED = {
    "mode": _checked_mode,
    "eps": lambda layer, value: checked_eps(value, "PowerNorm"),
    "alpha_fwd": _checked_rate("alpha_fwd"),
    "alpha_bkw": _checked_rate("alpha_bkw"),
    "warmup_updates": lambda layer, value: checked_int(value, "PowerNorm warmup_updates", 0),
    "group_num": lambda layer, value: check_groups(layer.num_features, value),
}

#: PowerNorm's attributes that a PowerNormConfig is built from.
_SETTINGS = frozenset(("mode", "eps", "alpha_fwd", "alpha_bkw", "warmup_updates", "group_num",
                       "sync", "process_group", "causal", "name", "backend", "_steps",
                       "_checks"))


class PowerNormFunction(torch.autograd.Function):
    """Training-mode PowerNorm on 2-D input ``x`` (rows = T*B positions, columns = features),
    as the compiled and eager backends run it, every backend with synchronized statistics
    (``group``: the process group, or None), and the native backend where its C++ step
    (:func:`_native_step`, the same arithmetic) has no fused kernels for the call.

    ``cfg.groups`` applies the per-token group RMS scaling to ``x`` first (z = x * r); the
    scaling is part of the same passes, so only ``x`` and the small ``r`` are saved.
    Updates ``running_phi`` (psi^2) and ``num_steps`` in the forward and ``running_nu`` (nu)
    in the backward, in place, as torch's batch norm updates its running statistics.
    With ``cfg.sync`` the token sums are all-reduced over the process group (forward: sums of
    z^2 and token counts; backward: the sums behind Lambda), as SyncBatchNorm does.
    Where the normalizer is known before the batch is read (psi_{t-1}, after warm-up) each
    direction is one pass over the activations; warm-up and PN-V need a second pass.

    The arithmetic of each direction is one function of tensors (:func:`_forward_math`,
    :func:`_backward_math`) that the ``compiled`` backend compiles whole. On a CUDA device
    nothing waits for the device: the step counter is mirrored on the host, and a
    non-finite psi_B^2 is kept out of the running statistics on the device and reported
    (FloatingPointError) at the layer's next training call.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_phi, running_nu, num_steps, mask, cfg, group):
        k = cfg.kernels
        deferred = defers_checks(x)
        step, warm, use_batch = _call_plan(cfg, num_steps, deferred)
        y, w, inv, r, count, rows, new_phi, ok, saved = _step_math(_forward_math, cfg, group)(
            k.passes, x, mask.weights, mask.count, mask.rows, weight, bias, running_phi, step,
            warm, use_batch, cfg.mode, cfg.eps, cfg.alpha_fwd, cfg.groups, group)
        if new_phi is not None:
            if deferred:
                cfg.checks.record(ok)
            elif not ok:
                raise FloatingPointError(_not_finite(cfg.name, ""))
            running_phi.copy_(new_phi)
            cfg.steps.add(num_steps, ok if deferred else 1)

        ctx.cfg, ctx.weights, ctx.group, ctx.count, ctx.rows = cfg, mask.weights, group, count, rows
        ctx.running_nu = running_nu
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.has_r = r is not None
        ctx.save_for_backward(x, w, inv, *([r] if r is not None else []), *saved)
        return y

    @staticmethod
    @once_differentiable  # the paper's backward has no derivative of its own
    def backward(ctx, dy):
        cfg, k = ctx.cfg, ctx.cfg.kernels
        x, w, inv, *saved = ctx.saved_tensors  # (raises where the graph was freed)
        if getattr(ctx, "applied", False) and cfg.mode != "vanilla":
            warnings.warn(_second_backward(cfg.name))
        ctx.applied = True
        r = saved.pop(0) if ctx.has_r else None
        dx, grad_w, grad_b, new_nu = _step_math(_backward_math, cfg, ctx.group)(
            k.passes, dy.contiguous(), x, r, ctx.weights, ctx.count, ctx.rows, w, inv,
            ctx.running_nu, tuple(saved), cfg.mode, cfg.groups, cfg.alpha_bkw, ctx.group)
        if new_nu is not None:
            ctx.running_nu.copy_(new_nu)
        grad_w = _as(grad_w, ctx.weight_dtype) if ctx.weight_dtype is not None else None
        grad_b = _as(grad_b, ctx.bias_dtype) if ctx.bias_dtype is not None else None
        return dx, grad_w, grad_b, None, None, None, None, None, None


def _call_plan(cfg, num_steps, deferred):
    """(step, warm, use_batch) of a training call: its 1-based step where warm-up needs it
    (else None), whether it is a warm-up call, and whether it normalizes by the batch's own
    psi_B. First raises the non-finite psi_B^2 of the previous call where that was deferred."""
    if deferred and cfg.checks.failed():
        cfg.steps.forget()
        raise FloatingPointError(_not_finite(cfg.name, "of its previous training call "))
    step = cfg.steps.value(num_steps) + 1 if cfg.warmup_updates else None
    warm = step is not None and step <= cfg.warmup_updates
    use_batch = (cfg.mode == "vanilla" or warm) and not cfg.causal
    return step, warm, use_batch


def _native_step(x, weight, bias, running_phi, running_nu, num_steps, mask, cfg):
    """A training call on the (T, B, C) ``x`` as the C++ autograd function of the native
    backend (``csrc/power_norm_step.cpp``: the arithmetic of :func:`_forward_math` and
    :func:`_backward_math`, buffer updates included); y, or None where the C++ step does not
    take the call (no fused kernels for it), which then runs as :class:`PowerNormFunction`."""
    deferred = defers_checks(x)
    step, warm, use_batch = _call_plan(cfg, num_steps, deferred)
    version = num_steps._version
    y, ok = cfg.train_step(x, weight, bias, running_phi, running_nu, num_steps, mask.weights,
                           mask.count, step or 0, warm, use_batch, cfg.settings)
    if y is None:
        return None
    if ok is not None:  # (None: psi_B^2 known finite, or no tokens)
        if deferred:
            cfg.checks.record(ok)
        elif not ok:  # the step left psi^2 and num_steps as they were
            cfg.steps.forget()
            raise FloatingPointError(_not_finite(cfg.name, ""))
    if cfg.warmup_updates:  # only warm-up reads the mirror (an outdated one reads the buffer)
        cfg.steps.moved(num_steps, version)
    return y


def _forward_math(passes, x, weights, count, rows, weight, bias, phi, step, warm, use_batch,
                  mode, eps, alpha_fwd, groups, group):
    """The forward of one training call, without side effects.

    Returns (y, gamma, inv, r, count, rows, new psi^2, ok, saved): ``inv`` the 1/sqrt(psi + eps)
    that y was normalized by, ``count``/``rows`` over the process group, the new psi^2 and
    ``ok`` (psi_B^2 finite; where not, the new psi^2 is the old) None for a batch without
    tokens, and ``saved`` what the mode's backward needs besides x, gamma, inv and r.
    """
    cd = compute_dtype(x)
    C = x.size(1)
    w = _as(weight, cd) if weight is not None else torch.ones(C, dtype=cd, device=x.device)
    b = _as(bias, cd) if bias is not None else torch.zeros(C, dtype=cd, device=x.device)
    all_rows = mode == "official"  # Gamma over every row: the all-row sum of z^2
    y = None
    if use_batch:  # the scale needs this batch's psi_B: sums first, output second
        _, token_sq, all_sq, r = passes.forward(x, weights, groups, eps, all_rows=all_rows)
    else:  # psi_{t-1}: running_phi before this step's update
        inv = torch.rsqrt(_as(phi, cd) + eps)
        y, token_sq, all_sq, r = passes.forward(x, weights, groups, eps, w * inv, b,
                                                all_rows=all_rows)
    count, rows, token_sq, all_sq = _synchronized(token_sq, all_sq, count, rows, group, mode)
    new_phi = ok = None
    saved = ()
    if count > 0:
        psi_b = token_sq / count
        ok = torch.isfinite(psi_b.max())  # max() propagates NaN
        new_phi = _new_running_phi(phi, torch.where(ok, psi_b, phi), step, warm, mode, alpha_fwd)
        if mode == "paper":
            saved = (psi_b,)
        elif mode == "official":
            saved = (all_sq, torch.rsqrt(psi_b + eps))
    if y is None:  # a batch of padding only has no psi_B: it takes psi_{t-1} (unchanged)
        inv = torch.rsqrt((psi_b if count > 0 else _as(phi, cd)) + eps)
        y = passes.forward(x, weights, groups, eps, w * inv, b, sums=False)[0]
    return y, w, inv, r, count, rows, new_phi, ok, saved


def _backward_math(passes, dy, x, r, weights, count, rows, w, inv, nu, saved, mode, groups,
                   alpha_bkw, group):
    """The backward of one training call, without side effects.

    Returns (dx, dL/dgamma, dL/dbeta, new nu); the new nu is None where nu does not move.
    """
    # Every mode: dx = the input gradient of dz = a * dy - b * z, the b term on token rows
    # only (official: all rows), with the sums over token rows and over all rows of
    # dy * z (gamma's gradient takes all) and of dy (beta's gradient).
    token_rows = mode == "paper"  # Lambda over tokens: the token sum of dy z

    def grad(a, b_coef, b_all_rows=False, sums=True):
        return passes.backward(dy, x, r, weights, groups, a, b_coef, b_all_rows, sums, token_rows)

    a = w * inv
    new_nu = None
    if count == 0:
        dx, token_dz, all_dz, dy_sum = grad(a, torch.zeros_like(a))
    elif mode == "vanilla":
        # exact gradient through psi_B: b = gamma inv^3 (1/N) sum_n dy_n z_n, so the
        # sums come first and the input gradient second
        _, token_dz, all_dz, dy_sum = passes.backward(dy, x, r, weights, groups, token_rows=False)
        total = all_reduce_sum(all_dz, group, copy=True)
        dx = grad(a, w * inv.pow(3) * total / count, sums=False)[0]
    else:
        nu = _as(nu, inv.dtype)
        if mode == "paper":
            (psi_b,) = saved
            inv_sq = inv * inv
            dx, token_dz, all_dz, dy_sum = grad(a, nu * inv_sq)
            gamma_t = inv_sq * psi_b  # mean_tokens zhat^2
            lambda_t = a * all_reduce_sum(token_dz, group, copy=True) / count
        else:  # official: divided by the batch psi_B; Gamma, Lambda over every row
            all_sq, inv_b = saved
            dx, token_dz, all_dz, dy_sum = grad(w * inv_b, nu * inv * inv_b, b_all_rows=True)
            gamma_t = inv * inv * all_sq / rows
            lambda_t = a * all_reduce_sum(all_dz, group, copy=True) / rows
        new_nu = _new_running_nu(nu, gamma_t, lambda_t, alpha_bkw)
    return dx, all_dz * inv, dy_sum, new_nu


_compiled = {}


def _step_math(fn, cfg, group):
    """``fn`` as the layer's backend runs it: compiled for the ``compiled`` backend (except
    with a process group, whose all-reduce stays outside any graph), else as it is."""
    return _compiled_math(fn, cfg) if cfg.kernels.compiles_steps and group is None else fn


def _compiled_math(fn, cfg):
    """``fn`` compiled by torch.compile for the layer configuration ``cfg``.

    torch.compile keeps its graphs, and counts its recompilations (at most 8 by default),
    per code object; each configuration (mode, groups, eps, rates) therefore gets a copy of
    ``fn`` with a code object of its own, so that a process with several configurations
    never runs out. Sizes start static and become dynamic where they change (the default
    ``dynamic=None``): the token count and the row count change from batch to batch, the
    feature and group sizes of a layer never do, and kernels with those sizes fixed are
    faster (4-8x on CPU with groups).
    """
    key = (fn, cfg.mode, cfg.groups, cfg.eps, cfg.alpha_fwd, cfg.alpha_bkw)
    if key not in _compiled:
        copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                                  fn.__defaults__, fn.__closure__)
        _compiled[key] = torch.compile(copy)
    return _compiled[key]


def _transformed():
    """Whether forward-mode AD or a torch.func transform is active, which the native C++ step
    (no forward derivative, no batching rule) cannot serve: the Python step then raises
    torch's own error instead of a tangent silently left out."""
    return forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()


def _compiling():
    """Whether torch.compile is tracing this call (False on a torch without torch.compiler)."""
    compiler = getattr(torch, "compiler", None)
    return compiler is not None and compiler.is_compiling()


_eager_native_step = []


def _native_step_under_compile():
    """:func:`_native_step` for a model that torch.compile is tracing: its C++ operator
    computes on real tensors, so the tracer must stop in front of it (a graph break) and let
    it run eagerly. Wrapped on first use, since importing the compiler takes seconds."""
    if not _eager_native_step:
        _eager_native_step.append(torch.compiler.disable(_native_step))
    return _eager_native_step[0]


def _not_finite(name, when):
    return (f"{name}: the batch statistic psi_B^2 {when}is not finite (the input holds NaN or "
            "Inf, or z^2 overflowed); its running statistics were left unchanged")


def _second_backward(name):
    # The paper's backward subtracts nu * x_hat from the incoming gradient and moves nu, so a
    # second pass does both again (PN-V's exact gradient has no such term).
    return (f"{name}: a second backward pass through one training call (retain_graph=True). "
            "Its running nu moves again, and in the paper's and the authors' modes the "
            "gradients of separate backward passes do not add up to those of their summed loss: "
            "sum the losses and call backward() once")


def _as(tensor, dtype):
    """``tensor`` in ``dtype``; without the cost of a ``.to`` call where it already is."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _synchronized(token_sq, all_sq, count, rows, group, mode):
    """(token count, row count, token sum of z^2, all-row sum of z^2) over the process group.

    One all-reduce carries the token sum and the token count and, for the official mode,
    the all-row sum and the row count. Without a group they are returned as they are.
    """
    if group is None:
        return count, rows, token_sq, all_sq
    C = token_sq.numel()
    parts = [token_sq, token_sq.new_tensor([count])]
    if mode == "official":
        parts += [all_sq, token_sq.new_tensor([rows])]
    stats = all_reduce_sum(torch.cat(parts), group)
    rows = float(stats[2 * C + 1]) if mode == "official" else None
    return float(stats[C]), rows, stats[:C], stats[C + 1 : 2 * C + 1]


def _new_running_phi(phi, psi_b, step, warm, mode, alpha_fwd):
    """psi^2 moved to the cumulative mean of psi_B^2 during warm-up, by a_f psi^2 + (1 - a_f)
    psi_B^2 after; the official mode applies the EMA during warm-up as well, after the mean.

    Both are linear interpolations: the mean moves 1/step of the way to psi_B^2.
    """
    psi_b = _as(psi_b, phi.dtype)
    if warm:
        phi = torch.lerp(phi, psi_b, 1.0 / step)
    if not warm or mode == "official":
        phi = torch.lerp(phi, psi_b, 1.0 - alpha_fwd)
    return phi


def _new_running_nu(nu, gamma_t, lambda_t, alpha_bkw):
    """nu (1 - (1 - a_b) Gamma) + (1 - a_b) Lambda, or nu where that is not finite.

    Computed as nu + (1 - a_b) (Lambda - nu Gamma). Non-finite gradients are expected under
    fp16 loss scaling (fairseq then skips the step and lowers the scale): they must not
    poison nu, and checking needs no host sync.
    """
    new = torch.add(nu, torch.addcmul(lambda_t, nu, gamma_t, value=-1.0), alpha=1.0 - alpha_bkw)
    return torch.where(new.abs() < math.inf, new, nu)  # False for NaN and for +-Inf


class PowerNorm(FP32BuffersMixin, nn.Module):
    """PowerNorm over the feature dimension of a (T, B, C) batch, padding-aware.

    Args:
        num_features: C.
        eps: added to psi^2 (and to the group mean square) before the square root.
        alpha_fwd, alpha_bkw: a_f and a_b, the EMA rates of psi^2 and nu.
        warmup_updates: training calls during which the forward uses the batch's own psi_B.
        group_num: if set, per-token RMS scaling over that many channel groups comes first.
        mode: ``"paper"``, ``"official"`` or ``"vanilla"`` (see the module docstring).
        affine: learn gamma (init 1) and beta (init 0).
        sync: all-reduce the batch statistics over ``process_group`` (default: WORLD) when
            torch.distributed is initialized with more than one process.
        causal: never let an output depend on the current batch's statistics, so a decoder
            position cannot see later tokens: warm-up normalizes by the running statistic of
            earlier steps (psi^2 still gets the cumulative mean), and ``mode="vanilla"`` is
            refused.
        backend: ``"auto"`` (``$POWERNORM_BACKEND``, else ``native``, falling back where it
            cannot be built), ``"native"`` (the training step in C++ with hand-written CPU
            and CUDA kernels), ``"compiled"`` (fused by torch.compile) or ``"eager"``; see
            ``kernels.py``. The kernels are chosen at the layer's first training call.

    Buffers (all saved in ``state_dict``): ``running_phi`` (psi^2, starts at 1),
    ``running_nu`` (nu, starts at 0), ``num_steps`` (training calls that saw tokens).
    """

    def __init__(self, num_features, eps=1e-5, alpha_fwd=0.9, alpha_bkw=0.9, warmup_updates=0,
                 group_num=None, mode="paper", affine=True, sync=False, process_group=None,
                 causal=False, backend="auto"):
        super().__init__()
        self.num_features = checked_int(num_features, "PowerNorm num_features", 1)
        # (each setting is checked as it is assigned: __setattr__)
        self.eps = eps
        self.alpha_fwd = alpha_fwd
        self.alpha_bkw = alpha_bkw
        self.warmup_updates = warmup_updates
        self.group_num = group_num
        self.mode = mode
        self.sync = sync
        self.process_group = process_group
        self.causal = causal
        check_causal(mode, causal)
        self.backend = backend
        resolve_backend(backend)
        self.name = "PowerNorm"  # architectures set the module path for error messages
        register_affine(self, self.num_features, affine)
        self.register_buffer("running_phi", torch.ones(self.num_features))
        self.register_buffer("running_nu", torch.zeros(self.num_features))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self._steps = StepCounter()
        self._checks = DeferredFiniteCheck()
        self._config = _ConfigSlot()

    def forward(self, x, padding_mask=None):
        check_input(x, self.num_features, self.name)
        T, B, C = x.shape
        if not self.training:
            z = x.reshape(T * B, C)
            # Inference is a per-feature affine map (after the group scaling): tensor operators
            # only, which torch.jit.trace and torch.export can record.
            if self.group_num is not None:
                z = traceable_group_rms_scale(z, self.group_num, self.eps)
            return self.eval_affine(z).view(T, B, C)
        compiling = _compiling()
        if not compiling and torch._C._current_graph_task_id() != -1:
            raise RuntimeError(self._recomputed())
        mask = token_mask(padding_mask, T, B, x.device, compute_dtype(x), self.name)
        cfg = self._config.cfg or self._configure()
        tensors = self._tensors()
        group = distributed_world(cfg.sync, cfg.process_group)
        if cfg.train_step is not None and group is None and (compiling or not _transformed()):
            step = _native_step_under_compile() if compiling else _native_step
            y = step(x.contiguous(), *tensors, mask, cfg)
            if y is not None:
                return y
        y = PowerNormFunction.apply(x.reshape(T * B, C).contiguous(), *tensors, mask, cfg, group)
        return y.view(T, B, C)

    def _recomputed(self):
        return (
            f"{self.name}: a training call during a backward pass, as activation checkpointing "
            "makes when it recomputes a forward. It would move the running statistics a second "
            "time and (paper and official modes) normalize by the moved psi, giving wrong "
            "gradients: keep PowerNorm outside the checkpointed functions"
        )

    def __setattr__(self, name, value):
        if name in _CHECKED:
            value = _CHECKED[name](self, value)
        super().__setattr__(name, value)
        if name in _SETTINGS and "_config" in self.__dict__:
            self._config.cfg = None

    def _configure(self):
        """The PowerNormConfig of this layer's training calls, built at its first call and
        after any change of a setting; the backend (``auto``: ``$POWERNORM_BACKEND``) is
        chosen then."""
        check_causal(self.mode, self.causal)  # (two settings, which may change one by one)
        kernels = kernels_for(self.backend)
        step = kernels.train_step
        settings = None if step is None else kernels.step_settings(
            MODES.index(self.mode), self.group_num, self.eps, self.alpha_fwd, self.alpha_bkw)
        self._config.cfg = PowerNormConfig(
            self.mode, self.eps, self.alpha_fwd, self.alpha_bkw, self.warmup_updates,
            self.group_num, self.sync, self.process_group, self.causal, self.name,
            kernels, step, settings, self._steps, self._checks)
        return self._config.cfg

    def _tensors(self):
        """(weight, bias, running_phi, running_nu, num_steps), as a call reads them.

        Read from the module's own dicts: ``self.weight`` on an nn.Module first fails the
        ordinary attribute lookup, raising an AttributeError, before nn.Module.__getattr__
        finds it, which costs about 1.5 us per name on every call. A weight that is no longer
        in ``_parameters`` (a parametrization, weight norm) is read as an attribute.
        """
        params, buffers = self._parameters, self._buffers
        weight = params["weight"] if "weight" in params else self.weight
        bias = params["bias"] if "bias" in params else self.bias
        return weight, bias, buffers["running_phi"], buffers["running_nu"], buffers["num_steps"]

    def eval_affine(self, z):
        """Inference: y = gamma * z / sqrt(psi^2 + eps) + beta, differentiable by autograd."""
        scale, shift = self.affine_parameters()
        return torch.addcmul(shift.to(z.dtype), z, scale.to(z.dtype))

    def affine_parameters(self):
        """(scale, shift) of the inference map y = scale * z + shift, in fp32 or wider."""
        weight, bias, running_phi = self._tensors()[:3]
        inv = torch.rsqrt(running_phi + self.eps)
        scale = inv * weight.to(inv.dtype) if weight is not None else inv
        shift = bias.to(inv.dtype) if bias is not None else torch.zeros_like(inv)
        return scale, shift

    def extra_repr(self):
        return (
            f"{self.num_features}, mode={self.mode}, eps={self.eps}, alpha_fwd={self.alpha_fwd}, "
            f"alpha_bkw={self.alpha_bkw}, warmup_updates={self.warmup_updates}, "
            f"group_num={self.group_num}, affine={self.weight is not None}, sync={self.sync}, "
            f"causal={self.causal}"
        )
