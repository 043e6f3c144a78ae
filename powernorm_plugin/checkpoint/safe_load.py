"""Weights-only loading of fairseq checkpoints, with an allowlist of the types they hold.

Since torch 2.6, ``torch.load`` unpickles with ``weights_only=True`` by default: only
tensors, containers, primitives and allowlisted globals may appear in the pickle. fairseq
checkpoints hold a few other objects, so fairseq-generate, fairseq-eval-lm and
``--restore-file`` fail on them. The usual escape, ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``,
runs whatever code a checkpoint carries. Instead, :func:`install` allowlists exactly the
types that fairseq's own checkpoints hold (found by inspecting checkpoints written by
``fairseq-train`` on this stack):

* ``argparse.Namespace``: ``cfg["model"]`` of every legacy-registered architecture
  (``transformer`` and friends), and ``args`` in checkpoints from fairseq < 0.10;
* numpy arrays of numeric dtype (``numpy.ndarray`` rebuilt by
  ``numpy...multiarray._reconstruct``, a ``numpy.dtype`` and its per-type class such as
  ``numpy.dtypes.Int64DType``): the translation task's ``--eval-bleu`` keeps its n-gram
  counts as numpy arrays in meters that are saved in ``extra_state["metrics"]``.

Everything else in a fairseq checkpoint (``cfg`` is saved as plain containers, meters as
their state dicts, optimizer and scheduler states as tensors and numbers) is accepted by
torch's default weights-only unpickler. None of the allowlisted globals runs code when
called by the unpickler: a ``Namespace`` only stores attributes, ``_reconstruct`` only
allocates an array of an allowlisted type, and a dtype only parses a type code.

:func:`install` also lets fairseq's broadcast of a loaded checkpoint between the ranks of a
data-parallel job (``distributed.utils._broadcast_object_slow``, which torch's default
weights-only loader unpickles on the receiving ranks) through with the omegaconf config types
it holds (:func:`broadcast_safe_globals`), for that call only. And it makes fairseq's
checkpoint readers
(``checkpoint_utils.load_checkpoint_to_cpu``, used by generate, eval-lm, interactive,
the hub interface and the trainer's restore, and ``load_ema_from_checkpoint``) check every
file before unpickling it. A file holding any other global is refused with
:class:`UnsafeCheckpointError`, which names the file and the globals; the check reads the
pickle's opcodes without executing any of them, so a refused payload never runs, even
when the user has set ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``.
"""
import argparse
import contextlib
import errno
import functools
import logging
import os
import pickle
import re
import zipfile
from typing import IO, Any, Callable, List, Sequence, Tuple, Union

import torch

logger = logging.getLogger(__name__)

PathOrFile = Union[str, os.PathLike, IO[bytes]]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds pickled objects outside the allowlist, so it was not loaded."""


class UnreadableCheckpointError(ValueError):
    """A file that torch cannot read as a checkpoint (truncated, or another kind of file)."""


def _unreadable(source: "PathOrFile", error: Exception) -> UnreadableCheckpointError:
    reason = type(error).__name__ + (f": {str(error).splitlines()[0]}" if str(error) else "")
    return UnreadableCheckpointError(
        f"cannot read {_describe(source)} as a torch checkpoint (truncated, or not a "
        f"checkpoint?): {reason}"
    )


def _unreadable_file(error: Exception) -> bool:
    """Whether torch.load's ``error`` says the file is not a complete checkpoint: a truncated
    zip file or a corrupt legacy one (their readers' RuntimeError; the zip reader's OSError
    EINVAL, without a file name, where the cut leaves a central directory that points past
    the end), or other bytes read as a legacy pickle (KeyError, EOFError). Other errors (a
    map_location without its device, out of memory, a file that cannot be opened) are not
    about the file's contents, and stay as they are."""
    if isinstance(error, (KeyError, EOFError)):
        return True
    if isinstance(error, OSError):
        return error.errno == errno.EINVAL and error.filename is None
    return isinstance(error, RuntimeError) and (
        "PytorchStreamReader" in str(error) or "magic number" in str(error))


_NUMERIC_DTYPES = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
)


def _numpy_globals() -> List[Union[Callable, Tuple[Callable, str]]]:
    """The numpy globals that pickling a numpy array writes, under numpy 1 and 2 names."""
    try:
        import numpy
    except ImportError:
        return []
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:
        from numpy.core import multiarray  # numpy 1.x
    reconstruct = multiarray._reconstruct
    entries: List[Union[Callable, Tuple[Callable, str]]] = [
        reconstruct,
        numpy.ndarray,
        numpy.dtype,
    ]
    # Unpickling a dtype restores its state into an instance of the per-type dtype class
    # (numpy.dtypes.Int64DType, ...), which must be allowlisted too. Numeric types only:
    # an object-dtype array could carry arbitrary pickled items.
    entries += [type(numpy.dtype(code)) for code in _NUMERIC_DTYPES]
    # Pickles written under numpy 1 name the function numpy.core.multiarray._reconstruct;
    # numpy 2 moved it to numpy._core, so allowlist the old spelling for the same function.
    legacy_name = "numpy.core.multiarray._reconstruct"
    if f"{reconstruct.__module__}.{reconstruct.__name__}" != legacy_name:
        entries.append((reconstruct, legacy_name))
    return entries


