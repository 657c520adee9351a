"""The DS-ResNet supernets: timm's ResNet-18/34/50 layout and the CIFAR ResNet-20/56 layout, every layer slice-able.

Names are timm's (`conv1`, `bn1`, `maxpool`, `layer1` … `layer4`, `fc`, and the blocks' own), so the dense export of
width 1.0 is the state dict of timm's `resnet18`, `resnet34` or `resnet50`. The CIFAR layout (He et al.'s: a 3×3 stem
of 16 channels, three stages of 16/32/64 channels at strides 1/2/2, no max-pool) is the network the Gate Decorator,
DCP and Polarization papers prune; where a block changes width or resolution its shortcut is a 1×1 convolution and a
BN (the paper's option B, timm's `downsample`), as every shortcut must be once widths are sliced.

Channel groups: the stem; each stage's residual stream, shared by every block that adds to it (a first stage whose
blocks need no downsampling shares the stem's group); each block's inner widths (a basic block's one, the output
of its first convolution; a bottleneck's two, ``reduce`` after its first 1×1 and ``hidden`` after its 3×3). A width multiplier rounds channels
to a multiple of 8 (4 in the CIFAR layout, whose narrowest stage has 16).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
from timm.layers import make_divisible

from .blocks import BlockSpec, Costs
from .resnet_blocks import BasicBlock, Bottleneck
from .slim import SlimBatchNorm2d, SlimConv2d, SlimLinear, global_avg_pool
from .supernet import NetworkConfig, SlimNetwork
from .widths import WidthPlan


@dataclass(frozen=True)
class ResNetLayout:
    block: str  # "basic" or "bottleneck"
    depths: tuple[int, ...]
    planes: tuple[int, ...]
    stem_channels: int
    cifar: bool  # 3×3 stride-1 stem without max-pool, channels rounded to multiples of 4

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1


IMAGENET_PLANES = (64, 128, 256, 512)
RESNET_LAYOUTS = {
    "resnet18": ResNetLayout("basic", (2, 2, 2, 2), IMAGENET_PLANES, 64, cifar=False),
    "resnet34": ResNetLayout("basic", (3, 4, 6, 3), IMAGENET_PLANES, 64, cifar=False),
    "resnet50": ResNetLayout("bottleneck", (3, 4, 6, 3), IMAGENET_PLANES, 64, cifar=False),
    "resnet20": ResNetLayout("basic", (3, 3, 3), (16, 32, 64), 16, cifar=True),
    "resnet56": ResNetLayout("basic", (9, 9, 9), (16, 32, 64), 16, cifar=True),
}
DEFAULT_RESNET_WIDTHS = (0.25, 0.5, 0.75, 1.0)


@dataclass
class ResNetConfig(NetworkConfig):
    """Everything that defines a DS-ResNet supernet (what a checkpoint must record to rebuild it)."""

    what = "ResNet supernet config"

    arch: str = "resnet18"
    widths: list[float] = field(default_factory=lambda: list(DEFAULT_RESNET_WIDTHS))

    def validate(self) -> None:
        if self.arch not in RESNET_LAYOUTS:
            raise ValueError(f"unknown ResNet arch {self.arch!r}; known: {', '.join(RESNET_LAYOUTS)}")
        super().validate()

    @property
    def layout(self) -> ResNetLayout:
        return RESNET_LAYOUTS[self.arch]


class DSResNet(SlimNetwork):
    """The slimmable ResNet supernet (see `supernet.SlimNetwork` for the width forms it runs). ``small_input``
    gives an ImageNet layout the CIFAR stem (3×3, stride 1, no max-pool); the CIFAR layouts always have it."""

    # ---- layout -------------------------------------------------------------------------------------------------

    @property
    def arch(self) -> str:
        return self.config.arch

    @property
    def cifar_stem(self) -> bool:
        return self.config.layout.cifar or self.config.small_input

    def _build_layout(self) -> None:
        layout = self.config.layout
        names, specs = ["stem"], []
        prev_group, prev_channels = 0, layout.stem_channels
        self._stage_groups: list[tuple[int | None, list[int]]] = []  # each stage: (its own stream group, inner groups)
        for i, (depth, planes) in enumerate(zip(layout.depths, layout.planes)):
            stage, stride, out = f"layer{i + 1}", (1 if i == 0 else 2), planes * layout.expansion
            needs_downsample = stride != 1 or prev_channels != out
            stream = len(names) if needs_downsample else prev_group
            own_stream = stream if needs_downsample else None
            if needs_downsample:
                names.append(stage)
            inner = []
            for j in range(depth):
                reduce = None
                if layout.block == "bottleneck":
                    reduce = len(names)
                    names.append(f"{stage}.{j}.reduce")
                    inner.append(reduce)
                hidden = len(names)
                names.append(f"{stage}.{j}.hidden")
                inner.append(hidden)
                first = j == 0
                specs.append(BlockSpec(f"{stage}.{j}", prev_group if first else stream, stream, hidden,
                                       layout.expansion, stride if first else 1, 3,
                                       has_skip=not (first and needs_downsample), reduce_group=reduce))
            self._stage_groups.append((own_stream, inner))
            prev_group, prev_channels = stream, out
        self.group_names = tuple(names)
        self.block_specs = tuple(specs)
        self.stage_names = ("stem",) + tuple(f"layer{i + 1}" for i in range(len(layout.depths)))

    def _channels_for_stage_widths(self, stage_widths: Sequence[float]) -> tuple[int, ...]:
        layout = self.config.layout
        divisor = 4 if layout.cifar else 8
        channels = [0] * len(self.group_names)
        channels[0] = make_divisible(layout.stem_channels * stage_widths[0], divisor)
        for (stream, inner), planes, w in zip(self._stage_groups, layout.planes, stage_widths[1:]):
            if stream is not None:
                channels[stream] = make_divisible(planes * layout.expansion * w, divisor)
            for g in inner:
                channels[g] = make_divisible(planes * w, divisor)
        return tuple(channels)

    def _build_layers(self) -> None:
        cfg, m = self.config, self.max_channels
        bn_args = dict(eps=cfg.bn_eps, momentum=cfg.bn_momentum)
        if self.cifar_stem:
            self.conv1 = SlimConv2d(cfg.in_chans, m[0], 3, 1)
        else:
            self.conv1 = SlimConv2d(cfg.in_chans, m[0], 7, 2)
        self.bn1 = SlimBatchNorm2d(m[0], self.num_slots, **bn_args)
        self.maxpool = None if self.cifar_stem else nn.MaxPool2d(3, 2, 1)
        block_type = Bottleneck if cfg.layout.block == "bottleneck" else BasicBlock
        stages: dict[str, list[nn.Module]] = {name: [] for name in self.stage_names[1:]}
        for spec in self.block_specs:
            stages[spec.name.split(".")[0]].append(
                block_type(spec, m, self.num_slots, bn_args))
        for name, blocks in stages.items():
            self.add_module(name, nn.ModuleList(blocks))
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = SlimLinear(m[self.head_group], cfg.num_classes)

    def _init_weights(self) -> None:
        super()._init_weights()
        for block in self.flat_blocks:  # timm's zero_init_last: each residual block starts as its shortcut
            nn.init.zeros_(block.projection_norm().weight)

    @property
    def head_group(self) -> int:
        return self.block_specs[-1].out_group  # the last stage's stream: there is no head convolution

    @property
    def block_stages(self) -> list[nn.ModuleList]:
        return [getattr(self, name) for name in self.stage_names[1:]]

    # ---- stem and head: forward, dense layers, costs ------------------------------------------------------------

    def forward_stem(self, x: torch.Tensor, plan: WidthPlan, norm) -> torch.Tensor:
        x = torch.relu_(norm(self.bn1, self.conv1(x, plan.channels[0]), 0))
        return x if self.maxpool is None else self.maxpool(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(global_avg_pool(x)))

    def export_stem(self, plan: WidthPlan, slot: int) -> OrderedDict[str, nn.Module]:
        ch = plan.channels
        layers = OrderedDict(conv1=self.conv1.export(self.config.in_chans, ch[0]), bn1=self.bn1.export(ch[0], slot),
                             act1=nn.ReLU(inplace=True))
        if self.maxpool is not None:
            layers["maxpool"] = nn.MaxPool2d(3, 2, 1)
        return layers

    def nest_blocks(self, blocks: list[nn.Module]) -> OrderedDict[str, nn.Module]:
        flat = iter(blocks)
        return OrderedDict((name, nn.Sequential(*(next(flat) for _ in stage)))
                           for name, stage in zip(self.stage_names[1:], self.block_stages))

    def export_head(self, plan: WidthPlan, slot: int) -> OrderedDict[str, nn.Module]:
        return OrderedDict(global_pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1),
                           dropout=nn.Dropout(self.config.dropout), fc=self.fc.export(plan.channels[self.head_group]))

    def stem_and_head_producers(self) -> dict[int, list[str]]:
        return {0: ["conv1"]}

    def timm_name(self, width: float) -> str:
        if self.config.layout.cifar:
            raise ValueError(f"timm registers no CIFAR ResNet ({self.arch}); export it as export, torchscript or onnx")
        if self.config.small_input:
            raise ValueError(f"timm's {self.arch} has no small-input stem; this supernet was built with small_input")
        if abs(width - 1.0) > 1e-6:
            raise ValueError(f"timm registers {self.arch} at width 1.0 only, not {width:g}")
        return self.arch

    def stem_costs(self, plan: WidthPlan, costs: Costs) -> None:
        costs.conv("conv1", self.conv1, self.config.in_chans, plan.channels[0])
        costs.bn("bn1", plan.channels[0])
        if self.maxpool is not None:
            costs.pool(3, 2, 1)

    def head_costs(self, plan: WidthPlan, costs: Costs) -> None:
        costs.linear("fc", plan.channels[self.head_group], self.config.num_classes)
