"""Gate Decorator (You et al., 2019): Taylor scores Σ|g·∂L/∂g| over batches, summed over each group's BNs, and
tick-tock: each tick masks the lowest-scoring channels across all groups, every few ticks a tock trains with λ·Σ|g|;
own rule: global pruning tick by tick until the MAdds target (or the sparsity) is met."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Context, Masks, PruneMethod, Scores, batches, train_steps
from .cuts import Keep, floor_of
from .permute import channel_masks
from .rules import distiller_prune_count, global_threshold_masks

TICK_FRACTION = 0.02  # channels pruned per tick, as a fraction of all prunable channels
TOCK_EVERY = 4  # ticks between tock phases


def taylor_scores(ctx: Context, masks: Masks, num_batches: int) -> Scores:
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


class GateDecorator(PruneMethod):
    name = "taylor"
    cut = "gradual"
    default_penalty = 1e-4

    def kept(self) -> Keep:
        return {name: int(m.sum()) for name, m in self.masks.items()}

    def done(self) -> bool:
        s, budget = self.settings, self.ctx.budget()
        if budget is not None:
            cost, target = budget
            return cost(self.kept()) <= target
        total = sum(g.channels for g in self.ctx.groups)
        return total - sum(self.kept().values()) >= distiller_prune_count(total, s.sparsity)

    def gate_l1(self) -> torch.Tensor:
        return self.strength * sum(w.abs().sum() for w in self.ctx.all_gammas())

    def train(self) -> None:
        """Ticks until `done`, a tock every `TOCK_EVERY` ticks while the tock budget (--epochs) lasts."""
        ctx, s = self.ctx, self.settings
        self.masks = masks = ctx.full_masks()
        prunable = sum(g.channels - floor_of(g, s.min_channels) for g in ctx.groups)
        per_tick = max(1, round(TICK_FRACTION * prunable))
        total = sum(g.channels for g in ctx.groups)
        tock_steps = max(1, len(ctx.loader) // 4)
        tock_budget = s.epochs * len(ctx.loader)
        tick = 0
        scores = taylor_scores(ctx, masks, s.score_batches)
        while not self.done():
            pruned = total - sum(self.kept().values())
            if pruned >= prunable:
                raise ValueError("the target cannot be met with every group at its minimum width")
            ranked = {name: torch.where(masks[name].cpu() > 0, scores[name], torch.tensor(-math.inf))
                      for name in scores}
            threshold, new = global_threshold_masks(ranked, pruned + per_tick, s.min_channels)
            for name, m in new.items():
                masks[name].copy_(m.to(ctx.device))
            tick += 1
            ctx.log(f"tick {tick}: pruned {total - sum(self.kept().values())} of {total} channels (threshold "
                    f"{threshold:.3g}), MAdds {ctx.madds_of(self.kept()) / 1e6:.2f}M")
            if tick % TOCK_EVERY == 0 and tock_budget > 0:
                steps = min(tock_steps, tock_budget)
                tock_budget -= steps
                loss = train_steps(ctx, steps=steps, penalty=self.gate_l1, masks=masks)
                ctx.log(f"tock: {steps} steps with λ·Σ|g| (λ = {self.strength:g}), loss {loss:.4f}")
            scores = taylor_scores(ctx, masks, s.score_batches)
        self.final_scores = scores
        self.extra = dict(ticks=tick)

    def scores(self) -> Scores:
        return self.final_scores

    def own_cut(self, scores: Scores) -> tuple[Keep, str]:
        if self.ctx.budget() is not None:
            return self.kept(), "tick-tock global pruning until the target is met"
        return self.kept(), f"tick-tock global pruning of {self.settings.sparsity:g} of all channels"
