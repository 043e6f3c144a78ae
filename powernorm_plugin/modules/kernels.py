"""The per-element work of PowerNorm and group scaling, in two interchangeable backends.

``eager`` runs one PyTorch op per term. ``compiled`` fuses the element-wise passes and the
group scaling with ``torch.compile`` (C++/OpenMP on CPU, Triton on GPU), which saves passes
over the activations and temporaries (figures in benchmarks/README.md). The first compiled
call takes seconds (cached on disk afterwards); a machine where compilation fails (no C++
compiler, say) falls back to ``eager`` with a warning. Choose per layer with
``PowerNorm(backend=...)``, or for every layer with the environment variable
``POWERNORM_BACKEND=eager|compiled|auto``.

Conventions: ``z`` is (N, C); ``mask`` a :class:`TokenMask` (its ``weights`` m_n = 1 for tokens,
0 for padding); statistics are fp32 (fp64 for fp64 input) whatever the activation dtype.
"""
import logging
import os

import torch

from ._util import compute_dtype

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "compiled", "eager")


# ----- formulas that torch.compile fuses (m: the (N,) token indicator) --------------------

def _scale_shift(z, scale, shift):
    return (z.to(scale.dtype) * scale + shift).to(z.dtype)


def _affine_grad(dy, z, m, a, b):
    cd = a.dtype
    return (dy.to(cd) * a - (z.to(cd) * b) * m[:, None]).to(dy.dtype)


def _group_scale(x, groups: int, eps: float):
    n, c = x.shape
    xv = x.to(compute_dtype(x)).view(n, groups, c // groups)
    r = torch.rsqrt((xv * xv).mean(-1, keepdim=True) + eps)
    return xv * r, r


def _group_scale_grad(dz, z, r):
    n, groups, cg = z.shape
    dzv = dz.to(z.dtype).reshape(n, groups, cg)
    q = (dzv * z).mean(-1, keepdim=True)
    return ((dzv - z * q) * r).view(n, groups * cg).to(dz.dtype)


#: Rows per chunk of :func:`column_product_sums`: about 1 MiB of fp32 products, so that each
#: chunk's product is summed while it is still in cache instead of going out to memory.
_CHUNK_ELEMENTS = 1 << 18


def column_product_sums(a, b, mask):
    """(sum_n m_n a_n b_n, sum_n a_n b_n) per column of two (N, C) tensors.

    The product is formed and reduced one cache-sized block of rows at a time (a product
    row block, then a matrix-vector product with the token indicator), so it is never
    written out in full: one read of a and b from memory instead of three passes.
    """
    n, c = a.shape
    rows = max(1, _CHUNK_ELEMENTS // max(c, 1))
    token = a.new_zeros(c)
    for start in range(0, n, rows):
        prod = a[start : start + rows] * b[start : start + rows]
        if mask.weights is None:
            token += prod.sum(0)
        else:
            token.addmv_(prod.t(), mask.weights[start : start + rows])
    if mask.pad_rows is None:
        return token, token
    return token, token + (a[mask.pad_rows] * b[mask.pad_rows]).sum(0)


class EagerKernels:
    """One PyTorch op per term; padding handled by a matrix-vector product and row indexing."""

    name = "eager"

    @staticmethod
    def sq_sums(z, mask):
        """(sum_n m_n z_n^2, sum_n z_n^2): per-feature sums of squares over tokens, all rows."""
        zc = z.to(compute_dtype(z))
        return column_product_sums(zc, zc, mask)

    @staticmethod
    def scale_shift(z, scale, shift):
        """y = scale * z + shift (per-feature scale and shift), in z's dtype."""
        return (z.to(scale.dtype) * scale).add_(shift).to(z.dtype)

    @staticmethod
    def grad_sums(dy, z, mask):
        """(sum_n m_n dy_n z_n, sum_n dy_n z_n, sum_n dy_n): the backward's reductions."""
        cd = compute_dtype(z)
        dyc = dy.to(cd)
        return (*column_product_sums(dyc, z.to(cd), mask), dyc.sum(0))

    @staticmethod
    def affine_grad(dy, z, mask, a, b):
        """dz_n = a * dy_n - m_n * b * z_n (mask None: every row takes the b term), dy's dtype."""
        cd = a.dtype
        zc = z.to(cd)
        dz = (dy.to(cd) * a).sub_(zc * b)
        if mask is not None and mask.pad_rows is not None:
            dz.index_add_(0, mask.pad_rows, zc[mask.pad_rows] * b)
        return dz.to(dy.dtype)

    @staticmethod
    def group_scale(x, groups, eps):
        """(z, r): r = 1 / sqrt(mean_{c in g} x_c^2 + eps) per token and group, z = x * r."""
        return _group_scale(x, groups, eps)

    @staticmethod
    def group_scale_grad(dz, z, r):
        """dL/dx = r * (dL/dz - z * mean_g(dL/dz * z)) for z = x * r."""
        return _group_scale_grad(dz, z, r)


class CompiledKernels(EagerKernels):
    """The element-wise passes and the group scaling fused by torch.compile.

    The per-feature column sums stay eager: a materialized product and a BLAS matrix-vector
    product beat the reduction loops torch.compile generates on CPU (measured 4-5x slower,
    single-threaded, at (4096, 512)); the element-wise kernels it generates are ~2x faster
    than eager and allocate one output instead of several temporaries.
    """

    name = "compiled"

    def __init__(self):
        compile_ = lambda f: torch.compile(f, dynamic=True)  # noqa: E731
        self._scale_shift = compile_(_scale_shift)
        self._affine_grad = compile_(_affine_grad)
        self.group_scale = compile_(_group_scale)
        self.group_scale_grad = compile_(_group_scale_grad)

    def scale_shift(self, z, scale, shift):
        return self._scale_shift(z, scale, shift)

    def affine_grad(self, dy, z, mask, a, b):
        if mask is not None and mask.weights is not None:
            m = mask.weights
        else:
            m = torch.ones(z.size(0), dtype=a.dtype, device=z.device)
        return self._affine_grad(dy, z, m, a, b)


EAGER = EagerKernels()
_compiled = None
_compile_error = None


def _compiled_kernels():
    """The compiled kernels, or None where torch.compile fails on this machine."""
    global _compiled, _compile_error
    if _compiled is None and _compile_error is None:
        kernels = CompiledKernels()
        try:  # compile and run the smallest formula once, to learn whether compiling works
            kernels.scale_shift(torch.ones(3, 4), torch.ones(4), torch.zeros(4))
            _compiled = kernels
        except Exception as err:  # noqa: BLE001  (any compiler failure means: use eager)
            _compile_error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            logger.warning("powernorm_plugin: torch.compile is unavailable here (%s); PowerNorm "
                           "uses its eager backend (slower)", _compile_error)
    return _compiled


def resolve_backend(backend):
    """Validate a backend name; ``auto`` defers to $POWERNORM_BACKEND, else to ``compiled``."""
    if backend not in BACKENDS:
        raise ValueError(f"PowerNorm backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("POWERNORM_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"POWERNORM_BACKEND must be one of {', '.join(BACKENDS)}; got {backend!r}")
    return backend


def kernels_for(backend):
    """The kernels for ``backend``: ``compiled`` raises where compiling fails, ``auto`` warns
    once and falls back to ``eager``."""
    backend = resolve_backend(backend)
    if backend == "eager":
        return EAGER
    kernels = _compiled_kernels()
    if kernels is None:
        if backend == "compiled":
            raise RuntimeError(f"PowerNorm backend='compiled': torch.compile failed ({_compile_error})")
        return EAGER
    return kernels
