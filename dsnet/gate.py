"""The double-headed gate and the gated network, in which each input picks the width the rest of the network runs at.

`DoubleHeadedGate` squeezes a block's hidden features (global pool → 1×1 reduce → ReLU). Two heads share the
squeezed features: the *attention head* (1×1 expand → scale of the features, as squeeze-excitation does) and the
*slimming head* (linear → one logit per route).

`GatedDSNet` is a supernet with one gate in the first block of a stage. The layers before the gate run at a fixed
width (`GateConfig.input_width`). The gate block's projection and every later layer run at the width of the route
the gate picks. So a route is a per-stage plan: the stages before the gate at the input width, the rest at the
route's width. Explicit arguments choose one of three forwards:

- ``gated(x)``: dynamic inference. The route of each input is the argmax of its logits, with no noise. Inputs are
  grouped by route, each group runs *sliced* at its width, and the outputs come back in input order.
- ``gated(x, route=r)``: every input runs at route ``r``, sliced.
- ``gated(x, gumbel_tau=t)``: the training forward. Routes are drawn by straight-through Gumbel-softmax (a hard
  one-hot forward with a soft gradient). The layers after the gate are computed at the widest route's width. Each
  input's channels are *masked* to its route's width and normalised with its route's BN statistics, which keeps
  the choice of route differentiable. Masking saves nothing, so only training uses it.

BN statistics: every route has its own. Routes that are width choices use the choice's statistics. The others get
custom slots of the supernet (`calibrate_routes`). The supernet stays in eval mode inside the gated network, so
statistics never change while the gate trains.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import make_divisible

from .calibrate import collecting_bn_statistics, input_batches
from .madds import layer_costs
from .mobilenetv2 import DSMobileNetV2, InvertedResidual, SupernetConfig
from .slim import SlimBatchNorm2d, SlimSqueezeExcite, WidthPlan

DEFAULT_GATE_BLOCK = "blocks.3.0"


@dataclass
class GateConfig:
    """Where the gate sits and which widths it routes to: what a checkpoint records to rebuild the gated network."""

    routes: list[float]  # width multipliers, increasing, each a width choice of the supernet
    input_width: float  # width of every layer before the gate; a width choice
    block: str = DEFAULT_GATE_BLOCK  # the first block of a stage
    se_ratio: float = 0.25  # the gate's squeeze width, relative to its input channels (when the block has no SE)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "GateConfig":
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"unknown gate config key(s) {unknown}; valid keys: {sorted(valid)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
        return x * scale, self.slimming(squeezed.flatten(1))

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


def check_gate_config(supernet: DSMobileNetV2, config: GateConfig) -> None:
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
    if not_choices([config.input_width]):
        raise ValueError(f"gate input width {config.input_width} is not a width choice of the supernet ({choices})")
    firsts = [spec.name for spec in supernet.block_specs if spec.name.endswith(".0")]
    if config.block not in firsts:
        raise ValueError(f"the gate must sit in the first block of a stage ({', '.join(firsts)}); got "
                         f"{config.block!r}")
    if not 0 < config.se_ratio <= 1:
        raise ValueError(f"gate se_ratio must be in (0, 1], got {config.se_ratio}")


def route_plans(supernet: DSMobileNetV2, config: GateConfig) -> tuple[WidthPlan, ...]:
    """The plan of each route: stem and the stages before the gate's at the input width, the rest at the route's."""
    gate_stage = supernet.stage_names.index(config.block.rsplit(".", 1)[0])
    after = len(supernet.stage_names) - gate_stage
    return tuple(supernet.resolve_width([config.input_width] * gate_stage + [float(w)] * after)
                 for w in config.routes)


class GatedDSNet(nn.Module):
    """A supernet with a double-headed gate: each input runs at the route its gate picks (see the module doc)."""

    def __init__(self, supernet: DSMobileNetV2, config: GateConfig):
        super().__init__()
        check_gate_config(supernet, config)
        self.supernet = supernet
        self.config = config
        self.gate_index = [spec.name for spec in supernet.block_specs].index(config.block)
        self.gate_spec = supernet.block_specs[self.gate_index]
        self.input_plan = supernet.resolve_width(config.input_width)
        self.route_plans = route_plans(supernet, config)
        self.route_widths = tuple(float(w) for w in config.routes)
        spec = self.gate_spec
        hidden_group = spec.hidden_group if spec.hidden_group is not None else spec.in_group
        channels = self.input_plan.channels[hidden_group]
        block = supernet.block(self.gate_index)
        if block.se is not None:  # the gate takes over the block's squeeze-excitation as its attention head
            self.gate = DoubleHeadedGate(channels, supernet.se_channels(spec, self.input_plan.channels),
                                         len(self.route_plans), attention="sigmoid")
        else:
            self.gate = DoubleHeadedGate(channels, make_divisible(channels * config.se_ratio),
                                         len(self.route_plans), attention="tanh")
        self._hidden = self.input_plan.channels[spec.hidden_group] if spec.hidden_group is not None else 0
        self._route_madds: dict[int, torch.Tensor] = {}

    def train(self, mode: bool = True) -> "GatedDSNet":
        super().train(mode)
        self.supernet.eval()  # BN statistics stay frozen: every route normalises with its own
        return self

    # ---- the network in two parts -------------------------------------------------------------------------------

    def _pre_gate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything before the gate, at the input width; returns the attended features and the route logits."""
        net, plan = self.supernet, self.input_plan
        slot = plan.choice
        x = net.forward_stem(x, plan, slot)
        x = net.forward_blocks(x, plan, slot, 0, self.gate_index)
        h = net.block(self.gate_index).hidden_features(x, self._hidden, slot)
        return self.gate(h)

    def _post_gate(self, h: torch.Tensor, route: int) -> torch.Tensor:
        """Everything after the gate, sliced at one route's width; returns logits."""
        net, plan = self.supernet, self.route_plans[route]
        slot = net.stats_slot(plan)
        x = net.block(self.gate_index).project(h, plan.channels[self.gate_spec.out_group], slot)
        x = net.forward_blocks(x, plan, slot, self.gate_index + 1)
        return net.forward_head(net.forward_head_features(x, plan, slot))

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
        width and normalised with its route's statistics. `weights` (batch, routes) are one-hot in value and
        carry the gradient to the route choice."""
        net = self.supernet
        slots = [net.stats_slot(plan) for plan in self.route_plans]
        channels = torch.tensor([plan.channels for plan in self.route_plans], device=h.device)  # (routes, groups)
        widest = channels.max(0).values.tolist()

        def norm(bn: SlimBatchNorm2d, x: torch.Tensor, group: int) -> torch.Tensor:
            return routed_batch_norm(bn, x, slots, weights, channels[:, group])

        spec, block = self.gate_spec, net.block(self.gate_index)
        conv, bn = _projection(block)
        x = norm(bn, conv(h, widest[spec.out_group]), spec.out_group)
        for i in range(self.gate_index + 1, len(net.block_specs)):
            spec, block = net.block_specs[i], net.block(i)
            shortcut = x
            if isinstance(block, InvertedResidual):
                y = F.relu6(norm(block.bn1, block.conv_pw(x, widest[spec.hidden_group]), spec.hidden_group))
                y = F.relu6(norm(block.bn2, block.conv_dw(y), spec.hidden_group))
            else:
                y = F.relu6(norm(block.bn1, block.conv_dw(x), spec.in_group))
            if block.se is not None:
                reduced = torch.tensor([net.se_channels(spec, plan.channels) for plan in self.route_plans],
                                       device=h.device)
                y = _masked_squeeze_excite(block.se, y, reduced, weights)
            conv, bn = _projection(block)
            y = norm(bn, conv(y, widest[spec.out_group]), spec.out_group)
            x = y + shortcut if block.has_skip else y
        head = len(net.group_names) - 1
        x = F.relu6(norm(net.bn2, net.conv_head(x, widest[head]), head))
        return net.forward_head(x)

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
        projection = _projection(net.block(self.gate_index))[1]
        return norms + [m for m in net.block(self.gate_index).modules()
                        if isinstance(m, SlimBatchNorm2d) and m is not projection]

    def post_gate_norms(self) -> list[SlimBatchNorm2d]:
        before = {id(m) for m in self.pre_gate_norms()}
        return [m for m in self.supernet.modules() if isinstance(m, SlimBatchNorm2d) and id(m) not in before]


def _projection(block: nn.Module) -> tuple[nn.Module, SlimBatchNorm2d]:
    """The convolution and BN that project a block's hidden features to its output width."""
    if isinstance(block, InvertedResidual):
        return block.conv_pwl, block.bn3
    return block.conv_pw, block.bn2


