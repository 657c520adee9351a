"""A run's output directory: the check that it holds no other run, and its `summary.csv`."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from .errors import UserError
from .files import write_text_atomic

RUN_FILES = ("args.yaml", "last.pth", "summary.csv")


def check_output_dir(output: Path, resuming: bool, overwrite: bool) -> None:
    holds_run = output.is_dir() and any((output / f).exists() for f in RUN_FILES)
    if holds_run and not (resuming or overwrite):
        raise UserError(f"output directory {str(output)!r} holds another run; use --resume "
                        f"{output / 'last.pth'} to continue it or --overwrite to replace it")
    if output.exists() and not output.is_dir():
        raise UserError(f"output path {str(output)!r} exists and is not a directory")


def write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    """One row per epoch; the columns are every key any row holds, in the order they first appear."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())
