"""The static pruning methods: how each scores channels, with its training-time regularizer, and where each cuts.

Every method works on a copy of the supernet run at its largest width and returns, per coupled group, a score for
every channel (higher: more important), the channels to keep, and optionally a 0/1 mask of channels it has already
pruned (gradual methods), which puts them last whatever their score.

- l1: Distiller's L1 ranking; AGP masks between epochs; score mean |W| of the group's leader; own rule: the same
  fraction of every group.
- bn-scale: Network Slimming; grad(γ) += s·sign(γ) while training; score mean |γ| over the group's BNs; own rule:
  a global percentile.
- polarization: λ·Σ R(γ) while training, γ clamped to [0, 1]; score mean γ; own rule: the first valley of each
  group's histogram.
- taylor: Gate Decorator; masks between ticks, λ·Σ|g| in tock phases; score Σ over batches of |g·∂L/∂g|, summed
  over the group's members; own rule: global pruning tick by tick.
- dcp: reconstruction MSE + λ·CE of auxiliary heads; greedy selection per layer; own rule: the same fraction
  (DCP's keep counts) of every group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from ..mobilenetv2 import DSMobileNetV2
from .cuts import Keep, floor_of, global_cut_for_target, uniform_cut_for_target, uniform_keep
from .groups import ChannelGroup
from .permute import channel_masks
from .rules import (agp_sparsity, dcp_greedy_select, dcp_keep_count, distiller_prune_count, global_threshold_masks,
                    histogram_valley_threshold, network_slimming_threshold, polarization_regularizer)

METHODS = ("l1", "bn-scale", "polarization", "taylor", "dcp")
# Regularizer strengths: Network Slimming's s for ResNets, Polarization's λ, Gate Decorator's λ. DCP's λ is not the
# paper's 1: with the reconstruction term in units of its target's RMS, λ = 1 let the auxiliary cross-entropy pick
# the channels and left a half-MAdds digits subnet at chance, where 0.01 beat reconstruction alone (64% vs 62%).
DEFAULT_PENALTY = {"l1": 0.0, "bn-scale": 1e-5, "polarization": 1e-4, "taylor": 1e-4, "dcp": 0.01}
POLARIZATION_T = 1.2
TICK_FRACTION = 0.02  # Gate Decorator: channels pruned per tick, as a fraction of all prunable channels
TOCK_EVERY = 4  # ticks between tock phases
DCP_PIXELS = 16  # sampled positions per image for DCP's per-layer problems (on the --score-batches images)


@dataclass
class PruneSettings:
    method: str
    target_madds: int | None = None  # None: the method's own rule with `sparsity`
    sparsity: float = 0.5  # without a target: the fraction the method's own rule prunes
    min_channels: int = 8
    epochs: int = 1  # the method's training phase: sparsity training, AGP epochs, or tock epochs in all
    lr: float = 0.01
    penalty: float | None = None  # the regularizer's strength (None: DEFAULT_PENALTY)
    score_batches: int = 4  # batches per Taylor scoring pass and per DCP feature capture


@dataclass
class Context:
    model: DSMobileNetV2  # the copy being pruned
    groups: list[ChannelGroup]
    loader: torch.utils.data.DataLoader  # training batches
    settings: PruneSettings
    madds_of: Callable[[Keep], int]
    log: Callable[[str], None] = print

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def penalty(self) -> float:
        s = self.settings
        return DEFAULT_PENALTY[s.method] if s.penalty is None else s.penalty

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def gammas(self, group: ChannelGroup) -> list[torch.Tensor]:
        return [self.module(bn).weight for bn in group.bns]


@dataclass
class Outcome:
    scores: dict[str, torch.Tensor]  # per group, per channel (original order); higher is more important
    keep: Keep
    rule: str  # how the widths were chosen, for the report
    masks: dict[str, torch.Tensor] | None = None  # 0: already pruned, put last whatever the score
    order: dict[str, torch.Tensor] | None = None  # an explicit channel order (DCP's selection order)
    extra: dict = field(default_factory=dict)


def prune_channels(ctx: Context) -> Outcome:
    return {"l1": l1_agp, "bn-scale": network_slimming, "polarization": polarization, "taylor": gate_decorator,
            "dcp": discrimination_aware}[ctx.settings.method](ctx)


# ---- shared pieces ------------------------------------------------------------------------------------------------

def batches(ctx: Context, limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches on the model's device, cycling over the loader; `limit` batches (None: one epoch)."""
    count = 0
    while True:
        for images, targets in ctx.loader:
            if limit is not None and count >= limit:
                return
            yield images.to(ctx.device), targets.to(ctx.device)
            count += 1
        if limit is None:
            return


