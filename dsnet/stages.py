"""The two training stages behind one interface, the part of training that differs between them.

The trainer (`dsnet/trainer.py`) runs the same loop for both and asks its stage for the rest: build the network it
trains (`build_model`), the work of one batch (`train_step`), validation (`validate`), the figures of an epoch's
summed steps (`epoch_metrics`), what to do before a checkpoint is written (`before_checkpoint`) and what a checkpoint
holds besides the shared state (`checkpoint_extras`). `SupernetStage` is stage I (`dsnet/sandwich.py`), `GateStage`
stage II (`dsnet/gate_training.py`); `create_stage` picks one by the config's `stage`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from .archs import create_model
from .bn_slots import calibrate_routes, recalibrate_bn
from .checkpoint import gated_network_from_checkpoint, load_checkpoint, supernet_from_checkpoint
from .errors import UserError
from .config import data_options, model_config, recorded_config
from .data import DataOptions, calibration_batches
from .distributed import GradSync, always_sync
from .gate import GatedDSNet, GateConfig, check_gate_config, default_routes, insert_gate
from .gate_budget import calibrate_route_bias
from .latency import format_ms, parse_latency, read_table_for
from .gate_training import GateLosses, epoch_metrics, evaluate_gated, gate_step, set_trainable, target_madds
from .madds import count_madds
from .metrics import batch_sums, metric_sums, summarize
from .sandwich import random_stage_plans, sandwich_step, sandwich_widths
from .supernet import SlimNetwork
from .prune.permute import order_by_bn_scale
from .timm_import import supernet_from_timm

Autocast = Callable[[], contextlib.AbstractContextManager]
Reduce = Callable[[torch.Tensor], torch.Tensor]
Models = list[tuple[nn.Module, str]]  # the live model and the EMA teacher, each with its metric prefix ("", "ema_")


@dataclass
class StepResult:
    """What the loop needs from one stage-specific step."""

    total: float  # the loss that was backpropagated
    scalars: dict[str, float]  # logged to TensorBoard as train/<name>
    sums: dict[str, float]  # summed over the epoch, turned into per-epoch figures by `epoch_metrics`


def create_stage(config: dict[str, Any], explicit: set[str], resuming: bool) -> "SupernetStage | GateStage":
    return {"supernet": SupernetStage, "gate": GateStage}[config["stage"]](config, explicit, resuming)


def width_label(width: float) -> str:
    """A width as summary columns name it: `val_top1@0.35`, `val_top1@1.0`."""
    return str(round(float(width), 4))


# ---- stage I: the supernet ----------------------------------------------------------------------------------------


def resolve_val_widths(config: dict, widths: tuple[float, ...]) -> list[float]:
    if config["val_widths"] is None:
        return sorted({widths[0], widths[len(widths) // 2], widths[-1]})
    missing = [w for w in config["val_widths"] if not any(abs(w - c) < 1e-6 for c in widths)]
    if missing:
        raise UserError(f"val_widths {missing} are not width choices {list(widths)}")
    return sorted(config["val_widths"])


@torch.no_grad()
def evaluate_widths(model: SlimNetwork, loader: Iterable, widths: list[float], device: torch.device,
                    autocast: Autocast | None = None, reduce: Reduce | None = None, prefix: str = ""
                    ) -> dict[str, float]:
    """Top-1, top-5 and loss of each width over the loader (summed across processes by `reduce`)."""
    model.eval()
    sums = metric_sums(lambda images, targets: torch.stack([batch_sums(model(images, w), targets) for w in widths]),
                       loader, device, autocast=autocast, reduce=reduce)
    metrics = {}
    for w, row in zip(widths, sums):
        figures, label = summarize(row), width_label(w)
        for key in ("top1", "top5", "loss"):
            metrics[f"{prefix}val_{key}@{label}"] = figures[key]
    return metrics


class SupernetStage:
    """Stage I: a sandwich of widths per step, taught by the EMA teacher (or the live largest width)."""

    default_best_metric = "ema_val_top1@smallest"

    def __init__(self, config: dict[str, Any], explicit: set[str], resuming: bool):
        self.config = config
        self.calibration = None  # BN recalibration batches, loaded on first use

    def build_model(self, num_classes: int, device: torch.device, resume_state: dict | None) -> SlimNetwork:
        recorded = (resume_state or {}).get("model_config")  # a resumed run rebuilds the supernet it saved
        if self.config["init_permute"] and not self.config["init_timm"]:
            raise UserError("--init-permute reorders imported weights: it needs --init-timm")
        if self.config["init_timm"] and not recorded:
            model = supernet_from_timm(self.config["init_timm"], model_config(self.config, num_classes))
            if self.config["init_permute"]:
                order_by_bn_scale(model)
                print("channels of every group reordered by BN scale |γ|, largest first (--init-permute)")
        else:
            model = create_model(recorded or model_config(self.config, num_classes))
        self.model, self.model_config = model.to(device), model.config
        self.widths = self.model.widths
        self.val_widths = resolve_val_widths(self.config, self.widths)
        return self.model

    def train_step(self, model: nn.Module, teacher: nn.Module | None, images: torch.Tensor, targets: torch.Tensor,
                   step: int, backward: Callable[[torch.Tensor], None], autocast: Autocast,
                   grad_sync: GradSync = always_sync) -> StepResult:
        cfg = self.config
        widths = sandwich_widths(len(self.widths), cfg["num_random_widths"], cfg["seed"], step)
        plans = random_stage_plans(len(self.widths), len(self.model.stage_names), cfg["num_random_plans"],
                                   cfg["seed"], step)
        losses = sandwich_step(
            model, teacher, images, targets, widths, label_smoothing=cfg["label_smoothing"],
            ensemble_smallest=cfg["ensemble_smallest"], backward=backward, autocast=autocast, plans=plans,
            teacher_batch_stats=cfg["teacher_batch_stats"], grad_sync=grad_sync)
        logged = {f"loss@{width_label(self.widths[w])}": v for w, v in losses.per_width if not isinstance(w, tuple)}
        plan_losses = [v for w, v in losses.per_width if isinstance(w, tuple)]
        if plan_losses:
            logged["loss@plans"] = sum(plan_losses) / len(plan_losses)
        return StepResult(losses.total, logged, {})

    def epoch_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {}

    def validate(self, models: Models, loader: Iterable, device: torch.device, autocast: Autocast, reduce: Reduce,
                 last_epoch: bool) -> dict[str, float]:
        # The last epoch refreshes every width, so the final checkpoint holds fresh statistics for all of them.
        self.recalibrate_bn(models, self.widths if last_epoch else self.val_widths)
        metrics = {}
        for model, prefix in models:
            metrics.update(evaluate_widths(model, loader, self.val_widths, device, autocast, reduce, prefix))
        return metrics

    def before_checkpoint(self, models: Models, improved: bool, last_epoch: bool) -> None:
        if improved and not last_epoch:
            self.recalibrate_bn(models, self.widths)  # best.pth holds fresh statistics for every width too

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"model_config": self.model_config.to_dict(), "gate": None}

    def epoch_scalars(self) -> dict[str, float]:
        """TensorBoard-only figures of an epoch."""
        return {f"madds/{width_label(w)}": count_madds(self.model, w) for w in self.val_widths}

    def recalibrate_bn(self, models: Models, widths) -> None:
        """Re-estimate the BN statistics of `widths` (live and EMA model) on fixed training batches.

        A width sampled in few steps has running statistics from weights long gone; measuring it with them
        understates it badly. The batches are the same every time, so resumed and distributed runs agree.
        """
        count = self.config["bn_recalibrate_batches"]
        if not count:
            return
        if self.calibration is None:
            self.calibration = calibration_batches(data_options(self.config), count, self.config["batch_size"],
                                                   seed=self.config["seed"])
        for model, _ in models:
            for w in widths:
                recalibrate_bn(model, w, self.calibration)


# ---- stage II: the gate --------------------------------------------------------------------------------------------

# Keys a gate run takes from the --init checkpoint's run unless given now: the supernet's and the data's.
INHERITED_KEYS = ("widths", "small_input", "depth_multiplier", "dropout", "se_ratio", "num_classes",
                  *DataOptions.__dataclass_fields__)
ARCHITECTURE_KEYS = ("widths", "small_input", "se_ratio", "num_classes")


def read_init_checkpoint(path: str | None) -> dict[str, Any]:
    """The --init checkpoint: a stage-I supernet."""
    if not path:
        raise UserError("--stage gate needs --init CHECKPOINT, a supernet trained with python train.py --stage "
                        "supernet")
    state = load_checkpoint(path)
    if "model_config" not in state or "model" not in state:
        raise UserError(f"--init {path!r} holds no supernet (it lacks 'model_config' or 'model')")
    return state


def complete_config(config: dict[str, Any], explicit: set[str], init_state: dict[str, Any]) -> dict[str, Any]:
    """The run config completed from the --init checkpoint's run: model and data keys not given now come from it.
    A model key that was given must agree with the checkpoint's supernet."""
    recorded = recorded_config(init_state)
    config = {**config, **{k: recorded[k] for k in INHERITED_KEYS if k in recorded and k not in explicit}}
    architecture = init_state["model_config"]
    for key in ARCHITECTURE_KEYS:
        given, actual = config.get(key), architecture.get(key)
        if key in explicit and given is not None and not _same(given, actual):
            raise UserError(f"--init {config['init']!r} is a supernet of another architecture: its {key} is "
                            f"{actual}, this run's is {given}")
        if key != "num_classes" and actual is not None:
            config[key] = actual
    return config


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) < 1e-6
    return a == b


