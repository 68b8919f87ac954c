"""Listing sync: keeps each directory's rows in step with the bucket (LIST on first use
and after the TTL), applying a listing only to rows that did not change while it ran."""
from __future__ import annotations

import errno
import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Callable

import pyfuse3
import trio

from .content import Contents
from .engine import Engine
from .errors import StoreError
from .index import (DirListing, ListingEnd, Resolver, Snapshot, key_of, merge_listing,
                    stream_listing)
from .journal import CONTENT, ROOT_INO, Journal

if TYPE_CHECKING:
    from .fs import Options

log = logging.getLogger(__name__)

#: names merged per step on the trio thread (a checkpoint between steps)
MERGE_SLICE = 200


class DirSync:
    """LISTs directories when their rows are missing or stale, one listing at a time
    per directory, in a worker thread; the merge runs on the trio thread."""

    def __init__(self, journal: Journal, engine: Engine, prefix: str, contents: Contents,
                 options: "Options") -> None:
        self.journal = journal
        self.engine = engine
        self.prefix = prefix
        self.contents = contents
        self.options = options
        self._locks: dict[int, trio.Lock] = defaultdict(trio.Lock)
        #: called for each entry another writer replaced or removed (old inode, name)
        self.on_replaced: Callable[[int, int, str], None] = lambda parent, ino, name: None
        #: called after a directory was listed (what the listing found besides entries)
        self.on_listed: Callable[[int, ListingEnd], None] = lambda dir_ino, end: None
        #: resolves objects from a directory's manifest (None: HEAD every new object)
        self.resolve: Resolver | None = None
        #: whether a deltaspace is waiting for this mount's check of its reference (it
        #: lost its last delta here): a prefix holding only that reference is no
        #: directory, so the listing of its parent does not make one of it
        self.collect_pending: Callable[[str], bool] = lambda space: False

    def _fresh(self, listed_at: float | None) -> bool:
        return listed_at is not None and time.time() - listed_at < self.options.listing_ttl

    async def ensure_listed(self, dir_ino: int, force: bool = False) -> None:
        """Bring a directory's rows up to date with the bucket when its listing is
        missing or older than the TTL. Network errors leave the known rows in place."""
        node = self.journal.get(dir_ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if not node.is_dir or (self._fresh(node.listed_at) and not force):
            return
        lock = self._locks[dir_ino]
        try:
            async with lock:
                await self._list(dir_ino, force)
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._locks.pop(dir_ino, None)

    async def _list(self, dir_ino: int, force: bool) -> None:
        node = self.journal.get(dir_ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if self._fresh(node.listed_at) and not force:
            return
        if node.dirty & CONTENT and node.remote_key is None and node.listed_at is None \
                and dir_ino != ROOT_INO:
            # made here and never published: nothing to list
            self.journal.update(dir_ino, listed_at=time.time())
            return
        key = key_of(self.journal, self.prefix, dir_ino)
        prefix = f"{key}/" if key else ""
        if self.journal.db.in_transaction:
            # the listing reads the committed rows: commit first, or rows this mount
            # changed a moment ago would look "changed since" and keep stale values
            await self.contents.commit()
        started = time.time()

        def emit(part: DirListing, snap: Snapshot) -> None:  # in the worker thread
            trio.from_thread.run(self._apply, dir_ino, prefix, part, snap, started)

        try:
            end = await trio.to_thread.run_sync(
                stream_listing, self.engine, self.journal, dir_ino, prefix, emit,
                self.resolve)
        except StoreError as exc:
            if node.listed_at is None:
                log.warning("cannot list %s: %s", prefix or "/", exc)
                raise pyfuse3.FUSEError(errno.EIO) from None
            log.warning("cannot refresh %s, serving what is known: %s", prefix or "/", exc)
            # try again in 10 s, not on every operation while S3 is away
            self.journal.update(dir_ino, listed_at=time.time() -
                                max(0.0, self.options.listing_ttl - 10))
            return
        # rows whose object is gone, then the directory's own facts, in slices
        names = end.removals
        for i in range(0, max(len(names), 1), MERGE_SLICE):
            last = i + MERGE_SLICE >= len(names)
            done = DirListing({}, set(), end.marker, end.reference)  # used when last
            gone = merge_listing(self.journal, dir_ino, done, self.contents.busy(),
                                 self.options.uid, self.options.gid, end.removal_snapshot,
                                 started, names=names[i:i + MERGE_SLICE], final=last)
            self._replaced(dir_ino, gone)
            await trio.sleep(0)
        self.on_listed(dir_ino, end)
        if end.heads > 50:
            log.info("listed %s: %d HEAD requests (%d entries from its manifest)",
                     prefix or "/", end.heads, end.manifest_hits)

    async def _apply(self, dir_ino: int, prefix: str, part: DirListing, snap: Snapshot,
                     started: float) -> None:
        """Merge one LIST page, ``MERGE_SLICE`` names at a time with a checkpoint between
        slices: a 1,000-entry page never holds the loop for long."""
        hidden = {n for n in part.dirs if self.collect_pending(f"{prefix}{n}")
                  and self.journal.child(dir_ino, n) is None}
        if hidden:
            log.debug("listing %s: not showing %s yet (its reference is being checked)",
                      prefix or "/", sorted(hidden))
            part = DirListing(part.files, part.dirs - hidden, part.marker, part.reference,
                              part.dir_markers)
        names = [*part.files, *part.dirs]
        for i in range(0, len(names), MERGE_SLICE):
            chunk = names[i:i + MERGE_SLICE]
            sub = DirListing({n: part.files[n] for n in chunk if n in part.files},
                             {n for n in chunk if n in part.dirs}, None, None,
                             {n: part.dir_markers[n] for n in chunk if n in part.dir_markers})
            gone = merge_listing(self.journal, dir_ino, sub, self.contents.busy(),
                                 self.options.uid, self.options.gid, snap, started,
                                 names=chunk, final=False)
            self._replaced(dir_ino, gone)
            await trio.sleep(0)

    def _replaced(self, dir_ino: int, gone: list[tuple[int, str]]) -> None:
        for old_ino, name in gone:
            self.on_replaced(dir_ino, old_ino, name)

    async def ensure_listed_tree(self, dir_ino: int) -> None:
        await self.ensure_listed(dir_ino)
        for child in self.journal.children(dir_ino):
            if child.is_dir:
                await self.ensure_listed_tree(child.ino)
