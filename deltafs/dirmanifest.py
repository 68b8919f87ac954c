"""The mount's listing manifests (format: :mod:`deltafs.manifest`): read to list a
directory without a HEAD per file, written after this mount changed a directory.

A manifest is a cache, never the authority: an entry is used only for the object version
it names (same ETag and size as the LIST shows); every other object is HEADed as before.
It is written from the journal's committed, clean rows (what the bucket holds as this
mount last saw it), at most every ``interval(n)`` seconds per directory and at unmount,
so a copy of 100,000 files rewrites it a few dozen times, not once per file. A directory
left with no file loses its manifest, as does a directory removed or renamed (or its
prefix would stay alive in the bucket).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sqlite3
import stat
import threading
import time
import uuid
from typing import Awaitable, Callable, Mapping

import trio

from .version import __version__
from .engine import Engine
from .errors import Changed, DeltafsError, NotFound
from .format import StoredFile, split_key
from .index import key_of
from .journal import ROOT_INO, Journal
from .manifest import Encoder, ManifestEntry, decode_indexed, manifest_key, stored_from
from .store.base import ObjectInfo

log = logging.getLogger(__name__)

#: a directory's manifest is rewritten at most this often while it changes ...
MIN_INTERVAL = 5.0
#: ... and less often the larger it is (100,000 entries: every 50 s)
ENTRIES_PER_SECOND = 2000
#: fewer unknown objects than this, in a directory whose manifest is large, are HEADed
#: rather than GETting the whole manifest
GET_ABOVE = 8
SMALL_MANIFEST = 256 << 10
#: decoded manifests kept at once (one per listing in progress)
MAX_CACHED = 4


async def _nothing() -> None:
    return None


def interval(entries: int) -> float:
    return max(MIN_INTERVAL, entries / ENTRIES_PER_SECOND)


class DirManifests:
    """Reads manifests for listings (worker threads) and writes them (a trio task)."""

    def __init__(self, journal: Journal, engine: Engine, prefix: str,
                 writable: bool = True) -> None:
        self.journal = journal
        self.engine = engine
        self.prefix = prefix.strip("/")
        self.writable = writable
        #: decoded manifests by key (the listings running now), ETag as listed; owned by
        #: this object, used from listing worker threads under ``_lock``
        self._lock = threading.Lock()
        self._cached: dict[str, tuple[str, Mapping[str, ManifestEntry] | None]] = {}
        #: deltaspace (bucket key of a directory) -> when it first changed since written
        self._due: dict[str, float] = {}
        self._written: dict[str, float] = {}
        self._size: dict[str, int] = {}
        self.wakeup = trio.Event()
        self.writer = f"{__version__} {socket.gethostname()} pid {os.getpid()}"
        #: makes the journal durable (so the read connection sees every row)
        self.commit: Callable[[], Awaitable[None]] = _nothing

    # ------------------------------------------------------------------ reading

    def resolve(self, unknown: list[ObjectInfo], listed: ObjectInfo) -> dict[str, StoredFile]:
        """StoredFiles for the listed objects ``unknown`` that the directory's manifest
        (the object ``listed``) describes at exactly their version. Worker thread."""
        if len(unknown) < GET_ABOVE and listed.size > SMALL_MANIFEST:
            return {}
        dir_prefix = listed.key[: -len(split_key(listed.key)[1])]
        entries = self._entries(dir_prefix, listed)
        if not entries:
            return {}
        out: dict[str, StoredFile] = {}
        for o in unknown:
            f = stored_from(dir_prefix, entries, o.key, o.size, o.etag, o.mtime)
            if f is not None:
                out[o.key] = f
        return out

    def _entries(self, dir_prefix: str, listed: ObjectInfo
                 ) -> Mapping[str, ManifestEntry] | None:
        with self._lock:
            c = self._cached.get(listed.key)
            if c is not None and c[0] == listed.etag:
                return c[1]
        try:
            body, _ = self.engine.store.get_bytes(listed.key)
        except NotFound:
            return None
        except DeltafsError as exc:
            log.warning("cannot read the manifest %s (HEADing instead): %s", listed.key, exc)
            return None
        # kept on the cache disk, not in memory: 2 MB for 100,000 entries, not 55
        try:
            entries = decode_indexed(dir_prefix, body, str(self.engine.tmp_dir))
        except OSError as exc:  # a full cache disk: the listing HEADs instead
            log.warning("cannot spool the manifest %s (HEADing instead): %s", listed.key, exc)
            return None
        del body
        with self._lock:
            # under the listed ETag: the next pages of this listing ask for that one
            # (each entry is still checked against each object's own ETag)
            self._cached[listed.key] = (listed.etag, entries)
            while len(self._cached) > MAX_CACHED:  # listings that failed half-way
                del self._cached[next(iter(self._cached))]
        return entries

    def forget_cached(self, key: str) -> None:
        """That directory's listing is done: a 100,000-entry manifest is tens of MB."""
        with self._lock:
            self._cached.pop(key, None)

    # ------------------------------------------------------------------ writing

    def touch(self, object_key: str) -> None:
        """An object in this directory was written, moved or deleted by this mount."""
        if not self.writable or object_key.endswith("/"):
            return  # a marker belongs to its parent's listing, which has no entry for it
        space = split_key(object_key)[0]
        self._due.setdefault(space, time.monotonic())
        self.wakeup.set()

    async def run(self) -> None:
        """Write the manifests that are due, one at a time, until cancelled."""
        while True:
            with trio.move_on_after(1.0):
                await self.wakeup.wait()
            self.wakeup = trio.Event()
            now = time.monotonic()
            for space, since in list(self._due.items()):
                # a second after the first change: its journal commit is in by then
                last = self._written.get(space, 0.0)
                if now - since >= 1.0 and now - last >= interval(self._size.get(space, 0)):
                    await self.write(space)

    async def flush(self) -> None:
        """Write every due manifest now (unmount)."""
        for space in list(self._due):
            await self.write(space)

    async def write(self, space: str) -> None:
        self._due.pop(space, None)
        self._written[space] = time.monotonic()
        try:
            # the manifest is built from committed rows: make the ones whose change
            # made it due (recorded a moment ago) committed first
            await self.commit()
            n, ino, etag = await trio.to_thread.run_sync(self._write, space)
            self._size[space] = n
            if ino is None:
                return
            node = self.journal.get(ino)
            try:
                here = node is not None and node.parent != 0 and \
                    key_of(self.journal, self.prefix, ino) == space
            except KeyError:
                here = False
            if etag is not None and not here:
                # removed or renamed while the manifest was built: it must not keep the
                # old prefix alive
                key = manifest_key(f"{space}/" if space else "")
                try:
                    await trio.to_thread.run_sync(
                        lambda: self.engine.store.delete(key, if_match=etag))
                except (NotFound, Changed):
                    pass
                return
            self.journal.set_manifest(ino, etag)
        except (DeltafsError, OSError, ValueError, sqlite3.Error) as exc:
            # a cache: never worth the mount (a full disk for the spool, a row a
            # manifest cannot describe)
            log.warning("manifest of %s not written (the next change tries again): %s",
                        space or "/", exc)

    def _dir_ino(self, space: str) -> int | None:
        """The directory row of bucket prefix ``space`` (committed state)."""
        rel = space
        if self.prefix:
            if space == self.prefix:
                rel = ""
            elif space.startswith(self.prefix + "/"):
                rel = space[len(self.prefix) + 1:]
            else:
                return None
        ino = ROOT_INO
        for part in rel.split("/") if rel else []:
            rows = self.journal.read("SELECT ino, mode FROM nodes WHERE parent=? AND name=?",
                                     (ino, part))
            if not rows or not stat.S_ISDIR(rows[0][1]):
                return None
            ino = rows[0][0]
        return ino

    def _write(self, space: str) -> tuple[int, int | None, str | None]:
        """Build the manifest of ``space`` from the committed clean rows and PUT it (or
        remove it when the directory has no file left). Worker thread: returns (entries,
        directory inode, ETag written) for the trio thread to record."""
        dir_prefix = f"{space}/" if space else ""
        key = manifest_key(dir_prefix)
        ino = self._dir_ino(space)
        # spooled on the cache disk, not /tmp (which may be small, or RAM)
        with Encoder(dir_prefix, self.writer, str(self.engine.tmp_dir),
                     unique_names=True) as enc:
            newest = self._encode_rows(enc, ino, dir_prefix) if ino is not None else None
            if newest is None:
                # a cache: removed unconditionally (another mount's newer one costs
                # nothing but HEADs), and it must not keep an emptied prefix alive
                try:
                    self.engine.store.delete(key)
                except NotFound:
                    pass
                return 0, ino, None
            if self.engine.store.head(dir_prefix + newest) is None:
                # our newest object is gone: another writer is removing this directory,
                # and a manifest written now (from rows it has not seen go) would bring
                # it back
                log.info("not writing %s: %s is gone from the bucket", key, newest)
                return 0, ino, None
            body = self.engine.tmp_dir / f"manifest-{uuid.uuid4().hex}"
            try:
                size = enc.finish_file(str(body))
                info = self.engine.store.put_file(key, body, {})
            finally:
                body.unlink(missing_ok=True)
            count = enc.count
        log.debug("wrote %s: %d entries, %d bytes", key, count, size)
        return count, ino, info.etag

    def _encode_rows(self, enc: Encoder, ino: int, dir_prefix: str) -> str | None:
        """Give ``enc`` the entries of the directory's committed clean rows, newest
        first, streamed from the journal; returns the newest entry's name (``None``: no
        entry)."""
        newest: str | None = None
        with self.journal.read_cursor() as conn, contextlib.closing(conn.cursor()) as rows:
            for (name, rkey, etag, rsize, rkind, size, mode, uid, gid, mtime_ns, sha,
                 ref) in rows.execute(
                    "SELECT name, remote_key, remote_etag, remote_size, remote_kind, size, "
                    "mode, uid, gid, mtime_ns, sha256, remote_ref FROM nodes WHERE parent=? "
                    # exactly the object as published: not being rewritten (a working
                    # file makes size and mtime local), nothing pending, and its metadata
                    # known (a row taken from a LIST alone would turn defaults into
                    # "metadata" for every other mount)
                    "AND ino != parent AND dirty = 0 AND staged IS NULL AND sha256 IS NOT "
                    "NULL AND remote_key IS NOT NULL AND remote_etag IS NOT NULL AND "
                    "remote_kind != 'marker' ORDER BY ino DESC", (ino,)):
                if not rkey.startswith(dir_prefix) or "/" in rkey[len(dir_prefix):]:
                    continue
                try:
                    entry = ManifestEntry(
                        rkey[len(dir_prefix):], etag, int(rsize or 0),
                        "delta" if rkind == "delta" else "direct", int(size),
                        mode, uid, gid, mtime_ns, sha,
                        ref if rkind == "delta" else None, symlink=stat.S_ISLNK(mode))
                except ValueError as exc:
                    log.debug("not in the manifest: %s", exc)
                    continue
                enc.add(entry)
                if newest is None:
                    newest = entry.name
        return newest