def gate_config_from_run(config: dict[str, Any], supernet: SlimNetwork) -> GateConfig:
    """The gate the run config asks for, checked against the supernet (UserError saying what does not fit)."""
    widths = supernet.widths

    def as_choice(w: float) -> float:  # the supernet's own spelling of a width choice
        index = supernet.choice_index(float(w))
        return widths[index] if index is not None else float(w)

    routes = config["gate_routes"] or default_routes(widths, config["gate_num_routes"])
    gate_aware = supernet.config.slim_from is not None  # the gate sits where the supernet starts to slim
    input_width = config["gate_input_width"]
    if input_width is None:
        input_width = supernet.trunk_width if gate_aware else widths[-1]
    block = config["gate_block"] or supernet.default_gate_block
    gate = GateConfig(routes=sorted({as_choice(w) for w in routes}), input_width=as_choice(input_width),
                      block=block, se_ratio=config["gate_se_ratio"])
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
    return insert_gate(supernet.to(device), gate, gate_calibration_batches(config))


def gate_calibration_batches(config: dict[str, Any]) -> list:
    """The training batches on which the gate's routes have their BN statistics collected."""
    return calibration_batches(data_options(config), config["gate_calibration_batches"],
                               batch_size=config["batch_size"], seed=config["seed"])


