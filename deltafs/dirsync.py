"""Listing sync: keeps each directory's rows in step with the bucket (LIST on first use
and after the TTL), applying a listing only to rows that did not change while it ran."""
from __future__ import annotations

import errno
import logging
import sqlite3
import time
from collections import OrderedDict, defaultdict
from typing import TYPE_CHECKING, Callable

import pyfuse3
import trio

from .content import Contents
from .engine import Engine
from .errors import StoreError
from .index import (DirListing, ListingEnd, Resolver, Snapshot, key_of, merge_listing,
                    stream_listing)
from .journal import CONTENT, ROOT_INO, Journal, Node

if TYPE_CHECKING:
    from .fs import Options

log = logging.getLogger(__name__)

#: how long one merge step may hold the trio loop; the number of names per step adapts
#: to it (a checkpoint between steps). A count alone did not bound it: 200 names took
#: 3-15 ms on a quiet machine and 100-370 ms while worker threads hashed and encoded
MERGE_STEP_S = 0.010
#: bounds of the names per step (the first step of a mount uses ``MERGE_SLICE``). The
#: most is kept low: a name costs 5-50 µs to merge depending on what changed, so a size
#: grown on cheap names held the loop far past its budget on the next costly ones (a
#: slice of up to 2,000 names: 67 ms of CPU in run 10's create); a step more per page
#: costs next to nothing
MERGE_SLICE, MERGE_SLICE_MIN, MERGE_SLICE_MAX = 200, 8, 400
#: one-name listings (a LIST of ``dir/name``) a stale directory gets per TTL before a
#: full listing is cheaper: at least this many, or as many as its last full listing
#: had LIST pages (so a walk over every name costs at most twice the full listings)
NAME_LISTINGS = 4
#: one-name listings remembered (per-name freshness); more costs only a LIST again
MAX_NAMES = 4096


