"""Read-ahead across files: a directory read file after file in name order gets its next
file rebuilt into the cache while the current one is being read.

Why: a cold ``open`` rebuilds the whole file (GETs, xdelta3, SHA-256) before its first
byte is served, and a reader that then copies it spends as long again in ``read``; one
file at a time, the two never overlap (a 16 MB wheel: ~70 ms rebuilding, ~30 ms
reading). Release series and backups are read the way they sort (``cp -r``, ``rsync``,
``tar`` on a fresh mount, a script over ``sorted()``), and in a chained directory the
next version's base is the file just opened, hot in the cache.

Bounds, so that a reader who is not reading in order pays nothing: the next file is
rebuilt only when the file being opened and the two opened before it in its directory
are consecutive files by name, one at a time per mount (one more may wait), only the
next file,
never one above :data:`MAX_SIZE` or a sixteenth of the cache, never when the cache disk
would be left with less than :data:`ROOM` free, never one with local content (written
here, not yet uploaded). It goes through the same fetch as an ``open`` (one rebuild per
content however many wait for it), so an ``open`` that comes while it runs waits for it
instead of starting another. A failure is logged at debug level: the ``open`` of that
file, if it comes, rebuilds it and reports what went wrong.
"""
from __future__ import annotations

import logging
import stat
from collections import OrderedDict
from dataclasses import dataclass

import trio

from .content import Contents
from .journal import CONTENT, Journal, Node

log = logging.getLogger(__name__)

#: the largest file rebuilt ahead
MAX_SIZE = 256 << 20
#: free bytes the cache disk keeps beyond the file rebuilt ahead
ROOM = 64 << 20
#: directories whose last opened file is remembered
DIRECTORIES = 256
#: names looked at beside a file to find its neighbours that are files
NEIGHBOURS = 8


@dataclass
class ReadAheadStats:
    """What ``deltafs status`` shows."""

    started: int = 0
    failed: int = 0
    #: objects of the file after next fetched while the next one was rebuilt
    fetched: int = 0


class ReadAhead:
    """Rebuilds the next file of a directory read in name order (a trio task)."""

    def __init__(self, journal: Journal, contents: Contents) -> None:
        self.journal = journal
        self.contents = contents
        self.stats = ReadAheadStats()
        #: set at unmount: nothing new starts (the drain is for uploads)
        self.stopped = False
        #: per directory (inode), the name of the file opened last
        self._last: OrderedDict[int, str] = OrderedDict()
        #: per directory, the name before that (two in order start a read-ahead)
        self._before: dict[int, str] = {}
        #: one request waits while one runs (a reader faster than the rebuilds drops the
        #: rest): (file opened, next file, the file after it or None)
        self._send, self._recv = trio.open_memory_channel[tuple[Node, Node, Node | None]](1)

    def opened(self, node: Node) -> None:
        """``node``'s content was opened from the cache or the bucket (on the trio
        thread; cheap: two short range scans of the ``(parent, name)`` index and the
        rows they name, at most 16, and a ``statvfs``)."""
        if not node.is_file:
            return
        last = self._last.pop(node.parent, None)
        self._last[node.parent] = node.name
        while len(self._last) > DIRECTORIES:
            gone, _ = self._last.popitem(last=False)
            self._before.pop(gone, None)
        if last == node.name:
            return  # the same file again: the order is as it was
        before = self._before.pop(node.parent, None)
        if last is not None:
            self._before[node.parent] = last
        if last is None or before is None:
            return
        # the two opened before this one were the two files before it by name
        prev = self._neighbours(node, "<", "DESC", 2)
        if [n.name for n in prev] != [last, before]:
            return
        nxt = self._neighbours(node, ">", "ASC", 2)
        if not nxt or not self._worth(nxt[0]):
            return
        after = nxt[1] if len(nxt) > 1 and self._worth(nxt[1]) else None
        try:
            self._send.send_nowait((node, nxt[0], after))
        except trio.WouldBlock:
            pass  # one running, one waiting already

    def _neighbours(self, node: Node, op: str, order: str, n: int) -> list[Node]:
        """The ``n`` nearest files before (``<``) or after (``>``) ``node`` by name."""
        rows = self.journal.x(
            f"SELECT ino FROM nodes WHERE parent=? AND name {op} ? AND ino != parent "
            f"ORDER BY name {order} LIMIT ?", (node.parent, node.name, NEIGHBOURS)).fetchall()
        out: list[Node] = []
        for (ino,) in rows:
            other = self.journal.get(ino)
            if other is not None and stat.S_ISREG(other.mode):
                out.append(other)
                if len(out) == n:
                    break
        return out

    def _worth(self, node: Node) -> bool:
        """Cheap checks, on the trio thread (the cache's own index is asked in ``run``)."""
        if self.stopped or not node.remote_key or node.size <= 0:
            return False
        if node.dirty & CONTENT or node.staged or node.ino in self.contents.states:
            # content written here (a working file, open for writing, staged, or an
            # upload of it running): what the bucket holds is not this file's content
            # (found by review: rebuilding one open for writing overwrote its hash)
            return False
        if node.size > MAX_SIZE or node.size > self.contents.cache.size_limit // 16:
            return False
        # the rebuild may fetch the reference beside the file
        return self.contents.free_bytes() - 2 * node.size >= ROOM

    async def run(self) -> None:
        """Until cancelled: rebuild each file asked for, after the one opened before it
        (its base, in a chained directory) is in the cache."""
        async for current, nxt, after in self._recv:
            if self.stopped:
                continue
            async with trio.open_nursery() as nursery:
                if after is not None:
                    nursery.start_soon(self._fetch_ahead, after)
                await self._rebuild(current, nxt)

    async def _wanted(self, queued: Node) -> Node | None:
        """``queued``'s row as it is now, if it is still worth fetching and its content
        is not in the cache (the cache's index is asked in a worker thread)."""
        node = self.journal.get(queued.ino)
        if node is None or not self._worth(node) or await trio.to_thread.run_sync(
                self.contents.cache.__contains__, self.contents.cache_key(node)):
            return None
        return node

    async def _rebuild(self, current: Node, nxt: Node) -> None:
        try:
            if not await self.contents.settled(current):
                return  # its open failed (and said why): nothing to build on
            node = await self._wanted(nxt)
            if node is None:
                return
            self.stats.started += 1
            log.debug("reading ahead: %s (after %s)", node.name, current.name)
            got = await self.contents.fetch(node, quiet=True)
            got.close()
        except trio.Cancelled:
            raise
        except Exception as exc:  # noqa: BLE001 - its open reports it, if it comes
            self.stats.failed += 1
            log.debug("read-ahead of %s failed: %r", nxt.name, exc)

    async def _fetch_ahead(self, after: Node) -> None:
        """GET the objects the file after next will be rebuilt from (not decoded: its
        base is the next file, still being rebuilt), so that its rebuild, when the next
        file is opened, starts with them on disk (see :mod:`prefetch`)."""
        from .index import stored_of

        try:
            node = await self._wanted(after)
            if node is None:
                return
            self.stats.fetched += await trio.to_thread.run_sync(
                self.contents.engine.fetch_ahead, stored_of(node), lambda: self.stopped)
        except trio.Cancelled:
            raise
        except Exception as exc:  # noqa: BLE001 - its rebuild GETs again and reports
            log.debug("fetch ahead of %s failed: %r", after.name, exc)
