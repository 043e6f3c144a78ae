"""The plugin's hooks into fairseq's trainer: dummy batches and the trainer-level EMA.

(Their use in a real two-rank fairseq-train run, resumed: test_data_parallel.py.)
"""
import pytest
import torch
from torch import nn

import powernorm_plugin  # noqa: F401  (installs the hooks)
from powernorm_plugin.modules import MaskedBatchNorm, PowerNorm, ignored_batch

fairseq = pytest.importorskip("fairseq")
from fairseq.models.ema import EMA  # noqa: E402
from fairseq.dataclass.configs import EMAConfig  # noqa: E402
from fairseq.tasks.fairseq_task import FairseqTask  # noqa: E402

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
