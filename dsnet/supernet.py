"""What every supernet architecture shares: width plans, BN slots, the loop over blocks, export and costs.

An architecture (`mobilenetv2.DSMobileNetV2`, `resnet.DSResNet`) writes its layout once: its channel groups and
block specs (`_build_layout`), the channel counts of per-stage multipliers (`_channels_for_stage_widths`), its
layers (`_build_layers`), and its stem and head in three forms each (forward, dense layers, costs). Its blocks
(`blocks.SlimBlock`) describe themselves. This class runs the rest: the forward over the blocks, the dense export
of a plan, the parts a latency table times and the per-layer costs.

The *gate-aware* layout (``slim_from``, DS-Net's) is shared too: the stages before block ``slim_from`` (the first
block of a stage) keep one width, ``trunk_width``, in every width choice; only the layers from that block on slim.
The width choices are then exactly the routes of a gate in that block, and stage I trains every route.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Container, Sequence

import torch
import torch.nn as nn

from .blocks import Costs, Part, SlimBlock
from .bn_slots import BNSlots, SlotNorm
from .records import Record
from .widths import ResolvesWidths, WidthPlan


@dataclass
class NetworkConfig(Record):
    """What every architecture's config holds; each architecture's config adds its own keys and its defaults."""

    arch: str = ""
    widths: list[float] = field(default_factory=list)
    num_classes: int = 1000
    in_chans: int = 3
    img_size: int = 224
    small_input: bool = False  # ~32 px images: the architecture's small-input stem
    dropout: float = 0.0
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
    blocks: tuple[tuple[int, ...], ...]  # each block's `widths(channels)`


class SlimNetwork(ResolvesWidths, BNSlots, nn.Module):
    """A slimmable supernet. ``model(x, width=W)`` runs width ``W``; ``model(x)`` the largest.

    ``W`` may be a multiplier (float), a choice index (int), per-stage choices (a sequence with one multiplier or
    choice index per entry of ``stage_names``), a mapping of group name → channels, or a ``WidthPlan``.

    A subclass sets ``group_names``, ``block_specs`` and ``stage_names`` in `_build_layout` (the last group is the
    one the classifier reads, unless it overrides `head_group`) and builds its modules in `_build_layers`.
    """

    arch = ""

    def __init__(self, config):
        super().__init__()
        config.validate()
        self.config = config
        self.widths = tuple(config.widths)
        self._build_layout()
        self._set_trunk()
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

    # ---- what an architecture provides --------------------------------------------------------------------------

    def _build_layout(self) -> None:
        raise NotImplementedError

    def _build_layers(self) -> None:
        raise NotImplementedError

    def _channels_for_stage_widths(self, stage_widths: Sequence[float]) -> tuple[int, ...]:
        """Channel counts when each entry of `stage_names` has its own multiplier."""
        raise NotImplementedError

    @property
    def block_stages(self) -> list[nn.ModuleList]:
        """The blocks, stage by stage."""
        raise NotImplementedError

    def forward_stem(self, x: torch.Tensor, plan: WidthPlan, norm) -> torch.Tensor:
        raise NotImplementedError

    def forward_head_features(self, x: torch.Tensor, plan: WidthPlan, norm) -> torch.Tensor:
        """The layers between the last block and the pooling (none in a ResNet)."""
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Pooling and classifier."""
        raise NotImplementedError

    def export_stem(self, plan: WidthPlan, slot: int) -> OrderedDict[str, nn.Module]:
        raise NotImplementedError

    def export_head(self, plan: WidthPlan, slot: int) -> OrderedDict[str, nn.Module]:
        """The dense layers after the last block; the pooling is named ``global_pool``."""
        raise NotImplementedError

    def nest_blocks(self, blocks: list[nn.Module]) -> OrderedDict[str, nn.Module]:
        """Dense blocks (in `flat_blocks` order) in the containers the architecture's timm model names."""
        raise NotImplementedError

    def stem_costs(self, plan: WidthPlan, costs: Costs) -> None:
        raise NotImplementedError

    def stem_and_head_producers(self) -> dict[int, list[str]]:
        """The channel-mixing layers outside the blocks that write each channel group."""
        raise NotImplementedError

    def producers(self) -> dict[str, set[str]]:
        """The channel-mixing layers that write each channel group (by group name), from the layout."""
        producers: dict[str, set[str]] = {name: set() for name in self.group_names}
        for source in [self.stem_and_head_producers()] + [block.producers() for block in self.flat_blocks]:
            for group, layers in source.items():
                producers[self.group_names[group]].update(layers)
        return producers

    def timm_name(self, width: float) -> str:
        """The timm model whose state dict the dense subnet of width choice `width` is; ValueError saying why
        there is none."""
        raise NotImplementedError

    def head_costs(self, plan: WidthPlan, costs: Costs) -> None:
        raise NotImplementedError

    # ---- layout -------------------------------------------------------------------------------------------------

    def _set_trunk(self) -> None:
        # Stages (entries of stage_names) that keep the trunk width in every width choice: none unless gate-aware.
        self.trunk_stages = 0
        slim_from = self.config.slim_from
        if slim_from is not None:
            firsts = self.first_blocks()
            if slim_from not in firsts:
                raise ValueError(f"slim_from must be the first block of a stage ({', '.join(firsts)}); got "
                                 f"{slim_from!r}")
            self.trunk_stages = self.stage_names.index(slim_from.rsplit(".", 1)[0])

    def first_blocks(self) -> list[str]:
        """The name of each stage's first block: where a gate, or the gate-aware layout's slimming, may start."""
        return [spec.name for spec in self.block_specs if spec.name.endswith(".0")]

    @property
    def default_gate_block(self) -> str:
        """Where a gate sits unless told: the first block of the middle stage (DS-Net's blocks.3.0 of MobileNetV2's
        seven stages; layer3.0 of an ImageNet ResNet, layer2.0 of a CIFAR one), or the gate-aware layout's slim_from."""
        if self.config.slim_from is not None:
            return self.config.slim_from
        firsts = self.first_blocks()
        return firsts[len(firsts) // 2]

    @property
    def trunk_width(self) -> float | None:
        """The one width of every layer before `slim_from` in a gate-aware supernet; None in the ordinary layout."""
        if self.config.slim_from is None:
            return None
        return self.config.trunk_width if self.config.trunk_width is not None else self.widths[-1]

    def _uniform_channels(self, width: float) -> tuple[int, ...]:
        """Channel counts of multiplier `width`: every layer at it, or, gate-aware, the trunk at the trunk width."""
        trunk = [self.trunk_width] * self.trunk_stages
        return self._channels_for_stage_widths(trunk + [width] * (len(self.stage_names) - self.trunk_stages))

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
        return _Route(plan, tuple(b.widths(plan.channels) for b in self.flat_blocks))

    @property
    def head_group(self) -> int:
        """The channel group the classifier reads."""
        return len(self.group_names) - 1

    # ---- forward ------------------------------------------------------------------------------------------------

    @property
    def flat_blocks(self) -> list[SlimBlock]:
        """Every block, over all stages, in the order of `block_specs`."""
        return [b for stage in self.block_stages for b in stage]

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

    def forward_blocks(self, x: torch.Tensor, plan: WidthPlan, norm, start: int = 0,
                       stop: int | None = None) -> torch.Tensor:
        """Blocks `start` … `stop - 1`, counted over all stages in the order of `block_specs`. With the stem and the
        head, the network in parts, for a caller that runs its layers at different widths or BN slots (the gated
        network); `norm` is a block's norm hook (`bn_slots.SlotNorm` or `bn_slots.RoutedNorm`)."""
        return self._blocks(x, self._route(plan), norm, start, stop)

    def _blocks(self, x: torch.Tensor, route: _Route, norm, start: int, stop: int | None) -> torch.Tensor:
        blocks = self.flat_blocks
        stop = len(blocks) if stop is None else stop
        for block, widths in zip(blocks[start:stop], route.blocks[start:stop]):
            x = block(x, widths, norm)
        return x

    def forward(self, x: torch.Tensor, width: Any = None, running_stats: bool = True) -> torch.Tensor:
        """Logits at `width`. In training, ``running_stats=False`` leaves every BN's running statistics alone (the
        random plans of stage I, which would otherwise claim a custom slot each step)."""
        return self.forward_head(self.forward_features(x, width, running_stats))

    # ---- export and costs: the same layout as the forward, as dense layers and as counts ----------------------

    def export_layers(self, plan: WidthPlan, slot: int) -> OrderedDict[str, nn.Module]:
        """The dense layers of `plan` with the BN statistics of `slot`, named as timm names them."""
        layers = self.export_stem(plan, slot)
        layers.update(self.nest_blocks(self.export_blocks(plan, slot)))
        layers.update(self.export_head(plan, slot))
        return layers

    def export_blocks(self, plan: WidthPlan, slot: int, start: int = 0, stop: int | None = None) -> list[nn.Module]:
        """Blocks `start` … `stop - 1` (counted as `forward_blocks` counts them) as dense modules."""
        route = self._route(plan)
        stop = len(self.flat_blocks) if stop is None else stop
        return [block.export(widths, slot)
                for block, widths in zip(self.flat_blocks[start:stop], route.blocks[start:stop])]

    def export_parts(self, plan: WidthPlan, slot: int, names: Container[str] | None = None) -> list[Part]:
        """The dense layers of `plan` as the parts a latency table times (`blocks.Part`), in forward order; with
        `names`, only the parts of those names."""
        def wanted(name: str) -> bool:
            return names is None or name in names

        parts = [Part("stem", nn.Sequential(self.export_stem(plan, slot)), None, 0)] if wanted("stem") else []
        for block, widths in zip(self.flat_blocks, self._route(plan).blocks):
            if any(wanted(f"{block.spec.name}.{part}") for part in block.part_names):
                parts += [p for p in block.export_parts(widths, slot) if wanted(p.name)]
        if wanted("head") or wanted("classifier"):
            head = self.export_head(plan, slot)
            layers = list(head.items())
            cut = list(head).index("global_pool")
            candidates = [Part("classifier", nn.Sequential(OrderedDict(layers[cut:])), self.head_group, None)]
            if cut:  # layers between the last block and the pooling
                candidates.insert(0, Part("head", nn.Sequential(OrderedDict(layers[:cut])),
                                          self.block_specs[-1].out_group, self.head_group))
            parts += [p for p in candidates if wanted(p.name)]
        return parts

    def costs(self, plan: WidthPlan, img_size: int) -> Costs:
        """MAdds and parameters of every layer of `plan` for one image of `img_size`, in forward order."""
        costs = Costs(img_size)
        self.stem_costs(plan, costs)
        for block, widths in zip(self.flat_blocks, self._route(plan).blocks):
            block.costs(widths, costs)
        self.head_costs(plan, costs)
        return costs
