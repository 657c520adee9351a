"""The training loop: data, model, EMA, optimizer and schedule, AMP, DDP, validation, logs and checkpoints.

Stage-specific work is one call per batch: `supernet.sandwich_step` in stage I, `gating.gate_step` in stage II. The
model, validation and the figures logged per epoch also depend on the stage; everything else lives here, shared.
Only rank 0 writes files. Checkpoints are written to a temporary file and renamed into place.
"""
from __future__ import annotations

import csv
import io
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, accuracy, distribute_bn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, Subset
from tqdm import tqdm

from . import gating
from .checkpoint import load_checkpoint, save_checkpoint
from .cpu_memory import keep_freed_memory
from .cli import UserError, write_text_atomic
from .config import data_options, model_config, to_yaml
from .calibrate import recalibrate_bn
from .data import build_dataset, build_loader, calibration_batches, num_classes_of
from .madds import count_madds
from .mobilenetv2 import DSMobileNetV2, SupernetConfig
from .supernet import random_stage_plans, sandwich_step, sandwich_widths

RUN_FILES = ("args.yaml", "last.pth", "summary.csv")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str | None) -> Distributed:
    """Join the process group when started by torchrun (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device_name is None:
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device_name!r} asked for, but CUDA is not available")
    if world_size == 1:
        return Distributed(0, 1, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, device)


def width_label(width: float) -> str:
    return str(round(float(width), 4))


def resolve_val_widths(config: dict, widths: tuple[float, ...]) -> list[float]:
    if config["val_widths"] is None:
        return sorted({widths[0], widths[len(widths) // 2], widths[-1]})
    missing = [w for w in config["val_widths"] if not any(abs(w - c) < 1e-6 for c in widths)]
    if missing:
        raise UserError(f"val_widths {missing} are not width choices {list(widths)}")
    return sorted(config["val_widths"])


def resolve_metric(name: str, val_widths: list[float], use_ema: bool) -> str:
    """'ema_val_top1@smallest' → 'ema_val_top1@0.35' (without EMA: 'val_top1@0.35'); a name without '@' (stage II:
    'ema_val_top1') names a column of its own."""
    metric, at, where = name.partition("@")
    if not use_ema and metric.startswith("ema_"):
        metric = metric[len("ema_"):]
    if not at:
        return metric
    if where in ("smallest", "middle", "largest") and val_widths:
        aliases = {"smallest": val_widths[0], "middle": val_widths[len(val_widths) // 2], "largest": val_widths[-1]}
        where = width_label(aliases[where])
    return f"{metric}@{where}"


DEFAULT_BEST_METRIC = {"supernet": "ema_val_top1@smallest", "gate": "ema_val_top1"}


@dataclass
class StepResult:
    """What the loop needs from one stage-specific step."""

    total: float  # the loss that was backpropagated
    scalars: dict[str, float]  # logged to TensorBoard as train/<name>
    sums: dict[str, float]  # summed over the epoch, turned into per-epoch figures by the stage


def capture_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def evaluate_widths(model: DSMobileNetV2, loader, widths: list[float], device: torch.device, autocast,
                    dist_info: Distributed, prefix: str) -> dict[str, float]:
    """Top-1, top-5 and loss of each width over the loader (summed across processes)."""
    model.eval()
    sums = torch.zeros(len(widths), 4, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        for i, w in enumerate(widths):
            with autocast():
                logits = model(images, w).float()
            top1, top5 = accuracy(logits, targets, topk=(1, min(5, logits.shape[1])))
            n = targets.shape[0]
            sums[i] += torch.tensor([top1.item() * n / 100, top5.item() * n / 100,
                                     F.cross_entropy(logits, targets, reduction="sum").item(), n],
                                    dtype=torch.float64)
    if dist_info.world_size > 1:
        sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    metrics = {}
    for i, w in enumerate(widths):
        count = max(sums[i, 3].item(), 1.0)
        label = width_label(w)
        metrics[f"{prefix}val_top1@{label}"] = 100.0 * sums[i, 0].item() / count
        metrics[f"{prefix}val_top5@{label}"] = 100.0 * sums[i, 1].item() / count
        metrics[f"{prefix}val_loss@{label}"] = sums[i, 2].item() / count
    return metrics


def check_output_dir(output: Path, resuming: bool, overwrite: bool) -> None:
    holds_run = output.is_dir() and any((output / f).exists() for f in RUN_FILES)
    if holds_run and not (resuming or overwrite):
        raise UserError(f"output directory {str(output)!r} holds another run; use --resume "
                        f"{output / 'last.pth'} to continue it or --overwrite to replace it")
    if output.exists() and not output.is_dir():
        raise UserError(f"output path {str(output)!r} exists and is not a directory")


def write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


class Trainer:
    """Training as the config says: stage I (`supernet`) trains a supernet, stage II (`gate`) the gate of a trained
    one. `run()` trains; `Trainer(config)` sets everything up."""

    def __init__(self, config: dict[str, Any], explicit: set[str] | None = None):
        explicit = explicit if explicit is not None else set(config)
        self.resume_state = None
        if config.get("resume"):
            self.resume_state = load_checkpoint(config["resume"])
            # The resumed run keeps its recorded config; only keys given now override it.
            recorded = dict(self.resume_state.get("config") or {})
            config = {**config, **recorded, **{k: config[k] for k in explicit}, "resume": config["resume"]}
            if "output" not in explicit:
                config["output"] = str(Path(config["resume"]).parent)
        self.gated = config["stage"] == "gate"
        self.init_state = None
        if self.gated and self.resume_state is None:
            config, self.init_state = gating.prepare_config(config, explicit)
        self.config = config
        if config["keep_freed_memory"]:
            keep_freed_memory()
        self.dist = setup_distributed(config["device"])
        self.device = self.dist.device
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.output = Path(config["output"] or f"runs/{config['stage']}-{config['data']}")
        check_output_dir(self.output, resuming=self.resume_state is not None, overwrite=config["overwrite"])

        torch.manual_seed(config["seed"])
        random.seed(config["seed"] + self.dist.rank)
        np.random.seed(config["seed"] + self.dist.rank)

        self._build_data()
        self.calibration = None  # BN recalibration batches, loaded on first use
        self._build_model()
        self._build_optimization()
        self.start_epoch, self.step, self.best, self.summary_rows = 0, 0, None, []
        if self.resume_state is not None:
            self._restore(self.resume_state)
            self.resume_state = None

    # ---- setup --------------------------------------------------------------------------------------------------

    def _build_data(self) -> None:
        cfg, opts = self.config, data_options(self.config)
        train_set = build_dataset(opts, train=True)
        val_set = build_dataset(opts, train=False)
        classes = num_classes_of(train_set)
        if cfg["num_classes"] is not None and cfg["num_classes"] != classes:
            raise UserError(f"num_classes is {cfg['num_classes']} but dataset {cfg['data']!r} has {classes}")
        self.num_classes = classes
        self.train_sampler = None
        if self.dist.world_size > 1:
            self.train_sampler = DistributedSampler(train_set, self.dist.world_size, self.dist.rank, shuffle=True,
                                                    seed=cfg["seed"], drop_last=True)
            val_set = Subset(val_set, range(self.dist.rank, len(val_set), self.dist.world_size))
        self.train_loader = build_loader(train_set, cfg["batch_size"], train=True, workers=cfg["workers"],
                                         sampler=self.train_sampler, seed=cfg["seed"])
        if len(self.train_loader) == 0:
            raise UserError(f"batch_size {cfg['batch_size']} is larger than the training set ({len(train_set)})")
        self.val_loader = build_loader(val_set, cfg["val_batch_size"], train=False, workers=cfg["workers"])

    def _build_model(self) -> None:
        cfg = self.config
        if self.gated:
            if self.resume_state is not None:
                self.model = gating.gated_network_for_resume(self.resume_state, cfg, self.device)
            else:
                self.model = gating.build_gated_network(cfg, self.init_state, self.num_classes, self.device)
                self.init_state = None
            self.model_config = self.model.supernet.config
            self.gate_losses = gating.GateLosses.from_config(cfg)
            self.widths, self.val_widths = self.model.supernet.widths, []
        else:
            self.model_config = SupernetConfig.from_dict(model_config(cfg, self.num_classes))
            self.model = DSMobileNetV2(self.model_config).to(self.device)
            self.widths = self.model.widths
            self.val_widths = resolve_val_widths(cfg, self.widths)
        if cfg["channels_last"]:
            self.model.to(memory_format=torch.channels_last)  # convolutions then keep their outputs in it too
        best = cfg["best_metric"] or DEFAULT_BEST_METRIC[cfg["stage"]]
        self.best_metric = resolve_metric(best, self.val_widths, cfg["ema"])
        self.ema = ModelEmaV3(self.model, decay=cfg["ema_decay"], use_warmup=cfg["ema_warmup"]) if cfg["ema"] else None
        self.ddp = None
        if self.dist.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)

    def _build_optimization(self) -> None:
        cfg = self.config
        global_batch = cfg["batch_size"] * self.dist.world_size * cfg["accum_steps"]
        self.lr = cfg["lr"] if cfg["lr"] is not None else cfg["lr_base"] * global_batch / cfg["lr_base_size"]
        self.optimizer = create_optimizer_v2(self.model, opt=cfg["opt"], lr=self.lr, weight_decay=cfg["weight_decay"],
                                             momentum=cfg["momentum"])
        self.updates_per_epoch = max(1, len(self.train_loader) // cfg["accum_steps"])
        self.scheduler, _ = create_scheduler_v2(self.optimizer, sched=cfg["sched"], num_epochs=cfg["epochs"],
                                                warmup_epochs=cfg["warmup_epochs"], warmup_lr=cfg["warmup_lr"],
                                                min_lr=cfg["min_lr"], step_on_epochs=False,
                                                updates_per_epoch=self.updates_per_epoch)
        use_amp = bool(cfg["amp"])
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_amp and self.device.type == "cuda")
        self.autocast = lambda: torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=use_amp)

    def _restore(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"], strict=True)
            if self.ema is not None:
                if state.get("ema") is None:
                    raise UserError("the checkpoint has no EMA weights but this run uses an EMA teacher")
                self.ema.module.load_state_dict(state["ema"], strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise UserError(f"cannot resume from {self.config['resume']!r}: {str(exc).splitlines()[0]}") from None
        self.start_epoch, self.step = state["epoch"] + 1, state["step"]
        self.best, self.summary_rows = state.get("best"), list(state.get("summary", []))
        restore_rng(state["rng"])

    # ---- the loop -----------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.config
        if self.dist.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.output / "args.yaml", to_yaml(cfg))
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.output))
        end_epoch = cfg["epochs"]
        if cfg["epoch_limit"] is not None:
            end_epoch = min(end_epoch, self.start_epoch + cfg["epoch_limit"])
        row: dict[str, Any] = {}
        for epoch in range(self.start_epoch, end_epoch):
            train_metrics = self.train_one_epoch(epoch)
            if self.dist.world_size > 1:  # each process updated BN statistics on its own batches: average them
                distribute_bn(self.model, self.dist.world_size, reduce=True)
                if self.ema is not None:
                    distribute_bn(self.ema.module, self.dist.world_size, reduce=True)
            row = {"epoch": epoch, **train_metrics}
            if (epoch + 1) % cfg["val_every"] == 0 or epoch + 1 == cfg["epochs"]:
                if not self.gated:
                    # the last epoch refreshes every width, so the final checkpoint holds fresh statistics for all
                    self.recalibrate_bn(self.widths if epoch + 1 == cfg["epochs"] else self.val_widths)
                row.update(self.validate())
            self.summary_rows.append(row)
            improved = self._update_best(epoch, row)
            if improved and not self.gated and epoch + 1 != cfg["epochs"]:
                self.recalibrate_bn(self.widths)  # best.pth holds fresh statistics for every width too
            if self.dist.is_main:
                self._log_epoch(epoch, row)
                self._save(epoch, row, improved)
        if self.dist.is_main:
            self.writer.close()
        if self.dist.world_size > 1:
            dist.barrier()
            dist.destroy_process_group()
        return row

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.config
        if self.train_sampler is not None:
            self.train_sampler.set_epoch(epoch)
        else:
            self.train_loader.generator.manual_seed(cfg["seed"] + epoch)
        self.model.train()
        accum = cfg["accum_steps"]
        loss_sum, images_seen, start = 0.0, 0, time.perf_counter()
        sums: dict[str, float] = {}
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{cfg['epochs']}", disable=not self.dist.is_main,
                   leave=False, mininterval=1.0, dynamic_ncols=True)
        self.optimizer.zero_grad(set_to_none=True)
        for i, (images, targets) in enumerate(bar):
            images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            update_now = (i + 1) % accum == 0
            losses = self.train_step(images, targets,
                                     backward=lambda loss, is_last: self.scaler.scale(loss / accum).backward())
            for key, value in losses.sums.items():
                sums[key] = sums.get(key, 0.0) + value
            if not math.isfinite(losses.total):
                raise TrainingDiverged(
                    f"loss became {losses.total} at epoch {epoch + 1}, step {self.step}; stopping "
                    f"({self.output / 'last.pth'} holds the last good epoch)")
            self.step += 1
            if update_now:
                self._update(epoch)
            loss_sum += losses.total
            images_seen += images.shape[0]
            if self.dist.is_main and (i % cfg["log_interval"] == 0):
                rate = images_seen * self.dist.world_size / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{losses.total:.3f}", img_s=f"{rate:.0f}")
                for name, value in losses.scalars.items():
                    self.writer.add_scalar(f"train/{name}", value, self.step)
        elapsed = time.perf_counter() - start
        metrics = {"train_loss": loss_sum / max(1, len(self.train_loader)),
                   "lr": self.optimizer.param_groups[0]["lr"],
                   "images_per_s": images_seen * self.dist.world_size / elapsed, "epoch_s": elapsed}
        if self.gated:
            metrics.update(gating.epoch_metrics(self.model, self._all_reduce(sums)))
        return metrics

    def train_step(self, images: torch.Tensor, targets: torch.Tensor, backward) -> StepResult:
        """The stage's work on one batch: forward and backward (the optimizer steps in `_update`)."""
        cfg = self.config
        if self.gated:
            result = gating.gate_step(self.ddp or self.model, images, targets, self.gate_losses, backward=backward,
                                      autocast=self.autocast)
            return StepResult(result.total, {"task_loss": result.task, "gate_loss": result.gate,
                                             "madds_loss": result.madds}, result.sums)
        widths = sandwich_widths(len(self.widths), cfg["num_random_widths"], cfg["seed"], self.step)
        plans = random_stage_plans(len(self.widths), len(self.model.stage_names), cfg["num_random_plans"],
                                   cfg["seed"], self.step)
        losses = sandwich_step(
            self.ddp or self.model, self.ema.module if self.ema else None, images, targets, widths,
            label_smoothing=cfg["label_smoothing"], ensemble_smallest=cfg["ensemble_smallest"], backward=backward,
            autocast=self.autocast, plans=plans, teacher_batch_stats=cfg["teacher_batch_stats"])
        logged = {f"loss@{width_label(self.widths[w])}": v for w, v in losses.per_width if not isinstance(w, tuple)}
        plan_losses = [v for w, v in losses.per_width if isinstance(w, tuple)]
        if plan_losses:
            logged["loss@plans"] = sum(plan_losses) / len(plan_losses)
        return StepResult(losses.total, logged, {})

    def _all_reduce(self, sums: dict[str, float]) -> dict[str, float]:
        if self.dist.world_size == 1 or not sums:
            return sums
        keys = sorted(sums)
        values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        return dict(zip(keys, values.tolist()))

    def _update(self, epoch: int) -> None:
        cfg = self.config
        if cfg["clip_grad"]:  # 0 turns a recipe's clip off
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg["clip_grad"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        num_updates = self.step // cfg["accum_steps"]
        if self.ema is not None:
            self.ema.update(self.model, step=num_updates if cfg["ema_warmup"] else None)
        self.scheduler.step_update(num_updates=num_updates)

    def recalibrate_bn(self, widths) -> None:
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
        models = [self.model] + ([self.ema.module] if self.ema is not None else [])
        for model in models:
            for w in widths:
                recalibrate_bn(model, w, self.calibration)
        self.model.train()

    def validate(self) -> dict[str, float]:
        models = [(self.model, "")] + ([(self.ema.module, "ema_")] if self.ema is not None else [])
        metrics = {}
        for model, prefix in models:
            if self.gated:
                metrics.update(gating.evaluate_gated(model, self.val_loader, self.device, self.config["sgs"],
                                                     self.autocast, self._all_reduce_tensor, prefix))
            else:
                metrics.update(evaluate_widths(model, self.val_loader, self.val_widths, self.device, self.autocast,
                                               self.dist, prefix))
        self.model.train()
        return metrics

    def _all_reduce_tensor(self, values: torch.Tensor) -> torch.Tensor:
        if self.dist.world_size == 1:
            return values
        values = values.to(self.device)
        dist.all_reduce(values)
        return values.cpu()

    # ---- logs and checkpoints -----------------------------------------------------------------------------------

    def _log_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        for key, value in row.items():
            if key != "epoch":
                self.writer.add_scalar(key.replace("@", "/"), value, epoch)
        for w in self.val_widths:
            self.writer.add_scalar(f"madds/{width_label(w)}", count_madds(self.model, w), epoch)
        shown = [f"{k} {row[k]:.2f}" for k in row if k.split("@")[0] in ("val_top1", "ema_val_top1", "val_gate_acc")]
        shown += [f"{k} {row[k] / 1e6:.2f}M" for k in row if k in ("val_madds", "ema_val_madds")]
        print(f"epoch {epoch + 1}/{self.config['epochs']}  loss {row['train_loss']:.4f}  lr {row['lr']:.4g}  "
              f"{row['images_per_s']:.0f} img/s  " + "  ".join(shown), flush=True)

    def _update_best(self, epoch: int, row: dict[str, Any]) -> bool:
        """Track the best epoch by the best metric (on every process: metrics are reduced); True if this one is."""
        if self.best_metric not in row:
            return False
        value = row[self.best_metric]
        if self.best is not None and value <= self.best["value"]:
            return False
        self.best = {"metric": self.best_metric, "value": value, "epoch": epoch}
        return True

    def _save(self, epoch: int, row: dict[str, Any], improved: bool) -> None:
        write_summary(self.output / "summary.csv", self.summary_rows)
        state = {
            "model_config": self.model_config.to_dict(),
            "gate": self.model.config.to_dict() if self.gated else None,
            "config": self.config,
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "step": self.step,
            "best": self.best,
            "summary": self.summary_rows,
            "rng": capture_rng(),
        }
        save_checkpoint(self.output / "last.pth", state)
        if improved:
            save_checkpoint(self.output / "best.pth", state)
