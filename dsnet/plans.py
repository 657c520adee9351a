"""Width-plan files: per-group channel counts as JSON or YAML, written by search and pruning, read everywhere."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .files import write_text_atomic
from .supernet import SlimNetwork
from .widths import WidthPlan


def read_plan_file(path: str | os.PathLike) -> dict[str, int]:
    """Read `{"group": channels, ...}` from JSON or YAML; a file holding `{"plan": {...}, ...}` works too."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"plan file {str(path)!r} does not exist")
    try:
        data: Any = yaml.safe_load(file.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as exc:
        raise UserError(f"plan file {str(path)!r} is not valid JSON or YAML: {str(exc).splitlines()[0]}") from None
    if isinstance(data, dict) and isinstance(data.get("plan"), dict):
        data = data["plan"]
    if not isinstance(data, dict):
        raise UserError(f"plan file {str(path)!r} must map layer group names to channel counts")
    return data


def load_plan(model: SlimNetwork, path: str | os.PathLike) -> WidthPlan:
    """Read a plan file and validate it against `model` (UserError naming the layer and allowed values)."""
    try:
        return model.resolve_width(read_plan_file(path))
    except ValueError as exc:
        raise UserError(f"plan file {str(path)!r}: {exc}") from None


def write_plan_file(path: str | os.PathLike, plan: WidthPlan, **extra: Any) -> None:
    """Write `{"plan": {...}, **extra}` as JSON, atomically."""
    write_text_atomic(path, json.dumps({"plan": plan.as_dict(), **extra}, indent=2) + "\n")
