"""How many S3 requests may be inside botocore at once, across every thread of the
process: the one knob that bounds how much Python the worker threads run together.

Each botocore request costs ~3.4 ms of pure Python (signing, serialising, parsing) and
holds the GIL for it. The trio loop gives the GIL up at every SQLite statement and
syscall, and then waits for it behind every worker thread that wants it: with 16 threads
each running 3.4 ms of Python per 9 ms round trip (a HEAD per file against a local S3),
a loop step of 3 statements came back up to 194 ms late; with 4 such threads, 15 ms
(a simulation of exactly that, issue 11). The gate lets the daemon lower the number
while its loop lags (:mod:`deltafs.gatecontrol`) and raise it again when it does not.

The gate spans one API call (``_make_api_call``: botocore's retries and their back-off
included), never a composite operation of ours, and no lock of ours is taken inside it.
botocore itself may call the client again from inside a call (an S3 Express session is
created from a ``before-sign`` hook, under a credentials lock other holders wait for; a
region redirect HEADs the bucket): a thread that already holds a place goes straight
through, so a holder never waits for the gate (review: with a plain semaphore, two such
calls at a limit of 2 stopped every S3 request for good).

Trade-offs, while the gate is narrowed: a read (the GET of an ``open``) queues with the
uploads, and a holder keeps its place through botocore's back-off. It only narrows while
the loop lags for want of the GIL or a core, which an outage does not cause.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)


class RequestGate:
    """A semaphore whose size may be changed at any time, from any thread, and that a
    thread holding a place enters again freely. Waiting threads block on a lock (the
    GIL released); a place that frees wakes the oldest, though a newcomer may take it
    first."""

    def __init__(self, limit: int) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._limit = max(1, limit)
        self.ceiling = self._limit
        self._busy = 0
        self._waiting = 0
        #: the most callers inside or waiting at once since :meth:`take_peak`
        self._peak = 0
        #: requests that had to wait for a slot (the gate's effect, for the status)
        self.waited = 0
        #: per thread: how deep in the gate it is (0 or absent: outside)
        self._depth = threading.local()

    @property
    def limit(self) -> int:
        return self._limit

    @limit.setter
    def limit(self, value: int) -> None:
        with self._cond:
            self._limit = max(1, min(self.ceiling, int(value)))
            self._cond.notify_all()

    @property
    def busy(self) -> int:
        return self._busy

    def take_peak(self) -> int:
        """The most callers inside or waiting at once since the last call (the demand
        a narrowing starts from)."""
        with self._cond:
            peak, self._peak = self._peak, self._busy + self._waiting
        return peak

    def __enter__(self) -> "RequestGate":
        with self._cond:
            if self._busy >= self._limit:
                self.waited += 1
                self._waiting += 1
                self._peak = max(self._peak, self._busy + self._waiting)
                try:
                    while self._busy >= self._limit:
                        self._cond.wait()
                finally:
                    self._waiting -= 1
            self._busy += 1
            self._peak = max(self._peak, self._busy + self._waiting)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._busy -= 1
            self._cond.notify()

    def wrap(self, call: Callable[..., Any]) -> Callable[..., Any]:
        """``call`` run inside the gate (straight through when this thread already is)."""
        depth = self._depth

        def gated(*args: Any, **kw: Any) -> Any:
            inside = getattr(depth, "n", 0)
            if inside:
                depth.n = inside + 1
                try:
                    return call(*args, **kw)
                finally:
                    depth.n = inside
            with self:
                depth.n = 1
                try:
                    return call(*args, **kw)
                finally:
                    depth.n = 0
        return gated
