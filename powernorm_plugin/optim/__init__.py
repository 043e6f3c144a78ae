"""fairseq optimizers of the plugin: ``nap_<name>`` for every registered optimizer.

Importing this package registers them and makes fairseq's trainer publish parameter
names to them (see :mod:`powernorm_plugin.optim.names`).
"""
from .names import param_names_context, patch_trainer
from .nap import NaPConfig, NaPOptimizer, make_nap_optimizer, register_all

patch_trainer()
REGISTERED = register_all()

__all__ = [
    "NaPConfig",
    "NaPOptimizer",
    "REGISTERED",
    "make_nap_optimizer",
    "param_names_context",
    "patch_trainer",
    "register_all",
]
