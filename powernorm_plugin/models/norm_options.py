"""The command-line options that choose and configure the norms of the plugin's transformers.

The flags carry the names of the PowerNorm authors' code (``--encoder-norm-self`` ...) so
their commands carry over. Both models declare them through the dataclasses below: the
translation model turns them into argparse options (``add_args``), the language model
inherits them into its fairseq config dataclass. Defaults that depend on the architecture
(which norm goes where) are filled by :func:`fill_norm_defaults`, which every architecture
function calls.
"""
import logging
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from omegaconf import OmegaConf

from ..modules import NORM_KINDS, norm_uses_padding
from ..modules._util import distributed_world

logger = logging.getLogger(__name__)

#: Norm kinds a site accepts (``--encoder-norm-self`` etc.).
NORM_CHOICES = NORM_KINDS
#: PowerNorm modes offered by --powernorm-mode (PN-V is the ``power_vanilla`` norm kind).
POWERNORM_MODE_CHOICES = ("paper", "official")
#: --ffn-activation-norm choices: a per-token norm between fc1 and the FFN nonlinearity.
FFN_ACTIVATION_NORM_CHOICES = ("none", "layer", "rms")
#: Kinds whose training output depends on the current batch, so they see later tokens.
NONCAUSAL_KINDS = ("batch", "power_vanilla")
#: Kinds that are PowerNorm (and take --powernorm-* options such as group scaling).
POWER_KINDS = ("power", "power_vanilla")
#: Kinds folded into the following linear layers by ``powernorm_plugin.cli.fold_norms``.
FOLDABLE_KINDS = ("batch", "power", "power_vanilla")

_SITE_HELP = (
    "normalization at the {site} of every {stack} layer: layer (LayerNorm), rms (RMSNorm), "
    "batch (BatchNorm over non-padding tokens), power (PowerNorm) or power_vanilla (PN-V){extra}"
)


