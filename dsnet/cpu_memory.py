"""Keep freed memory in the process: the allocator setting that makes CPU training steps cheap.

PyTorch on CPU allocates every activation and gradient with the C library's `malloc`. glibc serves blocks above its
mmap threshold with fresh `mmap` calls and returns freed memory to the operating system, so a training step that
allocates the same large tensors every time pays page faults to zero them again, step after step: on the 2-core
machine of the README's performance section half of a stage-I step was kernel time. Telling glibc never to use
`mmap` for a block and never to trim its heap lets the next step reuse the memory the last one freed. The price is
that the process keeps its peak memory until it exits, which is what a training process does anyway.

The same setting, for any process: `GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647`.
jemalloc or tcmalloc through `LD_PRELOAD` do the same job where installed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1
_GLIBC_DEFAULT_MMAP_MAX, _GLIBC_DEFAULT_TRIM_THRESHOLD = 65536, 128 * 1024


def _mallopt():
    """glibc's `mallopt(param, value)`, or None on other platforms or C libraries."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def _set(mmap_max: int, trim_threshold: int) -> bool:
    mallopt = _mallopt()
    # mallopt returns 1 on success.
    return mallopt is not None and mallopt(_M_MMAP_MAX, mmap_max) == 1 \
        and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (see the module docstring). Returns whether it applied:
    False on other platforms or C libraries, where nothing changes."""
    return _set(0, _INT_MAX)


def return_freed_memory() -> bool:
    """Undo `keep_freed_memory`: glibc's defaults again (what `bench/train_options.py --option freed-memory` compares
    against, and eval.py's --no-keep-freed-memory)."""
    return _set(_GLIBC_DEFAULT_MMAP_MAX, _GLIBC_DEFAULT_TRIM_THRESHOLD)
