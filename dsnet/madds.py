"""Analytic MAdds and parameter counts of a supernet at any width, computed from the plan — no forward hooks.

Each block counts its own layers (`blocks.Costs`); MAdds are the multiply-accumulates of convolutions and linear
layers (BN, activations, pooling and the residual additions excluded), as the MobileNetV2 and DS-Net papers count
them, for one image.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn


def layer_costs(model: nn.Module, width: Any = None, img_size: int | None = None) -> list[tuple[str, int, int]]:
    """(layer name, MAdds, params) of every layer that has weights, in forward order."""
    plan = model.resolve_width(width)
    return model.costs(plan, img_size if img_size is not None else model.config.img_size).rows


def count_madds(model: nn.Module, width: Any = None, img_size: int | None = None) -> int:
    """Multiply-accumulates of one image at `width` (any form `model.resolve_width` accepts)."""
    return sum(m for _, m, _ in layer_costs(model, width, img_size))


def count_params(model: nn.Module, width: Any = None) -> int:
    """Parameters of the dense subnet at `width` (BN affine included, running statistics excluded)."""
    return sum(p for _, _, p in layer_costs(model, width, img_size=model.config.img_size))