def train(ctx: Context, steps: int | None = None, epochs: int = 1, penalty: Callable[[], torch.Tensor] | None = None,
          after_backward: Callable[[], None] | None = None, after_step: Callable[[], None] | None = None,
          masks: dict[str, torch.Tensor] | None = None) -> float:
    """SGD (momentum 0.9) at the largest width, with a method's regularizer; `steps` batches or `epochs` epochs.
    Returns the mean task loss."""
    model = ctx.model
    model.train()
    optimizer = create_optimizer_v2(model, "sgd", lr=ctx.settings.lr, momentum=0.9, weight_decay=0.0)
    total, seen = 0.0, 0
    with channel_masks(model, ctx.groups, masks or {}):
        for _ in range(1 if steps is not None else epochs):
            for images, targets in batches(ctx, steps):
                loss = F.cross_entropy(model(images), targets)
                optimizer.zero_grad(set_to_none=True)
                (loss + penalty() if penalty is not None else loss).backward()
                if after_backward is not None:
                    after_backward()
                optimizer.step()
                if after_step is not None:
                    after_step()
                total, seen = total + loss.item(), seen + 1
    model.eval()
    return total / max(seen, 1)


def mean_abs_gamma(ctx: Context) -> dict[str, torch.Tensor]:
    """|γ| averaged over the BN layers of each group: one scale for every group (a global cut compares them)."""
    return {g.name: torch.stack([w.detach().abs() for w in ctx.gammas(g)]).mean(0).cpu() for g in ctx.groups}


def global_cut(ctx: Context, scores: dict[str, torch.Tensor], own_rule: Callable[[], Keep],
               own: str) -> tuple[Keep, str]:
    s = ctx.settings
    if s.target_madds is not None:
        keep = global_cut_for_target(ctx.groups, scores, s.min_channels, ctx.madds_of, s.target_madds)
        return keep, "global cut meeting the MAdds target"
    return own_rule(), own


def floored(ctx: Context, keep: Keep) -> Keep:
    return {g.name: max(keep[g.name], floor_of(g, ctx.settings.min_channels)) for g in ctx.groups}


# ---- l1: Distiller's L1-ranked structure pruning with AGP ---------------------------------------------------------

def leader_l1(ctx: Context) -> dict[str, torch.Tensor]:
    """Mean absolute weight of each output filter of the group's leader (its first producing layer)."""
    scores = {}
    for g in ctx.groups:
        weight = ctx.module(g.leader).weight.detach()
        scores[g.name] = weight.abs().flatten(1).mean(1).cpu()
    return scores


def top_masks(groups: list[ChannelGroup], scores: dict[str, torch.Tensor], keep: Keep) -> dict[str, torch.Tensor]:
    masks = {}
    for g in groups:
        mask = torch.zeros(g.channels)
        mask[torch.sort(scores[g.name], descending=True, stable=True).indices[:keep[g.name]]] = 1.0
        masks[g.name] = mask
    return masks


def l1_agp(ctx: Context) -> Outcome:
    s = ctx.settings

    def keep_count(n: int, fraction: float) -> int:
        return n - distiller_prune_count(n, fraction)

    if s.target_madds is not None:
        final, _ = uniform_cut_for_target(ctx.groups, s.min_channels, keep_count, ctx.madds_of, s.target_madds)
        rule = f"AGP to {final:.3f} of every group's channels, the least that meets the MAdds target"
    else:
        final = s.sparsity
        rule = f"AGP to {final:.3f} of every group's channels"
    masks = None
    # AGP from 0 to the final sparsity over the epochs, one pruning step per epoch, re-ranking each time.
    for epoch in range(s.epochs):
        sparsity = agp_sparsity(epoch, 0.0, final, 0, s.epochs, 1)
        masks = {k: v.to(ctx.device) for k, v in
                 top_masks(ctx.groups, leader_l1(ctx), uniform_keep(ctx.groups, sparsity, s.min_channels,
                                                                    keep_count)).items()}
        loss = train(ctx, masks=masks)
        ctx.log(f"AGP epoch {epoch + 1}/{s.epochs}: sparsity {sparsity:.3f}, loss {loss:.4f}")
    keep = uniform_keep(ctx.groups, final, s.min_channels, keep_count)
    scores = leader_l1(ctx)
    return Outcome(scores, keep, rule, masks={k: v.cpu() for k, v in masks.items()} if masks else None)


