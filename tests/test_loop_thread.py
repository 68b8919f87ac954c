"""What the daemon gives its event loop's thread: a better nice value than the rest of
the daemon (deltafs/priority.py; its worker threads and child processes do not inherit
it), and the garbage collections (deltafs/gcpace.py; worker threads do not collect).

Unit tests run in a child Python (they change the calling thread's nice value, a
process-wide thread hook, the collector's thresholds); the mount test reads the live
daemon's threads in /proc and its status.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mountfixtures import Mount, mounted  # noqa: F401  (fixture)

ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CAP_SYS_NICE)")

CHILD = r"""
import json, os, subprocess, sys, threading
import trio
from deltafs import priority

def nice():
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

base = nice()
got = priority.raise_this_thread()
out = {"base": base, "got": got, "loop": nice()}

box = {}
t = threading.Thread(target=lambda: box.update(thread=nice(), hook=sys.getprofile()))
t.start(); t.join()
out["thread"] = box["thread"]
# the hook removed itself after its one call: no cost per call in the thread after
out["hook_left"] = box["hook"] is not None

async def main():
    out["to_thread"] = await trio.to_thread.run_sync(nice)
    # a child process started the way the daemon starts xdelta3 (from a worker)
    def spawn():
        return subprocess.run(["sh", "-c", "cut -d' ' -f19 /proc/self/stat"],
                              capture_output=True, text=True).stdout.strip()
    out["child_from_worker"] = int(await trio.to_thread.run_sync(spawn))
    res = await trio.run_process(["sh", "-c", "cut -d' ' -f19 /proc/self/stat"],
                                 capture_stdout=True)
    out["run_process"] = int(res.stdout.decode().strip())
    out["loop_after"] = nice()
trio.run(main)
print(json.dumps(out))
"""


def run_child(code: str) -> dict[str, int]:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    out: dict[str, int] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


@ROOT
def test_only_the_calling_thread_is_raised() -> None:
    out = run_child(CHILD)
    base = out["base"]
    assert out["got"] == out["loop"] == out["loop_after"] == max(-20, base - 5)
    # every thread and process started after it is back at the base value
    assert out["thread"] == base
    assert not out["hook_left"]
    assert out["to_thread"] == base
    assert out["child_from_worker"] == base
    assert out["run_process"] == base


def test_not_permitted_changes_nothing() -> None:
    """Without CAP_SYS_NICE (simulated: setpriority refuses) nothing is changed, and no
    thread hook stays behind."""
    code = r"""
import json, os, threading
from deltafs import priority
def refuse(*a):
    raise PermissionError(1, "Operation not permitted")
priority._set_thread_nice = refuse
got = priority.raise_this_thread()
print(json.dumps({"got": got, "hook": threading.getprofile() is not None}))
"""
    out = run_child(code)
    assert out == {"got": None, "hook": False}


def thread_nices(pid: int) -> dict[int, int]:
    """Every thread of ``pid``: its nice value (field 19 of /proc/PID/task/TID/stat)."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue  # a worker that just ended
        fields = stat.rsplit(")", 1)[1].split()
        found[int(tid)] = int(fields[16])  # field 19 counted from the state (field 3)
    return found


@ROOT
def test_mount_raises_only_its_loop_thread(mounted: Mount) -> None:  # noqa: F811
    """The live daemon: its main thread (the trio loop, tid == pid) is 5 nice steps
    better than every other thread, after uploads and reads have started workers; and
    its collections ran from the loop."""
    m = mounted
    base = os.getpriority(os.PRIO_PROCESS, 0)
    body = os.urandom(300_000)
    for i in range(3):
        (m.mountpoint / f"f{i}.bin").write_bytes(body[i:] + body[:i])
    m.wait_idle()
    assert (m.mountpoint / "f1.bin").read_bytes() == body[1:] + body[:1]
    assert m.pid is not None
    nices = thread_nices(m.pid)
    assert len(nices) > 2, nices  # the loop and some workers
    assert nices.pop(m.pid) == max(-20, base - 5)
    # a thread the loop has just started is boosted until its first Python call (a
    # moment on a loaded machine): only one still boosted a little later is wrong
    boosted = {t for t, n in nices.items() if n != base}
    if boosted:
        time.sleep(0.3)
        again = thread_nices(m.pid)
        assert not {t for t in boosted if again.get(t, base) != base}, (nices, again)
    st = m.status()
    assert st["loop_thread_nice"] == max(-20, base - 5)
    gcs = st["garbage_collections"]
    assert gcs["paced"][0] > 0 and gcs["auto_threshold"] == 50_000, gcs


