"""The per-element work of PowerNorm (with its optional group scaling), in three backends.

Every backend implements the same two passes over a (N, C) input ``x`` (rows = positions),
with the optional per-token group RMS scaling folded in:

    r_{n,g} = 1 / sqrt(mean_{c in g} x_{n,c}^2 + eps),   z = x * r     (no groups: z = x)

    forward(x, weights, groups, eps, scale, shift, sums, all_rows)
        -> (y = scale * z + shift,  sum_n m_n z_n^2,  sum_n z_n^2,  r)
    backward(dy, x, r, weights, groups, a, b, b_all_rows, sums, token_rows)
        -> (dx,  sum_n m_n dy_n z_n,  sum_n dy_n z_n,  sum_n dy_n)
        where dz_n = a * dy_n - w_n * b * z_n   (w_n = m_n; 1 for every row with b_all_rows)
              dx_n = r_n (dz_n - z_n mean_g(dz_n z_n))   (no groups: dx = dz)

``y``/``dx`` are skipped (None) when ``scale``/``a`` is None, the sums when ``sums`` is false;
a caller that needs no all-row sum of z^2 (``all_rows=False``), or no token sum of dy z
(``token_rows=False``), lets a backend skip it (it may return None there).
m_n is ``weights`` (1 for tokens, 0 for padding; None: every row is a token); statistics are
fp32 (fp64 for fp64 input) whatever the activation dtype. Callers that know ``scale``/``a`` before the sums get
everything from one pass; where the scale depends on the sums (warm-up, PN-V) they call twice.

* ``native``: PowerNorm's whole training step as one C++ autograd function
  (``csrc/power_norm_step.cpp``). Its passes are hand-written: on the CPU
  (``csrc/power_norm_cpu.cpp``) one read of the activations and one write per pass, like
  LayerNorm's fused kernel; on a GPU (``csrc/power_norm_cuda.cu``, where CUDA's compiler is
  installed) one rows kernel and one small kernel for the statistics per direction. Built on
  first use with torch's extension builder (needs a C++ compiler and ninja), then cached
  (see native_kernels.py). Its passes are also what the Python step below calls with
  synchronized statistics.
* ``compiled``: each pass, and PowerNorm's whole training step around it (statistics and
  running buffers), compiled by ``torch.compile`` (Triton on GPU, C++ on CPU).
* ``eager``: one PyTorch op per term; runs everywhere.

``auto`` (the default) takes ``native`` on every device and falls back (``compiled``, then
``eager``), with one warning, where building fails. ``$POWERNORM_BACKEND`` overrides ``auto``
for every layer. Figures in benchmarks/README.md.
"""
import logging
import os

import torch

from ._util import compute_dtype

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "native", "compiled", "eager")


# ----- formulas that torch.compile fuses ---------------------------------------------------

def _scale_shift(z, scale, shift, dtype: torch.dtype):
    return (z.to(scale.dtype) * scale + shift).to(dtype)


def _scaled_input(x, r):
    n, groups = r.shape
    return (x.to(r.dtype).view(n, groups, -1) * r[..., None]).view(x.shape)


