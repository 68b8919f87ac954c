"""The content cache: verified file contents keyed by SHA-256, size-bounded, LRU.

References and reconstructed files go in here only after their SHA-256 matched. Keyed by
content, a reference shared by many deltas (or a file present under several names) is
held once, and a reference written by this process is never downloaded again by the next.

A disk can rot and a stray process can write anywhere, so an entry is never trusted just
because it is here (issue 8: damaged entries were served). Each entry carries a checksum
of every 128 KiB block (:mod:`deltafs.blocksums`), stored with the entry in the cache's
index, and every use checks
what it takes: a read (:class:`CachedFile`) checks the blocks it serves, a reference taken
out for xdelta3 (:meth:`ContentCache.link` with ``verify``) is hashed whole against its
SHA-256. A damaged entry is dropped; the caller fetches the content again.

diskcache keeps the index (SQLite, safe across threads and processes) and the LRU order.
Entries enter by hard link rather than by copy, so adding a 1 GB file costs no I/O; users
take an entry out the same way (a hard link into their own temp directory), so an eviction
while xdelta3 reads a reference cannot pull the file from under it.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diskcache

from .blocksums import BLOCK, WIDTH, Summer, add_sums, block_sum, summer
from .errors import IntegrityError

log = logging.getLogger(__name__)

RESERVE_BYTES = 8 << 20
_READ = 8 * BLOCK


def block_sums(path: Path | str) -> bytes:
    """The sum of each ``BLOCK`` of the file (:mod:`deltafs.blocksums`)."""
    return digest_file(path, sha=False)[1]


def digest_file(path: Path | str, sha: bool = True) -> tuple[str, bytes]:
    """SHA-256 (unless ``sha`` is False) and block sums of a file, in one pass.

    A small file gets a buffer of its own size: a fresh 1 MiB buffer, zeroed, was most of
    a 300-byte file's digest (57 µs), all of it holding the GIL, once per file uploaded
    (py-spy, 20,000 small creates: 8% of the time any thread held the GIL)."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        cap = min(_READ, -(-(size + 1) // 4096) * 4096)
        got = _digest(f, sha, cap)
        if got is None:  # it grew while read: again, in whole chunks
            f.seek(0)
            got = _digest(f, sha, _READ)
    return got


def _digest(f: Any, sha: bool, cap: int) -> tuple[str, bytes] | None:
    """The digest of ``f`` read in chunks of ``cap`` (``_READ``, or more than the whole
    file: None if it was not)."""
    h = hashlib.sha256() if sha else None
    out = bytearray()
    buf = bytearray(cap)  # one buffer, reused: no fresh mapping per chunk (memtrim)
    with memoryview(buf) as view:
        while True:
            n = 0  # fill the chunk: the sums need whole blocks until the end of the file
            while n < cap and (got := f.readinto(view[n:])):
                n += got
            if n == cap and cap < _READ:
                return None
            if not n:
                break
            chunk = view[:n]
            if h is not None:
                h.update(chunk)
            add_sums(out, chunk)
            chunk.release()
            if n < cap:
                break
    return (h.hexdigest() if h is not None else ""), bytes(out)


@dataclass
class CachedFile:
    """A descriptor on a cache entry (our own hard link: eviction cannot pull it away)
    that checks every block it returns against the entry's sums."""

    fd: int
    sums: bytes
    size: int
    key: str
    #: bytes per block sum and the function that makes them (blocksums.summer)
    width: int = WIDTH
    summer: Summer = block_sum

    def pread(self, size: int, off: int) -> bytes:
        if size <= 0 or off >= self.size:
            return b""
        end = min(off + size, self.size)
        first, last = off // BLOCK, (end - 1) // BLOCK
        data = os.pread(self.fd, (last - first + 1) * BLOCK, first * BLOCK)
        want = min((last + 1) * BLOCK, self.size) - first * BLOCK
        if len(data) != want:
            raise IntegrityError(f"cache entry {self.key[:12]}… is truncated")
        w, fn = self.width, self.summer
        with memoryview(data) as view:  # the sums read the blocks in place, no copies
            for i, b in enumerate(range(first, last + 1)):
                if fn(view[i * BLOCK:(i + 1) * BLOCK]) != self.sums[b * w:(b + 1) * w]:
                    raise IntegrityError(f"cache entry {self.key[:12]}… is damaged (block "
                                         f"{b}, bytes {b * BLOCK}-{(b + 1) * BLOCK - 1})")
        base = first * BLOCK
        return data[off - base:end - base]

    def close(self) -> None:
        os.close(self.fd)


class _Adopt:
    """A value meaning "take this file in by hard link" (copy only across filesystems)."""

    def __init__(self, path: Path, link: bool = True) -> None:
        self.path = path
        self.link = link


