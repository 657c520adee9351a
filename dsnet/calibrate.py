"""BN recalibration: re-estimate one width's running statistics from training batches."""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn as nn

from .mobilenetv2 import DSMobileNetV2
from .slim import SlimBatchNorm2d


@contextlib.contextmanager
def collecting_bn_statistics(model: nn.Module, bns: Sequence[SlimBatchNorm2d], slot: int) -> Iterator[None]:
    """Within the block, forwards of `model` (in eval mode) make `bns` re-estimate slot `slot` from scratch, as the
    exact average over the batches seen; every other BN normalises with its stored statistics. Afterwards the
    momenta and training modes are restored."""
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    model.eval()
    try:
        for bn in bns:
            bn.reset_slot(slot)
            bn.momentum = None  # cumulative average: every batch weighs the same
            bn.train()
        yield
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        model.train(was_training)


def input_batches(batches: Iterable, num_batches: int | None, device: torch.device) -> Iterator[torch.Tensor]:
    """The input tensors of `batches` (tensors or (input, target) pairs), at most `num_batches` of them."""
    for used, batch in enumerate(batches):
        if num_batches is not None and used >= num_batches:
            break
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        yield x.to(device)


@torch.no_grad()
def recalibrate_bn(model: DSMobileNetV2, width: Any, batches: Iterable, num_batches: int | None = None) -> int:
    """Reset the BN statistics of `width` and re-estimate them as the exact average over the batches given.

    `batches` yields input tensors or (input, target) pairs. Only the statistics slot of `width` changes (a plan
    that is not a width choice gets a custom slot: `DSMobileNetV2.claim_custom_slot`); every other slot and every
    parameter stays as it was. Returns the number of batches used.
    """
    plan = model.resolve_width(width)
    slot = plan.choice if plan.choice is not None else model.claim_custom_slot(plan)
    bns = [m for m in model.modules() if isinstance(m, SlimBatchNorm2d)]
    device = next(model.parameters()).device
    used = 0
    with collecting_bn_statistics(model, bns, slot):
        for x in input_batches(batches, num_batches, device):
            model(x, plan)
            used += 1
    if used == 0:
        raise ValueError("BN recalibration got no batches")
    return used
