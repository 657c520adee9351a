"""Wall-clock latency of forward calls, compared side by side: the one timing loop eval.py and bench/ share."""
from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch


def reserve_kernel_cache(capacity: int = 8192) -> None:
    """Let oneDNN keep `capacity` compiled CPU kernels instead of its default 1024 (a value set in the environment is
    kept). `median_seconds` interleaves its calls, and calls of many networks (a latency table's width choices, a
    bench's plans) need more kernels than that: each call would evict the kernels of the calls before it and compile
    its own again, a large cost at batch 1 that a deployed network, whose kernels stay cached, never pays. oneDNN
    reads the setting when it compiles its first kernel, so call this before the process runs any convolution."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` intra-op threads, then give the caller back its own count (a command's `--threads`
    must not outlive it in the process that called it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def synchronize(device: torch.device | None) -> None:
    """Wait for queued CUDA work, so that a clock read after it measures the work and not its launch."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def median_seconds(calls: Sequence[Callable[[], object]], repeats: int, warmup: int,
                   device: torch.device | None = None) -> list[float]:
    """Median wall seconds of each zero-argument call, after `warmup` untimed rounds of all of them.

    The calls are interleaved repeat by repeat and their order reverses every other repeat, so a burst of load on a
    shared machine, or a cache one call leaves warm for the next, falls on all of them alike.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        for call in calls:
            call()
    times: list[list[float]] = [[] for _ in calls]
    for i in range(repeats):
        order = list(zip(calls, times))
        for call, samples in order if i % 2 == 0 else reversed(order):
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]