def _group_scale(x, groups: int, eps: float):
    n, c = x.shape
    xv = x.to(compute_dtype(x)).view(n, groups, c // groups)
    r = torch.rsqrt((xv * xv).mean(-1, keepdim=True) + eps)
    return (xv * r).view(n, c), r.view(n, groups)


def _group_scale_grad(dz, z, r):
    """dL/dx for z = x * r (z, dz: (N, C); r: (N, groups)), in dz's dtype."""
    n, groups = r.shape
    zv = z.view(n, groups, -1)
    dzv = dz.to(z.dtype).reshape(n, groups, -1)
    q = (dzv * zv).mean(-1, keepdim=True)
    return ((dzv - zv * q) * r[..., None]).view(n, -1).to(dz.dtype)


def _forward_pass(x, w, groups: int, eps: float, scale, shift, sums: bool, all_rows: bool):
    """The forward of the module docstring as one graph (``w``: token weights, None = all)."""
    if groups:
        z, r = _group_scale(x, groups, eps)
    else:
        z, r = x.to(compute_dtype(x)), None
    y = _scale_shift(z, scale, shift, x.dtype) if scale is not None else None
    token_sq = all_sq = None
    if sums:
        sq = z * z
        if w is None:
            token_sq = all_sq = sq.sum(0)
        else:
            token_sq = (sq * w[:, None]).sum(0)
            all_sq = sq.sum(0) if all_rows else None
    return y, token_sq, all_sq, r


def _backward_pass(dy, x, r, w, a, b, b_all_rows: bool, sums: bool, token_rows: bool):
    """The backward of the module docstring as one graph (``w``: token weights, None = all)."""
    z = x.to(compute_dtype(x)) if r is None else _scaled_input(x, r)
    dyc = dy.to(z.dtype)
    token_dz = all_dz = dy_sum = None
    if sums:
        prod = dyc * z
        all_dz = prod.sum(0)
        if w is None:
            token_dz = all_dz
        elif token_rows:
            token_dz = (prod * w[:, None]).sum(0)
        dy_sum = dyc.sum(0)
    dx = None
    if a is not None:
        zb = z * b
        dz = dyc * a - (zb if w is None or b_all_rows else zb * w[:, None])
        dx = (dz if r is None else _group_scale_grad(dz, z, r)).to(dy.dtype)
    return dx, token_dz, all_dz, dy_sum


#: Rows per chunk of :func:`column_product_sums`: about 1 MiB of fp32 products, so that each
#: chunk's product is summed while it is still in cache instead of going out to memory.
_CHUNK_ELEMENTS = 1 << 18


def pad_rows(weights):
    """Indices of the padding rows (weight 0)."""
    return (weights == 0).nonzero().squeeze(1)


def column_product_sums(a, b, weights, all_rows=True):
    """(sum_n m_n a_n b_n, sum_n a_n b_n) per column of two (N, C) tensors; with
    ``all_rows=False`` the second may be None.

    The product is formed and reduced one cache-sized block of rows at a time (a product row
    block, then a matrix-vector product with the token indicator), so it is never written
    out in full: one read of a and b from memory instead of three passes.
    """
    n, c = a.shape
    rows = max(1, _CHUNK_ELEMENTS // max(c, 1))
    token = a.new_zeros(c)
    for start in range(0, n, rows):
        prod = a[start : start + rows] * b[start : start + rows]
        if weights is None:
            token += prod.sum(0)
        else:
            token.addmv_(prod.t(), weights[start : start + rows])
    if weights is None:
        return token, token
    if not all_rows:
        return token, None
    pad = pad_rows(weights)
    return token, token + (a[pad] * b[pad]).sum(0)


class EagerKernels:
    """One PyTorch op per term. On the CPU the column sums go by cache-sized blocks of rows
    and padding is handled by row indexing; elsewhere finding those rows would wait for the
    device, and every op is a kernel launch, so the passes are the plain formulas of
    :class:`TracedPasses`."""

    name = "eager"
    compiles_steps = False  # PowerNorm runs its training step around these passes eagerly
    train_step = None  # no training step of its own: PowerNorm's Python step calls the passes

    @property
    def passes(self):
        return self

    def forward(self, x, weights, groups, eps, scale=None, shift=None, sums=True, all_rows=True):
        if x.device.type != "cpu":
            return TRACED.forward(x, weights, groups, eps, scale, shift, sums, all_rows)
        z, r = self.group_scale(x, groups, eps) if groups else (x.to(compute_dtype(x)), None)
        token_sq = all_sq = None
        if sums:
            token_sq, all_sq = column_product_sums(z, z, weights, all_rows)
        y = self.scale_shift(z, scale, shift, x.dtype) if scale is not None else None
        return y, token_sq, all_sq, r

    def backward(self, dy, x, r, weights, groups, a=None, b=None, b_all_rows=False, sums=True,
                 token_rows=True):
        if x.device.type != "cpu":
            return TRACED.backward(dy, x, r, weights, groups, a, b, b_all_rows, sums, token_rows)
        z = self.scaled_input(x, r) if groups else x.to(compute_dtype(x))
        token_dz = all_dz = dy_sum = None
        if sums:
            dyc = dy.to(z.dtype)
            token_dz, all_dz = column_product_sums(dyc, z, weights)
            dy_sum = dyc.sum(0)
        dx = None
        if a is not None:
            dx = self.input_grad(dy, z, None if b_all_rows else weights, a, b, r, dy.dtype)
        return dx, token_dz, all_dz, dy_sum

    @staticmethod
    def scale_shift(z, scale, shift, dtype):
        """y = scale * z + shift (per-feature scale and shift), in ``dtype``."""
        return (z.to(scale.dtype) * scale).add_(shift).to(dtype)

    @staticmethod
    def input_grad(dy, z, weights, a, b, r, dtype):
        """dz_n = a * dy_n - m_n * b * z_n (weights None: every row takes the b term), then
        through the group scaling when r is given; in ``dtype``."""
        dz = (dy.to(a.dtype) * a).sub_(z * b)
        if weights is not None:  # padding rows: a * dy alone (adding z * b back would cancel)
            pad = pad_rows(weights)
            dz.index_copy_(0, pad, dy.index_select(0, pad).to(a.dtype) * a)
        return (dz if r is None else _group_scale_grad(dz, z, r)).to(dtype)

    @staticmethod
    def scaled_input(x, r):
        """z = x * r, the group-scaled input, from x and its saved factors r (N, groups)."""
        return _scaled_input(x, r)

    @staticmethod
    def group_scale(x, groups, eps):
        """(z, r): r = 1 / sqrt(mean_{c in g} x_c^2 + eps) per token and group, z = x * r."""
        return _group_scale(x, groups, eps)

    @staticmethod
    def group_scale_grad(dz, z, r):
        """dL/dx = r * (dL/dz - z * mean_g(dL/dz * z)) for z = x * r."""
        return _group_scale_grad(dz, z, r)


class TracedPasses:
    """The two passes as plain tensor formulas (:func:`_forward_pass`, :func:`_backward_pass`),
    for torch.compile to trace into a larger graph."""

    def forward(self, x, weights, groups, eps, scale=None, shift=None, sums=True, all_rows=True):
        return _forward_pass(x, weights, groups or 0, eps, scale, shift, sums, all_rows)

    def backward(self, dy, x, r, weights, groups, a=None, b=None, b_all_rows=False, sums=True,
                 token_rows=True):
        return _backward_pass(dy, x, r, weights, a, b, b_all_rows, sums, token_rows)


TRACED = TracedPasses()


class CompiledKernels(EagerKernels):
    """The passes traced into PowerNorm's compiled training step, and the stand-alone group
    scaling compiled by torch.compile.

    PowerNorm compiles its whole training step around the passes (``compiles_steps``): on
    a GPU every eager op is a kernel launch and a few microseconds of host time, so the
    step's few dozen small ops become a few fused kernels. (On the CPU this backend is only
    the fallback where the native kernels cannot be built.)
    """

    name = "compiled"
    compiles_steps = True
    passes = TRACED

    def __init__(self):
        compile_ = lambda f: torch.compile(f, dynamic=True)  # noqa: E731
        self.scale_shift = compile_(_scale_shift)
        self.group_scale = compile_(_group_scale)
        self.group_scale_grad = compile_(_group_scale_grad)


EAGER = EagerKernels()
_built = {}  # backend name -> kernels, or the error that made building them fail


def _build(name):
    """The kernels of backend ``name``, built once per process; None where building fails."""
    if name not in _built:
        try:
            if name == "compiled":
                kernels = CompiledKernels()
                # compile and run the smallest formula once, to learn whether compiling works
                kernels.scale_shift(torch.ones(3, 4), torch.ones(4), torch.zeros(4), torch.float32)
            else:
                from .native_kernels import NativeKernels

                kernels = NativeKernels()
            _built[name] = kernels
        except Exception as err:  # noqa: BLE001  (any build failure means: fall back)
            text = str(err).strip().splitlines()
            _built[name] = RuntimeError(f"{type(err).__name__}: {text[-1] if text else ''}")
    kernels = _built[name]
    return None if isinstance(kernels, Exception) else kernels


def resolve_backend(backend):
    """Validate a backend name; ``auto`` defers to $POWERNORM_BACKEND, else stays ``auto``."""
    if backend not in BACKENDS:
        raise ValueError(f"PowerNorm backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("POWERNORM_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"POWERNORM_BACKEND must be one of {', '.join(BACKENDS)}; got {backend!r}")
    return backend


_warned = set()
_chosen = {}  # (backend, $POWERNORM_BACKEND) -> kernels, for every layer that asks


def kernels_for(backend):
    """The kernels for ``backend`` (the same on every device).

    A named backend that cannot run raises; ``auto`` takes ``native`` and falls back
    (compiled, then eager) with one warning.
    """
    key = (backend, os.environ.get("POWERNORM_BACKEND"))
    kernels = _chosen.get(key)
    if kernels is None:
        kernels = _chosen[key] = _choose(backend)
    return kernels


def _choose(backend):
    """kernels_for, uncached (the same kernels serve every device)."""
    backend = resolve_backend(backend)
    if backend == "eager":
        return EAGER
    if backend != "auto":
        kernels = _build(backend)
        if kernels is None:
            raise RuntimeError(f"PowerNorm backend={backend!r} is unavailable here: {_built[backend]}")
        return kernels
    for name in ("native", "compiled"):
        kernels = _build(name)
        if kernels is not None:
            return kernels
        if name not in _warned:
            _warned.add(name)
            logger.warning("powernorm_plugin: PowerNorm's %s backend is unavailable here (%s); "
                           "falling back to a slower one", name, _built[name])
    return EAGER
