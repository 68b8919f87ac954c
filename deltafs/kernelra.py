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


def apply(mountpoint: Path | str, size: int, sysfs: Path = SYSFS) -> int | None:
    """Raise the mount's read-ahead window to ``size`` bytes (0: leave the kernel's; a
    window already larger, set by a udev rule or by hand, is kept); the window in
    effect afterwards, in bytes, or None when it cannot be read. Never raises: the
    window is a speed setting, not worth a mount.

    Blocking, and a FUSE request to this daemon (the ``stat`` of the mountpoint, which
    names the device the kernel routes to exactly): run it in a worker thread once the
    mount answers."""
    try:
        dev = os.stat(mountpoint).st_dev
        knob = sysfs / f"{os.major(dev)}:{os.minor(dev)}" / "read_ahead_kb"
        now = _read(knob)
        want = max(4, size >> 10)
        if size > 0 and (now is None or now < want):
            try:
                knob.write_text(f"{want}\n")
            except OSError as exc:
                log.info("read-ahead: cannot set %s to %d KiB (%s): the kernel's window "
                         "stays (needs root)", knob, want, exc.strerror or exc)
            now = _read(knob)
        return None if now is None else now << 10
    except Exception as exc:  # noqa: BLE001 - a speed setting never stops a mount
        log.info("read-ahead: the window of %s is unknown: %s", mountpoint, exc)
        return None


def _read(knob: Path) -> int | None:
    try:
        return int(knob.read_text().strip())
    except (OSError, ValueError):
        return None
