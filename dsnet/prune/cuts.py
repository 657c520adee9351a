"""Per-group widths from channel scores: the cut that meets a MAdds target, never below a minimum width.

Two shapes of cut cover the methods: a *global* cut ranks every channel of every group on one scale (Network
Slimming, Polarization, Gate Decorator) and prunes from the bottom; a *uniform* cut prunes the same fraction of each
group (Distiller's per-layer ranking, DCP's per-layer keep counts). With a target, a bisection finds the least
pruning whose MAdds meet it.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from .groups import ChannelGroup

Keep = dict[str, int]


def floor_of(group: ChannelGroup, min_channels: int) -> int:
    """The fewest channels a group may keep: `min_channels`, or all it has when it has fewer (never zero)."""
    return max(1, min(group.channels, min_channels))


def uniform_keep(groups: Sequence[ChannelGroup], fraction: float, min_channels: int,
                 keep_count: Callable[[int, float], int]) -> Keep:
    """Channels each group keeps when `keep_count(channels, fraction)` decides per group, floored."""
    return {g.name: max(keep_count(g.channels, fraction), floor_of(g, min_channels)) for g in groups}


def global_prune_sequence(groups: Sequence[ChannelGroup], scores: Mapping[str, torch.Tensor],
                          min_channels: int) -> list[str]:
    """The groups of the channels a global cut prunes, lowest score first; a channel whose group is already at its
    floor is skipped (every group keeps at least its floor)."""
    ranked = sorted((float(s), i, g.name) for i, g in enumerate(groups) for s in scores[g.name].tolist())
    kept = {g.name: g.channels for g in groups}
    floors = {g.name: floor_of(g, min_channels) for g in groups}
    sequence = []
    for _score, _index, name in ranked:
        if kept[name] > floors[name]:
            kept[name] -= 1
            sequence.append(name)
    return sequence


def keep_after(groups: Sequence[ChannelGroup], sequence: Sequence[str], pruned: int) -> Keep:
    keep = {g.name: g.channels for g in groups}
    for name in sequence[:pruned]:
        keep[name] -= 1
    return keep


def global_cut_for_target(groups: Sequence[ChannelGroup], scores: Mapping[str, torch.Tensor], min_channels: int,
                          madds_of: Callable[[Keep], float], target: float) -> Keep:
    """The fewest lowest-scoring channels, pruned across all groups, whose plan meets `target` (`madds_of` may
    count any cost that grows with the channels: MAdds, a predicted latency)."""
    sequence = global_prune_sequence(groups, scores, min_channels)
    if madds_of(keep_after(groups, sequence, len(sequence))) > target:
        raise ValueError("the target cannot be met with every group at its minimum width")
    lo, hi = 0, len(sequence)  # invariant: hi meets the target
    while lo < hi:
        mid = (lo + hi) // 2
        if madds_of(keep_after(groups, sequence, mid)) <= target:
            hi = mid
        else:
            lo = mid + 1
    return keep_after(groups, sequence, hi)


def uniform_cut_for_target(groups: Sequence[ChannelGroup], min_channels: int,
                           keep_count: Callable[[int, float], int], madds_of: Callable[[Keep], float],
                           target: float, iterations: int = 40) -> tuple[float, Keep]:
    """The smallest fraction, pruned from every group alike, whose plan meets `target` MAdds."""
    if madds_of(uniform_keep(groups, 1.0, min_channels, keep_count)) > target:
        raise ValueError("the target cannot be met with every group at its minimum width")
    lo, hi = 0.0, 1.0  # invariant: hi meets the target
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if madds_of(uniform_keep(groups, mid, min_channels, keep_count)) <= target:
            hi = mid
        else:
            lo = mid
    return hi, uniform_keep(groups, hi, min_channels, keep_count)
