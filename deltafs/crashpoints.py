"""Named crash points for the crash tests (test-only switch, off unless asked for).

``DELTAFS_CRASH_AT=<step>[:<n>]`` in the daemon's environment ends the process at the
n-th (default first) pass through ``<step>``, as a power cut would: no cleanup, no flush
of anything but the log. Every step named in the code has a test in
``tests/test_crash.py``; the list is :data:`STEPS`.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

#: every crash point in the code, in the order a file's life passes them
STEPS = (
    "create", "write", "stage-before-hash", "stage-before-commit", "stage-after-commit",
    "upload-before-put", "chain-after-blob", "chain-after-pointer", "upload-after-put",
    "publish-before-commit",
    "publish-after-commit", "adopt", "rename-before-commit", "rename-after-commit",
    "move-after-copy", "move-before-publish", "unlink-before-commit",
    "unlink-after-commit", "tombstone-after-delete",
)


def crash_point(name: str) -> None:
    """Test-only: ``DELTAFS_CRASH_AT=<name>[:<n>]`` ends the process at the n-th (default
    first) pass through the named step, as a power cut would (no cleanup, no flush)."""
    want = os.environ.get("DELTAFS_CRASH_AT")
    if not want:
        return
    step, _, count = want.partition(":")
    if step != name:
        return
    n = _crash_counts.get(name, 0) + 1
    _crash_counts[name] = n
    if n >= int(count or 1):
        log.critical("crash point %s reached: exiting now", name)
        for h in logging.getLogger().handlers:
            h.flush()
        os._exit(86)


_crash_counts: dict[str, int] = {}