def routed_batch_norm(bn: SlimBatchNorm2d, x: torch.Tensor, slots: Sequence[int], weights: torch.Tensor,
                      channels: torch.Tensor) -> torch.Tensor:
    """Eval-mode BN with each input normalised by its route's statistics, then masked to its route's channels.

    `weights` (batch, routes) picks the route of each input; `channels` (routes,) is each route's width here.
    The mask is folded into the per-input scale and shift, so a masked channel comes out exactly zero.
    """
    c = x.shape[1]
    scale = bn.weight[:c] * torch.rsqrt(bn.running_var[slots, :c] + bn.eps)  # (routes, c)
    shift = bn.bias[:c] - bn.running_mean[slots, :c] * scale
    keep = (torch.arange(c, device=x.device) < channels[:, None]).to(scale.dtype)
    scale, shift = weights @ (scale * keep).to(weights.dtype), weights @ (shift * keep).to(weights.dtype)
    return x * scale[:, :, None, None] + shift[:, :, None, None]


def _masked_squeeze_excite(se: SlimSqueezeExcite, x: torch.Tensor, reduced: torch.Tensor,
                           weights: torch.Tensor) -> torch.Tensor:
    """Squeeze-excitation with each input's reduced channels masked to its route's count."""
    width = int(reduced.max())
    s = F.relu(se.conv_reduce(F.adaptive_avg_pool2d(x, 1), width))
    keep = (torch.arange(width, device=x.device) < reduced[:, None]).to(weights.dtype)
    s = s * (weights @ keep)[:, :, None, None]
    return x * torch.sigmoid(se.conv_expand(s, x.shape[1]))


