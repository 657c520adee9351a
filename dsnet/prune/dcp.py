"""Discrimination-aware Channel Pruning (Zhuang et al., 2018): layer by layer, a greedy selection of the input
channels of each group's consumers that minimises the reconstruction error plus λ times the cross-entropy of an
auxiliary head; own rule: DCP's keep counts, the same fraction η of every group."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Context, Masks, Scores, UniformMethod, batches
from .permute import channel_masks
from .rules import dcp_greedy_select, dcp_keep_count

DCP_PIXELS = 16  # sampled positions per image for DCP's per-layer problems (on the --score-batches images)
HEAD_STEPS = 100  # Adam steps that train each auxiliary head


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


def consumer_inputs(ctx: Context, names: list[str], images: torch.Tensor, masks: Masks) -> dict[str, torch.Tensor]:
    """The inputs of the consumer layers `names` as rows: `DCP_PIXELS` fixed positions per image, each the channels
    there (a 1×1 convolution) or the patch a k×k convolution reads there, unfolded channel by channel."""
    captured: dict[str, torch.Tensor] = {}
    modules = {n: ctx.module(n) for n in names}

    def capture(name: str):
        def hook(_module, inputs):
            x = inputs[0].detach()
            if x.dim() == 2:  # the classifier: pooled features, one row per image
                captured[name] = x
                return
            module = modules[name]
            if module.kernel_size == (1, 1):
                columns = x.flatten(2)  # (N, C, positions)
            else:
                columns = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
            positions = torch.randperm(columns.shape[2], generator=torch.Generator().manual_seed(0))
            rows = columns[:, :, positions[:DCP_PIXELS].to(x.device)]  # (N, C·k, P)
            captured[name] = rows.permute(0, 2, 1).reshape(-1, columns.shape[1])
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
    """The consumer's weight as (outputs, input channels · kernel positions), the columns of its unfolded input."""
    weight = module.weight.detach()
    if weight.dim() == 4:
        if module.groups != 1:
            raise ValueError("DCP's per-layer selection needs dense (not grouped) consumers")
        weight = weight.flatten(1)
    return weight


def train_head(rows: torch.Tensor, labels: torch.Tensor, num_classes: int, images: int) -> AuxiliaryHead:
    head = AuxiliaryHead(rows.shape[1], num_classes, rows, images).to(rows.device)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.01)
    for _ in range(HEAD_STEPS):
        optimizer.zero_grad()
        F.cross_entropy(head(rows), labels).backward()
        optimizer.step()
    return head.requires_grad_(False)


class DiscriminationAware(UniformMethod):
    name = "dcp"
    # The paper's λ = 1 weighs an unnormalised reconstruction error. Here that error is in units of its target's
    # RMS, on the scale of the auxiliary cross-entropy, where λ = 1 would let the cross-entropy pick the channels.
    default_penalty = 0.01
    keep_count = staticmethod(dcp_keep_count)

    def rule(self) -> str:
        if self.targeted:
            return f"DCP keep counts at η = {self.fraction:.3f}, the least that meets the MAdds target"
        return f"DCP keep counts at η = {self.fraction:g}"

    def train(self) -> None:
        """The per-layer selection, group by group, on the inputs of the network pruned so far."""
        ctx, keep = self.ctx, self.keep
        images, labels = map(torch.cat, zip(*batches(ctx, self.settings.score_batches)))
        consumers = [c for g in ctx.groups for c in g.consumers]
        originals = consumer_inputs(ctx, consumers, images, ctx.full_masks())
        targets = {c: originals[c] @ consumer_weight(ctx.module(c)).T for c in consumers}
        # Auxiliary heads, trained on the unpruned layer's outputs.
        heads = {c: train_head(targets[c], labels, ctx.model.config.num_classes, len(images)) for c in consumers}

        self.masks = masks = ctx.full_masks()
        self.order, self.selection = {}, {}
        for g in ctx.groups:
            inputs = consumer_inputs(ctx, g.consumers, images, masks)
            # Inputs and targets in units of the target's RMS: the reconstruction term starts near 1 in every layer,
            # on the scale of the auxiliary cross-entropy.
            scales = [targets[c].pow(2).mean().sqrt().clamp_min(1e-12) for c in g.consumers]
            problems = [(inputs[c] / r, consumer_weight(ctx.module(c)), targets[c] / r)
                        for c, r in zip(g.consumers, scales)]

            def aux_loss(outputs: list[torch.Tensor], g=g, scales=scales) -> torch.Tensor:
                losses = [F.cross_entropy(heads[c](out * r), labels) for c, out, r in zip(g.consumers, outputs, scales)]
                return sum(losses) / len(losses)

            selected, weights = dcp_greedy_select(problems, keep[g.name], aux_loss, self.strength,
                                                  chunk=max(1, math.ceil(keep[g.name] / 16)), steps=10,
                                                  channels=g.channels)
            with torch.no_grad():
                for c, w, (rows, _, _) in zip(g.consumers, weights, problems):
                    # The re-fitted weights replace the originals where the rows determine them well; with fewer
                    # rows than a few times the kept columns the fit would only memorise the sampled images.
                    if len(rows) >= 4 * keep[g.name] * (rows.shape[1] // g.channels):
                        module = ctx.module(c)
                        module.weight.copy_(w.view_as(module.weight))
            selected = selected.cpu()
            chosen = torch.zeros(g.channels, dtype=torch.bool)
            chosen[selected] = True
            self.order[g.name] = torch.cat([selected, (~chosen).nonzero().flatten()])
            masks[g.name].copy_(chosen.to(masks[g.name]))
            self.selection[g.name] = chosen.float()

    def scores(self) -> Scores:
        """1 for a selected channel, 0 otherwise."""
        return self.selection
