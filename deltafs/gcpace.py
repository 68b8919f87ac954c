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

Finalizers of cyclic garbage now run on the loop's thread: a ``__del__`` or a generator's
``finally`` caught in a cycle must not block (no joins, no waits for a lock a worker
holds). None does today.
"""
from __future__ import annotations

import gc
import logging
import os
import time
from typing import Any

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


#: a full collection waits at least this many times its last duration after it (CPython
#: skips one until the long-lived objects grew by a quarter; this keeps a full scan of a
#: large heap, while a big listing is held, under 1 % of the loop's time)
FULL_SPACING = 100
#: log what each full collection scanned (a diagnosis aid: costs a walk of the heap)
_CENSUS = os.environ.get("DELTAFS_GC_CENSUS") == "1"


class GcPace:
    def __init__(self, clock: Any = time.perf_counter) -> None:
        #: collections run here, by generation
        self.runs = [0, 0, 0]
        self.worst_ms = 0.0
        self._young = 0
        self._middle = 0
        self._clock = clock
        self._full_at = -1e18
        self._full_took = 0.0
        self._saved: tuple[int, ...] | None = None

    def install(self) -> None:
        """Move the automatic collection out of the way (keeping the net)."""
        self._saved = gc.get_threshold()
        gc.set_threshold(AUTO_THRESHOLD, *self._saved[1:])

    def uninstall(self) -> None:
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            self._saved = None

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
                if self._clock() - self._full_at >= FULL_SPACING * self._full_took:
                    self._middle = 0
                    gen = 2
        t0 = self._clock()
        gc.collect(gen)
        took = self._clock() - t0
        if gen == 2:
            self._full_at, self._full_took = t0, took
            if _CENSUS:
                self._census(took)
        self.runs[gen] += 1
        self.worst_ms = max(self.worst_ms, took * 1000.0)
        return gen

    @staticmethod
    def _census(took: float) -> None:
        """What a full collection scanned, by type (DELTAFS_GC_CENSUS=1: an O(heap)
        walk after each full collection, for finding what makes them long)."""
        import collections

        objs = gc.get_objects()
        top = collections.Counter(type(o).__name__ for o in objs).most_common(12)
        log.info("full collection %.1f ms over %d tracked objects (%d frozen): %s",
                 took * 1000, len(objs), gc.get_freeze_count(), top)

    async def run(self) -> None:
        self.install()
        try:
            while True:
                await trio.sleep(PERIOD)
                self.tick()
        finally:
            self.uninstall()
