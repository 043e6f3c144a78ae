"""Put the chosen norms into a fairseq transformer encoder or decoder after fairseq built it.

fairseq's ``TransformerEncoderBase`` / ``TransformerDecoderBase`` build every layer with
LayerNorms at three sites; :func:`install_stack_norms` replaces, per layer,

* ``self_attn_layer_norm`` (input of self-attention, pre-norm) by the ``--{stack}-norm-self``
  kind,
* ``final_layer_norm`` (input of the FFN) and the stack's final ``layer_norm`` by the
  ``--{stack}-norm-ff`` kind,

and leaves the decoder's ``encoder_attn_layer_norm`` a LayerNorm (the cross-attention
query norm; the paper's decoder is LayerNorm throughout). A site whose kind is ``layer`` keeps
fairseq's own LayerNorm, so an all-``layer`` model is fairseq's transformer exactly.

Decoder PowerNorms are causal (``causal=True``: they normalize by the running statistic of
earlier steps, warm-up included), so no position sees later tokens of its batch.
"""
from torch import nn

from ..modules import GroupScaling, IdentityNorm, build_norm, norm_uses_padding
from .norm_options import FOLDABLE_KINDS, site_kind, warn_if_sync_without_workers
from .padding_feed import PaddingFeed

EPS = 1e-5


class NormThenActivation(nn.Module):
    """``activation(norm(x))``: the FFN nonlinearity with a per-token norm in front of it.

    Installed as a layer's ``activation_fn``, so fairseq's ``activation_fn(fc1(x))`` becomes
    ``activation(norm(fc1(x)))``. With fc1 bias-free, fc1's weight is then exactly
    scale-invariant: norm(c W x) = norm(W x) for every c > 0 (up to the norm's eps).
    """

    def __init__(self, norm, activation):
        super().__init__()
        self.norm = norm
        self.activation = activation

    def forward(self, x):
        return self.activation(self.norm(x))


def stack_groups(args, heads):
    """Group count of the PowerNorm group scaling: --powernorm-groups, default ``heads``."""
    groups = getattr(args, "powernorm_groups", None)
    if groups is None:
        groups = heads
    return groups or None


def site_is_folded(args, kind, decoder_final=False):
    """Whether a fold_norms checkpoint holds this site folded into the next linear layers.

    The decoder's final norm is never folded: it feeds the output projection, which is tied
    to the embeddings or is an adaptive softmax.
    """
    return bool(getattr(args, "folded_norms", False)) and kind in FOLDABLE_KINDS and not decoder_final


def _build(args, kind, dim, groups, causal, folded):
    if folded:
        # what fold_norm_into_linear leaves in place: the parameter-free part of the norm
        if kind in ("power", "power_vanilla") and groups:
            return GroupScaling(dim, groups, EPS)
        return IdentityNorm()
    options = dict(
        alpha_fwd=float(args.powernorm_alpha_fwd),
        alpha_bkw=float(args.powernorm_alpha_bkw),
        warmup_updates=int(args.powernorm_warmup or 0),
        group_num=groups,
        sync=bool(args.powernorm_sync),
    )
    if kind == "power":
        options["mode"] = str(args.powernorm_mode)
        options["causal"] = causal
    return build_norm(kind, dim, eps=EPS, **options)


def install_stack_norms(stack, args, stack_name, heads, causal):
    """Replace the norms of ``stack`` (a fairseq encoder or decoder) as the options choose.

    Returns the :class:`PaddingFeed` attached to ``stack`` (None when no norm needs the
    padding mask).
    """
    groups = stack_groups(args, heads)
    feed = PaddingFeed(stack.padding_idx)
    decoder = stack_name == "decoder"
    mask_aware = []

    def make(kind, dim, decoder_final=False):
        norm = _build(args, kind, dim, groups, causal,
                      site_is_folded(args, kind, decoder_final))
        if norm_uses_padding(norm):
            mask_aware.append(norm)
        return norm

    self_kind = site_kind(args, stack_name, "self")
    ff_kind = site_kind(args, stack_name, "ff")
    act_norm = str(getattr(args, "ffn_activation_norm", "none"))
    # by index: with --encoder/decoder-layerdrop the list is fairseq's LayerDropModuleList,
    # whose iteration skips a random subset of the layers in training mode
    for i in range(len(stack.layers)):
        layer = stack.layers[i]
        dim = layer.embed_dim
        if self_kind != "layer":
            layer.self_attn_layer_norm = make(self_kind, dim)
        if ff_kind != "layer":
            layer.final_layer_norm = make(ff_kind, dim)
        if act_norm != "none":
            # fc1's bias is redundant before a norm; a folded FFN-input norm brings one back
            if not site_is_folded(args, ff_kind):
                layer.fc1.register_parameter("bias", None)
            layer.activation_fn = NormThenActivation(
                build_norm(act_norm, layer.fc1.out_features, eps=EPS), layer.activation_fn
            )
    if getattr(stack, "layer_norm", None) is not None and ff_kind != "layer":
        stack.layer_norm = make(ff_kind, stack.layer_norm.weight.numel(), decoder_final=decoder)
    if not mask_aware:
        return None
    feed.attach_stack(stack)
    for norm in mask_aware:
        feed.attach_norm(norm)
    return feed


def name_norms(model):
    """Set each PowerNorm/BatchNorm's ``name`` (used in its error messages) to its path."""
    for path, module in model.named_modules():
        if norm_uses_padding(module):
            module.name = path


class PluginNormsMixin:
    """What both plugin models do around fairseq's own build: install the chosen norms in each
    stack, name them for error messages, remember whether they were folded; and refuse to
    train a folded model (``train()``)."""

    @staticmethod
    def install_norms(model, args, stacks):
        """``stacks``: (module, "encoder"|"decoder", attention heads, causal) per stack."""
        for stack, name, heads, causal in stacks:
            install_stack_norms(stack, args, name, heads, causal=causal)
        name_norms(model)
        model.folded_norms = bool(args.folded_norms)
        return model

    def load_state_dict(self, state_dict, strict=True, *args, **kwargs):
        """fairseq's load, with a clear error for a fold_norms checkpoint loaded into a
        trainable model (``--restore-file``, a folded file in ``--save-dir``,
        ``--finetune-from-model``), instead of torch's list of missing keys."""
        try:
            return super().load_state_dict(state_dict, strict, *args, **kwargs)
        except RuntimeError as error:
            # (a fold leaves the decoder's final norm, which feeds the output projection)
            missing = [key for key in self.state_dict()
                       if key.endswith((".running_phi", ".running_mean")) and key not in state_dict]
            if strict and missing:
                raise RuntimeError(
                    f"the checkpoint lacks {len(missing)} of this model's PowerNorm/BatchNorm "
                    f"statistics ({missing[0]}, ...): it was written by fold_norms, for "
                    f"inference only (fairseq-generate --path FILE), or by a model with other "
                    f"--encoder-norm-*/--decoder-norm-* settings. Train from the checkpoint "
                    f"before folding."
                ) from error
            raise

    def train(self, mode=True):
        """Refuse to train a folded model; warn once when --powernorm-sync has no workers."""
        if mode:
            warn_if_sync_without_workers(self)
        if mode and getattr(self, "folded_norms", False):
            raise RuntimeError(
                "this model was loaded from a fold_norms checkpoint (--folded-norms): its "
                "PowerNorm/BatchNorm were folded into linear layers for inference and cannot be "
                "trained; train from the checkpoint before folding"
            )
        return super().train(mode)
