"""The package: --user-dir discovery, registration with fairseq, use without fairseq."""
import os
import subprocess
import sys

import pytest

from conftest import REPO


def run_python(code, **kw):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, **kw)


def test_user_dir_command_prints_the_package_folder():
    out = subprocess.run([sys.executable, "-m", "powernorm_plugin", "--user-dir"],
                         capture_output=True, text=True, check=True)
    path = out.stdout.strip()
    assert os.path.basename(path) == "powernorm_plugin"
    assert os.path.isfile(os.path.join(path, "__init__.py"))


def _setup_keyword(name):
    """The literal value of keyword ``name`` in setup.py's setup() call."""
    import ast

    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        setup_call = next(node for node in ast.walk(ast.parse(f.read()))
                          if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    return ast.literal_eval(next(k.value for k in setup_call.keywords if k.arg == name))


def test_console_script_prints_the_package_folder(capsys):
    # what the installed `powernorm-user-dir` runs: the entry point's function, called
    # without arguments
    import importlib

    import powernorm_plugin

    (script,) = _setup_keyword("entry_points")["console_scripts"]
    name, target = (part.strip() for part in script.split("="))
    module, function = target.split(":")
    assert name == "powernorm-user-dir"
    assert getattr(importlib.import_module(module), function)() in (0, None)
    assert capsys.readouterr().out.strip() == powernorm_plugin.USER_DIR


@pytest.mark.slow
def test_fairseq_user_dir_registers_architectures_and_optimizers(user_dir):
    code = f"""
import argparse
from fairseq import utils
utils.import_user_module(argparse.Namespace(user_dir={user_dir!r}))
from fairseq.models import ARCH_MODEL_REGISTRY
from fairseq.optim import OPTIMIZER_REGISTRY
for arch in ["powernorm_transformer_iwslt_de_en", "powernorm_transformer_wmt_en_de",
             "powernorm_transformer_vaswani_wmt_en_de_big", "powernorm_transformer_wmt_en_de_big_t2t",
             "powernorm_transformer_lm", "powernorm_transformer_lm_wiki103", "powernorm_transformer_lm_ptb"]:
    assert arch in ARCH_MODEL_REGISTRY, arch
assert "nap_adam" in OPTIMIZER_REGISTRY and "nap_sgd" in OPTIMIZER_REGISTRY
print("ok")
"""
    out = run_python(code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_modules_work_without_fairseq():
    code = """
import sys
sys.modules["fairseq"] = None  # as if fairseq were not installed
import torch, powernorm_plugin
from powernorm_plugin.modules import PowerNorm
assert powernorm_plugin.HAVE_FAIRSEQ is False
assert "powernorm_plugin.models" not in sys.modules
y = PowerNorm(4, backend="eager")(torch.randn(3, 2, 4))
assert y.shape == (3, 2, 4)
print("ok")
"""
    out = run_python(code)
    assert out.returncode == 0, out.stderr[-3000:]


def test_importing_the_layers_leaves_the_root_logger_as_it_was():
    # some of fairseq's modules call logging.basicConfig(level=DEBUG) when imported
    code = """
import logging
import powernorm_plugin
from powernorm_plugin.modules import PowerNorm
from fairseq.models import ARCH_MODEL_REGISTRY
root = logging.getLogger()
assert powernorm_plugin.HAVE_FAIRSEQ and "powernorm_transformer_lm" in ARCH_MODEL_REGISTRY
assert (root.level, root.handlers) == (logging.WARNING, []), (root.level, root.handlers)
print("ok")
"""
    out = run_python(code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok" and out.stderr == "", out.stderr[-3000:]
    # warnings logged during the import still reach stderr, as without any configuration
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    out = run_python(code, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.startswith("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set"), out.stderr[-3000:]


def test_installed_package_carries_every_source_the_native_library_builds_from():
    # a non-editable install builds the native library from the installed csrc/ folder
    import fnmatch

    from powernorm_plugin.modules import native_kernels

    patterns = _setup_keyword("package_data")["powernorm_plugin.modules"]
    modules_dir = os.path.dirname(native_kernels.__file__)
    for path in native_kernels.SOURCES + native_kernels.HEADERS + [native_kernels.CUDA_SOURCE]:
        assert os.path.isfile(path), path
        relative = os.path.relpath(path, modules_dir)
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), relative
