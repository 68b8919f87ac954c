"""How late the trio loop runs a timer: the one number that shows whether anything
blocks the event loop (a long query, a big merge, a synchronous syscall on the loop).

A task sleeps ``INTERVAL`` over and over; each wake-up later than asked is a stall of
that many milliseconds. ``deltafs status`` shows the worst since mount and the worst of
the last ``WINDOW`` seconds (what the scale benchmark samples step by step).
"""
from __future__ import annotations

import collections
import logging
import time

import trio

log = logging.getLogger(__name__)

INTERVAL = 0.010
WINDOW = 10.0
#: a stall this long is logged (with the time, to be matched with other log lines)
LOG_ABOVE_MS = 250.0


class LoopStall:
    """The loop-lag probe: run :meth:`run` in the mount's nursery."""

    def __init__(self) -> None:
        self.max_ms = 0.0
        self._recent: collections.deque[tuple[float, float]] = collections.deque()

    async def run(self) -> None:
        while True:
            t0 = time.monotonic()
            await trio.sleep(INTERVAL)
            now = time.monotonic()
            self.note((now - t0 - INTERVAL) * 1000.0, now)

    def note(self, late_ms: float, now: float) -> None:
        late_ms = max(0.0, late_ms)
        if late_ms > self.max_ms:
            self.max_ms = late_ms
        if late_ms >= LOG_ABOVE_MS:
            log.warning("the event loop stalled for %.0f ms", late_ms)
        # keep a decreasing run of (time, stall): the head is the window's maximum
        while self._recent and self._recent[-1][1] <= late_ms:
            self._recent.pop()
        self._recent.append((now, late_ms))
        while self._recent and self._recent[0][0] < now - WINDOW:
            self._recent.popleft()

    def recent_ms(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self._recent and self._recent[0][0] < now - WINDOW:
            self._recent.popleft()
        return self._recent[0][1] if self._recent else 0.0
