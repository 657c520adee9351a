"""Block types: each class is the one description of its block, in timm's layout and with timm's names.

A block runs at given widths (`forward`), exports itself as dense `torch.nn` layers (`export`) and counts its own
multiply-accumulates and parameters (`costs`). The network around it loops over its blocks for all three, so adding
a block type means writing one class.

Widths reach a block as the tuple its `widths(channels)` makes from a plan's channel counts (computed once per
plan, not per call). Normalisation goes through a hook object (`norm`), so the same forward serves a single plan
(`bn_slots.SlotNorm`: one statistics slot) and the gate's training forward (`bn_slots.RoutedNorm`: each input
normalised and masked by its own route).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import make_divisible

from .slim import SlimBatchNorm2d, SlimConv2d, SlimSqueezeExcite


@dataclass(frozen=True)
class BlockSpec:
    """Where one block reads and writes its channels: indices into a plan's channel tuple."""

    name: str
    in_group: int
    out_group: int
    hidden_group: int | None  # None: a depthwise-separable block without expansion
    expand_ratio: int
    stride: int
    kernel_size: int
    has_skip: bool  # the input is added as it is (a ResNet block without it adds its downsampled input)
    reduce_group: int | None = None  # a ResNet bottleneck: its first 1×1 convolution's output, before hidden_group


