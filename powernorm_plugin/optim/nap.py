"""``nap_<name>``: a Normalize-and-Project variant of every registered fairseq optimizer.

``--optimizer nap_adam --adam-betas '(0.9, 0.98)'`` is ``--optimizer adam --adam-betas
'(0.9, 0.98)'`` followed, after every optimizer step, by a projection of each selected
weight back to its norm at the start of training. The wrapper sits *inside* fairseq's
precision wrappers (``FP16Optimizer`` builds it on the fp32 master parameters,
``MemoryEfficientFP16Optimizer`` and ``AMPOptimizer`` on the model's parameters), so the
projection acts on the weights the next forward pass uses: under ``--fp16`` the fp32
master copy, which the FP16 wrapper then copies into the model.
"""
import dataclasses
import logging
from argparse import ArgumentParser, Namespace
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.logging import metrics
from fairseq.optim import (
    OPTIMIZER_DATACLASS_REGISTRY,
    OPTIMIZER_REGISTRY,
    FairseqOptimizer,
    register_optimizer,
)
from omegaconf import II

from ..nap import NormProjector, select_groups
from .names import resolve_names

logger = logging.getLogger(__name__)

NAP_PREFIX = "nap_"
NAP_NORM_PARAMS = ChoiceEnum(["free", "joint"])
STATE_KEY = "nap"


@dataclass
class NaPConfig(FairseqDataclass):
    nap_include: Optional[str] = field(
        default=None,
        metadata={
            "help": "NaP: also project parameters whose name matches this regular "
            "expression (re.search), e.g. 'embed_tokens'"
        },
    )
    nap_exclude: Optional[str] = field(
        default=None,
        metadata={"help": "NaP: never project parameters whose name matches this regex"},
    )
    nap_norm_params: NAP_NORM_PARAMS = field(
        default="free",
        metadata={
            "help": "NaP: normalization layers' scale and offset are left free, or "
            "projected jointly (the pair to its initial norm)"
        },
    )
    nap_every: int = field(
        default=1, metadata={"help": "NaP: project (and log) every N updates"}
    )
    nap_monitor_only: bool = field(
        default=False,
        metadata={"help": "NaP: measure and log the weight norms, never project"},
    )


NAP_FIELDS = [f.name for f in dataclasses.fields(NaPConfig) if f.name.startswith("nap_")]


def nap_options(cfg) -> dict:
    """The NaP options of an optimizer config (DictConfig, dataclass or Namespace)."""
    out = {}
    for f in dataclasses.fields(NaPConfig):
        if not f.name.startswith("nap_"):
            continue
        v = getattr(cfg, f.name, f.default) if cfg is not None else f.default
        if v is None and f.default is not None:
            v = f.default
        out[f.name] = v
    norm = out["nap_norm_params"]
    out["nap_norm_params"] = str(getattr(norm, "value", norm))
    if out["nap_norm_params"] not in ("free", "joint"):
        raise ValueError(
            f"--nap-norm-params must be 'free' or 'joint', got {out['nap_norm_params']!r}"
        )
    every = out["nap_every"]
    if int(every) != every or int(every) < 1:
        raise ValueError(f"--nap-every must be a positive integer, got {every!r}")
    out["nap_every"] = int(every)
    out["nap_monitor_only"] = bool(out["nap_monitor_only"])
    return out


