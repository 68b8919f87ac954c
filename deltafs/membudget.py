"""RAM for the codec's children (xdelta3), held against one budget per process.

Why: xdelta3 allocates its source window (-B) and its hash tables up front, so what an
encode costs is known before it starts, and four encodes of 16 MB wheels at the 64 MiB
default window took 547 MB. The budget is ``--memory-limit``: the daemon and its
children together. The daemon's own RSS (read from ``/proc/self/statm`` at each request)
comes off the top; the children's predicted footprints share the rest.

- A child that does not fit now waits, in arrival order (a large one is not starved by
  a stream of small ones), except that decodes go before encodes: a reader is waiting
  on a decode, an encode is background work.
- A child that could never fit runs alone once nothing else is held: copies keep
  working at any size, only slower. The codec narrows its window first where that is
  harmless (see :func:`deltafs.codec.encode`).
- Waiting is in a worker thread (every codec call is), never on the event loop.

Who owns what: this module owns the held/waiting counters; each ``hold`` returns what
it took on exit, whatever happened in between.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

#: the default --memory-limit (daemon and children): the largest a default mount may
#: reach while copying release series (see docs/performance.md)
DEFAULT_LIMIT = 144 << 20  # = options.DEFAULT_MEMORY_LIMIT (a test checks)
#: a child always gets at least this much room, however large the daemon has grown
MIN_ROOM = 32 << 20

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def own_rss() -> int:
    """This process's resident set, in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class _Ticket:
    __slots__ = ("first",)

    def __init__(self, first: bool) -> None:
        self.first = first


_local = threading.local()


@contextmanager
def background() -> Iterator[None]:
    """Work in this thread that nobody waits for (a read-ahead's rebuild): its decodes
    queue like encodes instead of ahead of them, so that it never delays someone's
    ``open`` or an upload."""
    was = getattr(_local, "background", False)
    _local.background = True
    try:
        yield
    finally:
        _local.background = was


class Budget:
    """Bytes the codec's children may hold at once. ``limit=None``: no bound (the CLI's
    default, where one command runs one codec at a time)."""

    def __init__(self, limit: int | None, rss: Callable[[], int] = own_rss) -> None:
        self.limit = limit
        self._rss = rss
        self._cond = threading.Condition()
        self._queue: deque[_Ticket] = deque()
        self.held = 0
        self.children = 0
        self.peak_held = 0
        self.waits = 0
        self.wait_seconds = 0.0
        self.alone = 0  # holds larger than the room, run with nothing else held

    def room(self) -> int:
        """What the children may hold together now: the limit less the daemon's RSS."""
        if self.limit is None:
            return 1 << 62
        return max(MIN_ROOM, self.limit - self._rss())

    @contextmanager
    def hold(self, need: int, what: str, first: bool = False) -> Iterator[None]:
        """Hold ``need`` bytes for the life of one child (blocking: a worker thread).
        ``first``: queue ahead of every waiter without it (a decode: someone's read is
        waiting on it; an encode is background work)."""
        if first and getattr(_local, "background", False):
            first = False  # nobody waits for it (see background())
        ticket = _Ticket(first)  # unbounded (room() is huge): never waits
        t0 = time.monotonic()
        waited = False
        with self._cond:
            if first:
                at = next((i for i, t in enumerate(self._queue) if not t.first),
                          len(self._queue))
                self._queue.insert(at, ticket)
            else:
                self._queue.append(ticket)
            try:
                while True:
                    room = self.room()
                    first = self._queue[0] is ticket
                    if first and (self.held + need <= room or self.held == 0):
                        break
                    if not waited:
                        waited = True
                        log.debug("%s waits for %d MiB of codec memory (%d MiB held, room "
                                  "%d MiB)", what, need >> 20, self.held >> 20, room >> 20)
                    # the daemon's RSS changes without a notify: look again now and then
                    self._cond.wait(timeout=1.0)
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()  # the next in line may fit too
            if need > room:
                self.alone += 1
                log.info("%s needs %d MiB, more than the memory limit leaves (%d MiB): "
                         "it runs alone", what, need >> 20, room >> 20)
            if waited:
                self.waits += 1
                self.wait_seconds += time.monotonic() - t0
            self._took(need)
        try:
            yield
        finally:
            with self._cond:
                self._gave(need)
                self._cond.notify_all()

    def _took(self, need: int) -> None:
        self.held += need
        self.children += 1
        self.peak_held = max(self.peak_held, self.held)

    def _gave(self, need: int) -> None:
        self.held -= need
        self.children -= 1

    def status(self) -> dict[str, Any]:
        """For ``deltafs status``: the limit and what the codec holds under it."""
        with self._cond:
            return {
                "limit": self.limit,
                "daemon_rss": self._rss(),
                "codec_held": self.held,
                "codec_children": self.children,
                "codec_waiting": len(self._queue),
                "codec_peak_held": self.peak_held,
                "codec_waits": self.waits,
                "codec_wait_seconds": round(self.wait_seconds, 3),
                "codec_alone": self.alone,
            }


_current = Budget(None)


def current() -> Budget:
    """The process's budget (unbounded until :func:`configure`)."""
    return _current


def configure(limit: int | None) -> Budget:
    """Set the process's memory limit (a mount does, at start)."""
    global _current
    _current = Budget(limit)
    return _current