GC_CHILD = r"""
import gc, json, threading
import trio
from deltafs import gcpace

where = []
gc.callbacks.append(lambda phase, info: phase == "start" and where.append(
    (threading.current_thread() is threading.main_thread(), info["generation"])))

class Cycle:
    def __init__(self):
        self.me = self

def churn():
    # what a worker does: allocate, some of it cyclic garbage (a parsed page, a request)
    for _ in range(20):
        keep = [Cycle() for _ in range(600)]
        del keep

async def main():
    pace = gcpace.GcPace()
    async with trio.open_nursery() as n:
        n.start_soon(pace.run)
        await trio.sleep(0.05)
        for _ in range(12):
            await trio.to_thread.run_sync(churn)
            await trio.sleep(gcpace.PERIOD * 1.2)
        n.cancel_scope.cancel()
    return pace.runs

runs = trio.run(main)
print(json.dumps({"runs": runs, "in_workers": sum(1 for main, _ in where if not main),
                  "on_loop": sum(1 for main, _ in where if main),
                  "threshold": gc.get_threshold()[0]}))
"""


@pytest.mark.parametrize("paced", [True, False])
def test_collections_run_on_the_loop_not_in_workers(paced: bool) -> None:
    """Worker threads allocating 12,000 objects per call: paced, every collection runs
    on the loop's thread; without the pacing (the control), the workers collect."""
    code = GC_CHILD if paced else GC_CHILD.replace("n.start_soon(pace.run)", "pass")
    out = run_child(code)
    if paced:
        assert out["in_workers"] == 0, out
        assert out["runs"][0] >= 8 and out["runs"][1] >= 1, out
        assert out["threshold"] == 700  # put back when the task ends
    else:
        assert out["in_workers"] > 8, out


def test_pace_collects_cycles_and_escalates() -> None:
    code = r"""
import gc, json, weakref
from deltafs import gcpace
class Cycle:
    def __init__(self):
        self.me = self
pace = gcpace.GcPace()
pace.install()
gc.collect()
out = {"idle": pace.tick()}
c = Cycle(); ref = weakref.ref(c); del c
junk = [[] for _ in range(gcpace.YOUNG)]  # tracked objects: the count passes YOUNG
out["first"] = pace.tick()
out["freed"] = ref() is None
gens, keep = [], []
for _ in range(99):
    keep.append([[] for _ in range(gcpace.YOUNG + 1)])  # alive: the count only grows
    gens.append(pace.tick())
out["gens"] = [gens.count(g) for g in (0, 1, 2)]
out["runs"] = pace.runs
print(json.dumps(out))
"""
    out = run_child(code)
    assert out["idle"] is None
    assert out["first"] == 0 and out["freed"]
    # 100 collections: every 10th a middle one, every 100th a full one
    assert out["runs"] == [90, 9, 1], out
    assert out["gens"] == [89, 9, 1], out


def test_full_collections_spaced_by_their_cost() -> None:
    """A full collection that took 1 s is not run again within 100 s (middle ones run
    meanwhile); after that it is."""
    from deltafs import gcpace

    now = [0.0]

    def clock() -> float:
        return now[0]

    pace = gcpace.GcPace(clock=clock)
    pace._full_took, pace._full_at = 1.0, 0.0  # noqa: SLF001  (a full one just took 1 s)
    pace._young, pace._middle = gcpace.EVERY - 1, gcpace.EVERY  # noqa: SLF001
    keep: list[object] = []
    pace.install()  # (this process's own collector out of the way meanwhile)
    try:
        keep.append([[] for _ in range(gcpace.YOUNG + 1)])
        now[0] = 50.0
        assert pace.tick() == 1  # due, but too soon after a costly one
        for _ in range(gcpace.EVERY):
            keep.append([[] for _ in range(gcpace.YOUNG + 1)])
            pace.tick()
        assert pace.runs[2] == 0
        now[0] = 101.0
        for _ in range(gcpace.EVERY):
            keep.append([[] for _ in range(gcpace.YOUNG + 1)])
            pace.tick()
        assert pace.runs[2] == 1, pace.runs
    finally:
        pace.uninstall()


def test_census_of_full_collections_on_request(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    """DELTAFS_GC_CENSUS=1: each full collection logs what it scanned, by type (how the
    heap behind a long one is found); off, nothing is logged."""
    import logging

    from deltafs import gcpace

    class CensusMarker:
        pass

    keep: list[object] = [CensusMarker() for _ in range(200_000)]  # top type in any heap
    for census in (False, True):
        monkeypatch.setattr(gcpace, "_CENSUS", census)
        pace = gcpace.GcPace()
        pace._young, pace._middle = gcpace.EVERY - 1, gcpace.EVERY - 1  # noqa: SLF001
        caplog.clear()
        pace.install()  # (this process's own collector out of the way meanwhile)
        try:
            with caplog.at_level(logging.INFO, logger="deltafs.gcpace"):
                keep.append([[] for _ in range(gcpace.YOUNG + 1)])  # net new objects
                assert pace.tick() == 2
        finally:
            pace.uninstall()
        lines = [r.getMessage() for r in caplog.records]
        if census:
            import re

            found = re.search(r"\('CensusMarker', (\d+)\)", lines[0]) if len(lines) == 1 else None
            assert found and int(found.group(1)) >= 200_000, lines
        else:
            assert lines == []