def check_target_in_route_range(value: float, route_madds: torch.Tensor) -> None:
    """UserError when the MAdds target lies outside what the routes can reach: no mix of them would meet it."""
    target, low, high = target_madds(value, route_madds), float(route_madds.min()), float(route_madds.max())
    if not low * (1 - 1e-9) <= target <= high * (1 + 1e-9):
        given = f"{value:g}" + (" of the widest" if value <= 1 else "")
        raise UserError(f"--target-madds {given} ({target / 1e6:.2f}M) is outside the routes' range: "
                        f"{low / 1e6:.2f}M to {high / 1e6:.2f}M MAdds, fractions {low / high:.3f} to 1 of the widest")


def route_latency_budget(config: dict[str, Any], gated: GatedDSNet) -> tuple[torch.Tensor, float]:
    """(each route's predicted latency, the target) in seconds, from --lut and --target-latency; UserError when one
    is missing, the table does not fit the network, or the target lies outside the routes' range."""
    if config["target_latency"] is None or config["lut"] is None:
        raise UserError("--target-latency and --lut go together")
    table = read_table_for(config["lut"], gated.supernet, config["img_size"])
    routes = torch.tensor([table.predict(plan) for plan in gated.route_plans], dtype=torch.float64)
    target, low, high = parse_latency(config["target_latency"]), float(routes.min()), float(routes.max())
    if not low * (1 - 1e-9) <= target <= high * (1 + 1e-9):
        raise UserError(f"--target-latency {format_ms(target)} is outside the routes' range: {format_ms(low)} to "
                        f"{format_ms(high)} predicted ({table.describe()})")
    return routes, target


