"""How many S3 requests may be inside botocore at once, across every thread of the
process: the one knob that bounds how much Python the worker threads run together.

Each botocore request costs ~3.4 ms of pure Python (signing, serialising, parsing) and
holds the GIL for it. The trio loop gives the GIL up at every SQLite statement and
syscall, and then waits for it behind every worker thread that wants it: with 16 threads
each running 3.4 ms of Python per 9 ms round trip (a HEAD per file against a local S3),
a loop step of 3 statements came back up to 194 ms late; with 4 such threads, 15 ms
(a simulation of exactly that, issue 11). The gate lets the daemon lower the number
while its loop lags (:mod:`deltafs.gatecontrol`) and raise it again when it does not.

The gate spans one API call (``_make_api_call``: retries included), never a composite
operation, so a holder only ever waits for the network: no lock of ours is taken
inside it, and no gate holder waits for another (no deadlock).
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)


class RequestGate:
    """A semaphore whose size may be changed at any time, from any thread. Waiting
    threads block on a lock (the GIL released); they are woken oldest first."""

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
        """``call`` run inside the gate."""
        def gated(*args: Any, **kw: Any) -> Any:
            with self:
                return call(*args, **kw)
        return gated
