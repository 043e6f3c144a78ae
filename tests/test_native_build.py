"""The native kernels: built once into the cache, then loaded without rebuilding."""
import os
import subprocess
import sys

import pytest

from conftest import REPO

LOAD = """
import logging, torch
logging.basicConfig(level=logging.INFO, format="%(message)s")
from powernorm_plugin.modules import PowerNorm
pn = PowerNorm(8, group_num=2, backend="native")
x = torch.randn(4, 3, 8, requires_grad=True)
pn(x).sum().backward()
print("ok", bool(torch.isfinite(x.grad).all()))
"""


def load_in_fresh_process(cache):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(cache), PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok True" in proc.stdout
    return proc.stderr


@pytest.mark.slow
def test_native_kernels_build_once_into_the_cache_and_leave_no_lock(tmp_path):
    first = load_in_fresh_process(tmp_path)
    assert "building PowerNorm's kernels" in first
    libraries = list((tmp_path / "powernorm_plugin").glob("*/*"))
    assert [p.name for p in libraries] == ["powernorm_plugin_cpu.so"]  # no build folder or lock left
    second = load_in_fresh_process(tmp_path)
    assert "building" not in second


def test_cache_key_names_the_gpu_architectures(monkeypatch):
    # a library built with CUDA kernels for one GPU must never be handed to another
    from powernorm_plugin.modules import native_kernels

    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    flags = ["-O3"]
    cpu, hopper = native_kernels.library_path(flags), native_kernels.library_path(flags, "sm_90")
    assert len({cpu, hopper, native_kernels.library_path(flags, "sm_80+sm_90")}) == 3
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")  # torch's builder then compiles for these
    assert native_kernels.library_path(flags) == cpu
    assert native_kernels.library_path(flags, "sm_90") != hopper
