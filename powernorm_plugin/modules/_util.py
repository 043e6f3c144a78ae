"""Input checks, padding-mask handling and dtype rules shared by the normalization layers."""
import contextlib
import math
import numbers
import operator
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


def compute_dtype(x):
    """Statistics are accumulated in fp32 for fp16/bf16/fp32 inputs and in fp64 for fp64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def autocast_off(device_type):
    """A context in which torch.autocast is off for ``device_type`` (a no-op where it is off
    already): under it a matrix product would sum the statistics in fp16 or bf16."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def checked_int(value, name, minimum):
    """``value`` as an int (a Python or NumPy integer, not a bool) of at least ``minimum``;
    otherwise a ValueError naming ``name``."""
    if not isinstance(value, bool):
        try:
            number = operator.index(value)
        except TypeError:
            number = None
        if number is not None and number >= minimum:
            return number
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def checked_float(value, name, accepts, expected):
    """``value`` as a float where it is a finite real number (not a bool) that ``accepts``;
    otherwise a ValueError naming ``name`` and what was ``expected``."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number) and accepts(number):
            return number
    raise ValueError(f"{name} must be {expected}, got {value!r}")


def checked_eps(value, layer):
    """A layer's eps, checked: a positive finite number (eps = 0 turns a constant feature into
    0 / 0 = NaN under the square root)."""
    return checked_float(value, f"{layer} eps", lambda v: v > 0, "a positive finite number")


def check_input(x, num_features, layer):
    """Raise a clear error unless ``x`` is a floating (T, B, C) tensor with C == num_features."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(
            f"{layer}: input must have shape (T, B, C) = (time, batch, {num_features}), "
            f"got a {x.dim()}-D tensor of shape {tuple(x.shape)}"
        )
    if x.size(-1) != num_features:
        raise ValueError(
            f"{layer}: input has {x.size(-1)} features in its last dimension, "
            f"expected num_features={num_features} (input shape {tuple(x.shape)})"
        )
    if not x.is_floating_point():
        raise TypeError(f"{layer}: input must be a floating-point tensor, got {x.dtype}")


@dataclass
class TokenMask:
    """Which rows of the flattened (T*B, C) input are real tokens.

    ``weights`` is 1.0 for tokens and 0.0 for padding (None: no padding), ``count`` the number
    of tokens, ``rows`` the number of rows.
    """

    weights: Optional[torch.Tensor]
    count: int
    rows: int


#: Whether the batch under way is ignored (inside :func:`ignored_batch`).
_ignored = [False]


@contextlib.contextmanager
def ignored_batch():
    """Within it, PowerNorm and MaskedBatchNorm take every row of a training call as padding.

    For a batch whose loss is thrown away, as fairseq's dummy batches are (a data-parallel
    rank that has run out of batches trains on a copy of an earlier one, its loss times 0, so
    that it joins its peers' gradient all-reduce): such a batch must not move the running
    statistics. Synchronized layers still take part in their all-reduces, with no tokens.
    The flag is the process's, not a thread's (fairseq trains in one thread): a program that
    trains in several threads at once must not use it while another thread trains.
    """
    before = _ignored[0]
    _ignored[0] = True
    try:
        yield
    finally:
        _ignored[0] = before


def token_mask(padding_mask, T, B, device, dtype, layer):
    """Turn fairseq's (B, T) bool padding mask into a :class:`TokenMask` over (T*B) rows.

    Every norm of a fairseq encoder or decoder gets the same mask tensor in one forward call,
    and counting its tokens waits for the device on a GPU; the last mask's TokenMask is
    therefore kept and reused while the tensor is unchanged: the same object, version (which
    every in-place change through torch bumps) and memory. A change torch does not see (a
    write through a NumPy array sharing the memory) goes unnoticed: pass a new tensor then.
    """
    rows = T * B
    if _ignored[0]:
        return TokenMask(torch.zeros(rows, device=device, dtype=dtype), 0, rows)
    if padding_mask is None:
        return TokenMask(None, rows, rows)
    source, cached_key, cached = _last_mask[0]
    if source() is padding_mask:
        key = _mask_key(padding_mask, T, B, device, dtype)
        if key is not None and key == cached_key:
            return cached  # checked when it was cached, for the same (T, B)
    if not isinstance(padding_mask, torch.Tensor) or padding_mask.dtype != torch.bool:
        got = padding_mask.dtype if isinstance(padding_mask, torch.Tensor) else type(padding_mask).__name__
        raise TypeError(f"{layer}: padding_mask must be a bool tensor (True = padding), got {got}")
    if tuple(padding_mask.shape) != (B, T):
        raise ValueError(
            f"{layer}: padding_mask must have shape (B, T) = ({B}, {T}) for an input of shape "
            f"(T, B, C) = ({T}, {B}, C), got {tuple(padding_mask.shape)}"
        )
    key = _mask_key(padding_mask, T, B, device, dtype)
    source = weakref.ref(padding_mask)
    if padding_mask.device != device:
        padding_mask = padding_mask.to(device)
    count = rows - int(padding_mask.sum())
    if count == rows:  # nothing padded: the layers take their cheaper mask-free paths
        mask = TokenMask(None, rows, rows)
    else:
        weights = torch.logical_not(padding_mask.t()).reshape(rows).to(dtype)
        mask = TokenMask(weights, count, rows)
    if key is not None:
        _last_mask[0] = (source, key, mask)
    return mask


def _mask_key(padding_mask, T, B, device, dtype):
    """What the cached TokenMask of this mask tensor was made from; None for a mask that is
    not cached (an inference-mode tensor, which has no version)."""
    try:
        return padding_mask._version, padding_mask.data_ptr(), T, B, device, dtype
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None


def dead_ref():
    """What a weak reference to a collected object returns: a reference that matches nothing."""
    return None


#: (weak reference to the last padding mask cached, _mask_key of it, its TokenMask)
_last_mask = [(dead_ref, None, None)]


def distributed_world(enabled, group=None):
    """The process group to synchronize over, or None when there is nothing to synchronize."""
    if not enabled or not dist.is_available() or not dist.is_initialized():
        return None
    if dist.get_world_size(group) == 1:
        return None
    return group if group is not None else dist.group.WORLD


def all_reduce_sum(tensor, group, copy=False):
    """Sum ``tensor`` over ``group``, in place, or into a copy with ``copy=True`` (for a
    tensor still needed as it is); with group None, ``tensor`` itself."""
    if group is not None:
        if copy:
            tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def register_affine(module, num_features, affine):
    """Give ``module`` a learned per-feature scale ``weight`` (init 1) and shift ``bias``
    (init 0), or register both as None when ``affine`` is false."""
    from torch import nn

    if affine:
        module.weight = nn.Parameter(torch.ones(num_features))
        module.bias = nn.Parameter(torch.zeros(num_features))
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)


class FP32BuffersMixin:
    """Keep floating buffers at fp32 or wider through ``model.half()`` / ``.to(bfloat16)``.

    Running statistics accumulate small per-step updates; in fp16 they would stall or
    overflow. Parameters follow the model's dtype as usual; buffers only follow its device.
    """

    def _apply(self, fn, *args, **kwargs):
        kept = {k: b for k, b in self._buffers.items() if b is not None and b.is_floating_point()}
        result = super()._apply(fn, *args, **kwargs)
        for name, old in kept.items():
            new = self._buffers[name]
            dtype = torch.promote_types(new.dtype, torch.float32)
            if dtype != new.dtype:
                # Convert from the untouched old buffer, not the rounded one.
                self._buffers[name] = old.to(device=new.device, dtype=dtype)
        return result
