"""Distiller's L1-ranked structure pruning with AGP: each group ranked by the mean |W| of its leader's filters,
masked between epochs on Zhu & Gupta's gradual schedule; own rule: the same fraction of every group."""
from __future__ import annotations

import torch

from .base import Context, Masks, Scores, UniformMethod, train_steps
from .cuts import Keep, uniform_keep
from .groups import ChannelGroup
from .rules import agp_sparsity, distiller_prune_count


def leader_l1(ctx: Context) -> Scores:
    """Mean absolute weight of each output filter of the group's leader (its first producing layer)."""
    return {g.name: ctx.module(g.leader).weight.detach().abs().flatten(1).mean(1).cpu() for g in ctx.groups}


def top_masks(groups: list[ChannelGroup], scores: Scores, keep: Keep) -> Masks:
    """Masks that keep the `keep[name]` highest-scoring channels of each group."""
    masks = {}
    for g in groups:
        mask = torch.zeros(g.channels)
        mask[torch.sort(scores[g.name], descending=True, stable=True).indices[:keep[g.name]]] = 1.0
        masks[g.name] = mask
    return masks


class L1AGP(UniformMethod):
    name = "l1"

    @staticmethod
    def keep_count(channels: int, fraction: float) -> int:
        return channels - distiller_prune_count(channels, fraction)

    def rule(self) -> str:
        rule = f"AGP to {self.fraction:.3f} of every group's channels"
        return rule + ", the least that meets the MAdds target" if self.targeted else rule

    def train(self) -> None:
        """AGP from 0 to the planned sparsity over the epochs, one pruning step per epoch, re-ranking each time."""
        ctx, s = self.ctx, self.settings
        for epoch in range(s.epochs):
            sparsity = agp_sparsity(epoch, 0.0, self.fraction, 0, s.epochs, 1)
            keep = uniform_keep(ctx.groups, sparsity, s.min_channels, self.keep_count)
            self.masks = {k: v.to(ctx.device) for k, v in top_masks(ctx.groups, leader_l1(ctx), keep).items()}
            loss = train_steps(ctx, masks=self.masks)
            ctx.log(f"AGP epoch {epoch + 1}/{s.epochs}: sparsity {sparsity:.3f}, loss {loss:.4f}")

    def scores(self) -> Scores:
        return leader_l1(self.ctx)
