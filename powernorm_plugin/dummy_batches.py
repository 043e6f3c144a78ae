"""Keep fairseq's dummy batches out of the normalization statistics.

When the ranks of a data-parallel run hold different numbers of batches, a rank that has run
out trains on a copy of an earlier batch with its loss multiplied by 0 (``ignore_grad``), so
that it still joins the gradient all-reduce. Its gradients vanish, but the copy would still
move a PowerNorm's or BatchNorm's running statistics (and PowerNorm's backward would pull nu
towards 0): the statistics would depend on how the batches fell on the ranks, and a resumed
run, whose copy is another batch, would not continue as the uninterrupted one.

:func:`install` runs every ignored batch of ``FairseqTask.train_step`` inside
:func:`powernorm_plugin.modules.ignored_batch`, where the layers take it as padding only. (A
task that overrides ``train_step`` without calling it keeps fairseq's behaviour.)
"""
import functools

from fairseq.tasks.fairseq_task import FairseqTask

from .modules import ignored_batch

_IGNORE_GRAD = 5  # train_step(sample, model, criterion, optimizer, update_num, ignore_grad)


def install():
    """Wrap FairseqTask.train_step once (idempotent)."""
    original = FairseqTask.train_step
    if getattr(original, "_powernorm_ignored_batches", False):
        return

    @functools.wraps(original)
    def train_step(self, *args, **kwargs):
        ignored = args[_IGNORE_GRAD] if len(args) > _IGNORE_GRAD else kwargs.get("ignore_grad")
        if not ignored:
            return original(self, *args, **kwargs)
        with ignored_batch():
            return original(self, *args, **kwargs)

    train_step._powernorm_ignored_batches = True
    FairseqTask.train_step = train_step
