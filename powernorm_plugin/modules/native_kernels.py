"""The ``native`` PowerNorm backend: the C++ sources in ``csrc/``, built on first use.

The library holds PowerNorm's training step as one C++ autograd function
(``power_norm_step.cpp``), the one-sweep CPU passes and the CPU's fused step
(``power_norm_cpu.cpp``, ``power_norm_cpu_step.cpp``) and, where a CUDA device and CUDA's
compiler are present, the CUDA kernels of the GPU's fused step (``power_norm_cuda.cu``,
compiled for the visible GPU). Without those, a step on a GPU runs as PowerNorm's Python step.

torch's extension builder compiles it once per machine (about a minute on two cores for the
CPU sources; it needs a C++ compiler and ninja, a dependency of this package), and the library
is cached in ``$TORCH_EXTENSIONS_DIR/powernorm_plugin`` (default ``~/.cache/torch_extensions``),
under a key made of the sources, the compiler flags, the torch build and the GPU target.
Later processes load it directly, in milliseconds.

Each build runs in a folder of its own and the finished library is renamed into the cache,
so processes that start together (data-parallel ranks) never wait on a lock that a killed
process left behind; at worst two of them build the same file. The library is compiled for
the vector instructions torch detected on this CPU (AVX2 or none), and that choice is part
of the key, so a cache shared by different machines never hands one code it cannot run.
"""
import hashlib
import logging
import os
import platform
import tempfile

import torch

from ._util import compute_dtype
from .kernels import EagerKernels

logger = logging.getLogger(__name__)

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
SOURCES = [os.path.join(CSRC, name)
           for name in ("power_norm_cpu.cpp", "power_norm_cpu_step.cpp", "power_norm_step.cpp")]
CUDA_SOURCE = os.path.join(CSRC, "power_norm_cuda.cu")
HEADERS = [os.path.join(CSRC, name)
           for name in ("power_norm_cpu.h", "power_norm_columns.h", "power_norm_fused.h")]
NAME = "powernorm_plugin_cpu"


def _isa_flags():
    """Compiler flags for the vector instructions this CPU supports."""
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine() in ("x86_64", "AMD64") and capability in ("AVX2", "AVX512"):
        return ["-mavx2", "-mfma"]
    return []


