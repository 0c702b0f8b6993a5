"""``flash_attn.utils.distributed.all_gather`` in plain torch.distributed (tests only)."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; the gradient is reduce-scattered back."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        world = dist.get_world_size(group)
        out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_into_tensor(out, tensor.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None


def all_gather(tensor: torch.Tensor, process_group=None) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 (differentiable)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(process_group) == 1:
        return tensor
    return _AllGather.apply(tensor, process_group)
