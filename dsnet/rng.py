"""Seeding and the random-number state a checkpoint saves, so that a resumed run draws what the straight one would."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_all(seed: int, rank: int = 0) -> None:
    """Weights from `seed` on every process; Python's and NumPy's streams differ per process."""
    torch.manual_seed(seed)
    random.seed(seed + rank)
    np.random.seed(seed + rank)


def capture_rng() -> dict[str, Any]:
    """Every generator's state as tensors, numbers and lists: what a checkpoint read with ``weights_only`` holds."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                       cached],
             "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def upgrade_version_1_rng(state: dict[str, Any] | None) -> dict[str, Any] | None:
    """A version-1 checkpoint's generator states (NumPy's and Python's own tuples) in the form `capture_rng` gives."""
    if not state:
        return state
    name, keys, pos, has_gauss, cached = state["numpy"]
    version, internal, gauss = state["python"]
    return {**state, "numpy": [name, torch.from_numpy(np.asarray(keys).astype(np.int64)), pos, has_gauss, cached],
            "python": [version, list(internal), gauss]}
