"""The daemon's allocator settings (memtrim.py), checked in a fresh interpreter each:
they change process-wide state."""
from __future__ import annotations

import subprocess
import sys

import pytest

# Frees a 4 MiB block (glibc maps it, and by default raises its mmap threshold to 4 MiB
# on the free), then allocates 256 KiB and reports whether that block was mapped too:
# ``hblks`` counts the mapped blocks.
_PROBE = r"""
import ctypes, sys
from deltafs import memtrim
class MallInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "pinned":
    assert memtrim.fix_mmap_threshold()
libc.free(libc.malloc(4 << 20))
before = libc.mallinfo2().hblks
p = libc.malloc(256 << 10)
print("mapped" if libc.mallinfo2().hblks == before + 1 else "heap")
libc.free(p)
"""


def _probe(mode: str) -> str:
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True,
                             text=True, check=True, timeout=60)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"probe failed: {exc.stderr}")
    return out.stdout.strip()


def test_pinned_mmap_threshold_keeps_large_blocks_off_the_heap() -> None:
    """Pinned, a 256 KiB block is mapped even after a 4 MiB one was freed; left to glibc,
    the same block comes from the heap (so the probe shows the difference it tests)."""
    assert _probe("dynamic") == "heap"
    assert _probe("pinned") == "mapped"

