"""The daemon's allocator settings (memtrim.py), checked in a fresh interpreter each:
they change process-wide state. glibc only (``mallinfo2``: 2.33 and later)."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from deltafs import memtrim

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                                reason="the settings are glibc's (a no-op elsewhere)")

_PRELUDE = r"""
import ctypes, resource, sys
from deltafs import memtrim
class MallInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
if sys.argv[1] == "pinned":
    assert memtrim.fix_mmap_threshold()
"""

# Frees a 16 MiB block (glibc maps it, and by default raises its mmap threshold to 16 MiB
# on the free), then allocates a 4 MiB block (over the pinned threshold, under the raised
# one) and reports whether it was mapped too (``hblks`` counts the mapped blocks). A
# block only just over the threshold is no probe: glibc maps a block only when no free
# chunk of the heap can hold it, and what the imports left free decides that (a 132 KiB
# and then a 1 MiB block came from the heap once the package's imports left 2.2 MB free
# in pieces; none is 4 MiB).
_LARGE = _PRELUDE + r"""
libc.free(libc.malloc(16 << 20))
before = libc.mallinfo2().hblks
p = libc.malloc(4 << 20)
print("mapped" if libc.mallinfo2().hblks == before + 1 else "heap")
libc.free(p)
"""

# The daemon's hashing loops over a 16 MiB file, five times each, after one warm-up:
# prints the page faults they cost (a fresh 1 MiB block per chunk would be mapped, and
# its 256 pages faulted in, every time: ~4,100 per pass).
_LOOP = _PRELUDE + r"""
import os, tempfile
from pathlib import Path
from deltafs import cache, codec
path = Path(tempfile.mkdtemp()) / "f"
path.write_bytes(os.urandom(16 << 20))
codec.sha256_file(path); cache.digest_file(path)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    codec.sha256_file(path); cache.digest_file(path)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
path.unlink(); path.parent.rmdir()
"""


def _probe(script: str, mode: str) -> str:
    try:
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True,
                             text=True, check=True, timeout=60)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"probe failed: {exc.stderr}")
    return out.stdout.strip()


def test_pinned_mmap_threshold_keeps_large_blocks_off_the_heap() -> None:
    """Pinned, a block over the threshold is mapped even after a 16 MiB one was freed;
    left to glibc, the same block comes from the heap (so the probe shows the difference
    it tests)."""
    assert _probe(_LARGE, "dynamic") == "heap"
    assert _probe(_LARGE, "pinned") == "mapped"


def test_the_hashing_loops_reuse_their_buffer_under_the_pinned_threshold() -> None:
    """Blocks over the threshold are mapped afresh each time, so the hot loops read into
    one buffer: ten passes over 16 MiB fault in one buffer each (257 pages; 2,570 in
    all), not a ``bytes`` per 1 MiB chunk (~41,000)."""
    assert int(_probe(_LOOP, "pinned")) < 4000


def test_the_program_chooses_its_allocator_before_loading_boto3() -> None:
    """``deltafs mount`` runs itself again with the C allocator (``entry.py``); what it
    imports before that ``execve`` is thrown away, so it must stay light: importing the
    package, the entry point and memtrim loads neither boto3, trio nor the CLI (they
    cost ~0.35 s per mount when loaded twice)."""
    code = ("import sys; import deltafs, deltafs.entry, deltafs.memtrim; "
            "heavy = sorted(m for m in ('boto3', 'botocore', 'trio', 'pyfuse3', "
            "'deltafs.cli', 'deltafs.api', 'deltafs.engine') if m in sys.modules); "
            "print(heavy); "
            "from deltafs import DeltaService; assert DeltaService.__name__ == 'DeltaService'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", res.stdout
