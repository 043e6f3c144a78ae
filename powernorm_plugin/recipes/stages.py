"""Atomic stage directories and files: a stage is either finished or absent.

A stage builds its output in ``X.tmp`` and renames it to ``X`` only when it succeeded, so
an interrupted or failed run leaves no half-written ``X`` behind, and a re-run skips every
stage whose ``X`` exists (and fails where it asks for other settings than ``X`` was built
with).
"""
import contextlib
import json
import logging
import os
import shutil
from typing import Callable, Iterator, Mapping, Optional

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


def read_json(path: str):
    """The JSON document in ``path`` (UTF-8)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str, obj) -> None:
    """Write ``obj`` to ``path`` as indented JSON, atomically (:func:`atomic_file`)."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


#: A stage's settings (option -> value), kept in its folder to be checked on a re-run.
SETTINGS = "stage_settings.json"


def run_stage(path: str, name: str, build: Callable[[str], None],
              settings: Optional[Mapping[str, object]] = None) -> bool:
    """Run ``build(tmp_dir)`` as the stage that produces folder ``path``, unless ``path``
    exists already. Returns True when the stage ran, False when it was skipped.

    ``settings`` (command-line option -> value) are stored with the stage; a re-run that asks
    for other values fails instead of skipping a stage built with the old ones.
    """
    if os.path.isdir(path):
        _check_settings(path, settings or {})
        logger.info("stage %s: done already (%s), skipped", name, path)
        return False
    logger.info("stage %s: building %s", name, path)
    with atomic_dir(path) as tmp:
        build(tmp)
        if settings:
            write_json(os.path.join(tmp, SETTINGS), dict(settings))
    logger.info("stage %s: finished", name)
    return True


def _check_settings(path: str, settings: Mapping[str, object]) -> None:
    stored_path = os.path.join(path, SETTINGS)
    if not settings or not os.path.isfile(stored_path):
        return
    stored = read_json(stored_path)
    differ = [f"{option} {stored[option]} (asked for now: {value})"
              for option, value in settings.items() if option in stored and stored[option] != value]
    if differ:
        raise ValueError(f"{path} was built with {', '.join(differ)}: use another --workdir, or "
                         "delete that folder and the stages after it to build them again")