#: pages of the cache index each thread's connection keeps in memory (4 KiB each)
INDEX_CACHE_PAGES = 256


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
        try:
            self._cache = self._open(directory, size_limit)
        except sqlite3.DatabaseError as exc:
            # Only a cache: a damaged index (a disk that filled up under it, a bad
            # restore) costs downloads, never a mount. Nothing staged lives here.
            log.error("content cache %s is unusable (%s): starting it empty", directory, exc)
            aside = directory.with_name(f"{directory.name}.damaged-{os.getpid()}")
            os.replace(directory, aside)
            shutil.rmtree(aside, ignore_errors=True)
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._cache = self._open(directory, size_limit)

    @staticmethod
    def _open(directory: Path, size_limit: int) -> diskcache.Cache:
        return diskcache.Cache(
            str(directory),
            disk=_LinkingDisk,
            size_limit=size_limit,
            eviction_policy="least-recently-used",
            cull_limit=16,
            disk_min_file_size=0,
            # diskcache opens one SQLite connection per thread, each by default with a
            # 32 MiB page cache and a 64 MiB memory map of the index. With 100,000
            # entries (a 28 MB index) and the worker threads of a copy, that was the
            # daemon's growth with the number of files: 4 threads looking up 100,000
            # keys grew a process to 225 MB RSS, against 50 MB with these (the index
            # stays in the kernel's page cache either way)
            sqlite_cache_size=INDEX_CACHE_PAGES,
            sqlite_mmap_size=0,
        )

    def __contains__(self, sha256: str) -> bool:
        try:
            return sha256 in self._cache
        except (OSError, sqlite3.Error):
            return False

    def add(self, sha256: str, path: Path, link: bool = True, sums: bytes | None = None
            ) -> None:
        """Adopt the file at ``path`` (already verified to hash to ``sha256``).

        With ``link`` the cache takes another hard link to it (no I/O): only for files
        nobody will ever write again (our own scratch files and sealed staged files). A
        user's file is copied (``link=False``), or rewriting it in place would change a
        cached, "verified" reference behind our back. ``sums`` are the block sums when
        the caller has them; else they are computed here (one read of the file)."""
        if sha256 in self._cache:
            return
        try:
            if sums is None:
                sums = block_sums(path)
            self._cache.set(sha256, _Adopt(path, link), tag=sums)
        except (OSError, sqlite3.Error) as exc:
            # A full cache disk must not fail the operation that wanted to cache.
            log.warning("cannot cache %s… (%s); continuing without", sha256[:12], exc)

    def _entry(self, key: str) -> tuple[Any, bytes] | None:
        try:
            found = self._cache.get(key, default=None, read=True, tag=True)
        except (OSError, sqlite3.Error):
            return None
        if found is None or found[0] is None:
            return None
        handle, sums = found
        if not isinstance(sums, bytes):
            handle.close()
            self.discard(key)  # an entry of an older version, without sums
            return None
        return handle, sums

    def _link_out(self, handle: Any, dest: Path) -> bool:
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

    def has(self, key: str) -> bool:
        """Whether an entry for ``key`` is there now (it may be evicted at any time)."""
        try:
            return key in self._cache
        except (OSError, sqlite3.Error):
            return False

    def link(self, sha256: str, dest: Path, verify: bool = True) -> bool:
        """Hard-link the entry for ``sha256`` to ``dest`` (on the cache's filesystem);
        ``False`` on a miss. The link survives the entry's eviction. With ``verify``
        (for xdelta3, which reads the whole file) the linked file is hashed whole first;
        a damaged entry is dropped and counts as a miss."""
        found = self._entry(sha256)
        if found is None:
            return False
        handle, sums = found
        if not self._link_out(handle, dest):
            return False
        if verify:
            actual, got = digest_file(dest)
            # (sums of an older version are another width: the SHA-256 alone decides,
            # and a read checks them with their own function)
            if actual != sha256 or (len(got) == len(sums) and got != sums):
                log.error("cache entry %s… is damaged (SHA-256 %s…): dropped, fetching "
                          "it again", sha256[:12], actual[:12])
                dest.unlink(missing_ok=True)
                self.discard(sha256)
                return False
        return True

    def open(self, key: str, scratch: Path) -> CachedFile | None:
        """A :class:`CachedFile` on the entry ``key`` (its blocks checked as they are
        read), or ``None`` on a miss."""
        found = self._entry(key)
        if found is None:
            return None
        handle, sums = found
        tmp = scratch / f"open-{os.getpid()}-{id(handle)}-{os.urandom(4).hex()}"
        if not self._link_out(handle, tmp):
            return None
        try:
            fd = os.open(tmp, os.O_RDONLY)
        finally:
            tmp.unlink(missing_ok=True)
        size = os.fstat(fd).st_size
        kind = summer(sums, size)
        if kind is None:
            os.close(fd)
            log.error("cache entry %s… has the wrong size (%d bytes): dropped", key[:12], size)
            self.discard(key)
            return None
        return CachedFile(fd, sums, size, key, *kind)

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

    @property
    def size_limit(self) -> int:
        return int(self._cache.size_limit)

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
        try:
            self._cache.delete(sha256)
        except (OSError, sqlite3.Error) as exc:
            log.warning("cannot drop cache entry %s…: %s", sha256[:12], exc)

    def volume(self) -> int:
        """Bytes the cache holds on disk."""
        try:
            return int(self._cache.volume())
        except (OSError, sqlite3.Error):
            return 0

    def close(self) -> None:
        self._cache.close()
