"""``powernorm_transformer_lm``: fairseq's transformer language model with a norm per site.

fairseq's :class:`~fairseq.models.transformer_lm.TransformerLanguageModel` (always pre-norm),
whose decoder norms are swapped after fairseq builds it, as in the translation model. The
default norm is PowerNorm at both sites (and the final norm), as in the paper's Table 2.
Decoder PowerNorms are causal: a position's training output never depends on later tokens
of the batch. ``batch`` and ``power_vanilla`` normalize by the current batch and are refused
unless ``--allow-noncausal-decoder-norm`` (the paper's BN / PN-V rows leak this way).

Architectures: ``powernorm_transformer_lm`` (fairseq's ``transformer_lm`` sizes),
``powernorm_transformer_lm_wiki103`` (fairseq's ``transformer_lm_wiki103``: 16 layers,
1024/4096, adaptive input and adaptive softmax) and ``powernorm_transformer_lm_ptb``
(a PTB-sized model of our choosing; the paper's PTB model is a Tensorized Transformer,
which fairseq does not have).

Scale invariance (for Normalize-and-Project): as in the translation model, no weight is
exactly scale-invariant as built; ``--ffn-activation-norm layer|rms`` makes every
``decoder.layers.N.fc1.weight`` exactly scale-invariant.
"""
from dataclasses import dataclass

from fairseq.dataclass import ChoiceEnum
from fairseq.models import ARCH_CONFIG_REGISTRY, register_model, register_model_architecture
from fairseq.models.transformer_lm import (
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    base_lm_architecture,
    transformer_lm_baevski_wiki103,
)
from fairseq.utils import safe_getattr

from .norm_options import NORM_CHOICES, DecoderNormOptions, _site, check_norm_options, fill_norm_defaults
from .stack_norms import PluginNormsMixin

_LM_SITE_HELP = (
    "normalization at the {site} of every decoder layer: layer, rms, batch, power (causal "
    "PowerNorm) or power_vanilla{extra}"
)


@dataclass
class PowerNormTransformerLMConfig(TransformerLanguageModelConfig, DecoderNormOptions):
    """fairseq's transformer_lm options plus the plugin's norm options (PowerNorm default)."""

    decoder_norm_self: ChoiceEnum(NORM_CHOICES) = _site(
        "power", _LM_SITE_HELP.format(site="self-attention input", extra="")
    )
    decoder_norm_ff: ChoiceEnum(NORM_CHOICES) = _site(
        "power", _LM_SITE_HELP.format(site="FFN input", extra="; the final norm follows this choice")
    )


@register_model("powernorm_transformer_lm", dataclass=PowerNormTransformerLMConfig)
class PowerNormTransformerLanguageModel(PluginNormsMixin, TransformerLanguageModel):
    """fairseq's transformer LM with PowerNorm/BatchNorm/LayerNorm/RMSNorm chosen per site."""

    @classmethod
    def build_model(cls, args, task):
        fill_norm_defaults(args, encoder_norm=None, decoder_norm="power")
        check_norm_options(args, ("decoder",))
        model = super().build_model(args, task)
        return cls.install_norms(model, args, [
            (model.decoder, "decoder", args.decoder_attention_heads, True),
        ])


def _lm_defaults(args):
    fill_norm_defaults(args, encoder_norm=None, decoder_norm="power")


def powernorm_transformer_lm(args):
    """fairseq's ``transformer_lm`` (512/2048, 8 heads, 6 layers), PowerNorm throughout."""
    _lm_defaults(args)
    base_lm_architecture(args)


# register_model registered the arch "powernorm_transformer_lm" as a no-op (the dataclass
# defaults apply); ours must also run, to take the PowerNorm warm-up from --warmup-updates.
ARCH_CONFIG_REGISTRY["powernorm_transformer_lm"] = powernorm_transformer_lm


@register_model_architecture("powernorm_transformer_lm", "powernorm_transformer_lm_wiki103")
def powernorm_transformer_lm_wiki103(args):
    """fairseq's ``transformer_lm_wiki103`` (adaptive input and softmax), PowerNorm throughout."""
    _lm_defaults(args)
    transformer_lm_baevski_wiki103(args)


@register_model_architecture("powernorm_transformer_lm", "powernorm_transformer_lm_ptb")
def powernorm_transformer_lm_ptb(args):
    """A PTB-sized LM: 4 layers, 512/2048, 8 heads, dropout 0.3 (attention 0.1)."""
    args.decoder_layers = safe_getattr(args, "decoder_layers", 4)
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 512)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", 2048)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 8)
    args.dropout = safe_getattr(args, "dropout", 0.3)
    args.attention_dropout = safe_getattr(args, "attention_dropout", 0.1)
    _lm_defaults(args)
    base_lm_architecture(args)
