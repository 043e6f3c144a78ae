"""Normalize-and-Project: keep groups of weights at fixed (initial) norms.

Pure PyTorch: no fairseq import. The hot path (:meth:`NormProjector.project_`) is a
handful of multi-tensor operations per device (``torch._foreach_norm``,
``torch._foreach_mul_``) with no per-parameter Python loop and no host-device
synchronisation.
"""
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch

_HAS_FOREACH_NORM_DTYPE = True


def _foreach_norm_fp32(tensors: List[torch.Tensor]) -> torch.Tensor:
    """2-norms of ``tensors`` as one float32 vector, accumulated in float32 (in float64 for
    float64 tensors, which torch will not narrow)."""
    global _HAS_FOREACH_NORM_DTYPE
    if not tensors:
        return torch.zeros(0, dtype=torch.float32)
    wide = [i for i, t in enumerate(tensors) if t.dtype == torch.float64]
    if wide:  # their norms in float64, the others' as below, each in its place
        norms = torch.empty(len(tensors), device=tensors[0].device, dtype=torch.float32)
        norms[wide] = torch.stack(torch._foreach_norm([tensors[i] for i in wide], 2)).float()
        rest = [i for i, t in enumerate(tensors) if t.dtype != torch.float64]
        if rest:
            norms[rest] = _foreach_norm_fp32([tensors[i] for i in rest])
        return norms
    if _HAS_FOREACH_NORM_DTYPE:
        try:
            return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))
        except TypeError:  # torch without the dtype argument
            _HAS_FOREACH_NORM_DTYPE = False
    if all(t.dtype == torch.float32 for t in tensors):
        return torch.stack(torch._foreach_norm(tensors, 2))
    return torch.stack(torch._foreach_norm([t.float() for t in tensors], 2))


