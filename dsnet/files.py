"""Files dsnet writes: each through a temporary file beside it, flushed to disk and renamed into place."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UserError


def _fsync(path: str | os.PathLike, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain_permissions(path: str | os.PathLike, mode: int) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is synced to disk and renamed onto `path`, on failure
    removed.

    Readers never see a half-written file, an existing file survives a failed write, and after a power loss the
    renamed file holds what was written (the file and then its directory are synced, as databases do).

    A write the system refuses (a full disk, a folder removed meanwhile, no permission) is a one-line `UserError`
    naming the file. A process killed mid-write leaves at most a hidden `.NAME.*.tmp` beside the file, which no
    later write or run reads.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"output directory {str(path.parent)!r} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UserError(f"could not write {str(path)!r}: {exc.strerror or exc}") from None
    os.close(fd)
    _plain_permissions(tmp, 0o666)  # what a plain open() would give, not mkstemp's private 0600
    try:
        yield Path(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent, directory=True)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise UserError(f"could not write {str(path)!r}: {exc.strerror or exc}") from None
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path` to fill; on success its files are synced and it is renamed onto
    `path` (which must not exist, or be an empty directory), on failure removed with what it holds."""
    import shutil

    path = Path(path)
    check_new_directory(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise UserError(f"could not write {str(path)!r}: {exc.strerror or exc}") from None
    _plain_permissions(tmp, 0o777)  # what a plain mkdir would give, not mkdtemp's private 0700
    try:
        yield tmp
        for file in tmp.iterdir():
            _fsync(file)
        _fsync(tmp, directory=True)
        os.replace(tmp, path)
        _fsync(path.parent, directory=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise UserError(f"could not write {str(path)!r}: {exc.strerror or exc}") from None
        raise


def check_new_directory(path: str | os.PathLike) -> None:
    """UserError unless `path` can become a new directory: its parent exists, and it does not, or is empty."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"output directory {str(path.parent)!r} does not exist")
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise UserError(f"{str(path)!r} exists and is not an empty directory")
