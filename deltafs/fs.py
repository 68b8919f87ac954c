"""The filesystem: pyfuse3 operations over the journal, the content cache and the engine.

Metadata comes from the journal (a local SQLite database), so ``stat``, ``ls -l``,
``chmod``, ``utimes`` and the rename of a fresh file never wait on the network once a
directory is known. Writes go to a local working file; the last ``close`` hashes it and
records it in the journal (durably) before returning, and the upload happens in the
background (:mod:`deltafs.writeback`). Reads are served from the content cache after the
file was rebuilt and its SHA-256 verified.

Each FUSE request reads or writes at most ``max_write`` bytes, so the ``pread``/``pwrite``
of one request is a bounded local I/O done in place; everything that can take long
(S3, xdelta3, hashing a whole file, copying a file, fsync) runs in a worker thread.
Every rejected operation logs why and returns the errno documented in SEMANTICS.md.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import stat
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from .cache import ContentCache
from .engine import Engine
from .errors import DeltafsError
from .format import DELTA_SUFFIX, MAX_KEY_BYTES, MAX_NAME_BYTES, REFERENCE_NAME, Kind, split_key
from .index import (key_of, valid_name)
from .content import MAX_FILE_SIZE, ORPHAN_PARENT, Contents, Source, Working, recover
from .crashpoints import crash_point
from .journal import ATTRS, CONTENT, MOVED, ROOT_INO, Journal, Node
from .gatecontrol import GateControl
from .gcpace import GcPace
from .loopstall import LoopStall
from .dirmanifest import DirManifests
from .dirsync import DirSync
from .chain import HIDDEN
from .manifest import MANIFEST_NAME, manifest_key
from .readahead import ReadAhead
from .writeback import Writeback

log = logging.getLogger(__name__)

XATTR_PREFIX = "user.deltafs."
#: rows read per query in readdir (a kernel buffer takes ~20-100 entries)
READDIR_PAGE = 128
#: forgotten inodes checked (for unlinked rows to reap, one query) per step of the loop,
#: and unlinked rows reaped per step
FORGET_STEP, REAP_STEP = 500, 64


@dataclass
class Handle:
    """An open file: readers hold a source, writers the inode's shared working file."""

    ino: int
    writable: bool
    src: Source | None = None
    work: Working | None = None


@dataclass
class Options:
    """Mount options the filesystem itself uses."""

    listing_ttl: float = 30.0
    read_only: bool = False
    settle: float = 0.5  # a closed file waits this long before upload (rsync renames first)
    dirty_budget: int = 8 << 30
    #: read and write per-directory listing manifests (``.deltafs-manifest``)
    manifests: bool = True
    #: write them too (not in ``--format deltaglider``: DeltaGlider's ls shows them)
    write_manifests: bool = True
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)