def checkpoint_safe_globals() -> List[Union[Callable, Tuple[Callable, str]]]:
    """The globals, beyond torch's defaults, that fairseq checkpoints hold."""
    return [argparse.Namespace] + _numpy_globals()


def _global_name(entry: Union[Callable, Tuple[Callable, str]]) -> str:
    if isinstance(entry, tuple):
        return entry[1]
    return f"{entry.__module__}.{entry.__name__}"


def allowlisted_names() -> List[str]:
    """Dotted names of the globals :func:`install` allowlists, as pickles spell them."""
    return [_global_name(entry) for entry in checkpoint_safe_globals()]


def allow_checkpoint_globals() -> None:
    """Add the types fairseq checkpoints hold to torch's weights-only allowlist."""
    torch.serialization.add_safe_globals(checkpoint_safe_globals())


def _describe(source: PathOrFile) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return getattr(source, "name", None) or repr(source)


def _refusal(source: PathOrFile, unsafe: Sequence[str]) -> UnsafeCheckpointError:
    objects = ", ".join(repr(name) for name in sorted(unsafe))
    noun, verb = ("object", "is") if len(unsafe) == 1 else ("objects", "are")
    return UnsafeCheckpointError(
        f"refusing to load {_describe(source)}: it holds pickled {noun} {objects}, which "
        f"{verb} not in the allowlist of types fairseq checkpoints hold (torch's "
        f"weights-only types, argparse.Namespace and numeric numpy arrays). Unpickling it "
        f"could run code from the file, so nothing in it was executed. Only if you trust "
        f"the file's origin, "
        f"load it with torch.load(..., weights_only=False) and re-save the parts you need."
    )


_GLOBAL_IN_MESSAGE = re.compile(r"\bGLOBAL ([\w.]+)")
_BOILERPLATE = ("Weights only load failed", "(1)", "(2)", "Check the documentation")


def _translate(source: PathOrFile, error: pickle.UnpicklingError) -> UnsafeCheckpointError:
    """Turn torch's weights-only refusal into an error naming the file and the global."""
    match = _GLOBAL_IN_MESSAGE.search(str(error))
    if match:
        return _refusal(source, [match.group(1)])
    # Refusals other than a global, e.g. an opcode the weights-only unpickler does not
    # support: keep torch's explanation, without its generic advice.
    lines = [line.strip() for line in str(error).splitlines()]
    reason = " ".join(line for line in lines if line and not line.startswith(_BOILERPLATE))
    return UnsafeCheckpointError(
        f"refusing to load {_describe(source)}: weights-only unpickling rejected it "
        f"({reason or repr(error)}). Nothing in it was executed."
    )


def _is_zip(source: PathOrFile) -> bool:
    if isinstance(source, (str, os.PathLike)):
        return zipfile.is_zipfile(source)
    start = source.tell()
    try:
        return zipfile.is_zipfile(source)
    finally:
        source.seek(start)


def _load_weights_only(source: PathOrFile, map_location: Any) -> Any:
    # Not torch.serialization.safe_globals(): leaving that context removes its globals
    # from the allowlist even when install() had added them before.
    allow_checkpoint_globals()
    with _reading(source):
        return torch.load(source, map_location=map_location, weights_only=True)


@contextlib.contextmanager
def _reading(source: PathOrFile):
    """torch's errors on reading ``source`` as the plugin's: a weights-only refusal as
    :class:`UnsafeCheckpointError`, a file that is not a complete checkpoint as
    :class:`UnreadableCheckpointError`; other errors as they are."""
    try:
        yield
    except pickle.UnpicklingError as error:
        raise _translate(source, error) from None
    except (RuntimeError, KeyError, EOFError, OSError) as error:
        if not _unreadable_file(error):
            raise
        raise _unreadable(source, error) from error


def _scan_zip(source: PathOrFile) -> None:
    start = None if isinstance(source, (str, os.PathLike)) else source.tell()
    try:
        with _reading(source):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(source)
    finally:
        if start is not None:
            source.seek(start)
    unsafe = [name for name in unsafe if name not in allowlisted_names()]
    if unsafe:
        raise _refusal(source, unsafe)


