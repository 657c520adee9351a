"""Stage II: train the gate of a stage-I supernet with sandwich gate sparsification (SGS) and a MAdds loss.

The supernet of the `--init` checkpoint gets a double-headed gate (`dsnet/gate.py`). That gate starts as the
identity, and the statistics of its routes are collected on training batches. The supernet is then frozen, or
trained with `finetune_supernet`, while its BN statistics stay frozen either way. Every step, on one batch:

1. **SGS labels**, without gradient, with the current weights. The smallest route classifies each image. An image
   it gets right is labelled "smallest route", any other "largest route". With `sgs: graded` each image is
   labelled with the narrowest route that classifies it correctly, else the largest.
2. **The dynamic network's training forward.** Each image takes a straight-through Gumbel-softmax route, with
   temperature `gate_tau`. The layers after the gate are masked to its route's width.
3. **The loss** is `task_loss_weight · CE(logits, targets) + gate_loss_weight · CE(route logits, SGS labels) +
   madds_loss_weight · penalty(E[MAdds] / target)`. E[MAdds] is the batch mean of each image's expected MAdds:
   the route probabilities times the routes' MAdds (`count_madds` of each route's plan, plus the gate). The
   penalty is `r²` (`madds_loss: square`) or `max(0, r − 1)²` (`excess`).

The trainer (`dsnet/engine.py`) runs the same loop as in stage I around `gate_step`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import accuracy

from .checkpoint import gated_network_from_checkpoint, load_checkpoint, supernet_from_checkpoint
from .cli import UserError
from .config import data_options
from .data import DataOptions, calibration_batches
from .gate import GatedDSNet, GateConfig, check_gate_config, default_routes, insert_gate
from .mobilenetv2 import DSMobileNetV2

# Keys a gate run takes from the --init checkpoint's run unless given now: the supernet's and the data's.
INHERITED_KEYS = ("widths", "small_input", "dropout", "se_ratio", "num_classes",
                  *DataOptions.__dataclass_fields__)
ARCHITECTURE_KEYS = ("widths", "small_input", "se_ratio", "num_classes")


# ---- setting up: the --init checkpoint, the gate's config, the gated network --------------------------------------


def prepare_config(config: dict[str, Any], explicit: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read the --init checkpoint. Returns the run config completed from it, and the checkpoint.

    Model and data keys that were not given now come from the checkpoint's run. A model key that was given must
    agree with the checkpoint's supernet.
    """
    path = config.get("init")
    if not path:
        raise UserError("--stage gate needs --init CHECKPOINT, a supernet trained with python train.py --stage "
                        "supernet")
    state = load_checkpoint(path)
    if "model_config" not in state or "model" not in state:
        raise UserError(f"--init {path!r} holds no supernet (it lacks 'model_config' or 'model')")
    recorded = state.get("config") if isinstance(state.get("config"), dict) else {}
    config = {**config, **{k: recorded[k] for k in INHERITED_KEYS if k in recorded and k not in explicit}}
    architecture = state["model_config"]
    for key in ARCHITECTURE_KEYS:
        given, actual = config.get(key), architecture.get(key)
        if key in explicit and given is not None and not _same(given, actual):
            raise UserError(f"--init {path!r} is a supernet of another architecture: its {key} is {actual}, this "
                            f"run's is {given}")
        if key != "num_classes" and actual is not None:
            config[key] = actual
    return config, state


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) < 1e-6
    return a == b


def gate_config_from_run(config: dict[str, Any], supernet: DSMobileNetV2) -> GateConfig:
    """The gate the run config asks for, checked against the supernet (UserError saying what does not fit)."""
    widths = supernet.widths

    def as_choice(w: float) -> float:  # the supernet's own spelling of a width choice
        index = supernet.choice_index(float(w))
        return widths[index] if index is not None else float(w)

    routes = config["gate_routes"] or default_routes(widths, config["gate_num_routes"])
    input_width = config["gate_input_width"] if config["gate_input_width"] is not None else widths[-1]
    gate = GateConfig(routes=sorted({as_choice(w) for w in routes}), input_width=as_choice(input_width),
                      block=config["gate_block"], se_ratio=config["gate_se_ratio"])
    try:
        check_gate_config(supernet, gate)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return gate


def build_gated_network(config: dict[str, Any], init_state: dict[str, Any], num_classes: int,
                        device: torch.device) -> GatedDSNet:
    """The --init supernet with the configured gate inserted, its new routes' BN statistics collected."""
    supernet = supernet_from_checkpoint(init_state, config["init_weights"])
    if supernet.config.num_classes != num_classes:
        raise UserError(f"--init {config['init']!r} has {supernet.config.num_classes} classes but dataset "
                        f"{config['data']!r} has {num_classes}")
    gate = gate_config_from_run(config, supernet)
    batches = calibration_batches(data_options(config), config["gate_calibration_batches"],
                                  batch_size=config["batch_size"], seed=config["seed"])
    gated = insert_gate(supernet.to(device), gate, batches)
    set_trainable(gated, config["finetune_supernet"])
    return gated


def gated_network_for_resume(state: dict[str, Any], config: dict[str, Any], device: torch.device) -> GatedDSNet:
    """The gated network a stage-II checkpoint records, to continue training it."""
    gated = gated_network_from_checkpoint(state, "model").to(device).train()
    set_trainable(gated, config["finetune_supernet"])
    return gated


def set_trainable(gated: GatedDSNet, finetune_supernet: bool) -> None:
    gated.supernet.requires_grad_(finetune_supernet)
    block = gated.supernet.block(gated.gate_index)
    if block.se is not None:  # replaced by the gate's attention head
        block.se.requires_grad_(False)
    gated.gate.requires_grad_(True)