# ---- building a gated network -------------------------------------------------------------------------------------


@torch.no_grad()
def calibrate_routes(gated: GatedDSNet, batches: Iterable, routes: Iterable[int] | None = None,
                     num_batches: int | None = None) -> int:
    """Collect the BN statistics of routes, by default of every route that is not a width choice.

    The layers after the gate are re-estimated through the gated network's own forward. The layers before the
    gate run at the input width for every route, so the route's slot takes the input width's statistics for them.
    The route's plan, run by the supernet or exported as a dense subnet, then computes exactly what the gated
    network computes at that route. Returns the number of batches used.
    """
    net = gated.supernet
    if routes is None:
        routes = [r for r, plan in enumerate(gated.route_plans) if plan.choice is None]
    device = next(net.parameters()).device
    inputs = list(input_batches(batches, num_batches, device))
    if not inputs:
        raise ValueError("BN recalibration got no batches")
    source = gated.input_plan.choice
    for route in routes:
        plan = gated.route_plans[route]
        slot = plan.choice if plan.choice is not None else net.claim_custom_slot(plan)
        with collecting_bn_statistics(gated, gated.post_gate_norms(), slot):
            for x in inputs:
                gated(x, route=route)
        if slot != source:
            for bn in gated.pre_gate_norms():
                bn.running_mean[slot].copy_(bn.running_mean[source])
                bn.running_var[slot].copy_(bn.running_var[source])
                bn.num_batches_tracked[slot].copy_(bn.num_batches_tracked[source])
    return len(inputs)


def insert_gate(supernet: DSMobileNetV2, config: GateConfig, batches: Iterable | None = None,
                num_batches: int | None = None) -> GatedDSNet:
    """A gated network around a trained supernet. The network computes what the supernet computes at each route.

    The supernet is rebuilt with enough custom BN slots for the routes that are not width choices, keeping one
    slot spare, and its weights and statistics are copied over. A block without squeeze-excitation gets an
    attention head that starts as the identity. A block with SE hands its weights to the gate. With `batches`,
    the statistics of the new routes are collected (`calibrate_routes`). Without them, those routes cannot be
    evaluated yet.
    """
    check_gate_config(supernet, config)
    plans = route_plans(supernet, config)
    held = [row for row in supernet.calibrated_plans.tolist() if any(row)]
    new = {plan.channels for plan in plans if plan.choice is None and list(plan.channels) not in held}
    needed = len(held) + len(new) + 1
    if supernet.num_custom_slots < needed:
        device = next(supernet.parameters()).device
        config_values = {**supernet.config.to_dict(), "custom_bn_slots": needed}
        wider = DSMobileNetV2(SupernetConfig.from_dict(config_values)).to(device)
        wider.load_state_dict(supernet.state_dict(), strict=True)  # the new slots come empty
        supernet = wider.train(supernet.training)
    gated = GatedDSNet(supernet, config)
    block = supernet.block(gated.gate_index)
    if block.se is not None:
        gated.gate.copy_attention_from(block.se)
    gated.to(next(supernet.parameters()).device)
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