def _site(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class DecoderNormOptions(FairseqDataclass):
    """Norm options shared by the translation model and the language model."""

    decoder_norm_self: ChoiceEnum(NORM_CHOICES) = _site(
        "layer", _SITE_HELP.format(site="self-attention input", stack="decoder", extra="")
    )
    decoder_norm_ff: ChoiceEnum(NORM_CHOICES) = _site(
        "layer",
        _SITE_HELP.format(site="FFN input", stack="decoder",
                          extra="; the decoder's final norm (pre-norm) follows this choice"),
    )
    powernorm_alpha_fwd: float = field(
        default=0.9, metadata={"help": "PowerNorm forward EMA rate a_f of the running psi^2"}
    )
    powernorm_alpha_bkw: float = field(
        default=0.9, metadata={"help": "PowerNorm backward EMA rate a_b of nu"}
    )
    powernorm_warmup: Optional[int] = field(
        default=None,
        metadata={
            "help": "PowerNorm warm-up length, in training forward passes per worker (updates "
            "x --update-freq); during it, encoder PowerNorms normalize by the batch's own "
            "statistic. Default: the lr scheduler's --warmup-updates x --update-freq, else 0"
        },
    )
    powernorm_groups: Optional[int] = field(
        default=None,
        metadata={
            "help": "channel groups of the per-token RMS scaling before each PowerNorm "
            "(0 = no group scaling; default: the attention heads of that encoder/decoder)"
        },
    )
    powernorm_mode: ChoiceEnum(POWERNORM_MODE_CHOICES) = field(
        default="paper",
        metadata={
            "help": "paper: Algorithm 2 of the paper; official: the authors' released code "
            "(backward by the batch statistic, padding in Gamma/Lambda). PN-V is the "
            "power_vanilla norm kind"
        },
    )
    powernorm_sync: bool = field(
        default=False,
        metadata={"help": "all-reduce PowerNorm/BatchNorm batch statistics across data-parallel workers"},
    )
    allow_noncausal_decoder_norm: bool = field(
        default=False,
        metadata={
            "help": "allow batch / power_vanilla norms in a decoder. They normalize by the "
            "current batch, so in training a position's output depends on later tokens "
            "(a leak; only for reproducing the paper's BN / PN-V language-model rows)"
        },
    )
    ffn_activation_norm: ChoiceEnum(FFN_ACTIVATION_NORM_CHOICES) = field(
        default="none",
        metadata={
            "help": "put a per-token norm (layer: LayerNorm, rms: RMSNorm) between fc1 and the "
            "FFN nonlinearity and drop fc1's bias, so fc1's weight is exactly scale-invariant "
            "(for Normalize-and-Project)"
        },
    )
    folded_norms: bool = field(
        default=False,
        metadata={
            "help": "set by `python -m powernorm_plugin.cli.fold_norms`: the checkpoint's "
            "PowerNorm/BatchNorm were folded into the following linear layers (inference only)"
        },
    )


@dataclass
class EncoderNormOptions(FairseqDataclass):
    """Norm options of an encoder."""

    encoder_norm_self: ChoiceEnum(NORM_CHOICES) = _site(
        "power", _SITE_HELP.format(site="self-attention input", stack="encoder", extra="")
    )
    encoder_norm_ff: ChoiceEnum(NORM_CHOICES) = _site(
        "power",
        _SITE_HELP.format(site="FFN input", stack="encoder",
                          extra="; the encoder's final norm (pre-norm) follows this choice"),
    )


def _get(args, name, default=None):
    value = getattr(args, name, default)
    if value is None:
        return default
    return value


def _set_default(args, name, value):
    if getattr(args, name, None) is None:
        setattr(args, name, value)


def fill_norm_defaults(args, encoder_norm="power", decoder_norm="layer"):
    """Fill the unset norm options of ``args`` (an architecture function's namespace).

    ``encoder_norm`` / ``decoder_norm``: the default kind of every site of that stack
    (``encoder_norm=None`` for a decoder-only model). The PowerNorm warm-up defaults to the
    learning-rate warm-up, converted to forward passes (x --update-freq).
    """
    if encoder_norm is not None:
        _set_default(args, "encoder_norm_self", encoder_norm)
        _set_default(args, "encoder_norm_ff", encoder_norm)
    _set_default(args, "decoder_norm_self", decoder_norm)
    _set_default(args, "decoder_norm_ff", decoder_norm)
    _set_default(args, "powernorm_alpha_fwd", 0.9)
    _set_default(args, "powernorm_alpha_bkw", 0.9)
    _set_default(args, "powernorm_mode", "paper")
    for flag in ("powernorm_sync", "allow_noncausal_decoder_norm", "folded_norms"):
        _set_default(args, flag, False)
    _set_default(args, "ffn_activation_norm", "none")
    if getattr(args, "powernorm_warmup", None) is None:
        update_freq = _training_setting(args, "optimization", "update_freq") or [1]
        if isinstance(update_freq, (list, tuple)) or OmegaConf.is_list(update_freq):
            update_freq = update_freq[0]
        warmup = _training_setting(args, "lr_scheduler", "warmup_updates") or 0
        args.powernorm_warmup = int(warmup) * int(update_freq)


def _training_setting(args, section, name):
    """``args.<name>``: fairseq-train's namespace holds every flag. Under fairseq-hydra-train the
    model's config holds the model's fields only, and the setting is read from the run's
    config (``<section>.<name>``). None where neither has it."""
    value = getattr(args, name, None)
    if value is None and OmegaConf.is_config(args):
        value = OmegaConf.select(args._get_root(), f"{section}.{name}")
    return value


def site_kind(args, stack, site):
    """The norm kind chosen for ``site`` ("self" or "ff") of ``stack`` ("encoder"/"decoder")."""
    return str(_get(args, f"{stack}_norm_{site}", "layer"))


def check_norm_options(args, stacks):
    """Raise ValueError, naming the flag, for option values that cannot work together."""
    for flag in ("powernorm_alpha_fwd", "powernorm_alpha_bkw"):
        value = _get(args, flag, 0.9)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"--{flag.replace('_', '-')} must lie in [0, 1), got {value}")
    if _get(args, "powernorm_warmup", 0) < 0:
        raise ValueError(f"--powernorm-warmup must be >= 0, got {args.powernorm_warmup}")
    groups = _get(args, "powernorm_groups", None)
    if groups is not None and groups < 0:
        raise ValueError(f"--powernorm-groups must be >= 0 (0 = no group scaling), got {groups}")
    for stack in stacks:
        if not any(site_kind(args, stack, site) in POWER_KINDS for site in ("self", "ff")):
            continue
        dim = _get(args, f"{stack}_embed_dim", None)
        stack_groups = groups if groups is not None else _get(args, f"{stack}_attention_heads", None)
        if dim and stack_groups and int(dim) % int(stack_groups) != 0:
            flag = "--powernorm-groups" if groups is not None else f"--{stack}-attention-heads"
            raise ValueError(
                f"{flag} {stack_groups}: the PowerNorm group scaling's group_num={stack_groups} must "
                f"divide --{stack}-embed-dim {dim} (set --powernorm-groups to a divisor, or 0 for "
                "no group scaling)"
            )
    if "decoder" in stacks and not _get(args, "allow_noncausal_decoder_norm", False):
        for site in ("self", "ff"):
            kind = site_kind(args, "decoder", site)
            if kind in NONCAUSAL_KINDS:
                raise ValueError(
                    f"--decoder-norm-{site} {kind} normalizes by the current batch's statistics, "
                    "so in training a decoder position would depend on later tokens. Use power "
                    "(causal PowerNorm), layer or rms, or pass --allow-noncausal-decoder-norm to "
                    "accept the leak (e.g. to reproduce the paper's BN / PN-V rows)"
                )
    stat_stacks = [stack for stack in stacks
                   if any(site_kind(args, stack, site) in FOLDABLE_KINDS for site in ("self", "ff"))]
    for stack in stat_stacks:
        if _get(args, "powernorm_sync", False) and _get(args, f"{stack}_layerdrop", 0) > 0:
            raise ValueError(
                f"--powernorm-sync with --{stack}-layerdrop: each rank draws the layers it drops "
                "from its own CPU random generator, which CPU dropout also draws from, as many "
                "times as its batch has elements. Ranks then drop different layers, and their "
                "all-reduces of the statistics would pair different layers; use one of the two"
            )
    if stat_stacks and _get(args, "checkpoint_activations", False):
        flag = ("--offload-activations (which checkpoints activations)"
                if _get(args, "offload_activations", False) else "--checkpoint-activations")
        raise ValueError(
            f"{flag} re-runs layer forwards during the backward pass, which would update "
            "PowerNorm/BatchNorm running statistics twice; use layer or rms norms with it"
        )


def warn_if_sync_without_workers(model):
    """Log one warning line the first time ``model`` is put in training mode with
    ``--powernorm-sync`` norms but no data-parallel workers to synchronize with.

    A warning, not an error: the flag is harmless in one process (the statistics are then the
    process's own), and a recipe that sets it keeps working when run on one device. Checked
    at training time, not at model build, because fairseq-generate and friends build the
    model of a synchronized run in a single process without training it.
    """
    if getattr(model, "_powernorm_sync_checked", False):
        return
    model._powernorm_sync_checked = True
    synced = [m for m in model.modules() if norm_uses_padding(m) and getattr(m, "sync", False)]
    if synced and distributed_world(True, synced[0].process_group) is None:
        logger.warning(
            "--powernorm-sync has no effect: training runs in a single process (distributed "
            "world size 1), so each PowerNorm/BatchNorm uses its own batch statistics"
        )
