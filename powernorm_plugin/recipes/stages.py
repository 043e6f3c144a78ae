"""Atomic stage directories and files: a stage is either finished or absent.

A stage builds its output in ``X.tmp`` and renames it to ``X`` only when it succeeded, so
an interrupted or failed run leaves no half-written ``X`` behind, and a re-run skips every
stage whose ``X`` exists.
"""
import contextlib
import logging
import os
import shutil
from typing import Callable, Iterator

logger = logging.getLogger(__name__)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yield an empty ``path + ".tmp"`` folder to fill; rename it to ``path`` on success.

    On any exception (KeyboardInterrupt included) the ``.tmp`` folder is removed and
    ``path`` is left untouched. ``path`` must not exist yet.
    """
    if os.path.lexists(path):
        raise FileExistsError(f"{path} exists already; remove it to rebuild this stage")
    tmp = path + ".tmp"
    _remove(tmp)  # leftovers of a run that was killed before it could clean up
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", encoding: str = "utf-8") -> Iterator:
    """Open ``path + ".tmp"`` for writing; rename it to ``path`` when the block succeeds."""
    tmp = path + ".tmp"
    kwargs = {} if "b" in mode else {"encoding": encoding}
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
    except BaseException:
        _remove(tmp)
        raise
    os.replace(tmp, path)


def run_stage(path: str, name: str, build: Callable[[str], None]) -> bool:
    """Run ``build(tmp_dir)`` as the stage that produces folder ``path``, unless ``path``
    exists already. Returns True when the stage ran, False when it was skipped."""
    if os.path.isdir(path):
        logger.info("stage %s: done already (%s), skipped", name, path)
        return False
    logger.info("stage %s: building %s", name, path)
    with atomic_dir(path) as tmp:
        build(tmp)
    logger.info("stage %s: finished", name)
    return True
