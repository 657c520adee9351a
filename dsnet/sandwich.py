"""Stage I: one sandwich step with in-place ensemble bootstrapping (IEB).

Every step trains, on the same batch, the largest width, N random widths in between and the smallest width, and
the optimizer then takes one step on the summed gradients:

- the largest width learns from the labels (cross-entropy, label smoothing);
- each random width learns from the EMA teacher's softmax at the largest width;
- the smallest width learns from the mean of the teacher's softmax at the largest width and at the random widths
  of this step (ensemble), or from the teacher's largest alone.

Optionally (`num_random_plans`), each step also trains random *per-stage* plans — every stage at its own
randomly drawn width choice — which learn like the random widths (not part of the ensemble). A supernet trained at
uniform widths alone is weak at plans that mix widths: a gate's routes (wide before the gate, narrower after it)
and the per-layer plans a search visits.

Without an EMA teacher the targets come from the live largest width's detached output (in-place distillation).
Each width's loss is backpropagated as soon as it is computed, so only one width's activations are alive at once.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import GradSync, always_sync


def sandwich_widths(num_choices: int, num_random: int, seed: int, step: int) -> list[int]:
    """Choice indices of one step: largest, `num_random` distinct random ones in between (widest first), smallest.

    Drawn from a generator seeded by (seed, step) alone, so every process and every resumed run draws the same.
    """
    largest, smallest = num_choices - 1, 0
    middle = list(range(1, num_choices - 1))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    if num_random <= len(middle):
        picks = torch.randperm(len(middle), generator=generator)[:num_random]
    else:  # more random widths than choices in between: draw with replacement
        picks = torch.randint(len(middle), (num_random,), generator=generator) if middle else torch.tensor([])
    random_widths = sorted((middle[i] for i in picks.tolist()), reverse=True)
    widths = [largest, *random_widths]
    if smallest != largest:
        widths.append(smallest)
    return widths


def random_stage_plans(num_choices: int, num_stages: int, count: int, seed: int, step: int
                       ) -> list[tuple[int, ...]]:
    """`count` per-stage plans of one step, each a tuple of one choice index per stage, drawn uniformly and
    independently from a generator seeded by (seed, step) alone (a different stream from `sandwich_widths`). With
    one width choice every plan is that width, which the step trains already: there are none."""
    if count == 0 or num_choices < 2:
        return []
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) * 2 + 1)
    draws = torch.randint(num_choices, (count, num_stages), generator=generator)
    return [tuple(row) for row in draws.tolist()]


@contextlib.contextmanager
def batch_statistics(model: nn.Module):
    """Run `model` with every BN normalising by the batch's own statistics (and dropout off), then restore its modes.

    For the teacher: its running statistics lag its weights while they move fast, early in a run."""
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target_probs * F.log_softmax(logits, dim=-1), dim=-1).mean()


@dataclass
class SandwichLosses:
    total: float  # the sum that was backpropagated (before any division for gradient accumulation)
    per_width: list[tuple[int | tuple[int, ...], float]]  # (choice index or per-stage plan, its loss), in order


def sandwich_step(model: nn.Module, teacher: nn.Module | None, images: torch.Tensor, targets: torch.Tensor,
                  widths: list[int], label_smoothing: float = 0.0, ensemble_smallest: bool = True,
                  backward: Callable[[torch.Tensor], None] | None = None,
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                  plans: list[tuple[int, ...]] = (), teacher_batch_stats: bool = False,
                  grad_sync: GradSync = always_sync) -> SandwichLosses:
    """Forward and backward of one sandwich; the caller steps the optimizer.

    `widths` comes from `sandwich_widths`: largest first, smallest last; `plans` from `random_stage_plans`, trained
    after the random widths against the same target. `backward(loss)` runs the backward pass (default
    `loss.backward()`); the trainer uses it for loss scaling and gradient accumulation. Each width's forward and
    backward runs inside `grad_sync(is_last_pass)`: under DistributedDataParallel, `distributed.grad_sync` lets only
    the last pass all-reduce the gradients the passes accumulated.
    """
    backward = backward or (lambda loss: loss.backward())
    largest, random_widths = widths[0], widths[1:-1] if len(widths) > 2 else []
    smallest = widths[-1] if len(widths) > 1 else None
    passes_left = [1 + len(random_widths) + len(plans) + (smallest is not None)]

    def train_pass(loss_of: Callable[[], torch.Tensor]) -> float:
        passes_left[0] -= 1
        with grad_sync(passes_left[0] == 0):
            with autocast():
                loss = loss_of()
            backward(loss)
        return loss.item()

    teacher_probs: dict[int, torch.Tensor] = {}
    if teacher is not None and len(widths) > 1:  # a single width learns from the labels alone
        stats = batch_statistics(teacher) if teacher_batch_stats else contextlib.nullcontext()
        with torch.no_grad(), autocast(), stats:
            for w in [largest, *(random_widths if ensemble_smallest else [])]:
                logits = teacher(images, w, running_stats=False) if teacher_batch_stats else teacher(images, w)
                teacher_probs[w] = F.softmax(logits.float(), dim=-1)

    def largest_loss() -> torch.Tensor:
        logits = model(images, largest)
        if teacher is None:
            teacher_probs[largest] = F.softmax(logits.detach().float(), dim=-1)
        return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)

    per_width: list[tuple[int | tuple[int, ...], float]] = [(largest, train_pass(largest_loss))]
    for w in random_widths:
        per_width.append((w, train_pass(lambda: soft_cross_entropy(model(images, w).float(),
                                                                   teacher_probs[largest]))))
    for w in plans:  # batch statistics only: a random plan has no BN slot of its own
        per_width.append((w, train_pass(lambda: soft_cross_entropy(model(images, w, running_stats=False).float(),
                                                                   teacher_probs[largest]))))
    if smallest is not None:
        if ensemble_smallest and teacher is not None:
            target = torch.stack([teacher_probs[w] for w in [largest, *random_widths]]).mean(0)
        else:
            target = teacher_probs[largest]
        per_width.append((smallest, train_pass(lambda: soft_cross_entropy(model(images, smallest).float(), target))))

    return SandwichLosses(sum(v for _, v in per_width), per_width)
