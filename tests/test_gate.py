"""The S3 request gate: how many requests may be inside botocore at once, and how a
mount narrows it while its event loop lags (issue 11: worker threads' Python starved the
loop of the GIL)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import trio

from deltafs import gatecontrol
from deltafs.gatecontrol import GateControl
from deltafs.loopstall import LoopStall
from deltafs.store import S3Store
from deltafs.store.gate import RequestGate


class _Peak:
    """Counts callers inside at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0

    def call(self, seconds: float = 0.02) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        time.sleep(seconds)
        with self.lock:
            self.now -= 1


def test_the_gate_lets_in_at_most_its_limit_and_counts_who_waited() -> None:
    gate = RequestGate(8)
    gate.limit = 2
    peak = _Peak()
    call = gate.wrap(peak.call)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: call(), range(16)))
    assert peak.peak == 2
    assert gate.busy == 0
    assert gate.waited > 0


def test_raising_the_limit_lets_waiting_callers_in_and_it_never_passes_the_ceiling() -> None:
    gate = RequestGate(4)
    gate.limit = 1
    peak = _Peak()
    call = gate.wrap(lambda: peak.call(0.2))
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(call) for _ in range(4)]
        time.sleep(0.05)
        assert peak.now == 1
        gate.limit = 100  # capped at the ceiling (the connection pool)
        assert gate.limit == 4
        for f in futures:
            f.result()
    # the three waiting came in beside the first (it sleeps 0.2 s), not after it
    assert peak.peak == 4
    gate.limit = 0
    assert gate.limit == 1  # never closed


def test_a_caller_that_raises_gives_its_place_back() -> None:
    gate = RequestGate(1)

    def boom() -> None:
        raise RuntimeError("S3 said no")

    for _ in range(3):
        with pytest.raises(RuntimeError):
            gate.wrap(boom)()
    assert gate.busy == 0
    gate.wrap(lambda: None)()  # would wait forever if a place had leaked


def test_the_control_halves_what_was_wanted_on_a_lag_and_opens_by_one_otherwise() -> None:
    gate = RequestGate(40)
    control = GateControl(gate, LoopStall())
    control.adjust(gatecontrol.HIGH_MS + 1, wanted=16)
    assert gate.limit == 8  # half of the 16 that wanted in, not of the 40 allowed
    control.adjust(500.0, wanted=30)
    assert gate.limit == 4  # never above the limit it had
    for _ in range(5):
        control.adjust(500.0, wanted=4)
    assert gate.limit == gatecontrol.MINIMUM
    assert control.narrowed == 3  # 40 -> 8 -> 4 -> 2, then no change
    control.adjust(gatecontrol.HIGH_MS - 1, wanted=4)
    assert gate.limit == gatecontrol.MINIMUM + 1
    for _ in range(60):
        control.adjust(0.0, wanted=0)
    assert gate.limit == 40  # back to the ceiling


def test_a_lag_without_s3_demand_leaves_the_gate_open() -> None:
    """A collection or a commit on an idle mount: narrowing could not help (review: it
    took the gate from 40 to 2 and kept it there)."""
    gate = RequestGate(40)
    control = GateControl(gate, LoopStall())
    for wanted in (0, 1, gatecontrol.MINIMUM):
        control.adjust(500.0, wanted=wanted)
    assert gate.limit == 40
    assert control.narrowed == 0


def test_a_thread_inside_the_gate_enters_again_without_waiting() -> None:
    """botocore calls the client from inside a call (S3 Express sessions, region
    redirects): with a plain semaphore that waits for a place its own caller holds."""
    gate = RequestGate(4)
    gate.limit = 1
    inner = gate.wrap(lambda: gate.busy)
    outer = gate.wrap(lambda: inner())
    done: list[int] = []
    threads = [threading.Thread(target=lambda: done.append(outer())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert done == [1, 1, 1]  # each nested call ran, inside its caller's one place
    assert gate.busy == 0


def test_the_gate_remembers_the_most_callers_that_wanted_in_at_once() -> None:
    gate = RequestGate(8)
    gate.limit = 2
    call = gate.wrap(lambda: time.sleep(0.3))
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda _: call(), range(6)))
    assert gate.take_peak() == 6  # 2 inside, 4 waiting
    assert gate.take_peak() == 0  # nothing since


def test_the_period_maximum_is_the_worst_since_it_was_last_taken() -> None:
    probe = LoopStall()
    probe.note(30.0, 1.0)
    probe.note(5.0, 1.1)
    assert probe.take_period_max() == 30.0
    assert probe.take_period_max() == 0.0
    assert probe.max_ms == 30.0  # since mount: kept


def test_a_lagging_loop_narrows_the_gate_in_a_running_trio_loop() -> None:
    gate = RequestGate(16)
    probe = LoopStall()
    control = GateControl(gate, probe)
    call = gate.wrap(lambda: time.sleep(0.3))  # eight requests in S3 meanwhile
    pool = ThreadPoolExecutor(8)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe.run)
            nursery.start_soon(control.run)
            await trio.sleep(0.05)
            futures = [pool.submit(call) for _ in range(8)]
            await trio.sleep(0.05)
            time.sleep(0.12)  # the loop held (as by a GIL it cannot get back)
            await trio.sleep(gatecontrol.PERIOD * 1.5)
            narrowed = gate.limit
            nursery.cancel_scope.cancel()
        for f in futures:
            f.result()
        # halved to 4 (of the 8 that wanted in), then opened by one a period
        assert control.narrowed == 1 and 4 <= narrowed < 8

    try:
        trio.run(main)
    finally:
        pool.shutdown()


def test_every_s3_call_goes_through_the_store_gate_pages_included(s3store: S3Store) -> None:
    """The gate wraps botocore's one entry point, so paginated LISTs, HEADs and PUTs all
    count; with a limit of 1 no two are inside botocore at once."""
    store = s3store
    for i in range(5):
        store.put_bytes(f"gate/k{i}", b"x" * 10, {})
    store.gate.limit = 1
    seen: list[int] = []
    lock = threading.Lock()

    def before_send(**_: Any) -> None:
        with lock:
            seen.append(store.gate.busy)

    store._client.meta.events.register("before-send.s3", before_send)
    try:
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda i: store.head(f"gate/k{i % 5}"), range(24)))
            list(pool.map(lambda _: store.list("gate/"), range(4)))
    finally:
        store._client.meta.events.unregister("before-send.s3", before_send)
        store.gate.limit = store.gate.ceiling
    assert len(seen) >= 28
    assert set(seen) == {1}  # inside the gate, alone
    assert store.gate.waited > 0