class NaPOptimizer(FairseqOptimizer):
    """Wraps the fairseq optimizer ``base_name`` and projects after each step."""

    base_name: str = ""

    def __init__(self, cfg, params):
        super().__init__(cfg)
        if self.base_name not in OPTIMIZER_REGISTRY:
            raise ValueError(f"NaP: unknown base optimizer {self.base_name!r}")
        opts = nap_options(cfg)
        self.nap_every = opts["nap_every"]
        self.nap_monitor_only = opts["nap_monitor_only"]
        params = list(params)
        tensors = []
        for p in params:
            if isinstance(p, dict):
                tensors.extend(p["params"] if "params" in p else p.values())
            else:
                tensors.append(p)
        base_cls = OPTIMIZER_REGISTRY[self.base_name]
        builder = getattr(base_cls, "build_optimizer", base_cls)
        self.base = builder(cfg, params)

        names, views, kinds, mode, flat = resolve_names(tensors)
        self._mode, self._flat = mode, flat
        self._flat_ptr = flat.data_ptr() if flat is not None else None
        self._names, self._kinds = names, kinds
        groups = select_groups(
            names, kinds, opts["nap_include"], opts["nap_exclude"], opts["nap_norm_params"]
        )
        self.projector = NormProjector(
            [[views[i] for i in g.members] for g in groups], [g.name for g in groups]
        )
        if flat is not None:  # each group's views, as (offset, shape) in the flat buffer
            esize = flat.element_size()
            self._flat_layout = {
                name: [((t.data_ptr() - self._flat_ptr) // esize, t.shape) for t in g]
                for name, g in zip(self.projector.names, self.projector.groups)
            }
        if self.projector.skipped:
            logger.info(
                "NaP: skipping %d parameter group(s) with zero initial norm: %s",
                len(self.projector.skipped),
                ", ".join(self.projector.skipped[:10]),
            )
        if len(self.projector) == 0:
            raise ValueError(
                "NaP: no parameter to project (the selection is empty or every selected "
                "parameter has a projection target of zero); check --nap-include/--nap-exclude"
            )
        logger.info(
            "NaP (%s%s): projecting %d group(s) (%d tensors, params matched by %s) every %d update(s)",
            self.base_name,
            ", monitor only" if self.nap_monitor_only else "",
            len(self.projector),
            self.projector.num_tensors,
            mode,
            self.nap_every,
        )
        self._num_steps = 0
        self._pending_post = None
        self._loading = False
        try:
            self._hook_state_dict(self.base.optimizer)
        except NotImplementedError:  # a fairseq optimizer with no torch optimizer (yet)
            pass

    # ------------------------------------------------------------ delegation
    def __getattr__(self, name):
        # only called for attributes not found normally (e.g. composite's lr_scheduler)
        if name.startswith("__") or "base" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["base"], name)

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)

    @property
    def optimizer(self):
        return self.base.optimizer

    @optimizer.setter
    def optimizer(self, optimizer):
        self.base.optimizer = optimizer
        self._hook_state_dict(optimizer)

    @property
    def optimizer_config(self):
        return self.base.optimizer_config

    @property
    def param_groups(self):
        return self.base.param_groups

    @property
    def params(self):
        return self.base.params

    def get_lr(self):
        return self.base.get_lr()

    def set_lr(self, lr):
        self.base.set_lr(lr)
        # The trainer sets the next update's lr right after each step: log the effective
        # learning rate with it, so that nap_elr_* matches fairseq's logged ``lr``.
        post = self.__dict__.get("_pending_post")
        if post is not None:
            self._pending_post = None
            self._log_elr(post, lr)

    def backward(self, loss):
        self.base.backward(loss)

    def all_reduce_grads(self, module):
        self.base.all_reduce_grads(module)

    def multiply_grads(self, c):
        self.base.multiply_grads(c)

    def clip_grad_norm(self, max_norm, aggregate_norm_fn=None):
        return self.base.clip_grad_norm(max_norm, aggregate_norm_fn)

    def zero_grad(self):
        self.base.zero_grad()

    @property
    def supports_memory_efficient_fp16(self):
        return self.base.supports_memory_efficient_fp16

    @property
    def supports_step_with_scale(self):
        return self.base.supports_step_with_scale

    @property
    def supports_groups(self):
        return self.base.supports_groups

    @property
    def supports_flat_params(self):
        return self.base.supports_flat_params

    def average_params(self):
        self.base.average_params()

    def broadcast_global_state_dict(self, state_dict):
        nap = state_dict.get(STATE_KEY) if isinstance(state_dict, dict) else None
        out = self.base.broadcast_global_state_dict(state_dict)
        if nap is not None and isinstance(out, dict) and STATE_KEY not in out:
            out = dict(out)
            out[STATE_KEY] = nap
        return out

    # ----------------------------------------------------------------- step
    def step(self, *args, **kwargs):
        out = self.base.step(*args, **kwargs)
        self._after_step()
        return out

    @torch.no_grad()
    def _after_step(self):
        self._num_steps += 1
        if self._num_steps % self.nap_every != 0 or len(self.projector) == 0:
            return
        self._check_flat_buffer()
        norms = self.projector.norms()
        if not self.nap_monitor_only:
            self.projector.project_(norms)
            post = self.projector.targets
        else:
            post = norms
        ratio = norms / self.projector.targets
        for k, v in (
            ("nap_ratio_mean", ratio.mean()),
            ("nap_ratio_min", ratio.min()),
            ("nap_ratio_max", ratio.max()),
        ):
            metrics.log_scalar(k, v, weight=0, priority=900)
        self._log_elr(post, self.get_lr())
        self._pending_post = post

    @staticmethod
    def _log_elr(post_norms, lr):
        """lr / ||W||^2 over the projected groups (logged as the latest value, like lr)."""
        elr = float(lr) / (post_norms * post_norms).clamp_min(1e-30)
        for k, v in (
            ("nap_elr_mean", elr.mean()),
            ("nap_elr_min", elr.min()),
            ("nap_elr_max", elr.max()),
        ):
            metrics.log_scalar(k, v, weight=0, priority=900)

    def _check_flat_buffer(self):
        """Re-point the views if the flat fp32 master buffer got new storage."""
        if self._flat is None or self._flat.data_ptr() == self._flat_ptr:
            return
        data = self._flat.detach()
        groups = [
            [data[off : off + shape.numel()].view(shape) for off, shape in self._flat_layout[name]]
            for name in self.projector.names
        ]
        self.projector.replace_tensors(groups)
        self._flat_ptr = self._flat.data_ptr()

    # ---------------------------------------------------------- persistence
    def nap_state_dict(self) -> dict:
        return {
            "version": 1,
            "base": self.base_name,
            "projector": self.projector.state_dict(),
            "num_steps": self._num_steps,
        }

    def state_dict(self):
        sd = self.base.state_dict()
        sd = dict(sd)
        sd[STATE_KEY] = self.nap_state_dict()
        return sd

    def load_state_dict(self, state_dict, optimizer_overrides=None):
        sd = dict(state_dict)
        nap = sd.pop(STATE_KEY, None)
        self._loading = True
        try:
            self.base.load_state_dict(sd, optimizer_overrides)
        finally:
            self._loading = False
        self._load_nap_state(nap)

    def _hook_state_dict(self, optimizer):
        """Carry NaP's state in the torch optimizer's own state dict too. fairseq's
        AMPOptimizer saves and loads ``optimizer.state_dict()`` of the torch optimizer
        directly, past :meth:`state_dict` and :meth:`load_state_dict` above."""
        if isinstance(optimizer, torch.optim.Optimizer):
            optimizer.register_state_dict_post_hook(self._add_nap_state)
            optimizer.register_load_state_dict_pre_hook(self._take_nap_state)

    def _add_nap_state(self, optimizer, state_dict):
        state_dict[STATE_KEY] = self.nap_state_dict()

    def _take_nap_state(self, optimizer, state_dict):
        if self._loading:  # from load_state_dict above, which restores NaP's state itself
            return None
        state_dict = dict(state_dict)
        self._load_nap_state(state_dict.pop(STATE_KEY, None))
        return state_dict

    def _load_nap_state(self, nap):
        if nap is None:
            logger.warning(
                "NaP: the optimizer state has no NaP targets (checkpoint from another "
                "optimizer?); the target norms stay those of the loaded weights"
            )
            return
        missing = self.projector.load_state_dict(nap["projector"])
        if missing:
            logger.warning(
                "NaP: no saved target norm for %d group(s) (selection changed?); they keep "
                "the norms of the loaded weights: %s",
                len(missing),
                ", ".join(missing[:10]),
            )
        self._num_steps = int(nap.get("num_steps", 0))

    # ---------------------------------------------------------- inspection
    @torch.no_grad()
    def nap_norm_ratios(self) -> torch.Tensor:
        """||W|| / ||W_0|| of every projected group now."""
        return self.projector.norms() / self.projector.targets

    @property
    def nap_group_names(self) -> List[str]:
        return list(self.projector.names)


