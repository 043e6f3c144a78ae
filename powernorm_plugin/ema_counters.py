"""fairseq's trainer-level EMA (``--store-ema``) on models with integer buffers.

fairseq's EMA decays every entry of the model's state_dict (ema = d ema + (1 - d) param), and
fails on the integer step counters of PowerNorm (``num_steps``) and BatchNorm
(``num_batches_tracked``): "result type Float can't be cast to the desired output type Long".
A counter has no average: :func:`install` makes the EMA copy the integer entries (its
``skip_keys``), as torch's ``AveragedModel`` does with the buffers it does not average. The
floating buffers, psi^2, nu and BatchNorm's mean and variance, are averaged as the weights
are.
"""
import functools

import torch
from fairseq.models.ema.ema import EMA


def install():
    """Wrap fairseq's EMA.__init__ once (idempotent)."""
    original = EMA.__init__
    if getattr(original, "_powernorm_copies_counters", False):
        return

    @functools.wraps(original)
    def __init__(self, model, *args, **kwargs):
        original(self, model, *args, **kwargs)
        counters = {key for key, value in model.state_dict().items()
                    if torch.is_tensor(value) and not value.is_floating_point()}
        self.skip_keys = set(self.skip_keys) | counters

    __init__._powernorm_copies_counters = True
    EMA.__init__ = __init__
