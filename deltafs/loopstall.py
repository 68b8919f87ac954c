"""How late the trio loop runs a timer: the one number that shows whether anything
blocks the event loop (a long query, a big merge, a synchronous syscall on the loop).

A task sleeps ``INTERVAL`` over and over; each wake-up later than asked is a stall of
that many milliseconds. ``deltafs status`` shows the worst since mount and the worst of
the last ``WINDOW`` seconds (what the scale benchmark samples step by step).
"""
from __future__ import annotations

import collections
import ctypes
import gc
import inspect
import logging
import os
import threading
import time
from typing import Any

import trio

log = logging.getLogger(__name__)

INTERVAL = 0.010
WINDOW = 10.0
#: a stall this long is logged (with the time, to be matched with other log lines)
LOG_ABOVE_MS = 250.0
#: set to a number of milliseconds to log every task step and garbage collection that
#: holds the loop at least that long, naming the task (finds what a stall was)
SLOW_STEP_ENV = "DELTAFS_SLOW_STEP_MS"


class LoopStall:
    """The loop-lag probe: run :meth:`run` in the mount's nursery."""

    def __init__(self) -> None:
        self.max_ms = 0.0
        self._period_ms = 0.0
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
        if late_ms > self._period_ms:
            self._period_ms = late_ms
        if late_ms >= LOG_ABOVE_MS:
            log.warning("the event loop stalled for %.0f ms", late_ms)
        # keep a decreasing run of (time, stall): the head is the window's maximum
        while self._recent and self._recent[-1][1] <= late_ms:
            self._recent.pop()
        self._recent.append((now, late_ms))
        while self._recent and self._recent[0][0] < now - WINDOW:
            self._recent.popleft()

    def take_period_max(self) -> float:
        """The worst lateness since the last call (for :mod:`deltafs.gatecontrol`)."""
        worst, self._period_ms = self._period_ms, 0.0
        return worst

    def recent_ms(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self._recent and self._recent[0][0] < now - WINDOW:
            self._recent.popleft()
        return self._recent[0][1] if self._recent else 0.0


class SlowSteps(trio.abc.Instrument):
    """Names what holds the loop: every task step, and every garbage collection, longer
    than ``limit_ms`` is logged. Off unless ``DELTAFS_SLOW_STEP_MS`` is set: it costs two
    clock reads and one read of the thread's schedstat (~1 µs, the GIL kept) per task
    step."""

    def __init__(self, limit_ms: float) -> None:
        self.limit = limit_ms / 1000.0
        self._t0 = 0.0
        self._cpu0 = 0.0
        self._from: tuple[Any, int] | None = None
        #: the loop thread's schedstat, opened on its first step (on that thread)
        self._sched: _Schedstat | None = None
        self._gc0 = 0.0
        #: seconds of garbage collection run on the loop's thread (a step's share is
        #: logged with it: a collection triggered by the step's allocations)
        self._loop_gc = 0.0
        self._loop_gc0 = 0.0
        self._loop_thread = 0
        self._report_due = False
        self._reported = 0.0
        #: task -> the last filesystem operation it entered (see :meth:`name_ops`): a
        #: pyfuse3 handler's own frame is hidden behind its Cython wrapper
        self.ops: dict[trio.lowlevel.Task, str] = {}
        #: the journal's [lock wait ns, SQLite ns, statements] counters (Journal.timing)
        self.journal_timing: list[int] | None = None
        self._j0 = (0, 0, 0)

    def name_ops(self, fs: Any, names: Any) -> None:
        """Wrap the async methods ``names`` of ``fs`` (an instance) so that a slow step
        says which filesystem operation its task was running."""
        ops = self.ops
        for name in names:
            fn = getattr(fs, name, None)
            if fn is None or not inspect.iscoroutinefunction(fn):
                continue

            async def wrapper(*args: Any, _fn: Any = fn, _name: str = name,
                              **kw: Any) -> Any:
                ops[trio.lowlevel.current_task()] = _name
                return await _fn(*args, **kw)

            setattr(fs, name, wrapper)

    @staticmethod
    def heap_report(*_: object) -> None:
        """Log the most common object types the collector tracks (after a slow full
        collection, at most once a minute): what a growing heap is made of."""
        import collections as _c

        counts = _c.Counter(type(o).__name__ for o in gc.get_objects())
        log.warning("heap: %d tracked objects (%d frozen); most common: %s",
                    sum(counts.values()), gc.get_freeze_count(),
                    ", ".join(f"{n} {k}" for k, n in counts.most_common(15)))

    @classmethod
    def from_env(cls) -> list[trio.abc.Instrument]:
        raw = os.environ.get(SLOW_STEP_ENV, "")
        try:
            limit = float(raw) if raw else 0.0
        except ValueError:
            log.warning("%s=%r is not a number of milliseconds: ignored", SLOW_STEP_ENV, raw)
            return []
        if limit <= 0:
            return []
        inst = cls(limit)
        gc.callbacks.append(inst._gc)
        log.info("logging task steps and collections longer than %.0f ms", limit)
        return [inst]

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        # Runs at every task step, so it only records: where the task resumes (the frame
        # and its line; a handler that finishes within the step is named only here), the
        # raw schedstat, the clocks. Formatting and parsing wait for a slow step. (The
        # first version formatted the frame and parsed schedstat every step: ~23 µs a
        # step, a quarter of the loop thread's GIL time in a 12,000-file create.)
        self._from = _innermost_frame(task.coro)
        if self._sched is None:
            self._sched = _Schedstat()
            self._loop_thread = threading.get_ident()
        self._sched.mark()
        self._loop_gc0 = self._loop_gc
        self._t0 = time.perf_counter()
        self._cpu0 = time.thread_time()
        if self.journal_timing is not None:
            self._j0 = tuple(self.journal_timing)

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        took = time.perf_counter() - self._t0
        if self._report_due:
            self._report_due = False
            self._reported = time.monotonic()
            self.heap_report()
        if took >= self.limit:
            # CPU well below the wall time: the step waited, it did not compute; for a
            # core (runnable, not running: the machine is busy), or for the GIL or a
            # syscall (the rest)
            cpu = time.thread_time() - self._cpu0
            waited = self._sched.waited_ms() if self._sched else 0.0
            op = self.ops.get(task)
            jt = self.journal_timing
            j = (f", journal: {(jt[0] - self._j0[0]) / 1e6:.0f} ms waiting for its lock, "
                 f"{(jt[1] - self._j0[1]) / 1e6:.0f} ms in {jt[2] - self._j0[2]} statements"
                 if jt is not None else "")
            j += f", {(self._loop_gc - self._loop_gc0) * 1000:.0f} ms collecting garbage"
            log.warning("slow task step: %.0f ms (%.0f ms CPU, %.0f ms waiting for a core%s) "
                        "in %s%s (from %s to %s)",
                        took * 1000.0, cpu * 1000.0, max(0.0, waited), j, task.name,
                        f" (last operation: {op})" if op else "", _where(self._from),
                        _where(_innermost_frame(task.coro)))

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc0 = time.perf_counter()
            return
        took = time.perf_counter() - self._gc0
        on_loop = threading.get_ident() == self._loop_thread
        if on_loop:
            self._loop_gc += took
        if took >= self.limit:
            log.warning("slow garbage collection: %.0f ms (generation %s, %s collected, %s)",
                        took * 1000.0, info.get("generation"), info.get("collected"),
                        "on the loop's thread" if on_loop else "in a worker thread")
            if info.get("generation") == 2 and time.monotonic() - self._reported > 60:
                self._report_due = True


class _Schedstat:
    """The calling thread's time runnable but not running (Linux schedstat; 0 where
    there is none), read with libc's ``pread`` through ``ctypes.PyDLL``, which keeps
    the GIL: ``os.pread`` gives it up, and on the loop's thread every step would then
    wait for it to come back while a worker thread holds it (review). ~1 µs a read; one
    descriptor for the thread that made this object, the only one to read it."""

    def __init__(self) -> None:
        self.fd = -1
        self.buf = ctypes.create_string_buffer(128)
        self.pread: Any = None
        try:
            libc = ctypes.PyDLL(None)
            fn = libc.pread
            fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long]
            fn.restype = ctypes.c_ssize_t
            self.fd = os.open(f"/proc/self/task/{threading.get_native_id()}/schedstat",
                              os.O_RDONLY | os.O_CLOEXEC)
            self.pread = fn
        except (OSError, AttributeError):
            pass

    def mark(self) -> None:
        """Read the counters now (kept raw: parsed only by :meth:`waited_ms`)."""
        if self.pread is not None:
            self.pread(self.fd, self.buf, len(self.buf), 0)

    def waited_ms(self) -> float:
        """Milliseconds runnable but not running since :meth:`mark`."""
        if self.pread is None:
            return 0.0
        before = self.buf.value
        self.mark()  # the counters only grow: this read covers all of the last one
        after = self.buf.value
        return (_wait_ns(after) - _wait_ns(before)) / 1e6

    def wait_ns(self) -> int:
        """The counter now (for tests)."""
        if self.pread is None:
            return 0
        self.mark()
        return _wait_ns(self.buf.value)


def _wait_ns(raw: bytes) -> int:
    try:
        return int(raw.split()[1])
    except (ValueError, IndexError):
        return 0


def _innermost_frame(coro: Any) -> tuple[Any, int] | None:
    """Where a task is suspended: its innermost coroutine frame of our own code (trio's
    and pyfuse3's frames skipped, unless there is nothing else), as (code, line). Cheap:
    whether a file is ours is asked once per file (not per code object: two identical
    functions in two files compare equal)."""
    where = None
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        code = frame.f_code
        ours = _OURS.get(code.co_filename)
        if ours is None:
            ours = _OURS[code.co_filename] = not any(s in code.co_filename
                                                      for s in _NOT_OURS)
        if where is None or ours:
            where = (code, frame.f_lineno)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return where


def _where(at: tuple[Any, int] | None) -> str:
    """``file:line name`` of :func:`_innermost_frame`'s answer."""
    if at is None:
        return "finished"
    code, line = at
    return f"{code.co_filename}:{line} {code.co_name}"


_NOT_OURS = ("site-packages", "pyfuse3", ".pxi")
#: source file -> whether it is ours
_OURS: dict[str, bool] = {}
