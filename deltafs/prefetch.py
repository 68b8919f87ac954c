"""Objects fetched ahead of a rebuild: the GETs of the file after next, done while the
next file decodes, so that its rebuild starts with its objects on disk.

Why: reading a chained directory in name order, each file's rebuild is two GETs (the
pointer, with its metadata, then the blob that yields its content) and a decode against
the file before it. The read-ahead already rebuilds the next file while the current one
is read, but then the rebuild is the critical path, and a third of it is waiting for
the two GETs (measured on the wheels: ~15 ms each of a ~95 ms rebuild). Their bytes do
not depend on the decode before them, so they can be fetched a file earlier.

What may be served from here, and why it is safe:

- a *mutable* object (a pointer, a plain delta, a whole file) is served only for the
  version the reader asks for: the ETag its row holds must equal the one the GET
  returned, or the entry is dropped and the reader GETs it itself;
- a chain *blob* is immutable (content-addressed, never rewritten), and its decode
  checks its output's SHA-256, so any copy of it serves.

Bounds: at most :data:`MAX_ENTRIES` objects and :data:`MAX_BYTES` bytes on the cache
disk, the oldest dropped first. An entry nobody takes is deleted when evicted, or by
:meth:`Prefetched.clear` when the cache disk runs short of room; the daemon empties
the whole temp directory at start.
Thread-safe: the read-ahead fills it from one worker thread, rebuilds take from others.
"""
from __future__ import annotations

import logging
import os
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

from .store.base import ObjectInfo

log = logging.getLogger(__name__)

#: objects kept at once (two per file ahead: the pointer and its blob)
MAX_ENTRIES = 8
#: bytes kept at once on the cache disk
MAX_BYTES = 256 << 20
#: how long a rebuild waits at most for a fetch of the same object already under way
#: (a second GET of it would only race the first); the fetch ends by itself, within
#: the store's own timeouts and retries, so this is only a backstop
WAIT_S = 600.0


class Prefetched:
    """Downloaded objects waiting for the rebuild that needs them (see module doc)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        #: key -> (file, info as the GET returned it)
        self._ready: OrderedDict[str, tuple[Path, ObjectInfo]] = OrderedDict()
        #: key -> set when its fetch ends (either way)
        self._running: dict[str, threading.Event] = {}
        self._bytes = 0
        #: objects taken by a rebuild / fetched and never taken (status, tests)
        self.used = 0
        self.wasted = 0

    def begin(self, key: str) -> Path | None:
        """Claim the fetch of ``key``: the path to download it to, or ``None`` when it
        is here already or being fetched."""
        # first: a directory that cannot be made must not leave the key marked as being
        # fetched (every rebuild of it would wait for a fetch that never ends; found by
        # review)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._lock:
            if key in self._ready or key in self._running:
                return None
            self._running[key] = threading.Event()
        return self.directory / f"{uuid.uuid4().hex}"

    def end(self, key: str, path: Path, info: ObjectInfo | None) -> None:
        """The fetch of ``key`` ended: into ``path`` with ``info``, or failed (``None``)."""
        drop: list[Path] = []
        with self._lock:
            event = self._running.pop(key, None)
            if info is None:
                drop.append(path)
            else:
                self._ready[key] = (path, info)
                self._bytes += info.size
                while self._ready and (len(self._ready) > MAX_ENTRIES
                                       or self._bytes > MAX_BYTES):
                    _, (old, old_info) = self._ready.popitem(last=False)
                    self._bytes -= old_info.size
                    self.wasted += 1
                    drop.append(old)
        if event is not None:
            event.set()
        for p in drop:
            p.unlink(missing_ok=True)

    def take(self, key: str, dest: Path, etag: str | None = None) -> ObjectInfo | None:
        """Move the fetched ``key`` to ``dest`` and return its info, if it is here (or
        arrives within :data:`WAIT_S` from a fetch under way) and, with ``etag``, is that
        version; else ``None`` (the caller GETs it)."""
        with self._lock:
            event = self._running.get(key)
        if event is not None:
            event.wait(WAIT_S)
        with self._lock:
            got = self._ready.pop(key, None)
            if got is None:
                return None
            path, info = got
            self._bytes -= info.size
        if etag is not None and info.etag != etag:
            log.debug("fetched ahead %s is version %s, not %s: dropped", key, info.etag, etag)
            path.unlink(missing_ok=True)
            self._count(wasted=1)
            return None
        try:
            os.replace(path, dest)
        except OSError as exc:
            log.debug("fetched ahead %s not usable: %s", key, exc)
            path.unlink(missing_ok=True)
            self._count(wasted=1)
            return None
        self._count(used=1)
        return info

    def _count(self, used: int = 0, wasted: int = 0) -> None:
        with self._lock:
            self.used += used
            self.wasted += wasted

    def has(self, key: str) -> bool:
        with self._lock:
            return key in self._ready or key in self._running

    def clear(self) -> int:
        """Delete every entry waiting (fetches under way finish as usual); returns the
        bytes freed. The cache disk's back-pressure calls it before it waits for room:
        objects fetched for a reader who may never come are the first to go."""
        with self._lock:
            ready, self._ready = list(self._ready.values()), OrderedDict()
            freed, self._bytes = self._bytes, 0
            self.wasted += len(ready)
        for path, _ in ready:
            path.unlink(missing_ok=True)
        return freed
