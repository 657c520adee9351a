"""The Polarization regularizer (Zhuang et al., 2020): λ·Σ R(γ) while training, with γ clamped to [0, 1]; channels
scored by mean γ; own rule: the first valley of each group's histogram of scores."""
from __future__ import annotations

import torch

from .base import ScaleSparsityMethod, Scores
from .cuts import Keep
from .rules import histogram_valley_threshold, polarization_regularizer

class Polarization(ScaleSparsityMethod):
    name = "polarization"
    default_penalty = 1e-4
    phase = "polarization training"

    def phase_settings(self) -> str:
        return f"λ = {self.strength:g}, t = {self.settings.polarization_t:g}"

    def train(self) -> None:
        self.after_step()
        super().train()

    def penalty_term(self) -> torch.Tensor:
        return self.strength * sum(polarization_regularizer(w, self.settings.polarization_t) for w in self.ctx.all_gammas())

    @torch.no_grad()
    def after_step(self) -> None:
        for w in self.ctx.all_gammas():
            w.clamp_(0.0, 1.0)

    def own_cut(self, scores: Scores) -> tuple[Keep, str]:
        keep = {g.name: int((scores[g.name] >= histogram_valley_threshold(scores[g.name])).sum())
                for g in self.ctx.groups}
        return keep, "first valley of each group's 100-bin γ histogram"
