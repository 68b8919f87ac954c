"""A higher CPU priority for the event loop's thread, and only for it.

Why: on a busy machine (a copy, the daemon's workers and, in the benchmark, a local S3
all wanting the 2 cores) the loop's thread was measured waiting 45-96 ms for a core in
one step (schedstat; docs/performance.md, run 9). The loop uses about a quarter of a
core, so a better nice value for its thread alone costs the others little, whereas
lowering everyone else would slow the uploads and the user's own processes.

Linux keeps a nice value per thread, and a new thread (or child process) starts with
its creator's. The loop creates the worker threads, so each new Python thread puts
itself back to the base value before running anything (a one-shot
:func:`threading.setprofile` hook); child processes are started from worker threads
(trio's ``open_process`` and the codec), so they start at the base too.

A lower nice value needs root, CAP_SYS_NICE or room under RLIMIT_NICE; without it
nothing changes (logged once). The base value is the one the daemon started with: a
later ``renice`` of the daemon's PID changes only the loop's thread (Linux renices one
thread by its id), so renice every thread in /proc/PID/task instead.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

log = logging.getLogger(__name__)

#: nice steps the loop's thread gains over the process (CFS weight ×3.0 at 5)
BOOST = 5


def _thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def _set_thread_nice(value: int) -> None:
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), value)


#: the calling thread's nice value before :func:`raise_this_thread` (see :func:`restore`)
_base: int | None = None


def raise_this_thread(by: int = BOOST) -> int | None:
    """Lower the calling thread's nice value by ``by``; threads started after this go
    back to the old value. Returns the new nice value, or None when nothing changed
    (not Linux, where a thread id is not what setpriority takes; not permitted; already
    at -20)."""
    global _base
    if sys.platform != "linux" or by <= 0:
        return None
    base = _thread_nice()
    want = max(-20, base - by)
    if want == base:
        return None
    before = threading.getprofile()
    threading.setprofile(_back_to(base, before))
    try:
        _set_thread_nice(want)
    except OSError as exc:  # EPERM/EACCES: not root, no CAP_SYS_NICE, no RLIMIT_NICE room
        threading.setprofile(before)  # type: ignore[arg-type]
        log.info("the event loop's thread keeps nice %d (%s); a busy machine may delay "
                 "its steps (TROUBLESHOOTING.md, max_loop_stall_ms)", base, exc.strerror)
        return None
    _base = base
    log.info("the event loop's thread runs at nice %d, the rest of the daemon at %d",
             want, base)
    return want


def restore() -> None:
    """Put the calling thread back where :func:`raise_this_thread` found it (after the
    loop: what the main thread starts then, such as libfuse's ``fusermount3`` at
    unmount, must not inherit the better value)."""
    global _base
    if _base is None:
        return
    try:
        _set_thread_nice(_base)
    except OSError:
        log.debug("could not put the loop thread's nice value back", exc_info=True)
    _base = None


def _back_to(base: int, before: Any) -> Any:
    """The one-shot hook: a new thread's first Python call sets its nice value back,
    then hands the thread to the hook that was there before (usually none)."""

    def hook(_frame: Any, _event: str, _arg: Any) -> None:
        sys.setprofile(before)
        try:
            _set_thread_nice(base)
        except OSError:  # raising one's nice value is always allowed; be safe anyway
            log.debug("could not reset a thread's nice value", exc_info=True)

    return hook
