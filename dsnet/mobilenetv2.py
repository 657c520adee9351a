"""The DS-MobileNetV2 supernet: MobileNetV2's layout with every layer slice-able, width passed with each call.

Channel counts per width follow timm's ``mobilenetv2_*`` models exactly: ``make_divisible(c · w, 8)``, the head
never below its base width, the expansion width ``make_divisible(rounded input width · t)``. Module and parameter
names are timm's too, so a dense subnet's state dict loads into timm's model as it is.

Channels are described by *channel groups* — layers that must share a width: the stem, the residual stream of each
stage (every block output of the stage), the hidden width of each expanding block, and the head. A plan gives one
channel count per group.

The gate-aware layout (``slim_from``, ``trunk_width``) is `supernet.SlimNetwork`'s.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import make_divisible

from .blocks import BlockSpec, Costs, DepthwiseSeparable, InvertedResidual
from .slim import SlimBatchNorm2d, SlimConv2d, SlimLinear, global_avg_pool
from .supernet import NetworkConfig, SlimNetwork
from .widths import WidthPlan

MOBILENETV2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                      (6, 320, 1, 1))
DEFAULT_WIDTHS = tuple(round(0.35 + 0.05 * i, 2) for i in range(14))
# The widths timm registers a MobileNetV2 of, at this layout (stem 32, head 1280, depth 1).
TIMM_MODELS = {0.35: "mobilenetv2_035", 0.5: "mobilenetv2_050", 0.75: "mobilenetv2_075", 1.0: "mobilenetv2_100",
               1.4: "mobilenetv2_140"}


@dataclass
class SupernetConfig(NetworkConfig):
    """Everything that defines a DS-MobileNetV2 supernet (what a checkpoint must record to rebuild it)."""

    what = "supernet config"

    arch: str = "mobilenetv2"
    widths: list[float] = field(default_factory=lambda: list(DEFAULT_WIDTHS))
    se_ratio: float = 0.0  # squeeze-excitation in every block, reduced to make_divisible(hidden · ratio); 0 = none
    stem_channels: int = 32
    head_channels: int = 1280
    stages: list[list[int]] = field(default_factory=lambda: [list(s) for s in MOBILENETV2_STAGES])
    kernel_size: int = 3

    def validate(self) -> None:
        if self.arch != "mobilenetv2":
            raise ValueError(f"a MobileNetV2 config has arch 'mobilenetv2', not {self.arch!r}")
        super().validate()
        for stage in self.stages:
            if len(stage) != 4 or min(stage) < 1:
                raise ValueError(f"each stage is (expand_ratio, channels, repeats, stride) ≥ 1, got {stage}")


class DSMobileNetV2(SlimNetwork):
    """The slimmable MobileNetV2 supernet (see `supernet.SlimNetwork` for the width forms it runs)."""

    arch = "mobilenetv2"

    # ---- layout -------------------------------------------------------------------------------------------------

    def _build_layout(self) -> None:
        cfg = self.config
        names = ["stem"]
        specs = []
        prev_group = 0
        for i, (t, _c, n, s) in enumerate(cfg.stages):
            stream = len(names)
            names.append(f"blocks.{i}")
            for j in range(n):
                in_group = prev_group if j == 0 else stream
                hidden = None
                if t != 1:
                    hidden = len(names)
                    names.append(f"blocks.{i}.{j}.hidden")
                stride = self._stage_stride(i, s) if j == 0 else 1
                specs.append(BlockSpec(f"blocks.{i}.{j}", in_group, stream, hidden, t, stride, cfg.kernel_size,
                                       has_skip=(stride == 1 and in_group == stream)))
            prev_group = stream
        names.append("head")
        self.group_names = tuple(names)
        self.block_specs = tuple(specs)
        self.stage_names = ("stem",) + tuple(f"blocks.{i}" for i in range(len(cfg.stages))) + ("head",)
        self.stem_stride = 1 if cfg.small_input else 2

    def _stage_stride(self, stage: int, stride: int) -> int:
        # The small-input stem keeps full resolution through the stem and the first stride-2 stage.
        if self.config.small_input and stage == 1:
            return 1
        return stride

    def _channels_for_stage_widths(self, stage_widths: Sequence[float]) -> tuple[int, ...]:
        """Channel counts when stem, each stage and head have their own multiplier, rounded as timm rounds."""
        cfg = self.config
        channels = [0] * len(self.group_names)
        channels[0] = make_divisible(cfg.stem_channels * stage_widths[0])
        for i, (t, c, _n, _s) in enumerate(cfg.stages):
            channels[self.group_names.index(f"blocks.{i}")] = make_divisible(c * stage_widths[i + 1])
        for spec in self.block_specs:
            if spec.hidden_group is not None:
                channels[spec.hidden_group] = make_divisible(channels[spec.in_group] * spec.expand_ratio)
        channels[-1] = max(cfg.head_channels, make_divisible(cfg.head_channels * stage_widths[-1]))
        return tuple(channels)

    def _build_layers(self) -> None:
        cfg = self.config
        m = self.max_channels
        bn_args = dict(eps=cfg.bn_eps, momentum=cfg.bn_momentum)
        self.conv_stem = SlimConv2d(cfg.in_chans, m[0], 3, self.stem_stride)
        self.bn1 = SlimBatchNorm2d(m[0], self.num_slots, **bn_args)
        stages: list[list[nn.Module]] = [[] for _ in cfg.stages]
        for spec in self.block_specs:
            stage = int(spec.name.split(".")[1])
            if spec.hidden_group is None:
                block = DepthwiseSeparable(spec, m[spec.in_group], m[spec.out_group], self.num_slots, cfg.se_ratio,
                                           bn_args)
            else:
                block = InvertedResidual(spec, m[spec.in_group], m[spec.out_group], m[spec.hidden_group],
                                         self.num_slots, cfg.se_ratio, bn_args)
            stages[stage].append(block)
        self.blocks = nn.ModuleList(nn.ModuleList(s) for s in stages)
        self.conv_head = SlimConv2d(m[self.block_specs[-1].out_group], m[-1], 1)
        self.bn2 = SlimBatchNorm2d(m[-1], self.num_slots, **bn_args)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = SlimLinear(m[-1], cfg.num_classes)

    @property
    def block_stages(self) -> list[nn.ModuleList]:
        return list(self.blocks)

    # ---- stem and head: forward, dense layers, costs ------------------------------------------------------------

    def forward_stem(self, x: torch.Tensor, plan: WidthPlan, norm) -> torch.Tensor:
        return F.relu6(norm(self.bn1, self.conv_stem(x, plan.channels[0]), 0), inplace=True)

    def forward_head_features(self, x: torch.Tensor, plan: WidthPlan, norm) -> torch.Tensor:
        head = self.head_group
        return F.relu6(norm(self.bn2, self.conv_head(x, plan.channels[head]), head), inplace=True)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(global_avg_pool(x)))

    def export_stem(self, plan: WidthPlan, slot: int) -> OrderedDict[str, nn.Module]:
        ch = plan.channels
        return OrderedDict(conv_stem=self.conv_stem.export(self.config.in_chans, ch[0]),
                           bn1=self.bn1.export(ch[0], slot), act1=nn.ReLU6(inplace=True))

    def nest_blocks(self, blocks: list[nn.Module]) -> OrderedDict[str, nn.Module]:
        flat = iter(blocks)
        return OrderedDict(blocks=nn.Sequential(*(nn.Sequential(*(next(flat) for _ in stage))
                                                  for stage in self.blocks)))

    def export_head(self, plan: WidthPlan, slot: int) -> OrderedDict[str, nn.Module]:
        ch = plan.channels
        return OrderedDict(conv_head=self.conv_head.export(ch[self.block_specs[-1].out_group], ch[-1]),
                           bn2=self.bn2.export(ch[-1], slot), act2=nn.ReLU6(inplace=True),
                           global_pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1),
                           dropout=nn.Dropout(self.config.dropout), classifier=self.classifier.export(ch[-1]))

    def stem_and_head_producers(self) -> dict[int, list[str]]:
        return {0: ["conv_stem"], self.head_group: ["conv_head"]}

    def timm_name(self, width: float) -> str:
        name = next((n for w, n in TIMM_MODELS.items() if abs(w - width) < 1e-6), None)
        if name is None:
            raise ValueError(f"timm registers no MobileNetV2 of width {width}; it has widths {sorted(TIMM_MODELS)}")
        cfg, default = self.config, SupernetConfig()
        if cfg.small_input:
            raise ValueError("timm's MobileNetV2 has no small-input stem; this supernet was built with small_input")
        if cfg.se_ratio:
            raise ValueError(f"timm's MobileNetV2 has no squeeze-excitation; this supernet has se_ratio {cfg.se_ratio}")
        differing = [key for key in ("stem_channels", "head_channels", "stages", "kernel_size", "bn_eps")
                     if getattr(cfg, key) != getattr(default, key)]
        if differing:
            raise ValueError(f"this supernet's {', '.join(differing)} differ from timm's MobileNetV2")
        return name

    def stem_costs(self, plan: WidthPlan, costs: Costs) -> None:
        costs.conv("conv_stem", self.conv_stem, self.config.in_chans, plan.channels[0])
        costs.bn("bn1", plan.channels[0])

    def head_costs(self, plan: WidthPlan, costs: Costs) -> None:
        ch = plan.channels
        costs.conv("conv_head", self.conv_head, ch[self.block_specs[-1].out_group], ch[-1])
        costs.bn("bn2", ch[-1])
        costs.linear("classifier", ch[-1], self.config.num_classes)


def scale_depth(stages: Sequence[Sequence[int]], multiplier: float) -> list[list[int]]:
    """Each stage's number of blocks times `multiplier`, rounded up: timm's `depth_multiplier` (`depth_trunc='ceil'`),
    so every stage keeps at least one block and 0.5 turns MobileNetV2's 17 blocks into 11."""
    if not multiplier > 0:
        raise ValueError(f"depth_multiplier must be positive, got {multiplier}")
    return [[t, c, int(math.ceil(n * multiplier)), s] for t, c, n, s in stages]


def create_supernet(config: SupernetConfig | Mapping[str, Any] | None = None, *, depth_multiplier: float = 1.0,
                    **overrides: Any) -> DSMobileNetV2:
    """Build a DS-MobileNetV2 supernet from a config (object or mapping) with keyword overrides; `depth_multiplier`
    scales the config's stages as `scale_depth` does."""
    if config is None:
        values: dict[str, Any] = {}
    elif isinstance(config, SupernetConfig):
        values = config.to_dict()
    else:
        values = dict(config)
    values.update(overrides)
    if depth_multiplier != 1.0:
        values["stages"] = scale_depth(values.get("stages", MOBILENETV2_STAGES), depth_multiplier)
    return DSMobileNetV2(SupernetConfig.from_dict(values))
