"""Processes of a run: joining the torchrun process group, and summing figures across processes."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        """The sum of `values` over every process (a CPU tensor in, a CPU tensor out)."""
        if self.world_size == 1:
            return values
        values = values.to(self.device)
        dist.all_reduce(values)
        return values.cpu()

    def all_reduce_dict(self, sums: dict[str, float]) -> dict[str, float]:
        """The sum of each value over every process (every process must hold the same keys)."""
        if self.world_size == 1 or not sums:
            return sums
        keys = sorted(sums)
        values = self.all_reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
        return dict(zip(keys, values.tolist()))

    def close(self) -> None:
        if self.world_size > 1:
            dist.barrier()
            dist.destroy_process_group()


def setup_distributed(device_name: str | None) -> Distributed:
    """Join the process group when started by torchrun (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device_name is None:
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device_name!r} asked for, but CUDA is not available")
    if world_size == 1:
        return Distributed(0, 1, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, device)
