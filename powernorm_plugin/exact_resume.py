"""Make ``fairseq-train`` resume onto exactly the batches an uninterrupted run would see.

fairseq builds the batches of a reusable epoch iterator once, when the iterator is created,
seeded with ``seed + epoch`` of that moment, and then only reshuffles their order each epoch.
An uninterrupted run creates its iterator in epoch 1, so it trains on epoch-1 batches for the
whole run; a run resumed in epoch E creates it in epoch E and trains on differently composed
batches, so "N updates, stop, resume, N more" silently differs from "2N updates".

:func:`install` wraps ``FairseqTask.get_batch_iterator`` so that a reusable iterator is always
built from epoch-1 batches and then placed at the requested epoch: the batches of an
uninterrupted run, whatever epoch training starts in. Iterators that fairseq rebuilds each
epoch (``rebuild_batches``, sharded data, no reuse) are left as they are.
"""
import functools

from fairseq.tasks.fairseq_task import FairseqTask


def _reusable(task, dataset, kwargs):
    return (
        not kwargs.get("disable_iterator_cache", False)
        and not kwargs.get("update_epoch_batch_itr", False)
        and not getattr(task.cfg, "rebuild_batches", False)
        and task.can_reuse_epoch_itr(dataset)
    )


def install():
    """Wrap FairseqTask.get_batch_iterator once (idempotent)."""
    original = FairseqTask.get_batch_iterator
    if getattr(original, "_powernorm_exact_resume", False):
        return

    @functools.wraps(original)
    def get_batch_iterator(self, dataset, *args, epoch=1, **kwargs):
        if epoch > 1 and _reusable(self, dataset, kwargs) and dataset not in self.dataset_to_epoch_iter:
            itr = original(self, dataset, *args, epoch=1, **kwargs)
            dataset.set_epoch(epoch)
            itr.epoch = epoch
            return itr
        return original(self, dataset, *args, epoch=epoch, **kwargs)

    get_batch_iterator._powernorm_exact_resume = True
    FairseqTask.get_batch_iterator = get_batch_iterator
