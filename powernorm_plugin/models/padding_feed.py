"""Hand the padding mask to the norms inside fairseq's transformer layers.

fairseq's layers call their norms as ``norm(x)``. PowerNorm and BatchNorm need the padding
mask to leave padding out of their batch statistics. Rather than re-writing fairseq's layer
forwards, each encoder/decoder gets a :class:`PaddingFeed`: a forward pre-hook on the stack
reads the mask from its input tokens (``src_tokens`` / ``prev_output_tokens`` == pad) and
keeps it for the duration of that forward call; a forward pre-hook on each mask-aware norm
adds it as ``padding_mask=``. All layers of one stack see the same (T, B) positions, so one
mask serves every norm of the stack.

The mask is only handed over in training mode (in eval mode both norms are a fixed affine
map) and only for full-sequence calls: an incremental decoding step (``incremental_state``
given) sees one position of a sequence.
"""


class PaddingFeed:
    """The padding mask of the stack's current forward call, for its norms.

    Used as two hooks: :meth:`norm_pre_hook` on each norm and :meth:`stack_pre_hook` /
    :meth:`stack_post_hook` on the encoder or decoder. A plain object (no closures), so
    ``copy.deepcopy`` of the model (fairseq's EMA does it) gives the copy its own feed.
    """

    def __init__(self, padding_idx):
        self.padding_idx = padding_idx
        self.mask = None

    def stack_pre_hook(self, stack, args, kwargs):
        tokens = args[0] if args else kwargs.get("src_tokens", kwargs.get("prev_output_tokens"))
        self.mask = None
        if not stack.training or kwargs.get("incremental_state") is not None or tokens is None:
            return None
        # Kept even when nothing is padded: testing that here would wait for the device,
        # while the norms count the tokens of the stack's one mask once (token_mask).
        self.mask = tokens.eq(self.padding_idx)
        return None

    def stack_post_hook(self, stack, args, kwargs, output):
        self.mask = None
        return None

    def norm_pre_hook(self, norm, args, kwargs):
        if self.mask is None or not norm.training or "padding_mask" in kwargs or len(args) != 1:
            return None
        x = args[0]
        if tuple(self.mask.shape) != (x.size(1), x.size(0)):
            raise RuntimeError(
                f"{getattr(norm, 'name', type(norm).__name__)}: the stack's padding mask has "
                f"shape {tuple(self.mask.shape)} but the norm's input is (T, B, C) = "
                f"{tuple(x.shape)}; this layer changes the sequence length, which the plugin's "
                "padding feed does not support"
            )
        return args, dict(kwargs, padding_mask=self.mask)

    def attach_stack(self, stack):
        """Register the hooks that set and clear the mask around ``stack``'s forward."""
        stack.register_forward_pre_hook(self.stack_pre_hook, with_kwargs=True)
        stack.register_forward_hook(self.stack_post_hook, with_kwargs=True, always_call=True)

    def attach_norm(self, norm):
        """Make ``norm`` receive the stack's padding mask."""
        norm.register_forward_pre_hook(self.norm_pre_hook, with_kwargs=True)
