"""keep_freed_memory: glibc's malloc stops serving large blocks with mmap, so a freed block stays for reuse."""
import subprocess
import sys

import pytest

SCRIPT = """
import ctypes
import torch
from dsnet.cpu_memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mapped_mb_while_held():
    before = libc.mallinfo2().hblkhd  # bytes in blocks served by mmap
    x = torch.ones(64 * 2**20)  # 256 MiB
    held = libc.mallinfo2().hblkhd - before
    del x
    return round(held / 2**20)

default = mapped_mb_while_held()
applied = keep_freed_memory()
print(applied, default, mapped_mb_while_held())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_large_blocks_come_from_the_reusable_heap_after_the_call():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    if "mallinfo2" in result.stderr:
        pytest.skip("this C library has no mallinfo2")
    assert result.returncode == 0, result.stderr
    applied, default, kept = result.stdout.split()
    assert applied == "True"
    assert int(default) >= 256  # glibc's default: a block this large is an mmap, unmapped (and lost) on free
    assert int(kept) == 0  # after the call: from the heap, which keeps it when freed
