"""The order of the training images: one permutation per epoch, shared out among processes, resumable inside an
epoch.

torch's `DistributedSampler` draws the same permutations (seeded by seed + epoch) but always starts an epoch from its
first image; a run resumed from a checkpoint written mid-epoch must continue with the next batch instead.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """This process's share of epoch `epoch`'s permutation of `size` images, from its `start`-th image on.

    Every process draws the same permutation from (seed, epoch) and takes every `world_size`-th image from its rank
    on; the tail that does not divide evenly is dropped, so every process runs the same number of steps.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.per_process = size // world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch `epoch` next, skipping this process's first `start` images."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator)[:self.per_process * self.world_size]
        return iter(order[self.rank::self.world_size][self.start:].tolist())

    def __len__(self) -> int:
        return self.per_process - self.start
