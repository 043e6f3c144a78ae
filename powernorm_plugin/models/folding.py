"""Fold the eval-mode PowerNorm/BatchNorm of a trained checkpoint into the linear layers
that read them (used by ``python -m powernorm_plugin.cli.fold_norms``).

At inference both norms are a fixed per-feature affine map, which the next linear layer can
absorb (:func:`powernorm_plugin.modules.fold_norm_into_linear`). In the pre-norm transformer:

==========================================  =============================================
norm                                        read by (absorbs the affine map)
==========================================  =============================================
``{enc,dec}.layers.N.self_attn_layer_norm``  ``self_attn.q_proj``, ``k_proj``, ``v_proj``
``{enc,dec}.layers.N.final_layer_norm``      ``fc1``
``encoder.layer_norm`` (final)               every decoder layer's ``encoder_attn.k_proj``
                                             and ``encoder_attn.v_proj``
``decoder.layer_norm`` (final)               not folded: it feeds the output projection,
                                             tied to the embeddings or adaptive
==========================================  =============================================

What remains at a folded site is the norm's parameter-free part: PowerNorm's per-token group
RMS scaling (when ``--powernorm-groups`` is not 0) or nothing. The checkpoint's config gets
``folded_norms=True``, so the model is rebuilt with those remainders in place of the norms.
Folding the encoder's final norm changes what the encoder outputs (its output is now the
pre-affine features); only the decoder's encoder-attention reads it, so translations are
unchanged, but code reading ``encoder_out`` directly sees the difference.

Post-norm models (``normalize_before`` off) are refused: their norms feed the residual
stream, which no single linear layer reads. So are models trained with
``--cross-self-attention`` where the encoder's final norm or a decoder self-attention norm
would be folded: there the decoder's self-attention reads the encoder's output and its own
input through the same k and v projections, which can absorb only one of the two norms.
"""
import re

import torch
from torch import nn

from ..modules import build_norm, fold_norm_into_linear
from .norm_options import FOLDABLE_KINDS

_NORM_BUFFERS = {
    "power": ("weight", "bias", "running_phi", "running_nu", "num_steps"),
    "power_vanilla": ("weight", "bias", "running_phi", "running_nu", "num_steps"),
    "batch": ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"),
}


class FoldError(ValueError):
    """The checkpoint cannot be folded (already folded, post-norm, nothing to fold, ...)."""


def cfg_get(model_cfg, name, default=None):
    """Read an option from a checkpoint's model config (argparse Namespace or dict)."""
    if isinstance(model_cfg, dict):
        value = model_cfg.get(name, default)
    else:
        value = getattr(model_cfg, name, default)
    return default if value is None else value


def cfg_set(model_cfg, name, value):
    if isinstance(model_cfg, dict):
        model_cfg[name] = value
    else:
        setattr(model_cfg, name, value)


def _num_layers(state, stack):
    pattern = re.compile(rf"^{stack}\.layers\.(\d+)\.")
    found = {int(m.group(1)) for k in state for m in [pattern.match(k)] if m}
    return max(found) + 1 if found else 0


