"""Network Slimming (Liu et al., 2017): an L1 penalty on the BN scales while training, applied as its subgradient
grad(γ) += s·sign(γ); channels scored by mean |γ|; own rule: one global percentile of the scores."""
from __future__ import annotations

import torch

from .base import ScaleSparsityMethod, Scores
from .cuts import Keep
from .rules import network_slimming_threshold


class NetworkSlimming(ScaleSparsityMethod):
    name = "bn-scale"
    default_penalty = 1e-5  # the paper's s for ResNets
    phase = "sparsity training"

    def phase_settings(self) -> str:
        return f"s = {self.strength:g}"

    def after_backward(self) -> None:
        strength = self.strength
        for w in self.ctx.all_gammas():
            w.grad.add_(strength * torch.sign(w.detach()))

    def own_cut(self, scores: Scores) -> tuple[Keep, str]:
        sparsity = self.settings.sparsity
        threshold = network_slimming_threshold(torch.cat(list(scores.values())), sparsity)
        keep = {g.name: int((scores[g.name] > threshold).sum()) for g in self.ctx.groups}
        return keep, f"global |γ| percentile {sparsity:g}"
