"""A run's output directory: the check that it holds no other run, the lock of the run writing it, and its
`summary.csv`."""
from __future__ import annotations

import contextlib
import csv
import io
import os
import socket
from pathlib import Path
from typing import Any, Iterator

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


LOCK = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True


@contextlib.contextmanager
def run_lock(output: Path) -> Iterator[None]:
    """Hold `output/.lock` while a run writes the folder: a second run started on it meanwhile is refused. A lock
    whose process is gone (same host) is taken over; one held from another host is left to the user."""
    lock = output / LOCK
    owner = f"{socket.gethostname()} {os.getpid()}"
    for _attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                host, _, pid = lock.read_text().strip().partition(" ")
            except FileNotFoundError:  # released between the two calls
                continue
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                lock.unlink(missing_ok=True)  # stale: its run was killed
                continue
            raise UserError(f"output directory {str(output)!r} is in use by another run (process {pid} on {host}); "
                            f"if that run is gone, remove {lock}") from None
        with os.fdopen(fd, "w") as f:
            f.write(owner)
        break
    else:  # taken over twice and lost twice: another run is starting on it right now
        raise UserError(f"output directory {str(output)!r} is in use by another run starting now")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if lock.read_text() == owner:
                lock.unlink()


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
