"""Averaging of model state dicts (checkpoint averaging), entry by entry.

Rules, for state dicts that must agree in keys, shapes and dtypes:

* floating-point tensors (parameters and float buffers) are averaged arithmetically,
  accumulated in float64 and cast back to their dtype;
* integer and boolean tensors (step counters such as PowerNorm's ``num_steps``, masks) are
  taken from the last state dict: the mean of a counter is no step any checkpoint reached,
  and warm-up or resume logic keyed on it would go wrong;
* non-tensor entries are taken from the last state dict.

PowerNorm buffers under these rules:

* ``running_phi`` holds psi^2, an exponential running mean of the squared activations.
  The arithmetic mean of psi^2 over K checkpoints is the mean square of the union of the
  K checkpoints' statistics windows (each window weighted equally), i.e. itself a
  quadratic mean, which is what the averaged weights see at inference:
  ``y = gamma * x / sqrt(psi^2 + eps) + beta``. Averaging psi (the root) instead would
  give a different, biased-low value (by Jensen's inequality), and no window's statistic.
* ``running_nu`` is only read by the training-time backward pass; it is averaged like
  any float buffer, so training resumed from an average starts from the mean correction.
* ``num_steps`` is an int64 counter and is taken from the last checkpoint.
"""
from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional, Sequence

import torch


class StateDictMismatchError(ValueError):
    """State dicts to average differ in keys, shapes or dtypes."""


def _averaged(value: Any) -> bool:
    return torch.is_tensor(value) and value.is_floating_point()


class StateDictAverager:
    """Streaming average of state dicts: :meth:`add` them one at a time, then :meth:`average`.

    Only a float64 sum per float tensor is kept between calls, so averaging K checkpoints
    needs memory for the sums and one checkpoint, however large K is.
    """

    def __init__(self) -> None:
        self._first_name: Optional[str] = None
        self._reference: "OrderedDict[str, Any]" = OrderedDict()
        self._sums: Dict[str, torch.Tensor] = {}
        self._last: Dict[str, Any] = {}
        self.count = 0

    def _check(self, state_dict: Mapping[str, Any], name: str) -> None:
        for key in self._reference:
            if key not in state_dict:
                raise StateDictMismatchError(
                    f"{name}: key '{key}' is missing; it is in {self._first_name}"
                )
        for key in state_dict:
            if key not in self._reference:
                raise StateDictMismatchError(
                    f"{name}: key '{key}' is not in {self._first_name}"
                )
        for key, reference in self._reference.items():
            value = state_dict[key]
            if torch.is_tensor(reference) != torch.is_tensor(value):
                raise StateDictMismatchError(
                    f"{name}: key '{key}' is a {type(value).__name__}, "
                    f"but a {type(reference).__name__} in {self._first_name}"
                )
            if not torch.is_tensor(value):
                continue
            if value.shape != reference.shape:
                raise StateDictMismatchError(
                    f"{name}: key '{key}' has shape {list(value.shape)}, "
                    f"but {list(reference.shape)} in {self._first_name}"
                )
            if value.dtype != reference.dtype:
                raise StateDictMismatchError(
                    f"{name}: key '{key}' has dtype {value.dtype}, "
                    f"but {reference.dtype} in {self._first_name}"
                )

    def add(self, state_dict: Mapping[str, Any], name: Optional[str] = None) -> None:
        """Add one state dict; ``name`` (e.g. its file) is used in mismatch errors."""
        name = name if name is not None else f"state dict #{self.count + 1}"
        if self.count == 0:
            self._first_name = name
            for key, value in state_dict.items():
                self._reference[key] = (
                    torch.empty(value.shape, dtype=value.dtype, device="meta")
                    if torch.is_tensor(value)
                    else value
                )
        else:
            self._check(state_dict, name)
        for key, value in state_dict.items():
            if _averaged(value):
                contribution = value.detach().to(device="cpu", dtype=torch.float64)
                if key in self._sums:
                    self._sums[key].add_(contribution)
                else:
                    self._sums[key] = contribution.clone()
            else:
                self._last[key] = value.detach().cpu().clone() if torch.is_tensor(value) else value
        self.count += 1

    def average(self) -> "OrderedDict[str, Any]":
        """The averaged state dict, in the key order of the first state dict added."""
        if self.count == 0:
            raise ValueError("no state dicts to average")
        result: "OrderedDict[str, Any]" = OrderedDict()
        for key, reference in self._reference.items():
            if key in self._sums:
                result[key] = (self._sums[key] / self.count).to(reference.dtype)
            else:
                result[key] = self._last[key]
        return result


def average_state_dicts(
    state_dicts: Sequence[Mapping[str, Any]], names: Optional[Sequence[str]] = None
) -> "OrderedDict[str, Any]":
    """Average state dicts entry by entry under the rules in this module's docstring.

    ``names`` label the state dicts in :class:`StateDictMismatchError` messages.
    """
    if names is not None and len(names) != len(state_dicts):
        raise ValueError(f"{len(names)} names for {len(state_dicts)} state dicts")
    averager = StateDictAverager()
    for index, state_dict in enumerate(state_dicts):
        averager.add(state_dict, names[index] if names is not None else None)
    return averager.average()