def fold_plan(model_cfg, state):
    """The folds to make: a list of (norm prefix, kind, [reader linear prefixes])."""
    plan = []
    enc_layers, dec_layers = _num_layers(state, "encoder"), _num_layers(state, "decoder")
    for stack, n in (("encoder", enc_layers), ("decoder", dec_layers)):
        if n == 0:
            continue
        self_kind = str(cfg_get(model_cfg, f"{stack}_norm_self", "layer"))
        ff_kind = str(cfg_get(model_cfg, f"{stack}_norm_ff", "layer"))
        if (self_kind in FOLDABLE_KINDS or ff_kind in FOLDABLE_KINDS) and not cfg_get(
            model_cfg, f"{stack}_normalize_before", stack == "decoder" and enc_layers == 0
        ):
            raise FoldError(
                f"the {stack} is post-norm ({stack}_normalize_before is off): its norms feed the "
                "residual stream, not a linear layer, so they cannot be folded"
            )
        for i in range(n):
            layer = f"{stack}.layers.{i}"
            if self_kind in FOLDABLE_KINDS:
                plan.append((f"{layer}.self_attn_layer_norm", self_kind,
                             [f"{layer}.self_attn.{p}_proj" for p in "qkv"]))
            if ff_kind in FOLDABLE_KINDS:
                plan.append((f"{layer}.final_layer_norm", ff_kind, [f"{layer}.fc1"]))
        if stack == "encoder" and ff_kind in FOLDABLE_KINDS and "encoder.layer_norm.weight" in state:
            readers = [f"decoder.layers.{i}.encoder_attn.{p}_proj"
                       for i in range(dec_layers) for p in "kv"]
            if readers and all(f"{r}.weight" in state for r in readers):
                plan.append(("encoder.layer_norm", ff_kind, readers))
    if cfg_get(model_cfg, "cross_self_attention", False):
        shared = [prefix for prefix, _, _ in plan if prefix == "encoder.layer_norm"
                  or (prefix.startswith("decoder.") and prefix.endswith(".self_attn_layer_norm"))]
        if shared:
            raise FoldError(
                f"the model uses --cross-self-attention: each decoder layer's self-attention "
                f"reads the encoder's output and its own input through the same k and v "
                f"projections, which cannot absorb two different norms ({shared[0]} would be "
                f"folded into them)"
            )
    return plan


def _load_norm(state, prefix, kind):
    dim = state[f"{prefix}.weight"].numel()
    norm = build_norm(kind, dim)
    missing = [b for b in _NORM_BUFFERS[kind] if f"{prefix}.{b}" not in state]
    if missing:
        raise FoldError(f"{prefix}: the checkpoint lacks {missing} of a {kind} norm")
    norm.load_state_dict({b: state[f"{prefix}.{b}"] for b in _NORM_BUFFERS[kind]})
    norm.name = prefix
    return norm.eval()


def _load_linear(state, prefix):
    weight = state[f"{prefix}.weight"]
    bias = state.get(f"{prefix}.bias")
    linear = nn.Linear(weight.size(1), weight.size(0), bias=bias is not None, dtype=weight.dtype)
    linear.load_state_dict({"weight": weight, **({"bias": bias} if bias is not None else {})})
    return linear


@torch.no_grad()
def fold_checkpoint_state(checkpoint):
    """Fold the norms of a loaded fairseq checkpoint dict in place; returns the folded prefixes."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise FoldError("not a fairseq checkpoint: it has no 'model' state dict")
    model_cfg = checkpoint["cfg"]["model"] if checkpoint.get("cfg") else checkpoint.get("args")
    if model_cfg is None:
        raise FoldError("the checkpoint has no model config (neither cfg.model nor args)")
    if cfg_get(model_cfg, "folded_norms", False):
        raise FoldError("the checkpoint is already folded (folded_norms is set)")
    state = checkpoint["model"]
    plan = fold_plan(model_cfg, state)
    if not plan:
        raise FoldError(
            "nothing to fold: no PowerNorm/BatchNorm feeds a linear layer in this checkpoint "
            "(its --encoder-norm-* / --decoder-norm-* are layer or rms)"
        )
    for prefix, kind, readers in plan:
        norm = _load_norm(state, prefix, kind)
        for reader in readers:
            folded = fold_norm_into_linear(norm, _load_linear(state, reader))
            state[f"{reader}.weight"] = folded.weight.detach().clone()
            state[f"{reader}.bias"] = folded.bias.detach().clone()
        for buf in _NORM_BUFFERS[kind]:
            del state[f"{prefix}.{buf}"]
    cfg_set(model_cfg, "folded_norms", True)
    # optimizer state refers to the unfolded parameters; a folded model is for inference only
    checkpoint["last_optimizer_state"] = None
    return [prefix for prefix, _, _ in plan]