class Slices:
    """Names per merge step, adapted so that a step holds the loop about
    ``MERGE_STEP_S``: scaled down at once after a slow step, doubled after a quick one.
    The step's time includes waiting for the GIL, which is what the loop feels."""

    def __init__(self, step_s: float = MERGE_STEP_S) -> None:
        self.step_s = step_s
        self.size = MERGE_SLICE

    def took(self, seconds: float, names: int) -> None:
        if seconds > self.step_s and names:
            self.size = max(MERGE_SLICE_MIN, int(names * self.step_s / seconds))
        elif seconds < self.step_s / 2 and names >= self.size:
            self.size = min(MERGE_SLICE_MAX, self.size * 2)

    async def each(self, names: list[str], step: Callable[[list[str], bool], None]) -> None:
        """Call ``step(slice, last)`` over ``names`` (once with an empty slice when
        there are none), with a checkpoint after each step. The first step takes at
        most ``MERGE_SLICE`` names: what the last call's names cost says little about
        these (a page of unchanged names merges many times faster than one of new
        rows; a size grown to a whole page on the first kind held the loop 44-53 ms of
        CPU on the next page in the scale benchmark's run 9)."""
        self.size = min(self.size, MERGE_SLICE)
        i = 0
        while True:
            chunk = names[i:i + self.size]
            i += len(chunk)
            t0 = time.perf_counter()
            step(chunk, i >= len(names))
            self.took(time.perf_counter() - t0, len(chunk))
            await trio.sleep(0)
            if i >= len(names):
                return


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
        #: (dir, name) -> when a one-name listing of it began
        self._names: OrderedDict[tuple[int, str], float] = OrderedDict()
        #: dir -> (start of its current TTL window, one-name listings in it)
        self._name_window: dict[int, tuple[float, int]] = {}
        #: dir -> LIST pages of its last full listing
        self._pages: dict[int, int] = {}
        #: directories a full listing runs for now
        self._relisting: set[int] = set()
        #: directories to list whole in the background (:meth:`run`), and its wake-up;
        #: ``_background`` once it runs (else the caller lists them itself)
        self._wanted: dict[int, None] = {}
        self._wake = trio.Event()
        self._background = False
        #: sub-prefixes a listing left out (see ``_going``): their parent is listed
        #: again once their reference check is done
        self.hidden_spaces: set[str] = set()
        self.slices = Slices()
        #: removals cost far more per name than a page of unchanged names: sized apart
        #: (sharing one size, the first slice of 10,000 removals after quick pages took
        #: 58 ms of CPU, 170 ms on a busy machine: the scale benchmark's run 7)
        self.removal_slices = Slices()

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

    async def run(self) -> None:
        """List whole, one at a time, the directories :meth:`ensure_name` found cheaper
        to list whole, while their name checks go on (until cancelled)."""
        self._background = True
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                while self._wanted:
                    dir_ino = next(iter(self._wanted))
                    del self._wanted[dir_ino]
                    try:
                        await self.ensure_listed(dir_ino)
                    except pyfuse3.FUSEError as exc:  # gone, or S3 away (logged)
                        log.debug("background listing of inode %d: %s", dir_ino, exc)
                    except Exception as exc:  # noqa: BLE001 - a cache refresh: never the mount
                        log.warning("background listing of inode %d failed (its names are "
                                    "checked one by one meanwhile): %s", dir_ino, exc)
        finally:
            self._background = False

    async def ensure_name(self, dir_ino: int, name: str) -> None:
        """Bring the row of one name up to date before an operation on it (lookup, open,
        create, unlink, rename) when the directory's listing is stale or missing: one
        LIST of ``dir/name`` instead of the whole directory. A directory that gets many
        such calls in one TTL is listed whole instead (it is cheaper by then), and so is
        one never listed."""
        node = self.journal.get(dir_ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if not node.is_dir or self._fresh(node.listed_at) or self._unpublished(node):
            return
        if dir_ino in self._relisting and node.listed_at is not None and \
                self.journal.child(dir_ino, name) is None:
            # the directory is being listed again whole (90,000 entries: 4-20 s on
            # moto): a name not known here does not wait for that listing. Every create
            # in a directory being filled did, every TTL (SEMANTICS.md)
            return
        if node.listed_at is None:
            # never listed: list it whole (its rows are what serves the names while S3
            # is away, and a readdir follows most first lookups anyway)
            await self.ensure_listed(dir_ino)
            return
        now = time.time()
        checked = self._names.get((dir_ino, name))
        if checked is not None and now - checked < self.options.listing_ttl:
            return
        start, count = self._name_window.get(dir_ino, (now, 0))
        if now - start >= self.options.listing_ttl:
            start, count = now, 0
        if count >= max(NAME_LISTINGS, self._pages.get(dir_ino, 0)):
            if not self._background:
                await self.ensure_listed(dir_ino)
                return
            # listed whole in the background; this name is checked on its own first
            self._wanted[dir_ino] = None
            self._wake.set()
        if len(self._name_window) >= MAX_NAMES:
            self._name_window.clear()
        self._name_window[dir_ino] = (start, count + 1)
        lock = self._locks[dir_ino]
        try:
            async with lock:
                node = self.journal.get(dir_ino)
                checked = self._names.get((dir_ino, name))
                if node is None or self._fresh(node.listed_at) or (
                        checked is not None and time.time() - checked < self.options.listing_ttl):
                    return
                await self._list(dir_ino, False, only=name)
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._locks.pop(dir_ino, None)

    def _unpublished(self, node: Node) -> bool:
        """A directory made here and never published: there is nothing to list."""
        return bool(node.dirty & CONTENT) and node.remote_key is None \
            and node.listed_at is None and node.ino != ROOT_INO

    def _name_listed(self, dir_ino: int, name: str, at: float) -> None:
        self._names[(dir_ino, name)] = at
        self._names.move_to_end((dir_ino, name))
        while len(self._names) > MAX_NAMES:
            self._names.popitem(last=False)

    async def _list(self, dir_ino: int, force: bool, only: str | None = None) -> None:
        node = self.journal.get(dir_ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if self._fresh(node.listed_at) and not force:
            return
        if self._unpublished(node):
            if only is None:
                self.journal.update(dir_ino, listed_at=time.time())
            return
        if only is None:
            self._relisting.add(dir_ino)
            try:
                await self._list_whole_or_name(dir_ino, node, None)
            finally:
                self._relisting.discard(dir_ino)
            return
        await self._list_whole_or_name(dir_ino, node, only)

    async def _list_whole_or_name(self, dir_ino: int, node: Node, only: str | None) -> None:
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
                self.resolve if only is None else None, only)
        except (StoreError, sqlite3.OperationalError) as exc:
            # (OperationalError: the listing's copy of the journal's rows could not be
            # written, SQLite's temp directory full or unwritable: TROUBLESHOOTING.md)
            what = prefix + (only or "") or "/"
            if node.listed_at is None and (only is None or self.journal.child(
                    dir_ino, only) is None):
                log.warning("cannot list %s: %s", what, exc)
                raise pyfuse3.FUSEError(errno.EIO) from None
            log.warning("cannot refresh %s, serving what is known: %s", what, exc)
            if only is not None:  # again in 10 s, not on every operation
                self._name_listed(dir_ino, only,
                                  time.time() - max(0.0, self.options.listing_ttl - 10))
                return
            # try again in 10 s, not on every operation while S3 is away
            self.journal.update(dir_ino, listed_at=time.time() -
                                max(0.0, self.options.listing_ttl - 10))
            return
        if only is not None:
            if end.removals:
                gone = merge_listing(self.journal, dir_ino, DirListing({}, set(), None, None),
                                     self.contents.busy(), self.options.uid,
                                     self.options.gid, end.removal_snapshot, started,
                                     names=end.removals, final=False)
                self._replaced(dir_ino, gone)
            self._name_listed(dir_ino, only, started)
            if end.pages > 1:  # a name many others start with: count what it cost
                start, count = self._name_window.get(dir_ino, (started, 0))
                self._name_window[dir_ino] = (start, count + end.pages - 1)
            return
        if len(self._pages) >= MAX_NAMES:
            self._pages.clear()
        self._pages[dir_ino] = end.pages
        self._name_window.pop(dir_ino, None)
        # rows whose object is gone, then the directory's own facts, in slices
        done = DirListing({}, set(), end.marker, end.reference)  # used when last

        def removals(chunk: list[str], last: bool) -> None:
            gone = merge_listing(self.journal, dir_ino, done, self.contents.busy(),
                                 self.options.uid, self.options.gid, end.removal_snapshot,
                                 started, names=chunk, final=last)
            self._replaced(dir_ino, gone)

        await self.removal_slices.each(list(end.removals), removals)
        self.on_listed(dir_ino, end)
        if end.heads > 50:
            log.info("listed %s: %d HEAD requests (%d entries from its manifest)",
                     prefix or "/", end.heads, end.manifest_hits)

    async def _apply(self, dir_ino: int, prefix: str, part: DirListing, snap: Snapshot,
                     started: float) -> None:
        """Merge one LIST page in steps of about ``MERGE_STEP_S`` with a checkpoint
        between them: a 1,000-entry page never holds the loop for long."""
        hidden = {n for n in part.dirs if self.journal.child(dir_ino, n) is None
                  and self._going(f"{prefix}{n}", started)}
        if hidden:
            log.debug("listing %s: not showing %s (this mount is removing or checking "
                      "what is left under it)", prefix or "/", sorted(hidden))
            # relisted once their reference check is done; the others show again (if
            # anything is left under them) at the next listing
            self.hidden_spaces.update(f"{prefix}{n}" for n in hidden
                                      if self.collect_pending(f"{prefix}{n}"))
            part = DirListing(part.files, part.dirs - hidden, part.marker, part.reference,
                              part.dir_markers)
        names = [*part.files, *part.dirs]
        if not names:
            return

        def step(chunk: list[str], last: bool) -> None:
            sub = DirListing({n: part.files[n] for n in chunk if n in part.files},
                             {n for n in chunk if n in part.dirs}, None, None,
                             {n: part.dir_markers[n] for n in chunk if n in part.dir_markers})
            gone = merge_listing(self.journal, dir_ino, sub, self.contents.busy(),
                                 self.options.uid, self.options.gid, snap, started,
                                 names=chunk, final=False)
            self._replaced(dir_ino, gone)

        await self.slices.each(names, step)

    def _going(self, space: str, started: float) -> bool:
        """Whether a sub-prefix with no row here is on its way out because of this mount:
        its reference check is pending, a queued delete or a live row's published object
        (a rename not yet carried out) lies under it, or this mount removed an object
        under it after the listing began (the listing may predate that delete). A listing
        must not make a directory of it (no listing ever removes a directory row, so it
        would stay)."""
        if self.collect_pending(space):
            return True
        lo, hi = f"{space}/", f"{space}0"  # "0" sorts right after "/"
        if self.journal.gone_under_since(lo, started):
            return True
        return self.journal.x(
            "SELECT 1 FROM tombstones WHERE object_key >= ? AND object_key < ? LIMIT 1",
            (lo, hi)).fetchone() is not None or self.journal.x(
            "SELECT 1 FROM nodes WHERE remote_key >= ? AND remote_key < ? AND parent != 0 "
            "LIMIT 1", (lo, hi)).fetchone() is not None

    def _replaced(self, dir_ino: int, gone: list[tuple[int, str]]) -> None:
        for old_ino, name in gone:
            self.on_replaced(dir_ino, old_ino, name)

    async def ensure_listed_tree(self, dir_ino: int) -> None:
        await self.ensure_listed(dir_ino)
        for child in self.journal.children(dir_ino):
            if child.is_dir:
                await self.ensure_listed_tree(child.ino)
