"""Per-width BatchNorm statistics: slots, recalibration, copying statistics to a gate's routes, routed normalisation.

Every `SlimBatchNorm2d` of a supernet keeps one set of running statistics per *slot*: one slot per width choice,
then ``custom_bn_slots`` slots for plans that are not choices (a searched plan, a gate's routes). `BNSlots` is the
supernet's bookkeeping of which plan each custom slot holds; a plan whose statistics were never collected is
refused at evaluation. The two norm hooks a block's forward takes live here too: `SlotNorm` (one slot for the whole
batch) and `RoutedNorm` (each input normalised by its route's statistics and masked to its route's width).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .slim import SlimBatchNorm2d, SlimSqueezeExcite
from .widths import WidthPlan


class BNSlots:
    """Mixin of a supernet (an `nn.Module` with ``widths``, ``group_names`` and a ``calibrated_plans`` buffer):
    which BN statistics slot each plan runs with."""

    def init_bn_slots(self, num_choices: int, num_custom: int, num_groups: int) -> None:
        self.custom_slot = num_choices  # the first custom slot
        self.num_custom_slots = num_custom
        self.num_slots = num_choices + num_custom
        # Row i: the plan whose statistics custom slot i holds (zeros: none yet). A buffer so checkpoints keep it.
        self.register_buffer("calibrated_plans", torch.zeros(num_custom, num_groups, dtype=torch.long))

    def stats_slot(self, plan: WidthPlan) -> int:
        """The BN statistics slot a plan runs with; refuses to evaluate a plan whose statistics were never collected."""
        if plan.choice is not None:
            return plan.choice
        slot = self.custom_slot_of(plan)
        if slot is None:
            if not self.training:
                raise ValueError("BN statistics of this width plan were never collected; run "
                                 "dsnet.recalibrate_bn(model, plan, batches) first")
            # Training a new custom plan: its statistics start afresh rather than mix with another plan's.
            slot = self.claim_custom_slot(plan)
        return slot

    def custom_slot_of(self, plan: WidthPlan) -> int | None:
        """The custom slot holding statistics of `plan`, or None."""
        rows = self.calibrated_plans.tolist()
        channels = list(plan.channels)
        return next((self.custom_slot + i for i, row in enumerate(rows) if row == channels), None)

    def has_bn_statistics(self, plan: WidthPlan) -> bool:
        """Whether `plan` can be evaluated: every width choice can, a custom plan once its statistics are collected."""
        return plan.choice is not None or self.custom_slot_of(plan) is not None

    def claim_custom_slot(self, plan: WidthPlan) -> int:
        """Reset a custom slot and record that it now belongs to `plan`: the slot already holding `plan`, else the
        first free one, else the last one (its plan loses its statistics). Returns the slot."""
        slot = self.custom_slot_of(plan)
        if slot is None:
            free = [i for i, row in enumerate(self.calibrated_plans.tolist()) if not any(row)]
            slot = self.custom_slot + (free[0] if free else self.num_custom_slots - 1)
        self.reset_bn_slot(slot)
        self.calibrated_plans[slot - self.custom_slot].copy_(torch.tensor(plan.channels))
        return slot

    def add_custom_slots(self, count: int) -> None:
        """Append `count` empty custom slots to every BN (a gate's routes need their own), in place."""
        for module in self.modules():
            if isinstance(module, SlimBatchNorm2d):
                module.add_slots(count)
        self.calibrated_plans = torch.cat([self.calibrated_plans,
                                           self.calibrated_plans.new_zeros(count, self.calibrated_plans.shape[1])])
        self.num_custom_slots += count
        self.num_slots += count
        self.config = dataclasses.replace(self.config, custom_bn_slots=self.num_custom_slots)

    def reset_bn_slot(self, slot: int) -> None:
        for module in self.modules():
            if isinstance(module, SlimBatchNorm2d):
                module.reset_slot(slot)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._pad_custom_slots(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _pad_custom_slots(self, state_dict: dict, prefix: str) -> None:
        """Let a state dict with fewer custom BN slots load (a gate adds slots for its routes): the missing slots
        are added empty."""
        key = prefix + "calibrated_plans"
        plans = state_dict.get(key)
        if plans is None or plans.dim() != 2 or plans.shape[1] != len(self.group_names):
            return
        missing = self.num_custom_slots - plans.shape[0]
        if missing <= 0:
            return
        state_dict[key] = torch.cat([plans, plans.new_zeros(missing, plans.shape[1])])
        loaded_slots = len(self.widths) + plans.shape[0]
        empty = {"running_mean": 0.0, "running_var": 1.0, "num_batches_tracked": 0}
        for name, module in self.named_modules():
            if not isinstance(module, SlimBatchNorm2d):
                continue
            for buffer, fill in empty.items():
                full = f"{prefix}{name}.{buffer}"
                value = state_dict.get(full)
                if value is not None and value.shape[0] == loaded_slots:
                    pad = value.new_full((missing, *value.shape[1:]), fill)
                    state_dict[full] = torch.cat([value, pad])


# ---- the norm hooks of a block's forward ---------------------------------------------------------------------------


class SlotNorm:
    """Every input normalised with one slot's statistics (``slot=None``: the batch's, in training)."""

    __slots__ = ("slot",)

    def __init__(self, slot: int | None):
        self.slot = slot

    def __call__(self, bn: SlimBatchNorm2d, x: torch.Tensor, group: int) -> torch.Tensor:
        return bn(x, self.slot)

    def excite(self, se: SlimSqueezeExcite, x: torch.Tensor, reduced: int, group: int) -> torch.Tensor:
        return se(x, reduced)


class RoutedNorm:
    """Each input normalised with its route's statistics and masked to its route's channels (the gate's training
    forward, whose layers run at the widest route's width).

    `weights` (batch, routes) are one-hot in value and carry the gradient to the route choice; `channels` (routes,
    groups) and `reduced` (routes, groups) are each route's channels and squeeze-excitation width per group.
    """

    def __init__(self, slots: Sequence[int], weights: torch.Tensor, channels: torch.Tensor, reduced: torch.Tensor):
        self.slots, self.weights, self.channels, self.reduced = list(slots), weights, channels, reduced

    def __call__(self, bn: SlimBatchNorm2d, x: torch.Tensor, group: int) -> torch.Tensor:
        return routed_batch_norm(bn, x, self.slots, self.weights, self.channels[:, group])

    def excite(self, se: SlimSqueezeExcite, x: torch.Tensor, reduced: int, group: int) -> torch.Tensor:
        """Squeeze-excitation with each input's reduced channels masked to its route's count."""
        per_route = self.reduced[:, group]
        width = int(per_route.max())
        s = F.relu(se.conv_reduce(F.adaptive_avg_pool2d(x, 1), width))
        keep = (torch.arange(width, device=x.device) < per_route[:, None]).to(self.weights.dtype)
        s = s * (self.weights @ keep)[:, :, None, None]
        return x * torch.sigmoid(se.conv_expand(s, x.shape[1]))


def routed_batch_norm(bn: SlimBatchNorm2d, x: torch.Tensor, slots: Sequence[int], weights: torch.Tensor,
                      channels: torch.Tensor) -> torch.Tensor:
    """Eval-mode BN with each input normalised by its route's statistics, then masked to its route's channels.

    `weights` (batch, routes) picks the route of each input; `channels` (routes,) is each route's width here.
    The mask is folded into the per-input scale and shift, so a masked channel comes out exactly zero.
    """
    c = x.shape[1]
    scale = bn.weight[:c] * torch.rsqrt(bn.running_var[slots, :c] + bn.eps)  # (routes, c)
    shift = bn.bias[:c] - bn.running_mean[slots, :c] * scale
    keep = (torch.arange(c, device=x.device) < channels[:, None]).to(scale.dtype)
    scale, shift = weights @ (scale * keep).to(weights.dtype), weights @ (shift * keep).to(weights.dtype)
    return x * scale[:, :, None, None] + shift[:, :, None, None]


# ---- collecting statistics ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def collecting_bn_statistics(model: nn.Module, bns: Sequence[SlimBatchNorm2d], slot: int) -> Iterator[None]:
    """Within the block, forwards of `model` (in eval mode) make `bns` re-estimate slot `slot` from scratch, as the
    exact average over the batches seen; every other BN normalises with its stored statistics. Afterwards the
    momenta and training modes are restored."""
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    model.eval()
    try:
        for bn in bns:
            bn.reset_slot(slot)
            bn.momentum = None  # cumulative average: every batch weighs the same
            bn.train()
        yield
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        model.train(was_training)


def input_batches(batches: Iterable, num_batches: int | None, device: torch.device) -> Iterator[torch.Tensor]:
    """The input tensors of `batches` (tensors or (input, target) pairs), at most `num_batches` of them."""
    for used, batch in enumerate(batches):
        if num_batches is not None and used >= num_batches:
            break
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        yield x.to(device)


def supernet_norms(model: nn.Module) -> list[SlimBatchNorm2d]:
    """Every slice-able BN of `model`."""
    return [m for m in model.modules() if isinstance(m, SlimBatchNorm2d)]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, width: Any, batches: Iterable, num_batches: int | None = None) -> int:
    """Reset the BN statistics of `width` and re-estimate them as the exact average over the batches given.

    `batches` yields input tensors or (input, target) pairs. Only the statistics slot of `width` changes (a plan
    that is not a width choice gets a custom slot: `BNSlots.claim_custom_slot`); every other slot and every
    parameter stays as it was. Returns the number of batches used.
    """
    plan = model.resolve_width(width)
    slot = plan.choice if plan.choice is not None else model.claim_custom_slot(plan)
    bns = supernet_norms(model)
    device = next(model.parameters()).device
    used = 0
    with collecting_bn_statistics(model, bns, slot):
        for x in input_batches(batches, num_batches, device):
            model(x, plan)
            used += 1
    if used == 0:
        raise ValueError("BN recalibration got no batches")
    return used


@torch.no_grad()
def calibrate_routes(gated: nn.Module, batches: Iterable, routes: Iterable[int] | None = None,
                     num_batches: int | None = None) -> int:
    """Collect the BN statistics of a gated network's routes, each in its own custom slot (`GatedDSNet.route_slot`),
    by default of every route that is not a width choice (those start from their choice's: `gate.insert_gate`).

    The layers after the gate are re-estimated through the gated network's own forward, attention head included.
    The layers before the gate run at the input width for every route, so the route's slot takes the input width's
    statistics for them. The dense export of the gated network then computes exactly what it computes. The
    supernet's width choices keep their own statistics. Returns the number of batches used.
    """
    net = gated.supernet
    if routes is None:
        routes = [r for r, plan in enumerate(gated.route_plans) if plan.choice is None]
    device = next(net.parameters()).device
    inputs = list(input_batches(batches, num_batches, device))
    if not inputs:
        raise ValueError("BN recalibration got no batches")
    for route in routes:
        slot = net.claim_custom_slot(gated.route_plans[route])
        with collecting_bn_statistics(gated, gated.post_gate_norms(), slot):
            for x in inputs:
                gated(x, route=route)
        share_pre_gate_statistics(gated, slot)
    return len(inputs)


def share_pre_gate_statistics(gated: nn.Module, slot: int) -> None:
    """Give slot `slot` the statistics the gated network's layers before the gate normalise with (the input plan's),
    so that a route's plan, run alone or exported, computes what the gated network computes at that route."""
    copy_statistics(gated.pre_gate_norms(), gated.input_plan.choice, slot)


@torch.no_grad()
def copy_statistics(bns: Iterable[SlimBatchNorm2d], source: int, target: int) -> None:
    """Slot `target` of each of `bns` takes slot `source`'s running statistics."""
    if source == target:
        return
    for bn in bns:
        bn.running_mean[target].copy_(bn.running_mean[source])
        bn.running_var[target].copy_(bn.running_var[source])
        bn.num_batches_tracked[target].copy_(bn.num_batches_tracked[source])
