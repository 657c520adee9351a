"""The double-headed gate and the gated network, in which each input picks the width the rest of the network runs at.

`DoubleHeadedGate` squeezes a block's hidden features (global pool → 1×1 reduce → ReLU). Two heads share the
squeezed features: the *attention head* (1×1 expand → scale of the features, as squeeze-excitation does) and the
*slimming head* (linear → one logit per route).

`GatedDSNet` is a supernet with one gate in the first block of a stage. The layers before the gate run at a fixed
width (`GateConfig.input_width`; in a gate-aware supernet, its trunk width, and the gate sits in its `slim_from`).
The gate block's projection and every later layer run at the width of the route the gate picks. So a route is a
per-stage plan: the stages before the gate at the input width, the rest at the route's width. Explicit arguments
choose one of three forwards:

- ``gated(x)``: dynamic inference. The route of each input is the argmax of its logits, with no noise. Inputs are
  grouped by route, each group runs *sliced* at its width, and the outputs come back in input order.
- ``gated(x, route=r)``: every input runs at route ``r``, sliced.
- ``gated(x, gumbel_tau=t)``: the training forward. Routes are drawn by straight-through Gumbel-softmax (a hard
  one-hot forward with a soft gradient). The layers after the gate are computed at the widest route's width. Each
  input's channels are *masked* to its route's width and normalised with its route's BN statistics, which keeps
  the choice of route differentiable. Masking saves nothing, so only training uses it.

BN statistics: every route has its own, in a custom slot of the supernet. A route that is a width choice starts
from the choice's statistics; the others are collected at insertion (`bn_slots.calibrate_routes`). Stage II
collects every route's again before it validates, through the network as the gate has changed it. The supernet stays in eval mode inside the gated network, so
statistics never change while the gate trains.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import make_divisible

from .records import Record
from .bn_slots import (RoutedNorm, SlotNorm, calibrate_routes, copy_statistics, share_pre_gate_statistics,
                       supernet_norms)
from .madds import layer_costs
from .slim import SlimBatchNorm2d, SlimSqueezeExcite
from .supernet import SlimNetwork
from .widths import WidthPlan

DEFAULT_GATE_BLOCK = "blocks.3.0"


@dataclass
class GateConfig(Record):
    """Where the gate sits and which widths it routes to: what a checkpoint records to rebuild the gated network."""

    what = "gate config"

    routes: list[float]  # width multipliers, increasing, each a width choice of the supernet
    input_width: float  # width of every layer before the gate; a width choice
    block: str = DEFAULT_GATE_BLOCK  # the first block of a stage
    se_ratio: float = 0.25  # the gate's squeeze width, relative to its input channels (when the block has no SE)


class DoubleHeadedGate(nn.Module):
    """Squeeze shared by an attention head (a per-channel scale of the features) and a slimming head (route logits).

    ``attention="tanh"`` scales by ``1 + tanh(·)``, with the expand layer zero-initialised. A gate inserted into a
    trained network therefore starts as the identity. ``attention="sigmoid"`` is squeeze-excitation's own scale.
    It is used when the gate takes over a block's SE, whose weights it copies.
    """

    def __init__(self, channels: int, reduced_channels: int, num_routes: int, attention: str = "tanh"):
        super().__init__()
        if attention not in ("tanh", "sigmoid"):
            raise ValueError(f"attention must be 'tanh' or 'sigmoid', got {attention!r}")
        self.attention = attention
        self.conv_reduce = nn.Conv2d(channels, reduced_channels, 1, bias=True)
        self.conv_expand = nn.Conv2d(reduced_channels, channels, 1, bias=True)
        self.slimming = nn.Linear(reduced_channels, num_routes)
        # Added to the route logits: a cost bias that stage II sets so that the routes meet the cost target
        # (`dsnet.gate_budget.calibrate_route_bias`); zero until then.
        self.register_buffer("route_bias", torch.zeros(num_routes))
        if attention == "tanh":
            nn.init.zeros_(self.conv_expand.weight)
            nn.init.zeros_(self.conv_expand.bias)
        nn.init.normal_(self.slimming.weight, 0, 0.01)
        nn.init.zeros_(self.slimming.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x scaled by the attention head, route logits of shape (batch, routes))."""
        squeezed = F.relu(self.conv_reduce(F.adaptive_avg_pool2d(x, 1)))
        s = self.conv_expand(squeezed)
        scale = 1 + torch.tanh(s) if self.attention == "tanh" else torch.sigmoid(s)
        return x * scale, self.slimming(squeezed.flatten(1)) + self.route_bias

    @torch.no_grad()
    def copy_attention_from(self, se: SlimSqueezeExcite) -> None:
        channels, reduced = self.conv_expand.out_channels, self.conv_reduce.out_channels
        self.conv_reduce.weight.copy_(se.conv_reduce.weight[:reduced, :channels])
        self.conv_reduce.bias.copy_(se.conv_reduce.bias[:reduced])
        self.conv_expand.weight.copy_(se.conv_expand.weight[:channels, :reduced])
        self.conv_expand.bias.copy_(se.conv_expand.bias[:channels])

    def madds(self) -> int:
        """Multiply-accumulates of one input: both 1×1 convolutions act on the pooled 1×1 features."""
        reduce, expand = self.conv_reduce, self.conv_expand
        return (reduce.in_channels * reduce.out_channels + expand.in_channels * expand.out_channels
                + self.slimming.in_features * self.slimming.out_features)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


