"""The ``native`` PowerNorm backend: ``csrc/power_norm_cpu.cpp``, built on first use.

torch's extension builder compiles the file once per machine (about 30 s on two cores; it
needs a C++ compiler and ninja, a dependency of this package), and the library is cached in
``$TORCH_EXTENSIONS_DIR/powernorm_plugin`` (default ``~/.cache/torch_extensions``), under a
key made of the source, the compiler flags and the torch build. Later processes load it
directly, in milliseconds.

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

from .kernels import EagerKernels

logger = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "power_norm_cpu.cpp")
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


def library_path(cflags):
    """The cached library for this source, these flags and this torch build."""
    key = hashlib.sha256()
    with open(SOURCE, "rb") as f:
        key.update(f.read())
    for part in (*cflags, torch.__version__, str(torch._C._GLIBCXX_USE_CXX11_ABI), platform.machine()):
        key.update(b"\0" + part.encode())
    return os.path.join(cache_dir(), key.hexdigest()[:16], f"{NAME}.so")


def load_library():
    """Load the library (building it first if needed); returns torch.ops.powernorm_plugin."""
    cflags = ["-O3", "-fopenmp", *_isa_flags()]
    path = library_path(cflags)
    if os.path.exists(path):
        torch.ops.load_library(path)
        return torch.ops.powernorm_plugin
    from torch.utils.cpp_extension import load

    logger.info("powernorm_plugin: building PowerNorm's CPU kernels (once, about 30 s) into %s",
                os.path.dirname(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as build:
        load(name=NAME, sources=[SOURCE], extra_cflags=cflags, extra_ldflags=["-fopenmp"],
             build_directory=build, is_python_module=False, verbose=False)
        os.replace(os.path.join(build, f"{NAME}.so"), path)  # atomic: readers see all or nothing
    return torch.ops.powernorm_plugin


class NativeKernels(EagerKernels):
    """PowerNorm's forward and backward, each one pass of hand-written C++ (see kernels.py).

    The stand-alone group scaling (:class:`GroupScaling`) keeps the eager formulas.
    """

    name = "native"

    def __init__(self):
        self.ops = load_library()

    def forward(self, x, weights, groups, eps, scale=None, shift=None, sums=True, all_rows=True):
        y, token_sq, all_sq, r = self.ops.forward(
            x, weights, groups or 0, eps, scale, shift, sums, all_rows)
        if weights is None:
            all_sq = token_sq  # every row is a token
        return (y if scale is not None else None, token_sq if sums else None,
                all_sq if sums and all_rows else None, r if groups else None)

    def backward(self, dy, x, r, weights, groups, a=None, b=None, b_all_rows=False, sums=True,
                 token_rows=True):
        dx, token_dz, all_dz, dy_sum = self.ops.backward(
            dy, x, r, weights, groups or 0, a, b, b_all_rows, sums, token_rows)
        if not sums:
            token_dz = all_dz = dy_sum = None
        elif not token_rows:
            token_dz = None
        return dx if a is not None else None, token_dz, all_dz, dy_sum
