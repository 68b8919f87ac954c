"""The background uploader: brings the bucket in line with the journal's dirty rows.

Rows are picked in inode order, at most ``concurrency`` at a time, each in a worker
thread (encode, upload, copy and delete are all blocking). Work on one key never overlaps
with other work on that key (a rename claims its source key too), and content is never
uploaded to a key whose old object a pending rename still has to move away. What a row
looked like when its upload began is compared with what it looks like after; if it
changed meanwhile (a new write, a rename) the row stays dirty for the next round; if it
was unlinked, what was just written gets a tombstone.

Failures are classified (:attr:`deltafs.errors.StoreError.permanent`): transient ones are
retried with exponential backoff up to a minute, tombstones included; permanent ones
(a key the server refuses, AccessDenied) stop, are logged once with the real cause and
shown in ``deltafs status``, and do not hold up ``umount``. A row that changes after a
permanent failure is tried again.
"""
from __future__ import annotations

import errno
import hashlib
import logging
from collections import deque
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import trio

from .content import ORPHAN_PARENT, Contents
from .crashpoints import crash_point
from . import chain
from .engine import Engine
from .errors import AccessDenied, BucketNotFound, Changed, DeltafsError, NotFound
from .format import Attrs, Kind, StoredFile, delta_key, join_key, reference_key, split_key
from .index import key_of, stored_of
from .manifest import MANIFEST_NAME
from .journal import ATTRS, CONTENT, MOVED, Journal, Node

log = logging.getLogger(__name__)

MAX_BACKOFF = 60.0
#: how long a version waits for its predecessor's upload to be encoded against it
BASE_WAIT = 30.0
#: a missing bucket or refused credentials count as failed (fsync EIO, umount does not
#: wait) after this many attempts; they are still retried, backed off
BUCKET_WIDE_ATTEMPTS = 3


#: dirty rows read per query by the scheduler, one loop step: each row read, and each
#: query its checks make, gives up the GIL, and taking it back waits while worker threads
#: (or, on a busy machine, the CPU) hold it (100-row pages: 104-169 ms steps with 2-3 ms
#: of CPU, in the scale benchmark's copy of 10,000 deltas)
SCHEDULE_PAGE = 20
#: rows a pass looks at: the oldest, then a window of the others that moves on each pass
#: (versions of a series wait on each other: while at most SCAN_HEAD rows are dirty
#: every row is looked at on every pass, in inode order, as before the window)
SCAN_HEAD = 1000
SCAN_WINDOW = 200
#: the pause after a scheduling pass that read n dirty rows: n * GAP_PER_ROW, at most
#: SCHEDULE_GAP. A copy of small files kicks the scheduler twice per file (staged,
#: uploaded), and a pass reads up to SCAN_HEAD + SCAN_WINDOW rows: without a pause the
#: event loop spent ~10 % of its time re-reading them. Up to twice as many uploads as
#: slots are started per pass, so the slots stay busy across the pause; an urgent kick
#: skips it
SCHEDULE_GAP = 0.05
GAP_PER_ROW = 0.0005
#: deletes in flight at once (each waits for an upload slot), and how many queued
#: tombstones one scheduling pass looks at
MAX_TOMBSTONES = 32
MAX_TOMBSTONE_SCAN = 64


#: a directory's reference is checked this long after its last delta went
COLLECT_QUIET = 1.0
#: after a failed reference check (S3 away), wait this long before the next
COLLECT_RETRY = 30
#: a full cache disk starts backing-off uploads early at most this often (seconds)
FORCED_RETRY = 5.0


def _backoff(attempt: int) -> float:
    return min(MAX_BACKOFF, 0.5 * math.pow(2, min(attempt - 1, 8)))


def _signature(node: Node) -> tuple[object, ...]:
    return (node.sha256, node.staged, node.parent, node.name, node.mode, node.uid,
            node.gid, node.mtime_ns, node.dirty, node.target)


def _both(key: str, guard: str) -> list[tuple[str, str | None]]:
    """A write to the logical ``key`` lands in either form."""
    return [(key, guard), (delta_key(key), guard)]


def _logical(object_key: str) -> str:
    return object_key[:-len(".delta")] if object_key.endswith(".delta") else object_key


@dataclass
class SyncState:
    """What ``deltafs status`` shows about uploads."""

    uploaded_files: int = 0
    uploaded_bytes: int = 0
    last_error: str = ""
    last_error_at: float = 0.0
    failures: dict[int, int] = field(default_factory=dict)  # ino -> consecutive failures
    retry_at: dict[int, float] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)  # ino -> permanent failure
    failed_sig: dict[int, tuple[object, ...]] = field(default_factory=dict)
    failed_keys: dict[int, str] = field(default_factory=dict)
    failed_retry: set[int] = field(default_factory=set)  # failed, but still retried
    tomb_failures: dict[str, int] = field(default_factory=dict)
    tomb_retry_at: dict[str, float] = field(default_factory=dict)
    tomb_failed: dict[str, str] = field(default_factory=dict)