@dataclass
class RoutingInfo:
    """What the gate decided for each input of a batch."""

    routes: torch.Tensor  # (batch,) route index of each input
    route_logits: torch.Tensor  # (batch, routes) the slimming head's logits
    madds: torch.Tensor  # (batch,) multiply-accumulates of each input's route, the gate included


def check_gate_config(supernet: SlimNetwork, config: GateConfig) -> None:
    """ValueError saying what does not fit: routes that are not width choices, a gate block that is not the
    first block of a stage, an input width that is not a width choice."""
    def not_choices(values: Sequence[float]) -> list[float]:
        return [w for w in values if supernet.choice_index(float(w)) is None]

    choices = ", ".join(f"{w:g}" for w in supernet.widths)
    if not config.routes:
        raise ValueError("the gate needs at least one route")
    bad = not_choices(config.routes)
    if bad:
        raise ValueError(f"gate routes {bad} are not width choices of the supernet ({choices})")
    if list(config.routes) != sorted(set(config.routes)):
        raise ValueError(f"gate routes must be strictly increasing, got {list(config.routes)}")
    firsts = supernet.first_blocks()
    slim_from = supernet.config.slim_from
    if slim_from is not None:  # gate-aware: the routes are the width choices, which stage I trained
        if config.block != slim_from:
            raise ValueError(f"this supernet is gate-aware from block {slim_from}: the gate sits there, not in "
                             f"{config.block}")
        if abs(config.input_width - supernet.trunk_width) > 1e-6:
            raise ValueError(f"this supernet's layers before {slim_from} have width {supernet.trunk_width:g}: the "
                             f"gate's input width is that, not {config.input_width:g}")
    elif not_choices([config.input_width]):
        raise ValueError(f"gate input width {config.input_width} is not a width choice of the supernet ({choices})")
    if config.block not in firsts:
        raise ValueError(f"the gate must sit in the first block of a stage ({', '.join(firsts)}); got "
                         f"{config.block!r}")
    if not 0 < config.se_ratio <= 1:
        raise ValueError(f"gate se_ratio must be in (0, 1], got {config.se_ratio}")


def route_plans(supernet: SlimNetwork, config: GateConfig) -> tuple[WidthPlan, ...]:
    """The plan of each route: stem and the stages before the gate's at the input width, the rest at the route's."""
    gate_stage = supernet.stage_names.index(config.block.rsplit(".", 1)[0])
    after = len(supernet.stage_names) - gate_stage
    return tuple(supernet.resolve_width([config.input_width] * gate_stage + [float(w)] * after)
                 for w in config.routes)


