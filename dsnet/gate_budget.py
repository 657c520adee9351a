"""How the gate meets a cost target: a mean cost per image (MAdds, or predicted latency) that the user sets.

Two rules, each a bisection on one price of cost:

- `budget_labels` (`sgs: budget`): gate labels that meet the target on every training batch. An image's label is the
  route with the least cross-entropy plus λ times the route's cost. λ ≥ 0 is the smallest price at which the
  labels' mean cost is within the target. A route becomes a label where its saving in loss pays for its cost, so
  the middle routes get the images they suit, where sandwich gate sparsification labels only the two ends.
- `calibrate_route_bias`: the trained gate's routes, on the fixed calibration images, are moved to the target by a
  bias of −μ times each route's cost on the route logits (`DoubleHeadedGate.route_bias`). This is how budgeted
  early-exit networks set their exit thresholds, on held-out images, for a mean budget. μ may be negative: a gate
  that routes below the target is moved up to it. With a minimum share, a route that would get fewer images is
  lifted by a bias of its own until it gets that share, and μ is chosen again (argmax routing otherwise starves the
  middle routes, which the gate rarely ranks first even where the training forward samples them often). The bias
  is part of the gate, so exports carry it.

Costs are divided by the widest route's, so one price suits MAdds and latency alike.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

BISECTION_STEPS = 40


def _bisect(too_high: Callable[[float], bool], low: float, high: float) -> float:
    """The smallest value in [low, high] (to BISECTION_STEPS halvings) at which `too_high` is false, for a
    predicate that turns false as the value rises."""
    for _ in range(BISECTION_STEPS):
        mid = (low + high) / 2
        low, high = (mid, high) if too_high(mid) else (low, mid)
    return high


def budget_labels(losses: torch.Tensor, costs: torch.Tensor, target: float) -> torch.Tensor:
    """(batch,) route labels. `losses` (batch, routes): each image's cross-entropy at each route; `costs` (routes,)
    increasing; `target` in the units of `costs`. The labels' mean cost is at most the target where any labels can
    meet it (else every image gets the cheapest route)."""
    scale = float(costs.max())
    costs, target = costs.to(losses.dtype) / scale, target / scale

    def labels(price: float) -> torch.Tensor:
        return (losses + price * costs).argmin(1)

    def over_target(price: float) -> bool:
        return float(costs[labels(price)].mean()) > target

    if len(costs) == 1 or not over_target(0.0):
        return labels(0.0)
    # Above this price every image takes the cheapest route: no loss saving pays for a dearer one.
    gaps = costs[1:] - costs[0]
    high = float(((losses[:, :1] - losses[:, 1:]) / gaps).max().clamp(min=0)) + 1e-6
    return labels(_bisect(over_target, 0.0, high))


@torch.no_grad()
def calibrate_route_bias(gate_logits: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[torch.Tensor],
                         bias: torch.Tensor, costs: torch.Tensor, target: float, min_share: float = 0.0) -> float:
    """Set `bias` (the gate's `route_bias`, in place) so that the argmax routes of `gate_logits` (route logits with
    the bias added) over `batches` have the mean cost closest to `target`; returns that mean cost.

    The bias is −μ · costs / widest, with one price μ; with `min_share`, a route that would get fewer of the
    images is lifted by a bias of its own until it gets that share, and μ is chosen again, a few rounds over."""
    bias.zero_()
    logits = torch.cat([gate_logits(images).double() for images in batches])
    num_routes = logits.shape[1]
    if num_routes == 1:  # one route: nothing to choose
        return float(costs[0])
    scale = float(costs.max())
    costs = costs.to(logits.device, torch.float64) / scale
    target = target / scale
    lift = torch.zeros(num_routes, dtype=torch.float64, device=logits.device)

    def routes(price: float) -> torch.Tensor:
        return (logits + lift - price * costs).argmax(1)

    def share(route: int, price: float) -> float:
        return float((routes(price) == route).double().mean())

    def mean_cost(price: float) -> float:
        return float(costs[routes(price)].mean())

    # At ±limit the price outweighs every logit difference: all images take the cheapest (+) or dearest (−) route.
    limit = float((logits.max(1).values - logits.min(1).values).max()) / float(costs.diff().min()) + 1.0

    def fit_price() -> float:
        price = _bisect(lambda p: mean_cost(p) > target, -2 * limit, 2 * limit)
        return min((price, price - 4 * limit / 2 ** BISECTION_STEPS), key=lambda p: abs(mean_cost(p) - target))

    price = fit_price()
    for _ in range(4 * num_routes if min_share > 0 else 0):
        shares = torch.bincount(routes(price), minlength=num_routes).double() / len(logits)
        short = int(shares.argmin())
        if float(shares[short]) >= min_share:
            break

        def too_few(value: float) -> bool:
            lift[short] = value
            return share(short, price) < min_share
        lift[short] = _bisect(too_few, float(lift[short]), float(lift[short]) + 4 * limit)
        price = fit_price()
    bias.copy_((lift - price * costs).to(bias))
    return mean_cost(price) * scale