class Writeback:
    """Drains dirty rows and tombstones to the bucket."""

    def __init__(self, journal: Journal, engine: Engine, prefix: str, contents: Contents,
                 *, concurrency: int = 4) -> None:
        self.journal = journal
        self.engine = engine
        self.prefix = prefix
        self.contents = contents
        self.limiter = trio.CapacityLimiter(concurrency)
        self.state = SyncState()
        self.wakeup = trio.Event()
        self._hurry = trio.Event()  # an urgent kick: no pause before the next pass
        self._rows_read = 0  # dirty rows the current scheduling pass read
        self._scan_after = 0  # where the next pass's window starts (an inode)
        self.changed = trio.Event()  # set after every completed item (fsync/umount wait)
        self._active: set[int] = set()
        self._active_keys: set[str] = set()
        self._active_tombstones: set[str] = set()
        self._seeded: set[int] = set()  # directories (inodes) known to have a reference
        #: per directory, the files last stored there as deltas: bases for the next
        self._recent: dict[int, deque[str]] = {}
        #: since when a version waits for its predecessor's upload (see _awaits_base)
        self._base_wait: dict[int, float] = {}
        #: the put each version started beside (see _awaits_base): Engine.put's ``after``
        self._after: dict[int, str] = {}
        self._seeding: set[int] = set()  # directories whose seeding upload is running
        self.touched: set[int] = set()  # directories whose attributes changed (setattr)
        self.stopping = False
        engine.on_announce = self._kick_from_thread
        # (object key, guard) an upload or a move may have written without recording it
        # yet (in flight, or failed after its PUT or copy) live in the journal's
        # ``attempts`` table, committed before the write starts (_attempt): see there
        self._prefetching: set[int] = set()
        #: rows whose move found its source gone and its content not cached (retried, as
        #: any 404: another mount may bring it back; an fsync does not wait for it)
        self._move_lost: set[int] = set()
        #: Journal.moves_marked when a pass found no row with a rename to carry out
        #: (then no row can block another: _blocked), or None
        self._no_moves_at: int | None = None
        #: directories (deltaspaces) that lost a delta: is their reference still used?
        #: asked once per burst of deletes (time of the last one), not once per delete
        #: (durable in the journal's ``collects`` table until the check is done)
        self._collect_wanted: dict[str, float] = dict.fromkeys(journal.collects(),
                                                               time.monotonic())
        self._collecting: set[str] = set()
        self._tomb_after = -1.0  # where the next scheduling pass reads the tombstones
        self._nursery: trio.Nursery | None = None
        contents.on_change = self.kick
        #: called with each object key this mount wrote, moved or deleted
        self.on_bucket_change: Callable[[str], None] = lambda key: None
        #: called with each deltaspace whose reference check finished
        self.on_collected: Callable[[str], None] = lambda space: None
        contents.uploads_running = lambda: bool(self._active)
        contents.may_free_room = self.may_free_room
        self._forced_retry = 0.0
        self._last_ok = self._last_fail = 0.0  # monotonic times of the last upload outcomes

    def kick(self, urgent: bool = False) -> None:
        """Wake the scheduler; ``urgent`` (someone waits on it: an fsync, a full cache
        disk) skips the pause between passes."""
        if urgent:
            self._hurry.set()
        self.wakeup.set()

    async def run(self) -> None:
        """Loop until cancelled: pick ready work, run it, wait for more."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            while True:
                began = trio.current_time()
                self._rows_read = 0
                started = await self._schedule(nursery)
                with trio.move_on_after(0.2 if started else 1.0):
                    await self.wakeup.wait()
                self.wakeup = trio.Event()
                if not self._hurry.is_set():
                    # the more rows the pass read, the longer the pause before the next
                    with trio.move_on_at(began + min(SCHEDULE_GAP,
                                                     self._rows_read * GAP_PER_ROW)):
                        await self._hurry.wait()
                self._hurry = trio.Event()

    async def _schedule(self, nursery: trio.Nursery) -> int:
        """Start the work that is ready: the oldest ``SCAN_HEAD`` dirty rows in inode
        order, then ``SCAN_WINDOW`` more from where the last pass's window ended (so a
        pass costs the same with 100 or 100,000 rows dirty), a page at a time with a
        checkpoint between pages; tombstones up to ``MAX_TOMBSTONES`` at a time."""
        if self.stopping:
            return 0
        now = time.monotonic()
        started = 0
        mark = self.journal.moves_marked
        self._no_moves_at = None if self.journal.any_moved() else mark
        claimed: set[int] = set()  # directories whose first reference candidate is seen
        # the oldest rows first, then a window of the rest that moves on each pass: a
        # pass looks at a bounded number of rows (each costs a few queries, and a series
        # waiting on its encodes can leave thousands dirty), yet every row gets its turn
        last = 0
        for where in ("head", "window"):
            after = last if where == "head" else max(last, self._scan_after)
            budget = SCAN_HEAD if where == "head" else SCAN_WINDOW
            seen = 0
            full = False
            while seen < budget and not full:
                if seen or where == "window":
                    await trio.sleep(0)
                page = self.journal.dirty_nodes(limit=min(SCHEDULE_PAGE, budget - seen),
                                                after_ino=after)
                self._rows_read += len(page)
                seen += len(page)
                if not page:
                    break
                for node in page:
                    after = node.ino
                    verdict = self._consider(node, now, claimed, where == "window")
                    if verdict == "full":
                        full = True
                        break
                    if verdict == "start":
                        nursery.start_soon(self._sync_node, node.ino)
                        started += 1
                if len(page) < SCHEDULE_PAGE and seen < budget:
                    break  # the end of the dirty rows
            if full:
                break
            if where == "head":
                if seen < budget:
                    self._scan_after = 0
                    break  # the head held every dirty row
                last = after
            else:
                self._scan_after = after if seen >= budget else 0
        # a window of the queue that moves on each pass: deletes failed for good or
        # backing off at its head must not starve the ones behind them
        window = self.journal.tombstones(limit=MAX_TOMBSTONE_SCAN, after=self._tomb_after)
        self._tomb_after = window[-1][3] if len(window) == MAX_TOMBSTONE_SCAN else -1.0
        for object_key, kind, etag, _ in window:
            if len(self._active_tombstones) >= MAX_TOMBSTONES:
                break
            if object_key in self._active_tombstones or object_key in self.state.tomb_failed \
                    or self.state.tomb_retry_at.get(object_key, 0) > now:
                continue
            self._active_tombstones.add(object_key)
            nursery.start_soon(self._sync_tombstone, object_key, kind, etag)
            started += 1
        for space, last in list(self._collect_wanted.items()):
            # not while an upload or a delete in that directory runs (both claim keys)
            if space in self._collecting or now - last < COLLECT_QUIET or any(
                    split_key(k)[0] == space for k in self._active_keys):
                continue
            del self._collect_wanted[space]
            self._collecting.add(space)
            nursery.start_soon(self._collect, space)
            started += 1
        return started

    def _consider(self, node: Node, now: float, claimed: set[int], window: bool) -> str:
        """One dirty row in a scheduling pass: "start" it, "skip" it, or the pass is
        "full" (twice as many uploads started as there are slots)."""
        if node.parent == ORPHAN_PARENT:
            return "skip"
        if self._seeds(node) and self.contents.upload_ready(node) and \
                node.ino not in self.state.failed:
            # Until a directory has its reference, its first candidate (lowest inode: the
            # first file written) owns the seeding, also while it waits to retry:
            # otherwise a later version becomes the reference after an outage. A pass
            # sees the head of the queue in inode order; in its window an older
            # candidate may lie before the window (asked below, only if it would start).
            if node.parent in claimed:
                return "skip"
            claimed.add(node.parent)
        else:
            window = False
        if node.ino in self._active or self.state.retry_at.get(node.ino, 0) > now:
            return "skip"
        if node.ino in self.state.failed and node.ino not in self.state.failed_retry:
            if self.state.failed_sig.get(node.ino) == _signature(node):
                return "skip"
            self._forget_failure(node.ino)  # changed since: try again
        if not self.contents.upload_ready(node):
            return "skip"
        if self.limiter.borrowed_tokens + len(self._active) > self.limiter.total_tokens * 2:
            return "full"
        if self._blocked(node) or self._awaits_base(node, now):
            return "skip"
        if window and any(self.contents.upload_ready(o) and o.ino not in self.state.failed
                          for o in self.journal.older_content(
                              node.parent, node.ino, self.engine.policy.min_delta_size)):
            return "skip"  # an older candidate of its directory (as the head would see)
        if self._seeds(node):
            # Until a directory has its reference, its uploads go one at a time in inode
            # (creation) order: the first file written becomes the reference, and no
            # upload is wasted on losing the creation race to our own.
            if node.parent in self._seeding:
                return "skip"
            self._seeding.add(node.parent)
        self._active.add(node.ino)
        self._base_wait.pop(node.ino, None)
        return "start"

    def collects_due(self) -> int:
        """Reference checks queued or running (not those backing off after an error)."""
        now = time.monotonic()
        return sum(t <= now for t in self._collect_wanted.values()) + len(self._collecting)

    def may_free_room(self) -> bool:
        """Whether waiting can make room on a full cache disk: uploads are running, or
        some back off after an error and may go now. Those are started at once when the
        last upload succeeded (S3 answers again), else at most once every
        ``FORCED_RETRY`` seconds: while S3 stays away, a full disk answers ENOSPC after
        one quick try instead of waiting out every write."""
        if self._active:
            return True
        if not self.state.retry_at:
            return False
        now = time.monotonic()
        if self._last_ok <= self._last_fail and now - self._forced_retry < FORCED_RETRY:
            return False
        self._forced_retry = now
        self.state.retry_at.clear()
        self.kick(urgent=True)
        return True

    def want_collect(self, space: str) -> None:
        """Queue the check of ``space``'s reference. Called *before* the delete or move
        of a delta, so the journal row commits no later than the end of its evidence."""
        self.journal.want_collect(space)
        self._collect_wanted[space] = time.monotonic()

    def collect_pending(self, space: str) -> bool:
        return space in self._collect_wanted or space in self._collecting

    async def _collect(self, space: str) -> None:
        """Remove ``space``'s reference if no delta uses it any more. On a store error
        the check stays queued (durably) and runs again later; it never raises."""
        try:
            async with self.limiter:
                await self._run(self.engine.collect_reference, space, False)
        except Exception as exc:  # noqa: BLE001 - retried; an unused reference only costs storage
            if getattr(exc, "permanent", False):
                # refused for good (access, an archived object): `deltafs gc` is the way
                log.error("cannot check whether %s/reference.bin is still used, not trying "
                          "again (`deltafs gc` removes it if unused): %s", space, exc)
                if space not in self._collect_wanted:
                    self.journal.collect_done(space)
                self.on_collected(space)
            else:
                log.warning("could not check whether %s/reference.bin is still used (will "
                            "try again in %d s): %s", space, COLLECT_RETRY, exc)
                self._collect_wanted.setdefault(space, time.monotonic() + COLLECT_RETRY)
        else:
            if space not in self._collect_wanted:  # not wanted again meanwhile
                self.journal.collect_done(space)
            self.on_collected(space)
        finally:
            self._collecting.discard(space)
            self._notify()

    def _awaits_base(self, node: Node, now: float) -> bool:
        """A version of a series waits for the one just below it by name (same template,
        not yet uploaded here) so it can be encoded against it: a chain, not a delta
        against whatever happened to be uploaded (``cp -r`` creates files in directory
        order and uploads run in parallel: the wheels stored 0.22 of their size instead
        of 0.13). Bounded: after ``BASE_WAIT`` seconds it goes anyway."""
        if not (node.is_file and node.dirty & CONTENT and node.parent in self._seeded
                and node.size >= self.engine.policy.min_delta_size
                and self.engine.policy.chains and self.engine.policy.format != "deltaglider"):
            return False
        mine = chain.template(node.name)
        if mine == node.name and "#" not in mine:
            return False  # no digits: no other name can share its template (no query)
        since = self._base_wait.setdefault(node.ino, now)
        st = self.contents.states.get(node.ino)
        if now - since > BASE_WAIT or (st is not None and st.flush):
            return False  # an fsync waits for this one: no waiting on another file
        for ino, name, dirty, size in self.journal.x(
                "SELECT ino, name, dirty, size FROM nodes WHERE parent=? AND name < ? "
                "ORDER BY name DESC LIMIT 4", (node.parent, node.name)).fetchall():
            if chain.template(name) != mine or size < self.engine.policy.min_delta_size:
                continue
            if ino in self._active:
                # once it has chosen its base and encodes, this one starts: it prepares
                # beside that encode and waits for its announce (its chain known, its
                # content cached) only before choosing its own base (Engine.put's
                # ``after``); it then encodes against it while it uploads
                # (engine._put_chain waits for it to be confirmed before uploading)
                try:
                    key = key_of(self.journal, self.prefix, ino)
                except KeyError:
                    return False
                if self.engine.chain_memory.pending(key) is None and (
                        not self.engine.chain_memory.is_encoding(key)
                        or not self.limiter.available_tokens):
                    # not encoding yet; or encoding, but this one would wait for it, and
                    # is started early only into a free slot (its wait holds one)
                    return True
                self._after[node.ino] = key
                return False
            # uploaded, failed or backing off: no use waiting (one still being written or
            # settling is waited for: cp -r writes the versions in directory order)
            return bool(dirty & CONTENT) and ino not in self.state.failed and \
                self.state.retry_at.get(ino, 0) <= now
        return False

    def _kick_from_thread(self) -> None:
        """A chained put started its encode or announced itself (called from its worker
        thread): the version waiting for it may start."""
        try:
            trio.from_thread.run_sync(self.kick)
        except Exception as exc:  # noqa: BLE001 - not a trio worker, or the loop is gone
            log.debug("no wake-up for the scheduler: %r", exc)

    def _blocked(self, node: Node) -> bool:
        """New content for a key, or a rename onto it, whose old object another row must
        still move away (a rename not yet carried out) waits for that move: going first
        would overwrite what the move is about to copy. Two renames waiting for each
        other (a swap) go ahead once this row's content is in the cache, from where a
        move whose source was overwritten is completed."""
        if node.is_dir or not node.dirty & (CONTENT | MOVED):
            return False
        if self._no_moves_at == self.journal.moves_marked:
            # no row has a rename to carry out (asked once per pass, not with two
            # queries per row: each gives the GIL up, see SCHEDULE_PAGE)
            return False
        try:
            key = key_of(self.journal, self.prefix, node.ino)
        except KeyError:
            return True
        blockers = [b for b in self.journal.claimers(key, but=node.ino)
                    if b.dirty & MOVED and b.parent != ORPHAN_PARENT]
        if not blockers:
            return False
        if node.dirty & CONTENT or not node.remote_key:
            return True
        ours = _logical(node.remote_key)
        for b in blockers:
            try:
                if key_of(self.journal, self.prefix, b.ino) != ours:
                    return True  # a chain: the other move goes first
            except KeyError:
                return True
        # a cycle: make sure our content survives being overwritten, then go
        if node.sha256 and node.sha256 in self.engine.cache:
            return False
        if node.ino not in self._prefetching and self._nursery is not None:
            self._prefetching.add(node.ino)
            self._nursery.start_soon(self._prefetch, node.ino)
        return True

    async def _prefetch(self, ino: int) -> None:
        try:
            node = self.journal.get(ino)
            if node is not None and node.remote_key:
                src = await self.contents.fetch(node)
                src.close()
        except Exception as exc:  # noqa: BLE001 - retried by the next schedule
            log.warning("cannot cache inode %d before a swap of names: %s", ino, exc)
        finally:
            self._prefetching.discard(ino)
            self.kick()

    def _seeds(self, node: Node) -> bool:
        """Whether uploading ``node`` may create its directory's reference."""
        return (node.is_file and bool(node.dirty & CONTENT) and node.parent not in self._seeded
                and node.size >= self.engine.policy.min_delta_size)

    def busy(self) -> bool:
        # a reference check backing off after a store error does not hold a drain: it
        # stays queued in the journal for the next mount
        return bool(self._active or self._active_keys or self._active_tombstones
                    or self.collects_due())

    def pending_failed(self) -> int:
        """Pending changes that failed (not waited for by drain/umount): rows still
        live and dirty, and tombstones."""
        live = 0
        for ino in list(self.state.failed):
            node = self.journal.get(ino)
            if node is None or node.parent == ORPHAN_PARENT or not node.dirty:
                self._forget_failure(ino)
            else:
                live += 1
        return live + len(self.state.tomb_failed)

    def unrecorded(self, ino: int) -> list[tuple[str, str | None]]:
        """(object key, guard) a write of ``ino`` may have left unrecorded (the journal's
        ``attempts``)."""
        return self.journal.attempts_of(ino)

    def forget(self, ino: int) -> None:
        """``ino`` left the namespace: its upload state goes with it."""
        self._forget_failure(ino)
        self.journal.drop_attempts(ino)
        self._base_wait.pop(ino, None)
        self.state.failures.pop(ino, None)
        self.state.retry_at.pop(ino, None)

    async def _claim(self, keys: list[str]) -> None:
        """Wait until no other work runs on any of the logical ``keys``, then take them.
        Called before taking an upload slot, so a waiter never holds one."""
        while any(k in self._active_keys for k in keys):
            await trio.sleep(0.05)
        self._active_keys.update(keys)

    # --------------------------------------------------------------- one row

    async def _sync_node(self, ino: int) -> None:
        seeding_parent: int | None = None
        keys: list[str] = []
        try:
            node = self.journal.get(ino)
            if node is not None and self._seeds(node) and node.parent in self._seeding:
                seeding_parent = node.parent
            if node is None or not node.dirty or node.parent == ORPHAN_PARENT:
                return
            key = key_of(self.journal, self.prefix, ino)
            wanted = [key]
            if node.dirty & MOVED and node.remote_key and _logical(node.remote_key) != key:
                wanted.append(_logical(node.remote_key))
            await self._claim(wanted)
            keys = wanted
            async with self.limiter:
                node = self.journal.get(ino)  # as it is now, after the wait
                if node is None or not node.dirty or node.parent == ORPHAN_PARENT or \
                        key_of(self.journal, self.prefix, ino) != key:
                    return
                await self._sync(node, key)
            self._last_ok = time.monotonic()
            self.state.failures.pop(ino, None)
            self.state.retry_at.pop(ino, None)
            self._forget_failure(ino)
        except KeyError:
            return  # unlinked (or below an unlinked directory) meanwhile
        except (DeltafsError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                await trio.to_thread.run_sync(self.engine.cache.shrink, 64 << 20)
            self._failed(ino, exc)
        except Exception as exc:  # noqa: BLE001 - a bug must not end all uploads
            log.exception("upload of inode %d failed unexpectedly", ino)
            self._failed(ino, exc)
        finally:
            for k in keys:
                self._active_keys.discard(k)
            self._active.discard(ino)
            self._after.pop(ino, None)
            if seeding_parent is not None:
                self._seeding.discard(seeding_parent)
            self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()
        self.kick()

    def _forget_failure(self, ino: int) -> None:
        self._move_lost.discard(ino)
        for d in (self.state.failed, self.state.failed_sig, self.state.failed_keys):
            d.pop(ino, None)
        self.state.failed_retry.discard(ino)

    def _failed(self, ino: int, exc: BaseException) -> None:
        node = self.journal.get(ino)
        where = node.name if node is not None else f"inode {ino}"
        try:
            where = key_of(self.journal, self.prefix, ino)
        except KeyError:
            pass
        self.state.last_error = f"{where}: {type(exc).__name__}: {exc}"
        self.state.last_error_at = time.time()
        self._last_fail = time.monotonic()
        bucket_wide = isinstance(exc, (AccessDenied, BucketNotFound))
        # a 404 during an upload is about something the put depends on (a reference
        # another mount removed a moment ago), never the local file: the next attempt
        # looks again, so it is retried, not given up for good
        gone = isinstance(exc, NotFound)
        if getattr(exc, "permanent", False) and node is not None and not bucket_wide \
                and not gone:
            self.state.failed[ino] = f"{type(exc).__name__}: {exc}"
            self.state.failed_sig[ino] = _signature(node)
            self.state.failed_keys[ino] = where
            self.state.failures.pop(ino, None)
            self.state.retry_at.pop(ino, None)
            log.error("upload of %s failed for good, not retrying until the file changes "
                      "(shown in `deltafs status`): %s", where, exc)
            return
        n = self.state.failures.get(ino, 0) + 1
        self.state.failures[ino] = n
        delay = _backoff(n)
        self.state.retry_at[ino] = time.monotonic() + delay
        if bucket_wide and n >= BUCKET_WIDE_ATTEMPTS and node is not None:
            # the bucket is gone or the credentials are refused: an operator may fix it,
            # so keep trying (backed off), but stop making fsync and umount wait for it
            self.state.failed[ino] = f"{type(exc).__name__}: {exc}"
            self.state.failed_sig[ino] = _signature(node)
            self.state.failed_keys[ino] = where
            self.state.failed_retry.add(ino)
        if n & (n - 1) == 0:  # attempts 1, 2, 4, 8, ...: not a line a second
            log.warning("upload of %s failed (attempt %d, retry in %.1f s): %s",
                        where, n, delay, exc)

    async def _sync(self, node: Node, key: str) -> None:
        attrs = Attrs(mode=node.mode, uid=node.uid, gid=node.gid, mtime_ns=node.mtime_ns)
        if node.is_dir:
            self.touched.discard(node.ino)
            await self._attempt(node.ino, [(key + "/", None)])
            info = await self._run(self.engine.put_marker, key, attrs)
            await self._published(node, key, key + "/", "marker", 0, None, None, etag=info.etag)
            self.journal.drop_attempts(node.ino)
            await self._commit()
            return
        old = stored_of(node) if node.remote_key else None
        if node.is_symlink:
            target = (node.target or b"").decode("utf-8", "surrogateescape")
            await self._attempt(node.ino, _both(key, "sha256:" + hashlib.sha256(
                target.encode("utf-8", "surrogateescape")).hexdigest()))
            res = await self._run(self.engine.put_symlink, key, target, attrs)
            await self._published(node, key, key, Kind.DIRECT.value, res.stored_size, None, res.sha256,
                                  etag=res.etag)
            self._drop_old(old, key)  # in the publish's transaction (see _drop_old)
            self.journal.drop_attempts(node.ino)
            await self._commit()
            self.kick()
            return
        if node.dirty & CONTENT:
            await self._upload(node, key, attrs, old)
            return
        if old is None:
            self.journal.update(node.ino, dirty=0)
            return
        if node.dirty & MOVED:
            if old.kind is Kind.DELTA:
                # queued first: a crash after the move must not forget the check
                self.want_collect(split_key(old.logical_key)[0])
            # the copy (or the put of a rebuilt delta) lands under ``key``: known by its
            # content, or else by the ETag a copy of a single-part object keeps
            # (both when known: an object read here may have a SHA-256 in the journal
            # but none in its metadata, and a copy of a multipart object a new ETag)
            sha = node.sha256 or old.sha256
            await self._attempt(node.ino, [
                a for g in (f"sha256:{sha}" if sha else None, old.etag or None) if g
                for a in _both(key, g)])
            try:
                # the source stays until the move is recorded (its tombstone goes in
                # the publish's transaction): deleted first, a crash before the record,
                # with the file renamed on meanwhile, left only the copy, which that
                # rename queued for deletion (found by review)
                moved = await self._run(self.engine.move, old, key, attrs, False, False)
            except (NotFound, Changed) as exc:
                if isinstance(exc, Changed):
                    log.warning("rename to %s: another writer replaced %s since this mount "
                                "saw it; theirs stays, ours goes to the new name from the "
                                "cache", key, old.object_key)
                moved = await self._replay_move(node, old, key, attrs)
            crash_point("move-before-publish")
            await self._published(node, key, moved.object_key, moved.kind.value, moved.object_size,
                                  moved.ref_key, node.sha256 or moved.sha256 or "",
                                  etag=moved.etag)
            self._drop_old(old, moved.object_key)  # in the publish's transaction
            self.journal.drop_attempts(node.ino)  # recorded, or left to a tombstone
            await self._commit()
            return
        if node.dirty & ATTRS:
            try:
                updated = await self._run(self.engine.set_attrs, old, attrs)
            except (NotFound, Changed):
                log.info("chmod/utimes of %s not stored: another writer replaced or removed "
                         "it since this mount saw it (theirs stays)", old.object_key)
                self.journal.x("UPDATE nodes SET dirty = dirty & ~? WHERE ino = ?",
                               (ATTRS, node.ino))
                return
            await self._published(node, key, updated.object_key, updated.kind.value,
                                  updated.object_size, updated.ref_key, node.sha256 or "",
                                  etag=updated.etag)

    async def _commit(self) -> None:
        await self.contents.commit()

    async def _attempt(self, ino: int, items: list[tuple[str, str | None]]) -> None:
        """Writes of ``ino`` (object key, guard) are about to start: durable first (an
        fsync, in a worker thread). Without it a power loss could keep the write and
        lose the attempt while the next run renames or unlinks the row (second review
        of the journal's attempts)."""
        if items and self.journal.add_attempts(ino, items):
            await self._commit()

    async def _upload(self, node: Node, key: str, attrs: Attrs, old: StoredFile | None) -> None:
        """Upload the staged content of ``node`` from a snapshot of its sealed file."""
        got = self.contents.begin_upload(node)
        if got is None:
            if node.sha256 is None:
                return  # written but not staged yet: its close or fsync stages it
            log.error("inode %d (%s) is dirty but its staged file %s is gone; keeping the "
                      "last published version", node.ino, key, node.staged)
            self.journal.x("UPDATE nodes SET dirty = dirty & ~1 WHERE ino = ?", (node.ino,))
            return
        snap, seq = got
        recorded = landed = False
        object_key = ""
        try:
            space = split_key(key)[0]
            # only a file that was ever published (or the bucket's own objects, which
            # the index gives a remote_key) can have an older object in the other form
            # ... or an earlier try of this row that failed after its PUT (it may have
            # stored the other form; this one must not leave it beside its own)
            check_other = old is not None or self.journal.has_attempts(node.ino)
            if old is not None and old.kind is Kind.DELTA:
                # a delta stored again direct (now too small, or incompressible) leaves
                # its reference perhaps unused: queued first, as for a delete
                self.want_collect(split_key(old.logical_key)[0])
            crash_point("upload-before-put")
            if node.sha256:
                await self._attempt(node.ino, _both(key, f"sha256:{node.sha256}"))
            hints = self._base_hints(node, key, old)
            res = await self._run(self.engine.put, snap, key, attrs, node.sha256, True,
                                  check_other, hints, self._after.pop(node.ino, ""))
            crash_point("upload-after-put")
            if res.kind in ("reference", "delta"):
                self._seeded.add(node.parent)
                recent = self._recent.setdefault(node.parent, deque(maxlen=4))
                if key in recent:
                    recent.remove(key)
                recent.append(key)  # the next file here is likely its next version
                if len(self._recent) > 1024:
                    self._recent.pop(next(iter(self._recent)))
            if res.kind == "reference":
                self.journal.set_reference(node.parent, reference_key(space), res.original_size)
            object_key = delta_key(key) if res.kind in ("delta", "reference") else key
            kind = Kind.DELTA.value if res.kind in ("delta", "reference") else Kind.DIRECT.value
            ref = reference_key(space) if kind == Kind.DELTA.value else None
            recorded = await self._published(
                node, key, object_key, kind,
                res.object_size if res.object_size >= 0 else
                res.stored_size - (res.original_size if res.kind == "reference" else 0),
                ref, res.sha256, etag=res.etag)
            self.journal.drop_attempts(node.ino)  # recorded, or left to a tombstone
            # The row names this object now, even when it changed meanwhile (written
            # again, renamed): everything staged up to ``seq`` is in the bucket, so an
            # fsync waiting for that version is done (it need not wait for the next)
            row = self.journal.get(node.ino)
            landed = recorded
            if not landed and row is not None and row.remote_key == object_key and \
                    row.remote_etag == (res.etag or None):
                try:
                    # still under the key it went up to: after a rename meanwhile another
                    # file may take that key before this row's move carries it over
                    landed = key_of(self.journal, self.prefix, node.ino) == key
                except KeyError:
                    landed = False
            self._drop_old(old, object_key)  # in the publish's transaction (see _drop_old)
            if recorded:
                self.state.uploaded_files += 1
                self.state.uploaded_bytes += res.original_size
            crash_point("publish-before-commit")
        finally:
            # commits the result, then the snapshot becomes a cache entry
            await self.contents.end_upload(node.ino, snap, seq, node.staged, node.sha256,
                                           recorded, landed)
        crash_point("publish-after-commit")
        if object_key:
            self.kick()  # the old object's tombstone

    def _base_hints(self, node: Node, key: str, old: StoredFile | None) -> tuple[str, ...]:
        """Likely bases for a delta of ``key`` (deltafs.chain ranks them): its own older
        version, its neighbours by name in the directory that are published as deltas
        (release series sort by version: found in any copy order), and the files this
        mount stored there last. Bounded: two range scans of the (parent, name) index
        that read 16 rows each, whatever their kind (a filter in the query would scan a
        directory of 100,000 plain files to the end on every upload)."""
        space = split_key(key)[0]
        out = [old.logical_key] if old is not None and old.kind is Kind.DELTA else []
        q = ("SELECT name, remote_kind FROM nodes WHERE parent=? AND name {} ? "
             "ORDER BY name {} LIMIT 16")
        for op, order in (("<", "DESC"), (">", "ASC")):
            for name, kind in self.journal.x(q.format(op, order),
                                             (node.parent, node.name)).fetchall():
                if kind == Kind.DELTA.value:
                    out.append(join_key(space, name))
        out += reversed(self._recent.get(node.parent, ()))
        return tuple(dict.fromkeys(out))

    async def _replay_move(self, node: Node, old: StoredFile, key: str, attrs: Attrs
                           ) -> StoredFile:
        """The object to move is gone: a crash between the copy and the journal commit
        (it is at the new key already), or it was lost. Look where it really is."""
        found = await self._run(self._stat_or_none, key)
        if found is not None and (node.sha256 is None or found.sha256 == node.sha256):
            log.info("rename of %s: already at %s (finishing an interrupted move)",
                     old.object_key, found.object_key)
            return found
        if node.sha256:
            tmp = self.engine.tmp_dir / f"reput-{node.ino}-{time.monotonic_ns()}"
            try:
                if await trio.to_thread.run_sync(self.engine.cache.link, node.sha256, tmp):
                    log.warning("rename of %s: the object is gone; uploading the cached "
                                "content to %s", old.object_key, key)
                    await self._run(self.engine.put, tmp, key, attrs, node.sha256, True, True)
                    return await self._run(self.engine.stat, key)
            finally:
                tmp.unlink(missing_ok=True)
        self._move_lost.add(node.ino)
        raise NotFound(f"{old.object_key} is gone from the bucket and its content is not "
                       "cached: the rename cannot be carried out")

    def _stat_or_none(self, key: str) -> StoredFile | None:
        try:
            return self.engine.stat(key)
        except NotFound:
            return None

    def _drop_old(self, old: StoredFile | None, new_object_key: str) -> None:
        """After publishing under a new key, the object under the old key goes. Queued in
        the same transaction as the publish, with no checkpoint in between: once the row
        no longer claims the old object, a listing merged in between (or the next mount,
        after a crash between two commits) would find it unclaimed and with no tombstone,
        and bring it back as a file (found by the model test: a renamed file came back
        under its old name, with the delta's object size)."""
        if old is None or old.object_key == new_object_key:
            return
        if old.object_key in (new_object_key, new_object_key + ".delta") or \
                new_object_key == old.object_key + ".delta":
            return  # same logical key: engine.put already dropped the other form
        if self.journal.remote_claimed(old.object_key):
            return  # another live row is published there now
        self.journal.add_tombstone(old.object_key, old.kind.value, old.etag or None)

    async def _published(self, before: Node, key: str, object_key: str, kind: str,
                         stored_size: int, ref: str | None, sha256: str | None,
                         etag: str = "") -> bool:
        """Record a finished upload of ``before`` to ``key``, unless the row changed while
        it ran (then it stays dirty and the next round publishes the newer state).
        Returns whether recorded. Every object this mount writes ends up in a live row
        or in a tombstone."""
        self.on_bucket_change(object_key)
        now = self.journal.get(before.ino)
        fields = dict(remote_key=object_key, remote_kind=kind, remote_size=stored_size,
                      remote_etag=etag or None, remote_ref=ref)
        try:
            now_key = key_of(self.journal, self.prefix, before.ino) if now is not None \
                and now.parent != ORPHAN_PARENT else None
        except KeyError:
            now_key = None  # below a directory unlinked meanwhile
        if now is None or now_key is None:
            # Unlinked while uploading: what we just wrote must go.
            self.journal.add_tombstone(object_key, kind, etag or None)
            return False
        if before.is_dir and now_key != key:
            # renamed (or a parent was) while its marker went up: the marker at the old
            # key goes, a new one is made under the new key
            self.journal.add_tombstone(object_key, kind, etag or None)
            self.journal.set_dirty(before.ino, CONTENT)
            return False
        if before.is_dir:
            # a directory's mtime moves with every file made in it; only an explicit
            # setattr (recorded in ``touched``) asks for the marker again
            unchanged = (now.parent == before.parent and now.name == before.name
                         and now.mode == before.mode and now.uid == before.uid
                         and now.gid == before.gid and before.ino not in self.touched)
        else:
            unchanged = (now_key == key and now.sha256 == before.sha256
                         and now.parent == before.parent
                         and now.name == before.name and now.mode == before.mode
                         and now.uid == before.uid and now.gid == before.gid
                         and now.mtime_ns == before.mtime_ns and now.staged == before.staged
                         and now.target == before.target)
        if unchanged:
            fields["dirty"] = 0
            fields["staged"] = None
        else:
            # keep the newer state dirty; the object we wrote is now the published one
            fields["dirty"] = now.dirty | MOVED
        self.journal.update(before.ino, **fields)
        return unchanged

    async def _sync_tombstone(self, object_key: str, kind: str | None,
                              etag: str | None = None) -> None:
        claimed = ""
        try:
            if object_key.endswith("/"):
                logical = object_key.rstrip("/")  # a marker: the directory's own key
            else:
                # (a guard by content has no kind yet: a ``.delta`` key is a delta's)
                logical = _logical(object_key) if kind != Kind.DIRECT.value else object_key
            await self._claim([logical])
            claimed = logical
            async with self.limiter:
                # as it is now, after the wait: an upload that held the key may have
                # queued a newer tombstone for the object it just wrote
                current = self.journal.tombstone(object_key)
                if current is None:
                    return
                kind, etag = current
                queued = etag
                guards = (etag or "").split()
                by_content = any(g.startswith("sha256:") for g in guards)
                owners = self.journal.claimers_of(object_key)
                if owners and (not by_content or not all(o.remote_etag for o in owners)):
                    self.journal.drop_tombstone(object_key, queued)
                    return
                if by_content or len(guards) > 1:
                    # which of the guarded objects is there, if any: a write of ours that
                    # may have landed unrecorded is known by its content. A live row that
                    # is published under this key owns it only as the object it recorded
                    # (our own unrecorded write may have replaced that one since)
                    etag = await self._run(self._guarded_etag, object_key, guards,
                                           {o.remote_etag for o in owners if o.remote_etag})
                    if etag is None:
                        self.journal.drop_tombstone(object_key, queued)
                        return
                if kind is None and object_key.endswith(".delta"):
                    kind = Kind.DELTA.value  # a write's guard has no kind: the key tells
                stored = StoredFile(logical, object_key,
                                    Kind.DELTA if kind == Kind.DELTA.value else Kind.DIRECT,
                                    0, etag or "", 0.0, None)
                if stored.kind is Kind.DELTA:
                    # queued first: a crash after the delete must not forget the check
                    self.want_collect(split_key(logical)[0])
                try:
                    await self._run(self.engine.delete_stored, stored, False)
                    if split_key(object_key)[1] != MANIFEST_NAME:
                        self.on_bucket_change(object_key)
                except NotFound:
                    pass  # gone already (another writer deleted it, or a replay)
                except Changed:
                    log.info("not deleting %s: another writer has replaced it since this "
                             "mount saw it (theirs stays)", object_key)
                crash_point("tombstone-after-delete")
                self.journal.note_gone(object_key)
                self.journal.drop_tombstone(object_key, queued)
                self.state.tomb_failures.pop(object_key, None)
                self.state.tomb_retry_at.pop(object_key, None)
        except Exception as exc:  # noqa: BLE001 - retried; a bug must not end all uploads
            if not isinstance(exc, (DeltafsError, OSError)):
                log.exception("delete of %s failed unexpectedly", object_key)
            self.state.last_error = f"{object_key}: {type(exc).__name__}: {exc}"
            self.state.last_error_at = time.time()
            if getattr(exc, "permanent", False) and \
                    not isinstance(exc, (AccessDenied, BucketNotFound)):
                self.state.tomb_failed[object_key] = f"{type(exc).__name__}: {exc}"
                log.error("delete of %s failed for good, not retrying in this mount: %s",
                          object_key, exc)
            else:
                n = self.state.tomb_failures.get(object_key, 0) + 1
                self.state.tomb_failures[object_key] = n
                delay = _backoff(n)
                self.state.tomb_retry_at[object_key] = time.monotonic() + delay
                if n & (n - 1) == 0:  # attempts 1, 2, 4, 8, ...: not a line a second
                    log.warning("delete of %s failed (attempt %d, retry in %.1f s): %s",
                                object_key, n, delay, exc)
        finally:
            if claimed:
                self._active_keys.discard(claimed)
            self._active_tombstones.discard(object_key)
            self._notify()

    def _guarded_etag(self, object_key: str, guards: list[str], owned: set[str]
                      ) -> str | None:
        """The ETag of ``object_key`` if what is there now matches one of ``guards`` (an
        ETag, or ``sha256:<hex>`` of its content) and is not a live row's recorded object
        (ETags in ``owned``), else None (then it is not ours to delete)."""
        from .format import meta_get

        info = self.engine.store.head(object_key)
        if info is None or not info.etag or info.etag in owned:
            return None
        sha = meta_get(info.metadata, "file_sha256")
        if info.etag in guards or (sha and f"sha256:{sha}" in guards):
            return info.etag
        return None

    async def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        return await trio.to_thread.run_sync(fn, *args)

    async def wait_clean(self, ino: int, timeout: float | None = None) -> bool:
        """Wait until ``ino`` has nothing left to upload (fsyncdir); False if its upload
        failed for good."""
        with trio.move_on_after(timeout if timeout is not None else math.inf):
            while True:
                node = self.journal.get(ino)
                if node is None or not node.dirty or node.parent == ORPHAN_PARENT:
                    return True
                if ino in self.state.failed:
                    return False
                self.kick(urgent=True)
                await self.changed.wait()
        return False

    async def wait_published(self, ino: int, seq: int) -> bool | None:
        """Wait until the version of ``ino`` staged as ``seq`` is in the bucket (fsync);
        later writes need not be. False if its upload failed for good; None if it was
        superseded before its upload took it (a write came first: the row now names the
        unstaged working file, so that version will never go up), and the caller must
        stage again and wait for that one, which holds everything the first one did."""
        while True:
            node = self.journal.get(ino)
            if node is None or not node.dirty or node.parent == ORPHAN_PARENT:
                return True
            st = self.contents.states.get(ino)
            moving = seq and st is not None and st.published_seq >= seq
            if moving and self._under_its_name(node):
                return True
            # (renamed since, that version is in the bucket under the old name until the
            # move is done: the fsync waits for the move, found by the model test; but
            # not for one that keeps failing, or waits behind a row that failed for good)
            if ino in self._move_lost and not node.dirty & CONTENT:
                return False  # (new content is uploaded, not moved: waited for)
            if self._behind_failed(node):
                return False
            if node.is_file and node.dirty & CONTENT and node.sha256 is None and \
                    ino not in self._active:
                return None
            if ino in self.state.failed and \
                    self.state.failed_sig.get(ino) == _signature(node):
                return False
            if not moving:
                self.state.retry_at.pop(ino, None)  # (a move retries at its own pace)
            self.kick(urgent=True)
            # bounded: the write that supersedes the version (above) sets no event, and
            # when it lands before the scheduler took the row nothing else will
            with trio.move_on_after(1.0):
                await self.changed.wait()

    def _behind_failed(self, node: Node) -> bool:
        """Whether ``node`` waits (:meth:`_blocked`) for the move of a row whose upload
        failed for good: that move will not come."""
        if not self.state.failed or node.is_dir or not node.dirty & (CONTENT | MOVED):
            return False
        try:
            key = key_of(self.journal, self.prefix, node.ino)
        except KeyError:
            return False
        # (not one changed since: the scheduler tries it again; nor a cycle of renames,
        # which _blocked lets go once this row's content is cached)
        return any(b.ino in self.state.failed and b.dirty & MOVED and
                   self.state.failed_sig.get(b.ino) == _signature(b)
                   for b in self.journal.claimers(key, but=node.ino)) and \
            self._blocked(node)

    def _under_its_name(self, node: Node) -> bool:
        """Whether the object ``node`` is published as is under its current key."""
        if not node.remote_key:
            return False
        try:
            return _logical(node.remote_key) == key_of(self.journal, self.prefix, node.ino)
        except KeyError:
            return False

    async def drain(self, timeout: float) -> bool:
        """Wait until nothing is pending but what failed for good (umount, SIGTERM), at
        most ``timeout`` seconds."""
        with trio.move_on_after(timeout):
            while True:
                files, _ = self.journal.pending()
                if files <= self.pending_failed() and not self.busy():
                    return True
                self.state.retry_at.clear()
                self.state.tomb_retry_at.clear()
                self.kick()
                with trio.move_on_after(1.0):
                    await self.changed.wait()
        return False
