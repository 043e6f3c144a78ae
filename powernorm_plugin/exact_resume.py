"""Make ``fairseq-train`` resume onto exactly the batches an uninterrupted run would see.

fairseq builds the batches of a reusable epoch iterator once, when the iterator is created,
seeded with ``seed + epoch`` of that moment, and then only reshuffles their order each epoch.
An uninterrupted run creates its iterator in epoch 1, so it trains on epoch-1 batches for the
whole run; a run resumed in epoch E creates it in epoch E and trains on differently composed
batches, so "N updates, stop, resume, N more" silently differs from "2N updates".

:func:`install` wraps ``FairseqTask.get_batch_iterator`` so that a reusable iterator is always
built from epoch-1 batches and then placed at the requested epoch: the batches of an
uninterrupted run, whatever epoch training starts in. With ``--update-ordered-indices-seed``
the trainer's seed is ``seed + epoch``, so the iterator is built with epoch 1's seed too
(``Trainer.get_train_iterator`` is wrapped to say when that flag is on). Iterators that
fairseq rebuilds each epoch (``rebuild_batches``, sharded data, no reuse) are left as they
are.

``--lr-scheduler reduce_lr_on_plateau`` saves only the best loss and the last epoch, not
how many epochs in a row have not improved on it nor the cool-down left, so a resumed run
reduced the learning rate epochs later than an uninterrupted one: both counts are saved too.
"""
import contextvars
import functools

from fairseq.tasks.fairseq_task import FairseqTask
from fairseq.trainer import Trainer

#: Whether the trainer building an iterator now seeds it with ``seed + epoch``.
_EPOCH_IN_SEED = contextvars.ContextVar("powernorm_epoch_in_seed", default=False)


def _reusable(task, dataset, kwargs):
    return (
        not kwargs.get("disable_iterator_cache", False)
        and not kwargs.get("update_epoch_batch_itr", False)
        and not getattr(task.cfg, "rebuild_batches", False)
        and task.can_reuse_epoch_itr(dataset)
    )


def install():
    """Wrap FairseqTask.get_batch_iterator and Trainer.get_train_iterator once (idempotent)."""
    original = FairseqTask.get_batch_iterator
    if getattr(original, "_powernorm_exact_resume", False):
        return

    @functools.wraps(original)
    def get_batch_iterator(self, dataset, *args, epoch=1, **kwargs):
        if epoch > 1 and _reusable(self, dataset, kwargs) and dataset not in self.dataset_to_epoch_iter:
            if _EPOCH_IN_SEED.get() and "seed" in kwargs:
                kwargs["seed"] -= epoch - 1
            itr = original(self, dataset, *args, epoch=1, **kwargs)
            dataset.set_epoch(epoch)
            itr.epoch = epoch
            return itr
        return original(self, dataset, *args, epoch=epoch, **kwargs)

    get_batch_iterator._powernorm_exact_resume = True
    FairseqTask.get_batch_iterator = get_batch_iterator

    get_train_iterator = Trainer.get_train_iterator

    @functools.wraps(get_train_iterator)
    def train_iterator(self, *args, **kwargs):
        epoch_in_seed = getattr(self.cfg.dataset, "update_ordered_indices_seed", False)
        token = _EPOCH_IN_SEED.set(bool(epoch_in_seed))
        try:
            return get_train_iterator(self, *args, **kwargs)
        finally:
            _EPOCH_IN_SEED.reset(token)

    Trainer.get_train_iterator = train_iterator
    _save_plateau_counts()


def _save_plateau_counts():
    """Add torch's ``num_bad_epochs`` and ``cooldown_counter`` to the state of fairseq's
    reduce_lr_on_plateau scheduler (a checkpoint without them loads as before)."""
    from fairseq.optim.lr_scheduler.reduce_lr_on_plateau import ReduceLROnPlateauLRSchedule

    state_dict, load_state_dict = (ReduceLROnPlateauLRSchedule.state_dict,
                                   ReduceLROnPlateauLRSchedule.load_state_dict)

    @functools.wraps(state_dict)
    def with_counts(self):
        state = state_dict(self)
        state["num_bad_epochs"] = self.lr_scheduler.num_bad_epochs
        state["cooldown_counter"] = self.lr_scheduler.cooldown_counter
        return state

    @functools.wraps(load_state_dict)
    def load_with_counts(self, state):
        load_state_dict(self, state)
        for name in ("num_bad_epochs", "cooldown_counter"):
            if name in state:
                setattr(self.lr_scheduler, name, state[name])

    ReduceLROnPlateauLRSchedule.state_dict = with_counts
    ReduceLROnPlateauLRSchedule.load_state_dict = load_with_counts
