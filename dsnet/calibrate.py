"""BN recalibration: re-estimate one width's running statistics from training batches."""
from __future__ import annotations

from typing import Any, Iterable

import torch

from .mobilenetv2 import DSMobileNetV2
from .slim import SlimBatchNorm2d


@torch.no_grad()
def recalibrate_bn(model: DSMobileNetV2, width: Any, batches: Iterable, num_batches: int | None = None) -> int:
    """Reset the BN statistics of `width` and re-estimate them as the exact average over the batches given.

    `batches` yields input tensors or (input, target) pairs. Only the statistics slot of `width` changes; every
    other slot and every parameter stays as it was. Returns the number of batches used.
    """
    plan = model.resolve_width(width)
    bns = [m for m in model.modules() if isinstance(m, SlimBatchNorm2d)]
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    model.eval()
    if plan.choice is None:
        model.calibrated_plan.copy_(torch.tensor(plan.channels))
    slot = plan.choice if plan.choice is not None else model.custom_slot
    device = next(model.parameters()).device
    used = 0
    try:
        for bn in bns:
            bn.reset_slot(slot)
            bn.momentum = None  # cumulative average: every batch weighs the same
            bn.train()
        for batch in batches:
            if num_batches is not None and used >= num_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device), plan)
            used += 1
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        model.train(was_training)
    if used == 0:
        raise ValueError("BN recalibration got no batches")
    return used
