"""The DS-MobileNetV2 supernet: MobileNetV2's layout with every layer slice-able, width passed with each call.

Channel counts per width follow timm's ``mobilenetv2_*`` models exactly: ``make_divisible(c · w, 8)``, the head
never below its base width, the expansion width ``make_divisible(rounded input width · t)``. Module and parameter
names are timm's too, so a dense subnet's state dict loads into timm's model as it is.

Channels are described by *channel groups* — layers that must share a width: the stem, the residual stream of each
stage (every block output of the stage), the hidden width of each expanding block, and the head. A plan gives one
channel count per group.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import make_divisible

from .slim import SlimBatchNorm2d, SlimConv2d, SlimLinear, SlimSqueezeExcite, WidthPlan, global_avg_pool

MOBILENETV2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                      (6, 320, 1, 1))
_MAX_CACHED_ROUTES = 4096
DEFAULT_WIDTHS = tuple(round(0.35 + 0.05 * i, 2) for i in range(14))


@dataclass
class SupernetConfig:
    """Everything that defines a supernet's architecture (what a checkpoint must record to rebuild it)."""

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

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SupernetConfig":
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"unknown supernet config key(s) {unknown}; valid keys: {sorted(valid)}")
        config = cls(**values)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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
    has_skip: bool


class DepthwiseSeparable(nn.Module):
    """Block with expansion ratio 1: depthwise → BN → ReLU6 → (SE) → pointwise → BN."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, num_slots: int,
                 se_channels: int, has_skip: bool, bn_args: dict):
        super().__init__()
        self.has_skip = has_skip
        self.conv_dw = SlimConv2d(in_channels, in_channels, kernel_size, stride, depthwise=True)
        self.bn1 = SlimBatchNorm2d(in_channels, num_slots, **bn_args)
        self.se = SlimSqueezeExcite(in_channels, se_channels) if se_channels else None
        self.conv_pw = SlimConv2d(in_channels, out_channels, 1)
        self.bn2 = SlimBatchNorm2d(out_channels, num_slots, **bn_args)

    def hidden_features(self, x: torch.Tensor, hidden: int, slot: int) -> torch.Tensor:
        """The features squeeze-excitation (or a gate) acts on: after the depthwise convolution."""
        return F.relu6(self.bn1(self.conv_dw(x), slot), inplace=True)

    def project(self, h: torch.Tensor, out: int, slot: int) -> torch.Tensor:
        return self.bn2(self.conv_pw(h, out), slot)

    def forward(self, x: torch.Tensor, hidden: int, out: int, se_channels: int, slot: int) -> torch.Tensor:
        h = self.hidden_features(x, hidden, slot)
        if self.se is not None:
            h = self.se(h, se_channels)
        y = self.project(h, out, slot)
        return y + x if self.has_skip else y


class InvertedResidual(nn.Module):
    """Block with expansion: pointwise → BN → ReLU6 → depthwise → BN → ReLU6 → (SE) → pointwise → BN (+ input)."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, kernel_size: int, stride: int,
                 num_slots: int, se_channels: int, has_skip: bool, bn_args: dict):
        super().__init__()
        self.has_skip = has_skip
        self.conv_pw = SlimConv2d(in_channels, hidden_channels, 1)
        self.bn1 = SlimBatchNorm2d(hidden_channels, num_slots, **bn_args)
        self.conv_dw = SlimConv2d(hidden_channels, hidden_channels, kernel_size, stride, depthwise=True)
        self.bn2 = SlimBatchNorm2d(hidden_channels, num_slots, **bn_args)
        self.se = SlimSqueezeExcite(hidden_channels, se_channels) if se_channels else None
        self.conv_pwl = SlimConv2d(hidden_channels, out_channels, 1)
        self.bn3 = SlimBatchNorm2d(out_channels, num_slots, **bn_args)

    def hidden_features(self, x: torch.Tensor, hidden: int, slot: int) -> torch.Tensor:
        """The features squeeze-excitation (or a gate) acts on: expanded, after the depthwise convolution."""
        x = F.relu6(self.bn1(self.conv_pw(x, hidden), slot), inplace=True)
        return F.relu6(self.bn2(self.conv_dw(x), slot), inplace=True)

    def project(self, h: torch.Tensor, out: int, slot: int) -> torch.Tensor:
        return self.bn3(self.conv_pwl(h, out), slot)

    def forward(self, x: torch.Tensor, hidden: int, out: int, se_channels: int, slot: int) -> torch.Tensor:
        h = self.hidden_features(x, hidden, slot)
        if self.se is not None:
            h = self.se(h, se_channels)
        y = self.project(h, out, slot)
        return y + x if self.has_skip else y


@dataclass(frozen=True)
class _Route:
    """A resolved plan with the per-layer arguments the forward needs, computed once per plan."""

    plan: WidthPlan
    stem: int
    blocks: tuple[tuple[int, int, int], ...]  # (hidden, out, se_channels) per block
    head: int


