"""The background uploader: brings the bucket in line with the journal's dirty rows.

Rows are picked in inode order, at most ``concurrency`` at a time, each in a worker
thread (encode, upload, copy and delete are all blocking). Work on one key never overlaps
with other work on that key. A failure leaves the row dirty and is retried with backoff,
forever: nothing that ``close()`` accepted is ever dropped. What a row looked like when
its upload began is compared with what it looks like after; if it changed meanwhile (a
new write, a rename) the row stays dirty for the next round.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import trio

from .engine import Engine
from .errors import DeltafsError, NotFound
from .format import Attrs, Kind, delta_key, split_key
from .index import key_of, stored_of
from .journal import ATTRS, CONTENT, MOVED, Journal, Node

log = logging.getLogger(__name__)


@dataclass
class SyncState:
    """What ``deltafs status`` shows about uploads."""

    uploaded_files: int = 0
    uploaded_bytes: int = 0
    last_error: str = ""
    last_error_at: float = 0.0
    failures: dict[int, int] = field(default_factory=dict)  # ino -> consecutive failures
    retry_at: dict[int, float] = field(default_factory=dict)


class Writeback:
    """Drains dirty rows and tombstones to the bucket."""

    def __init__(self, journal: Journal, engine: Engine, prefix: str, *,
                 concurrency: int = 4, on_clean: Callable[[Node, str], Awaitable[None]] | None = None,
                 is_open_for_write: Callable[[int], bool] = lambda ino: False,
                 has_writers: Callable[[int], bool] = lambda ino: False) -> None:
        self.journal = journal
        self.engine = engine
        self.prefix = prefix
        self.limiter = trio.CapacityLimiter(concurrency)
        self.state = SyncState()
        self.wakeup = trio.Event()
        self.changed = trio.Event()  # set after every completed item (fsync/umount wait)
        self.on_clean = on_clean
        self.is_open_for_write = is_open_for_write
        self.has_writers = has_writers
        self._active: set[int] = set()
        self._active_keys: set[str] = set()
        self._active_tombstones: set[str] = set()
        self._seeded: set[int] = set()  # directories (inodes) known to have a reference
        self._seeding: set[int] = set()  # directories whose seeding upload is running
        self.touched: set[int] = set()  # directories whose attributes changed (setattr)
        self.stopping = False

    def kick(self) -> None:
        self.wakeup.set()

    async def run(self) -> None:
        """Loop until cancelled: pick ready work, run it, wait for more."""
        async with trio.open_nursery() as nursery:
            while True:
                started = self._schedule(nursery)
                if not started:
                    with trio.move_on_after(1.0):
                        await self.wakeup.wait()
                    self.wakeup = trio.Event()
                else:
                    await trio.sleep(0)
                    with trio.move_on_after(0.2):
                        await self.wakeup.wait()
                    self.wakeup = trio.Event()

    def _schedule(self, nursery: trio.Nursery) -> int:
        if self.stopping:
            return 0
        now = time.monotonic()
        started = 0
        for node in self.journal.dirty_nodes():
            if node.ino in self._active or self.state.retry_at.get(node.ino, 0) > now:
                continue
            if self.is_open_for_write(node.ino):
                continue
            if self.limiter.borrowed_tokens + len(self._active) > self.limiter.total_tokens * 2:
                break
            if self._seeds(node):
                # Until a directory has its reference, its uploads go one at a time in
                # inode (creation) order: the first file written becomes the reference,
                # and no upload is wasted on losing the creation race to our own.
                if node.parent in self._seeding:
                    continue
                self._seeding.add(node.parent)
            self._active.add(node.ino)
            nursery.start_soon(self._sync_node, node.ino)
            started += 1
        for object_key, kind in self.journal.tombstones():
            if object_key in self._active_tombstones:
                continue
            self._active_tombstones.add(object_key)
            nursery.start_soon(self._sync_tombstone, object_key, kind)
            started += 1
        return started

    def _seeds(self, node: Node) -> bool:
        """Whether uploading ``node`` may create its directory's reference."""
        return (node.is_file and bool(node.dirty & CONTENT) and node.parent not in self._seeded
                and node.size >= self.engine.policy.min_delta_size)

    def busy(self) -> bool:
        return bool(self._active or self._active_keys or self._active_tombstones)

    async def _claim(self, key: str) -> None:
        """Wait until no other work runs on the logical ``key``, then take it. Called
        before taking an upload slot, so a waiter never holds one."""
        while key in self._active_keys:
            await trio.sleep(0.05)
        self._active_keys.add(key)

    # --------------------------------------------------------------- one row

    async def _sync_node(self, ino: int) -> None:
        seeding_parent: int | None = None
        try:
            node = self.journal.get(ino)
            if node is not None and self._seeds(node) and node.parent in self._seeding:
                seeding_parent = node.parent
            if node is None or not node.dirty:
                return
            key = key_of(self.journal, self.prefix, ino)
            await self._claim(key)
            try:
                async with self.limiter:
                    node = self.journal.get(ino)  # as it is now, after the wait
                    if node is None or not node.dirty or \
                            key_of(self.journal, self.prefix, ino) != key:
                        return
                    await self._sync(node, key)
            finally:
                self._active_keys.discard(key)
            self.state.failures.pop(ino, None)
            self.state.retry_at.pop(ino, None)
        except (DeltafsError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                await trio.to_thread.run_sync(self.engine.cache.shrink, 64 << 20)
            self._failed(ino, exc)
        except Exception as exc:  # noqa: BLE001 - a bug must not end all uploads
            log.exception("upload of inode %d failed unexpectedly", ino)
            self._failed(ino, exc)
        finally:
            self._active.discard(ino)
            if seeding_parent is not None:
                self._seeding.discard(seeding_parent)
            self.changed.set()
            self.changed = trio.Event()
            self.kick()

    def _failed(self, ino: int, exc: BaseException) -> None:
        n = self.state.failures.get(ino, 0) + 1
        self.state.failures[ino] = n
        delay = min(60.0, 0.5 * math.pow(2, min(n, 7)))
        self.state.retry_at[ino] = time.monotonic() + delay
        self.state.last_error = f"{type(exc).__name__}: {exc}"
        self.state.last_error_at = time.time()
        log.warning("upload of inode %d failed (attempt %d, retry in %.0f s): %s",
                    ino, n, delay, exc)

    async def _sync(self, node: Node, key: str) -> None:
        attrs = Attrs(mode=node.mode, uid=node.uid, gid=node.gid, mtime_ns=node.mtime_ns)
        if node.is_dir:
            self.touched.discard(node.ino)
            info = await self._run(self.engine.put_marker, key, attrs)
            await self._published(node, key + "/", "marker", 0, None, None, etag=info.etag)
            return
        old = stored_of(node) if node.remote_key else None
        if node.is_symlink:
            target = (node.target or b"").decode("utf-8", "surrogateescape")
            res = await self._run(self.engine.put_symlink, key, target, attrs)
            await self._published(node, key, Kind.DIRECT.value, res.stored_size, None, res.sha256,
                            etag=res.etag)
            await self._drop_old(old, key)
            return
        if node.dirty & CONTENT:
            if not node.staged or not os.path.exists(node.staged) or node.sha256 is None:
                if node.staged and os.path.exists(node.staged):
                    return  # still open for writing: picked up after release
                log.error("inode %d (%s) is dirty but its staged file %s is gone; "
                          "keeping the last published version", node.ino, key, node.staged)
                self.journal.update(node.ino, dirty=0)
                return
            staged = Path(node.staged)
            space = split_key(key)[0]
            # the cache may hard-link the staged file only if no open handle can still
            # write to it (fsync uploads a file that stays open)
            owned = not self.has_writers(node.ino)
            # only a file that was ever published (or the bucket's own objects, which
            # the index gives a remote_key) can have an older object in the other form
            check_other = old is not None
            res = await self._run(self.engine.put, staged, key, attrs, node.sha256, owned,
                                  check_other)
            if res.kind in ("reference", "delta"):
                self._seeded.add(node.parent)
            if res.kind == "reference":
                from .format import reference_key

                self.journal.set_reference(node.parent, reference_key(space), res.original_size)
            object_key = delta_key(key) if res.kind in ("delta", "reference") else key
            kind = Kind.DELTA.value if res.kind in ("delta", "reference") else Kind.DIRECT.value
            ref = None
            if kind == Kind.DELTA.value:
                from .format import reference_key

                ref = reference_key(space)
            if await self._published(node, object_key, kind, res.stored_size - (
                    res.original_size if res.kind == "reference" else 0), ref, res.sha256,
                    etag=res.etag):
                self.state.uploaded_files += 1
                self.state.uploaded_bytes += res.original_size
            await self._drop_old(old, object_key)
            return
        if old is None:
            self.journal.update(node.ino, dirty=0)
            return
        if node.dirty & MOVED:
            moved = await self._run(self.engine.move, old, key, attrs)
            await self._published(node, moved.object_key, moved.kind.value, moved.object_size,
                            moved.ref_key, node.sha256 or moved.sha256 or "", etag=moved.etag)
            return
        if node.dirty & ATTRS:
            updated = await self._run(self.engine.set_attrs, old, attrs)
            await self._published(node, updated.object_key, updated.kind.value, updated.object_size,
                            updated.ref_key, node.sha256 or "", etag=updated.etag)

    async def _drop_old(self, old, new_object_key: str) -> None:  # type: ignore[no-untyped-def]
        """After publishing under a new key, the object under the old key goes."""
        if old is None or old.object_key == new_object_key:
            return
        if old.object_key in (new_object_key, new_object_key + ".delta") or \
                new_object_key == old.object_key + ".delta":
            return  # same logical key: engine.put already dropped the other form
        try:
            await self._run(self.engine.delete_stored, old)
        except NotFound:
            pass

    async def _published(self, before: Node, object_key: str, kind: str, stored_size: int,
                   ref: str | None, sha256: str | None, etag: str = "") -> bool:
        """Record a finished upload, unless the row changed while it ran (then it stays
        dirty and the next round publishes the newer state). Returns whether recorded."""
        now = self.journal.get(before.ino)
        fields = dict(remote_key=object_key, remote_kind=kind, remote_size=stored_size,
                      remote_etag=etag or None, remote_ref=ref)
        if now is None:
            # Unlinked while uploading: what we just wrote must go.
            self.journal.add_tombstone(object_key, kind)
            return False
        if before.is_dir:
            # a directory's mtime moves with every file made in it; only an explicit
            # setattr (recorded in ``touched``) asks for the marker again
            unchanged = (now.parent == before.parent and now.name == before.name
                         and now.mode == before.mode and now.uid == before.uid
                         and now.gid == before.gid and before.ino not in self.touched)
        else:
            unchanged = (now.sha256 == before.sha256 and now.parent == before.parent
                         and now.name == before.name and now.mode == before.mode
                         and now.uid == before.uid and now.gid == before.gid
                         and now.mtime_ns == before.mtime_ns and now.staged == before.staged
                         and now.target == before.target)
        if unchanged:
            fields["dirty"] = 0
            staged = now.staged if now.dirty & CONTENT else None
            fields["staged"] = None
        else:
            # keep the newer state dirty; the object we wrote is now the published one
            fields["dirty"] = now.dirty | MOVED
            staged = None
        self.journal.update(before.ino, **fields)
        if unchanged and self.on_clean is not None and staged is not None:
            await self.on_clean(now, staged)
        return unchanged

    async def _sync_tombstone(self, object_key: str, kind: str | None) -> None:
        claimed = ""
        try:
            logical = object_key[:-len(".delta")] if kind == Kind.DELTA.value else object_key
            await self._claim(logical)
            claimed = logical
            async with self.limiter:
                if self.journal.remote_claimed(object_key):
                    self.journal.drop_tombstone(object_key)
                    return
                if kind == Kind.DELTA.value:
                    from .format import StoredFile

                    stored = StoredFile(logical, object_key, Kind.DELTA, 0, "", 0.0, None)
                    await self._run(self.engine.delete_stored, stored)
                else:
                    await self._run(self.engine.store.delete, object_key)
                self.journal.drop_tombstone(object_key)
        except Exception as exc:  # noqa: BLE001 - retried; a bug must not end all uploads
            if not isinstance(exc, (DeltafsError, OSError)):
                log.exception("delete of %s failed unexpectedly", object_key)
            self.state.last_error = f"{type(exc).__name__}: {exc}"
            self.state.last_error_at = time.time()
            log.warning("delete of %s failed, will retry: %s", object_key, exc)
            await trio.sleep(1)
        finally:
            if claimed:
                self._active_keys.discard(claimed)
            self._active_tombstones.discard(object_key)
            self.changed.set()
            self.changed = trio.Event()

    async def _run(self, fn, *args):  # type: ignore[no-untyped-def]
        return await trio.to_thread.run_sync(fn, *args)

    async def wait_clean(self, ino: int, timeout: float | None = None) -> bool:
        """Wait until ``ino`` has nothing left to upload (for fsync)."""
        with trio.move_on_after(timeout if timeout is not None else math.inf):
            while True:
                node = self.journal.get(ino)
                if node is None or not node.dirty:
                    return True
                self.kick()
                await self.changed.wait()
        return False

    async def drain(self, timeout: float) -> bool:
        """Wait until nothing is pending (umount, SIGTERM), at most ``timeout`` seconds."""
        with trio.move_on_after(timeout):
            while True:
                files, _ = self.journal.pending()
                if files == 0 and not self.busy():
                    return True
                self.state.retry_at.clear()
                self.kick()
                with trio.move_on_after(1.0):
                    await self.changed.wait()
        return False