class NormProjector:
    """Project groups of tensors back to target norms.

    Args:
        groups: one list of tensors per group; a group is projected jointly, i.e.
            all its tensors are multiplied by the same factor so that the norm of
            their concatenation equals the group's target. Tensors are modified in
            place (views of a larger flat buffer are fine).
        names: one name per group (used to save and restore the targets).
        targets: the target norms; ``None`` records the current norms.
        skip_zero: drop groups whose recorded norm is zero (never trained, e.g. a
            zero-initialised matrix) instead of failing. Given ``targets`` must be
            positive and finite.
    """

    def __init__(
        self,
        groups: Sequence[Sequence[torch.Tensor]],
        names: Sequence[str],
        targets: Optional[torch.Tensor] = None,
        skip_zero: bool = True,
    ):
        if len(groups) != len(names):
            raise ValueError("one name per group is needed")
        if len(set(names)) != len(names):
            raise ValueError("group names must be unique")
        self.skipped: List[str] = []
        self.attached_steps = 0  # optimizer steps seen by attach()'s hook
        self._setup([list(g) for g in groups], list(names))
        if targets is None:
            self.record_targets(skip_zero=skip_zero)
        else:
            self.set_targets(targets)

    # ------------------------------------------------------------------ set-up
    def _setup(self, groups: List[List[torch.Tensor]], names: List[str]) -> None:
        self.groups = groups
        self.names = names
        self.device = None
        buckets: "OrderedDict[torch.device, List[int]]" = OrderedDict()
        flat: List[torch.Tensor] = []
        owner: List[int] = []
        for gi, g in enumerate(groups):
            if not g:
                raise ValueError(f"projection group {names[gi]!r} is empty")
            for t in g:
                flat.append(t)
                owner.append(gi)
        if flat:
            self.device = flat[0].device
        for ti, t in enumerate(flat):
            buckets.setdefault(t.device, []).append(ti)
        self._tensors = flat
        self._buckets = [
            (dev, [flat[i] for i in idx], torch.tensor(idx, dtype=torch.long, device=self.device))
            for dev, idx in buckets.items()
        ]
        self._owner = torch.tensor(owner, dtype=torch.long, device=self.device)
        self._single = len(flat) == len(groups)  # every group has one tensor

    def replace_tensors(self, groups: Sequence[Sequence[torch.Tensor]]) -> None:
        """Point the projector at new tensors (same group structure), keeping targets."""
        if len(groups) != len(self.groups) or any(
            len(a) != len(b) for a, b in zip(groups, self.groups)
        ):
            raise ValueError("replace_tensors needs the same group structure")
        targets = self.targets
        self._setup([list(g) for g in groups], self.names)
        self.targets = targets.to(self.device)

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def num_tensors(self) -> int:
        return len(self._tensors)

    # ------------------------------------------------------------------- norms
    @torch.no_grad()
    def norms(self) -> torch.Tensor:
        """Current norm of every group (float32, on the projector's device)."""
        if not self._tensors:
            return torch.zeros(0, dtype=torch.float32)
        if len(self._buckets) == 1:
            tn = _foreach_norm_fp32(self._buckets[0][1]).to(self.device)
        else:
            tn = torch.empty(len(self._tensors), device=self.device, dtype=torch.float32)
            for _, ts, idx in self._buckets:
                tn[idx] = _foreach_norm_fp32(ts).to(self.device)
        if self._single:
            return tn
        sq = torch.zeros(len(self.groups), device=self.device, dtype=torch.float32)
        sq.index_add_(0, self._owner, tn * tn)
        return sq.sqrt_()

    @torch.no_grad()
    def record_targets(self, skip_zero: bool = True) -> None:
        """Record the current norms as targets (synchronises once)."""
        t = self.norms()
        bad = ~(torch.isfinite(t) & (t > 0))
        if bool(bad.any()):
            bad_names = [n for n, b in zip(self.names, bad.tolist()) if b]
            if not skip_zero:
                raise ValueError(
                    "NaP: projection target of zero (or non-finite) for "
                    + ", ".join(bad_names)
                )
            keep = [i for i, b in enumerate(bad.tolist()) if not b]
            self.skipped += bad_names
            self._setup([self.groups[i] for i in keep], [self.names[i] for i in keep])
            t = t[torch.tensor(keep, dtype=torch.long, device=t.device)] if keep else t[:0]
        self.targets = t.float().clone()

    def set_targets(self, targets) -> None:
        """Set the target norms explicitly; each must be positive and finite."""
        t = torch.as_tensor(targets, dtype=torch.float32).reshape(-1)
        if t.numel() != len(self.groups):
            raise ValueError(f"{t.numel()} targets given for {len(self.groups)} groups")
        bad = ~(torch.isfinite(t) & (t > 0))
        if bool(bad.any()):
            bad_names = [n for n, b in zip(self.names, bad.tolist()) if b]
            raise ValueError(
                "NaP: projection target of zero (or non-finite) for " + ", ".join(bad_names)
            )
        self.targets = t.to(self.device) if self.device is not None else t

    # -------------------------------------------------------------- projection
    @torch.no_grad()
    def project_(self, norms: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rescale every group to its target norm, in place.

        Returns the norms measured before the projection. A group whose current norm
        is zero is left alone (no division by zero).
        """
        if norms is None:
            norms = self.norms()
        if not self._tensors:
            return norms
        scale = torch.where(norms > 0, self.targets / norms.clamp_min(1e-30), torch.ones_like(norms))
        per_tensor = scale if self._single else scale[self._owner]
        for dev, ts, idx in self._buckets:
            s = per_tensor if len(self._buckets) == 1 else per_tensor[idx]
            s = s.to(dev)
            torch._foreach_mul_(ts, list(s.unbind(0)))
        return norms

    @torch.no_grad()
    def stats(self, norms: torch.Tensor, lr: float, projected: bool) -> Dict[str, torch.Tensor]:
        """Effective learning rate and norm ratio, as 0-d tensors (no synchronisation).

        ``nap_ratio_*``: ||W|| / ||W_0|| measured after the optimizer's update (before
        any projection). ``nap_elr_*``: lr / ||W||^2 of the weights the next forward
        pass uses (after the projection when ``projected``).
        """
        if not self._tensors:
            return {}
        ratio = norms / self.targets
        post = self.targets if projected else norms
        elr = lr / (post * post).clamp_min(1e-30)
        return {
            "nap_elr_mean": elr.mean(),
            "nap_elr_min": elr.min(),
            "nap_elr_max": elr.max(),
            "nap_ratio_mean": ratio.mean(),
            "nap_ratio_min": ratio.min(),
            "nap_ratio_max": ratio.max(),
        }

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        return {
            "names": list(self.names),
            "targets": self.targets.detach().float().cpu().clone(),
            "skipped": list(self.skipped),
            "attached_steps": self.attached_steps,
        }

    def load_state_dict(self, state: dict, strict: bool = False) -> List[str]:
        """Restore targets by group name, and leave out again the groups ``state`` skipped
        (a norm of zero when its targets were recorded: the run that saved it never projects
        them, though they have trained away from zero since). Returns the names of groups
        that kept their freshly recorded targets (in neither list of ``state``); ``strict``
        makes that an error."""
        saved = dict(zip(state["names"], torch.as_tensor(state["targets"]).float().tolist()))
        skipped = set(state.get("skipped", ())) - saved.keys()
        if any(n in skipped for n in self.names):
            keep = [i for i, n in enumerate(self.names) if n not in skipped]
            self.skipped += [n for n in self.names if n in skipped]
            targets = self.targets[torch.tensor(keep, dtype=torch.long, device=self.targets.device)]
            self._setup([self.groups[i] for i in keep], [self.names[i] for i in keep])
            self.targets = targets
        missing = [n for n in self.names if n not in saved]
        if strict and missing:
            raise KeyError("NaP state has no target norm for " + ", ".join(missing))
        cur = self.targets.detach().float().cpu().tolist()
        new = [saved.get(n, c) for n, c in zip(self.names, cur)]
        self.set_targets(torch.tensor(new, dtype=torch.float32))
        self.attached_steps = int(state.get("attached_steps", 0))
        return missing

    # ------------------------------------------------------- plain PyTorch use
    def attach(self, optimizer: torch.optim.Optimizer, every: int = 1):
        """Project after every ``every``-th ``optimizer.step()`` (plain PyTorch).

        The steps are counted in ``attached_steps``, which :meth:`state_dict` saves, so a
        resumed run projects at the steps an uninterrupted one does. Returns the hook handle
        (``handle.remove()`` detaches)."""
        if every < 1:
            raise ValueError("every must be >= 1")

        def hook(opt, args, kwargs):
            self.attached_steps += 1
            if self.attached_steps % every == 0:
                self.project_()

        return optimizer.register_step_post_hook(hook)

    @classmethod
    def from_module(
        cls,
        module: torch.nn.Module,
        include: Optional[str] = None,
        exclude: Optional[str] = None,
        norm_params: str = "free",
    ) -> "NormProjector":
        """A projector over ``module``'s parameters selected as NaP does by default."""
        from .selection import named_parameter_list, select_groups

        names, params, kinds = named_parameter_list([("", module)])
        groups = select_groups(names, kinds, include, exclude, norm_params)
        if not groups:
            raise ValueError("NaP: no parameter selected for projection")
        return cls([[params[i] for i in g.members] for g in groups], [g.name for g in groups])
