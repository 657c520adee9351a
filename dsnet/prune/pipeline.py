"""One static pruning run: copy the supernet at its largest width, score, cut, permute, recalibrate, fine-tune.

The live supernet is never changed: the method works on a deep copy, whose coupled groups are permuted so each keeps
its best channels first; the chosen plan is then sliced from that copy with the supernet's own kernels and exported
as a dense network.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from ..bn_slots import recalibrate_bn
from ..export import export_subnet
from ..madds import count_madds, count_params
from ..metrics import batch_sums, metric_sums, summarize
from ..supernet import SlimNetwork
from ..widths import WidthPlan
from .base import Context, Outcome, PruneSettings
from .cuts import Keep, floor_of, global_cut_for_target, uniform_cut_for_target, uniform_keep
from .groups import ChannelGroup, derive_groups
from .methods import REGISTRY
from .permute import descending_order, permute_groups


@dataclass
class PruneResult:
    plan: WidthPlan  # of the permuted copy
    network: nn.Module  # the dense subnet (fine-tuned when asked)
    groups: list[ChannelGroup]
    outcome: Outcome
    orders: dict[str, torch.Tensor]  # per group: original channel indices, in their new order
    madds: int
    params: int
    top1_unpruned: float
    top1_recalibrated: float
    top1_finetuned: float | None


def channel_order(outcome: Outcome, group: ChannelGroup) -> torch.Tensor:
    """Highest score first; channels a gradual method already masked go last."""
    if outcome.order is not None:
        return outcome.order[group.name]
    order = descending_order(outcome.scores[group.name])
    if outcome.masks is not None:
        mask = outcome.masks[group.name][order]
        order = order[torch.sort(mask, descending=True, stable=True).indices]
    return order


def prune_channels(ctx: Context) -> Outcome:
    """Run the method's hooks and make its cut: with a MAdds target the shared cut of the method's shape, otherwise
    its own rule; no group below its floor."""
    s, budget = ctx.settings, ctx.budget()
    method = REGISTRY[s.method](ctx)
    if method.cut == "uniform":  # the fraction is chosen before the training phase, which prunes to it
        if budget is not None:
            fraction, keep = uniform_cut_for_target(ctx.groups, s.min_channels, method.keep_count, *budget)
        else:
            fraction, keep = s.sparsity, uniform_keep(ctx.groups, s.sparsity, s.min_channels, method.keep_count)
        method.plan(fraction, keep, targeted=budget is not None)
    method.train()
    scores = method.scores()
    if method.cut == "global" and budget is not None:
        keep = global_cut_for_target(ctx.groups, scores, s.min_channels, *budget)
        rule = "global cut meeting the " + ("latency" if s.target_latency is not None else "MAdds") + " target"
    else:
        keep, rule = method.own_cut(scores)
    keep = {g.name: max(keep[g.name], floor_of(g, s.min_channels)) for g in ctx.groups}
    masks = None if method.masks is None else {name: m.cpu() for name, m in method.masks.items()}
    return Outcome(scores, keep, rule, masks, method.order, method.extra)


def top1(network: nn.Module, loader, device: torch.device, *width) -> float:
    """Top-1 (percent) of `network` on `loader`; `width`: the supernet's plan."""
    network.eval()
    return summarize(metric_sums(lambda x, y: batch_sums(network(x, *width), y), loader, device))["top1"]


def finetune(network: nn.Module, loader, epochs: int, lr: float, device: torch.device,
             log: Callable[[str], None]) -> None:
    """Plain fine-tuning of the dense subnet: SGD with momentum and a per-step cosine schedule."""
    optimizer = create_optimizer_v2(network, "sgd", lr=lr, momentum=0.9, weight_decay=4e-5)
    steps = epochs * len(loader)
    scheduler = CosineLRScheduler(optimizer, t_initial=steps, lr_min=0.0)
    step = 0
    for epoch in range(epochs):
        network.train()
        total = 0.0
        for images, targets in loader:
            loss = F.cross_entropy(network(images.to(device)), targets.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            total += loss.item()
        log(f"fine-tune epoch {epoch + 1}/{epochs}: loss {total / max(len(loader), 1):.4f}")
    network.eval()


def prune_supernet(model: SlimNetwork, settings: PruneSettings, train_loader, calibration: Sequence[torch.Tensor],
                   val_loader, img_size: int, finetune_epochs: int = 0, finetune_lr: float = 0.01,
                   log: Callable[[str], None] = print,
                   latency: Callable[[WidthPlan], float] | None = None) -> PruneResult:
    """With `latency` (a table's `predict`) and `settings.target_latency`, the cut meets a predicted latency."""
    device = next(model.parameters()).device
    work = copy.deepcopy(model).eval()
    groups = derive_groups(work)

    def madds_of(keep: Keep) -> int:
        return count_madds(work, work.resolve_width(keep), img_size)

    top1_unpruned = top1(work, val_loader, device, work.largest)
    log(f"{len(groups)} coupled channel groups; largest width: MAdds {madds_of(work.largest.as_dict()) / 1e6:.2f}M, "
        f"val top-1 {top1_unpruned:.2f}%")
    def latency_of(keep: Keep) -> float:
        return latency(work.resolve_width(keep))

    outcome = prune_channels(Context(work, groups, train_loader, settings, madds_of, log,
                                     latency_of if latency is not None else None))
    orders = {g.name: channel_order(outcome, g) for g in groups}
    permute_groups(work, groups, orders)
    plan = work.resolve_width(outcome.keep)
    recalibrate_bn(work, plan, calibration)
    network = export_subnet(work, plan)
    top1_recalibrated = top1(network, val_loader, device)
    log(f"cut: {outcome.rule}; MAdds {madds_of(outcome.keep) / 1e6:.2f}M, val top-1 after BN recalibration "
        f"{top1_recalibrated:.2f}%")
    top1_finetuned = None
    if finetune_epochs > 0:
        finetune(network, train_loader, finetune_epochs, finetune_lr, device, log)
        top1_finetuned = top1(network, val_loader, device)
        log(f"val top-1 after {finetune_epochs} fine-tuning epoch(s): {top1_finetuned:.2f}%")
    return PruneResult(plan, network, groups, outcome, orders, count_madds(work, plan, img_size),
                       count_params(work, plan), top1_unpruned, top1_recalibrated, top1_finetuned)
