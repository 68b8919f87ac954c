"""The loop-lag probe (``max_loop_stall_ms``) and the slow-step log that names a stall."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time

import pytest
import trio

from deltafs.loopstall import LoopStall, SlowSteps, _Schedstat


def test_the_probe_sees_a_blocked_loop_and_forgets_it_after_the_window() -> None:
    probe = LoopStall()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe.run)
            await trio.sleep(0.05)
            time.sleep(0.06)  # a synchronous call on the loop
            await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert 40.0 <= probe.max_ms < 1000.0
    now = time.monotonic()
    assert probe.recent_ms(now) == pytest.approx(probe.max_ms)
    assert probe.recent_ms(now + 60.0) == 0.0  # out of the window
    assert probe.max_ms > 40.0  # the worst since mount stays


def _slow_helper() -> None:
    time.sleep(0.03)


def test_a_slow_step_is_logged_with_its_cpu_time_and_where_it_ran(
        caplog: pytest.LogCaptureFixture) -> None:
    async def handler() -> None:
        await trio.sleep(0)
        _slow_helper()  # 30 ms off the CPU (a wait, as for the GIL)
        await trio.sleep(0)

    async def quick() -> None:
        for _ in range(5):
            await trio.sleep(0)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handler, name="the-handler")
            nursery.start_soon(quick, name="the-quick-one")

    with caplog.at_level(logging.WARNING, logger="deltafs.loopstall"):
        trio.run(main, instruments=[SlowSteps(15.0)])
    lines = [r.getMessage() for r in caplog.records if "slow task step" in r.getMessage()]
    assert len(lines) == 1, lines
    line = lines[0]
    assert "in the-handler" in line
    assert re.search(r"slow task step: \d+ ms \([0-5] ms CPU, \d+ ms waiting for a core, "
                     r"0 ms collecting garbage\)", line), line
    # from where it resumed to where it stopped, both in this file
    assert line.count("test_loopstall.py") == 2 and "handler" in line, line


def test_a_slow_step_names_the_filesystem_operation_its_task_ran(
        caplog: pytest.LogCaptureFixture) -> None:
    """pyfuse3 calls a handler through a Cython wrapper that hides its frame: the step
    says which operation (``create``, ``getxattr``...) its task entered last."""
    class Ops:
        async def create(self) -> None:
            await trio.sleep(0)
            _slow_helper()

        async def lookup(self) -> None:
            await trio.sleep(0)

    fs = Ops()
    steps = SlowSteps(15.0)
    steps.name_ops(fs, ["create", "lookup", "missing"])

    async def main() -> None:
        await fs.lookup()
        await fs.create()

    with caplog.at_level(logging.WARNING, logger="deltafs.loopstall"):
        trio.run(main, instruments=[steps])
    lines = [r.getMessage() for r in caplog.records if "slow task step" in r.getMessage()]
    assert len(lines) == 1 and "(last operation: create)" in lines[0], lines


def test_a_step_that_waited_for_a_core_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """The slow-step line tells a busy machine (runnable, no core free) from a wait for
    the GIL or a syscall: this process and a spinning child share one core, so a step
    that computes for 150 ms of wall time spends a good part of it waiting."""
    cpu = sorted(os.sched_getaffinity(0))[0]
    before = os.sched_getaffinity(0)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(spinner.pid, {cpu})
        os.sched_setaffinity(0, {cpu})
        time.sleep(0.05)

        async def busy() -> None:
            await trio.sleep(0)
            end = time.perf_counter() + 0.15
            while time.perf_counter() < end:
                pass
            await trio.sleep(0)

        sched = _Schedstat()
        waited0 = sched.wait_ns()
        with caplog.at_level(logging.WARNING, logger="deltafs.loopstall"):
            trio.run(busy, instruments=[SlowSteps(100.0)])
        waited = (sched.wait_ns() - waited0) / 1e6
    finally:
        os.sched_setaffinity(0, before)
        spinner.kill()
        spinner.wait()
    lines = [r.getMessage() for r in caplog.records if "slow task step" in r.getMessage()]
    assert len(lines) == 1, lines
    logged = float(re.search(r"(\d+) ms waiting for a core", lines[0]).group(1))
    assert waited >= 30.0, waited
    assert logged >= 30.0, lines[0]


def test_a_step_that_waited_for_the_journal_lock_says_so(
        tmp_path: "os.PathLike[str]", caplog: pytest.LogCaptureFixture) -> None:
    """A commit holds the journal's lock while SQLite writes the WAL: a handler on the
    loop waits for it, and the slow-step line tells that wait from time in SQLite."""
    import threading
    from pathlib import Path

    from deltafs.journal import Journal

    journal = Journal(Path(tmp_path) / "state.db", "s3://b")
    held = threading.Event()

    def holder() -> None:
        with journal._lock:
            held.set()
            time.sleep(0.12)

    async def handler() -> None:
        await trio.sleep(0)
        t = threading.Thread(target=holder)
        t.start()
        held.wait()
        journal.x("SELECT 1").fetchone()
        journal.x("SELECT 2").fetchone()
        t.join()
        await trio.sleep(0)

    steps = SlowSteps(50.0)
    steps.journal_timing = journal.timing
    with caplog.at_level(logging.WARNING, logger="deltafs.loopstall"):
        trio.run(handler, instruments=[steps])
    journal.close()
    lines = [r.getMessage() for r in caplog.records if "slow task step" in r.getMessage()]
    assert len(lines) == 1, lines
    m = re.search(r"journal: (\d+) ms waiting for its lock, (\d+) ms in (\d+) statements",
                  lines[0])
    assert m, lines[0]
    assert int(m.group(1)) >= 80 and int(m.group(3)) == 2, lines[0]


def test_a_step_that_collected_garbage_says_how_long(
        caplog: pytest.LogCaptureFixture) -> None:
    """A collection triggered on the loop's thread belongs to the step that ran it (a
    big listing's objects freed, a full collection): the line says how much of the step
    it was, and a slow collection says on which thread it ran."""
    import gc

    inst = SlowSteps(15.0)

    def slow_start(phase: str, info: dict) -> None:  # a collection that takes 40 ms
        if phase == "start":
            time.sleep(0.04)

    async def collects() -> None:
        await trio.sleep(0)
        gc.collect()
        await trio.sleep(0)

    gc.callbacks.extend([inst._gc, slow_start])
    try:
        with caplog.at_level(logging.WARNING, logger="deltafs.loopstall"):
            trio.run(collects, instruments=[inst])
    finally:
        gc.callbacks.remove(inst._gc)
        gc.callbacks.remove(slow_start)
    steps = [r.getMessage() for r in caplog.records if "slow task step" in r.getMessage()]
    assert len(steps) == 1, steps
    m = re.search(r"(\d+) ms collecting garbage", steps[0])
    assert m and int(m.group(1)) >= 35, steps[0]
    collections = [r.getMessage() for r in caplog.records
                   if "slow garbage collection" in r.getMessage()]
    assert collections and "on the loop's thread" in collections[0], collections