class GateStage:
    """Stage II: the gate of a stage-I supernet, trained with SGS and the MAdds loss."""

    default_best_metric = "ema_val_top1"

    def __init__(self, config: dict[str, Any], explicit: set[str], resuming: bool):
        self.val_widths: list[float] = []  # the dynamic network has no widths of its own to validate
        self.init_state = None
        if not resuming:  # a resumed run keeps the config and the network its checkpoint records
            self.init_state = read_init_checkpoint(config.get("init"))
            config = complete_config(config, explicit, self.init_state)
        self.config = config
        self.losses = GateLosses.from_config(config)
        self.calibration = None  # the batches every route's BN statistics are collected on, loaded on first use

    def build_model(self, num_classes: int, device: torch.device, resume_state: dict | None) -> GatedDSNet:
        if resume_state is not None:
            self.model = gated_network_from_checkpoint(resume_state, "model").to(device).train()
        else:
            self.model = build_gated_network(self.config, self.init_state, num_classes, device)
            self.init_state = None
        if self.config["target_latency"] is not None or self.config["lut"] is not None:
            self.losses.route_latency, self.losses.target_latency = route_latency_budget(self.config, self.model)
        else:
            check_target_in_route_range(self.config["target_madds"],
                                        self.model.route_madds(self.config["img_size"]))
        share, routes = self.config["gate_min_route_share"], len(self.model.route_plans)
        if self.config["calibrate_target"] and share * routes > 1:
            raise UserError(f"--gate-min-route-share {share:g} is more than {routes} routes can each get "
                            f"(at most {1 / routes:.3g})")
        set_trainable(self.model, self.config["finetune_supernet"])
        return self.model

    def train_step(self, model: nn.Module, teacher: nn.Module | None, images: torch.Tensor, targets: torch.Tensor,
                   step: int, backward: Callable[[torch.Tensor], None], autocast: Autocast,
                   grad_sync: GradSync = always_sync) -> StepResult:
        with grad_sync(True):  # one pass: it all-reduces when an optimizer step follows
            result = gate_step(model, images, targets, self.losses, backward=backward, autocast=autocast)
        return StepResult(result.total, {"task_loss": result.task, "gate_loss": result.gate,
                                         "madds_loss": result.madds}, result.sums)

    def epoch_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return epoch_metrics(self.model, sums)

    def validate(self, models: Models, loader: Iterable, device: torch.device, autocast: Autocast, reduce: Reduce,
                 last_epoch: bool) -> dict[str, float]:
        self.collect_route_statistics(models)
        if self.config["calibrate_target"]:
            self.calibrate_routes_to_target(models)
        metrics = {}
        for model, prefix in models:
            metrics.update(evaluate_gated(model, loader, device, self.losses, autocast, reduce, prefix))
        return metrics

    def collect_route_statistics(self, models: Models) -> None:
        """Collect every route's BN statistics again (live and EMA network), through the network as the gate has
        changed it, on the fixed training batches of the gate's insertion. Validation measures, and the checkpoints
        written after it hold, the network that was trained."""
        if self.calibration is None:
            self.calibration = gate_calibration_batches(self.config)
        for model, _ in models:
            calibrate_routes(model, self.calibration, routes=range(len(model.route_plans)))

    def calibrate_routes_to_target(self, models: Models) -> None:
        """Set each gate's cost bias so that its routes meet the target on the calibration images (after the BN
        statistics, which the route logits depend on)."""
        for model, _ in models:
            device = next(model.parameters()).device
            costs, target = self.losses.costs(model, self.config["img_size"])
            calibrate_route_bias(model.route_logits, (images.to(device) for images in self.calibration),
                                 model.gate.route_bias, costs, target, self.config["gate_min_route_share"])

    def before_checkpoint(self, models: Models, improved: bool, last_epoch: bool) -> None:
        pass  # validation has just collected the routes' BN statistics and calibrated their cost bias

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"model_config": self.model.supernet.config.to_dict(), "gate": self.model.config.to_dict()}

    def epoch_scalars(self) -> dict[str, float]:
        return {}
