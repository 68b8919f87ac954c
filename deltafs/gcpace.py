"""Garbage collection paced by the event loop, on the loop's thread.

Why: CPython collects in whichever thread's allocation crosses the threshold, holding
the GIL for the whole collection. In the 100,000-file benchmark full collections in
worker threads took 86-111 ms over a heap of 22-33k tracked objects, which takes a few
ms to scan: the collecting thread was waiting for a core with the GIL held, and the loop
waited for the GIL all that time (docs/performance.md, run 9).

So the daemon raises the automatic threshold far out of the way (it stays as a net for
an allocation burst) and collects from the loop every :data:`PERIOD` instead, with the
standard policy's proportions: the youngest generation once :data:`YOUNG` objects
wait, the middle one every 10th time, all every 10th of those. The loop's thread runs
at a better nice value (priority.py), so a collection there is not left holding the
GIL without a core, and the stall probe sees its true cost.
"""
from __future__ import annotations

import gc
import logging
import time

import trio

log = logging.getLogger(__name__)

#: seconds between checks
PERIOD = 0.25
#: objects allocated (net) since the last collection before the youngest is collected
#: (CPython's own threshold)
YOUNG = 700
#: the automatic threshold left in place: a net for a burst between two checks
#: (~100 KB-10 MB of objects); automatic collections still happen past it
AUTO_THRESHOLD = 50_000
#: younger collections per older one (CPython's proportions)
EVERY = 10


class GcPace:
    def __init__(self) -> None:
        #: collections run here, by generation
        self.runs = [0, 0, 0]
        self.worst_ms = 0.0
        self._young = 0
        self._middle = 0

    def install(self) -> None:
        """Move the automatic collection out of the way (keeping the net)."""
        _, middle, old = gc.get_threshold()
        gc.set_threshold(AUTO_THRESHOLD, middle, old)

    def tick(self) -> int | None:
        """One check: the generation collected, or None."""
        if gc.get_count()[0] < YOUNG:
            return None
        self._young += 1
        gen = 0
        if self._young >= EVERY:
            self._young = 0
            self._middle += 1
            gen = 1
            if self._middle >= EVERY:
                self._middle = 0
                gen = 2
        t0 = time.perf_counter()
        gc.collect(gen)
        took = (time.perf_counter() - t0) * 1000.0
        self.runs[gen] += 1
        self.worst_ms = max(self.worst_ms, took)
        return gen

    async def run(self) -> None:
        self.install()
        try:
            while True:
                await trio.sleep(PERIOD)
                self.tick()
        finally:
            gc.set_threshold(YOUNG, EVERY, EVERY)