def cache_dir():
    """Where built libraries are kept: $TORCH_EXTENSIONS_DIR/powernorm_plugin, or the default
    torch extensions folder under ~/.cache."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch_extensions")
    return os.path.join(root, "powernorm_plugin")


def cuda_target():
    """The GPU architectures to build the fused CUDA kernels for ("sm_90", "sm_80+sm_90"),
    those of the visible devices (as torch's builder compiles for), or None: without a CUDA
    build of torch, a device or CUDA's compiler the library is built for the CPU only (a step
    on a GPU then runs as PowerNorm's Python step)."""
    if torch.version.cuda is None or not torch.cuda.is_available():
        return None
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return None
    capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return "+".join(f"sm_{major}{minor}" for major, minor in sorted(capabilities))


def library_path(cflags, cuda=None):
    """The cached library for these sources, these flags, this torch build and GPU target."""
    key = hashlib.sha256()
    for source in SOURCES + HEADERS + ([CUDA_SOURCE] if cuda else []):
        with open(source, "rb") as f:
            key.update(f.read())
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if cuda else ""  # overrides cuda
    for part in (*cflags, torch.__version__, str(torch._C._GLIBCXX_USE_CXX11_ABI),
                 platform.machine(), cuda or "cpu", arch_list):
        key.update(b"\0" + part.encode())
    return os.path.join(cache_dir(), key.hexdigest()[:16], f"{NAME}.so")


def load_library():
    """Load the library (building it first if needed); returns torch.ops.powernorm_plugin.

    Where the CUDA kernels fail to build, says so once and builds the library without them.
    """
    cuda = cuda_target()
    ops = None
    if cuda is not None:
        try:
            ops = _load(cuda)
        except Exception as err:  # noqa: BLE001  (any build failure: the CPU-only library)
            text = str(err).strip().splitlines()
            logger.warning("powernorm_plugin: PowerNorm's CUDA kernels did not build (%s); on "
                           "the GPU its native backend runs the slower Python step",
                           text[-1] if text else err)
    if ops is None:
        ops = _load(None)
    _register_fake_kernels()
    return ops


_fake_kernels = []


def _register_fake_kernels():
    """The shapes and dtypes of the pass operators' results, for torch.compile's tracer (which
    runs operators on tensors without data): what ``forward`` and ``backward`` in
    ``csrc/power_norm_cpu.cpp`` return, an empty vector for each result a call does not ask
    for. Once per process."""
    # (register_fake: torch 2.4 and later; impl_abstract before)
    register = getattr(torch.library, "register_fake", None) or getattr(
        torch.library, "impl_abstract", None)
    if _fake_kernels or register is None:
        return
    _fake_kernels.append(True)

    def per_feature(x, wanted):
        return x.new_empty((x.shape[-1] if wanted else 0,), dtype=compute_dtype(x))

    @register("powernorm_plugin::forward")
    def _forward(x, mask, groups, eps, scale, shift, sums, all_rows):
        y = torch.empty_like(x) if scale is not None else x.new_empty((0,))
        rows = x.numel() // x.shape[-1] if groups else 0
        r = x.new_empty((rows, groups), dtype=compute_dtype(x))
        return [y, per_feature(x, sums), per_feature(x, sums and mask is not None and all_rows),
                r]

    @register("powernorm_plugin::backward")
    def _backward(dy, x, r, mask, groups, a, b, b_all_rows, sums, token_rows):
        dx = torch.empty_like(x) if a is not None else x.new_empty((0,))
        return [dx, per_feature(x, sums and token_rows and mask is not None),
                per_feature(x, sums), per_feature(x, sums)]


def _load(cuda):
    # -fno-math-errno: sqrt need not set errno for a negative argument, so that loops with a
    # square root vectorize (the results are the same: both are IEEE square roots)
    cflags = ["-O3", "-fno-math-errno", "-fopenmp", *_isa_flags()]
    path = library_path(cflags, cuda)
    if os.path.exists(path):
        torch.ops.load_library(path)
        return torch.ops.powernorm_plugin
    from torch.utils.cpp_extension import load

    logger.info("powernorm_plugin: building PowerNorm's kernels (once, about a minute%s) into %s",
                ", longer with CUDA's" if cuda else "", os.path.dirname(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sources = SOURCES + ([CUDA_SOURCE] if cuda else [])
    cuda_flags = ["-O3"] if cuda else None  # torch adds the -gencode of the visible GPU
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as build:
        load(name=NAME, sources=sources, extra_cflags=cflags, extra_cuda_cflags=cuda_flags,
             extra_ldflags=["-fopenmp"], build_directory=build, is_python_module=False,
             verbose=False)
        os.replace(os.path.join(build, f"{NAME}.so"), path)  # atomic: readers see all or nothing
    return torch.ops.powernorm_plugin


class NativeKernels(EagerKernels):
    """PowerNorm's training step as one C++ autograd function (``csrc/power_norm_step.cpp``)
    on hand-written kernels: on the CPU one-sweep passes (see kernels.py), on a GPU the CUDA
    kernels where the library has them.

    Its passes are also PowerNorm's Python step's, which runs the calls the C++ step declines
    and synchronized statistics (whose all-reduce stays in Python); off the CPU those passes
    are the eager formulas. The stand-alone group scaling (:class:`GroupScaling`) keeps the
    eager formulas.
    """

    name = "native"
    fused = True  # False: every call runs as the Python step (a switch for the tests)

    def __init__(self):
        self.ops = load_library()
        # Each operator's one overload, bound once: a call through the operator's name looks
        # its overload up again every time (about 4 us here, on every training call).
        self._train_step = self.ops.train_step.default
        self._forward = self.ops.forward.default
        self._backward = self.ops.backward.default

    @property
    def train_step(self):
        """The operator torch.ops.powernorm_plugin.train_step (see the C++ file), which returns
        (y, ok), ok None where psi_B^2 is known finite on the host, else a 0-d bool (False on
        the CPU, the device's flag on a GPU); or (None, None) where the C++ step does not take
        the call (nothing was done). None with ``fused`` off."""
        return self._train_step if self.fused else None

    @staticmethod
    def step_settings(mode_index, groups, eps, alpha_fwd, alpha_bkw):
        """train_step's ``settings``: the layer's (mode, groups, eps, alpha_fwd, alpha_bkw) as
        one float64 CPU vector, made once per layer configuration (mode_index: 0 paper,
        1 official, 2 vanilla)."""
        return torch.tensor([mode_index, groups or 0, eps, alpha_fwd, alpha_bkw],
                            dtype=torch.float64, device="cpu")  # (whatever the default device)

    def forward(self, x, weights, groups, eps, scale=None, shift=None, sums=True, all_rows=True):
        if x.device.type != "cpu":
            return super().forward(x, weights, groups, eps, scale, shift, sums, all_rows)
        y, token_sq, all_sq, r = self._forward(
            x, weights, groups or 0, eps, scale, shift, sums, all_rows)
        if weights is None:
            all_sq = token_sq  # every row is a token
        return (y if scale is not None else None, token_sq if sums else None,
                all_sq if sums and all_rows else None, r if groups else None)

    def backward(self, dy, x, r, weights, groups, a=None, b=None, b_all_rows=False, sums=True,
                 token_rows=True):
        if x.device.type != "cpu":
            return super().backward(dy, x, r, weights, groups, a, b, b_all_rows, sums, token_rows)
        dx, token_dz, all_dz, dy_sum = self._backward(
            dy, x, r, weights, groups or 0, a, b, b_all_rows, sums, token_rows)
        if not sums:
            token_dz = all_dz = dy_sum = None
        elif not token_rows:
            token_dz = None
        elif weights is None:
            token_dz = all_dz  # every row is a token
        return dx if a is not None else None, token_dz, all_dz, dy_sum
