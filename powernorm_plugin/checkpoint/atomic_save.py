"""Atomic checkpoint copies: a process killed while fairseq copies a checkpoint leaves the old
file complete.

fairseq (0.12.x and main) writes the first checkpoint of a save atomically (to
``NAME.tmp``, then a rename), but produces every further name of the same save, usually
``checkpoint_last.pt``, with ``PathManager.copy`` — without iopath that is
``shutil.copyfile(src, dst)``, which truncates ``dst`` and rewrites it in place. A process
killed (SIGKILL, out-of-memory killer, pre-emption) during that copy leaves a truncated
``checkpoint_last.pt``, and the next ``fairseq-train`` fails to resume from it.

:func:`install` (run by ``import powernorm_plugin``) replaces ``PathManager.copy`` for local
paths by: copy to ``DST.tmp`` in the destination's directory, flush it to disk (fsync), then
``os.replace`` it onto ``DST``. ``os.replace`` within one directory is atomic on POSIX and
Windows, so ``DST`` is always either the complete old file or the complete new one. A copy
killed midway leaves at most a stale ``DST.tmp``, which the next copy overwrites. Paths that
need iopath (remote storage) keep fairseq's behaviour.
"""
import os
import shutil
import tempfile

import torch
from fairseq.file_io import PathManager

_ORIGINAL = {}


def atomic_copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
    """Copy ``src_path`` to ``dst_path`` so that ``dst_path`` is never seen half-written.

    Returns True (fairseq asserts on the result). With ``overwrite=False`` an existing
    destination is left alone and False is returned, as iopath does.
    """
    if not overwrite and os.path.exists(dst_path):
        return False
    tmp_path = dst_path + ".tmp"
    try:
        shutil.copyfile(src_path, tmp_path)
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dst_path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(dst_path)))
    return True


def save_atomically(state, output: str) -> None:
    """``torch.save(state)`` to a temporary file in ``output``'s folder, flushed to disk, then
    renamed onto ``output``: ``output`` is never seen half-written (the plugin's tools write
    their checkpoints so)."""
    folder = os.path.dirname(os.path.abspath(output))
    descriptor, temporary = tempfile.mkstemp(
        dir=folder, prefix=f".{os.path.basename(output)}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp makes the file readable by its owner only: give it the permissions a plain
        # open() would have
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, output)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    _fsync_dir(folder)


def _fsync_dir(path):
    """Make a rename durable across a power loss (POSIX); a no-op where directories can't be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
    if PathManager.path_requires_pathmanager(src_path) or PathManager.path_requires_pathmanager(dst_path):
        return _ORIGINAL["copy"](src_path, dst_path, overwrite=overwrite)
    return atomic_copy(src_path, dst_path, overwrite=overwrite)


def install():
    """Make fairseq's ``PathManager.copy`` atomic for local paths (idempotent)."""
    if "copy" not in _ORIGINAL:
        _ORIGINAL["copy"] = PathManager.copy
        PathManager.copy = staticmethod(_copy)


def uninstall():
    """Restore fairseq's own ``PathManager.copy``."""
    if "copy" in _ORIGINAL:
        PathManager.copy = staticmethod(_ORIGINAL.pop("copy"))
