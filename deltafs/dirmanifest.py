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

import logging
import os
import socket
import stat
import threading
import time
from typing import Callable

import trio

from . import __version__
from .engine import Engine
from .errors import Changed, DeltafsError, NotFound
from .format import StoredFile, split_key
from .index import key_of
from .journal import ROOT_INO, Journal
from .manifest import ManifestEntry, decode, encode, manifest_key, stored_from
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
        self._lock = threading.Lock()  # the decoded-manifest cache (worker threads)
        self._cached: tuple[str, str, dict[str, ManifestEntry] | None] | None = None
        #: deltaspace (bucket key of a directory) -> when it first changed since written
        self._due: dict[str, float] = {}
        self._written: dict[str, float] = {}
        self._size: dict[str, int] = {}
        self.wakeup = trio.Event()
        self.writer = f"{__version__} {socket.gethostname()} pid {os.getpid()}"
        #: called after a manifest was written or removed (for tests and status)
        self.on_written: Callable[[str], None] = lambda key: None

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

    def _entries(self, dir_prefix: str, listed: ObjectInfo) -> dict[str, ManifestEntry] | None:
        with self._lock:
            c = self._cached
            if c is not None and c[0] == listed.key and c[1] == listed.etag:
                return c[2]
        try:
            body, info = self.engine.store.get_bytes(listed.key)
        except NotFound:
            return None
        except DeltafsError as exc:
            log.warning("cannot read the manifest %s (HEADing instead): %s", listed.key, exc)
            return None
        entries = decode(dir_prefix, body)
        del body
        with self._lock:
            self._cached = (listed.key, info.etag or listed.etag, entries)
        return entries

    def forget_cached(self) -> None:
        """Listing done: a 100,000-entry manifest is tens of MB; do not keep it."""
        with self._lock:
            self._cached = None

    # ------------------------------------------------------------------ writing

    def space_of(self, object_key: str) -> str:
        return split_key(object_key)[0]

    def touch(self, object_key: str) -> None:
        """An object in this directory was written, moved or deleted by this mount."""
        if not self.writable:
            return
        space = self.space_of(object_key)
        self._due.setdefault(space, time.monotonic())
        self.wakeup.set()

    def pending(self) -> int:
        return len(self._due)

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
        except DeltafsError as exc:
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
        entries: list[ManifestEntry] = []
        if ino is not None:
            for (name, rkey, etag, rsize, rkind, size, mode, uid, gid, mtime_ns, sha,
                 ref) in self.journal.read(
                    "SELECT name, remote_key, remote_etag, remote_size, remote_kind, size, "
                    "mode, uid, gid, mtime_ns, sha256, remote_ref FROM nodes WHERE parent=? "
                    "AND ino != parent AND dirty = 0 AND remote_key IS NOT NULL AND "
                    "remote_etag IS NOT NULL AND remote_kind != 'marker'", (ino,)):
                if not rkey.startswith(dir_prefix) or "/" in rkey[len(dir_prefix):]:
                    continue
                try:
                    entries.append(ManifestEntry(
                        rkey[len(dir_prefix):], etag, int(rsize or 0),
                        "delta" if rkind == "delta" else "direct", int(size),
                        mode, uid, gid, mtime_ns, sha,
                        ref if rkind == "delta" else None, symlink=stat.S_ISLNK(mode)))
                except ValueError as exc:
                    log.debug("not in the manifest: %s", exc)
        known = self.journal.read("SELECT etag FROM manifests WHERE dir_ino=?", (ino,)) \
            if ino is not None else []
        if not entries:
            if known or ino is None:
                try:
                    self.engine.store.delete(key, if_match=known[0][0] if known else None)
                except (NotFound, Changed):
                    pass
                self.on_written(key)
            return 0, ino, None
        body = encode(dir_prefix, entries, self.writer)
        info = self.engine.store.put_bytes(key, body, {})
        log.debug("wrote %s: %d entries, %d bytes", key, len(entries), len(body))
        self.on_written(key)
        return len(entries), ino, info.etag
