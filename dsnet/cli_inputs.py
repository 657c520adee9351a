"""What the commands that read a trained network share: its checkpoint, the data its run recorded, the device, and
output paths."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (gated_network_from_checkpoint, load_checkpoint, network_from_checkpoint,
                         supernet_from_checkpoint)
from .config import recorded_config
from .errors import UserError
from .data import DATASETS, DataOptions
from .gate import GatedDSNet
from .supernet import SlimNetwork


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="dsnet checkpoint (.pth) holding the trained supernet")
    parser.add_argument("--weights", choices=("ema", "model"),
                        help="which weights of the checkpoint to use (default: ema when it has EMA weights, else "
                             "model)")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", choices=DATASETS,
                        help="training dataset to draw batches from (default: the one recorded in the checkpoint's "
                             "config)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="dataset root (default: the one recorded in the checkpoint's config)")


def add_device_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--device", help=f"device to {what} on: cpu, cuda, cuda:1, ... (default: cuda when available, "
                                         "else cpu)")


def resolve_device(name: str | None) -> torch.device:
    """The --device flag as a device: CUDA when there is one unless named, and a clear error for a wrong name."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but CUDA is not available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device {name!r} asked for but there are {torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r} is not supported; use cpu, cuda or cuda:N")
    return device


def open_checkpoint(path: str, weights: str | None, gated: bool | None = False
                    ) -> tuple[dict[str, Any], SlimNetwork | GatedDSNet, str]:
    """The checkpoint's state, its network (eval mode, on CPU) and the name of the weights used. The network is the
    supernet, with `gated` the gated network of a stage-II checkpoint, with ``gated=None`` whichever it holds."""
    state = load_checkpoint(path)
    has_ema = state.get("ema") is not None
    if weights is None:
        weights = "ema" if has_ema else "model"
    elif weights == "ema" and not has_ema:
        raise UserError(f"checkpoint {path!r} holds no EMA weights; use --weights model")
    if gated is None:
        return state, network_from_checkpoint(state, weights), weights
    if gated:
        return state, gated_network_from_checkpoint(state, weights), weights
    return state, supernet_from_checkpoint(state, weights), weights


def input_size(state: dict[str, Any], model: SlimNetwork) -> int:
    """The image size the run trained at (MAdds and test inputs use it)."""
    return int(recorded_config(state).get("img_size", model.config.img_size))


def training_data_options(state: dict[str, Any], model: SlimNetwork | None, data: str | None = None,
                          data_dir: str | None = None) -> DataOptions:
    """The data options of the checkpoint's run, with the dataset and its root optionally overridden."""
    values = recorded_config(state)
    if model is not None:
        values.setdefault("img_size", model.config.img_size)
    if data is not None and data != values.get("data"):
        values["data"], values["data_dir"] = data, None  # the recorded directory belongs to the recorded dataset
    if data_dir is not None:
        values["data_dir"] = data_dir
    if "data" not in values:
        raise UserError("the checkpoint records no training data; pass --data (and --data-dir)")
    return DataOptions.from_config(values)


def check_output_path(path: str, flag: str = "--out") -> None:
    """Refuse an output path that cannot be written, before any time is spent."""
    file = Path(path)
    if file.is_dir():
        raise UserError(f"{flag} {path!r} is a directory, not a file")
    if not file.parent.is_dir():
        raise UserError(f"{flag} {path!r}: directory {str(file.parent)!r} does not exist")
    if not os.access(file.parent, os.W_OK):
        raise UserError(f"{flag} {path!r}: directory {str(file.parent)!r} is not writable")