# ---------------------------------------------------------------- registration
def _field_from_action(action) -> Optional[tuple]:
    import argparse

    if isinstance(action, argparse._HelpAction) or action.dest in (None, argparse.SUPPRESS):
        return None
    help_ = action.help if isinstance(action.help, str) else None
    meta = {"help": help_} if help_ else {}
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return (action.dest, bool, field(default=bool(action.default), metadata=meta))
    default = action.default
    typ = action.type
    if typ in (int, float) and isinstance(default, str):
        default = typ(default)
    if action.nargs not in (None, "?"):
        return (action.dest, Any, field(default=default, metadata=meta))
    if typ in (int, float, str) or (typ is None and isinstance(default, (str, type(None)))):
        t = typ or str
        return (action.dest, Optional[t], field(default=default, metadata=meta))
    return (action.dest, Any, field(default=default, metadata=meta))


def _legacy_dataclass(base_name: str, base_cls) -> type:
    """A dataclass with the fields a legacy (``add_args``) optimizer defines."""
    parser = ArgumentParser(add_help=False)
    if hasattr(base_cls, "add_args"):
        base_cls.add_args(parser)
    fields_, seen = [], set()
    for action in parser._actions:
        f = _field_from_action(action)
        if f is None or f[0] in seen:
            continue
        seen.add(f[0])
        fields_.append(f)
    if "lr" not in seen:
        fields_.append(("lr", List[float], field(default=II("optimization.lr"))))
    return dataclasses.make_dataclass(
        f"Legacy{base_cls.__name__}Config", fields_, bases=(FairseqDataclass,)
    )


