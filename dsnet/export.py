"""Dense subnet extraction: any width of the supernet as a plain `torch.nn` network.

The dense network is built of standard layers only (plus `Residual`, a `nn.Sequential` that adds its input), with
timm's module names, so its state dict loads into timm's `mobilenetv2_*` model of the same width as it is.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn

from .mobilenetv2 import DSMobileNetV2, DepthwiseSeparable


class Residual(nn.Sequential):
    """A sequence of layers whose output is added to its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self:
            out = layer(out)
        return x + out


@torch.no_grad()
def export_subnet(model: DSMobileNetV2, width: Any = None) -> nn.Sequential:
    """Copy the sliced weights and BN statistics of `width` into a dense `nn.Sequential`, in eval mode."""
    plan = model.resolve_width(width)
    ch = plan.channels
    was_training = model.training
    model.eval()
    try:
        slot = model.stats_slot(plan)
    finally:
        model.train(was_training)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["conv_stem"] = model.conv_stem.export(model.config.in_chans, ch[0])
    layers["bn1"] = model.bn1.export(ch[0], slot)
    layers["act1"] = nn.ReLU6(inplace=True)
    stages: list[list[nn.Module]] = [[] for _ in model.blocks]
    for spec, block in zip(model.block_specs, model._flat_blocks):
        cin, cout = ch[spec.in_group], ch[spec.out_group]
        reduced = model.se_channels(spec, ch)
        body: OrderedDict[str, nn.Module] = OrderedDict()
        if isinstance(block, DepthwiseSeparable):
            body["conv_dw"] = block.conv_dw.export(cin, cin)
            body["bn1"] = block.bn1.export(cin, slot)
            body["act1"] = nn.ReLU6(inplace=True)
            if block.se is not None:
                body["se"] = block.se.export(cin, reduced)
            body["conv_pw"] = block.conv_pw.export(cin, cout)
            body["bn2"] = block.bn2.export(cout, slot)
        else:
            hidden = ch[spec.hidden_group]
            body["conv_pw"] = block.conv_pw.export(cin, hidden)
            body["bn1"] = block.bn1.export(hidden, slot)
            body["act1"] = nn.ReLU6(inplace=True)
            body["conv_dw"] = block.conv_dw.export(hidden, hidden)
            body["bn2"] = block.bn2.export(hidden, slot)
            body["act2"] = nn.ReLU6(inplace=True)
            if block.se is not None:
                body["se"] = block.se.export(hidden, reduced)
            body["conv_pwl"] = block.conv_pwl.export(hidden, cout)
            body["bn3"] = block.bn3.export(cout, slot)
        stage = int(spec.name.split(".")[1])
        stages[stage].append(Residual(body) if block.has_skip else nn.Sequential(body))
    layers["blocks"] = nn.Sequential(*(nn.Sequential(*s) for s in stages))
    layers["conv_head"] = model.conv_head.export(ch[model.block_specs[-1].out_group], ch[-1])
    layers["bn2"] = model.bn2.export(ch[-1], slot)
    layers["act2"] = nn.ReLU6(inplace=True)
    layers["global_pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten(1)
    layers["dropout"] = nn.Dropout(model.config.dropout)
    layers["classifier"] = model.classifier.export(ch[-1])
    dense = nn.Sequential(layers)
    return dense.eval()
