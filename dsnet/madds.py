"""Analytic MAdds and parameter counts of a supernet at any width, computed from the plan — no forward hooks.

MAdds are the multiply-accumulates of convolutions and linear layers (BN, activations, pooling and the residual
additions excluded), as the MobileNetV2 and DS-Net papers count them, for one image.
"""
from __future__ import annotations

from typing import Any

from .mobilenetv2 import DSMobileNetV2


def _conv_out(size: int, kernel: int, stride: int) -> int:
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


def layer_costs(model: DSMobileNetV2, width: Any = None, img_size: int | None = None) -> list[tuple[str, int, int]]:
    """(layer name, MAdds, params) of every layer that has weights, in forward order."""
    plan = model.resolve_width(width)
    ch = plan.channels
    size = img_size if img_size is not None else model.config.img_size
    rows: list[tuple[str, int, int]] = []

    def conv(name: str, cin: int, cout: int, kernel: int, stride: int, groups: int = 1, bias: bool = False):
        nonlocal size
        size = _conv_out(size, kernel, stride)
        weights = cout * (cin // groups) * kernel * kernel
        rows.append((name, size * size * weights, weights + (cout if bias else 0)))

    def bn(name: str, c: int):
        rows.append((name, 0, 2 * c))

    def se(name: str, c: int, reduced: int):
        rows.append((name, 2 * c * reduced, 2 * c * reduced + reduced + c))

    conv("conv_stem", model.config.in_chans, ch[0], 3, model.stem_stride)
    bn("bn1", ch[0])
    for spec in model.block_specs:
        cin, cout = ch[spec.in_group], ch[spec.out_group]
        reduced = model.se_channels(spec, ch)
        if spec.hidden_group is None:
            conv(f"{spec.name}.conv_dw", cin, cin, spec.kernel_size, spec.stride, groups=cin)
            bn(f"{spec.name}.bn1", cin)
            if reduced:
                se(f"{spec.name}.se", cin, reduced)
            conv(f"{spec.name}.conv_pw", cin, cout, 1, 1)
            bn(f"{spec.name}.bn2", cout)
        else:
            hidden = ch[spec.hidden_group]
            conv(f"{spec.name}.conv_pw", cin, hidden, 1, 1)
            bn(f"{spec.name}.bn1", hidden)
            conv(f"{spec.name}.conv_dw", hidden, hidden, spec.kernel_size, spec.stride, groups=hidden)
            bn(f"{spec.name}.bn2", hidden)
            if reduced:
                se(f"{spec.name}.se", hidden, reduced)
            conv(f"{spec.name}.conv_pwl", hidden, cout, 1, 1)
            bn(f"{spec.name}.bn3", cout)
    conv("conv_head", ch[model.block_specs[-1].out_group], ch[-1], 1, 1)
    bn("bn2", ch[-1])
    classes = model.config.num_classes
    rows.append(("classifier", ch[-1] * classes, ch[-1] * classes + classes))
    return rows


def count_madds(model: DSMobileNetV2, width: Any = None, img_size: int | None = None) -> int:
    """Multiply-accumulates of one image at `width` (any form `model.resolve_width` accepts)."""
    return sum(m for _, m, _ in layer_costs(model, width, img_size))


def count_params(model: DSMobileNetV2, width: Any = None) -> int:
    """Parameters of the dense subnet at `width` (BN affine included, running statistics excluded)."""
    return sum(p for _, _, p in layer_costs(model, width, img_size=model.config.img_size))
