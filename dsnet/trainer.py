"""The training loop both stages share: data, EMA, optimizer and schedule, AMP, DDP, validation, logs, checkpoints.

What differs between stage I and stage II is the stage object's (`dsnet/stages.py`): the network, the work of one
batch, validation and the figures of an epoch. Only rank 0 writes files. Checkpoints are written to a temporary file
and renamed into place.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, distribute_bn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset
from tqdm import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .errors import UserError
from .files import write_text_atomic
from .config import data_options, recorded_config, to_yaml
from .cpu_memory import keep_freed_memory
from .data import build_dataset, build_loader, num_classes_of
from .distributed import GradSync, always_sync, grad_sync, setup_distributed
from .rng import capture_rng, restore_rng, seed_all
from .run_dir import check_output_dir, run_lock, write_summary
from .sampling import EpochSampler
from .stages import StepResult, create_stage, width_label
from .stop_signals import StopRequests


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


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


class Trainer:
    """Training as the config says: stage I (`supernet`) trains a supernet, stage II (`gate`) the gate of a trained
    one. `run()` trains; `Trainer(config)` sets everything up."""

    def __init__(self, config: dict[str, Any], explicit: set[str] | None = None):
        explicit = explicit if explicit is not None else set(config)
        self.resume_state = None
        if config.get("resume"):
            self.resume_state = load_checkpoint(config["resume"])
            # The resumed run keeps its recorded config; only keys given now override it.
            recorded = recorded_config(self.resume_state)
            config = {**config, **recorded, **{k: config[k] for k in explicit}, "resume": config["resume"]}
            if "output" not in explicit:
                config["output"] = str(Path(config["resume"]).parent)
        self.stage = create_stage(config, explicit, resuming=self.resume_state is not None)
        self.config = config = self.stage.config
        if config["keep_freed_memory"]:
            keep_freed_memory()
        self.dist = setup_distributed(config["device"])
        self.dist.same_on_every_process(to_yaml(config), "config")
        self.device = self.dist.device
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.output = Path(config["output"] or f"runs/{config['stage']}-{config['data']}")
        check_output_dir(self.output, resuming=self.resume_state is not None, overwrite=config["overwrite"])
        seed_all(config["seed"], self.dist.rank)

        self._build_data()
        self._build_model()
        self._build_optimization()
        self.start_epoch, self.step, self.best, self.summary_rows = 0, 0, None, []
        self.resume_position: dict[str, Any] | None = None  # where inside `start_epoch` a resumed run continues
        self.stop_requests, self.stopped_by = StopRequests(announce=self.dist.is_main), None
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
        self.train_sampler = EpochSampler(len(train_set), cfg["seed"], self.dist.rank, self.dist.world_size)
        if self.dist.world_size > 1:
            val_set = Subset(val_set, range(self.dist.rank, len(val_set), self.dist.world_size))
        self.train_loader = build_loader(train_set, cfg["batch_size"], train=True, workers=cfg["workers"],
                                         sampler=self.train_sampler, seed=cfg["seed"])
        self.batches_per_epoch = len(self.train_loader)
        if self.batches_per_epoch == 0:
            raise UserError(f"batch_size {cfg['batch_size']} is larger than the training set ({len(train_set)})")
        self.val_loader = build_loader(val_set, cfg["val_batch_size"], train=False, workers=cfg["workers"])

    def _build_model(self) -> None:
        cfg = self.config
        self.model = self.stage.build_model(self.num_classes, self.device, self.resume_state)
        if cfg["channels_last"]:
            self.model.to(memory_format=torch.channels_last)  # convolutions then keep their outputs in it too
        best = cfg["best_metric"] or self.stage.default_best_metric
        self.best_metric = resolve_metric(best, self.stage.val_widths, cfg["ema"])
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
        position = state.get("position")
        if position is not None:  # written inside an epoch: continue with its next batch
            layout = (self.config["batch_size"], self.dist.world_size, self.config["accum_steps"])
            if (position["batch_size"], position["world_size"], position["accum_steps"]) != layout:
                raise UserError(
                    f"{self.config['resume']!r} was written inside epoch {position['epoch'] + 1} with batch_size "
                    f"{position['batch_size']} on {position['world_size']} process(es), accum_steps "
                    f"{position['accum_steps']}; resume it with the same")
            self.start_epoch, self.resume_position = position["epoch"], position
        self.best, self.summary_rows = state.get("best"), list(state.get("summary", []))
        restore_rng(state["rng"])

    @property
    def models(self) -> list[tuple[torch.nn.Module, str]]:
        """The live model and the EMA teacher, each with the prefix of its metrics."""
        return [(self.model, "")] + ([(self.ema.module, "ema_")] if self.ema is not None else [])

    # ---- the loop -----------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train to the end, or until SIGTERM or SIGINT: then `stopped_by` is the signal and last.pth holds the
        position inside the epoch."""
        with self.stop_requests:
            try:
                if not self.dist.is_main:
                    return self._run()
                self.output.mkdir(parents=True, exist_ok=True)
                with run_lock(self.output):
                    return self._run()
            except Exception as exc:
                self.dist.fail_loudly(exc)
                raise

    def _run(self) -> dict[str, Any]:
        cfg = self.config
        if self.dist.is_main:
            write_text_atomic(self.output / "args.yaml", to_yaml(cfg))
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.output))
        end_epoch = cfg["epochs"]
        if cfg["epoch_limit"] is not None:
            end_epoch = min(end_epoch, self.start_epoch + cfg["epoch_limit"])
        row: dict[str, Any] = {}
        for epoch in range(self.start_epoch, end_epoch):
            last_epoch = epoch + 1 == cfg["epochs"]
            train_metrics = self.train_one_epoch(epoch)
            if train_metrics is None:  # stopped inside the epoch; last.pth holds where
                break
            if self.dist.world_size > 1:  # each process updated BN statistics on its own batches: average them
                for model, _ in self.models:
                    distribute_bn(model, self.dist.world_size, reduce=True)
            row = {"epoch": epoch, **train_metrics}
            if (epoch + 1) % cfg["val_every"] == 0 or last_epoch:
                row.update(self.validate(last_epoch))
            self.summary_rows.append(row)
            improved = self._update_best(epoch, row)
            self.stage.before_checkpoint(self.models, improved, last_epoch)
            self.model.train()
            if self.dist.is_main:
                self._check_output()
                self._log_epoch(epoch, row)
                self._save(epoch, improved)
            if epoch + 1 < end_epoch and self._stop_requested():  # the checkpoint just written is where to resume
                break
        if self.dist.is_main:
            self.writer.close()
            if self.stopped_by is not None:
                print(f"stopped by {self.stop_requests.name or 'a signal to another process'} at epoch "
                      f"{epoch + 1}, step {self.step}; continue with: python train.py --resume "
                      f"{self.output / 'last.pth'}", flush=True)
        self.dist.close()
        return row

    def train_one_epoch(self, epoch: int) -> dict[str, float] | None:
        """One epoch's steps and their figures; None when a stop request ended it early (after saving last.pth)."""
        cfg = self.config
        resumed, self.resume_position = self.resume_position or {}, None
        first = resumed.get("batch", 0)
        self.train_sampler.set_epoch(epoch, start=first * cfg["batch_size"])
        self.train_loader.generator.manual_seed(cfg["seed"] + epoch)  # the workers' seeds, the same in a resumed run
        self.model.train()
        accum = cfg["accum_steps"]
        loss_sum, images_seen = resumed.get("loss_sum", 0.0), resumed.get("images_seen", 0)
        sums: dict[str, float] = dict(resumed.get("sums", {}))
        start, images_now = time.perf_counter(), 0
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{cfg['epochs']}", disable=not self.dist.is_main,
                   leave=False, mininterval=1.0, dynamic_ncols=True, initial=first, total=self.batches_per_epoch)
        self.optimizer.zero_grad(set_to_none=True)
        for i, (images, targets) in enumerate(bar, start=first):
            images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            losses = self.train_step(images, targets, backward=lambda loss: self.scaler.scale(loss / accum).backward(),
                                     grad_sync=grad_sync(self.ddp, update_follows=(i + 1) % accum == 0))
            for key, value in losses.sums.items():
                sums[key] = sums.get(key, 0.0) + value
            if not math.isfinite(losses.total):
                raise TrainingDiverged(
                    f"loss became {losses.total} at epoch {epoch + 1}, step {self.step}; stopping "
                    f"({self.output / 'last.pth'} holds the last good epoch)")
            self.step += 1
            loss_sum += losses.total
            images_seen += images.shape[0]
            images_now += images.shape[0]
            if (i + 1) % accum == 0:
                self._update(epoch)
                position = {"epoch": epoch, "batch": i + 1, "batch_size": cfg["batch_size"],
                            "world_size": self.dist.world_size, "accum_steps": accum, "loss_sum": loss_sum,
                            "images_seen": images_seen, "sums": sums}
                if self._stop_requested():
                    bar.close()
                    if self.dist.is_main:
                        self._check_output()
                        self._save(epoch - 1, improved=False, position=position)
                    return None
                every = cfg["save_every_steps"]
                if every and self.step % every == 0 and i + 1 < self.batches_per_epoch and self.dist.is_main:
                    self._check_output()
                    self._save(epoch - 1, improved=False, position=position)
            if self.dist.is_main and (i % cfg["log_interval"] == 0):
                rate = images_now * self.dist.world_size / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{losses.total:.3f}", img_s=f"{rate:.0f}")
                self._check_output()
                for name, value in losses.scalars.items():
                    self.writer.add_scalar(f"train/{name}", value, self.step)
        elapsed = time.perf_counter() - start
        metrics = {"train_loss": loss_sum / self.batches_per_epoch,
                   "lr": self.optimizer.param_groups[0]["lr"],
                   "images_per_s": images_now * self.dist.world_size / elapsed, "epoch_s": elapsed}
        metrics.update(self.stage.epoch_metrics(self.dist.all_reduce_dict(sums)))
        return metrics

    def train_step(self, images: torch.Tensor, targets: torch.Tensor, backward,
                   grad_sync: GradSync = always_sync) -> StepResult:
        """The stage's work on one batch: forward and backward (the optimizer steps in `_update`)."""
        return self.stage.train_step(self.ddp or self.model, self.ema.module if self.ema is not None else None,
                                     images, targets, self.step, backward, self.autocast, grad_sync)

    def _stop_requested(self) -> bool:
        """Whether a SIGTERM or SIGINT asked the run to stop, agreed by every process (each may have received it at
        a different step, or only one of them); sets `stopped_by`."""
        signum = self.stop_requests.signal or 0
        if self.dist.world_size > 1:
            signum = int(self.dist.all_reduce(torch.tensor([signum]), largest=True).item())
        if signum:
            self.stopped_by = signum
        return bool(signum)

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

    def validate(self, last_epoch: bool = False) -> dict[str, float]:
        metrics = self.stage.validate(self.models, self.val_loader, self.device, self.autocast, self.dist.all_reduce,
                                      last_epoch)
        self.model.train()
        return metrics

    # ---- logs and checkpoints -----------------------------------------------------------------------------------

    def _check_output(self) -> None:
        """Before anything is written: TensorBoard's writer thread would find a removed folder with a traceback."""
        if not self.output.is_dir():
            raise UserError(f"output directory {str(self.output)!r} was removed during the run")

    def _log_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        for key, value in row.items():
            if key != "epoch":
                self.writer.add_scalar(key.replace("@", "/"), value, epoch)
        for key, value in self.stage.epoch_scalars().items():
            self.writer.add_scalar(key, value, epoch)
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

    def _save(self, epoch: int, improved: bool, position: dict[str, Any] | None = None) -> None:
        """Write last.pth (and best.pth if `improved`) after `epoch`, or inside the next epoch at `position`."""
        write_summary(self.output / "summary.csv", self.summary_rows)
        state = {
            **self.stage.checkpoint_extras(),
            "config": self.config,
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "position": position,
            "step": self.step,
            "best": self.best,
            "summary": self.summary_rows,
            "rng": capture_rng(),
        }
        save_checkpoint(self.output / "last.pth", state)
        if improved:
            save_checkpoint(self.output / "best.pth", state)
