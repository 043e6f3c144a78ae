"""powernorm-fairseq: PowerNorm and Normalize-and-Project (NaP) as a fairseq ``--user-dir``.

``import powernorm_plugin`` registers the plugin's architectures, optimizers and safe
checkpoint loading with fairseq when fairseq is installed. Without fairseq, the
normalization layers (:mod:`powernorm_plugin.modules`) and the projection math
(:mod:`powernorm_plugin.nap`) remain usable from any PyTorch code.
"""
import logging
import os

__version__ = "0.1.0"

#: The folder to pass to ``fairseq-train --user-dir``.
USER_DIR = os.path.dirname(os.path.abspath(__file__))

# Some of fairseq's modules call logging.basicConfig(level=DEBUG) as they are imported, which
# would switch on debug logging for the whole process of a user who imports only the layers.
# With a handler in place basicConfig does nothing, and the root logger is then put back as it
# was. The handler passes on warnings, as Python's last-resort handler would (the plugin's own
# among them). (fairseq's command-line tools configure logging before they load a --user-dir.)
_root = logging.getLogger()
_root_level, _root_handlers = _root.level, list(_root.handlers)
_during_import = logging.StreamHandler()
_during_import.setLevel(logging.WARNING)
_root.addHandler(_during_import)
try:
    import fairseq  # noqa: F401
except ImportError:
    HAVE_FAIRSEQ = False
else:
    HAVE_FAIRSEQ = True
    from . import checkpoint, models, optim  # noqa: F401  (registration side effects)
    from . import dummy_batches, ema_counters, exact_resume, process_group_exit

    dummy_batches.install()
    ema_counters.install()
    exact_resume.install()
    process_group_exit.install()
finally:
    _root.setLevel(_root_level)
    _root.handlers[:] = _root_handlers
    del _root, _root_level, _root_handlers, _during_import