@dataclass
class Part:
    """A run of dense layers whose cost depends on two channel counts: those of the group it reads (`in_group`,
    None for the network's input) and of the group it writes (`out_group`, None for the logits). With `skip` the part
    adds a tensor of its output's shape (the block's input, or a ResNet block's downsampled input) to its output, then
    applies `activation` where there is one (a ResNet block's ReLU after the sum)."""

    name: str
    module: nn.Module
    in_group: int | None
    out_group: int | None
    skip: bool = False
    activation: nn.Module | None = None

    def __post_init__(self):
        self.module.eval()

    def __call__(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        y = self.module(x)
        y = y + skip if self.skip else y
        return y if self.activation is None else self.activation(y)


class Costs:
    """Multiply-accumulates and parameters of one image, layer by layer, following the spatial size as it goes.

    MAdds are those of convolutions and linear layers (BN, activations, pooling and residual additions excluded),
    as the MobileNetV2 and DS-Net papers count them.
    """

    def __init__(self, img_size: int):
        self.size = img_size
        self.rows: list[tuple[str, int, int]] = []  # (layer name, MAdds, params)

    def conv(self, name: str, conv: SlimConv2d, in_channels: int, out_channels: int) -> None:
        k, stride = conv.kernel_size[0], conv.stride[0]
        self.size = (self.size + 2 * (k // 2) - k) // stride + 1
        groups = in_channels if conv.depthwise else 1
        weights = out_channels * (in_channels // groups) * k * k
        bias = out_channels if conv.bias is not None else 0
        self.rows.append((name, self.size * self.size * weights, weights + bias))

    def pool(self, kernel_size: int, stride: int, padding: int) -> None:
        """A pooling layer: no MAdds, but the spatial size changes."""
        self.size = (self.size + 2 * padding - kernel_size) // stride + 1

    def bn(self, name: str, channels: int) -> None:
        self.rows.append((name, 0, 2 * channels))

    def squeeze_excite(self, name: str, channels: int, reduced: int) -> None:
        self.rows.append((name, 2 * channels * reduced, 2 * channels * reduced + reduced + channels))

    def linear(self, name: str, in_features: int, out_features: int) -> None:
        self.rows.append((name, in_features * out_features, in_features * out_features + out_features))


class SlimBlock(nn.Module):
    """What every block type provides. ``widths`` is a tuple whose first three entries are (input, hidden,
    output) channels; a block with squeeze-excitation adds its reduced channels."""

    part_names = ("features", "projection")  # the parts `export_parts` gives, after the block's name

    def __init__(self, spec: BlockSpec, se_ratio: float):
        super().__init__()
        self.spec = spec
        self.has_skip = spec.has_skip
        self.se_ratio = se_ratio

    @property
    def hidden_group(self) -> int:
        """The channel group of the features squeeze-excitation (or a gate) acts on."""
        return self.spec.hidden_group if self.spec.hidden_group is not None else self.spec.in_group

    def widths(self, channels: Sequence[int]) -> tuple[int, ...]:
        s = self.spec
        hidden = channels[self.hidden_group]
        se = make_divisible(hidden * self.se_ratio) if self.se_ratio else 0
        return channels[s.in_group], hidden, channels[s.out_group], se

    def forward(self, x: torch.Tensor, widths: tuple[int, ...], norm) -> torch.Tensor:
        h = self.hidden_features(x, widths, norm)
        if self.se is not None:
            h = norm.excite(self.se, h, widths[3], self.hidden_group)
        y = self.project(h, widths, norm)
        return y + x if self.has_skip else y

    def hidden_features(self, x: torch.Tensor, widths: tuple[int, ...], norm) -> torch.Tensor:
        raise NotImplementedError

    def project(self, h: torch.Tensor, widths: tuple[int, ...], norm) -> torch.Tensor:
        raise NotImplementedError

    def projection_norm(self) -> SlimBatchNorm2d:
        """The BN after the projection: the one layer of the block at the output width."""
        raise NotImplementedError

    def dense_hidden(self, widths: tuple[int, ...], slot: int) -> OrderedDict[str, nn.Module]:
        """The dense layers `hidden_features` runs."""
        raise NotImplementedError

    def dense_projection(self, widths: tuple[int, ...], slot: int) -> OrderedDict[str, nn.Module]:
        """The dense layers `project` runs."""
        raise NotImplementedError

    def dense_features(self, widths: tuple[int, ...], slot: int) -> OrderedDict[str, nn.Module]:
        """The dense layers from the block's input to the projection's input: `dense_hidden`, then SE."""
        layers = self.dense_hidden(widths, slot)
        if self.se is not None:
            layers["se"] = self.se.export(widths[1], widths[3])
        return layers

    def dense_layers(self, widths: tuple[int, ...], slot: int) -> OrderedDict[str, nn.Module]:
        layers = self.dense_features(widths, slot)
        layers.update(self.dense_projection(widths, slot))
        return layers

    def export_parts(self, widths: tuple[int, ...], slot: int) -> list[Part]:
        """The block as two dense parts, each reading one channel group and writing another: its features (input →
        hidden width) and its projection (hidden → output width, the residual addition included)."""
        s = self.spec
        return [Part(f"{s.name}.features", nn.Sequential(self.dense_features(widths, slot)), s.in_group,
                     self.hidden_group),
                Part(f"{s.name}.projection", nn.Sequential(self.dense_projection(widths, slot)), self.hidden_group,
                     s.out_group, skip=self.has_skip)]

    def export(self, widths: tuple[int, ...], slot: int) -> nn.Module:
        """The block at `widths` as dense layers, with the BN statistics of `slot`."""
        from .export import Residual  # the dense layer types live with the export, which imports the blocks

        layers = self.dense_layers(widths, slot)
        return Residual(layers) if self.has_skip else nn.Sequential(layers)

    def costs(self, widths: tuple[int, ...], costs: Costs) -> None:
        raise NotImplementedError

    # ---- where a gate in this block splits it: the features it reads (at the gate's input width), then the rest
    # (at the route's width). Here, the gate reads the hidden features and the routes start at the projection.

    def gate_features(self, x: torch.Tensor, widths: tuple[int, ...], norm) -> torch.Tensor:
        return self.hidden_features(x, widths, norm)

    def gate_channels(self, widths: tuple[int, ...]) -> int:
        """The channels of `gate_features` at `widths`."""
        return widths[1]

    def after_gate(self, h: torch.Tensor, widths: tuple[int, ...], norm) -> torch.Tensor:
        return self.project(h, widths, norm)

    def dense_gate_features(self, widths: tuple[int, ...], slot: int) -> nn.Module:
        return nn.Sequential(self.dense_hidden(widths, slot))

    def dense_after_gate(self, widths: tuple[int, ...], slot: int) -> nn.Module:
        return nn.Sequential(self.dense_projection(widths, slot))

    def pre_gate_norms(self) -> list[SlimBatchNorm2d]:
        """The block's BN layers that run before a gate in it, at the gate's input width."""
        return [m for m in self.modules() if isinstance(m, SlimBatchNorm2d) and m is not self.projection_norm()]

    def producers(self) -> dict[int, list[str]]:
        """The channel-mixing layers (full names) that write each channel group the block writes."""
        raise NotImplementedError


class DepthwiseSeparable(SlimBlock):
    """Block with expansion ratio 1: depthwise → BN → ReLU6 → (SE) → pointwise → BN."""

    def __init__(self, spec: BlockSpec, in_channels: int, out_channels: int, num_slots: int, se_ratio: float,
                 bn_args: dict):
        super().__init__(spec, se_ratio)
        self.conv_dw = SlimConv2d(in_channels, in_channels, spec.kernel_size, spec.stride, depthwise=True)
        self.bn1 = SlimBatchNorm2d(in_channels, num_slots, **bn_args)
        self.se = SlimSqueezeExcite(in_channels, make_divisible(in_channels * se_ratio)) if se_ratio else None
        self.conv_pw = SlimConv2d(in_channels, out_channels, 1)
        self.bn2 = SlimBatchNorm2d(out_channels, num_slots, **bn_args)

    def hidden_features(self, x, widths, norm):
        return F.relu6(norm(self.bn1, self.conv_dw(x), self.spec.in_group), inplace=True)

    def project(self, h, widths, norm):
        return norm(self.bn2, self.conv_pw(h, widths[2]), self.spec.out_group)

    def projection_norm(self):
        return self.bn2

    def dense_hidden(self, widths, slot):
        cin = widths[0]
        return OrderedDict(conv_dw=self.conv_dw.export(cin, cin), bn1=self.bn1.export(cin, slot),
                           act1=nn.ReLU6(inplace=True))

    def dense_projection(self, widths, slot):
        cin, _, cout = widths[:3]
        return OrderedDict(conv_pw=self.conv_pw.export(cin, cout), bn2=self.bn2.export(cout, slot))

    def producers(self):
        return {self.spec.out_group: [f"{self.spec.name}.conv_pw"]}

    def costs(self, widths, costs):
        cin, _, cout, se = widths
        name = self.spec.name
        costs.conv(f"{name}.conv_dw", self.conv_dw, cin, cin)
        costs.bn(f"{name}.bn1", cin)
        if self.se is not None:
            costs.squeeze_excite(f"{name}.se", cin, se)
        costs.conv(f"{name}.conv_pw", self.conv_pw, cin, cout)
        costs.bn(f"{name}.bn2", cout)


class InvertedResidual(SlimBlock):
    """Block with expansion: pointwise → BN → ReLU6 → depthwise → BN → ReLU6 → (SE) → pointwise → BN (+ input)."""

    def __init__(self, spec: BlockSpec, in_channels: int, out_channels: int, hidden_channels: int, num_slots: int,
                 se_ratio: float, bn_args: dict):
        super().__init__(spec, se_ratio)
        self.conv_pw = SlimConv2d(in_channels, hidden_channels, 1)
        self.bn1 = SlimBatchNorm2d(hidden_channels, num_slots, **bn_args)
        self.conv_dw = SlimConv2d(hidden_channels, hidden_channels, spec.kernel_size, spec.stride, depthwise=True)
        self.bn2 = SlimBatchNorm2d(hidden_channels, num_slots, **bn_args)
        self.se = SlimSqueezeExcite(hidden_channels, make_divisible(hidden_channels * se_ratio)) if se_ratio \
            else None
        self.conv_pwl = SlimConv2d(hidden_channels, out_channels, 1)
        self.bn3 = SlimBatchNorm2d(out_channels, num_slots, **bn_args)

    def hidden_features(self, x, widths, norm):
        group = self.spec.hidden_group
        x = F.relu6(norm(self.bn1, self.conv_pw(x, widths[1]), group), inplace=True)
        return F.relu6(norm(self.bn2, self.conv_dw(x), group), inplace=True)

    def project(self, h, widths, norm):
        return norm(self.bn3, self.conv_pwl(h, widths[2]), self.spec.out_group)

    def projection_norm(self):
        return self.bn3

    def dense_hidden(self, widths, slot):
        cin, hidden = widths[:2]
        return OrderedDict(conv_pw=self.conv_pw.export(cin, hidden), bn1=self.bn1.export(hidden, slot),
                           act1=nn.ReLU6(inplace=True), conv_dw=self.conv_dw.export(hidden, hidden),
                           bn2=self.bn2.export(hidden, slot), act2=nn.ReLU6(inplace=True))

    def dense_projection(self, widths, slot):
        _, hidden, cout = widths[:3]
        return OrderedDict(conv_pwl=self.conv_pwl.export(hidden, cout), bn3=self.bn3.export(cout, slot))

    def producers(self):
        name = self.spec.name
        return {self.spec.hidden_group: [f"{name}.conv_pw"], self.spec.out_group: [f"{name}.conv_pwl"]}

    def costs(self, widths, costs):
        cin, hidden, cout, se = widths
        name = self.spec.name
        costs.conv(f"{name}.conv_pw", self.conv_pw, cin, hidden)
        costs.bn(f"{name}.bn1", hidden)
        costs.conv(f"{name}.conv_dw", self.conv_dw, hidden, hidden)
        costs.bn(f"{name}.bn2", hidden)
        if self.se is not None:
            costs.squeeze_excite(f"{name}.se", hidden, se)
        costs.conv(f"{name}.conv_pwl", self.conv_pwl, hidden, cout)
        costs.bn(f"{name}.bn3", cout)
