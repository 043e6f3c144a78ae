"""Input checks, padding-mask handling and dtype rules shared by the normalization layers."""
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .host_mirrors import dead_ref


def compute_dtype(x):
    """Statistics are accumulated in fp32 for fp16/bf16/fp32 inputs and in fp64 for fp64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


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


def token_mask(padding_mask, T, B, device, dtype, layer):
    """Turn fairseq's (B, T) bool padding mask into a :class:`TokenMask` over (T*B) rows.

    Every norm of a fairseq encoder or decoder gets the same mask tensor in one forward call,
    and counting its tokens waits for the device on a GPU; the last mask's TokenMask is
    therefore kept and reused while the tensor is unchanged (same object, same version).
    """
    rows = T * B
    if padding_mask is None:
        return TokenMask(None, rows, rows)
    source, cached_key, cached = _last_mask[0]
    if source() is padding_mask and cached_key == (padding_mask._version, T, B, device, dtype):
        return cached  # checked when it was cached, for the same (T, B)
    if not isinstance(padding_mask, torch.Tensor) or padding_mask.dtype != torch.bool:
        got = padding_mask.dtype if isinstance(padding_mask, torch.Tensor) else type(padding_mask).__name__
        raise TypeError(f"{layer}: padding_mask must be a bool tensor (True = padding), got {got}")
    if tuple(padding_mask.shape) != (B, T):
        raise ValueError(
            f"{layer}: padding_mask must have shape (B, T) = ({B}, {T}) for an input of shape "
            f"(T, B, C) = ({T}, {B}, C), got {tuple(padding_mask.shape)}"
        )
    key = (padding_mask._version, T, B, device, dtype)
    source = weakref.ref(padding_mask)
    if padding_mask.device != device:
        padding_mask = padding_mask.to(device)
    count = rows - int(padding_mask.sum())
    if count == rows:  # nothing padded: the layers take their cheaper mask-free paths
        mask = TokenMask(None, rows, rows)
    else:
        weights = torch.logical_not(padding_mask.t()).reshape(rows).to(dtype)
        mask = TokenMask(weights, count, rows)
    _last_mask[0] = (source, key, mask)
    return mask


#: (weak reference to the last padding mask seen, (its version, T, B, device, dtype), its
#: TokenMask)
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