class GatedDSNet(nn.Module):
    """A supernet with a double-headed gate: each input runs at the route its gate picks (see the module doc)."""

    def __init__(self, supernet: SlimNetwork, config: GateConfig):
        super().__init__()
        check_gate_config(supernet, config)
        self.supernet = supernet
        self.config = config
        self.gate_index = [spec.name for spec in supernet.block_specs].index(config.block)
        self.gate_spec = supernet.block_specs[self.gate_index]
        self.route_plans = route_plans(supernet, config)
        # The plan the layers before the gate run at. Gate-aware, every route shares them (its trunk) already.
        self.input_plan = (self.route_plans[-1] if supernet.config.slim_from is not None
                           else supernet.resolve_width(config.input_width))
        self.route_widths = tuple(float(w) for w in config.routes)
        block = supernet.block(self.gate_index)
        # The gate block's widths before the gate (input width) and after it (each route's projection width).
        self._input_widths = block.widths(self.input_plan.channels)
        self._route_widths = [block.widths(plan.channels) for plan in self.route_plans]
        channels, se_channels = block.gate_channels(self._input_widths), self._input_widths[3]
        if block.se is not None:  # the gate takes over the block's squeeze-excitation as its attention head
            self.gate = DoubleHeadedGate(channels, se_channels, len(self.route_plans), attention="sigmoid")
        else:
            self.gate = DoubleHeadedGate(channels, make_divisible(channels * config.se_ratio),
                                         len(self.route_plans), attention="tanh")
        self._masking = self._masking_tables()
        self._route_madds: dict[int, torch.Tensor] = {}

    def _masking_tables(self) -> tuple[list[list[int]], list[list[int]]]:
        """(routes, groups) tables of each route's channels and squeeze-excitation width per group, for the masked
        training forward (routes are increasing width choices: the widest route is every layer's widest width)."""
        net = self.supernet
        channels = [list(plan.channels) for plan in self.route_plans]
        reduced = [[0] * len(net.group_names) for _ in self.route_plans]
        for r, plan in enumerate(self.route_plans):
            for block in net.flat_blocks:
                reduced[r][block.hidden_group] = block.widths(plan.channels)[3]
        return channels, reduced

    def train(self, mode: bool = True) -> "GatedDSNet":
        super().train(mode)
        self.supernet.eval()  # BN statistics stay frozen: every route normalises with its own
        return self

    # ---- the network in two parts -------------------------------------------------------------------------------

    def gate_features(self, x: torch.Tensor) -> torch.Tensor:
        """The features the gate reads: the gate block's hidden features, everything before them at the input width."""
        net, plan = self.supernet, self.input_plan
        norm = SlotNorm(plan.choice)
        x = net.forward_stem(x, plan, norm)
        x = net.forward_blocks(x, plan, norm, 0, self.gate_index)
        return net.block(self.gate_index).gate_features(x, self._input_widths, norm)

    def _pre_gate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything before the gate, at the input width; returns the attended features and the route logits."""
        return self.gate(self.gate_features(x))

    def route_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, routes) the slimming head's logits, its cost bias included: what the routes are the argmax of."""
        return self._pre_gate(x)[1]

    def route_slot(self, route: int) -> int:
        """The BN statistics slot of route `route`: the custom slot that holds its plan, which `insert_gate` gives
        every route and `bn_slots.calibrate_routes` collects through this network; else its width choice's."""
        plan = self.route_plans[route]
        slot = self.supernet.custom_slot_of(plan)
        return slot if slot is not None else self.supernet.stats_slot(plan)

    def _post_gate(self, h: torch.Tensor, route: int) -> torch.Tensor:
        """Everything after the gate, sliced at one route's width; returns logits."""
        norm = SlotNorm(self.route_slot(route))
        return self._after_gate(h, self.route_plans[route], self._route_widths[route], norm)

    def _after_gate(self, h: torch.Tensor, plan: WidthPlan, gate_block_widths: tuple[int, ...], norm) -> torch.Tensor:
        net = self.supernet
        x = net.block(self.gate_index).after_gate(h, gate_block_widths, norm)
        x = net.forward_blocks(x, plan, norm, self.gate_index + 1)
        return net.forward_head(net.forward_head_features(x, plan, norm))

    def _post_gate_grouped(self, h: torch.Tensor, routes: torch.Tensor) -> torch.Tensor:
        """Inputs grouped by route, each group sliced at its width, outputs put back in input order."""
        if h.shape[0] == 1:
            return self._post_gate(h, int(routes[0]))
        present = torch.unique(routes).tolist()
        if len(present) == 1:
            return self._post_gate(h, present[0])
        out = None
        for route in present:
            index = (routes == route).nonzero().squeeze(1)
            y = self._post_gate(h.index_select(0, index), route)
            if out is None:
                out = y.new_empty(h.shape[0], y.shape[1])
            out.index_copy_(0, index, y)
        return out

    def _post_gate_masked(self, h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Everything after the gate at the widest route's width. Each input's channels are masked to its route's
        width and normalised with its route's statistics (`bn_slots.RoutedNorm`). `weights` (batch, routes) are
        one-hot in value and carry the gradient to the route choice."""
        widest = self.route_plans[-1]
        slots = [self.route_slot(r) for r in range(len(self.route_plans))]
        channels, reduced = (torch.tensor(t, device=h.device) for t in self._masking)
        norm = RoutedNorm(slots, weights, channels, reduced)
        return self._after_gate(h, widest, self._route_widths[-1], norm)

    # ---- forward ------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, route: int | None = None, gumbel_tau: float | None = None,
                return_info: bool = False):
        """Logits, or (logits, `RoutingInfo`) with ``return_info=True``. No argument: dynamic inference;
        `route`: every input at that route; `gumbel_tau`: the training forward (see the module doc)."""
        if route is not None and gumbel_tau is not None:
            raise ValueError("give either a route or a Gumbel temperature, not both")
        if route is not None and not 0 <= route < len(self.route_plans):
            raise ValueError(f"route {route} is out of range; there are {len(self.route_plans)} routes")
        h, route_logits = self._pre_gate(x)
        if gumbel_tau is not None:
            weights = F.gumbel_softmax(route_logits.float(), tau=gumbel_tau, hard=True)
            routes = weights.detach().argmax(1)
            logits = self._post_gate_masked(h, weights.to(h.dtype))
        else:
            if route is not None:
                routes = torch.full((x.shape[0],), route, dtype=torch.long, device=x.device)
            else:
                routes = route_logits.detach().argmax(1)
            logits = self._post_gate_grouped(h, routes)
        if not return_info:
            return logits
        return logits, RoutingInfo(routes, route_logits, self.route_madds(x.shape[-1]).to(x.device)[routes])

    def forward_routes(self, x: torch.Tensor, routes: Iterable[int]) -> list[torch.Tensor]:
        """Logits of every input at each of `routes` (sliced), sharing one pass through the layers before the gate."""
        h, _ = self._pre_gate(x)
        return [self._post_gate(h, r) for r in routes]

    # ---- cost ---------------------------------------------------------------------------------------------------

    def route_madds(self, img_size: int | None = None) -> torch.Tensor:
        """(routes,) multiply-accumulates of one input at each route, the gate included: `count_madds` of the
        route's plan, plus the gate, less the block's own squeeze-excitation, which the gate replaces."""
        size = img_size if img_size is not None else self.supernet.config.img_size
        if size not in self._route_madds:
            replaced = f"{self.config.block}.se"
            self._route_madds[size] = torch.tensor([
                sum(m for name, m, _ in layer_costs(self.supernet, plan, size) if name != replaced)
                + self.gate.madds() for plan in self.route_plans])
        return self._route_madds[size]

    def num_params(self) -> int:
        """Parameters the dynamic network uses: the widest route's dense subnet and the gate."""
        replaced = f"{self.config.block}.se"
        widest = self.route_plans[-1]
        return sum(p for name, _, p in layer_costs(self.supernet, widest) if name != replaced) \
            + self.gate.num_params()

    # ---- which BN layers come before the gate -------------------------------------------------------------------

    def pre_gate_norms(self) -> list[SlimBatchNorm2d]:
        net = self.supernet
        blocks = [net.block(i) for i in range(self.gate_index)]
        norms = [net.bn1] + [m for b in blocks for m in b.modules() if isinstance(m, SlimBatchNorm2d)]
        return norms + net.block(self.gate_index).pre_gate_norms()

    def post_gate_norms(self) -> list[SlimBatchNorm2d]:
        before = {id(m) for m in self.pre_gate_norms()}
        return [m for m in self.supernet.modules() if isinstance(m, SlimBatchNorm2d) and id(m) not in before]


# ---- building a gated network -------------------------------------------------------------------------------------


def insert_gate(supernet: SlimNetwork, config: GateConfig, batches: Iterable | None = None,
                num_batches: int | None = None) -> GatedDSNet:
    """A gated network around a trained supernet. The network computes what the supernet computes at each route.

    The supernet gets, in place, enough custom BN slots for the routes that are not width choices, keeping one
    slot spare. A block without squeeze-excitation gets an attention head that starts as the identity. A block
    with SE hands its weights to the gate. With `batches`, the statistics of the new routes are collected
    (`bn_slots.calibrate_routes`). Without them, those routes cannot be evaluated yet.
    """
    check_gate_config(supernet, config)
    plans = route_plans(supernet, config)
    held = [row for row in supernet.calibrated_plans.tolist() if any(row)]
    new = {plan.channels for plan in plans if list(plan.channels) not in held}
    needed = len(held) + len(new) + 1
    if supernet.num_custom_slots < needed:
        supernet.add_custom_slots(needed - supernet.num_custom_slots)
    gated = GatedDSNet(supernet, config)
    block = supernet.block(gated.gate_index)
    if block.se is not None:
        gated.gate.copy_attention_from(block.se)
    gated.to(next(supernet.parameters()).device)
    # A route that is a width choice starts from the choice's statistics, in a slot of its own: collecting them
    # again after the gate trained (its attention head changes the features) leaves the supernet's widths alone.
    for plan in gated.route_plans:
        if plan.choice is not None:
            slot = supernet.claim_custom_slot(plan)
            copy_statistics(supernet_norms(supernet), plan.choice, slot)
            share_pre_gate_statistics(gated, slot)
    if batches is not None:
        calibrate_routes(gated, batches, num_batches=num_batches)
    return gated


def default_routes(widths: Sequence[float], count: int) -> list[float]:
    """`count` width choices spread evenly from the smallest to the largest (all of them if there are fewer)."""
    if count < 1:
        raise ValueError(f"the gate needs at least one route, got {count}")
    if count >= len(widths):
        return list(widths)
    if count == 1:
        return [widths[-1]]
    picks = sorted({round(i * (len(widths) - 1) / (count - 1)) for i in range(count)})
    return [widths[i] for i in picks]
