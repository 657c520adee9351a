"""Stage II: train the gate of a stage-I supernet with gate labels and a cost loss, towards a cost target.

The supernet of the `--init` checkpoint gets a double-headed gate (`dsnet/gate.py`). That gate starts as the
identity, and the statistics of its routes are collected on training batches. The supernet is then frozen, or
trained with `finetune_supernet`, while its BN statistics stay frozen either way. Every step, on one batch:

1. **Gate labels**, without gradient, with the current weights (`sgs`). `budget`: the route with the least
   cross-entropy plus a price times its cost, the price chosen so that the batch's labels meet the target
   (`dsnet/gate_budget.py`). `sandwich`, DS-Net's sandwich gate sparsification: "smallest route" for an image the
   smallest route classifies correctly, else "largest route". `graded`: the narrowest route that classifies it
   correctly, else the largest.
2. **The dynamic network's training forward.** Each image takes a straight-through Gumbel-softmax route, with
   temperature `gate_tau`. The layers after the gate are masked to its route's width.
3. **The loss** is `task_loss_weight · CE(logits, targets) + gate_loss_weight · CE(route logits, labels) +
   madds_loss_weight · penalty(E[cost] / target)`. E[cost] is the batch mean of each image's expected cost: the
   route probabilities times the routes' MAdds (`count_madds` of each route's plan, plus the gate), or their
   predicted latency under a latency budget. The penalty is `r²` (`madds_loss: square`), `max(0, r − 1)²`
   (`excess`) or `(r − 1)²` (`target`).

Before each validation the stage collects the routes' BN statistics again and, with `calibrate_target`, sets the
gate's cost bias so that its routes meet the target on the calibration images (`dsnet/gate_budget.py`).
`dsnet.stages.GateStage` sets the gated network up and runs `gate_step` in the trainer's loop (`dsnet/trainer.py`).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gate import GatedDSNet
from .gate_budget import budget_labels
from .metrics import batch_sums, metric_sums, summarize


def set_trainable(gated: GatedDSNet, finetune_supernet: bool) -> None:
    gated.supernet.requires_grad_(finetune_supernet)
    block = gated.supernet.block(gated.gate_index)
    if block.se is not None:  # replaced by the gate's attention head
        block.se.requires_grad_(False)
    gated.gate.requires_grad_(True)


# ---- SGS labels and the MAdds loss ---------------------------------------------------------------------------------


SGS_MODES = ("budget", "sandwich", "graded")


def sgs_routes(sgs: str, num_routes: int) -> tuple[list[int], int]:
    """(routes whose predictions decide the label, narrowest first; the label when none is right)."""
    largest = num_routes - 1
    if sgs == "sandwich":
        return [0], largest
    if sgs == "graded":
        return list(range(largest)), largest
    raise ValueError(f"sgs must be one of {', '.join(SGS_MODES)}, got {sgs!r}")


def sgs_labels(route_logits: Sequence[torch.Tensor], targets: torch.Tensor, routes: Sequence[int],
               fallback: int) -> torch.Tensor:
    """Each image's label: the first of `routes` (narrowest first) whose logits classify it correctly, else
    `fallback`. `route_logits[i]` are the logits of route `routes[i]`."""
    labels = torch.full_like(targets, fallback)
    for logits, route in reversed(list(zip(route_logits, routes))):  # narrower routes overwrite wider ones
        labels[logits.argmax(1) == targets] = route
    return labels


def gate_labels(gated: GatedDSNet, images: torch.Tensor, targets: torch.Tensor, losses: "GateLosses") -> torch.Tensor:
    """The gate's labels for a batch under `losses.sgs`, from the routes' predictions with the current weights."""
    if losses.sgs == "budget":
        routes = range(len(gated.route_plans))
        per_route = torch.stack([F.cross_entropy(logits.float(), targets, reduction="none")
                                 for logits in gated.forward_routes(images, routes)], 1)
        costs, target = losses.costs(gated, images.shape[-1])
        return budget_labels(per_route.double(), costs.to(images.device), target)
    checked, fallback = sgs_routes(losses.sgs, len(gated.route_plans))
    return sgs_labels(gated.forward_routes(images, checked), targets, checked, fallback)


MADDS_LOSSES = ("square", "excess", "target")


def madds_penalty(expected_madds: torch.Tensor, kind: str, target: float) -> torch.Tensor:
    """The cost penalty of the mean expected MAdds `m`: `(m / target)²` (square, DS-Net's: it only pushes down),
    `max(0, m / target − 1)²` (excess: zero up to the target) or `(m / target − 1)²` (target: zero at it, growing on
    both sides)."""
    ratio = expected_madds / target
    if kind == "square":
        return ratio ** 2
    if kind == "excess":
        return F.relu(ratio - 1) ** 2
    if kind == "target":
        return (ratio - 1) ** 2
    raise ValueError(f"madds_loss must be one of {', '.join(MADDS_LOSSES)}, got {kind!r}")


def target_madds(value: float | None, route_madds: torch.Tensor) -> float:
    """A MAdds target: a count, or (≤ 1) a fraction of the widest route's MAdds; None: halfway between the
    narrowest route's MAdds and the widest's."""
    if value is None:
        return (float(route_madds.min()) + float(route_madds.max())) / 2
    return float(value) * float(route_madds.max()) if value <= 1 else float(value)


LATENCY_FIELDS = ("route_latency", "target_latency")  # set by the stage from its latency table, not from keys

# ---- one step ------------------------------------------------------------------------------------------------------


@dataclass
class GateLosses:
    """The loss terms of stage II; each field is the run-config key of the same name (`GateLosses.from_config`)."""

    sgs: str = "budget"
    gate_tau: float = 1.0
    task_loss_weight: float = 1.0
    gate_loss_weight: float = 1.0
    madds_loss: str = "target"
    madds_loss_weight: float = 0.1
    target_madds: float | None = None  # a count, or (≤ 1) a fraction of the widest route's; None: mid-range
    # A latency budget (`--target-latency`): each route's predicted seconds, and the target in seconds. The cost
    # penalty then works on them in place of MAdds.
    route_latency: torch.Tensor | None = None
    target_latency: float | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GateLosses":
        return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls) if f.name not in LATENCY_FIELDS})

    def costs(self, gated: GatedDSNet, img_size: int) -> tuple[torch.Tensor, float]:
        """(each route's cost per image, the target): predicted seconds under a latency budget, else MAdds."""
        if self.route_latency is not None:
            return self.route_latency.double(), float(self.target_latency)
        route_madds = gated.route_madds(img_size).double()
        return route_madds, target_madds(self.target_madds, route_madds)


@dataclass
class GateStepResult:
    total: float
    task: float
    gate: float
    madds: float
    sums: dict[str, float] = field(default_factory=dict)  # summed over an epoch: see `epoch_metrics`


def unwrap(model: nn.Module) -> GatedDSNet:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def gate_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, losses: GateLosses,
              backward: Callable[[torch.Tensor], None] | None = None,
              autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
              ) -> GateStepResult:
    """Forward and backward of one stage-II step; the caller steps the optimizer. `model` is the gated network,
    possibly wrapped in DistributedDataParallel."""
    backward = backward or (lambda loss: loss.backward())
    gated = unwrap(model)
    num_routes = len(gated.route_plans)

    with torch.no_grad(), autocast():
        labels = gate_labels(gated, images, targets, losses)

    with autocast():
        logits, info = model(images, gumbel_tau=losses.gate_tau, return_info=True)
    route_logits = info.route_logits.float()
    task = F.cross_entropy(logits.float(), targets)
    gate = F.cross_entropy(route_logits, labels)
    route_madds = gated.route_madds(images.shape[-1]).to(images.device, torch.float64)
    probabilities = route_logits.softmax(1).double()
    expected = probabilities @ route_madds  # (batch,) expected MAdds of each image
    costs, target = losses.costs(gated, images.shape[-1])
    madds = madds_penalty((probabilities @ costs.to(images.device)).mean(), losses.madds_loss, target)
    total = losses.task_loss_weight * task + losses.gate_loss_weight * gate + losses.madds_loss_weight * madds.float()
    backward(total)

    sums = {"images": float(len(targets)), "gate_correct": (route_logits.argmax(1) == labels).sum().item(),
            "madds": expected.sum().item()}
    for route, count in enumerate(torch.bincount(info.routes, minlength=num_routes).tolist()):
        sums[f"route{route}"] = float(count)
    return GateStepResult(total.item(), task.item(), gate.item(), madds.item(), sums)


def epoch_metrics(gated: GatedDSNet, sums: dict[str, float], prefix: str = "train_") -> dict[str, float]:
    """Per-epoch figures from summed step results: gate accuracy against the SGS labels (%), mean expected MAdds
    per image, and the fraction of images that took each route."""
    images = max(sums.get("images", 0.0), 1.0)
    metrics = {f"{prefix}gate_acc": 100.0 * sums.get("gate_correct", 0.0) / images,
               f"{prefix}madds": sums.get("madds", 0.0) / images}
    for route, width in enumerate(gated.route_widths):
        metrics[f"{prefix}route@{width:g}"] = sums.get(f"route{route}", 0.0) / images
    return metrics


# ---- validation ----------------------------------------------------------------------------------------------------


def evaluate_gated(gated: GatedDSNet, loader, device: torch.device, losses: GateLosses,
                   autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                   reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, prefix: str = ""
                   ) -> dict[str, float]:
    """The dynamic network (argmax routes, sliced) over the loader: top-1, top-5, loss, MAdds per image, gate
    accuracy against the SGS labels, and the fraction of images per route. `reduce` sums across processes."""
    gated.eval()
    num_routes = len(gated.route_plans)

    def forward(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, info = gated(images, return_info=True)
        labels = gate_labels(gated, images, targets, losses)
        extra = torch.tensor([info.madds.double().sum().item(), (info.routes == labels).sum().item()],
                             dtype=torch.float64)
        routes = torch.bincount(info.routes.cpu(), minlength=num_routes).double()
        return torch.cat([batch_sums(logits, targets), extra, routes])  # top-1, top-5, loss, images, MAdds, …

    sums = metric_sums(forward, loader, device, autocast=autocast, reduce=reduce)
    figures, count = summarize(sums), max(sums[3].item(), 1.0)
    metrics = {f"{prefix}val_{key}": figures[key] for key in ("top1", "top5", "loss")}
    metrics[f"{prefix}val_madds"] = sums[4].item() / count
    metrics[f"{prefix}val_gate_acc"] = 100.0 * sums[5].item() / count
    for route, width in enumerate(gated.route_widths):
        metrics[f"{prefix}val_route@{width:g}"] = sums[6 + route].item() / count
    return metrics
