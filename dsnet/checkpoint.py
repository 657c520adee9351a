"""Checkpoint files: written atomically, read with clear errors, and enough to rebuild the network alone.

A checkpoint is a dict with at least ``model_config`` (the supernet's config as a dict, `arch` naming its architecture), ``model`` (its state dict)
and optionally ``ema`` (the EMA model's state dict), ``config`` (the run's merged config) and training state.
A stage-II checkpoint also has ``gate`` (the `GateConfig` as a dict); its state dicts are the gated network's, whose
supernet part is under ``supernet.``.

Checkpoints hold tensors, numbers, strings, lists and dicts only, and are read with ``weights_only=True``: a file
whose pickle would build any other object (and so could run code) is refused before anything in it runs. Version 1
files, whose random-number state held a NumPy array, are read with NumPy's array type allowed as well, and upgraded
in memory; the next checkpoint a resumed run writes is a version-2 file.
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .archs import create_model
from .errors import UserError
from .files import atomic_path
from .gate import GatedDSNet, GateConfig
from .rng import upgrade_version_1_rng
from .supernet import SlimNetwork

FORMAT = "dsnet-checkpoint"
VERSION = 2


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save `state` to `path` through a temporary file renamed into place."""
    state = {"format": FORMAT, "version": VERSION, **state}
    # Serialised in memory, then written by Python: torch.save's own file writer reports a full disk as an opaque
    # RuntimeError, a Python write as the OSError it is.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a dsnet checkpoint; a missing, corrupt, truncated or foreign file raises `UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    try:
        # weights_only: tensors, numbers, strings and containers only; a pickle that would run code is refused
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        state = _load_version_1(path, map_location, exc)
    except Exception as exc:  # torch raises many kinds for a damaged file
        raise UserError(f"checkpoint {str(path)!r} is corrupt or truncated ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{str(path)!r} is not a dsnet checkpoint")
    if state.get("version") == 1:
        state = {**state, "version": VERSION, "rng": upgrade_version_1_rng(state.get("rng"))}
    return state


# A uint32 NumPy array, as version 1 stored NumPy's random state: the pickle's names under NumPy 2 and NumPy 1.
_RECONSTRUCT = np.array(0).__reduce__()[0]
_NUMPY_ARRAY = [(_RECONSTRUCT, "numpy._core.multiarray._reconstruct"),
                (_RECONSTRUCT, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype, type(np.dtype(np.uint32))]
_NUMPY_ARRAY_NAMES = {o[1] if isinstance(o, tuple) else f"{o.__module__}.{o.__qualname__}" for o in _NUMPY_ARRAY}


def _load_version_1(path: Path, map_location, refusal: pickle.UnpicklingError) -> dict[str, Any]:
    """A file the weights-only load refused: read it only if NumPy's array type is all it needs beyond that."""
    try:
        needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))  # reads the names, runs nothing
    except Exception:  # noqa: BLE001 - not a readable torch file: report the refusal
        needed = {"?"}
    if not needed <= _NUMPY_ARRAY_NAMES:
        raise UserError(f"checkpoint {str(path)!r} holds objects other than tensors, numbers and strings "
                        f"({_first_line(refusal)}), and loading it could run code: refused") from None
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAY):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"checkpoint {str(path)!r} is corrupt or truncated ({type(exc).__name__})") from None


def _first_line(exc: Exception) -> str:
    """The refused global of a weights-only load, without torch's advice to allow it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    line = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")
    return line.split(" was not an allowed")[0].split(" whose module")[0].split("Unsupported global: ")[-1]


def _weights(state: dict[str, Any], weights: str) -> dict[str, torch.Tensor]:
    if weights not in ("ema", "model"):
        raise UserError(f"weights must be 'ema' or 'model', got {weights!r}")
    if not isinstance(state.get("model"), dict):
        raise UserError("the checkpoint holds no model weights")
    return state.get("ema") if weights == "ema" and state.get("ema") is not None else state["model"]


def _load(network: torch.nn.Module, source: dict[str, torch.Tensor]) -> None:
    """Load strictly, or UserError naming the first tensor that does not fit."""
    try:
        result = network.load_state_dict(source, strict=False)
    except RuntimeError as exc:  # a shape mismatch: torch names each on a line of its own
        lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise UserError("checkpoint weights do not fit its recorded architecture: "
                        + (lines[0] if lines else str(exc).splitlines()[0])) from None
    problems = [f"{len(keys)} {kind} (first: {keys[0]!r})"
                for kind, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)) if keys]
    if problems:
        raise UserError(f"checkpoint weights do not fit its recorded architecture: {', '.join(problems)}")


def _supernet(state: dict[str, Any]) -> SlimNetwork:
    if not isinstance(state.get("model_config"), dict):
        raise UserError("the checkpoint records no supernet configuration ('model_config')")
    try:
        return create_model(state["model_config"])
    except (TypeError, ValueError) as exc:
        raise UserError(f"checkpoint records an invalid supernet: {exc}") from None


def supernet_from_checkpoint(state: dict[str, Any], weights: str = "ema") -> SlimNetwork:
    """Rebuild the supernet a checkpoint holds, with its EMA weights (`ema`, when present) or live weights.

    Of a stage-II checkpoint this is the gated network's supernet, without the gate.
    """
    source = _weights(state, weights)
    if state.get("gate") is not None:
        prefix = "supernet."
        source = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
    model = _supernet(state)
    _load(model, source)
    return model.eval()


def gated_network_from_checkpoint(state: dict[str, Any], weights: str = "ema") -> GatedDSNet:
    """Rebuild the gated network of a stage-II checkpoint (UserError when the checkpoint has no gate)."""
    if state.get("gate") is None:
        raise UserError("the checkpoint has no gate; train one with python train.py --stage gate")
    try:
        network = GatedDSNet(_supernet(state), GateConfig.from_dict(state["gate"]))
    except (TypeError, ValueError) as exc:
        raise UserError(f"checkpoint records an invalid gate: {exc}") from None
    _load(network, _weights(state, weights))
    return network.eval()


def network_from_checkpoint(state: dict[str, Any], weights: str = "ema") -> SlimNetwork | GatedDSNet:
    """The network a checkpoint holds: the gated network when it has a gate, else the supernet."""
    if state.get("gate") is not None:
        return gated_network_from_checkpoint(state, weights)
    return supernet_from_checkpoint(state, weights)


def load_supernet(path: str | os.PathLike, weights: str = "ema") -> SlimNetwork:
    return supernet_from_checkpoint(load_checkpoint(path), weights)


def load_network(path: str | os.PathLike, weights: str = "ema") -> SlimNetwork | GatedDSNet:
    """Read a checkpoint file and rebuild its network: gated (stage II) or a supernet (stage I)."""
    return network_from_checkpoint(load_checkpoint(path), weights)
