"""Sizes the S3 request gate (:mod:`deltafs.store.gate`) from the event loop's lag.

Halved when the loop came back late by :data:`HIGH_MS` or more in the last period (the
worker threads' Python starves it of the GIL, or of a core) and more than
:data:`MINIMUM` requests wanted in at once; halved from that number (halving a limit of
40 while 16 HEADs run changes nothing). Otherwise opened by one per period (from the
minimum to 40 in 9.5 s). A lag with no S3 demand behind it (a collection, a commit on an
idle mount) leaves the gate alone: narrowing could not help (review). Against a remote
S3 the threads mostly wait for the network and the gate stays open; against a local or
very fast S3, or on a small machine, it closes down to :data:`MINIMUM`. That costs no
throughput there, since the requests were queueing for the GIL anyway: 20,000 creates
took 446.7 s with it and 450.6 s without, and the HEAD-per-file listing was faster with
it (docs/performance.md, session 33).
"""
from __future__ import annotations

import logging

import trio

from .loopstall import LoopStall
from .store.gate import RequestGate

log = logging.getLogger(__name__)

PERIOD = 0.25
HIGH_MS = 40.0
MINIMUM = 2


class GateControl:
    def __init__(self, gate: RequestGate, stall: LoopStall, fixed: int | None = None) -> None:
        self.gate = gate
        self.stall = stall
        #: times the gate was narrowed (the status shows it)
        self.narrowed = 0
        #: ``--s3-requests``: the limit, never changed (gate and ceiling set to it)
        self.fixed = fixed
        if fixed is not None:
            gate.ceiling = max(1, fixed)
            gate.limit = gate.ceiling

    def adjust(self, worst_ms: float, wanted: int) -> None:
        """One period's decision, from the worst lateness the loop saw in it and the
        most requests that wanted to be in S3 at once."""
        gate = self.gate
        old = gate.limit
        if worst_ms >= HIGH_MS:
            if wanted <= MINIMUM:
                return  # not the S3 requests' doing
            new = max(MINIMUM, min(old, wanted) // 2)
        else:
            new = min(gate.ceiling, old + 1)
        if new != old:
            gate.limit = new
            if new < old:
                self.narrowed += 1
            log.debug("S3 requests at once: %d -> %d (the loop was %.0f ms late)",
                      old, new, worst_ms)

    async def run(self) -> None:
        if self.fixed is not None:
            return
        while True:
            await trio.sleep(PERIOD)
            self.adjust(self.stall.take_period_max(), self.gate.take_peak())