# ---- bn-scale: Network Slimming -------------------------------------------------------------------------------------

def network_slimming(ctx: Context) -> Outcome:
    s, strength = ctx.settings, ctx.penalty
    gammas = [w for g in ctx.groups for w in ctx.gammas(g)]

    def sparsity_gradient() -> None:
        for w in gammas:
            w.grad.add_(strength * torch.sign(w.detach()))

    for epoch in range(s.epochs):
        loss = train(ctx, after_backward=sparsity_gradient)
        ctx.log(f"sparsity training epoch {epoch + 1}/{s.epochs} (s = {strength:g}): loss {loss:.4f}")
    scores = mean_abs_gamma(ctx)

    def percentile() -> Keep:
        threshold = network_slimming_threshold(torch.cat(list(scores.values())), s.sparsity)
        return floored(ctx, {g.name: int((scores[g.name] > threshold).sum()) for g in ctx.groups})

    keep, rule = global_cut(ctx, scores, percentile, f"global |γ| percentile {s.sparsity:g}")
    return Outcome(scores, keep, rule)


# ---- polarization ---------------------------------------------------------------------------------------------------

def polarization(ctx: Context) -> Outcome:
    s, strength = ctx.settings, ctx.penalty
    gammas = [w for g in ctx.groups for w in ctx.gammas(g)]

    def clamp() -> None:
        with torch.no_grad():
            for w in gammas:
                w.clamp_(0.0, 1.0)

    def regularizer() -> torch.Tensor:
        return strength * sum(polarization_regularizer(w, POLARIZATION_T) for w in gammas)

    clamp()
    for epoch in range(s.epochs):
        loss = train(ctx, penalty=regularizer, after_step=clamp)
        ctx.log(f"polarization training epoch {epoch + 1}/{s.epochs} (λ = {strength:g}, t = {POLARIZATION_T}): "
                f"loss {loss:.4f}")
    scores = mean_abs_gamma(ctx)

    def valleys() -> Keep:
        return floored(ctx, {g.name: int((scores[g.name] >= histogram_valley_threshold(scores[g.name])).sum())
                             for g in ctx.groups})

    keep, rule = global_cut(ctx, scores, valleys, "first valley of each group's 100-bin γ histogram")
    return Outcome(scores, keep, rule)


# ---- taylor: Gate Decorator -----------------------------------------------------------------------------------------

def taylor_scores(ctx: Context, masks: dict[str, torch.Tensor], num_batches: int) -> dict[str, torch.Tensor]:
    """Σ over batches of |g·∂L/∂g| per channel, summed over each group's BN layers.

    With Gate Decorator's rewrite a BN computes g·(x̂ + β') with g = γ and β' = β/γ, so g·∂L/∂g is the sum over
    the batch and positions of (BN output)·(its gradient); the clamp of β' is not applied, so the function the
    score is taken of is the trained network's own.
    """
    model = ctx.model
    totals = {g.name: torch.zeros(g.channels, device=ctx.device) for g in ctx.groups}
    handles = []

    def watch(name: str):
        def hook(_module, _inputs, output):
            if output.requires_grad:
                def accumulate(grad: torch.Tensor) -> None:
                    totals[name].add_((grad * output).sum((0, 2, 3)).abs())
                output.register_hook(accumulate)
        return hook

    for g in ctx.groups:  # registered before the masks, so the hooks see each BN's own output
        handles += [ctx.module(bn).register_forward_hook(watch(g.name)) for bn in g.bns]
    model.train()
    try:
        with channel_masks(model, ctx.groups, masks):
            for images, targets in batches(ctx, num_batches):
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(images), targets).backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
        model.eval()
    return {name: t.cpu() for name, t in totals.items()}


