"""Give freed heap memory back to the system, every few seconds.

The daemon's own objects stay few (a 100,000-file copy keeps ~4,000 tracked Python
objects), yet glibc's heaps fragment under the churn of listings, uploads and worker
threads, and never shrink on their own: measured, RSS grew ~3 KB per file created and
stayed. ``malloc_trim(0)`` hands the free pages back (1-4 ms, in a worker thread, so the
event loop never waits on it): the same 12,000-file copy ended at 96 MB instead of 112.
A no-op where the C library has no ``malloc_trim`` (musl, macOS).

Trimming reaches only glibc's heaps. Python's own small-object allocator keeps 1 MiB
arenas that go back only when wholly empty, and the daemon's churn (a request's
garbage around a few long-lived objects) leaves them sparse: measured on the embedded
store, 10,000 rewrites of ten files grew RSS 8 MB with no more objects alive. So the
daemon runs with ``PYTHONMALLOC=malloc MALLOC_ARENA_MAX=2`` (:func:`use_c_allocator`):
every object in glibc's heaps, where a trim returns any free page. 20,000 files
created: RSS +26 MB instead of +41 MB.

And the daemon pins glibc's mmap threshold at 128 KiB (:func:`fix_mmap_threshold`). By
default the threshold follows the largest block freed (up to 32 MiB), so after the first
large buffer every response body, listing page and read chunk is carved from the heap,
where it leaves holes the next small objects pin. Pinned, blocks of 128 KiB and more
are mapped and unmapped on their own. Measured over 20,000 files created through a mount
on S3: heap 81 MB instead of 135 for the same 65 MB in use, peak RSS 104 MB instead of
121, and 91 instead of 110 at rest; over 100,000 (the scale benchmark), 144 instead of
162. Pinned at 2 MiB (so 1 MiB chunks stay in the heap) with an 8 MiB trim threshold:
108 over 20,000. The price of 128 KiB: a loop that allocates a fresh 1 MiB ``bytes``
per chunk maps and faults it in every time (257 page faults; hashing 16 MB took 16-21
ms instead of 12-13), so the hot loops read into one reused buffer instead
(``codec.sha256_file``, ``cache.digest_file``, the decode's reader).
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
from typing import Any, Callable


log = logging.getLogger(__name__)

#: seconds between trims: one costs 1-4 ms in a worker thread; between two, churn faults
#: freed pages back in (20,000 creates: peak 101 MB with 2 s, 104 with 10 s)
INTERVAL = 3.0

#: glibc's default threshold, pinned (see the module docstring)
MMAP_THRESHOLD = 128 << 10
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from malloc.h

#: the threshold this process pinned, or None (``deltafs status`` shows it under memory)
pinned: int | None = None


def _libc_function(symbol: str) -> Any:
    """A function of the C library this process runs on (its own namespace: no
    ``ldconfig`` lookup), or None where there is none by that name."""
    try:
        return getattr(ctypes.CDLL(None), symbol)
    except (OSError, AttributeError):
        return None


def fix_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold (see the module docstring). False where the C library
    has no ``mallopt`` or refuses."""
    fn = _libc_function("mallopt")
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    global pinned
    ok = bool(fn(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    if ok:
        pinned = MMAP_THRESHOLD
    else:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused: the threshold stays dynamic")
    return ok


def _trimmer() -> Callable[[int], int] | None:
    fn = _libc_function("malloc_trim")
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


async def run() -> None:
    """Trim every ``INTERVAL`` seconds until cancelled (run it in the mount's nursery)."""
    trim = _trimmer()
    if trim is None:
        log.debug("no malloc_trim in this C library: heap pages are not trimmed")
        return
    while True:
        await _trio().sleep(INTERVAL)
        await _trio().to_thread.run_sync(trim, 0)


#: what ``sys.argv[0]`` is when this process is the ``deltafs`` or ``mount.deltafs``
#: program (console scripts, ``python -m deltafs.cli`` / ``deltafs.mounthelper``)
_OURS = ("deltafs", "mount.deltafs", "cli.py", "entry.py", "mounthelper.py")


def _trio() -> Any:
    """trio, imported when the trim loop first runs: this module is imported by the
    ``deltafs`` program before it runs itself again (:func:`use_c_allocator`), and
    that must not load trio twice."""
    import trio

    return trio


def use_c_allocator() -> None:
    """Run this program again (``execve``: same process, same command line) with
    ``PYTHONMALLOC=malloc`` (and ``MALLOC_ARENA_MAX=2`` unless set). Called first thing
    by the ``deltafs mount`` and ``mount.deltafs`` entry points, only when they run as
    the program (never when called in-process). Not when the allocator was chosen
    already (any ``PYTHONMALLOC``; ``DELTAFS_PYMALLOC=1`` keeps Python's)."""
    if os.environ.get("PYTHONMALLOC") or os.environ.get("DELTAFS_PYMALLOC"):
        return
    argv = list(getattr(sys, "orig_argv", []))
    if not argv or os.path.basename(sys.argv[0]) not in _OURS:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    env = dict(os.environ, PYTHONMALLOC="malloc")
    # two heaps, not 8 per core: a worker thread's garbage is reused by the next one
    # instead of lying in its own heap until the trim (seen: 177 MB between two trims
    # at 50,000 files with 16 heaps, 106 MB after)
    env.setdefault("MALLOC_ARENA_MAX", "2")
    script = sys.argv[0]
    try:
        if not script.endswith(".py") and os.access(script, os.X_OK):
            # the console script itself: the process keeps its name (ps, top, pgrep)
            os.execve(script, [script, *sys.argv[1:]], env)
        os.execve(sys.executable, argv, env)
    except OSError as exc:  # keep going with Python's allocator
        log.debug("cannot run again with the C allocator: %s", exc)
