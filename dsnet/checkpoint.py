"""Checkpoint files: written atomically, read with clear errors, and enough to rebuild the supernet alone.

A checkpoint is a dict with at least ``model_config`` (the `SupernetConfig` as a dict), ``model`` (its state dict)
and optionally ``ema`` (the EMA model's state dict), ``config`` (the run's merged config) and training state.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .cli import UserError, atomic_path
from .mobilenetv2 import DSMobileNetV2, SupernetConfig

FORMAT = "dsnet-checkpoint"
VERSION = 1


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save `state` to `path` through a temporary file renamed into place."""
    state = {"format": FORMAT, "version": VERSION, **state}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a dsnet checkpoint; a missing, corrupt, truncated or foreign file raises `UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises many kinds for a damaged file
        raise UserError(f"checkpoint {str(path)!r} is corrupt or truncated ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{str(path)!r} is not a dsnet checkpoint")
    return state


def supernet_from_checkpoint(state: dict[str, Any], weights: str = "ema") -> DSMobileNetV2:
    """Rebuild the supernet a checkpoint holds, with its EMA weights (`ema`, when present) or live weights."""
    if weights not in ("ema", "model"):
        raise UserError(f"weights must be 'ema' or 'model', got {weights!r}")
    model = DSMobileNetV2(SupernetConfig.from_dict(state["model_config"]))
    source = state.get("ema") if weights == "ema" and state.get("ema") is not None else state["model"]
    try:
        model.load_state_dict(source, strict=True)
    except RuntimeError as exc:
        raise UserError(f"checkpoint weights do not fit its recorded architecture: {str(exc).splitlines()[0]}")
    return model.eval()


def load_supernet(path: str | os.PathLike, weights: str = "ema") -> DSMobileNetV2:
    return supernet_from_checkpoint(load_checkpoint(path), weights)