def gate_decorator(ctx: Context) -> Outcome:
    s, strength = ctx.settings, ctx.penalty
    masks = {g.name: torch.ones(g.channels, device=ctx.device) for g in ctx.groups}
    prunable = sum(g.channels - floor_of(g, s.min_channels) for g in ctx.groups)
    per_tick = max(1, round(TICK_FRACTION * prunable))
    total = sum(g.channels for g in ctx.groups)
    gammas = [w for g in ctx.groups for w in ctx.gammas(g)]
    steps_per_epoch = len(ctx.loader)
    tock_steps = max(1, steps_per_epoch // 4)
    tock_budget = s.epochs * steps_per_epoch

    def kept() -> Keep:
        return {name: int(m.sum()) for name, m in masks.items()}

    def done() -> bool:
        if s.target_madds is not None:
            return ctx.madds_of(kept()) <= s.target_madds
        return total - sum(kept().values()) >= distiller_prune_count(total, s.sparsity)

    def gate_l1() -> torch.Tensor:
        return strength * sum(w.abs().sum() for w in gammas)

    tick = 0
    scores = taylor_scores(ctx, masks, s.score_batches)
    while not done():
        pruned = total - sum(kept().values())
        if pruned >= prunable:
            raise ValueError("the target cannot be met with every group at its minimum width")
        ranked = {name: torch.where(masks[name].cpu() > 0, scores[name], torch.tensor(-math.inf))
                  for name in scores}
        threshold, new = global_threshold_masks(ranked, pruned + per_tick, s.min_channels)
        for name, m in new.items():
            masks[name].copy_(m.to(ctx.device))
        tick += 1
        ctx.log(f"tick {tick}: pruned {total - sum(kept().values())} of {total} channels (threshold "
                f"{threshold:.3g}), MAdds {ctx.madds_of(kept()) / 1e6:.2f}M")
        if tick % TOCK_EVERY == 0 and tock_budget > 0:
            steps = min(tock_steps, tock_budget)
            tock_budget -= steps
            loss = train(ctx, steps=steps, penalty=gate_l1, masks=masks)
            ctx.log(f"tock: {steps} steps with λ·Σ|g| (λ = {strength:g}), loss {loss:.4f}")
        scores = taylor_scores(ctx, masks, s.score_batches)
    rule = "tick-tock global pruning until the MAdds target is met" if s.target_madds is not None else \
        f"tick-tock global pruning of {s.sparsity:g} of all channels"
    return Outcome(scores, kept(), rule, masks={k: v.cpu() for k, v in masks.items()}, extra=dict(ticks=tick))


# ---- dcp: Discrimination-aware Channel Pruning ----------------------------------------------------------------------

class AuxiliaryHead(nn.Module):
    """DCP's auxiliary classifier on a layer's output: BN → ReLU → average pool → FC, here on sampled pixels (the
    FC commutes with the average, so the mean of per-pixel logits is the pooled head's logits)."""

    def __init__(self, channels: int, num_classes: int, outputs: torch.Tensor, images: int):
        super().__init__()
        self.images = images
        self.register_buffer("mean", outputs.mean(0))
        self.register_buffer("std", outputs.std(0) + 1e-5)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        h = F.relu((rows - self.mean) / self.std)
        return self.fc(h).view(self.images, -1, self.fc.out_features).mean(1)


def consumer_inputs(ctx: Context, names: list[str], images: torch.Tensor, masks: dict[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """The inputs of the consumer layers `names` as rows of channels: `DCP_PIXELS` fixed positions per image."""
    captured: dict[str, torch.Tensor] = {}
    modules = {n: ctx.module(n) for n in names}

    def capture(name: str):
        def hook(_module, inputs):
            x = inputs[0].detach()
            if x.dim() == 2:  # the classifier: pooled features, one row per image
                captured[name] = x
                return
            positions = torch.randperm(x.shape[2] * x.shape[3], generator=torch.Generator().manual_seed(0))
            rows = x.flatten(2)[:, :, positions[:DCP_PIXELS].to(x.device)]  # (N, C, P)
            captured[name] = rows.permute(0, 2, 1).reshape(-1, x.shape[1])
        return hook

    handles = [m.register_forward_pre_hook(capture(n)) for n, m in modules.items()]
    try:
        with torch.no_grad(), channel_masks(ctx.model, ctx.groups, masks):
            ctx.model.eval()
            ctx.model(images)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def consumer_weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight.detach()
    if weight.dim() == 4:
        if weight.shape[2:] != (1, 1):
            raise ValueError("DCP's per-layer selection needs 1×1 consumers of every group")
        weight = weight.flatten(1)
    return weight


def discrimination_aware(ctx: Context) -> Outcome:
    s, lam = ctx.settings, ctx.penalty

    if s.target_madds is not None:
        eta, keep = uniform_cut_for_target(ctx.groups, s.min_channels, dcp_keep_count, ctx.madds_of, s.target_madds)
        rule = f"DCP keep counts at η = {eta:.3f}, the least that meets the MAdds target"
    else:
        eta, keep = s.sparsity, uniform_keep(ctx.groups, s.sparsity, s.min_channels, dcp_keep_count)
        rule = f"DCP keep counts at η = {eta:g}"
    images, labels = map(torch.cat, zip(*batches(ctx, s.score_batches)))
    n = len(images)
    consumers = [c for g in ctx.groups for c in g.consumers]
    full = {g.name: torch.ones(g.channels, device=ctx.device) for g in ctx.groups}
    originals = consumer_inputs(ctx, consumers, images, full)
    targets = {c: originals[c] @ consumer_weight(ctx.module(c)).T for c in consumers}
    heads = {}
    for c in consumers:  # auxiliary heads, trained on the unpruned layer's outputs
        rows = targets[c]
        head = AuxiliaryHead(rows.shape[1], ctx.model.config.num_classes, rows, n).to(ctx.device)
        optimizer = torch.optim.Adam(head.parameters(), lr=0.01)
        for _ in range(100):
            optimizer.zero_grad()
            F.cross_entropy(head(rows), labels).backward()
            optimizer.step()
        heads[c] = head.requires_grad_(False)

    masks = {g.name: torch.ones(g.channels, device=ctx.device) for g in ctx.groups}
    scores, orders = {}, {}
    for g in ctx.groups:  # layer by layer, on the inputs of the network pruned so far
        inputs = consumer_inputs(ctx, g.consumers, images, masks)
        # Inputs and targets in units of the target's RMS: the reconstruction term starts near 1 in every layer, on
        # the scale of the auxiliary cross-entropy, so λ = 1 balances the two as in the paper.
        scales = [targets[c].pow(2).mean().sqrt().clamp_min(1e-12) for c in g.consumers]
        problems = [(inputs[c] / r, consumer_weight(ctx.module(c)), targets[c] / r)
                    for c, r in zip(g.consumers, scales)]

        def aux_loss(outputs: list[torch.Tensor], g=g, scales=scales) -> torch.Tensor:
            losses = [F.cross_entropy(heads[c](out * r), labels) for c, out, r in zip(g.consumers, outputs, scales)]
            return sum(losses) / len(losses)

        selected, weights = dcp_greedy_select(problems, keep[g.name], aux_loss, lam,
                                              chunk=max(1, math.ceil(keep[g.name] / 16)), steps=10)
        with torch.no_grad():
            for c, w, (rows, _, _) in zip(g.consumers, weights, problems):
                # The re-fitted weights replace the originals where the rows determine them well; with fewer rows
                # than a few times the kept channels the fit would only memorise the sampled images.
                if len(rows) >= 4 * keep[g.name]:
                    module = ctx.module(c)
                    module.weight.copy_(w.view_as(module.weight))
        chosen = torch.zeros(g.channels, dtype=torch.bool)
        chosen[selected.cpu()] = True
        orders[g.name] = torch.cat([selected.cpu(), (~chosen).nonzero().flatten()])
        masks[g.name].zero_()
        masks[g.name][selected] = 1.0
        score = torch.zeros(g.channels)
        score[selected.cpu()] = 1.0
        scores[g.name] = score
    return Outcome(scores, keep, rule, masks={k: v.cpu() for k, v in masks.items()}, order=orders)