def make_nap_optimizer(base_name: str):
    """Create and register ``nap_<base_name>``; returns the new class."""
    if base_name not in OPTIMIZER_REGISTRY:
        raise ValueError(
            f"NaP: unknown base optimizer {base_name!r}; registered optimizers: "
            + ", ".join(sorted(OPTIMIZER_REGISTRY))
        )
    if base_name.startswith(NAP_PREFIX):
        raise ValueError(f"NaP: {base_name!r} is already a NaP optimizer")
    name = NAP_PREFIX + base_name
    if name in OPTIMIZER_REGISTRY:
        return OPTIMIZER_REGISTRY[name]
    base_cls = OPTIMIZER_REGISTRY[base_name]
    base_dc = OPTIMIZER_DATACLASS_REGISTRY.get(base_name)
    legacy = base_dc is None
    if legacy:
        base_dc = _legacy_dataclass(base_name, base_cls)
    dc = dataclasses.make_dataclass(
        f"NaP{base_cls.__name__}Config", [], bases=(base_dc, NaPConfig)
    )
    dc.__module__ = __name__

    def add_args(cls, parser):
        """The base optimizer's own flags, then NaP's."""
        base_cls.add_args(parser)
        gen_parser_from_dataclass(parser, NaPConfig())

    cls = type(
        f"NaP{base_cls.__name__}",
        (NaPOptimizer,),
        {
            "base_name": base_name,
            "add_args": classmethod(add_args),
            "__module__": __name__,
            "__doc__": f"Normalize-and-Project around fairseq's {base_name!r} optimizer.",
        },
    )
    globals()[cls.__name__] = cls
    globals()[dc.__name__] = dc
    register_optimizer(name, dataclass=dc)(cls)
    return cls


def register_all() -> List[str]:
    """Register ``nap_<name>`` for every optimizer registered so far."""
    made = []
    for base in sorted(OPTIMIZER_REGISTRY):
        if base.startswith(NAP_PREFIX):
            continue
        try:
            make_nap_optimizer(base)
            made.append(NAP_PREFIX + base)
        except Exception as e:  # never break fairseq start-up for one odd optimizer
            logger.warning("NaP: could not register nap_%s: %s", base, e)
    return made
