"""Each inode's content: one state machine that the FUSE handlers, the uploader and crash
recovery all go through (docs/architecture.md, "Content states").

A file's content is in one of these states; the journal row holds the durable part
(``staged``, ``sha256``, the ``CONTENT`` dirty bit), :class:`InodeState` the rest:

- **clean**: no local copy of its own; reads come from the content cache or the bucket.
- **open**: a *working file* (``files/<ino>-<ns>``) takes the writes. Its row points to
  it (``staged=W, sha256=NULL``) from the first write on, so a crash uploads what was
  written. Before the first write it is a private copy nobody else knows.
- **staged**: ``close``/``fsync`` hashed and fsynced the working file and recorded its
  SHA-256 (``sha256`` set, ``dirty & CONTENT``). From then on the file is *sealed*: it is
  never written again. A later write first copies it to a new working file (copy on
  write), so an upload, a reader or the content cache holding it can never see it change.
- **uploading**: an upload reads its own hard link (a *snapshot*) of the sealed file, so
  nothing the namespace does (unlink, a rewrite, a rename) pulls the bytes from under it.
- **published**: the upload's result is committed to the row (``staged=NULL``), the
  snapshot becomes a clean cache entry (by hard link: it is sealed), and the staged path
  goes once that commit is durable.

Ownership: a path under ``files/`` belongs to the row that points to it; whoever makes the
row point elsewhere removes it, but only after the journal commit that made the switch
durable (:meth:`Contents.commit`), and never while a working file still uses it.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyfuse3
import trio

from .cache import CachedFile, ContentCache
from .crashpoints import crash_point
from .engine import Engine
from .errors import DeltafsError, IntegrityError, NotFound
from .journal import CONTENT, Journal, Node

log = logging.getLogger(__name__)

ORPHAN_PARENT = 0
#: data writes stop while fewer bytes than this are free on the cache disk: the rest is
#: for the journal and the cache's index, which must never meet a full disk
LOW_WATER = 8 << 20
#: how long a write waits for running uploads to free room before ENOSPC
BACKPRESSURE_WAIT = 30.0
#: the largest file: S3's object size limit
MAX_FILE_SIZE = 5 << 40




@dataclass
class Working:
    """The working file of an inode open for writing, shared by all its write handles."""

    path: str
    fd: int
    sealed: bool = False  # hashed and recorded: the next write copies it first
    dirty: bool = False  # written since it was last staged
    hasher: Any = None  # sha256 of bytes [0, hashed) while writes are sequential
    hashed: int = 0
    #: the row's content fields before the first write since the last stage, restored
    #: if a write fails (the working file then has a hole and must never be staged)
    prev: dict[str, Any] | None = None
    error: int = 0  # a write failed: every later write, flush and fsync fails with it


@dataclass
class InodeState:
    """What the process knows of one inode's content beyond its journal row."""

    writers: int = 0
    readers: int = 0
    work: Working | None = None
    closed_at: float | None = None  # monotonic time of the last stage (settle delay)
    uploading: int = 0  # uploads reading a snapshot of its staged file
    flush: int = 0  # fsyncs waiting for its upload
    stage_seq: int = 0  # bumped by every stage
    published_seq: int = 0  # the stage_seq of the last upload whose object the row names
    lock: trio.Lock = field(default_factory=trio.Lock)

    def idle(self) -> bool:
        return not (self.writers or self.readers or self.work or self.uploading or
                    self.flush or self.closed_at is not None or self.lock.locked())


