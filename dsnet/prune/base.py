"""What every static pruning method shares: its settings and context, the hooks the pipeline calls, and the
training phase at the largest width.

A method is one class over `PruneMethod` with three hooks, which `pipeline.prune_channels` calls in this order:

- `train()`: the method's training phase (a regularizer, AGP masks, tick-tock, or DCP's per-layer selection);
- `scores()`: per coupled group, a score for every channel (higher: more important);
- `own_cut(scores)`: the widths by the method's own rule.

Its `cut` says where the widths come from when there is a MAdds target. "global": the pipeline ranks every channel of
every group on one scale after the training phase and prunes from the bottom. "uniform": the pipeline chooses, before
the training phase, the same fraction of every group (by the method's `keep_count`), and the phase prunes towards it.
"gradual": the training phase itself prunes until the target is met.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from ..supernet import SlimNetwork
from .cuts import Keep
from .groups import ChannelGroup
from .permute import channel_masks

Scores = dict[str, torch.Tensor]  # per group, per channel (original order)
Masks = dict[str, torch.Tensor]  # per group, per channel: 1 keep, 0 pruned


@dataclass
class PruneSettings:
    method: str
    target_madds: int | None = None  # None: the method's own rule with `sparsity`
    sparsity: float = 0.5  # without a target: the fraction the method's own rule prunes
    min_channels: int = 8
    epochs: int = 1  # the method's training phase: sparsity training, AGP epochs, or tock epochs in all
    lr: float = 0.01
    penalty: float | None = None  # the regularizer's strength (None: the method's `default_penalty`)
    score_batches: int = 4  # batches per Taylor scoring pass and per DCP feature capture
    polarization_t: float = 1.2  # polarization's t (the authors' ResNet-50 value)
    target_latency: float | None = None  # seconds, predicted by the context's `latency_of`, instead of MAdds


@dataclass
class Context:
    model: SlimNetwork  # the copy being pruned
    groups: list[ChannelGroup]
    loader: torch.utils.data.DataLoader  # training batches
    settings: PruneSettings
    madds_of: Callable[[Keep], int]
    log: Callable[[str], None] = print
    latency_of: Callable[[Keep], float] | None = None  # predicted seconds (with `settings.target_latency`)

    def budget(self) -> tuple[Callable[[Keep], float], float] | None:
        """(cost of a cut, the target it must meet): predicted latency or MAdds; None without a target."""
        s = self.settings
        if s.target_latency is not None:
            return self.latency_of, s.target_latency
        if s.target_madds is not None:
            return self.madds_of, s.target_madds
        return None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def gammas(self, group: ChannelGroup) -> list[torch.Tensor]:
        return [self.module(bn).weight for bn in group.bns]

    def all_gammas(self) -> list[torch.Tensor]:
        return [w for g in self.groups for w in self.gammas(g)]

    def full_masks(self) -> Masks:
        """A mask of ones for every group, on the model's device."""
        return {g.name: torch.ones(g.channels, device=self.device) for g in self.groups}


@dataclass
class Outcome:
    scores: Scores  # higher is more important
    keep: Keep
    rule: str  # how the widths were chosen, for the report
    masks: Masks | None = None  # 0: already pruned, put last whatever the score
    order: dict[str, torch.Tensor] | None = None  # an explicit channel order (DCP's selection order)
    extra: dict = field(default_factory=dict)


class PruneMethod:
    """One published method: its training phase, its channel scores and its own cut rule (see the module's doc)."""

    name: ClassVar[str]  # as the command line takes it
    cut: ClassVar[str] = "global"  # "global", "uniform" or "gradual"
    default_penalty: ClassVar[float] = 0.0

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.masks: Masks | None = None  # set by a phase that prunes as it trains
        self.order: dict[str, torch.Tensor] | None = None
        self.extra: dict = {}

    @property
    def settings(self) -> PruneSettings:
        return self.ctx.settings

    @property
    def strength(self) -> float:
        """The regularizer's strength: --penalty, or the method's default."""
        penalty = self.settings.penalty
        return self.default_penalty if penalty is None else penalty

    def train(self) -> None:
        """The training phase, on `ctx.model`."""

    def scores(self) -> Scores:
        raise NotImplementedError

    def own_cut(self, scores: Scores) -> tuple[Keep, str]:
        """The widths by the method's own rule, and the rule in words for the report."""
        raise NotImplementedError


class UniformMethod(PruneMethod):
    """A method that prunes the same fraction of every group: `plan` sets that fraction before the training phase."""

    cut = "uniform"
    fraction: float  # set by `plan`
    keep: Keep
    targeted: bool  # whether the fraction is the least that meets a MAdds target

    @staticmethod
    def keep_count(channels: int, fraction: float) -> int:
        """The channels a group of `channels` keeps when `fraction` of every group is pruned."""
        raise NotImplementedError

    def plan(self, fraction: float, keep: Keep, targeted: bool) -> None:
        self.fraction, self.keep, self.targeted = fraction, keep, targeted

    def rule(self) -> str:
        raise NotImplementedError

    def own_cut(self, scores: Scores) -> tuple[Keep, str]:
        return self.keep, self.rule()


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


def train_steps(ctx: Context, steps: int | None = None, epochs: int = 1,
                penalty: Callable[[], torch.Tensor] | None = None, after_backward: Callable[[], None] | None = None,
                after_step: Callable[[], None] | None = None, masks: Masks | None = None) -> float:
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


class ScaleSparsityMethod(PruneMethod):
    """Epochs of training with a regularizer on the BN scales γ; channels scored by mean |γ| over their group."""

    phase: ClassVar[str]  # names the training phase in the log
    penalty_term: Callable[[], torch.Tensor] | None = None  # added to the loss
    after_backward: Callable[[], None] | None = None
    after_step: Callable[[], None] | None = None

    def phase_settings(self) -> str:
        raise NotImplementedError

    def train(self) -> None:
        epochs = self.settings.epochs
        for epoch in range(epochs):
            loss = train_steps(self.ctx, penalty=self.penalty_term, after_backward=self.after_backward,
                               after_step=self.after_step)
            self.ctx.log(f"{self.phase} epoch {epoch + 1}/{epochs} ({self.phase_settings()}): loss {loss:.4f}")

    def scores(self) -> Scores:
        """|γ| averaged over the BN layers of each group: one scale for every group (a global cut compares them)."""
        return {g.name: torch.stack([w.detach().abs() for w in self.ctx.gammas(g)]).mean(0).cpu()
                for g in self.ctx.groups}
