"""The one evaluation loop: top-1, top-5 and cross-entropy as sums, exact and reducible across processes.

Every evaluation in dsnet (training validation, the gate's validation, `eval.py`, the search and pruning) runs
`metric_sums` with a `forward(images, targets)` that returns the sums of one batch, built with `batch_sums`. Sums,
not means, so that batches, processes and routes add up exactly; `summarize` turns a row of sums into figures.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .errors import UserError

COLUMNS = ("correct1", "correct5", "loss", "count")  # the first four columns of every row of sums


def batch_sums(logits: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor | None = None,
               num_groups: int = 1) -> torch.Tensor:
    """(correct@1, correct@5, summed cross-entropy, count) of one batch as float64, shape (4,); with `groups` (the
    group index of each input) one row per group, shape (num_groups, 4)."""
    logits = logits.float()
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    per_input = torch.stack([(top[:, 0] == targets).double(), (top == targets[:, None]).any(dim=1).double(),
                             F.cross_entropy(logits, targets, reduction="none").double(),
                             torch.ones_like(targets, dtype=torch.float64)], dim=1).cpu()
    if groups is None:
        return per_input.sum(0)
    return torch.zeros(num_groups, len(COLUMNS), dtype=torch.float64).index_add_(0, groups.cpu(), per_input)


@torch.no_grad()
def metric_sums(forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batches: Iterable,
                device: torch.device, *, autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                progress=None) -> torch.Tensor:
    """The sum over `batches` of ``forward(images, targets)`` (float64 tensors of one shape, typically from
    `batch_sums`), with inputs on `device`, under `autocast`, summed across processes by `reduce`."""
    total = None
    for images, targets in batches:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast() if autocast is not None else contextlib.nullcontext():
            sums = forward(images, targets).to(torch.float64).cpu()
        total = sums if total is None else total + sums
        if progress is not None:
            progress.update(1)
    if total is None:
        raise UserError("the evaluation dataset is empty")
    return reduce(total) if reduce is not None else total


def summarize(sums: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-5 (percent), mean loss and count of one row of sums."""
    correct1, correct5, loss, count = sums[:4].tolist()
    n = max(count, 1.0)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss / n, "count": count}
