"""The mount's kernel read-ahead window (``/sys/class/bdi/MAJ:MIN/read_ahead_kb``).

Why: the kernel splits a buffered read of a FUSE file into requests no larger than its
read-ahead window, 128 KiB by default, and FUSE's INIT can only lower that window, never
raise it. Every request is a round trip through the daemon's event loop, a ``pread`` and
a block check. Measured on a 16 MB file served from the cache (``docs/performance.md``):
128 requests of 128 KiB cost the daemon 30-37 ms of CPU; 16 requests of 1 MiB, 25-26 ms,
and the reader saw 25-45 % more throughput. Each FUSE mount has a backing device of its
own, so the setting touches this mount only. Writing it needs root; without, the
kernel's window stays and the mount works as before.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

SYSFS = Path("/sys/class/bdi")


def mount_device(mountpoint: Path | str, mountinfo: Path = Path("/proc/self/mountinfo")
                 ) -> str | None:
    """``MAJ:MIN`` of the filesystem mounted on ``mountpoint`` (the last mount there),
    read from mountinfo: a ``stat`` would be a FUSE request to ourselves."""
    want = os.path.realpath(mountpoint)
    found = None
    try:
        text = mountinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 4 and _unescape(fields[4]) == want:
            found = fields[2]
    return found


def _unescape(path: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(code, ch)
    return path


def apply(mountpoint: Path | str, size: int, sysfs: Path = SYSFS) -> int | None:
    """Set the mount's read-ahead window to ``size`` bytes (0: leave the kernel's); the
    window in effect afterwards, in bytes, or None when it cannot be read."""
    dev = mount_device(mountpoint)
    if dev is None:
        log.debug("read-ahead: no mount found on %s", mountpoint)
        return None
    knob = sysfs / dev / "read_ahead_kb"
    if size > 0:
        try:
            knob.write_text(f"{max(4, size >> 10)}\n")
        except OSError as exc:
            log.info("read-ahead: cannot set %s to %d KiB (%s): the kernel's window "
                     "stays (needs root)", knob, size >> 10, exc.strerror or exc)
    try:
        return int(knob.read_text().strip()) << 10
    except (OSError, ValueError):
        return None