class Source:
    """What a read handle reads: a cache entry (checked per block), a sealed staged file,
    or the live working file of a writer."""

    def __init__(self, contents: "Contents", ino: int, fd: int | None,
                 cached: CachedFile | None, ident: tuple[str, ...] = ("none",)) -> None:
        self.contents = contents
        self.ino = ino
        self.fd = fd
        self.cached = cached
        #: which content this source holds: ("work", path), ("staged", path),
        #: ("cache", key) or ("empty",); a read re-resolves when the inode's content moved
        self.ident = ident

    def swap(self, other: "Source") -> None:
        self.close()
        self.fd, self.cached, self.ident = other.fd, other.cached, other.ident

    def pread(self, size: int, off: int) -> bytes:
        if self.cached is not None:
            return self.cached.pread(size, off)
        st = self.contents.states.get(self.ino)
        fd = st.work.fd if st is not None and st.work is not None else self.fd
        assert fd is not None
        return os.pread(fd, size, off)

    def close(self) -> None:
        if self.cached is not None:
            self.cached.close()
        elif self.fd is not None:
            os.close(self.fd)


def _run(background: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``; with ``background``, as work nobody waits for (its decodes queue
    behind opens', see ``membudget.background``)."""
    from . import membudget

    with membudget.background() if background else contextlib.nullcontext():
        return fn(*args)


class Contents:
    """The content states of every inode of one mount."""

    def __init__(self, journal: Journal, cache: ContentCache, engine: Engine,
                 files_dir: Path, settle: float = 0.5) -> None:
        self.journal = journal
        self.cache = cache
        self.engine = engine
        self.files_dir = files_dir
        self.settle = settle
        self.states: dict[int, InodeState] = {}
        self._after_commit: list[str] = []
        self._fetching: dict[str, tuple[trio.Lock, int]] = {}
        self.changed = trio.Event()  # set whenever an upload or stage finished
        self.on_change: Callable[[], None] = lambda: None
        #: whether an upload is running now (it will free room on the cache disk)
        self.uploads_running: Callable[[], bool] = lambda: False
        #: whether uploads run or can be started now (see ``Writeback.may_free_room``)
        self.may_free_room: Callable[[], bool] = lambda: False
        #: told of every open served from the cache or the bucket, once its content is
        #: there (``readahead.py``)
        self.on_open: Callable[[Node], None] = lambda node: None
        #: fetches (opens, read-aheads) whose content was in the cache / had to be
        #: rebuilt from the bucket (or waited for a rebuild already running)
        self.cache_hits = 0
        self.cache_misses = 0

    # ------------------------------------------------------------------ plumbing

    def st(self, ino: int) -> InodeState:
        s = self.states.get(ino)
        if s is None:
            s = self.states[ino] = InodeState()
        return s

    def forget_if_idle(self, ino: int) -> None:
        s = self.states.get(ino)
        if s is not None and s.idle():
            del self.states[ino]

    def row_deleted(self, ino: int) -> None:
        """The row is gone (an unlinked file reaped): no state of it may outlive it and
        be taken for another inode's."""
        s = self.states.get(ino)
        if s is not None and not (s.writers or s.readers or s.uploading or s.lock.locked()):
            del self.states[ino]

    def busy(self) -> set[int]:
        """Inodes with local activity: a listing must not overwrite their rows."""
        return set(self.states)

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()
        self.on_change()

    def _new_path(self, ino: int) -> str:
        return str(self.files_dir / f"{ino}-{time.monotonic_ns()}")

    def drop_after_commit(self, path: str | None) -> None:
        """Remove ``path`` once the journal no longer pointing to it is durable."""
        if path:
            self._after_commit.append(path)

    async def commit(self) -> None:
        """Make the journal durable (written out here, its fsync in a worker thread),
        then remove the files that durable state no longer points to."""
        todo, self._after_commit = self._after_commit, []
        try:
            self.journal.write_out()
            # shielded: written out but cancelled before its fsync, the commit would
            # look done (no transaction open) without being durable
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.journal.make_durable)
        except BaseException:
            self._after_commit = todo + self._after_commit
            raise
        for p in todo:
            if not self._in_use(p):
                Path(p).unlink(missing_ok=True)

    def _in_use(self, path: str) -> bool:
        return any(s.work is not None and s.work.path == path for s in self.states.values())

    # -------------------------------------------------------------- disk space

    def free_bytes(self) -> int:
        st = os.statvfs(self.files_dir)
        return st.f_bavail * st.f_frsize

    async def ensure_room(self, need: int, what: str) -> None:
        """Back-pressure for a full cache disk: clean cache entries go first, then the
        operation waits while running uploads free room (at most ``BACKPRESSURE_WAIT``);
        if the room is still not there, ENOSPC for this operation (logged)."""
        if self.free_bytes() - need >= LOW_WATER:
            return
        deadline = time.monotonic() + BACKPRESSURE_WAIT
        # objects fetched ahead for a reader who may never come go first (prefetch.py)
        await trio.to_thread.run_sync(self.engine.prefetched.clear)
        while True:
            await trio.to_thread.run_sync(self.cache.shrink, need + 2 * LOW_WATER)
            if self.free_bytes() - need >= LOW_WATER:
                return
            if time.monotonic() > deadline or not self.may_free_room():
                break
            if not self.uploads_running():
                await trio.sleep(0.05)  # started just now: the scheduler picks them up
                continue
            with trio.move_on_after(1.0):
                await self.changed.wait()
        log.error("cache disk full: %s needs %d bytes; %d free and the rest holds files not "
                  "yet uploaded (ENOSPC)", what, need, self.free_bytes())
        raise pyfuse3.FUSEError(errno.ENOSPC)

    # ------------------------------------------------------------------ reading

    def _identity(self, node: Node) -> tuple[str, ...]:
        if node.staged and node.dirty & CONTENT:
            return ("staged", node.staged)
        if node.remote_key:
            return ("cache", self.cache_key(node))
        return ("empty",)

    async def open_read(self, node: Node) -> Source:
        """A source of the verified (or our own, not yet uploaded) content of ``node``."""
        s = self.states.get(node.ino)
        if s is not None and s.work is not None and not s.work.error:
            return Source(self, node.ino, os.open(s.work.path, os.O_RDONLY), None,
                          ("work", s.work.path))
        if node.staged and node.dirty & CONTENT:
            try:
                return Source(self, node.ino, os.open(node.staged, os.O_RDONLY), None,
                              ("staged", node.staged))
            except FileNotFoundError:
                pass
        if node.is_symlink:
            raise pyfuse3.FUSEError(errno.ELOOP)
        if not node.remote_key:
            if node.size == 0:
                return Source(self, node.ino, os.open(os.devnull, os.O_RDONLY), None,
                              ("empty",))
            log.error("inode %d has no content anywhere", node.ino)
            raise pyfuse3.FUSEError(errno.EIO)
        cached = await self.fetch(node)
        try:  # (after: the next file's rebuild may start from this one)
            self.on_open(node)
        except Exception as exc:  # noqa: BLE001 - a hint: the open stands without it
            log.debug("read-ahead hint for inode %d failed: %r", node.ino, exc)
        return Source(self, node.ino, None, cached, ("cache", self.cache_key(node)))

    def cache_key(self, node: Node) -> str:
        return node.sha256 or f"foreign:{node.remote_key}:{node.remote_etag}"

    async def fetch(self, node: Node, quiet: bool = False) -> CachedFile:
        """The cache entry of ``node``'s content, rebuilt from the bucket on a miss (one
        fetch per content, however many opens wait for it). ``quiet``: for work nobody
        waits for (a read-ahead): its failures are logged at debug level (the open of
        that file, if it comes, tries again and says why)."""
        key = self.cache_key(node)
        hit = await trio.to_thread.run_sync(self.cache.open, key, self.engine.tmp_dir)
        if hit is not None:
            self.cache_hits += 1
            return hit
        self.cache_misses += 1
        lock, n = self._fetching.get(key, (trio.Lock(), 0))
        self._fetching[key] = (lock, n + 1)
        try:
            async with lock:
                hit = await trio.to_thread.run_sync(self.cache.open, key, self.engine.tmp_dir)
                if hit is not None:
                    return hit
                return await self._materialize(node, key, quiet)
        finally:
            lock, n = self._fetching[key]
            if n <= 1:
                del self._fetching[key]
            else:
                self._fetching[key] = (lock, n - 1)

    async def settled(self, node: Node) -> bool:
        """Wait for a rebuild of ``node``'s content in progress, if any (without starting
        one); whether the content is in the cache now."""
        key = self.cache_key(node)
        running = self._fetching.get(key)
        if running is not None:
            async with running[0]:
                pass
        return await trio.to_thread.run_sync(self.cache.__contains__, key)

    async def _materialize(self, node: Node, key: str, quiet: bool = False) -> CachedFile:
        from .index import stored_of

        report = log.debug if quiet else log.error
        await self.ensure_room(node.size, f"rebuilding {node.remote_key}")
        tmp = self.engine.tmp_dir / f"fetch-{node.ino}-{time.monotonic_ns()}"
        try:
            try:
                opened: CachedFile | None = None
                sha, in_cache = await trio.to_thread.run_sync(
                    _run, quiet, self.engine.materialize_for_cache, stored_of(node), tmp)
                if in_cache:
                    opened = await trio.to_thread.run_sync(self.cache.open, sha,
                                                           self.engine.tmp_dir)
                    if opened is None:  # evicted at once: the slow way
                        sha = await trio.to_thread.run_sync(self.engine.materialize,
                                                            stored_of(node), tmp)
            except NotFound:
                report("read %s: the object is gone from the bucket", node.remote_key)
                raise pyfuse3.FUSEError(errno.EIO) from None
            except OSError as exc:
                report("read %s: no room to rebuild it on the cache disk: %s",
                       node.remote_key, exc)
                raise pyfuse3.FUSEError(errno.EIO) from None
            except DeltafsError as exc:
                report("read %s: %s", node.remote_key, exc)
                raise pyfuse3.FUSEError(errno.EIO) from None
            if sha is not None and sha != node.sha256 and not node.staged:
                log.info("%s changed in the bucket; serving the new content", node.remote_key)
                size = opened.size if opened is not None else tmp.stat().st_size
                # only a row still published as it was: one written here meanwhile (a
                # working file, a staged one) keeps its own content (found by review: a
                # read-ahead of a file open for writing overwrote its hash)
                self.journal.x("UPDATE nodes SET sha256=?, size=? WHERE ino=? AND staged IS "
                               "NULL AND remote_key IS ? AND remote_etag IS ?",
                               (sha, size, node.ino, node.remote_key, node.remote_etag))
            if opened is not None:  # left in the cache by its decode, verified there
                return opened
            key = sha or key
            await trio.to_thread.run_sync(self.cache.add, key, tmp)
            opened = await trio.to_thread.run_sync(self.cache.open, key, self.engine.tmp_dir)
            if opened is None:
                # not cacheable (full disk): serve this private copy, checked the same way
                from .cache import block_sums

                sums = await trio.to_thread.run_sync(block_sums, tmp)
                fd = os.open(tmp, os.O_RDONLY)
                opened = CachedFile(fd, sums, os.fstat(fd).st_size, key)
            return opened
        finally:
            tmp.unlink(missing_ok=True)

    async def read(self, src: Source, node: Node | None, size: int, off: int) -> bytes:
        """A read of the inode's content as it is now (within one mount, a read sees
        every completed write, through any handle); a damaged cache block drops the
        entry and fetches it again once."""
        if node is not None:
            s = self.states.get(src.ino)
            if s is not None and s.work is not None and not s.work.error:
                return os.pread(s.work.fd, size, off)  # a writer is open: its file
            if node.parent != ORPHAN_PARENT and self._identity(node) != src.ident:
                # rewritten since this source opened (an unlinked file keeps what its
                # handles hold: its row no longer says where its content is)
                src.swap(await self.open_read(node))
        try:
            return src.pread(size, off)
        except IntegrityError as exc:
            if src.cached is None or node is None:
                raise
            log.error("inode %d: %s; fetching it again from the bucket", src.ino, exc)
            await trio.to_thread.run_sync(self.cache.discard, src.cached.key)
            fresh = await self.fetch(node)
            src.cached.close()
            src.cached = fresh
            try:
                return src.pread(size, off)
            except IntegrityError as exc2:
                log.error("inode %d: %s even after a fresh fetch", src.ino, exc2)
                raise pyfuse3.FUSEError(errno.EIO) from None

    def writer_source(self, ino: int) -> Source:
        """What a write handle reads through (``O_RDWR``, and the kernel reading a page
        before a partial-page write): the working file, re-resolved on every read."""
        return Source(self, ino, None, None, ("work", ""))

    # ------------------------------------------------------------------ writing

    async def open_write(self, node: Node, truncate: bool) -> Working:
        """The working file of ``node`` (shared by its write handles), made now if needed:
        empty for a truncating open, else a copy of the current content."""
        s = self.st(node.ino)
        try:
            async with s.lock:
                return await self._open_write_locked(node, truncate)
        finally:
            self.forget_if_idle(node.ino)

    async def _open_write_locked(self, node: Node, truncate: bool) -> Working:
        s = self.st(node.ino)
        if s.work is not None and s.work.error:
            if truncate:
                self._detach(node.ino, s)  # a truncating open starts over from nothing
            else:
                raise pyfuse3.FUSEError(s.work.error)
        if s.work is not None:
            if truncate:
                await self._truncate_locked(node.ino, 0)
            return s.work
        path = self._new_path(node.ino)
        if truncate:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            s.work = Working(path, fd, hasher=hashlib.sha256())
            self._mark_dirty(node.ino, s.work)
            self.journal.update(node.ino, size=0, mtime_ns=time.time_ns())
            return s.work
        await self.ensure_room(node.size, f"a copy of inode {node.ino} to write to")
        src = await self.open_read(node)
        try:
            await trio.to_thread.run_sync(_copy_to, src, path)
        except BaseException:
            Path(path).unlink(missing_ok=True)
            raise
        finally:
            src.close()
        fd = os.open(path, os.O_RDWR)
        s.work = Working(path, fd)
        return s.work

    def _mark_dirty(self, ino: int, w: Working) -> None:
        """The first write after an open or a stage: the row now points to the working
        file with no hash (a crash uploads what was written); the file it pointed to is
        superseded."""
        if w.dirty:
            return
        node = self.journal.get(ino)
        w.dirty = True
        if node is None:
            return
        w.prev = dict(staged=node.staged, sha256=node.sha256, size=node.size,
                      content=bool(node.dirty & CONTENT))
        self.journal.update(ino, staged=w.path, sha256=None)

    def _poison(self, ino: int, w: Working, code: int) -> None:
        """A write to ``w`` failed: its content is no longer what was written (a hole
        where the write failed; the kernel drops the pages of a failed writeback and
        goes on with the next ones). It is never staged: the row goes back to the
        content it had, and every later write, flush and fsync of it fails."""
        w.error = code
        w.hasher = None
        node = self.journal.get(ino)
        if node is None or node.staged != w.path or w.prev is None:
            return
        p = w.prev
        if p["staged"] is None and p["sha256"] is None and node.remote_key is None:
            # a new file: it stays, empty, rather than keep bytes nobody wrote
            path = self._new_path(ino)
            open(path, "wb").close()
            self.journal.update(ino, staged=path, sha256=hashlib.sha256().hexdigest(), size=0)
            self.journal.set_dirty(ino, CONTENT)
            return
        self.journal.update(ino, staged=p["staged"], sha256=p["sha256"], size=p["size"])
        if not p["content"]:
            self.journal.x("UPDATE nodes SET dirty = dirty & ~? WHERE ino = ?", (CONTENT, ino))

    async def _cow(self, ino: int, w: Working) -> None:
        """Copy a sealed working file to a new one before writing to it."""
        size = os.fstat(w.fd).st_size
        await self.ensure_room(size, f"a copy of inode {ino} to write to")
        path = self._new_path(ino)
        try:
            await trio.to_thread.run_sync(_copy_fd, w.fd, path)
        except BaseException:
            Path(path).unlink(missing_ok=True)
            raise
        fd = os.open(path, os.O_RDWR)
        os.close(w.fd)
        old = w.path
        w.path, w.fd, w.sealed, w.dirty = path, fd, False, False
        if w.hasher is not None and w.hashed == size:
            w.hasher = w.hasher.copy()
        else:
            w.hasher = None
        node = self.journal.get(ino)
        if node is None or node.staged != old:
            Path(old).unlink(missing_ok=True)  # nobody points to it any more

    async def write(self, ino: int, w: Working, off: int, buf: bytes) -> int:
        s = self.st(ino)
        if off + len(buf) > MAX_FILE_SIZE:
            log.info("refused write past %d bytes to inode %d (EFBIG)", MAX_FILE_SIZE, ino)
            raise pyfuse3.FUSEError(errno.EFBIG)
        async with s.lock:
            log.debug("write inode %d: %d bytes at %d", ino, len(buf), off)
            if w.error:
                raise pyfuse3.FUSEError(w.error)
            try:
                if w.sealed:
                    await self._cow(ino, w)
                self._mark_dirty(ino, w)
                await self.ensure_room(len(buf), f"a write to inode {ino}")
                crash_point("write")
                done = 0
                while done < len(buf):
                    done += os.pwrite(w.fd, buf[done:], off + done)
            except (OSError, pyfuse3.FUSEError, sqlite3.Error) as exc:
                # the kernel drops the pages of a failed write and goes on with the next
                # ones: the file now has a hole, so it must never be staged
                code = getattr(exc, "errno", None) or errno.EIO
                if isinstance(exc, OSError):
                    log.error("write to the working file of inode %d failed: %s", ino, exc)
                self._poison(ino, w, code)
                try:
                    await self.commit()  # a crash must not replay the holed file
                except (OSError, sqlite3.Error) as cexc:
                    log.error("journal commit after a failed write: %s", cexc)
                raise pyfuse3.FUSEError(code) from None
            if w.hasher is not None:
                if off == w.hashed:
                    w.hasher.update(buf)
                    w.hashed += len(buf)
                else:
                    w.hasher = None
            node = self.journal.get(ino)
            if node is not None:
                self.journal.update(ino, size=max(node.size, off + len(buf)),
                                    mtime_ns=time.time_ns())
            return len(buf)

    async def truncate(self, ino: int, size: int) -> None:
        """ftruncate on an open working file."""
        async with self.st(ino).lock:
            await self._truncate_locked(ino, size)

    async def _truncate_locked(self, ino: int, size: int) -> None:
        s = self.st(ino)
        w = s.work
        assert w is not None
        if size > MAX_FILE_SIZE:
            log.info("refused truncate of inode %d to %d bytes (EFBIG)", ino, size)
            raise pyfuse3.FUSEError(errno.EFBIG)
        if w.sealed:
            if size == 0:
                path = self._new_path(ino)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                os.close(w.fd)
                node = self.journal.get(ino)
                if node is None or node.staged != w.path:
                    Path(w.path).unlink(missing_ok=True)
                w.path, w.fd, w.sealed, w.dirty = path, fd, False, False
                w.hasher, w.hashed = hashlib.sha256(), 0
            else:
                await self._cow(ino, w)
        self._mark_dirty(ino, w)
        os.ftruncate(w.fd, size)
        if w.hashed != size:
            w.hasher = None  # the running hash no longer covers exactly the file
        self.journal.update(ino, size=size, mtime_ns=time.time_ns())

    async def stage(self, ino: int) -> None:
        """close/fsync of a written file: fsync and hash the working file, record it
        durably; the file is sealed from here on."""
        s = self.st(ino)
        async with s.lock:
            done = await self._stage_locked(ino, s)
        if done:
            self.notify()

    async def _stage_locked(self, ino: int, s: InodeState) -> bool:
        w = s.work
        if w is not None and w.error:
            raise pyfuse3.FUSEError(w.error)  # close() and fsync() report the failure
        if w is None or not w.dirty:
            return False
        node = self.journal.get(ino)
        if node is None or node.parent == ORPHAN_PARENT:
            w.dirty = False
            return False  # unlinked: nothing to upload
        size = os.fstat(w.fd).st_size
        hasher = w.hasher if w.hasher is not None and w.hashed == size else None
        fd = w.fd

        def finish() -> str:
            os.fsync(fd)
            if hasher is not None:
                return str(hasher.hexdigest())
            from .codec import sha256_file

            return sha256_file(Path(w.path))

        crash_point("stage-before-hash")
        try:
            sha = await trio.to_thread.run_sync(finish)
        except OSError as exc:
            log.error("close of inode %d: the working file cannot be made durable: %s",
                      ino, exc)
            self._poison(ino, w, exc.errno or errno.EIO)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        self.journal.update(ino, sha256=sha, size=size, staged=w.path)
        self.journal.set_dirty(ino, CONTENT)
        if w.prev is not None and w.prev["staged"] and w.prev["staged"] != w.path:
            self.drop_after_commit(w.prev["staged"])  # superseded
        w.prev = None
        w.dirty, w.sealed = False, True
        s.closed_at = time.monotonic()
        s.stage_seq += 1
        crash_point("stage-before-commit")
        await self.commit()
        crash_point("stage-after-commit")
        return True

    async def close_writer(self, ino: int) -> None:
        """The last write handle of ``ino`` is gone: its working file is closed; if the
        row no longer points to it (published, superseded, unlinked, never written), it
        goes."""
        s = self.st(ino)
        s.writers -= 1
        if s.writers > 0:
            return
        staged = False
        async with s.lock:
            if s.writers > 0:
                return  # opened again while we waited: the working file stays
            if s.work is not None and s.work.dirty and not s.work.error:
                try:
                    await self._stage_locked(ino, s)
                    staged = True
                except pyfuse3.FUSEError:
                    pass  # reported by flush already; release has nobody to tell
            if s.writers == 0:
                self._detach(ino, s)
        if staged:
            self.notify()
        self.forget_if_idle(ino)

    def _detach(self, ino: int, s: InodeState) -> None:
        """Close the working file; if the row no longer points to it, it goes."""
        w, s.work = s.work, None
        if w is None:
            return
        os.close(w.fd)
        node = self.journal.get(ino)
        if node is None or node.staged != w.path:
            Path(w.path).unlink(missing_ok=True)

    # ------------------------------------------------------------------ uploads

    def upload_ready(self, node: Node) -> bool:
        """Whether the uploader may take ``node`` now."""
        s = self.states.get(node.ino)
        if s is None:
            return True
        if s.work is not None and s.work.dirty and not s.flush:
            return False
        if node.is_file and node.dirty & CONTENT and node.sha256 is None:
            return False  # written but not staged: the close or fsync will stage it
        if s.flush:
            return True
        if s.writers:
            return False
        return s.closed_at is None or time.monotonic() - s.closed_at >= self.settle

    def begin_upload(self, node: Node) -> tuple[Path, int] | None:
        """A snapshot (hard link) of ``node``'s sealed staged file for an upload to read,
        and the stage it is of; ``None`` if there is nothing sealed to upload."""
        if not node.staged or node.sha256 is None:
            return None
        snap = self.engine.tmp_dir / f"up-{node.ino}-{time.monotonic_ns()}"
        try:
            os.link(node.staged, snap)
        except FileNotFoundError:
            return None
        s = self.st(node.ino)
        s.uploading += 1
        return snap, s.stage_seq

    async def end_upload(self, ino: int, snap: Path, seq: int, staged: str | None,
                         sha256: str | None, recorded: bool, landed: bool = False) -> None:
        """An upload is over. ``recorded``: its result is now the row's published state
        (``staged`` cleared): the snapshot becomes a clean cache entry and the staged file
        goes after the next commit. ``landed``: the row names its object, though it
        changed meanwhile (not clean): the version staged as ``seq`` is in the bucket."""
        s = self.st(ino)
        s.uploading -= 1
        try:
            if recorded or landed:
                s.published_seq = max(s.published_seq, seq)
            if recorded:
                s.closed_at = None
                self.drop_after_commit(staged)
                await self.commit()
                crash_point("adopt")
                if sha256:
                    await trio.to_thread.run_sync(self.cache.add, sha256, snap)
        finally:
            snap.unlink(missing_ok=True)
            self.forget_if_idle(ino)
            self.notify()


class _Reader:
    """Adapts a Source to a file-like read for copying."""

    def __init__(self, src: Source) -> None:
        self.src = src
        self.off = 0

    def read(self, n: int) -> bytes:
        data = self.src.pread(n, self.off)
        self.off += len(data)
        return data


def _copy_to(src: Source, dest: str) -> None:
    reader = _Reader(src)
    with open(dest, "wb") as out:
        while chunk := reader.read(1 << 20):
            out.write(chunk)
        out.flush()


def _copy_fd(src_fd: int, dest: str) -> None:
    off = 0
    with open(dest, "wb") as out:
        while chunk := os.pread(src_fd, 1 << 20, off):
            out.write(chunk)
            off += len(chunk)


def recover(journal: Journal, files_dir: Path) -> int:
    """After a crash (or any restart): the journal is the truth, the files follow it.

    Every step is idempotent: rows of unlinked files go; a working file a row points to
    without a hash was open for writing at the crash, and is staged as it is; a staged
    path of a row that is no longer dirty was published (the crash came before it was
    removed) and goes; files nobody points to go. Returns the number of pending changes.
    """
    journal.x("DELETE FROM nodes WHERE parent = ?", (ORPHAN_PARENT,))
    # What an earlier mount listed is a starting point, not the truth: each directory is
    # listed again on first use (one LIST; unchanged ETags spare the HEADs), and served
    # from these rows if S3 cannot be reached.
    journal.x("UPDATE nodes SET listed_at = 0 WHERE listed_at IS NOT NULL")
    from .codec import sha256_file

    rows = journal.x("SELECT ino, staged FROM nodes WHERE staged IS NOT NULL "
                     "AND sha256 IS NULL").fetchall()
    for ino, staged in rows:
        if os.path.exists(staged):
            journal.update(ino, sha256=sha256_file(Path(staged)),
                           size=os.stat(staged).st_size)
            journal.set_dirty(ino, CONTENT)
            log.warning("inode %d was open for writing at the crash; uploading what was "
                        "written", ino)
    for ino, staged in journal.x("SELECT ino, staged FROM nodes WHERE staged IS NOT NULL AND "
                                 "dirty & 1 = 0").fetchall():
        journal.update(ino, staged=None)
    for ino, staged, mode in journal.x(
            "SELECT ino, staged, mode FROM nodes WHERE dirty & 1 != 0").fetchall():
        import stat as _stat

        if _stat.S_ISREG(mode) and (not staged or not os.path.exists(staged)):
            log.error("inode %d is marked for upload but its staged file %s is gone; keeping "
                      "the last published version", ino, staged)
            journal.x("UPDATE nodes SET dirty = dirty & ~1, staged = NULL WHERE ino = ?",
                      (ino,))
    wanted = {r[0] for r in journal.x("SELECT staged FROM nodes WHERE staged IS NOT NULL")}
    for p in files_dir.iterdir() if files_dir.exists() else []:
        if str(p) not in wanted:
            p.unlink(missing_ok=True)
    journal.commit()
    return journal.pending()[0]


__all__ = ["Contents", "InodeState", "Working", "Source", "recover",
           "ORPHAN_PARENT", "LOW_WATER", "MAX_FILE_SIZE"]
