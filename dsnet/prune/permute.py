"""Reordering and masking the channels of coupled groups on a supernet copy.

Permuting a group reorders every member the same way, so the network computes exactly the same function; after the
permutation, slicing the group to its first k channels keeps the k channels put first. Masks zero a group's channels
at the output of each of its BN layers, which removes them from every consumer: what slicing does, while the
network keeps its shapes (for gradual methods that prune between training steps).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from .groups import ChannelGroup


@torch.no_grad()
def permute_groups(model: nn.Module, groups: Sequence[ChannelGroup], orders: Mapping[str, torch.Tensor]) -> None:
    """Reorder, in place, the channels of each group named in `orders` (a permutation of its channel indices)."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    for group in groups:
        order = orders.get(group.name)
        if order is None:
            continue
        order = torch.as_tensor(order, dtype=torch.long)
        if sorted(order.tolist()) != list(range(group.channels)):
            raise ValueError(f"order for group '{group.name}' is not a permutation of its {group.channels} channels")
        for member in group.members:
            tensor = tensors[member.tensor]
            # A supernet BN keeps statistics per slot: (slots, C). Every slot is reordered alike.
            dim = member.dim + (1 if tensor.dim() == 2 and member.tensor.endswith(("running_mean", "running_var"))
                                else 0)
            tensor.copy_(tensor.index_select(dim, order.to(tensor.device)))


def descending_order(scores: torch.Tensor) -> torch.Tensor:
    """Channel indices, highest score first (ties keep the lower index first, so equal scores do not reorder)."""
    return torch.sort(scores, descending=True, stable=True).indices


@contextlib.contextmanager
def channel_masks(model: nn.Module, groups: Sequence[ChannelGroup],
                  masks: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """While inside, the outputs of each group's BN layers are multiplied by its mask (1 keep, 0 prune).

    `masks` is read at every call, so a caller may update the tensors in place between steps.
    """
    modules = dict(model.named_modules())
    handles = []
    for group in groups:
        mask = masks.get(group.name)
        if mask is None:
            continue
        for bn in group.bns:
            def hook(_module, _inputs, output, mask=mask):
                return output * mask.to(output.dtype).view(1, -1, 1, 1)[:, :output.shape[1]]
            handles.append(modules[bn].register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def order_by_bn_scale(model: nn.Module) -> dict[str, torch.Tensor]:
    """Reorder, in place, every coupled channel group of a supernet by importance, largest first: the sum over the
    group's BN layers of |γ|, the scale Network Slimming ranks channels by. The network computes the same function
    at its largest width; each narrower width then keeps its group's most important channels. Returns the orders."""
    from .groups import derive_groups

    groups = derive_groups(model)
    modules = dict(model.named_modules())
    orders = {g.name: descending_order(sum(modules[bn].weight.abs() for bn in g.bns)) for g in groups if g.bns}
    permute_groups(model, groups, orders)
    return orders
