"""The mount's local state: the index of the bucket and the write-back journal, in one
SQLite database (``<cache-dir>/state.db``, WAL, ``synchronous=FULL``).

One table, ``nodes``, is both: a row is a file, directory or symlink with its POSIX
attributes and what the bucket holds for it (``remote_*``), and its ``dirty`` bits say
what the bucket still lacks. Keeping one truth avoids an index and a queue that disagree
after a crash. ``tombstones`` holds objects to delete. Since the database outlives the
mount, ``ls -l`` of a known directory after a remount costs one LIST (to see what
changed, by ETag), not a HEAD per file; and a row whose content is staged but not
uploaded is found again by the next mount and uploaded: that is the crash replay.

All methods run on the trio thread and are short local queries; :meth:`commit_durable`
(the fsync) is the one to call from a worker thread.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import sys
import threading
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

log = logging.getLogger(__name__)

ROOT_INO = 1  # pyfuse3.ROOT_INODE

# dirty bits: what the bucket does not have yet
CONTENT = 1  # the staged content (or a new symlink / directory marker)
ATTRS = 2  # mode, owner or mtime changed on a published file
MOVED = 4  # the node's key changed (rename): publish under the new key, drop the old

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    ino         INTEGER PRIMARY KEY,
    parent      INTEGER NOT NULL,
    name        TEXT NOT NULL,
    mode        INTEGER NOT NULL,
    uid         INTEGER NOT NULL DEFAULT 0,
    gid         INTEGER NOT NULL DEFAULT 0,
    size        INTEGER NOT NULL DEFAULT 0,
    mtime_ns    INTEGER NOT NULL DEFAULT 0,
    ctime_ns    INTEGER NOT NULL DEFAULT 0,
    atime_ns    INTEGER NOT NULL DEFAULT 0,
    target      BLOB,
    sha256      TEXT,
    remote_key  TEXT,
    remote_etag TEXT,
    remote_kind TEXT,
    remote_size INTEGER,
    remote_ref  TEXT,
    dirty       INTEGER NOT NULL DEFAULT 0,
    staged      TEXT,
    listed_at   REAL,
    UNIQUE (parent, name)
);
CREATE INDEX IF NOT EXISTS nodes_dirty ON nodes (dirty) WHERE dirty != 0;
CREATE INDEX IF NOT EXISTS nodes_dirty_ino ON nodes (ino) WHERE dirty != 0;
CREATE INDEX IF NOT EXISTS nodes_remote ON nodes (remote_key);
CREATE INDEX IF NOT EXISTS nodes_parent_ino ON nodes (parent, ino);
-- a directory's st_nlink (2 + subdirectories) on every getattr of it: without this, a
-- count over all its entries, and `cp -r` of 100,000 files into one directory went
-- quadratic (the kernel asks the parent's attributes after each create)
CREATE INDEX IF NOT EXISTS nodes_subdirs ON nodes (parent) WHERE mode & 61440 = 16384;
CREATE TABLE IF NOT EXISTS tombstones (
    object_key  TEXT PRIMARY KEY,
    kind        TEXT,
    queued_at   REAL NOT NULL,
    etag        TEXT
);
CREATE INDEX IF NOT EXISTS tombstones_queued ON tombstones (queued_at);
-- writes in flight (invariant 6): an upload, move, symlink or marker of ``ino`` about to
-- write ``object_key``, known by ``guard`` (``sha256:<hex>``, an ETag, '' for none) until
-- its result is recorded. Kept here, not in memory: a crash before the record must not
-- forget them (a rename after it would leave the object with nothing naming it)
CREATE TABLE IF NOT EXISTS attempts (
    ino         INTEGER NOT NULL,
    object_key  TEXT NOT NULL,
    guard       TEXT NOT NULL,
    PRIMARY KEY (ino, object_key, guard)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT);
CREATE TABLE IF NOT EXISTS manifests (
    dir_ino     INTEGER PRIMARY KEY,
    etag        TEXT
);
CREATE TABLE IF NOT EXISTS collects (
    space       TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS refs (
    dir_ino     INTEGER PRIMARY KEY,
    key         TEXT NOT NULL,
    size        INTEGER NOT NULL
);
"""


@dataclass
class Node:
    """A row of ``nodes``."""

    ino: int
    parent: int
    name: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    atime_ns: int
    target: bytes | None
    sha256: str | None
    remote_key: str | None
    remote_etag: str | None
    remote_kind: str | None
    remote_size: int | None
    remote_ref: str | None
    dirty: int
    staged: str | None
    listed_at: float | None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)


_FIELDS = [f for f in Node.__dataclass_fields__]
_COLUMNS = ", ".join(_FIELDS)


#: names per query of :meth:`Journal.children_named` (under SQLite's smallest limit of
#: 999 parameters, before 3.32)
NAMES_PER_QUERY = 500

#: directory paths kept by :meth:`Journal.path` (emptied when full: ~1 MB of paths of
#: typical length, 8 MB if each were 1,000 bytes)
MAX_DIR_PATHS = 8192
#: the WAL is copied into the database (a checkpoint) once its frames in use pass this
CHECKPOINT_BYTES = 16 << 20
#: where the WAL-index (the ``-shm`` file) keeps ``mxFrame``, the WAL's last valid frame:
#: a native-order u32 at byte 16 of its header (SQLite's documented WAL-index format)
_MXFRAME_AT = 16


