"""``powernorm_transformer``: fairseq's translation transformer with a choice of norm per site.

The model is fairseq's :class:`~fairseq.models.transformer.TransformerModel`; after fairseq
builds it, :func:`~.stack_norms.install_stack_norms` swaps the norms the flags ask for (see
:mod:`.norm_options` for the flags). The architectures mirror fairseq's, with the defaults of
the PowerNorm paper's Table 1 runs:

* pre-norm (``--encoder-normalize-before``, ``--decoder-normalize-before``) in every
  architecture, including ``powernorm_transformer_vaswani_wmt_en_de_big`` whose fairseq
  counterpart is post-norm;
* PowerNorm at the encoder's self-attention and FFN inputs and its final norm; LayerNorm
  throughout the decoder;
* PowerNorm group scaling with as many groups as the stack has attention heads;
* PowerNorm warm-up as long as the learning-rate warm-up (``--warmup-updates``).

The rest of the authors' recipe (dropout 0.3, shared embeddings, Adam, lr, ...) is training
flags, as in their commands.

Scale invariance (for Normalize-and-Project, ``--optimizer nap_adam`` etc.): with pre-norm,
no weight of this model is exactly scale-invariant as built (every linear layer's output is
added to the residual stream or projected to attention scores and values). With
``--ffn-activation-norm layer|rms`` each FFN's ``fc1.weight`` (both stacks) becomes exactly
scale-invariant: fc1 loses its bias and its output is normalized per token before the
nonlinearity, so ``fc1.weight * c`` gives the same output for every c > 0. Batch-statistic
norms (power, batch) at that position would not give exact invariance (PowerNorm normalizes
by a running statistic, and both are a fixed affine map at inference), which is why the
activation norm is per-token.
"""
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import (
    TransformerModel,
    base_architecture,
    transformer_iwslt_de_en,
    transformer_vaswani_wmt_en_de_big,
    transformer_wmt_en_de,
    transformer_wmt_en_de_big_t2t,
)

from .norm_options import (
    DecoderNormOptions,
    EncoderNormOptions,
    check_norm_options,
    fill_norm_defaults,
)
from .stack_norms import PluginNormsMixin


@register_model("powernorm_transformer")
class PowerNormTransformerModel(PluginNormsMixin, TransformerModel):
    """fairseq's transformer with PowerNorm/BatchNorm/LayerNorm/RMSNorm chosen per site."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        gen_parser_from_dataclass(parser, EncoderNormOptions(), delete_default=True)
        gen_parser_from_dataclass(parser, DecoderNormOptions(), delete_default=True)

    @classmethod
    def build_model(cls, args, task):
        powernorm_transformer_base(args)
        check_norm_options(args, ("encoder", "decoder"))
        model = super().build_model(args, task)
        return cls.install_norms(model, args, [
            (model.encoder, "encoder", args.encoder_attention_heads, False),
            (model.decoder, "decoder", args.decoder_attention_heads, True),
        ])


def _pre_norm(args):
    args.encoder_normalize_before = getattr(args, "encoder_normalize_before", True)
    args.decoder_normalize_before = getattr(args, "decoder_normalize_before", True)
    fill_norm_defaults(args, encoder_norm="power", decoder_norm="layer")


@register_model_architecture("powernorm_transformer", "powernorm_transformer")
def powernorm_transformer_base(args):
    """fairseq's ``transformer`` (base) sizes, pre-norm, PowerNorm encoder."""
    _pre_norm(args)
    base_architecture(args)


@register_model_architecture("powernorm_transformer", "powernorm_transformer_iwslt_de_en")
def powernorm_transformer_iwslt_de_en(args):
    """fairseq's ``transformer_iwslt_de_en`` (512/1024, 4 heads, 6+6 layers), PowerNorm encoder."""
    _pre_norm(args)
    transformer_iwslt_de_en(args)


@register_model_architecture("powernorm_transformer", "powernorm_transformer_wmt_en_de")
def powernorm_transformer_wmt_en_de(args):
    """fairseq's ``transformer_wmt_en_de`` (base), pre-norm, PowerNorm encoder."""
    _pre_norm(args)
    transformer_wmt_en_de(args)


@register_model_architecture("powernorm_transformer", "powernorm_transformer_vaswani_wmt_en_de_big")
def powernorm_transformer_vaswani_wmt_en_de_big(args):
    """fairseq's ``transformer_vaswani_wmt_en_de_big`` (1024/4096, 16 heads), made pre-norm."""
    _pre_norm(args)
    transformer_vaswani_wmt_en_de_big(args)


@register_model_architecture("powernorm_transformer", "powernorm_transformer_wmt_en_de_big_t2t")
def powernorm_transformer_wmt_en_de_big_t2t(args):
    """fairseq's ``transformer_wmt_en_de_big_t2t`` (the paper's WMT14 model), PowerNorm encoder."""
    _pre_norm(args)
    transformer_wmt_en_de_big_t2t(args)