# ---- SGS labels and the MAdds loss ---------------------------------------------------------------------------------


def sgs_routes(sgs: str, num_routes: int) -> tuple[list[int], int]:
    """(routes whose predictions decide the label, narrowest first; the label when none is right)."""
    largest = num_routes - 1
    if sgs == "sandwich":
        return [0], largest
    if sgs == "graded":
        return list(range(largest)), largest
    raise ValueError(f"sgs must be 'sandwich' or 'graded', got {sgs!r}")


def sgs_labels(route_logits: Sequence[torch.Tensor], targets: torch.Tensor, routes: Sequence[int],
               fallback: int) -> torch.Tensor:
    """Each image's label: the first of `routes` (narrowest first) whose logits classify it correctly, else
    `fallback`. `route_logits[i]` are the logits of route `routes[i]`."""
    labels = torch.full_like(targets, fallback)
    for logits, route in reversed(list(zip(route_logits, routes))):  # narrower routes overwrite wider ones
        labels[logits.argmax(1) == targets] = route
    return labels


def madds_penalty(expected_madds: torch.Tensor, kind: str, target: float) -> torch.Tensor:
    """`(m / target)²` (square) or `max(0, m / target − 1)²` (excess) of the mean expected MAdds `m`."""
    ratio = expected_madds / target
    if kind == "square":
        return ratio ** 2
    if kind == "excess":
        return F.relu(ratio - 1) ** 2
    raise ValueError(f"madds_loss must be 'square' or 'excess', got {kind!r}")


def target_madds(value: float, route_madds: torch.Tensor) -> float:
    """A MAdds target: a count, or (≤ 1) a fraction of the widest route's MAdds."""
    return float(value) * float(route_madds.max()) if value <= 1 else float(value)


# ---- one step ------------------------------------------------------------------------------------------------------


@dataclass
class GateLosses:
    """The loss terms of stage II, from the run config (`GateLosses.from_config`)."""

    sgs: str = "sandwich"
    tau: float = 1.0
    task_weight: float = 1.0
    gate_weight: float = 1.0
    madds_loss: str = "square"
    madds_weight: float = 0.1
    target_madds: float = 1.0  # a count, or (≤ 1) a fraction of the widest route's MAdds

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GateLosses":
        return cls(config["sgs"], config["gate_tau"], config["task_loss_weight"], config["gate_loss_weight"],
                   config["madds_loss"], config["madds_loss_weight"], config["target_madds"])


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
              backward: Callable[[torch.Tensor, bool], None] | None = None,
              autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
              ) -> GateStepResult:
    """Forward and backward of one stage-II step; the caller steps the optimizer. `model` is the gated network,
    possibly wrapped in DistributedDataParallel."""
    backward = backward or (lambda loss, is_last: loss.backward())
    gated = unwrap(model)
    num_routes = len(gated.route_plans)

    checked, fallback = sgs_routes(losses.sgs, num_routes)
    with torch.no_grad(), autocast():
        labels = sgs_labels(gated.forward_routes(images, checked), targets, checked, fallback)

    with autocast():
        logits, info = model(images, gumbel_tau=losses.tau, return_info=True)
    route_logits = info.route_logits.float()
    task = F.cross_entropy(logits.float(), targets)
    gate = F.cross_entropy(route_logits, labels)
    route_madds = gated.route_madds(images.shape[-1]).to(images.device, torch.float64)
    expected = route_logits.softmax(1).double() @ route_madds  # (batch,) expected MAdds of each image
    madds = madds_penalty(expected.mean(), losses.madds_loss, target_madds(losses.target_madds, route_madds))
    total = losses.task_weight * task + losses.gate_weight * gate + losses.madds_weight * madds.float()
    backward(total, True)

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


@torch.no_grad()
def evaluate_gated(gated: GatedDSNet, loader, device: torch.device, sgs: str,
                   autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                   reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t, prefix: str = ""
                   ) -> dict[str, float]:
    """The dynamic network (argmax routes, sliced) over the loader: top-1, top-5, loss, MAdds per image, gate
    accuracy against the SGS labels, and the fraction of images per route. `reduce` sums across processes."""
    gated.eval()
    num_routes = len(gated.route_plans)
    checked, fallback = sgs_routes(sgs, num_routes)
    sums = torch.zeros(6 + num_routes, dtype=torch.float64)  # top-1, top-5, loss, images, MAdds, gate, routes…
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast():
            logits, info = gated(images, return_info=True)
            labels = sgs_labels(gated.forward_routes(images, checked), targets, checked, fallback)
        logits = logits.float()
        top1, top5 = accuracy(logits, targets, topk=(1, min(5, logits.shape[1])))
        n = len(targets)
        sums[:6] += torch.tensor([top1.item() * n / 100, top5.item() * n / 100,
                                  F.cross_entropy(logits, targets, reduction="sum").item(), n,
                                  info.madds.double().sum().item(), (info.routes == labels).sum().item()],
                                 dtype=torch.float64)
        sums[6:] += torch.bincount(info.routes.cpu(), minlength=num_routes).double()
    sums = reduce(sums)
    count = max(sums[3].item(), 1.0)
    metrics = {f"{prefix}val_top1": 100.0 * sums[0].item() / count, f"{prefix}val_top5": 100.0 * sums[1].item() / count,
               f"{prefix}val_loss": sums[2].item() / count, f"{prefix}val_madds": sums[4].item() / count,
               f"{prefix}val_gate_acc": 100.0 * sums[5].item() / count}
    for route, width in enumerate(gated.route_widths):
        metrics[f"{prefix}val_route@{width:g}"] = sums[6 + route].item() / count
    return metrics
