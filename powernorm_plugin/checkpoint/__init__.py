"""Checkpoint tools: weights-only loading of fairseq checkpoints, and checkpoint averaging.

Importing this package (which ``import powernorm_plugin`` and ``--user-dir`` do) runs
:func:`safe_load.install`: fairseq checkpoints then load on torch >= 2.6 with
``weights_only=True`` and no ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``, and a checkpoint holding
any other pickled object is refused with :class:`UnsafeCheckpointError` before it runs.
It also runs :func:`atomic_save.install`: the checkpoint copies fairseq makes (usually
``checkpoint_last.pt``) are written to a temporary file and renamed, so a killed process never
leaves a truncated checkpoint.
"""
from . import atomic_save
from .average import StateDictAverager, average_state_dicts
from .safe_load import UnsafeCheckpointError, check_checkpoint, install, safe_load

install()
atomic_save.install()  # checkpoint copies (checkpoint_last.pt) become atomic

__all__ = [
    "StateDictAverager",
    "UnsafeCheckpointError",
    "average_state_dicts",
    "check_checkpoint",
    "install",
    "safe_load",
]
