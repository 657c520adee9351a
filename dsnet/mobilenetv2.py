"""The DS-MobileNetV2 supernet: MobileNetV2's layout with every layer slice-able, width passed with each call.

Channel counts per width follow timm's ``mobilenetv2_*`` models exactly: ``make_divisible(c · w, 8)``, the head
never below its base width, the expansion width ``make_divisible(rounded input width · t)``. Module and parameter
names are timm's too, so a dense subnet's state dict loads into timm's model as it is.

Channels are described by *channel groups* — layers that must share a width: the stem, the residual stream of each
stage (every block output of the stage), the hidden width of each expanding block, and the head. A plan gives one
channel count per group.

The *gate-aware* layout (``slim_from``) is DS-Net's own: the stem and the stages before block ``slim_from`` (the first
block of a stage) keep one width, ``trunk_width``, in every width choice; only the layers from that block's
projection on slim. Its width choices are then exactly the routes of a gate in that block, and stage I trains every
route.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Container, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import make_divisible

from .records import Record
from .blocks import BlockSpec, Costs, DepthwiseSeparable, InvertedResidual, Part, SlimBlock
from .bn_slots import BNSlots, SlotNorm
from .slim import SlimBatchNorm2d, SlimConv2d, SlimLinear, global_avg_pool
from .widths import ResolvesWidths, WidthPlan

MOBILENETV2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                      (6, 320, 1, 1))
DEFAULT_WIDTHS = tuple(round(0.35 + 0.05 * i, 2) for i in range(14))
# The widths timm registers a MobileNetV2 of, at this layout (stem 32, head 1280, depth 1).
TIMM_MODELS = {0.35: "mobilenetv2_035", 0.5: "mobilenetv2_050", 0.75: "mobilenetv2_075", 1.0: "mobilenetv2_100",
               1.4: "mobilenetv2_140"}


@dataclass
class SupernetConfig(Record):
    """Everything that defines a supernet's architecture (what a checkpoint must record to rebuild it)."""

    what = "supernet config"

    widths: list[float] = field(default_factory=lambda: list(DEFAULT_WIDTHS))
    num_classes: int = 1000
    in_chans: int = 3
    img_size: int = 224
    small_input: bool = False  # 32×32 images: stem and second stage at stride 1 (8× downsampling in all)
    dropout: float = 0.0
    se_ratio: float = 0.0  # squeeze-excitation in every block, reduced to make_divisible(hidden · ratio); 0 = none
    stem_channels: int = 32
    head_channels: int = 1280
    stages: list[list[int]] = field(default_factory=lambda: [list(s) for s in MOBILENETV2_STAGES])
    kernel_size: int = 3
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    custom_bn_slots: int = 1  # BN statistics slots for plans that are not width choices (e.g. a gate's routes)
    slim_from: str | None = None  # gate-aware layout: the first block of a stage; every layer before it keeps one width
    trunk_width: float | None = None  # gate-aware layout: that one width (default: the largest width)

    def validate(self) -> None:
        widths = [float(w) for w in self.widths]
        if not widths or any(w <= 0 for w in widths):
            raise ValueError(f"widths must be a non-empty list of positive multipliers, got {self.widths}")
        if widths != sorted(set(widths)):
            raise ValueError(f"widths must be strictly increasing, got {self.widths}")
        self.widths = widths
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {self.num_classes}")
        for stage in self.stages:
            if len(stage) != 4 or min(stage) < 1:
                raise ValueError(f"each stage is (expand_ratio, channels, repeats, stride) ≥ 1, got {stage}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.custom_bn_slots, bool) or not isinstance(self.custom_bn_slots, int) \
                or self.custom_bn_slots < 1:
            raise ValueError(f"custom_bn_slots must be a positive integer, got {self.custom_bn_slots}")
        if self.trunk_width is not None:
            if self.slim_from is None:
                raise ValueError("trunk_width is the width before slim_from: it needs slim_from (the gate-aware "
                                 "layout)")
            if not 0 < self.trunk_width <= widths[-1] + 1e-9:
                raise ValueError(f"trunk_width must be in (0, {widths[-1]}], the largest width; got {self.trunk_width}")
            self.trunk_width = float(self.trunk_width)


@dataclass(frozen=True)
class _Route:
    """A resolved plan with the per-layer arguments the forward needs, computed once per plan."""

    plan: WidthPlan
    stem: int
    blocks: tuple[tuple[int, ...], ...]  # each block's `widths(channels)`
    head: int


class DSMobileNetV2(ResolvesWidths, BNSlots, nn.Module):
    """The slimmable MobileNetV2 supernet. ``model(x, width=W)`` runs width ``W``; ``model(x)`` the largest.

    ``W`` may be a multiplier (float), a choice index (int), per-stage choices (a sequence with one multiplier or
    choice index per entry of ``stage_names``), a mapping of group name → channels, or a ``WidthPlan``.
    """

    def __init__(self, config: SupernetConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.widths = tuple(config.widths)
        self._build_layout()
        # BN statistics slots: one per width choice, then `custom_bn_slots` for plans that are not choices.
        self.init_bn_slots(len(self.widths), config.custom_bn_slots, len(self.group_names))
        self.choice_plans = tuple(WidthPlan(self.group_names, self._uniform_channels(w), i)
                                  for i, w in enumerate(self.widths))
        self._choice_by_channels: dict[tuple[int, ...], int] = {}
        for i, plan in enumerate(self.choice_plans):
            self._choice_by_channels.setdefault(plan.channels, i)
        self.max_channels = self.choice_plans[-1].channels
        for i, plan in enumerate(self.choice_plans):
            if any(c > m for c, m in zip(plan.channels, self.max_channels)):
                raise ValueError(f"width {self.widths[i]} is wider than the largest width in some layer")
        self._build_layers()
        self._routes: dict[Any, _Route] = {}
        self._init_weights()

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
        # Stages (entries of stage_names) that keep the trunk width in every width choice: none unless gate-aware.
        self.trunk_stages = 0
        if cfg.slim_from is not None:
            firsts = [spec.name for spec in specs if spec.name.endswith(".0")]
            if cfg.slim_from not in firsts:
                raise ValueError(f"slim_from must be the first block of a stage ({', '.join(firsts)}); got "
                                 f"{cfg.slim_from!r}")
            self.trunk_stages = self.stage_names.index(cfg.slim_from.rsplit(".", 1)[0])

    @property
    def trunk_width(self) -> float | None:
        """The one width of every layer before `slim_from` in a gate-aware supernet; None in the ordinary layout."""
        if self.config.slim_from is None:
            return None
        return self.config.trunk_width if self.config.trunk_width is not None else self.widths[-1]

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

    def _uniform_channels(self, width: float) -> tuple[int, ...]:
        """Channel counts of multiplier `width`: every layer at it, or, gate-aware, the trunk at the trunk width."""
        trunk = [self.trunk_width] * self.trunk_stages
        return self._channels_for_stage_widths(trunk + [width] * (len(self.stage_names) - self.trunk_stages))

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

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def _make_route(self, plan: WidthPlan) -> _Route:
        return _Route(plan, plan.channels[0], tuple(b.widths(plan.channels) for b in self.flat_blocks),
                      plan.channels[-1])

    # ---- forward ------------------------------------------------------------------------------------------------

    @property
    def flat_blocks(self) -> list[SlimBlock]:
        """Every block, over all stages, in the order of `block_specs`."""
        return [b for stage in self.blocks for b in stage]

    def block(self, index: int) -> SlimBlock:
        """Block `index`, counted over all stages in the order of `block_specs`."""
        return self.flat_blocks[index]

    def forward_features(self, x: torch.Tensor, width: Any = None, running_stats: bool = True) -> torch.Tensor:
        route = self._route(width)
        if running_stats:
            slot = self.stats_slot(route.plan)
        elif self.training:
            slot = None  # batch statistics only: no slot is claimed or updated
        else:
            raise ValueError("running_stats=False needs training mode: evaluation normalises with running statistics")
        norm = SlotNorm(slot)
        x = self.forward_stem(x, route.plan, norm)
        x = self._blocks(x, route, norm, 0, None)
        return self.forward_head_features(x, route.plan, norm)

    # The network in parts, for a caller that runs its layers at different widths or BN slots (the gated network).
    # `norm` is a block's norm hook (`bn_slots.SlotNorm` or `bn_slots.RoutedNorm`).

    def forward_stem(self, x: torch.Tensor, plan: WidthPlan, norm) -> torch.Tensor:
        return F.relu6(norm(self.bn1, self.conv_stem(x, plan.channels[0]), 0), inplace=True)

    def forward_blocks(self, x: torch.Tensor, plan: WidthPlan, norm, start: int = 0,
                       stop: int | None = None) -> torch.Tensor:
        """Blocks `start` … `stop - 1`, counted over all stages in the order of `block_specs`."""
        return self._blocks(x, self._route(plan), norm, start, stop)

    def _blocks(self, x: torch.Tensor, route: _Route, norm, start: int, stop: int | None) -> torch.Tensor:
        blocks = self.flat_blocks
        stop = len(blocks) if stop is None else stop
        for block, widths in zip(blocks[start:stop], route.blocks[start:stop]):
            x = block(x, widths, norm)
        return x

    def forward_head_features(self, x: torch.Tensor, plan: WidthPlan, norm) -> torch.Tensor:
        head = len(self.group_names) - 1
        return F.relu6(norm(self.bn2, self.conv_head(x, plan.channels[head]), head), inplace=True)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(global_avg_pool(x)))

    def forward(self, x: torch.Tensor, width: Any = None, running_stats: bool = True) -> torch.Tensor:
        """Logits at `width`. In training, ``running_stats=False`` leaves every BN's running statistics alone (the
        random plans of stage I, which would otherwise claim a custom slot each step)."""
        return self.forward_head(self.forward_features(x, width, running_stats))

    # ---- export and costs: the same layout as the forward, as dense layers and as counts ----------------------

    def export_layers(self, plan: WidthPlan, slot: int) -> OrderedDict[str, nn.Module]:
        """The dense layers of `plan` with the BN statistics of `slot`, named as timm names them."""
        layers = self.export_stem(plan, slot)
        flat = iter(self.export_blocks(plan, slot))
        layers["blocks"] = nn.Sequential(*(nn.Sequential(*(next(flat) for _ in stage)) for stage in self.blocks))
        layers.update(self.export_head(plan, slot))
        return layers

    def export_stem(self, plan: WidthPlan, slot: int) -> OrderedDict[str, nn.Module]:
        ch = plan.channels
        return OrderedDict(conv_stem=self.conv_stem.export(self.config.in_chans, ch[0]),
                           bn1=self.bn1.export(ch[0], slot), act1=nn.ReLU6(inplace=True))

    def export_blocks(self, plan: WidthPlan, slot: int, start: int = 0, stop: int | None = None) -> list[nn.Module]:
        """Blocks `start` … `stop - 1` (counted as `forward_blocks` counts them) as dense modules."""
        route = self._route(plan)
        stop = len(self.flat_blocks) if stop is None else stop
        return [block.export(widths, slot)
                for block, widths in zip(self.flat_blocks[start:stop], route.blocks[start:stop])]

    def export_head(self, plan: WidthPlan, slot: int) -> OrderedDict[str, nn.Module]:
        ch = plan.channels
        return OrderedDict(conv_head=self.conv_head.export(ch[self.block_specs[-1].out_group], ch[-1]),
                           bn2=self.bn2.export(ch[-1], slot), act2=nn.ReLU6(inplace=True),
                           global_pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1),
                           dropout=nn.Dropout(self.config.dropout), classifier=self.classifier.export(ch[-1]))

    def export_parts(self, plan: WidthPlan, slot: int, names: Container[str] | None = None) -> list[Part]:
        """The dense layers of `plan` as the parts a latency table times (`blocks.Part`), in forward order; with
        `names`, only the parts of those names."""
        def wanted(name: str) -> bool:
            return names is None or name in names

        last, head_group = self.block_specs[-1].out_group, len(self.group_names) - 1
        parts = [Part("stem", nn.Sequential(self.export_stem(plan, slot)), None, 0)] if wanted("stem") else []
        for block, widths in zip(self.flat_blocks, self._route(plan).blocks):
            if wanted(f"{block.spec.name}.features") or wanted(f"{block.spec.name}.projection"):
                parts += [p for p in block.export_parts(widths, slot) if wanted(p.name)]
        if wanted("head") or wanted("classifier"):
            head = self.export_head(plan, slot)
            layers = list(head.items())
            cut = list(head).index("global_pool")
            candidates = [Part("head", nn.Sequential(OrderedDict(layers[:cut])), last, head_group),
                          Part("classifier", nn.Sequential(OrderedDict(layers[cut:])), head_group, None)]
            parts += [p for p in candidates if wanted(p.name)]
        return parts

    def costs(self, plan: WidthPlan, img_size: int) -> Costs:
        """MAdds and parameters of every layer of `plan` for one image of `img_size`, in forward order."""
        route, ch = self._route(plan), plan.channels
        costs = Costs(img_size)
        costs.conv("conv_stem", self.conv_stem, self.config.in_chans, ch[0])
        costs.bn("bn1", ch[0])
        for block, widths in zip(self.flat_blocks, route.blocks):
            block.costs(widths, costs)
        costs.conv("conv_head", self.conv_head, ch[self.block_specs[-1].out_group], ch[-1])
        costs.bn("bn2", ch[-1])
        costs.linear("classifier", ch[-1], self.config.num_classes)
        return costs


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
