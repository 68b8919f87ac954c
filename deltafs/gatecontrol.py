"""Sizes the S3 request gate (:mod:`deltafs.store.gate`) from the event loop's lag.

Halved when the loop came back late by :data:`HIGH_MS` or more in the last period (the
worker threads' Python starves it of the GIL, or of a core), from the number of requests
that period actually wanted at once (halving a limit of 40 while 16 HEADs run changes
nothing); opened by one when it stayed under :data:`LOW_MS` (from the minimum to 16 at
once in 3.5 s). Against a remote S3 the threads mostly wait for the network
and the gate stays open; against a local or very fast S3, or on a small machine, it
closes down to :data:`MINIMUM` requests at once, which costs little throughput there:
the requests were queueing for the GIL anyway. A stall that S3 calls did not cause
only closes the gate for the few seconds it takes to open again.
"""
from __future__ import annotations

import logging

import trio

from .loopstall import LoopStall
from .store.gate import RequestGate

log = logging.getLogger(__name__)

PERIOD = 0.25
HIGH_MS = 40.0
LOW_MS = 15.0
MINIMUM = 2


class GateControl:
    def __init__(self, gate: RequestGate, stall: LoopStall) -> None:
        self.gate = gate
        self.stall = stall
        #: times the gate was narrowed (the status shows it)
        self.narrowed = 0

    def adjust(self, worst_ms: float, wanted: int) -> None:
        """One period's decision, from the worst lateness the loop saw in it and the
        most requests that wanted to be in S3 at once."""
        gate = self.gate
        old = gate.limit
        if worst_ms >= HIGH_MS:
            new = max(MINIMUM, min(old, wanted) // 2)
        elif worst_ms < LOW_MS:
            new = min(gate.ceiling, old + 1)
        else:
            return
        if new != old:
            gate.limit = new
            if new < old:
                self.narrowed += 1
            log.debug("S3 requests at once: %d -> %d (the loop was %.0f ms late)",
                      old, new, worst_ms)

    async def run(self) -> None:
        while True:
            await trio.sleep(PERIOD)
            self.adjust(self.stall.take_period_max(), self.gate.take_peak())
