"""The plugin's fairseq models: ``powernorm_transformer`` (translation) and
``powernorm_transformer_lm`` (language model), with their architectures.

Importing this package registers them with fairseq (``--user-dir`` and
``import powernorm_plugin`` both do).
"""
from .norm_options import DecoderNormOptions, EncoderNormOptions  # noqa: F401
from .powernorm_transformer import PowerNormTransformerModel
from .powernorm_transformer_lm import PowerNormTransformerLanguageModel, PowerNormTransformerLMConfig
from .stack_norms import NormThenActivation, install_stack_norms

__all__ = [
    "PowerNormTransformerModel",
    "PowerNormTransformerLanguageModel",
    "PowerNormTransformerLMConfig",
    "NormThenActivation",
    "install_stack_norms",
]
