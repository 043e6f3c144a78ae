"""Destroy a data-parallel run's gloo process group before Python exits.

fairseq never calls ``torch.distributed.destroy_process_group()``: ``distributed_main`` returns
with the process group alive, and a CPU data-parallel run's group (gloo) is then torn down
while the interpreter shuts down. Now and then that aborts a rank after training has finished:
"terminate called without an active exception", SIGABRT, exit status 134 (the same happens in
plain torch, pytorch/pytorch#190489). A shell recipe with ``set -e`` then stops, and under
``torch.multiprocessing.spawn`` the parent raises ``ProcessExitedException`` and kills the
other ranks.

:func:`install` has such a process destroy its default process group at exit, while the
interpreter is still whole, where that group is gloo's. It covers both ways fairseq starts a
rank: a process that loaded the plugin before fairseq's ``distributed_init`` (the
``--distributed-no-spawn`` runs of the README, torchrun), and a worker that
``torch.multiprocessing.spawn`` started, which loads the plugin from fairseq's ``main`` once
its group exists. NCCL groups are left as fairseq leaves them: their teardown has rules of its
own, and torch warns about them at exit.
"""
import atexit
import functools

import torch.distributed as dist
from fairseq.distributed import utils as distributed_utils

_handler_registered = False


def destroy_gloo_group():
    """Destroy the default process group if there is one and its backend is gloo."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        dist.destroy_process_group()


def _register_exit_handler():
    global _handler_registered
    if not _handler_registered:
        _handler_registered = True
        atexit.register(destroy_gloo_group)


def install():
    """Wrap fairseq's distributed_init once (idempotent), and register the exit handler now
    where a process group already exists."""
    original = distributed_utils.distributed_init
    if not getattr(original, "_powernorm_destroys_group", False):
        @functools.wraps(original)
        def distributed_init(cfg):
            rank = original(cfg)
            _register_exit_handler()
            return rank

        distributed_init._powernorm_destroys_group = True
        distributed_utils.distributed_init = distributed_init
    if dist.is_available() and dist.is_initialized():
        _register_exit_handler()
