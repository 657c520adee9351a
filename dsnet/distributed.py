"""Processes of a run: joining the torchrun process group, summing figures across processes, one gradient all-reduce
per optimizer step, and failing loudly.

A process that dies (killed, or ended by an exception) leaves the others in a collective that fails (gloo: the
connection closes) or waits (NCCL, until torchrun ends them). The others then take a roll call in the run's
key-value store, which torchrun's agent holds, to name the process that is gone, and what it said if it could.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from .errors import UserError


# Wraps each forward-and-backward pass of a step; its argument says whether the pass is the step's last.
GradSync = Callable[[bool], contextlib.AbstractContextManager]


def always_sync(last_pass: bool) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def grad_sync(ddp: torch.nn.parallel.DistributedDataParallel | None, update_follows: bool) -> GradSync:
    """The `GradSync` of one batch: under DistributedDataParallel every pass but the last of a batch after which the
    optimizer steps (`update_follows`) runs in DDP's `no_sync`, so the gradients of a sandwich's widths, and of the
    batches of a gradient accumulation, add up locally and one all-reduce per optimizer step sums them all.

    All-reducing every pass gives the same gradients up to rounding (the sum is taken in another order). DDP
    broadcasts rank 0's BN statistics in the synchronised forward, so now once per optimizer step rather than before
    every forward."""
    if ddp is None:
        return always_sync

    def sync(last_pass: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last_pass and update_follows else ddp.no_sync()

    return sync


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, values: torch.Tensor, largest: bool = False) -> torch.Tensor:
        """The sum (or the largest) of `values` over every process (a CPU tensor in, a CPU tensor out)."""
        if self.world_size == 1:
            return values
        values = values.to(self.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX if largest else dist.ReduceOp.SUM)
        return values.cpu()

    def all_reduce_dict(self, sums: dict[str, float]) -> dict[str, float]:
        """The sum of each value over every process (every process must hold the same keys)."""
        if self.world_size == 1 or not sums:
            return sums
        keys = sorted(sums)
        values = self.all_reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
        return dict(zip(keys, values.tolist()))

    def same_on_every_process(self, text: str, what: str) -> None:
        """Refuse to start unless every process was given the same `text` (a YAML document, e.g. the config): a
        process with other flags would train another network on its share of the data."""
        if self.world_size == 1:
            return
        data = torch.tensor(list(text.encode()), dtype=torch.uint8)
        length = int(self.all_reduce(torch.tensor([len(data)]), largest=True).item())
        padded = torch.zeros(length, dtype=torch.uint8)
        padded[:len(data)] = data
        gathered = [torch.zeros(length, dtype=torch.uint8, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded.to(self.device))
        import yaml

        mine = yaml.safe_load(text)
        for rank, other in enumerate(gathered):
            theirs = yaml.safe_load(bytes(other.cpu().tolist()).rstrip(b"\0").decode())
            keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if keys:
                first = keys[0]
                raise UserError(f"rank {rank} was given another {what} than rank {self.rank}: {first} is "
                                f"{theirs.get(first)!r} there and {mine.get(first)!r} here"
                                + (f" (and {len(keys) - 1} more keys)" if len(keys) > 1 else "")
                                + "; start every process with the same flags")

    def fail_loudly(self, exc: Exception) -> None:
        """`exc` is ending this process. If it is a collective that broke because another process ended, raise a
        one-line error that names that process; otherwise leave this one's reason for the others' roll call."""
        if self.world_size == 1:
            return
        text = str(exc)
        if isinstance(exc, RuntimeError) and not isinstance(exc, UserError) and any(
                mark in text for mark in ("gloo", "NCCL", "Connection closed", "Connection reset")):
            missing = self.missing_ranks()
            if missing:
                said = "; ".join(f"rank {r} " + (f"failed: {m}" if m else "ended without a message (killed?)")
                                 for r, m in sorted(missing.items()))
                raise UserError(f"{said}; rank {self.rank} stops too") from None
        first = text.splitlines()[0] if text else type(exc).__name__
        self.report_failure(first if isinstance(exc, UserError) else f"{type(exc).__name__}: {first}")

    def report_failure(self, message: str) -> None:
        """Leave this process's last words in the store, for the roll call of the others (best effort)."""
        store = self._store(timeout_s=2.0)
        if store is not None:
            try:
                store.set(self._key("failed", self.rank), message[:500])
            except Exception:  # noqa: BLE001 - the store may be gone with the run
                pass

    def missing_ranks(self, wait_s: float = 5.0) -> dict[int, str | None]:
        """After a collective failed: the processes that do not answer a roll call within `wait_s`, each with
        what it reported before it ended (None: nothing, e.g. killed)."""
        store = self._store(timeout_s=wait_s)
        if store is None:  # rank 0 held the store (a launch without torchrun) and is gone with it
            return {0: None}
        store.set(self._key("alive", self.rank), "1")
        others = [rank for rank in range(self.world_size) if rank != self.rank]
        deadline = time.monotonic() + wait_s
        missing: dict[int, str | None] = {}
        while others and time.monotonic() < deadline:
            for rank in list(others):
                if store.check([self._key("failed", rank)]):
                    missing[rank] = store.get(self._key("failed", rank)).decode()
                if rank in missing or store.check([self._key("alive", rank)]):
                    others.remove(rank)
            time.sleep(0.2)
        return {**missing, **{rank: None for rank in others}}

    def _key(self, kind: str, rank: int) -> str:
        return f"dsnet/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{kind}/{rank}"

    def _store(self, timeout_s: float):
        try:
            return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                 timeout=datetime.timedelta(seconds=timeout_s))
        except Exception:  # noqa: BLE001 - no store to reach
            return None

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