class DSMobileNetV2(nn.Module):
    """The slimmable MobileNetV2 supernet. ``model(x, width=W)`` runs width ``W``; ``model(x)`` the largest.

    ``W`` may be a multiplier (float), a choice index (int), per-stage choices (a sequence with one multiplier or
    choice index per entry of ``stage_names``), a mapping of group name → channels, or a ``WidthPlan``.
    """

    def __init__(self, config: SupernetConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.widths = tuple(config.widths)
        # BN statistics slots: one per width choice, then `custom_bn_slots` for plans that are not choices.
        self.custom_slot = len(self.widths)  # the first custom slot
        self.num_custom_slots = config.custom_bn_slots
        self.num_slots = len(self.widths) + self.num_custom_slots
        self._build_layout()
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
        # Row i: the plan whose statistics custom slot i holds (zeros: none yet). A buffer so checkpoints keep it.
        self.register_buffer("calibrated_plans",
                             torch.zeros(self.num_custom_slots, len(self.group_names), dtype=torch.long))
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
        return self._channels_for_stage_widths([width] * len(self.stage_names))

    def se_channels(self, block: BlockSpec, channels: Sequence[int]) -> int:
        """Reduced width of a block's squeeze-excitation for a plan (0 without SE)."""
        if not self.config.se_ratio:
            return 0
        group = block.hidden_group if block.hidden_group is not None else block.in_group
        return make_divisible(channels[group] * self.config.se_ratio)

    def _build_layers(self) -> None:
        cfg = self.config
        m = self.max_channels
        bn_args = dict(eps=cfg.bn_eps, momentum=cfg.bn_momentum)
        self.conv_stem = SlimConv2d(cfg.in_chans, m[0], 3, self.stem_stride)
        self.bn1 = SlimBatchNorm2d(m[0], self.num_slots, **bn_args)
        stages: list[list[nn.Module]] = [[] for _ in cfg.stages]
        for spec in self.block_specs:
            stage = int(spec.name.split(".")[1])
            se = self.se_channels(spec, m)
            if spec.hidden_group is None:
                block = DepthwiseSeparable(m[spec.in_group], m[spec.out_group], spec.kernel_size, spec.stride,
                                           self.num_slots, se, spec.has_skip, bn_args)
            else:
                block = InvertedResidual(m[spec.in_group], m[spec.out_group], m[spec.hidden_group],
                                         spec.kernel_size, spec.stride, self.num_slots, se, spec.has_skip, bn_args)
            stages[stage].append(block)
        self.blocks = nn.ModuleList(nn.ModuleList(s) for s in stages)
        self._flat_blocks = [b for s in self.blocks for b in s]
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

    # ---- widths -------------------------------------------------------------------------------------------------

    @property
    def largest(self) -> WidthPlan:
        return self.choice_plans[-1]

    @property
    def smallest(self) -> WidthPlan:
        return self.choice_plans[0]

    def resolve_width(self, width: Any = None) -> WidthPlan:
        """Turn any accepted width form into a validated `WidthPlan` (ValueError naming the layer if it won't fit)."""
        return self._route(width).plan

    def _route(self, width: Any) -> _Route:
        key = _cache_key(width)
        route = self._routes.get(key)
        if route is None:
            plan = self._make_plan(width)
            blocks = tuple((plan.channels[b.hidden_group] if b.hidden_group is not None else 0,
                            plan.channels[b.out_group], self.se_channels(b, plan.channels))
                           for b in self.block_specs)
            route = _Route(plan, plan.channels[0], blocks, plan.channels[-1])
            if len(self._routes) >= _MAX_CACHED_ROUTES:  # searches visit many plans; keep the cache bounded
                self._routes.clear()
            self._routes[key] = route
        return route

    def _make_plan(self, width: Any) -> WidthPlan:
        if width is None:
            return self.largest
        if isinstance(width, WidthPlan):
            if width.names != self.group_names:
                raise ValueError("this WidthPlan was made for a supernet with other layers")
            return self._plan_from_channels(width.channels)
        if isinstance(width, bool):
            raise ValueError(f"width must be a multiplier, a choice index, per-stage choices or a plan, got {width}")
        if isinstance(width, int):
            if not -len(self.widths) <= width < len(self.widths):
                raise ValueError(f"width choice index {width} is out of range; there are {len(self.widths)} "
                                 f"choices {list(self.widths)}")
            return self.choice_plans[width]
        if isinstance(width, float):
            choice = self.choice_index(width)
            if choice is not None:
                return self.choice_plans[choice]
            return self._plan_from_channels(self._uniform_channels(self._check_multiplier(width, "width")))
        if isinstance(width, Mapping):
            return self._plan_from_mapping(width)
        if isinstance(width, Sequence) and not isinstance(width, str):
            if len(width) != len(self.stage_names):
                raise ValueError(f"per-stage widths need {len(self.stage_names)} entries {list(self.stage_names)}, "
                                 f"got {len(width)}")
            multipliers = []
            for name, w in zip(self.stage_names, width):
                if isinstance(w, bool) or not isinstance(w, (int, float)):
                    raise ValueError(f"per-stage width for '{name}' must be a multiplier or a choice index, got {w!r}")
                if isinstance(w, int):
                    if not 0 <= w < len(self.widths):
                        raise ValueError(f"per-stage width for '{name}': choice index {w} is out of range "
                                         f"0..{len(self.widths) - 1}")
                    w = self.widths[w]
                multipliers.append(self._check_multiplier(float(w), name))
            return self._plan_from_channels(self._channels_for_stage_widths(multipliers))
        raise ValueError(f"width must be a multiplier, a choice index, per-stage choices or a plan, got {width!r}")

    def _check_multiplier(self, w: float, name: str) -> float:
        if not 0 < w <= self.widths[-1] + 1e-9:
            raise ValueError(f"width multiplier for '{name}' is {w}; allowed: (0, {self.widths[-1]}]")
        return w

    def _plan_from_mapping(self, mapping: Mapping[str, Any]) -> WidthPlan:
        unknown = [k for k in mapping if k not in self.group_names]
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown} in width plan; layers are {list(self.group_names)}")
        missing = [k for k in self.group_names if k not in mapping]
        if missing:
            raise ValueError(f"width plan lacks layer(s) {missing}")
        channels = []
        for name in self.group_names:
            value = mapping[name]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"width plan value for layer '{name}' must be an integer channel count, "
                                 f"got {value!r}")
            channels.append(value)
        return self._plan_from_channels(tuple(channels))

    def _plan_from_channels(self, channels: tuple[int, ...]) -> WidthPlan:
        for name, c, m in zip(self.group_names, channels, self.max_channels):
            if not 1 <= c <= m:
                raise ValueError(f"width plan gives layer '{name}' {c} channels; allowed: 1..{m}")
        return WidthPlan(self.group_names, tuple(channels), self._choice_by_channels.get(channels))

    def choice_index(self, multiplier: float) -> int | None:
        """Index of the width choice equal to `multiplier`, or None."""
        for i, w in enumerate(self.widths):
            if abs(w - multiplier) < 1e-6:
                return i
        return None

    # ---- BN statistics ------------------------------------------------------------------------------------------

    def stats_slot(self, plan: WidthPlan) -> int:
        """The BN statistics slot a plan runs with; refuses to evaluate a plan whose statistics were never collected."""
        if plan.choice is not None:
            return plan.choice
        slot = self.custom_slot_of(plan)
        if slot is None:
            if not self.training:
                raise ValueError("BN statistics of this width plan were never collected; run "
                                 "dsnet.recalibrate_bn(model, plan, batches) first")
            # Training a new custom plan: its statistics start afresh rather than mix with another plan's.
            slot = self.claim_custom_slot(plan)
        return slot

    def custom_slot_of(self, plan: WidthPlan) -> int | None:
        """The custom slot holding statistics of `plan`, or None."""
        rows = self.calibrated_plans.tolist()
        channels = list(plan.channels)
        return next((self.custom_slot + i for i, row in enumerate(rows) if row == channels), None)

    @property
    def calibrated_plan(self) -> torch.Tensor:
        """The plan held by the first custom slot (the single-slot view older callers read); prefer
        `has_bn_statistics(plan)`, which looks at every custom slot."""
        return self.calibrated_plans[0]

    def has_bn_statistics(self, plan: WidthPlan) -> bool:
        """Whether `plan` can be evaluated: every width choice can, a custom plan once its statistics are collected."""
        return plan.choice is not None or self.custom_slot_of(plan) is not None

    def claim_custom_slot(self, plan: WidthPlan) -> int:
        """Reset a custom slot and record that it now belongs to `plan`: the slot already holding `plan`, else the
        first free one, else the last one (its plan loses its statistics). Returns the slot."""
        slot = self.custom_slot_of(plan)
        if slot is None:
            free = [i for i, row in enumerate(self.calibrated_plans.tolist()) if not any(row)]
            slot = self.custom_slot + (free[0] if free else self.num_custom_slots - 1)
        self.reset_bn_slot(slot)
        self.calibrated_plans[slot - self.custom_slot].copy_(torch.tensor(plan.channels))
        return slot

    def reset_bn_slot(self, slot: int) -> None:
        for module in self.modules():
            if isinstance(module, SlimBatchNorm2d):
                module.reset_slot(slot)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._pad_custom_slots(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _pad_custom_slots(self, state_dict: dict, prefix: str) -> None:
        """Let a state dict with fewer custom BN slots load: the missing slots are added empty.

        Also reads the single-slot form (a ``calibrated_plan`` vector) that supernets had before
        ``custom_bn_slots`` existed.
        """
        old_key, key = prefix + "calibrated_plan", prefix + "calibrated_plans"
        if old_key in state_dict and key not in state_dict:
            state_dict[key] = state_dict.pop(old_key).reshape(1, -1)
        plans = state_dict.get(key)
        if plans is None or plans.dim() != 2 or plans.shape[1] != len(self.group_names):
            return
        missing = self.num_custom_slots - plans.shape[0]
        if missing <= 0:
            return
        state_dict[key] = torch.cat([plans, plans.new_zeros(missing, plans.shape[1])])
        loaded_slots = len(self.widths) + plans.shape[0]
        empty = {"running_mean": 0.0, "running_var": 1.0, "num_batches_tracked": 0}
        for name, module in self.named_modules():
            if not isinstance(module, SlimBatchNorm2d):
                continue
            for buffer, fill in empty.items():
                full = f"{prefix}{name}.{buffer}"
                value = state_dict.get(full)
                if value is not None and value.shape[0] == loaded_slots:
                    pad = value.new_full((missing, *value.shape[1:]), fill)
                    state_dict[full] = torch.cat([value, pad])

    # ---- forward ------------------------------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor, width: Any = None, running_stats: bool = True) -> torch.Tensor:
        route = self._route(width)
        if running_stats:
            slot = self.stats_slot(route.plan)
        elif self.training:
            slot = None  # batch statistics only: no slot is claimed or updated
        else:
            raise ValueError("running_stats=False needs training mode: evaluation normalises with running statistics")
        x = self._stem(x, route, slot)
        x = self._blocks(x, route, slot, 0, len(self._flat_blocks))
        return self._head_features(x, route, slot)

    def _stem(self, x: torch.Tensor, route: _Route, slot: int) -> torch.Tensor:
        return F.relu6(self.bn1(self.conv_stem(x, route.stem), slot), inplace=True)

    def _blocks(self, x: torch.Tensor, route: _Route, slot: int, start: int, stop: int) -> torch.Tensor:
        for block, (hidden, out, se) in zip(self._flat_blocks[start:stop], route.blocks[start:stop]):
            x = block(x, hidden, out, se, slot)
        return x

    def _head_features(self, x: torch.Tensor, route: _Route, slot: int) -> torch.Tensor:
        return F.relu6(self.bn2(self.conv_head(x, route.head), slot), inplace=True)

    # The network in parts, for a caller that runs its layers at different widths or BN slots (the gated network).

    def forward_stem(self, x: torch.Tensor, plan: WidthPlan, slot: int) -> torch.Tensor:
        return self._stem(x, self._route(plan), slot)

    def forward_blocks(self, x: torch.Tensor, plan: WidthPlan, slot: int, start: int = 0,
                       stop: int | None = None) -> torch.Tensor:
        """Blocks `start` … `stop - 1`, counted over all stages in the order of `block_specs`."""
        return self._blocks(x, self._route(plan), slot, start, len(self._flat_blocks) if stop is None else stop)

    def forward_head_features(self, x: torch.Tensor, plan: WidthPlan, slot: int) -> torch.Tensor:
        return self._head_features(x, self._route(plan), slot)

    def block(self, index: int) -> nn.Module:
        """Block `index`, counted over all stages in the order of `block_specs`."""
        return self._flat_blocks[index]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(global_avg_pool(x)))

    def forward(self, x: torch.Tensor, width: Any = None, running_stats: bool = True) -> torch.Tensor:
        """Logits at `width`. In training, ``running_stats=False`` leaves every BN's running statistics alone (the
        random plans of stage I, which would otherwise claim a custom slot each step)."""
        return self.forward_head(self.forward_features(x, width, running_stats))


def _cache_key(width: Any) -> Any:
    if isinstance(width, WidthPlan):
        return ("plan", width.names, width.channels)
    if isinstance(width, Mapping):
        return ("map", tuple(sorted((k, _hashable(v)) for k, v in width.items())))
    if isinstance(width, (list, tuple)):
        return ("seq", tuple((type(w).__name__, _hashable(w)) for w in width))
    return (type(width).__name__, _hashable(width))


def _hashable(value: Any) -> Any:
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)


def create_supernet(config: SupernetConfig | Mapping[str, Any] | None = None, **overrides: Any) -> DSMobileNetV2:
    """Build a DS-MobileNetV2 supernet from a config (object or mapping) with keyword overrides."""
    if config is None:
        values: dict[str, Any] = {}
    elif isinstance(config, SupernetConfig):
        values = config.to_dict()
    else:
        values = dict(config)
    values.update(overrides)
    return DSMobileNetV2(SupernetConfig.from_dict(values))
