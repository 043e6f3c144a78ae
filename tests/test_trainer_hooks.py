"""The plugin's hooks into fairseq's trainer: dummy batches, the trainer-level EMA, and the
process group's teardown at exit.

(Their use in a real two-rank fairseq-train run, resumed: test_data_parallel.py.)
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import powernorm_plugin  # noqa: F401  (installs the hooks)
from powernorm_plugin.modules import MaskedBatchNorm, PowerNorm, ignored_batch

fairseq = pytest.importorskip("fairseq")
from fairseq.models.ema import EMA  # noqa: E402
from fairseq.dataclass.configs import EMAConfig  # noqa: E402
from fairseq.tasks.fairseq_task import FairseqTask  # noqa: E402

from conftest import REPO  # noqa: E402

T, B, C = 5, 3, 8


class TwoNorms(nn.Module):
    """What train_step needs of a model: a forward, and set_num_updates."""

    def __init__(self, sync=False):
        super().__init__()
        self.power = PowerNorm(C, warmup_updates=1, sync=sync)
        self.batch = MaskedBatchNorm(C, sync=sync)

    def set_num_updates(self, num_updates):
        pass

    def forward(self, x, pad):
        return self.batch(self.power(x, pad), pad)


def criterion(model, sample):
    y = model(*sample)
    return (y * y).sum(), 1, {}


class Backward:
    def backward(self, loss):
        loss.backward()


def batch(seed):
    gen = torch.Generator().manual_seed(seed)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, 3:] = True
    return torch.randn(T, B, C, generator=gen).requires_grad_(True), pad


def statistics(model):
    return {name: buffer.clone() for name, buffer in model.named_buffers()}


@pytest.mark.parametrize("positional", [False, True])
def test_dummy_batch_moves_no_statistic(positional):
    # fairseq's trainer marks a data-parallel rank's dummy batch with ignore_grad=True
    model = TwoNorms()
    FairseqTask.train_step(None, batch(0), model, criterion, Backward(), 1)
    before = statistics(model)
    model.zero_grad()
    args = (batch(1), model, criterion, Backward(), 2)
    if positional:
        FairseqTask.train_step(None, *args, True)
    else:
        FairseqTask.train_step(None, *args, ignore_grad=True)
    for name, value in statistics(model).items():
        assert torch.equal(value, before[name]), name
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters() if p.grad is not None)
    FairseqTask.train_step(None, batch(2), model, criterion, Backward(), 3)
    moved = [k for k, v in statistics(model).items() if not torch.equal(v, before[k])]
    assert sorted(moved) == sorted(before), "a real batch after it moves every statistic again"


def test_ignored_batch_takes_every_row_as_padding():
    x, pad = batch(3)
    a, b = PowerNorm(C, mode="vanilla"), PowerNorm(C, mode="vanilla")
    with ignored_batch():
        y = a(x, pad)
    torch.testing.assert_close(y, b(x, torch.ones_like(pad)))
    assert int(a.num_steps) == 0
    a(x, pad)
    assert int(a.num_steps) == 1  # the context ended


@pytest.mark.parametrize("fp32", [False, True])
def test_trainer_ema_copies_step_counters_and_averages_statistics(fp32):
    # fairseq's EMA decayed every state entry, and failed on the int64 step counters
    model = TwoNorms()
    ema = EMA(model, EMAConfig(store_ema=True, ema_decay=0.75, ema_fp32=fp32))
    old = model.state_dict()
    old = {k: v.clone() for k, v in old.items()}
    for seed in range(3):
        criterion(model, batch(seed))[0].backward()
    ema.step(model)
    averaged = ema.get_model().state_dict()
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            want = 0.75 * old[name] + 0.25 * value
            torch.testing.assert_close(averaged[name].to(want.dtype), want)
        else:
            assert int(averaged[name]) == int(value) == 3, name


# A process that reports at exit whether its process group was still alive. Its handler is
# registered before the plugin's, so it runs after it (atexit runs handlers last in, first out).
EXIT_REPORT = """
import atexit, sys
import torch.distributed as dist
atexit.register(lambda: open(sys.argv[1], "w").write(
    "alive" if dist.is_initialized() else "destroyed"))
store = "file://" + sys.argv[2]
"""


def _exit_state(tmp_path, code):
    script = EXIT_REPORT + textwrap.dedent(code)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    report = tmp_path / "report"
    run = subprocess.run([sys.executable, "-c", script, str(report), str(tmp_path / "store")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    return report.read_text()


def test_gloo_group_made_before_the_plugin_loads_is_destroyed_at_exit(tmp_path):
    # a worker of torch.multiprocessing.spawn: fairseq's main loads the plugin after
    # distributed_init. A gloo group left alive at exit sometimes aborted the rank
    # ("terminate called without an active exception").
    assert _exit_state(tmp_path, """
        dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
        import powernorm_plugin
    """) == "destroyed"


def test_gloo_group_from_fairseq_distributed_init_is_destroyed_at_exit(tmp_path):
    # a --distributed-no-spawn rank: the plugin is loaded first, then fairseq makes the group
    assert _exit_state(tmp_path, """
        import powernorm_plugin
        from fairseq.dataclass.configs import FairseqConfig
        from fairseq.distributed import utils
        cfg = FairseqConfig()
        cfg.common.cpu = True
        d = cfg.distributed_training
        d.distributed_world_size, d.distributed_rank = 1, 0
        d.distributed_backend, d.distributed_init_method = "gloo", store
        assert utils.distributed_init(cfg) == 0 and dist.is_initialized()
    """) == "destroyed"


def test_process_group_destroyed_by_the_user_is_left_alone(tmp_path):
    # what can fail here is _exit_state's stderr check: a handler that destroyed the group
    # again would print "Exception ignored in atexit callback" and a traceback
    assert _exit_state(tmp_path, """
        import powernorm_plugin
        dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
        powernorm_plugin.process_group_exit.install()
        dist.destroy_process_group()
    """) == "destroyed"
