"""ResNet's block types, slice-able: the basic block (two 3×3 convolutions) and the bottleneck (1×1, 3×3, 1×1).

Each class is the one description of its block, as `blocks` is for MobileNetV2's. Layers and names are timm's
(`timm.models.resnet.BasicBlock` and `Bottleneck`): the stride sits in the 3×3 convolution that has it, and a block
whose input and output differ in resolution or channels adds its input through ``downsample`` (a 1×1 convolution and
a BN). The dense export *is* timm's block, with the sliced layers put in, so its state dict is timm's.

Widths reach a block as (input, hidden, output, 0, then each convolution's output channels): ``hidden`` is the
group of the features the block's last convolution reads (a bottleneck's 3×3 output; its first 1×1 writes a group of
its own, ``reduce``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import resnet as timm_resnet

from .blocks import BlockSpec, Costs, Part, SlimBlock
from .slim import SlimBatchNorm2d, SlimConv2d


class ResidualBlock(SlimBlock):
    """What both ResNet blocks share: the shortcut, the ReLU after the sum, the export as timm's block, and the
    costs and dense layers of the main path, from each convolution's (group read, group written)."""

    part_names = ("features", "projection", "downsample")
    timm_block: type[nn.Module]
    convs: tuple[str, ...]  # the main path's convolutions, in order; bn{i} follows conv{i}

    kernel_sizes: tuple[int, ...]
    stride_conv: int  # which convolution (counted from 1) has the block's stride, as in timm

    def __init__(self, spec: BlockSpec, max_channels: Sequence[int], num_slots: int, bn_args: dict):
        super().__init__(spec, se_ratio=0.0)
        self.se = None
        self.downsample = None
        self.conv_io_groups = self.conv_groups()
        for i, (name, (read, write)) in enumerate(zip(self.convs, self.conv_io_groups), 1):
            setattr(self, name, SlimConv2d(max_channels[read], max_channels[write], self.kernel_sizes[i - 1],
                                           spec.stride if i == self.stride_conv else 1))
            setattr(self, f"bn{i}", SlimBatchNorm2d(max_channels[write], num_slots, **bn_args))
        if not spec.has_skip:
            self.downsample = nn.Sequential(
                SlimConv2d(max_channels[spec.in_group], max_channels[spec.out_group], 1, spec.stride),
                SlimBatchNorm2d(max_channels[spec.out_group], num_slots, **bn_args))

    def conv_groups(self) -> list[tuple[int, int]]:
        """(group read, group written) of each convolution of the main path."""
        raise NotImplementedError

    def widths(self, channels: Sequence[int]) -> tuple[int, ...]:
        """(input, hidden, output, 0, then the channels of every group the main path writes, conv by conv)."""
        s = self.spec
        return (channels[s.in_group], channels[s.hidden_group], channels[s.out_group], 0,
                *(channels[write] for _, write in self.conv_io_groups))

    def _conv_channels(self, widths: tuple[int, ...]) -> list[tuple[int, int]]:
        """(input, output) channels of each convolution at `widths`."""
        outs = widths[4:]
        return list(zip((widths[0],) + outs[:-1], outs))

    def _main(self, x: torch.Tensor, widths: tuple[int, ...], norm, convs: range) -> torch.Tensor:
        for i in convs:
            conv, bn = getattr(self, self.convs[i]), getattr(self, f"bn{i + 1}")
            x = norm(bn, conv(x, widths[4 + i]), self.conv_io_groups[i][1])
            if i < len(self.convs) - 1:
                x = F.relu(x, inplace=True)
        return x

    def hidden_features(self, x, widths, norm):
        return self._main(x, widths, norm, range(len(self.convs) - 1))

    def project(self, h, widths, norm):
        return self._main(h, widths, norm, range(len(self.convs) - 1, len(self.convs)))

    def forward(self, x: torch.Tensor, widths: tuple[int, ...], norm) -> torch.Tensor:
        y = self.project(self.hidden_features(x, widths, norm), widths, norm)
        return F.relu(y + self.shortcut(x, widths, norm))

    def shortcut(self, x: torch.Tensor, widths: tuple[int, ...], norm) -> torch.Tensor:
        if self.downsample is None:
            return x
        conv, bn = self.downsample
        return norm(bn, conv(x, widths[2]), self.spec.out_group)

    def projection_norm(self) -> SlimBatchNorm2d:
        return getattr(self, f"bn{len(self.convs)}")

    def _dense(self, convs: range, widths: tuple[int, ...], slot: int) -> OrderedDict[str, nn.Module]:
        channels = self._conv_channels(widths)
        layers = OrderedDict()
        for i in convs:
            cin, cout = channels[i]
            layers[self.convs[i]] = getattr(self, self.convs[i]).export(cin, cout)
            layers[f"bn{i + 1}"] = getattr(self, f"bn{i + 1}").export(cout, slot)
            if i < len(self.convs) - 1:
                layers[f"act{i + 1}"] = nn.ReLU(inplace=True)
        return layers

    def dense_hidden(self, widths, slot):
        return self._dense(range(len(self.convs) - 1), widths, slot)

    def dense_projection(self, widths, slot):
        return self._dense(range(len(self.convs) - 1, len(self.convs)), widths, slot)

    def dense_downsample(self, widths: tuple[int, ...], slot: int) -> nn.Module | None:
        if self.downsample is None:
            return None
        conv, bn = self.downsample
        return nn.Sequential(conv.export(widths[0], widths[2]), bn.export(widths[2], slot))

    def export(self, widths: tuple[int, ...], slot: int) -> nn.Module:
        """timm's block at `widths`: built small, then its layers replaced by the dense slices."""
        block = self.timm_block(1, 1, stride=self.spec.stride)  # every layer of it is replaced below
        for name, layer in self.dense_layers(widths, slot).items():
            setattr(block, name, layer)
        block.downsample = self.dense_downsample(widths, slot)
        return block

    def export_parts(self, widths: tuple[int, ...], slot: int) -> list[Part]:
        """Features (input → hidden width); where there is one, the shortcut's downsampling (the block's input →
        output width); the projection (hidden → output width, the shortcut added, then the ReLU)."""
        s = self.spec
        parts = [Part(f"{s.name}.features", nn.Sequential(self.dense_hidden(widths, slot)), s.in_group,
                      s.hidden_group)]
        if self.downsample is not None:
            parts.append(Part(f"{s.name}.downsample", self.dense_downsample(widths, slot), s.in_group, s.out_group))
        return parts + [Part(f"{s.name}.projection", nn.Sequential(self.dense_projection(widths, slot)),
                             s.hidden_group, s.out_group, skip=True, activation=nn.ReLU())]

    def costs(self, widths: tuple[int, ...], costs: Costs) -> None:
        name, size = self.spec.name, costs.size
        for i, (cin, cout) in enumerate(self._conv_channels(widths)):
            costs.conv(f"{name}.{self.convs[i]}", getattr(self, self.convs[i]), cin, cout)
            costs.bn(f"{name}.bn{i + 1}", cout)
        if self.downsample is not None:
            out_size, costs.size = costs.size, size
            costs.conv(f"{name}.downsample.0", self.downsample[0], widths[0], widths[2])
            costs.bn(f"{name}.downsample.1", widths[2])
            assert costs.size == out_size

    # A gate in a ResNet block reads the block's input, and the whole block runs at the route's width: its output
    # needs that input for the shortcut, and the gated network carries one tensor past the gate.

    def gate_features(self, x, widths, norm):
        return x

    def gate_channels(self, widths):
        return widths[0]

    def after_gate(self, h, widths, norm):
        return self(h, widths, norm)

    def dense_gate_features(self, widths, slot):
        return nn.Identity()

    def dense_after_gate(self, widths, slot):
        return self.export(widths, slot)

    def pre_gate_norms(self):
        return []

    def producers(self) -> dict[int, list[str]]:
        name = self.spec.name
        found: dict[int, list[str]] = {}
        for conv, (_, write) in zip(self.convs, self.conv_io_groups):
            found.setdefault(write, []).append(f"{name}.{conv}")
        if self.downsample is not None:
            found[self.spec.out_group].append(f"{name}.downsample.0")
        return found


class BasicBlock(ResidualBlock):
    """conv 3×3 (stride) → BN → ReLU → conv 3×3 → BN, plus the input (downsampled where it must be) → ReLU."""

    timm_block = timm_resnet.BasicBlock
    convs = ("conv1", "conv2")
    kernel_sizes = (3, 3)
    stride_conv = 1

    def conv_groups(self):
        s = self.spec
        return [(s.in_group, s.hidden_group), (s.hidden_group, s.out_group)]


class Bottleneck(ResidualBlock):
    """conv 1×1 → BN → ReLU → conv 3×3 (stride) → BN → ReLU → conv 1×1 → BN, plus the input → ReLU."""

    timm_block = timm_resnet.Bottleneck
    convs = ("conv1", "conv2", "conv3")
    kernel_sizes = (1, 3, 1)
    stride_conv = 2

    def conv_groups(self):
        s = self.spec
        return [(s.in_group, s.reduce_group), (s.reduce_group, s.hidden_group), (s.hidden_group, s.out_group)]