def check_checkpoint(source: PathOrFile) -> None:
    """Raise :class:`UnsafeCheckpointError` if ``source`` holds a non-allowlisted global.

    A checkpoint in torch's zip format is checked by disassembling its pickle without
    running it (``torch.serialization.get_unsafe_globals_in_checkpoint``); that reader
    rejects every opcode the weights-only unpickler does not support, so a file that
    passes can only reference the globals it lists. A file in torch's legacy (pre-1.6)
    format is checked by unpickling it with ``weights_only=True``.
    File-like sources are left where they were.
    """
    if _is_zip(source):
        _scan_zip(source)
        return
    start = None if isinstance(source, (str, os.PathLike)) else source.tell()
    try:
        _load_weights_only(source, "cpu")
    finally:
        if start is not None:
            source.seek(start)


def safe_load(source: PathOrFile, map_location: Any = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``, refusing non-allowlisted objects.

    The fairseq types are allowlisted (process-wide, as :func:`install` does), and the
    file is checked as in :func:`check_checkpoint` before anything is unpickled.
    """
    if _is_zip(source):
        _scan_zip(source)
    return _load_weights_only(source, map_location)


def _guard(loader: Callable, describe: str) -> Callable:
    """Wrap a fairseq checkpoint reader so it checks the file before unpickling it."""

    @functools.wraps(loader)
    def guarded(path, *args, **kwargs):
        from fairseq.file_io import PathManager

        local_path = PathManager.get_local_path(path)
        check_checkpoint(local_path)
        try:
            return loader(path, *args, **kwargs)
        except UnsafeCheckpointError:
            raise
        except pickle.UnpicklingError as error:
            raise _translate(local_path, error) from None

    guarded._powernorm_safe_load = True  # type: ignore[attr-defined]
    guarded.__doc__ = (
        f"{describe}\n\nChecked by powernorm_plugin.checkpoint.safe_load before unpickling; "
        f"fairseq's original:\n\n{loader.__doc__ or ''}"
    )
    return guarded


_GUARDED_READERS = ("load_checkpoint_to_cpu", "load_ema_from_checkpoint")


def broadcast_safe_globals() -> List[Callable]:
    """The globals, beyond a checkpoint file's, of what fairseq broadcasts between the ranks of
    one job (``distributed.utils.broadcast_object``, which unpickles with torch's default
    weights-only loader): on a data-parallel resume, the state rank 0 loaded, its config an
    omegaconf ``DictConfig`` by then, with its tensors sent apart and replaced by
    placeholders. Types only, whose unpickling stores data and runs no code of the pickle's
    choosing."""
    import collections
    import typing

    from fairseq.distributed.utils import _TensorPlaceholder
    from omegaconf import DictConfig, ListConfig, nodes
    from omegaconf.base import ContainerMetadata, Metadata

    return [
        DictConfig, ListConfig, ContainerMetadata, Metadata, nodes.AnyNode, nodes.StringNode,
        nodes.IntegerNode, nodes.FloatNode, nodes.BooleanNode, _TensorPlaceholder,
        collections.defaultdict, typing.Any, dict, list, tuple, set, str, int, float, bool,
    ]


def _with_broadcast_globals(broadcast: Callable) -> Callable:
    """Wrap fairseq's ``_broadcast_object_slow`` so that a rank unpickles what another rank
    of the job sent with :func:`broadcast_safe_globals` allowed (for the call only)."""

    @functools.wraps(broadcast)
    def wrapped(*args, **kwargs):
        # Not torch.serialization.safe_globals(): leaving it would also remove the globals
        # that were allowlisted before; the allowlist is put back as it was instead.
        before = torch.serialization.get_safe_globals()
        torch.serialization.add_safe_globals(
            [entry for entry in broadcast_safe_globals() if entry not in before])
        try:
            return broadcast(*args, **kwargs)
        finally:
            torch.serialization.clear_safe_globals()
            torch.serialization.add_safe_globals(before)

    wrapped._powernorm_safe_load = True  # type: ignore[attr-defined]
    return wrapped


def install() -> None:
    """Allowlist fairseq's checkpoint types and guard fairseq's checkpoint readers.

    Idempotent. Without fairseq installed, only the allowlist is set.
    """
    allow_checkpoint_globals()
    try:
        from fairseq import checkpoint_utils
    except ImportError:
        return
    for name in _GUARDED_READERS:
        reader = getattr(checkpoint_utils, name, None)
        if reader is None or getattr(reader, "_powernorm_safe_load", False):
            continue
        setattr(
            checkpoint_utils,
            name,
            _guard(reader, f"fairseq.checkpoint_utils.{name}, loading weights-only."),
        )
    from fairseq.distributed import utils as distributed_utils

    broadcast = getattr(distributed_utils, "_broadcast_object_slow", None)
    if broadcast is not None and not getattr(broadcast, "_powernorm_safe_load", False):
        distributed_utils._broadcast_object_slow = _with_broadcast_globals(broadcast)
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() in (
        "1",
        "y",
        "yes",
        "true",
    ):
        logger.warning(
            "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set: torch.load then unpickles everything. "
            "powernorm_plugin still refuses fairseq checkpoints that hold non-allowlisted "
            "objects, and fairseq checkpoints load without the variable; unset it."
        )