def _guard(fn: Any) -> Any:
    """An unexpected exception in a handler would end pyfuse3's main loop (the mount
    would die); it becomes EIO with the traceback in the log instead."""
    import functools

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except trio.Cancelled:
            raise
        except OSError as exc:
            log.error("%s failed: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except sqlite3.OperationalError as exc:
            if "full" not in str(exc):
                log.exception("%s failed unexpectedly", fn.__name__)
                raise pyfuse3.FUSEError(errno.EIO) from None
            log.error("%s failed: the cache disk is full (journal: %s)", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno.ENOSPC) from None
        except Exception:  # noqa: BLE001
            log.exception("%s failed unexpectedly", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _guarded(cls: Any) -> Any:
    for name in dir(pyfuse3.Operations):
        if name.startswith("_") or name in ("init", "stacktrace"):
            continue
        fn = cls.__dict__.get(name)
        if fn is not None:
            setattr(cls, name, _guard(fn))
    return cls


@_guarded
class DeltaFS(pyfuse3.Operations):
    """One mounted bucket prefix."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, engine: Engine, journal: Journal, cache: ContentCache, prefix: str,
                 files_dir: Path, options: Options, source: str) -> None:
        super().__init__()
        self.engine = engine
        self.journal = journal
        self.cache = cache
        self.prefix = prefix.strip("/")
        self.files_dir = files_dir
        self.options = options
        self.source = source
        self.handles: dict[int, Handle] = {}
        self.dir_handles: dict[int, int] = {}
        self._next_fh = 1
        self.lookups: dict[int, int] = defaultdict(int)
        #: the kernel's read-ahead window for this mount in bytes (kernelra.py), once known
        self.kernel_read_ahead: int | None = None
        self.started = time.time()
        self.loop_stall = LoopStall()
        #: sizes the S3 store's request gate from the loop's lag (set by the daemon)
        self.gate_control: GateControl | None = None
        #: the event loop thread's nice value when the daemon raised it (priority.py)
        self.loop_nice: int | None = None
        #: collects garbage from the loop, on its thread (the daemon runs it)
        self.gc_pace = GcPace()
        #: (logical, stored) bytes: full-table sums, so computed by the committer in a
        #: worker thread when statfs or status asked for them (see :meth:`totals`)
        self._totals: tuple[int, int] = (0, 0)
        self._totals_at = 0.0
        self._totals_wanted = True
        self._totals_every = 2.0
        self._oldest_staged = 0.0
        self._budget_checked: tuple[float, int] = (0.0, 0)
        files_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.contents = Contents(journal, cache, engine, files_dir, settle=options.settle)
        self.writeback = Writeback(journal, engine, self.prefix, self.contents)
        self.read_ahead = ReadAhead(journal, self.contents)
        self.contents.on_open = self.read_ahead.opened
        self.dirsync = DirSync(journal, engine, self.prefix, self.contents, options)
        self.dirsync.on_replaced = self._replaced
        self.manifests = DirManifests(journal, engine, self.prefix,
                                      writable=options.manifests and options.write_manifests
                                      and not options.read_only)
        if options.manifests:
            self.dirsync.resolve = self.manifests.resolve
        self.dirsync.on_listed = self._listed
        self.writeback.on_bucket_change = self.manifests.touch
        self.dirsync.collect_pending = self.writeback.collect_pending
        self.writeback.on_collected = self._collected
        self.manifests.commit = self.contents.commit
        #: whether to tell the kernel about entries changed by other writers (off in
        #: unit tests without a FUSE session)
        self.notify_kernel = True

    # ------------------------------------------------------------------ helpers

    def _fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _node(self, ino: int) -> Node:
        node = self.journal.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = 1.0
        a.attr_timeout = 1.0
        a.st_mode = node.mode
        if node.is_dir:
            a.st_nlink = 2 + self.journal.count_subdirs(node.ino)
        else:
            a.st_nlink = 0 if node.parent == ORPHAN_PARENT else 1
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = 0
        a.st_size = node.size if not node.is_dir else 4096
        a.st_blksize = 128 * 1024
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = node.atime_ns or node.mtime_ns
        a.st_mtime_ns = node.mtime_ns
        a.st_ctime_ns = node.ctime_ns or node.mtime_ns
        return a

    def _key(self, ino: int) -> str:
        return key_of(self.journal, self.prefix, ino)

    def _check_name(self, parent: int, name: str) -> None:
        """Names S3 or the format cannot hold fail here, with a log line saying why."""
        if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            log.info("refused name %r…: longer than %d bytes", name[:40], MAX_NAME_BYTES)
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        if not valid_name(name):
            log.info("refused name %r: not storable", name)
            raise pyfuse3.FUSEError(errno.EINVAL)
        if name == REFERENCE_NAME or name.endswith(DELTA_SUFFIX) or name == MANIFEST_NAME \
                or name == HIDDEN:
            log.warning("refused name %r: reserved by the bucket format (reference.bin, "
                        "*.delta, .deltafs-manifest and .deltafs hold references, deltas, "
                        "listing manifests and chain blobs)", name)
            raise pyfuse3.FUSEError(errno.EPERM)
        parent_key = self._key(parent)
        full = f"{parent_key}/{name}" if parent_key else name
        if len(full.encode("utf-8")) + len(DELTA_SUFFIX) > MAX_KEY_BYTES:
            log.info("refused name %r: the S3 key would pass 1,024 bytes", name)
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)

    def _writable(self) -> None:
        if self.options.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)

    @staticmethod
    def _name(raw: bytes, creating: bool = False) -> str:
        """A name from the kernel. S3 keys are UTF-8, so another byte string can neither
        exist here (ENOENT) nor be created (EINVAL)."""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            if creating:
                log.info("refused name %r: not valid UTF-8 (S3 keys must be UTF-8)", raw)
                raise pyfuse3.FUSEError(errno.EINVAL) from None
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def _commit(self) -> None:
        await self.contents.commit()

    async def _ensure_listed(self, dir_ino: int, force: bool = False) -> None:
        await self.dirsync.ensure_listed(dir_ino, force)

    async def _ensure_listed_tree(self, dir_ino: int) -> None:
        await self.dirsync.ensure_listed_tree(dir_ino)

    # ----------------------------------------------------------------- lookup

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        n = self._name(name)
        if len(name) > MAX_NAME_BYTES:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        if n == ".":
            node = self._node(parent_inode)
        elif n == "..":
            node = self._node(self._node(parent_inode).parent)
        else:
            await self.dirsync.ensure_name(parent_inode, n)
            found = self.journal.child(parent_inode, n)
            if found is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            node = found
        self.lookups[node.ino] += 1
        return self._attrs(node)

    async def forget(self, inode_list: Any) -> None:
        """The kernel drops its references, thousands at once under memory pressure (a
        batch of 30,000 took 128 ms of the loop with a query per inode): the unlinked
        among them are found with one query per 500, and reaped, in steps. A row
        forgotten here and unlinked during a checkpoint is reaped by the unlink itself;
        the lookup counts are all settled before the first."""
        forgotten: list[int] = []
        for ino, count in inode_list:
            left = self.lookups.get(ino, 0) - count
            if left > 0:
                self.lookups[ino] = left
                continue
            self.lookups.pop(ino, None)
            forgotten.append(ino)
        reaped = 0
        for i in range(0, len(forgotten), FORGET_STEP):
            if i:
                await trio.sleep(0)
            for ino in self.journal.among(ORPHAN_PARENT, forgotten[i:i + FORGET_STEP]):
                # (each reap is a few statements: a step is bounded by those too)
                self._maybe_reap(ino)
                reaped += 1
                if reaped % REAP_STEP == 0:
                    await trio.sleep(0)

    def _replaced(self, parent: int, old_ino: int, name: str) -> None:
        """Another writer replaced or removed ``name``: the kernel forgets the entry (its
        next lookup finds the new inode) and the old inode goes once it is forgotten."""
        if self.notify_kernel:
            try:
                pyfuse3.invalidate_entry_async(parent, os.fsencode(name), ignore_enoent=True)
            except Exception as exc:  # noqa: BLE001 - only a cache hint
                log.debug("invalidate_entry %s: %s", name, exc)
        self._maybe_reap(old_ino)

    def _listed(self, dir_ino: int, end: Any) -> None:
        """A directory was listed: remember whether it has a manifest (it must go with
        the directory), and refresh one that missed many objects (HEADed instead)."""
        if end.manifest is not None:
            # recorded when seen, never forgotten by a listing (one that went out before
            # this mount wrote the manifest would lose it): an extra delete of a manifest
            # that is gone costs a request, a forgotten one keeps a prefix alive
            self.journal.set_manifest(dir_ino, end.manifest.etag)
            self.manifests.forget_cached(end.manifest.key)
        if end.manifest is not None and end.heads > 50 and self.manifests.writable:
            self.manifests.touch(end.manifest.key)
        if (end.reference is not None or end.blobs) and not end.saw_delta and \
                not self.options.read_only:
            # a reference (or chain blobs) no delta uses: its removal was cut short (a
            # crash or a drain bound between the last delete and the check) and would
            # keep the prefix alive; the check is derived from the bucket again, not
            # remembered
            self.writeback.want_collect(self._key(dir_ino) if end.reference is None
                                        else split_key(end.reference.key)[0])

    def _collected(self, space: str) -> None:
        """The check of ``space``'s reference is done: its parent's listing may have left
        it out (see ``DirSync.collect_pending``), so the next access lists it again."""
        if space not in self.dirsync.hidden_spaces:
            return  # no listing left it out
        self.dirsync.hidden_spaces.discard(space)
        rel = space[len(self.prefix):].strip("/") if self.prefix else space
        if self.prefix and not (space == self.prefix or space.startswith(self.prefix + "/")):
            return
        ino = ROOT_INO
        parts = rel.split("/") if rel else []
        for name in parts[:-1]:
            node = self.journal.child(ino, name)
            if node is None or not node.is_dir:
                return
            ino = node.ino
        node = self.journal.get(ino)
        if parts and node is not None and node.listed_at is not None:
            # stale, not "never listed": while S3 is away it is still served from its rows
            self.journal.update(ino, listed_at=0.0)

    def _drop_manifest(self, ino: int, dir_key: str) -> None:
        """The directory at ``dir_key`` goes (rmdir) or moves (rename): its manifest too."""
        etag = self.journal.manifest_etag(ino)
        if etag is False:
            return
        # unconditional: a cache, and it must go with the directory whoever wrote it last
        self.journal.add_tombstone(manifest_key(f"{dir_key}/" if dir_key else ""), None, None)
        self.journal.set_manifest(ino, None)

    def _maybe_reap(self, ino: int) -> None:
        """An unlinked node goes once the kernel forgot it and no handle holds it."""
        node = self.journal.get(ino)
        if node is None or node.parent != ORPHAN_PARENT:
            return
        st = self.contents.states.get(ino)
        if self.lookups.get(ino) or (st is not None and (st.writers or st.readers)):
            return
        if node.staged:
            self.contents.drop_after_commit(node.staged)
        self.journal.delete(ino)
        self.contents.row_deleted(ino)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._writable()
        node = self._node(inode)
        now = time.time_ns()
        changes: dict[str, Any] = {}
        if fields.update_size:
            if node.is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR)
            if attr.st_size > MAX_FILE_SIZE:
                log.info("refused truncate of inode %d to %d bytes: larger than S3 stores "
                         "(EFBIG)", inode, attr.st_size)
                raise pyfuse3.FUSEError(errno.EFBIG)
            handle = self.handles.get(fh) if fh is not None else None
            if handle is not None and handle.writable:
                await self.contents.truncate(inode, attr.st_size)
                changes.update(size=attr.st_size, mtime_ns=now)
            else:
                await self._truncate(node, attr.st_size)
                node = self._node(inode)
        if fields.update_mode:
            changes["mode"] = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        meta_changed = any(k in changes for k in ("mode", "uid", "gid", "mtime_ns"))
        changes["ctime_ns"] = now
        self.journal.update(inode, **changes)
        if meta_changed and node.is_dir and inode != ROOT_INO:
            self.journal.set_dirty(inode, CONTENT)  # the marker carries the attributes
            self.writeback.touched.add(inode)
            self.writeback.kick()
        elif meta_changed and node.remote_key is not None and not node.is_dir:
            self.journal.set_dirty(inode, ATTRS)
            self.writeback.kick()
        return self._attrs(self._node(inode))

    async def _truncate(self, node: Node, size: int) -> None:
        """truncate(2) of a file not open for writing: open, cut, close."""
        self._writable()
        await self.contents.open_write(node, truncate=(size == 0))
        self.contents.st(node.ino).writers += 1
        try:
            await self.contents.truncate(node.ino, size)
        finally:
            await self.contents.close_writer(node.ino)
        self.writeback.kick()

    # ------------------------------------------------------------- directories

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        await self._ensure_listed(inode)
        fh = self._fh()
        self.dir_handles[fh] = inode
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """One kernel buffer's worth of entries, read a page at a time from the
        ``(parent, ino)`` index: a call costs what it returns, not the directory's size.
        The offset is the last inode returned (see :meth:`Journal.children`)."""
        ino = self.dir_handles[fh]
        after = start_id
        while True:
            page = self.journal.children(ino, after_ino=after, limit=READDIR_PAGE)
            for child in page:
                if not pyfuse3.readdir_reply(token, os.fsencode(child.name),
                                             self._attrs(child), child.ino):
                    return
                self.lookups[child.ino] += 1
                after = child.ino
            if len(page) < READDIR_PAGE:
                return
            # a checkpoint between pages: a large kernel buffer took up to 7 pages in
            # one step, 77-94 ms of CPU (the scale benchmark, run 8); the offset is an
            # inode, so what changes meanwhile is what changes between two calls
            await trio.sleep(0)

    async def releasedir(self, fh: int) -> None:
        self.dir_handles.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        ino = self.dir_handles.get(fh, ROOT_INO)
        await self._commit()
        for child in self.journal.children(ino):
            if child.dirty:
                await self.writeback.wait_clean(child.ino)

    async def _new_entry(self, parent_inode: int, raw: bytes) -> tuple[str, Node | None]:
        """The checks every creation shares: a writable mount, a storable name, a known
        parent directory. Returns the name and what already bears it (or None)."""
        self._writable()
        n = self._name(raw, creating=True)
        if not self._node(parent_inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        self._check_name(parent_inode, n)
        await self.dirsync.ensure_name(parent_inode, n)
        return n, self.journal.child(parent_inode, n)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        n, existing = await self._new_entry(parent_inode, name)
        if existing is not None:
            raise pyfuse3.FUSEError(errno.EEXIST)
        now = time.time_ns()
        ino = self.journal.insert(parent=parent_inode, name=n,
                                  mode=stat.S_IFDIR | stat.S_IMODE(mode), uid=ctx.uid,
                                  gid=ctx.gid, mtime_ns=now, ctime_ns=now, atime_ns=now,
                                  dirty=CONTENT, listed_at=time.time())
        self.journal.update(parent_inode, mtime_ns=now, ctime_ns=now)
        await self._commit()
        self.writeback.kick()
        self.lookups[ino] += 1
        return self._attrs(self._node(ino))

    async def _existing(self, parent_inode: int, raw: bytes) -> Node:
        """The checks every removal shares: a writable mount and an existing name."""
        self._writable()
        n = self._name(raw)
        await self.dirsync.ensure_name(parent_inode, n)
        node = self.journal.child(parent_inode, n)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = await self._existing(parent_inode, name)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        await self._ensure_listed(node.ino)
        if self.journal.count_children(node.ino):
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        if node.remote_key:
            self.journal.add_tombstone(node.remote_key, Kind.MARKER.value, node.remote_etag)
        self._left_behind(node.ino)
        self._drop_manifest(node.ino, self._key(node.ino))
        self.writeback.forget(node.ino)
        self.journal.update(node.ino, parent=ORPHAN_PARENT, name=f"#{node.ino}", dirty=0)
        self._maybe_reap(node.ino)
        now = time.time_ns()
        self.journal.update(parent_inode, mtime_ns=now, ctime_ns=now)
        await self._commit()
        self.writeback.kick()

    # -------------------------------------------------------------- namespace

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = await self._existing(parent_inode, name)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        self._remove(node)
        now = time.time_ns()
        self.journal.update(parent_inode, mtime_ns=now, ctime_ns=now)
        crash_point("unlink-before-commit")
        await self._commit()
        crash_point("unlink-after-commit")
        self.writeback.kick()

    def _remove(self, node: Node) -> None:
        """Take a file out of the namespace; its object goes in the background, and so
        does anything an upload of it may have written without getting to record it."""
        if node.remote_key:
            self.journal.add_tombstone(node.remote_key, node.remote_kind, node.remote_etag)
        self._left_behind(node.ino)
        self.writeback.forget(node.ino)
        self.journal.update(node.ino, parent=ORPHAN_PARENT, name=f"#{node.ino}", dirty=0,
                            remote_key=None)
        st = self.contents.states.get(node.ino)
        if st is not None:
            st.closed_at = None
        self._maybe_reap(node.ino)

    def _left_behind(self, ino: int, renamed: bool = False) -> None:
        """``ino`` leaves its key (unlinked, or ``renamed``, to its key now): what a write of it
        in flight, or one that failed after reaching S3, may leave under the old key gets
        a tombstone now, in this transaction (invariant 6: a crash before that write is
        recorded must not leave an object that no row and no tombstone names). Each is
        deleted only while it holds what that write wrote (its content, or the ETag a
        copy keeps); a marker goes in any case. Its own published object is not one of
        them unless a write may have replaced it: the guards are merged with its own
        tombstone, if any (:meth:`Journal.add_tombstone`)."""
        attempts = self.writeback.unrecorded(ino)
        if not attempts:
            return
        key = self._key(ino) if renamed else None
        keep = {key, f"{key}.delta", f"{key}/"} if key is not None else set()
        left = []
        for object_key, guard in attempts:
            if object_key not in keep:
                kind = Kind.MARKER.value if object_key.endswith("/") else None
                self.journal.add_tombstone(object_key, kind, guard)
                left.append(object_key)
        # named by their tombstones now (kept, a later rename queued them again)
        self.journal.drop_attempts(ino, left)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        self._writable()
        if flags & ~pyfuse3.RENAME_NOREPLACE:
            log.info("refused rename with flags %#x: only RENAME_NOREPLACE is supported", flags)
            raise pyfuse3.FUSEError(errno.EINVAL)
        old, new = self._name(name_old), self._name(name_new, creating=True)
        self._check_name(parent_inode_new, new)
        await self.dirsync.ensure_name(parent_inode_old, old)
        await self.dirsync.ensure_name(parent_inode_new, new)
        node = self.journal.child(parent_inode_old, old)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if node.is_dir:
            # a directory cannot move below itself
            p = parent_inode_new
            while p != ROOT_INO:
                if p == node.ino:
                    raise pyfuse3.FUSEError(errno.EINVAL)
                p = self._node(p).parent
        target = self.journal.child(parent_inode_new, new)
        if target is not None:
            if target.ino == node.ino:
                return
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise pyfuse3.FUSEError(errno.EEXIST)
            if target.is_dir:
                if not node.is_dir:
                    raise pyfuse3.FUSEError(errno.EISDIR)
                await self._ensure_listed(target.ino)
                if self.journal.count_children(target.ino):
                    raise pyfuse3.FUSEError(errno.ENOTEMPTY)
                if target.remote_key:
                    self.journal.add_tombstone(target.remote_key, Kind.MARKER.value,
                                               target.remote_etag)
                self._left_behind(target.ino)  # its marker may be in flight (review)
                self.writeback.forget(target.ino)
                self.journal.update(target.ino, parent=ORPHAN_PARENT, name=f"#{target.ino}",
                                    dirty=0, remote_key=None)
                self._maybe_reap(target.ino)
            else:
                if node.is_dir:
                    raise pyfuse3.FUSEError(errno.ENOTDIR)
                self._remove(target)
        if node.is_dir:
            # every object below must be known before the prefix changes, or the ones not
            # yet listed would stay behind under the old name
            await self._ensure_listed_tree(node.ino)
        now = time.time_ns()
        if node.is_dir:
            old_key = self._key(node.ino)
            self._drop_manifest(node.ino, old_key)
            for d in self.journal.descendants(node.ino):
                if d.is_dir:
                    self._drop_manifest(d.ino, self._key(d.ino))
        self.journal.update(node.ino, parent=parent_inode_new, name=new, ctime_ns=now)
        self._left_behind(node.ino, renamed=True)
        if node.is_dir:
            self._moved_dir(node)
            for d in self.journal.descendants(node.ino):
                self._left_behind(d.ino, renamed=True)
                if d.is_dir:
                    self._moved_dir(d)
                elif d.remote_key:
                    self.journal.set_dirty(d.ino, MOVED)
        elif node.remote_key:
            self.journal.set_dirty(node.ino, MOVED)
        for p in {parent_inode_old, parent_inode_new}:
            self.journal.update(p, mtime_ns=now, ctime_ns=now)
        crash_point("rename-before-commit")
        await self._commit()
        crash_point("rename-after-commit")
        self.writeback.kick()

    def _moved_dir(self, d: Node) -> None:
        """A directory whose key changed: its old marker goes, a new one is made."""
        if d.remote_key:
            self.journal.add_tombstone(d.remote_key, Kind.MARKER.value, d.remote_etag)
        self.journal.update(d.ino, remote_key=None, listed_at=time.time())
        self.journal.set_dirty(d.ino, CONTENT)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        log.info("refused hard link to inode %d: deltafs has no hard links", inode)
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        log.info("refused mknod of %r: only files, directories and symlinks are stored", name)
        raise pyfuse3.FUSEError(errno.EPERM)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        n, existing = await self._new_entry(parent_inode, name)
        if existing is not None:
            raise pyfuse3.FUSEError(errno.EEXIST)
        now = time.time_ns()
        ino = self.journal.insert(parent=parent_inode, name=n, mode=stat.S_IFLNK | 0o777,
                                  uid=ctx.uid, gid=ctx.gid, size=len(target), mtime_ns=now,
                                  ctime_ns=now, atime_ns=now, target=target, dirty=CONTENT)
        self.journal.update(parent_inode, mtime_ns=now, ctime_ns=now)
        await self._commit()
        self.writeback.kick()
        self.lookups[ino] += 1
        return self._attrs(self._node(ino))

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if not node.is_symlink:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if node.target is not None:
            return bytes(node.target)
        if not node.remote_key:
            raise pyfuse3.FUSEError(errno.EIO)
        try:
            body, _ = await trio.to_thread.run_sync(self.engine.store.get_bytes, node.remote_key)
        except DeltafsError as exc:
            log.error("readlink %s: %s", node.remote_key, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        self.journal.update(inode, target=body)
        return body

    # ------------------------------------------------------------------ files

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        n, existing = await self._new_entry(parent_inode, name)
        if existing is not None:
            if flags & os.O_EXCL:
                raise pyfuse3.FUSEError(errno.EEXIST)
            info = await self.open(existing.ino, flags | os.O_TRUNC, ctx)
            return info, self._attrs(self._node(existing.ino))
        await self._wait_for_budget()
        now = time.time_ns()
        ino = self.journal.insert(parent=parent_inode, name=n,
                                  mode=stat.S_IFREG | stat.S_IMODE(mode), uid=ctx.uid,
                                  gid=ctx.gid, size=0, mtime_ns=now, ctime_ns=now,
                                  atime_ns=now)
        crash_point("create")
        work = await self.contents.open_write(self._node(ino), truncate=True)
        self.contents.st(ino).writers += 1
        self.journal.update(parent_inode, mtime_ns=now, ctime_ns=now)
        fh = self._fh()
        self.handles[fh] = Handle(ino, True, src=self.contents.writer_source(ino), work=work)
        self.lookups[ino] += 1
        return pyfuse3.FileInfo(fh=fh), self._attrs(self._node(ino))

    async def _wait_for_budget(self) -> None:
        """Writers wait for uploads rather than fill the disk with dirty data."""
        while True:
            # the sum over dirty rows is O(dirty): at most once a second, not per create
            at, dirty = self._budget_checked
            if time.monotonic() - at > 1.0:
                dirty = self.journal.pending()[1]
                self._budget_checked = (time.monotonic(), dirty)
            if dirty < self.options.dirty_budget:
                return
            self._budget_checked = (0.0, dirty)
            log.info("dirty data at %d bytes (budget %d): waiting for uploads",
                     dirty, self.options.dirty_budget)
            self.writeback.kick()
            with trio.move_on_after(5):
                await self.writeback.changed.wait()

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.parent != ORPHAN_PARENT and not node.is_dir:
            # close-to-open across mounts: a listing older than the TTL is refreshed
            # first; a file another writer replaced gets a new inode and this one is
            # orphaned (see below)
            await self.dirsync.ensure_name(node.parent, node.name)
            node = self._node(inode)
        if node.parent == ORPHAN_PARENT and not node.remote_key and node.size \
                and not (node.staged and node.dirty & CONTENT) \
                and self.contents.states.get(inode) is None:
            # replaced by another writer (a listing orphaned it) after the kernel looked
            # it up: ESTALE makes the kernel walk the path again and open the new inode
            log.info("open of inode %d: replaced in the bucket since it was looked up "
                     "(ESTALE; the kernel looks the name up again)", inode)
            raise pyfuse3.FUSEError(errno.ESTALE)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        accmode = flags & os.O_ACCMODE
        fh = self._fh()
        if accmode == os.O_RDONLY and not flags & os.O_TRUNC:
            src = await self.contents.open_read(node)
            self.handles[fh] = Handle(inode, False, src=src)
            st = self.contents.st(inode)
            st.readers += 1
            keep = not node.dirty and node.sha256 is not None and st.work is None
            return pyfuse3.FileInfo(fh=fh, keep_cache=keep)
        self._writable()
        await self._wait_for_budget()
        truncate = bool(flags & os.O_TRUNC)
        work = await self.contents.open_write(node, truncate)
        self.contents.st(inode).writers += 1
        self.handles[fh] = Handle(inode, True, src=self.contents.writer_source(inode),
                                  work=work)
        return pyfuse3.FileInfo(fh=fh)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.handles[fh]
        assert h.src is not None
        return await self.contents.read(h.src, self.journal.get(h.ino), size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.handles[fh]
        if not h.writable or h.work is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return await self.contents.write(h.ino, h.work, off, buf)

    async def flush(self, fh: int) -> None:
        """close(2) of a written file: stage it durably now. The kernel sends RELEASE
        only after close() has returned, so waiting for it would let a crash right
        after close() lose the file."""
        h = self.handles.get(fh)
        if h is not None and h.writable:
            await self.contents.stage(h.ino)

    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh)
        st = self.contents.st(h.ino)
        if not h.writable:
            if h.src is not None:
                h.src.close()
            st.readers -= 1
            self.contents.forget_if_idle(h.ino)
            self._maybe_reap(h.ino)
            return
        try:
            await self.contents.close_writer(h.ino)
        finally:
            self._maybe_reap(h.ino)
            self.writeback.kick()

    async def fsync(self, fh: int, datasync: bool) -> None:
        """Stage the file, then wait until that version is in the bucket. Writes go on
        meanwhile (a sealed file is copied before it is written again)."""
        h = self.handles.get(fh)
        if h is None:
            return
        # POSIX fsync is per file, not per descriptor: a read-only descriptor's fsync
        # makes what any writer of the file wrote durable too
        await self.contents.stage(h.ino)
        st = self.contents.st(h.ino)
        node = self.journal.get(h.ino)
        if node is None or not node.dirty:
            return
        st.flush += 1
        try:
            while True:
                ok = await self.writeback.wait_published(h.ino, st.stage_seq)
                if ok is not None:
                    break
                # written again (an mmap's writeback) before that version's upload took
                # it: it will never go up, so stage what is there now and wait for it
                before = st.stage_seq
                await self.contents.stage(h.ino)
                if st.stage_seq == before:  # nothing to stage: wait for a change, no spin
                    with trio.move_on_after(1.0):
                        await self.writeback.changed.wait()
        finally:
            st.flush -= 1
            self.contents.forget_if_idle(h.ino)
        if not ok:
            log.error("fsync of inode %d: its upload failed for good (%s)", h.ino,
                      self.writeback.state.failed.get(h.ino, "see the log"))
            raise pyfuse3.FUSEError(errno.EIO)

    # ------------------------------------------------------------ filesystem

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = 128 * 1024
        s.f_frsize = 4096
        total = 1 << 50
        used = self.totals()[0]
        s.f_blocks = total // s.f_frsize
        s.f_bfree = s.f_bavail = (total - used) // s.f_frsize
        s.f_files = 1 << 32
        s.f_ffree = s.f_favail = (1 << 32) - 1
        s.f_namemax = 255
        return s

    # ---------------------------------------------------------------- xattrs

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        n = self._name(name)
        if not n.startswith(XATTR_PREFIX):
            raise pyfuse3.FUSEError(self._absent_xattr(n))
        node = self._node(inode)
        if inode == ROOT_INO and n == XATTR_PREFIX + "status" and \
                time.monotonic() - self._totals_at > max(10.0, 3 * self._totals_every):
            # nobody asked for a while (a one-off `deltafs status`): figures refreshed
            # now in a worker thread, not ones as old as the last reader's
            try:
                await self.refresh_totals()
            except sqlite3.Error as exc:
                log.debug("totals: %s", exc)  # the last figures are shown
        values = self._xattrs(node)
        if n not in values:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        if n == XATTR_PREFIX + "cached":
            return (await self._cached(node)).encode()
        return values[n].encode()

    async def _cached(self, node: Node) -> str:
        """Whether an open of ``node`` would read its content here without a GET: its
        own content written here, or the cache holding it (the cache's index is asked
        in a worker thread)."""
        s = self.contents.states.get(node.ino)
        if (s is not None and s.work is not None) or (node.staged and node.dirty & CONTENT):
            return "1"
        key = self.contents.cache_key(node)
        return "1" if await trio.to_thread.run_sync(self.cache.__contains__, key) else "0"

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [k.encode() for k in self._xattrs(self._node(inode))]

    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        n = self._name(name)
        if n.startswith(XATTR_PREFIX):
            raise pyfuse3.FUSEError(errno.EPERM)
        log.info("refused setxattr %s: extended attributes are not stored", n)
        raise pyfuse3.FUSEError(errno.ENOTSUP)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        n = self._name(name)
        if n.startswith(XATTR_PREFIX):
            raise pyfuse3.FUSEError(errno.EPERM)
        # ENODATA whatever the namespace: removing what is not there is no error for
        # libacl (`tar --acls -x`, `setfacl -b` drop default ACLs this way); ENOTSUP
        # would be (found by review)
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    @staticmethod
    def _absent_xattr(name: str) -> int:
        """The errno for an attribute deltafs does not hold.

        Only the ``user.`` namespace exists here; other namespaces (``security.``,
        ``system.`` ACLs, ``trusted.``) answer ENOTSUP, not ENODATA. ``ls -l`` asks every
        file for ``security.selinux`` and ``system.posix_acl_access``; on ENOTSUP it
        remembers that the device has neither and stops asking, which saves two FUSE
        round trips per file (most of a warm ``ls -l``).
        """
        return pyfuse3.ENOATTR if name.startswith("user.") else errno.ENOTSUP

    def _xattrs(self, node: Node) -> dict[str, str]:
        p = XATTR_PREFIX
        out: dict[str, str] = {}
        if node.ino == ROOT_INO:
            out[p + "status"] = json.dumps(self.status())
        if node.is_dir:
            return out
        state = "pending" if node.dirty else ("clean" if node.remote_key else "local")
        out[p + "state"] = state
        if node.remote_key:
            out[p + "cached"] = ""  # asked for alone (getxattr): see _cached
            out[p + "kind"] = node.remote_kind or ""
            out[p + "key"] = node.remote_key
            out[p + "stored_size"] = str(node.remote_size or 0)
            if node.remote_ref:
                out[p + "reference"] = node.remote_ref
        if node.sha256:
            out[p + "sha256"] = node.sha256
        return out

    def totals(self) -> tuple[int, int]:
        """(logical, stored) bytes as of the last refresh (at most ~2 s old while someone
        asks): a sum over every row must not run on the trio thread."""
        self._totals_wanted = True
        return self._totals

    def oldest_staged(self) -> float:
        """When the oldest staged file not yet uploaded was last written (0.0: none), as
        of the last refresh (see :meth:`totals`)."""
        self._totals_wanted = True
        return self._oldest_staged

    async def refresh_totals(self) -> None:
        self._totals_wanted = False
        t0 = time.monotonic()
        self._totals, self._oldest_staged = await trio.to_thread.run_sync(
            lambda: (self.journal.totals(), self.journal.oldest_staged()))
        self._totals_at = time.monotonic()
        # the sum is O(rows): a big journal is summed less often (a scrape every 2 s of a
        # 1,000,000-row journal would otherwise keep a core 5 % busy)
        self._totals_every = max(2.0, 50 * (self._totals_at - t0))

    def status(self) -> dict[str, Any]:
        """What ``deltafs status`` prints."""
        from .status import mount_status

        return mount_status(self)

    # ------------------------------------------------------------- lifecycle

    async def committer(self) -> None:
        """Commit what accumulated (attribute changes, upload results) every second. A
        failed commit (a full disk) is logged and tried again: it must never end the
        mount (issue 8: the committer died and took every later operation with it)."""
        failing = False
        while True:
            await trio.sleep(1.0)
            if self._totals_wanted and \
                    time.monotonic() - self._totals_at > self._totals_every:
                try:
                    await self.refresh_totals()
                except sqlite3.Error as exc:
                    log.debug("totals: %s", exc)
            if not self.journal.db.in_transaction and not self.journal.needs_sync \
                    and not self.contents._after_commit:  # noqa: SLF001
                continue
            try:
                await self._commit()
            except (sqlite3.Error, OSError) as exc:
                if not failing:
                    log.error("journal commit failed (%s); trying again every second", exc)
                failing = True
                await trio.to_thread.run_sync(self.cache.shrink, 16 << 20)
                continue
            if failing:
                log.info("journal commits work again")
            failing = False


__all__ = ["DeltaFS", "Options", "recover"]