class Rows(list):  # type: ignore[type-arg]
    """A statement's rows, all read while the journal's lock was held (see
    :meth:`Journal.x`), with the two cursor methods callers use."""

    def fetchone(self) -> Any:
        return self[0] if self else None

    def fetchall(self) -> list[Any]:
        return self


class Journal:
    """The state database of one mount (one per cache directory)."""

    def __init__(self, path: Path, source: str) -> None:
        self.db_path = path
        self.db = sqlite3.connect(str(path), isolation_level="DEFERRED",
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # Durability comes from commit(): it fsyncs the WAL itself, *outside* the lock
        # every FUSE handler needs (SQLite's own FULL sync would hold the connection for
        # the fsync, 50-250 ms here, stalling the event loop). Checkpoints run on their
        # own connection in the committing thread, for the same reason.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA wal_autocheckpoint=0")
        self._lock = threading.Lock()
        #: nanoseconds :meth:`x` waited for ``_lock``, nanoseconds it spent in SQLite
        #: (with the GIL taken back after), statements: read by the slow-step log, which
        #: tells a step that waited for a commit from one that waited in SQLite
        self.timing = [0, 0, 0]
        #: a commit holding ``_lock`` this long (seconds) is logged: the loop-stall
        #: log's threshold, or the slow-step log's when the daemon turns that on
        self.slow_hold = 0.25
        #: transactions written out, and how many of them the last fsync covered: a
        #: commit written out but not made durable (its fsync failed, or its task was
        #: cancelled in between) is made durable by the next commit (see needs_sync)
        self._written = 0
        self._synced = 0
        # A WAL started over is written over in place, never cut back while the journal
        # is open (close() truncates it). Cutting it is a truncate in the loop's next
        # commit: 8-10 ms (3.5 ms of CPU) with the machine idle to cut 16 MiB to 4 MiB
        # (docs/performance.md, session 33), and 86-115 ms to cut a WAL that a long read
        # had kept from starting over (~100 MB) back to 32 MiB (scale run 10). So the
        # file keeps its largest size, which is CHECKPOINT_BYTES and what was written
        # during the longest read of the journal (reads copy what they need and end:
        # index._Known), until unmount.
        self.db.execute("PRAGMA journal_size_limit=-1")
        try:
            grown = os.path.getsize(f"{path}-wal") > 2 * CHECKPOINT_BYTES
        except OSError:
            grown = False
        if grown:
            # left large by a crash (or a close that could not truncate it): cut here,
            # before the mount serves anything, not in a commit on the loop
            self._truncate_wal()
        self._page = int(self.db.execute("PRAGMA page_size").fetchone()[0])
        self._wal_fd: int | None = None
        self._shm_fd: int | None = None
        self._warned_shm = False
        self._restart_wal = False
        self._ckpt: sqlite3.Connection | None = None
        self._ckpt_lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()
        self._closed = False
        #: directory inode -> its path (what :meth:`path` walks up to): a file's key costs
        #: one query, not one per level. Written under ``_lock`` by the walk that read
        #: the rows; emptied after any move or delete (inodes are never reused)
        self._dir_paths: dict[int, str] = {}
        #: object key -> when this mount removed it; prefix ("a/b/") -> when it removed
        #: something under it (in memory, newest last; see ``note_gone``)
        self.gone: OrderedDict[str, float] = OrderedDict()
        self.gone_under: OrderedDict[str, float] = OrderedDict()
        #: how often this process set a row's MOVED bit (set_dirty, update): see any_moved
        self.moves_marked = 0
        with self._lock:
            self.db.executescript(SCHEMA)
            cols = {r[1] for r in self.db.execute("PRAGMA table_info(tombstones)")}
            if "etag" not in cols:  # a journal of 0.1
                self.db.execute("ALTER TABLE tombstones ADD COLUMN etag TEXT")
            self.db.commit()
        seen = self.get_meta("source")
        if seen is not None and seen != source:
            from .errors import ConfigError

            raise ConfigError(
                f"cache directory {path.parent} belongs to the mount of {seen}, not {source}: "
                "use another --cache-dir"
            )
        if seen is None:
            self.set_meta("source", source)
        # attempts of rows that are gone (a raw delete of orphans at recovery)
        self.x("DELETE FROM attempts WHERE ino NOT IN (SELECT ino FROM nodes)")
        top = self.x("SELECT coalesce(max(ino), 1) FROM nodes").fetchone()[0]
        self._next_ino = max(int(self.get_meta("next_ino") or 0), int(top) + 1, ROOT_INO + 1)
        if self.get(ROOT_INO) is None:
            now = time.time_ns()
            self.x(
                "INSERT INTO nodes (ino, parent, name, mode, mtime_ns, ctime_ns, atime_ns) "
                "VALUES (?, ?, '', ?, ?, ?, ?)",
                (ROOT_INO, ROOT_INO, stat.S_IFDIR | 0o755, now, now, now))
        self.commit()

    # ---------------------------------------------------------------- plumbing

    def commit(self) -> None:
        """Make every change so far durable (an fsync of the WAL): blocking, so the
        filesystem runs :meth:`write_out` on its loop and :meth:`make_durable` in a
        worker thread instead; this is both, for start-up, shutdown and tools."""
        self.write_out()
        self.make_durable()

    def write_out(self) -> None:
        """Commit the open transaction into the WAL, without its fsync (the writes land
        in the page cache; one GIL release). The filesystem calls it on its loop: a
        worker thread committing held the connection's lock while it waited for the
        GIL and the disk, and every handler waited for that lock (80-108 ms steps in
        the scale benchmark's create, run 7). Durable only after :meth:`make_durable`."""
        t0 = time.perf_counter_ns()
        with self._lock:
            self.timing[0] += time.perf_counter_ns() - t0
            self._commit_locked()

    @property
    def needs_sync(self) -> bool:
        """Whether a transaction was written out that no fsync covered yet."""
        return self._written != self._synced

    def make_durable(self) -> None:
        """fsync the WAL: every transaction written out before this call is durable
        after it; then the WAL's upkeep. Blocking (a worker thread). Changes between two
        commits share one fsync, which is what keeps a copy of many small files fast."""
        if self._restart_wal:
            with self._lock:
                # The bulk of the WAL was copied outside the lock, while the handlers
                # kept a write transaction open (so SQLite could never start the WAL
                # over): committing what is open and copying the last frames, with no
                # transaction open, lets the next one restart it. One short hold of the
                # lock per CHECKPOINT_BYTES of WAL (found by review: the WAL grew without
                # bound during a long copy).
                self._commit_locked()
                self._restart_wal = False
                try:
                    self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.OperationalError as exc:
                    # The checkpoint only helps: the next commit tries again; a flush
                    # never fails over it. (SQLITE_LOCKED came from statements stepped
                    # outside the lock, now gone: see x(). Seen as "database table is
                    # locked" in CI and as "not an error" in scale run 11, each a
                    # flush failed with EIO.)
                    self._restart_wal = True
                    quiet = "locked" in str(exc) or "busy" in str(exc)
                    log.log(logging.DEBUG if quiet else logging.WARNING,
                            "WAL checkpoint deferred: %s", exc)
        covered = self._written
        self._sync_wal()
        self._synced = covered
        self._checkpoint_if_big()

    def _commit_locked(self) -> None:
        t0 = time.perf_counter()
        frames0 = self._mx_frame()
        try:
            had = self.db.in_transaction
            self.db.commit()
            if had:
                self._written += 1
        except sqlite3.Error:
            self.forget_paths()  # rolled back, perhaps with a move in it
            raise
        finally:
            held = time.perf_counter() - t0
            if held >= self.slow_hold:
                # what it wrote tells a large transaction from a WAL started over (the
                # count drops) or cut back (the file shrank)
                frames1 = self._mx_frame()
                try:
                    size = os.path.getsize(f"{self.db_path}-wal") / (1 << 20)
                except OSError:
                    size = -1.0
                log.warning("journal commit took %.0f ms (the disk was slow to take the "
                            "WAL's writes, or the GIL was slow to come back; WAL frames "
                            "%s -> %s, WAL file %.1f MiB)", held * 1000, frames0, frames1,
                            size)

    def _mx_frame(self) -> int | None:
        """The WAL's frames in use, from the WAL-index, without ``_ckpt_lock`` (the loop
        calls it at each commit; a worker may hold that lock through an fsync). None
        before the descriptor is open (the first checkpoint check opens it)."""
        fd = self._shm_fd
        if fd is None:
            return None
        try:
            raw = os.pread(fd, 4, _MXFRAME_AT)
        except OSError:
            return None
        return int.from_bytes(raw, sys.byteorder) if len(raw) == 4 else None

    def _sync_wal(self) -> None:
        """fsync the WAL: every transaction committed before this call is durable after
        it (the same fsync synchronous=FULL does at each commit, without the lock)."""
        with self._ckpt_lock:
            if self._closed:
                return
            if self._wal_fd is None:
                try:
                    self._wal_fd = os.open(f"{self.db_path}-wal", os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    return  # nothing written yet
                dir_fd = os.open(self.db_path.parent, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(dir_fd)  # the WAL's directory entry, once
                finally:
                    os.close(dir_fd)
            # under the checkpoint lock (never the one the handlers take): close() cannot
            # close the descriptor under it
            os.fsync(self._wal_fd)

    def _wal_bytes(self) -> int | None:
        """The bytes of WAL in use since it last started over (``mxFrame`` frames), read
        from the WAL-index; None when it cannot be read. Not the file's size: that stays
        at its largest while a restarted WAL is written over from the start."""
        with self._ckpt_lock:
            if self._closed:
                return None
            if self._shm_fd is None:
                try:
                    self._shm_fd = os.open(f"{self.db_path}-shm", os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    return None
            frames = self._mx_frame()
        return None if frames is None else frames * (self._page + 24)

    def _checkpoint_if_big(self) -> None:
        """Copy the WAL into the database once its frames in use pass
        ``CHECKPOINT_BYTES``, on a connection of its own (PASSIVE: never waits for, nor
        blocks, the writer)."""
        used = self._wal_bytes()
        try:
            if used is None:
                # the file's size: an overestimate (a restarted WAL keeps its size), so a
                # checkpoint at every commit from here on; only if the -shm is unreadable
                if not self._warned_shm:
                    self._warned_shm = True
                    log.warning("cannot read the journal's WAL-index (%s-shm): checkpoints "
                                "follow the WAL file's size", self.db_path)
                used = os.path.getsize(f"{self.db_path}-wal")
        except OSError:
            return
        if used < CHECKPOINT_BYTES:
            return
        with self._ckpt_lock:
            if self._closed:
                return
            if self._ckpt is None:
                self._ckpt = sqlite3.connect(str(self.db_path), check_same_thread=False)
                self._ckpt.execute("PRAGMA synchronous=NORMAL")
            self._ckpt.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            self._restart_wal = True

    def _truncate_wal(self) -> None:
        """Copy the whole WAL into the database and truncate it to nothing (the WAL file
        is never cut while open, so it is cut here: at start-up and at close)."""
        busy, _, _ = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            # a reader still open (a listing's copy being taken as the mount stops):
            # the WAL keeps its size until the next start-up cuts it
            log.info("the journal's WAL could not be truncated (a read of it was still "
                     "open): it keeps its size until the next start")

    def close(self) -> None:
        with self._ckpt_lock:
            self._closed = True  # no commit reopens what is closed below
            if self._ckpt is not None:
                self._ckpt.close()
                self._ckpt = None
            if self._wal_fd is not None:
                os.close(self._wal_fd)
                self._wal_fd = None
        with self._reader_lock:  # first: a reader would keep the WAL from being truncated
            if self._reader is not None:
                self._reader.close()
                self._reader = None
        with self._lock:
            self.db.commit()
            self._truncate_wal()
            self.db.close()
        # Last: closing any descriptor of the -shm drops every POSIX lock this process
        # holds on it, SQLite's included (the lock that tells other processes the
        # WAL-index is in use); only once SQLite's connections are closed (review).
        # (_closed, set above under _ckpt_lock, keeps _wal_bytes off it meanwhile.)
        with self._ckpt_lock:
            if self._shm_fd is not None:
                os.close(self._shm_fd)
                self._shm_fd = None

    def read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """A query over the *committed* state on a second connection (WAL readers never
        wait for the writer): for scans a worker thread runs (totals, listing diffs,
        manifests) without holding the lock every handler on the trio thread needs."""
        with self._reader_lock:
            if self._closed:
                raise sqlite3.ProgrammingError("the journal is closed")
            if self._reader is None:
                # quoted: a cache dir may contain "#" or "?"
                uri = f"file:{urllib.parse.quote(str(self.db_path))}?mode=ro"
                self._reader = sqlite3.connect(uri, uri=True, check_same_thread=False)
            return self._reader.execute(sql, args).fetchall()

    @contextlib.contextmanager
    def read_cursor(self) -> Iterator[sqlite3.Connection]:
        """A connection of its own over the committed state, for a scan streamed row by
        row (a cursor, not ``fetchall``) that must hold neither lock: one consistent
        snapshot while it runs, memory of a row at a time. Worker threads only."""
        if self._closed:
            raise sqlite3.ProgrammingError("the journal is closed")
        uri = f"file:{urllib.parse.quote(str(self.db_path))}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        try:
            conn.execute("BEGIN")  # one snapshot for the whole scan
            yield conn
        finally:
            conn.close()

    def totals(self) -> tuple[int, int]:
        """(logical bytes of all files, bytes stored for them and their references), from
        the committed state: a full scan, so blocking (worker thread)."""
        logical, objects = self.read(
            "SELECT coalesce(sum(CASE WHEN mode & ? = ? THEN size ELSE 0 END), 0), "
            "coalesce(sum(remote_size), 0) FROM nodes", (0o170000, stat.S_IFREG))[0]
        refs = self.read("SELECT coalesce(sum(size), 0) FROM refs")[0][0]
        return int(logical), int(objects) + int(refs)

    def oldest_staged(self, limit: int = 200) -> float:
        """When the oldest staged file among the first ``limit`` changes not yet
        uploaded was last written (its file's mtime; 0.0 for none), from the committed
        state: a row and a ``stat`` each, so blocking (worker thread). On the trio
        thread every row fetched and every ``stat`` gives the GIL up, and each may wait
        for it while workers compute: a status read there held the loop ~100 ms (the
        create of the scale benchmark, run 7)."""
        oldest = 0.0
        for (staged,) in self.read("SELECT staged FROM nodes INDEXED BY nodes_dirty_ino "
                                   "WHERE dirty != 0 AND staged IS NOT NULL ORDER BY ino "
                                   "LIMIT ?", (limit,)):
            try:
                mtime = os.stat(staged).st_mtime
            except OSError:
                continue
            oldest = mtime if not oldest else min(oldest, mtime)
        return oldest

    def _held(self, t0: int, t1: int) -> None:
        """Count one hold of ``_lock`` in :attr:`timing`: asked at ``t0``, taken at
        ``t1``, released now (perf_counter_ns)."""
        timing = self.timing
        timing[0] += t1 - t0
        timing[1] += time.perf_counter_ns() - t1
        timing[2] += 1

    @contextlib.contextmanager
    def _timed_lock(self) -> Iterator[None]:
        """``_lock``, counted in :attr:`timing` as one statement: for the methods that
        run several statements under one hold."""
        t0 = time.perf_counter_ns()
        with self._lock:
            t1 = time.perf_counter_ns()
            try:
                yield
            finally:
                self._held(t0, t1)

    def x(self, sql: str, args: tuple[Any, ...] = ()) -> Rows:
        """Run one statement and read all its rows, under the lock. (A cursor handed
        back would be stepped by its caller after the lock is released, on the
        connection a worker may be using under the lock at that moment: SQLite then
        refuses the worker's checkpoint with SQLITE_LOCKED, and the concurrent call
        overwrites the connection's error code, so Python raises "not an error". A
        flush failed with EIO so in the 100,000-file create of scale run 11.)"""
        # (the lock taken here, not through _timed_lock: a generator-based context
        # manager doubled the cost of every statement on the loop, 3.2 -> 6.9 µs)
        t0 = time.perf_counter_ns()
        with self._lock:
            t1 = time.perf_counter_ns()
            try:
                return Rows(self.db.execute(sql, args).fetchall())
            except sqlite3.Error:
                self.forget_paths()
                raise
            finally:
                self._held(t0, t1)

    def get_meta(self, key: str) -> str | None:
        row = self.x("SELECT v FROM meta WHERE k=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.x("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (key, value))

    # ------------------------------------------------------------------- nodes

    def _node(self, row: tuple[Any, ...] | None) -> Node | None:
        return Node(*row) if row else None

    def get(self, ino: int) -> Node | None:
        return self._node(self.x(f"SELECT {_COLUMNS} FROM nodes WHERE ino=?", (ino,)).fetchone())

    def child(self, parent: int, name: str) -> Node | None:
        return self._node(self.x(f"SELECT {_COLUMNS} FROM nodes WHERE parent=? AND name=? "
                                 "AND ino != parent", (parent, name)).fetchone())

    def children_named(self, parent: int, names: list[str]) -> dict[str, Node]:
        """The rows of ``names`` under ``parent`` that exist: one query per
        ``NAMES_PER_QUERY`` names, not one each. A listing merge on the trio thread
        decides hundreds of names at a time, and every query gives up the GIL and may
        wait a switch interval (5 ms) to get it back while worker threads hash."""
        found: dict[str, Node] = {}
        for i in range(0, len(names), NAMES_PER_QUERY):
            part = names[i:i + NAMES_PER_QUERY]
            marks = ",".join("?" * len(part))
            for row in self.x(f"SELECT {_COLUMNS} FROM nodes WHERE parent=? AND name IN "
                              f"({marks}) AND ino != parent", (parent, *part)).fetchall():
                node = Node(*row)
                found[node.name] = node
        return found

    def among(self, parent: int, inos: list[int]) -> list[int]:
        """Which of ``inos`` are rows under ``parent``: one query per ``NAMES_PER_QUERY``
        inodes, served by ``(parent, ino)`` (the kernel forgets thousands at once)."""
        out: list[int] = []
        for i in range(0, len(inos), NAMES_PER_QUERY):
            part = inos[i:i + NAMES_PER_QUERY]
            out += [r[0] for r in self.x(
                f"SELECT ino FROM nodes WHERE parent=? AND ino IN ({','.join('?' * len(part))})",
                (parent, *part)).fetchall()]
        return out

    def children(self, parent: int, after_ino: int = 0, limit: int = -1) -> list[Node]:
        """The entries of a directory in inode order, from ``after_ino`` on: a resumable
        position (new entries always get higher numbers, so a listing in progress never
        skips an unchanged entry or returns one twice), served by ``(parent, ino)``."""
        rows = self.x(f"SELECT {_COLUMNS} FROM nodes WHERE parent=? AND ino > ? AND ino != ? "
                      "ORDER BY ino LIMIT ?", (parent, after_ino, parent, limit)).fetchall()
        return [Node(*r) for r in rows]

    #: literal constants, not parameters: SQLite uses the partial index nodes_subdirs
    #: only when the query's WHERE visibly implies the index's
    SUBDIRS_SQL = ("SELECT count(*) FROM nodes INDEXED BY nodes_subdirs "
                   f"WHERE parent=? AND ino != ? AND mode & {stat.S_IFMT(0o170000)} = "
                   f"{stat.S_IFDIR}")

    def count_subdirs(self, parent: int) -> int:
        """O(subdirectories), whatever the number of files (``nodes_subdirs``)."""
        return self.x(self.SUBDIRS_SQL, (parent, parent)).fetchone()[0]

    def count_children(self, parent: int) -> int:
        """0 or 1: whether the directory has an entry (rmdir, rename over it); one index
        probe, not a count of 100,000 entries."""
        return self.x("SELECT count(*) FROM (SELECT 1 FROM nodes WHERE parent=? AND ino != ? "
                      "LIMIT 1)",
                      (parent, parent)).fetchone()[0]

    def insert(self, **fields: Any) -> int:
        """A new row with an inode number never used before in this journal: the kernel
        and other processes may still hold an old number (a reused one would hand them
        another file's attributes and pages)."""
        ino = self._next_ino
        self._next_ino += 1
        self.set_meta("next_ino", str(self._next_ino))
        fields = {"ino": ino, **fields}
        names = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        self.x(f"INSERT INTO nodes ({names}) VALUES ({marks})", tuple(fields.values()))
        return ino

    def insert_many(self, rows: list[dict[str, Any]]) -> None:
        """:meth:`insert` of many rows (each with the same fields) in one statement and
        one write of the next inode number: a listing merge inserts up to a thousand
        rows per step on the trio thread (issue 11: four statements per row were most of
        a cold listing's own time)."""
        if not rows:
            return
        names = ["ino", *rows[0]]
        first = self._next_ino
        self._next_ino += len(rows)
        self.set_meta("next_ino", str(self._next_ino))
        marks = ", ".join("?" for _ in names)
        with self._timed_lock():
            try:
                self.db.executemany(
                    f"INSERT INTO nodes ({', '.join(names)}) VALUES ({marks})",
                    ((first + i, *r.values()) for i, r in enumerate(rows)))
            except sqlite3.Error:
                self.forget_paths()
                raise

    def update(self, ino: int, **fields: Any) -> None:
        if not fields:
            return
        if fields.get("dirty", 0) & MOVED:
            self.moves_marked += 1  # see any_moved
        sets = ", ".join(f"{k}=?" for k in fields)
        self.x(f"UPDATE nodes SET {sets} WHERE ino=?", (*fields.values(), ino))
        if ("parent" in fields or "name" in fields) and ino in self._dir_paths:
            # the cached set holds every ancestor of each of its entries (a walk caches
            # all the directories it passed; entries go all at once): a node not in it
            # is no cached path's ancestor, and moving it (a file) changes none
            self.forget_paths()

    def set_dirty(self, ino: int, bits: int) -> None:
        if bits & MOVED:
            self.moves_marked += 1  # before the row says so: see any_moved
        self.x("UPDATE nodes SET dirty = dirty | ? WHERE ino=?", (bits, ino))

    def any_moved(self) -> bool:
        """Whether a row has a rename still to carry out in the bucket. One indexed probe
        (MOVED is the highest dirty bit, so those rows sit at the top of ``nodes_dirty``).
        With :attr:`moves_marked` read before it, a caller knows that no row has one as
        long as the probe said no and the counter has not moved since."""
        return self.x("SELECT 1 FROM nodes INDEXED BY nodes_dirty WHERE dirty != 0 AND "
                      "dirty >= ? AND dirty & ? LIMIT 1", (MOVED, MOVED)).fetchone() is not None

    def delete(self, ino: int) -> None:
        self.x("DELETE FROM nodes WHERE ino=?", (ino,))
        self.drop_attempts(ino)
        self._dir_paths.pop(ino, None)

    def forget_paths(self) -> None:
        """Drop the cached directory paths: after a directory's parent or name changed
        (always after the change, so a walk racing it stores the new path, or an old one
        that this clears), and when a statement or a commit failed (SQLite may have
        rolled the transaction back, a move with it)."""
        self._dir_paths.clear()

    def path(self, ino: int) -> str:
        """The node's key relative to the mount's prefix (no leading slash). Directories'
        paths are cached, so a file's key costs one query, not one per level (the scale
        benchmark's create did ~8 of these walks per file on the event loop)."""
        if ino == ROOT_INO:
            return ""
        known = self._dir_paths.get(ino)
        if known is not None:
            return known
        parts: list[str] = []
        walked: list[tuple[int, int]] = []  # (directory inode, its index in parts)
        with self._timed_lock():
            if len(self._dir_paths) >= MAX_DIR_PATHS:
                # before the walk, which then goes up to the root: what it caches keeps
                # every ancestor of every entry cached
                self._dir_paths.clear()
            cur = ino
            base = ""
            while cur != ROOT_INO:
                known = self._dir_paths.get(cur)
                if known is not None:
                    base = known
                    break
                row = self.db.execute("SELECT parent, name, mode FROM nodes WHERE ino=?",
                                      (cur,)).fetchone()
                if row is None:
                    raise KeyError(cur)
                if stat.S_ISDIR(row[2]):
                    walked.append((cur, len(parts)))
                parts.append(row[1])
                cur = row[0]
            for d, at in walked:
                rel = "/".join(reversed(parts[at:]))
                self._dir_paths[d] = f"{base}/{rel}" if base else rel
        rel = "/".join(reversed(parts))
        return f"{base}/{rel}" if base else rel

    def descendants(self, ino: int) -> Iterator[Node]:
        rows = self.x(
            f"WITH RECURSIVE sub(i) AS (SELECT ino FROM nodes WHERE parent=? AND ino != parent "
            f"UNION ALL SELECT n.ino FROM nodes n JOIN sub ON n.parent = sub.i) "
            f"SELECT {_COLUMNS} FROM nodes WHERE ino IN (SELECT i FROM sub)", (ino,)).fetchall()
        for r in rows:
            yield Node(*r)

    def dirty_nodes(self, limit: int = 1000, after_ino: int = 0) -> list[Node]:
        # nodes_dirty_ino: without it SQLite walks the whole table by rowid when few
        # rows are dirty (measured: 18-38 ms at 200,000 rows; 0.05 ms with it)
        rows = self.x(f"SELECT {_COLUMNS} FROM nodes INDEXED BY nodes_dirty_ino "
                      "WHERE dirty != 0 AND ino > ? ORDER BY ino LIMIT ?",
                      (after_ino, limit)).fetchall()
        return [Node(*r) for r in rows]

    def older_content(self, parent: int, ino: int, min_size: int,
                      limit: int = 16) -> list[Node]:
        """Files of ``parent`` created before ``ino`` (lower inodes) with new content of
        at least ``min_size`` bytes not yet uploaded, oldest first: which file seeds a
        directory's reference, for a row the scheduler meets out of inode order. The
        search runs in SQLite over the dirty rows only."""
        rows = self.x(f"SELECT {_COLUMNS} FROM nodes INDEXED BY nodes_dirty_ino "
                      "WHERE dirty != 0 AND ino < ? AND parent = ? AND dirty & 1 "
                      "AND size >= ? AND (mode & 61440) = 32768 ORDER BY ino LIMIT ?",
                      (ino, parent, min_size, limit)).fetchall()
        return [Node(*r) for r in rows]

    def pending(self) -> tuple[int, int]:
        """(files, bytes) not yet in the bucket."""
        row = self.x("SELECT count(*), coalesce(sum(CASE WHEN dirty & 1 THEN size ELSE 0 END), 0) "
                     "FROM nodes WHERE dirty != 0").fetchone()
        tomb = self.x("SELECT count(*) FROM tombstones").fetchone()[0]
        return int(row[0]) + int(tomb), int(row[1])

    def set_reference(self, dir_ino: int, key: str | None, size: int = 0) -> None:
        """Record (or, with ``key=None``, forget) the reference of a directory."""
        if key is None:
            self.x("DELETE FROM refs WHERE dir_ino=?", (dir_ino,))
        else:
            self.x("INSERT OR REPLACE INTO refs (dir_ino, key, size) VALUES (?, ?, ?)",
                   (dir_ino, key, size))

    def set_manifest(self, dir_ino: int, etag: str | None) -> None:
        """Record (``etag``) or forget (None) the listing manifest of a directory: its
        object must go with the directory (rmdir, rename), or the prefix stays alive."""
        if etag is None:
            self.x("DELETE FROM manifests WHERE dir_ino=?", (dir_ino,))
        else:
            self.x("INSERT OR REPLACE INTO manifests (dir_ino, etag) VALUES (?, ?)",
                   (dir_ino, etag))

    def manifest_etag(self, dir_ino: int) -> str | None | bool:
        """The ETag of the directory's manifest as last seen; False when it has none."""
        row = self.x("SELECT etag FROM manifests WHERE dir_ino=?", (dir_ino,)).fetchone()
        return row[0] if row else False

    # ----------------------------------------------------------- reference checks

    def want_collect(self, space: str) -> None:
        """Record that ``space`` lost a delta, so its reference may be unused now. Written
        before the change that removes the evidence (the tombstone, the MOVED bit) is
        committed, in the same or an earlier transaction: a crash between the delete and
        the check can no longer leave an unused reference (and a ghost directory)."""
        self.x("INSERT OR IGNORE INTO collects (space) VALUES (?)", (space,))

    def collect_done(self, space: str) -> None:
        self.x("DELETE FROM collects WHERE space=?", (space,))

    def collects(self) -> list[str]:
        return [r[0] for r in self.x("SELECT space FROM collects").fetchall()]

    # ----------------------------------------------------------- writes in flight

    def add_attempts(self, ino: int, items: Iterable[tuple[str, str | None]]) -> bool:
        """``ino`` is about to write each ``(object key, guard)`` (``None``: no guard, a
        marker). Returns whether the journal now holds changes not yet committed (these
        rows among them, or left by an earlier try whose commit failed): the caller
        commits them (:meth:`commit`, with its fsync) before the write starts."""
        with self._timed_lock():
            # (Python opens one before any INSERT); or written out, not yet fsynced
            pending = self.db.in_transaction or self.needs_sync
            before = self.db.total_changes
            try:
                self.db.executemany(
                    "INSERT OR IGNORE INTO attempts (ino, object_key, guard) VALUES (?, ?, ?)",
                    [(ino, k, g or "") for k, g in items])
            except sqlite3.Error:
                self.forget_paths()
                raise
            return pending or self.db.total_changes != before

    def attempts_of(self, ino: int) -> list[tuple[str, str | None]]:
        """(object key, guard) a write of ``ino`` may have left unrecorded, sorted."""
        return [(k, g or None) for k, g in self.x(
            "SELECT object_key, guard FROM attempts WHERE ino=? ORDER BY object_key, guard",
            (ino,)).fetchall()]

    def has_attempts(self, ino: int) -> bool:
        return self.x("SELECT 1 FROM attempts WHERE ino=? LIMIT 1",
                      (ino,)).fetchone() is not None

    def drop_attempts(self, ino: int, keys: Iterable[str] | None = None) -> None:
        """Its writes are recorded (or left to tombstones, or it is gone); with ``keys``
        only those."""
        if keys is None:
            self.x("DELETE FROM attempts WHERE ino=?", (ino,))
            return
        with self._timed_lock():
            self.db.executemany("DELETE FROM attempts WHERE ino=? AND object_key=?",
                                [(ino, k) for k in keys])

    # -------------------------------------------------------------- tombstones

    def add_tombstone(self, object_key: str, kind: str | None, etag: str | None = None) -> None:
        """Queue the delete of ``object_key``, guarded by what this mount knows was there:
        an ETag it last saw, or ``sha256:<hex>``, the content of a write of its own that
        may have landed unrecorded (``None``: unguarded). A delete never removes what
        another writer put there. A second tombstone for a key adds its guard to the
        first (the object goes if it is either): one key can hold an object this mount
        saw and, after a write in flight, one it wrote (replacing the guard lost the
        first when the write never landed, the second when it did)."""
        self.x("INSERT INTO tombstones (object_key, kind, queued_at, etag) VALUES (?, ?, ?, ?) "
               "ON CONFLICT (object_key) DO UPDATE SET kind = coalesce(excluded.kind, kind), "
               "queued_at = excluded.queued_at, etag = CASE "
               "WHEN etag IS NULL OR excluded.etag IS NULL THEN NULL "
               "WHEN instr(' ' || etag || ' ', ' ' || excluded.etag || ' ') THEN etag "
               "ELSE etag || ' ' || excluded.etag END",
               (object_key, kind, time.time(), etag))

    def drop_tombstone(self, object_key: str, etag: str | None | bool = True) -> None:
        """Forget the tombstone of ``object_key``; with ``etag`` only if it still is the
        one processed (a newer one, queued meanwhile for a newer object, stays)."""
        if etag is True:
            self.x("DELETE FROM tombstones WHERE object_key=?", (object_key,))
        else:
            self.x("DELETE FROM tombstones WHERE object_key=? AND etag IS ?", (object_key, etag))

    def tombstone(self, object_key: str) -> tuple[str | None, str | None] | None:
        """(kind, etag) of the tombstone of ``object_key``, or None."""
        row = self.x("SELECT kind, etag FROM tombstones WHERE object_key=?",
                     (object_key,)).fetchone()
        return (row[0], row[1]) if row else None

    def tombstones(self, limit: int = -1, after: float = -1.0
                   ) -> list[tuple[str, str | None, str | None, float]]:
        """Queued deletes queued after ``after``, oldest first (with their time, to go on
        from)."""
        return [(r[0], r[1], r[2], r[3]) for r in self.x(
            "SELECT object_key, kind, etag, queued_at FROM tombstones WHERE queued_at > ? "
            "ORDER BY queued_at LIMIT ?", (after, limit)).fetchall()]

    def _found(self, sql: str, keys: list[str]) -> set[str]:
        """The first column of ``sql`` (with ``{}`` for an ``IN`` list) over ``keys``,
        one query per ``NAMES_PER_QUERY`` keys."""
        out: set[str] = set()
        for i in range(0, len(keys), NAMES_PER_QUERY):
            part = keys[i:i + NAMES_PER_QUERY]
            out.update(r[0] for r in self.x(sql.format(",".join("?" * len(part))),
                                            tuple(part)).fetchall())
        return out

    def tombstoned(self, object_keys: list[str]) -> set[str]:
        """Which of ``object_keys`` have a tombstone."""
        return self._found("SELECT object_key FROM tombstones WHERE object_key IN ({})",
                           object_keys)

    def claimed_keys(self, object_keys: list[str]) -> set[str]:
        """Which of ``object_keys`` a live row is published as (:meth:`remote_claimed`
        of many keys)."""
        return self._found("SELECT remote_key FROM nodes WHERE remote_key IN ({}) AND "
                           "parent != 0", object_keys)

    def remote_claimed(self, object_key: str, but: int = -1) -> bool:
        """Whether a live node (not unlinked, not ``but``) is published as ``object_key``
        (then a tombstone for it is stale, and an upload to it must wait)."""
        return self.x("SELECT 1 FROM nodes WHERE remote_key=? AND parent != 0 AND ino != ? "
                      "LIMIT 1", (object_key, but)).fetchone() is not None

    def claimers_of(self, object_key: str) -> list[Node]:
        """Live rows published as exactly ``object_key``."""
        rows = self.x(f"SELECT {_COLUMNS} FROM nodes WHERE remote_key=? AND parent != 0",
                      (object_key,)).fetchall()
        return [Node(*r) for r in rows]

    def claimers(self, key: str, but: int = -1) -> list[Node]:
        """Live rows published as ``key`` or ``key.delta`` (other than ``but``)."""
        rows = self.x(f"SELECT {_COLUMNS} FROM nodes WHERE remote_key IN (?, ?) AND "
                      "parent != 0 AND ino != ?", (key, key + ".delta", but)).fetchall()
        return [Node(*r) for r in rows]

    def note_gone(self, object_key: str) -> None:
        """This mount just removed ``object_key`` from the bucket: a listing that started
        before must not bring it back, nor make a directory of a prefix it was under (in
        memory; kept ten minutes, at most ``GONE_KEPT`` keys, O(1) per call)."""
        now = time.time()
        _remember(self.gone, object_key, now)
        cut = object_key.rfind("/")
        while cut > 0:
            _remember(self.gone_under, object_key[:cut + 1], now)
            cut = object_key.rfind("/", 0, cut)

    def gone_since(self, object_key: str, since: float) -> bool:
        return self.gone.get(object_key, 0.0) >= since

    def gone_under_since(self, prefix: str, since: float) -> bool:
        """Whether this mount removed an object under ``prefix`` (ending in "/") from the
        bucket at or after ``since``."""
        return self.gone_under.get(prefix, 0.0) >= since

    def tombstone_keys(self) -> set[str]:
        return {r[0] for r in self.x("SELECT object_key FROM tombstones").fetchall()}


#: keys ``note_gone`` remembers at most (a listing older than the oldest of them could
#: still bring one back; listings take seconds, and this is minutes of deletes)
GONE_KEPT = 50_000


def _remember(times: "OrderedDict[str, float]", key: str, now: float) -> None:
    times[key] = now
    times.move_to_end(key)
    while times and (len(times) > GONE_KEPT or next(iter(times.values())) < now - 600):
        times.popitem(last=False)
