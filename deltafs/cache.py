"""The content cache: verified file contents keyed by SHA-256, size-bounded, LRU.

References and reconstructed files go in here only after their SHA-256 matched, so a hit
is served without re-checking. Keyed by content, a reference shared by many deltas (or a
file present under several names) is held once, and a reference written by this process
is never downloaded again by the next.

diskcache keeps the index (SQLite, safe across threads and processes) and the LRU order.
Entries enter by hard link rather than by copy, so adding a 1 GB file costs no I/O; users
take an entry out the same way (a hard link into their own temp directory), so an eviction
while xdelta3 reads a reference cannot pull the file from under it.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import diskcache

log = logging.getLogger(__name__)

RESERVE_BYTES = 8 << 20


class _Adopt:
    """A value meaning "take this file in by hard link" (copy only across filesystems)."""

    def __init__(self, path: Path, link: bool = True) -> None:
        self.path = path
        self.link = link


class _LinkingDisk(diskcache.Disk):
    """diskcache's Disk, plus adoption of whole files without copying them."""

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if isinstance(value, _Adopt):
            filename, full_path = self.filename(key, value)
            os.makedirs(os.path.dirname(full_path), exist_ok=True)
            try:
                if not value.link:
                    raise OSError(errno.EPERM, "copy asked for")
                os.link(value.path, full_path)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                shutil.copyfile(value.path, full_path)
            return os.path.getsize(full_path), diskcache.core.MODE_BINARY, filename, None
        return super().store(value, read, key)


class ContentCache:
    """SHA-256 -> file, bounded by ``size_limit`` bytes (least recently used goes first)."""

    def __init__(self, directory: Path, size_limit: int = 2 << 30) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory = directory
        self._cache = diskcache.Cache(
            str(directory),
            disk=_LinkingDisk,
            size_limit=size_limit,
            eviction_policy="least-recently-used",
            cull_limit=16,
            disk_min_file_size=0,
        )

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self._cache

    def add(self, sha256: str, path: Path, link: bool = True) -> None:
        """Adopt the file at ``path`` (already verified to hash to ``sha256``).

        With ``link`` the cache takes another hard link to it (no I/O): only for files
        nobody will write again (our own scratch and staged files). A user's file is
        copied (``link=False``), or rewriting it in place would change a cached,
        "verified" reference behind our back."""
        if sha256 in self._cache:
            return
        try:
            self._cache.set(sha256, _Adopt(path, link))
        except OSError as exc:
            # A full cache disk must not fail the operation that wanted to cache.
            log.warning("cannot cache %s… (%s); continuing without", sha256[:12], exc)

    def link(self, sha256: str, dest: Path) -> bool:
        """Hard-link the entry for ``sha256`` to ``dest`` (on the cache's filesystem);
        ``False`` on a miss. The link survives the entry's eviction."""
        try:
            handle = self._cache.get(sha256, default=None, read=True)
        except OSError:
            return False
        if handle is None:
            return False
        with handle:
            try:
                os.link(handle.name, dest)
            except FileNotFoundError:
                return False  # evicted between lookup and link
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                shutil.copyfile(handle.name, dest)
        return True

    def keep_reserve(self) -> None:
        """Hold a few MiB of the disk in a reserve file. When the disk fills up, giving
        it back is what lets the cache's own database record the evictions that make
        room (SQLite cannot delete rows on a disk with no byte left)."""
        reserve = self.directory.parent / "reserve"
        if reserve.exists():
            return
        try:
            fd = os.open(reserve, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
            finally:
                os.close(fd)
        except OSError as exc:
            reserve.unlink(missing_ok=True)
            log.debug("no disk reserve: %s", exc)

    def shrink(self, need: int) -> int:
        """Evict least recently used entries until ``need`` bytes are freed (or the
        cache is empty): called when the disk is full, so that clean data goes before
        a write fails. Returns the bytes freed."""
        (self.directory.parent / "reserve").unlink(missing_ok=True)
        before = self.volume()
        limit = int(self._cache.size_limit)
        try:
            self._cache.reset("size_limit", max(0, before - need))
            self._cache.cull()
        except (OSError, sqlite3.Error) as exc:
            log.warning("disk full: could not evict clean cache entries: %s", exc)
        finally:
            try:
                self._cache.reset("size_limit", limit)
            except (OSError, sqlite3.Error):
                pass
        freed = before - self.volume()
        log.info("disk full: evicted %d bytes of clean cache", freed)
        self.keep_reserve()
        return freed

    def discard(self, sha256: str) -> None:
        self._cache.delete(sha256)

    def volume(self) -> int:
        """Bytes the cache holds on disk."""
        return int(self._cache.volume())

    def close(self) -> None:
        self._cache.close()
