"""The scoring and thresholding rules of the published channel-pruning methods, as pure functions.

Tensors in, numbers or tensors out: no modules, no state. The pruning modes build on these:

- Distiller L1 + AGP: `agp_sparsity`, `distiller_prune_count`.
- Network Slimming: `network_slimming_threshold`.
- Polarization (NeurIPS 2020): `polarization_regularizer`, `histogram_valley_threshold`.
- Gate Decorator (NeurIPS 2019): `gate_decorator_rewrite`, `fold_gate`, `global_threshold_masks`.
- Discrimination-aware Channel Pruning (NeurIPS 2018): `dcp_keep_count`, `dcp_greedy_select`.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Added before a floor so that a product such as 0.3 * 10 = 2.9999999999999996 still floors to 3.
_FLOOR_EPS = 1e-9


def _guarded_floor(x: float) -> int:
    return math.floor(x + _FLOOR_EPS)


# --- Polarization ---

def polarization_regularizer(gamma: Tensor, t: float, alpha: float = 1.0) -> Tensor:
    """Polarization regularizer (Zhuang et al., NeurIPS 2020): R(γ) = t·Σ|γ| − Σ|γ − α·mean(γ)|.

    `gamma` holds the scale factors of every prunable channel (flattened); the result is a differentiable scalar.
    """
    gamma = gamma.flatten()
    return t * gamma.abs().sum() - (gamma - alpha * gamma.mean()).abs().sum()


def histogram_valley_threshold(values: Tensor, bins: int = 100, low: float = 0.0, high: float = 1.0) -> float:
    """Polarization's per-layer threshold: the first valley of a `bins`-bin histogram of `values` on [low, high].

    The threshold is the left edge of the first bin whose count is ≤ the next bin's count, i.e. where the counts
    stop falling. The keep mask is ``values >= threshold``. Values outside [low, high] are not counted.

    Edge cases: no values at all gives `low` (the first bin's 0 ≤ 0), so everything is kept. If the counts fall
    strictly over every bin there is no valley, and the result is `high`: only values ≥ `high` are kept. Callers
    enforce the minimum width of a group.
    """
    counts = torch.histc(values.detach().flatten().float(), bins=bins, min=low, max=high).tolist()
    for i in range(bins - 1):
        if counts[i] <= counts[i + 1]:
            return low + (high - low) * i / bins
    return high


# --- Distiller: L1 ranking with automated gradual pruning ---

def agp_sparsity(epoch: float, initial: float, final: float, start: float, end: float, freq: float) -> float:
    """Distiller's automated gradual pruner (Zhu & Gupta): s_t = s_f + (s_i − s_f)·(1 − (t − t0)/span)³.

    span = ((end − start − 1) // freq)·freq, so the final sparsity is reached at the last pruning epoch before
    `end`. `epoch` is clamped to [start, start + span].
    """
    span = ((end - start - 1) // freq) * freq
    if span <= 0:
        return initial if epoch < start else final
    progress = (min(max(epoch, start), start + span) - start) / span
    return final + (initial - final) * (1.0 - progress) ** 3


def distiller_prune_count(n: int, fraction: float) -> int:
    """Distiller's number of channels to prune out of `n` at sparsity `fraction`: floor(fraction·n)."""
    return _guarded_floor(fraction * n)


# --- Network Slimming ---

def network_slimming_threshold(gammas: Tensor, percent: float) -> float:
    """Network Slimming's global cut (Liu et al., ICCV 2017): the sorted-|γ| value at index int(N·percent).

    Channels with |γ| ≤ threshold are pruned. The index is floored with a small guard against float error and
    clamped to N − 1.
    """
    sorted_abs = gammas.detach().flatten().abs().sort().values
    index = min(_guarded_floor(sorted_abs.numel() * percent), sorted_abs.numel() - 1)
    return sorted_abs[index].item()


# --- Gate Decorator ---

def gate_decorator_rewrite(gamma: Tensor, beta: Tensor, limit: float = 10.0) -> tuple[Tensor, Tensor]:
    """Gate Decorator's BN rewrite (You et al., NeurIPS 2019): γ·x̂ + β = g·(x̂ + β') with g = γ, β' = β/γ.

    The BN's scale becomes 1, its bias β' = clamp(β/γ, −limit, limit), and the gate g = γ. Returns (β', g). The
    clamp changes the function where |β/γ| > limit. For γ == 0, β/γ is taken as ±limit by the sign of β (0 when
    β is 0), which is what the clamp of ±inf would give, without NaN.
    """
    zero = gamma == 0
    ratio = beta / torch.where(zero, torch.ones_like(gamma), gamma)
    ratio = torch.where(zero, torch.sign(beta) * limit, ratio)
    return ratio.clamp(-limit, limit), gamma.clone()


def fold_gate(beta_prime: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """Fold a Gate Decorator gate back into the BN: returns the BN's (weight, bias) = (g, β'·g)."""
    return gate.clone(), beta_prime * gate


def global_threshold_masks(
        scores: dict[str, Tensor],
        prune: int,
        min_keep: int = 1,
) -> tuple[float, dict[str, Tensor]]:
    """Gate Decorator's global pruning step: prune the `prune` lowest-scoring channels over all groups.

    Channels are visited in ascending score order (ties: group order, then channel index). A channel is skipped
    when pruning it would leave its group with fewer than `min_keep` channels. Returns the score of the last
    channel pruned (-inf if none) and per-group 0/1 float masks (1 = keep).
    """
    names = list(scores)
    flat = [scores[name].detach().flatten() for name in names]
    masks = {name: torch.ones_like(s, dtype=torch.float) for name, s in zip(names, flat)}
    if not names or prune <= 0:
        return -math.inf, masks

    all_scores = torch.cat([s.float().cpu() for s in flat])
    group_of = torch.cat([torch.full((s.numel(),), g, dtype=torch.long) for g, s in enumerate(flat)])
    index_in_group = torch.cat([torch.arange(s.numel()) for s in flat])
    order = torch.sort(all_scores, stable=True).indices

    kept = [s.numel() for s in flat]
    threshold, pruned = -math.inf, 0
    for i in order.tolist():
        if pruned == prune:
            break
        g = group_of[i].item()
        if kept[g] - 1 < min_keep:
            continue
        masks[names[g]][index_in_group[i]] = 0.0
        kept[g] -= 1
        pruned += 1
        threshold = all_scores[i].item()
    return threshold, masks


# --- Discrimination-aware Channel Pruning ---

def dcp_keep_count(channels: int, eta: float) -> int:
    """DCP's number of input channels kept at pruning rate η: c − floor(η·c)."""
    return channels - _guarded_floor(eta * channels)


def dcp_greedy_select(
        problems: Sequence[tuple[Tensor, Tensor, Tensor]],
        keep: int,
        aux_loss: Callable[[list[Tensor]], Tensor] | None = None,
        lam: float = 1.0,
        chunk: int = 1,
        steps: int = 20,
        channels: int | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """DCP's greedy channel selection (Zhuang et al., NeurIPS 2018), shared by linear problems on the same inputs.

    Each problem is (X (N, C·k), W (O, C·k), Y (N, O)): inputs, original weights (only their shape is used) and the
    target outputs, for a layer that reads `channels` (C; default: the first problem's columns, k = 1) input
    channels, each as k consecutive columns (a k×k convolution's unfolded patches: k = kernel height · width).
    Starting from no channel selected and zero weights, repeat until `keep` are selected:

    1. loss = Σ_p MSE(X_p W_p^T, Y_p) + lam · aux_loss([X_p W_p^T]) (the aux term only if `aux_loss` is given);
    2. score each input channel c by sqrt(Σ_p ||∂loss/∂W_p[:, columns of c]||²), add the `chunk` best unselected
       channels;
    3. re-fit the columns of the selected channels: least squares without `aux_loss`; with it, the least-squares solution is the
       start of `steps` gradient-descent steps on the full loss (step 1/L_p, L_p the Lipschitz constant of
       problem p's MSE term).

    Unselected columns are never parameters, so they stay exactly zero. Returns the selected channel indices
    (ascending) and the re-fitted weights.
    """
    problems = [(x.detach(), w.detach(), y.detach()) for x, w, y in problems]
    if not problems:
        raise ValueError("dcp_greedy_select needs at least one problem")
    channels = problems[0][0].shape[1] if channels is None else channels
    if any(x.shape[1] % channels or w.shape[1] != x.shape[1] for x, w, _ in problems):
        raise ValueError(f"every problem must read the same {channels} input channels, k columns each")
    per = [x.shape[1] // channels for x, _, _ in problems]
    if not 0 <= keep <= channels:
        raise ValueError(f"keep must be in [0, {channels}], got {keep}")

    device = problems[0][0].device
    selected = torch.zeros(channels, dtype=torch.bool, device=device)
    weights = [torch.zeros_like(w) for _, w, _ in problems]

    def full_loss(ws: list[Tensor]) -> Tensor:
        outputs = [x @ w.T for (x, _, _), w in zip(problems, ws)]
        loss = sum(F.mse_loss(out, y) for out, (_, _, y) in zip(outputs, problems))
        if aux_loss is not None:
            loss = loss + lam * aux_loss(outputs)
        return loss

    with torch.enable_grad():
        while int(selected.sum()) < keep:
            ws = [w.clone().requires_grad_(True) for w in weights]
            grads = torch.autograd.grad(full_loss(ws), ws)
            score = torch.stack([g.pow(2).sum(0).view(channels, k).sum(1) for g, k in zip(grads, per)]).sum(0).sqrt()
            score[selected] = -math.inf
            take = min(chunk, keep - int(selected.sum()))
            # A stable sort makes ties (e.g. all-zero gradients) pick the lowest channel index.
            selected[torch.sort(score, descending=True, stable=True).indices[:take]] = True
            idx = selected.nonzero().flatten()
            columns = [(idx[:, None] * k + torch.arange(k, device=device)).flatten() for k in per]
            weights = _dcp_refit(problems, columns, full_loss, aux_loss is not None, steps)

    return selected.nonzero().flatten(), weights


def _dcp_refit(
        problems: list[tuple[Tensor, Tensor, Tensor]],
        columns: list[Tensor],
        full_loss: Callable[[list[Tensor]], Tensor],
        descend: bool,
        steps: int,
) -> list[Tensor]:
    """Least-squares fit of the selected `columns` of each problem, then optional gradient descent on `full_loss`."""
    subs = []
    for (x, w, y), idx in zip(problems, columns):
        x_sel = x[:, idx].to(y.dtype)
        subs.append(torch.linalg.lstsq(x_sel, y).solution.T.to(w.dtype))  # (O, k)

    def scatter(sub: Tensor, w: Tensor, idx: Tensor) -> Tensor:
        return torch.zeros_like(w).index_copy(1, idx, sub)

    if descend and steps > 0:
        # The MSE term of problem p is mean((X W^T − Y)²) over N·O entries: its gradient in W is
        # (2 / (N·O))·(X W^T − Y)^T X, Lipschitz with L_p = 2·σ_max(X_sel)² / (N·O).
        step_sizes = []
        for (x, _, y), idx in zip(problems, columns):
            sigma = torch.linalg.matrix_norm(x[:, idx].to(y.dtype), ord=2).item()
            lipschitz = 2.0 * sigma ** 2 / y.numel()
            step_sizes.append(1.0 / lipschitz if lipschitz > 0 else 0.0)
        subs = [s.clone().requires_grad_(True) for s in subs]
        for _ in range(steps):
            loss = full_loss([scatter(s, w, idx) for s, (_, w, _), idx in zip(subs, problems, columns)])
            grads = torch.autograd.grad(loss, subs)
            with torch.no_grad():
                for s, g, step in zip(subs, grads, step_sizes):
                    s -= step * g
        subs = [s.detach() for s in subs]

    return [scatter(s, w, idx) for s, (_, w, _), idx in zip(subs, problems, columns)]
