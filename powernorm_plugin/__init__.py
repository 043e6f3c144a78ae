"""powernorm-fairseq: PowerNorm and Normalize-and-Project (NaP) as a fairseq ``--user-dir``.

``import powernorm_plugin`` registers the plugin's architectures, optimizers and safe
checkpoint loading with fairseq when fairseq is installed. Without fairseq, the
normalization layers (:mod:`powernorm_plugin.modules`) and the projection math
(:mod:`powernorm_plugin.nap`) remain usable from any PyTorch code.
"""
import os

__version__ = "0.1.0"

#: The folder to pass to ``fairseq-train --user-dir``.
USER_DIR = os.path.dirname(os.path.abspath(__file__))

try:
    import fairseq  # noqa: F401
except ImportError:
    HAVE_FAIRSEQ = False
else:
    HAVE_FAIRSEQ = True
    from . import checkpoint, exact_resume, models, optim  # noqa: F401  (registration side effects)

    exact_resume.install()
