"""Keeps the journal's view of a directory in step with the bucket.

A directory is listed (one paginated LIST with a delimiter) the first time it is needed
and again once its listing is older than the TTL. Objects whose ETag is unchanged keep
their row as it is; new or changed delta and direct objects are HEADed, concurrently, for
their ``dg-*``/``deltafs-*`` metadata. Rows with local changes not yet in the bucket are
never overwritten by what the bucket says.

Names no POSIX path can carry (``.``, ``..``, empty, over 255 bytes, containing NUL) are
skipped and logged once; a name that is both a file and a prefix shows as the directory.
"""
from __future__ import annotations

import itertools
import logging
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from .engine import Engine
from .format import (DELTA_SUFFIX, MAX_NAME_BYTES, Kind, StoredFile, classify, join_key,
                     split_key)
from .journal import Journal, Node
from .chain import HIDDEN
from .manifest import MANIFEST_NAME
from .store.base import Listing, ObjectInfo

log = logging.getLogger(__name__)

DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755


@dataclass(frozen=True)
class DirListing:
    """What the bucket holds directly under one directory, with metadata where needed."""

    files: dict[str, StoredFile]  # name -> stored file
    dirs: set[str]  # names of sub-prefixes (and markers)
    marker: StoredFile | None  # the directory's own "dir/" object, with metadata
    reference: ObjectInfo | None = None  # its reference.bin, if any
    dir_markers: dict[str, StoredFile] = field(default_factory=dict)  # sub-dir name -> marker


_warned: set[str] = set()


def _warn_once(key: str, why: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning("skipping object %r: %s", key, why)


def valid_name(name: str) -> bool:
    return (name not in ("", ".", "..") and "\0" not in name
            and len(name.encode("utf-8", "surrogateescape")) <= MAX_NAME_BYTES)


Snapshot = dict[int, tuple[str, str | None, str | None]]

#: plain objects HEADed to tell a deltafs/DeltaGlider directory from another tool's
SAMPLE = 4


def listing_snapshot(journal: Journal, dir_ino: int) -> Snapshot:
    """The rows under ``dir_ino`` as they are when a LIST goes out (ino -> name, remote
    key, ETag): a listing may only change rows that are still exactly like this."""
    return {n.ino: (n.name, n.remote_key, n.remote_etag) for n in journal.children(dir_ino)}


@dataclass
class ListingEnd:
    """What a streamed listing learned besides its pages (see :func:`stream_listing`)."""

    marker: StoredFile | None = None
    reference: ObjectInfo | None = None
    manifest: ObjectInfo | None = None
    #: rows (as committed when the listing began) whose object is not in the bucket
    removals: list[str] = field(default_factory=list)
    removal_snapshot: Snapshot = field(default_factory=dict)
    heads: int = 0
    pages: int = 0  # LIST requests
    manifest_hits: int = 0
    saw_delta: bool = False
    #: the directory has a ``.deltafs/`` sub-prefix (chain blobs)
    blobs: bool = False


#: resolves listed objects from the directory's manifest: (object keys needing
#: metadata, the manifest object as listed) -> {object key: StoredFile}
Resolver = Callable[[list[ObjectInfo], ObjectInfo], dict[str, StoredFile]]


def stream_listing(engine: Engine, journal: Journal, dir_ino: int, prefix: str,
                   emit: Callable[[DirListing, Snapshot], None],
                   resolve: Resolver | None = None, only: str | None = None) -> ListingEnd:
    """LIST ``prefix`` a page at a time and hand each page, with the metadata its new or
    changed objects need, to ``emit`` (which applies it): memory stays bounded by a page
    and the trio thread only ever merges a page. Blocking: runs in a worker thread.

    What the journal knew comes from its *committed* state on the read connection (the
    trio thread's lock is never held for the scan); it only decides which objects need a
    HEAD and which rows may have gone. Every change is decided again, row by row, when
    it is applied (:func:`merge_listing`), so a stale view costs a HEAD, never a wrong
    row. Objects a manifest describes (same ETag and size) need no HEAD, nor do objects
    this mount uploaded after the snapshot (:meth:`_Known.known_since`).

    ``only``: the listing of one name (a lookup after the TTL): LIST ``prefix + only``,
    which holds ``only``, ``only.delta`` and ``only/`` near its start (keys sort as
    "a" < "a-1" < "a.delta" < "a/" < "a0"), and stop at the first page past them. Only
    that name's row is decided; the directory's own facts are not touched."""
    with journal.read_cursor() as conn:
        return _stream(conn, engine, dir_ino, prefix, emit, resolve, only, journal.read)


def fetched_ahead(pages: Iterator[Listing]) -> Iterator[Listing]:
    """``pages``, with the next page's LIST in flight while this one is processed and
    merged: the listing costs the larger of the two per page instead of their sum
    (100,000 files on moto: ~0.22 s per LIST page against ~0.1 s of deltafs's own work).
    One page ahead only (memory: two pages), and only for a whole-directory listing,
    which fetches every page anyway, so no request is added (but one LIST when the
    listing fails half-way). The helper thread only advances the store's page
    iterator, never two calls at once."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="deltafs-list-ahead")
    try:
        nxt = pool.submit(next, pages, None)
        while (page := nxt.result()) is not None:
            nxt = pool.submit(next, pages, None)
            yield page
    finally:
        # a listing that failed or stopped early does not wait for the LIST in flight
        # (during an S3 outage that is a whole retry cycle): the helper finishes it
        # alone and ends
        pool.shutdown(wait=False, cancel_futures=True)


#: names or keys per ``IN (...)`` of a page's queries (SQLite's old variable limit: 999)
_IN_BATCH = 500


class _Known:
    """What the journal knew of one directory when its listing began, copied from the
    committed state into a table of the listing's own connection: memory of a page, not
    of the directory (a 100,000-entry directory's rows, held whole, took ~75 MB: issue
    11), and no read transaction held while the LIST pages come in. (Held for the whole
    listing, 30 s at 100,000 entries, that snapshot kept the journal's WAL from starting
    over: it grew by the create's writes meanwhile, ~100 MB, and the next restart cut it
    back in one truncate on the loop, 86-115 ms: scale benchmark run 10.)

    The copy predates every LIST request of the listing, as the snapshot did: a row's
    state in it is never newer than what a page says, which is what lets a page's
    decisions be taken against it (see :func:`merge_listing`'s ``snapshot``)."""

    def __init__(self, conn: Any, dir_ino: int,
                 latest: Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]] | None = None,
                 prefix: str = "", only: str | None = None) -> None:
        self.conn, self.dir_ino, self.latest = conn, dir_ino, latest
        here = conn.execute("SELECT remote_key, remote_etag FROM nodes WHERE ino=?",
                            (dir_ino,)).fetchall()
        self.here_key, self.here_etag = here[0] if here else (None, None)
        conn.execute("DROP TABLE IF EXISTS temp.known_rows")
        cols = ("SELECT ino, name, remote_key, remote_etag, mode & 61440 = 16384 AS is_dir "
                "FROM nodes WHERE ")
        if only is None:
            conn.execute(f"CREATE TEMP TABLE known_rows AS {cols} parent=? AND ino != parent",
                         (dir_ino,))
        else:
            # one name's listing: its row, and any row holding one of its keys (a rename
            # not yet carried out), not a copy of the directory. Two lookups, each by its
            # own index (an OR of the two walked the whole directory: 39 ms at 100,000)
            conn.execute(f"CREATE TEMP TABLE known_rows AS {cols} parent=? AND name=? AND "
                         "ino != parent", (dir_ino, only))
            conn.execute(f"INSERT INTO known_rows {cols} +parent=? AND ino != parent AND "
                         "remote_key IN (?, ?, ?) AND name != ?",
                         (dir_ino, *(prefix + only + tail for tail in ("", DELTA_SUFFIX, "/")),
                          only))
        # one read of the committed state, then none: the read transaction ends here
        conn.commit()
        conn.isolation_level = None  # what follows touches the temp tables only
        conn.execute("CREATE INDEX temp.known_rows_key ON known_rows (remote_key)")
        conn.execute("CREATE INDEX temp.known_rows_name ON known_rows (name)")
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS listed_names (name TEXT PRIMARY KEY)")
        conn.execute("DELETE FROM temp.listed_names")

    def _in(self, sql: str, values: list[str], run: Callable[..., Any] | None = None,
            lead: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
        """``sql`` (``IN ({})``, after the parameters ``lead``) over ``values`` in
        batches, on the copy (or through ``run``)."""
        run = run or self.conn.execute
        for i in range(0, len(values), _IN_BATCH):
            part = values[i:i + _IN_BATCH]
            yield from run(sql.format(",".join("?" * len(part))), (*lead, *part))

    def etags(self, keys: list[str]) -> dict[str, str | None]:
        """remote key -> ETag, for the directory's rows (and itself) holding ``keys``."""
        out: dict[str, str | None] = {
            k: e for k, e in self._in("SELECT remote_key, remote_etag FROM known_rows "
                                      "WHERE remote_key IN ({})", keys)}
        if self.here_key is not None and self.here_key in keys:
            out[self.here_key] = self.here_etag
        return out

    def known_since(self, objects: list[ObjectInfo]) -> set[str]:
        """Keys of ``objects`` that the journal's *latest* committed state has at exactly
        the listed ETag, under this directory: this mount's own uploads that finished
        after the listing's snapshot. Their rows changed since it, so the merge leaves
        them alone; a HEAD (or the manifest's GET) for them is wasted. A directory this
        mount fills was listed again every TTL, and each listing HEADed the files uploaded
        while it ran (12,639 HEADs in the 100,000-file create) and read its whole manifest
        to find a few of them (a transient of 10-20 MB and seconds of CPU at 90,000
        entries)."""
        if self.latest is None or not objects:
            return set()
        listed = {o.key: o.etag for o in objects}
        return {key for key, etag in self._in(
            "SELECT remote_key, remote_etag FROM nodes WHERE +parent=? AND ino != parent "
            "AND remote_key IN ({})", list(listed), self.latest, (self.dir_ino,))
            if etag is not None and listed.get(key) == etag}

    def rows(self, names: list[str]) -> dict[str, tuple[int, str, str | None, str | None, bool]]:
        """name -> (ino, name, remote key, ETag, is a directory), for these names."""
        return {r[1]: (r[0], r[1], r[2], r[3], bool(r[4])) for r in self._in(
            "SELECT ino, name, remote_key, remote_etag, is_dir FROM known_rows "
            "WHERE name IN ({})", names)}

    def listed(self, names: Iterable[str]) -> None:
        self.conn.executemany("INSERT OR IGNORE INTO temp.listed_names VALUES (?)",
                              ((n,) for n in names))

    def gone(self, only: str | None) -> Iterator[tuple[int, str, str | None, str | None]]:
        """Published rows whose name no page listed (their object is not there)."""
        sql = ("SELECT ino, name, remote_key, remote_etag FROM known_rows WHERE "
               "remote_key IS NOT NULL AND remote_key != '' AND name NOT "
               "IN (SELECT name FROM temp.listed_names)")
        args: tuple[Any, ...] = ()
        if only is not None:
            sql += " AND name=?"
            args += (only,)
        yield from self.conn.execute(sql, args)


def _stream(conn: Any, engine: Engine, dir_ino: int, prefix: str,
            emit: Callable[[DirListing, Snapshot], None], resolve: Resolver | None,
            only: str | None,
            latest: Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]] | None = None
            ) -> ListingEnd:
    known = _Known(conn, dir_ino, latest, prefix, only)
    end = ListingEnd()
    saw_delta = False
    # HEAD unknown plain objects? decided once (for one name: yes, it is one HEAD)
    direct_head: bool | None = True if only is not None else None
    held: dict[str, StoredFile] = {}  # names that may go on in the next page
    held_listed: dict[str, ObjectInfo] = {}

    def pages() -> Iterator[Listing]:
        if only is None:
            for page in fetched_ahead(engine.store.iter_pages(prefix)):
                end.pages += 1
                yield page
            return
        last = f"{prefix}{only}/"
        for page in engine.store.iter_pages(prefix + only):
            end.pages += 1
            yield page
            keys = [*(o.key for o in page.objects[-1:]), *page.prefixes[-1:]]
            if keys and max(keys) >= last:
                return  # past the name's every form

    for page in itertools.chain(pages(), [None]):
        files: dict[str, StoredFile] = held
        listed: dict[str, ObjectInfo] = held_listed
        held, held_listed = {}, {}
        dirs: set[str] = set()
        if page is None:  # the end: what was held back
            if not files:
                break
            page = Listing()
        for p in page.prefixes:
            name = p[len(prefix):].rstrip("/")
            if name == HIDDEN:
                end.blobs = True
                continue  # the directory's chain blobs (deltafs.chain), never a directory
            if not valid_name(name):
                _warn_once(p, "not a valid file name")
                continue
            dirs.add(name)
        need: list[str] = []
        for o in page.objects:
            if o.key == prefix:
                end.marker = classify(o.key, o.size, o.etag, o.mtime)
                if prefix and known.etags([o.key]).get(o.key) != o.etag:
                    need.append(o.key)
                continue
            if o.key[len(prefix):] == MANIFEST_NAME:
                end.manifest = o
                continue
            f = classify(o.key, o.size, o.etag, o.mtime)
            if f is None:
                end.reference = o
                continue
            name = split_key(f.logical_key)[1]
            if not valid_name(name):
                _warn_once(o.key, "not a valid file name")
                continue
            old = files.get(name)
            if old is None or f.mtime > old.mtime:
                files[name] = f
                listed[o.key] = o
        if only is not None:
            files = {n: f for n, f in files.items() if n == only}
            listed = {f.object_key: listed[f.object_key] for f in files.values()}
            dirs = dirs & {only}
        for name in list(files):
            if name in dirs:
                _warn_once(files[name].object_key, "a directory of the same name hides it")
                del files[name]
        # Keys sort as "a" < "a-1" < "a.delta" < "a/": when the page ends in a key that
        # starts with a name, that name's other form (or a directory of that name) may be
        # on the next page. Decide it there, with both in view.
        ends = [k for k in (page.objects[-1].key if page.objects else "",
                            page.prefixes[-1] if page.prefixes else "") if k]
        tail = max(ends)[len(prefix):] if ends else ""
        for name in [n for n in files if tail.startswith(n)]:
            f = held[name] = files.pop(name)
            held_listed[f.object_key] = listed[f.object_key]
        etags = known.etags([f.object_key for f in files.values()])
        unknown = [listed[f.object_key] for f in files.values()
                   if etags.get(f.object_key) != f.etag]
        ours: set[str] = set()
        if unknown:
            # (an upload whose ETag is recorded but not yet committed still costs a HEAD:
            # a few per listing, fewer than make the manifest worth its GET)
            ours = known.known_since(unknown)
            unknown = [o for o in unknown if o.key not in ours]
        if unknown and resolve is not None and end.manifest is not None:
            resolved = resolve(unknown, end.manifest)
            for f in resolved.values():
                files[split_key(f.logical_key)[1]] = f
            end.manifest_hits += len(resolved)
            unknown = [o for o in unknown if o.key not in resolved]
        saw_delta = saw_delta or any(f.kind is Kind.DELTA for f in files.values())
        if direct_head is None and any(not o.key.endswith(DELTA_SUFFIX) for o in unknown):
            if end.manifest is not None or end.reference is not None or saw_delta:
                direct_head = True
            else:
                # No sign of deltafs or DeltaGlider here: sample a few plain objects. If
                # none carries their metadata, this is another tool's directory and the
                # LIST says all there is (size, mtime): no HEAD per file.
                sample = [o.key for o in unknown if not o.key.endswith(DELTA_SUFFIX)][:SAMPLE]
                end.heads += len(sample)
                got = engine.head_many(sample)
                for f in got.values():
                    files[split_key(f.logical_key)[1]] = f
                direct_head = any(f.kind is not Kind.FOREIGN for f in got.values())
                unknown = [o for o in unknown if o.key not in got]
        if not direct_head:
            unknown = [o for o in unknown if o.key.endswith(DELTA_SUFFIX)]
        need += [o.key for o in unknown]
        # A sub-directory seen for the first time: its marker (if any) holds its
        # attributes, which rsync and tar compare before they ever open it.
        # (a directory already known keeps its row; its own listing reads its marker)
        markers = known.etags([f"{prefix}{d}/" for d in dirs])
        rows = known.rows([*files, *dirs])
        need += [f"{prefix}{d}/" for d in sorted(dirs)
                 if f"{prefix}{d}/" not in markers and not (d in rows and rows[d][4])]
        dir_markers: dict[str, StoredFile] = {}
        end.heads += len(need)
        for key, f in engine.head_many(need).items():
            if key == prefix:
                end.marker = f
            elif f.kind is Kind.MARKER:
                dir_markers[key[len(prefix):-1]] = f
            else:
                files[split_key(f.logical_key)[1]] = f
        known.listed(files)
        known.listed(dirs)
        # this mount's own newer rows: listed (not gone), but nothing to decide, and no
        # row is ever made from their LIST entry alone (it has no metadata)
        for name in [n for n, f in files.items() if f.object_key in ours]:
            del files[name]
        part_snap = {r[0]: (r[1], r[2], r[3]) for n, r in rows.items()}
        emit(DirListing(files, dirs, None, None, dir_markers), part_snap)
    end.saw_delta = saw_delta
    for ino, name, key, etag in known.gone(only):
        end.removals.append(name)
        end.removal_snapshot[ino] = (name, key, etag)
    return end


def merge_listing(journal: Journal, dir_ino: int, listing: DirListing, busy: set[int],
                  uid: int, gid: int, snapshot: Snapshot | None = None,
                  started: float = 0.0, names: Iterable[str] | None = None,
                  final: bool = True) -> list[tuple[int, str]]:
    """Apply a listing to the rows under ``dir_ino``.

    A listing tells what the bucket held when the LIST ran, which may be older than a
    row: ``busy`` rows (open, or with content in flight), dirty rows and rows that changed
    since ``snapshot`` are left alone; objects with a pending delete, or that a live row
    elsewhere owns (the source of a rename not yet carried out), do not come back.

    A file whose object changed (another writer) gets a **new inode**: the old one is
    unlinked (an open handle keeps reading the version it opened, and the kernel's
    cached pages of it can never mix with the new content). Returns ``(old inode, name)``
    of every entry replaced or removed, for the caller to invalidate in the kernel."""
    gone: list[tuple[int, str]] = []
    now = time.time_ns()
    if names is None:
        existing = {n.name: n for n in journal.children(dir_ino)}
    else:
        # a slice of a streamed listing: only these names are decided now
        existing = journal.children_named(dir_ino, list(names))

    def unchanged(node: Node) -> bool:
        return snapshot is None or snapshot.get(node.ino) == (
            node.name, node.remote_key, node.remote_etag)

    # what the rows below ask of each object, asked for all of them at once (one query
    # per few hundred keys instead of three statements per new row: issue 11); nothing
    # in this loop changes either answer for another name (each name has its own keys)
    todo: list[tuple[str, StoredFile, Node | None]] = []
    for name, f in listing.files.items():
        node = existing.pop(name, None)
        if node is not None and (node.dirty or node.ino in busy or not unchanged(node)):
            continue
        if node is not None and node.remote_etag == f.etag and node.remote_key == f.object_key:
            continue
        todo.append((name, f, node))
    keys = [f.object_key for _, f, _ in todo]
    tombed = journal.tombstoned(keys) if keys else set()
    claimed = journal.claimed_keys([f.object_key for _, f, node in todo if node is None]) \
        if keys else set()
    new_rows: list[dict[str, object]] = []
    for name, f, node in todo:
        if f.object_key in tombed or \
                (started and journal.gone_since(f.object_key, started)):
            continue  # being deleted, or deleted by this mount after the LIST ran
        fields = _file_fields(f, uid, gid)
        if node is None:
            if f.object_key in claimed:
                continue  # a renamed file whose object has not moved yet
            new_rows.append(dict(parent=dir_ino, name=name, ctime_ns=now, atime_ns=now,
                                 **fields))
        elif node.is_dir:
            continue  # a local directory of that name wins until it is gone
        elif node.sha256 is not None and node.sha256 == f.sha256 and \
                node.size == (f.size if f.size is not None else f.object_size):
            journal.update(node.ino, **fields)  # same content (e.g. new attributes)
        else:
            _orphan(journal, node)
            gone.append((node.ino, name))
            new_rows.append(dict(parent=dir_ino, name=name, ctime_ns=now, atime_ns=now,
                                 **fields))
    journal.insert_many(new_rows)
    for name in listing.dirs:
        node = existing.pop(name, None)
        m = listing.dir_markers.get(name)
        if node is None:
            fields = dict(mode=stat.S_IFDIR | DEFAULT_DIR_MODE, uid=uid, gid=gid,
                          mtime_ns=now, ctime_ns=now, atime_ns=now)
            if m is not None:
                fields.update(_marker_fields(m))
            journal.insert(parent=dir_ino, name=name, **fields)
        elif m is not None and node.is_dir and not node.dirty and node.ino not in busy:
            journal.update(node.ino, **_marker_fields(m))
    for name, node in existing.items():
        # In the journal but not in the bucket: keep what is ours and not yet uploaded;
        # drop what was published and is gone (deleted by another writer).
        if node.dirty or node.ino in busy or node.remote_key is None or not unchanged(node):
            continue
        if node.is_dir:
            # a directory another writer removed stays here (empty once listed):
            # removing its row behind the kernel's back races namespace operations
            # in it (see architecture.md, "A directory removed elsewhere")
            continue
        _orphan(journal, node)
        gone.append((node.ino, name))
    if not final:
        return gone
    ref = listing.reference
    journal.set_reference(dir_ino, ref.key if ref else None, ref.size if ref else 0)
    here = journal.get(dir_ino)
    m = listing.marker
    if m is not None and here is not None and not here.dirty and dir_ino not in busy \
            and here.remote_etag != m.etag and m.metadata is not None:
        journal.update(dir_ino, **_marker_fields(m))
    journal.update(dir_ino, listed_at=time.time())
    return gone


def _orphan(journal: Journal, node: Node) -> None:
    """Take a row out of the namespace as an unlink does (it goes once the kernel has
    forgotten it); its object is not ours to delete."""
    journal.update(node.ino, parent=0, name=f"#{node.ino}", dirty=0, remote_key=None)


def _marker_fields(m: StoredFile) -> dict[str, object]:
    """A directory row's fields from its marker object (attributes where it has them)."""
    attrs = m.attrs
    fields: dict[str, object] = dict(remote_key=m.object_key, remote_etag=m.etag,
                                     remote_kind="marker", remote_size=0)
    if attrs.mode is not None:
        fields["mode"] = stat.S_IFDIR | stat.S_IMODE(attrs.mode)
    if attrs.mtime_ns is not None:
        fields["mtime_ns"] = attrs.mtime_ns
    if attrs.uid is not None:
        fields["uid"] = attrs.uid
    if attrs.gid is not None:
        fields["gid"] = attrs.gid
    return fields


def _file_fields(f: StoredFile, uid: int, gid: int) -> dict[str, object]:
    attrs = f.attrs
    if f.kind in (Kind.DIRECT, Kind.FOREIGN) and attrs.is_symlink:
        mode = attrs.mode
    else:
        mode = stat.S_IFREG | (stat.S_IMODE(attrs.mode) if attrs.mode is not None
                               else DEFAULT_FILE_MODE)
    size = f.size if f.size is not None else f.object_size
    return dict(
        mode=mode,
        uid=attrs.uid if attrs.uid is not None else uid,
        gid=attrs.gid if attrs.gid is not None else gid,
        size=size,
        mtime_ns=f.mtime_ns,
        sha256=f.sha256,
        remote_key=f.object_key,
        remote_etag=f.etag,
        remote_kind=f.kind.value,
        remote_size=f.object_size,
        remote_ref=f.ref_key,
        target=None,
    )


def stored_of(node: Node) -> StoredFile:
    """The StoredFile a published row stands for (no request; metadata unknown)."""
    assert node.remote_key is not None
    logical = node.remote_key[: -len(".delta")] if node.remote_kind == Kind.DELTA.value \
        else node.remote_key
    return StoredFile(logical, node.remote_key, Kind(node.remote_kind or "direct"),
                      node.remote_size or 0, node.remote_etag or "", node.mtime_ns / 1e9)


def key_of(journal: Journal, prefix: str, ino: int) -> str:
    """The bucket key of a node under the mount's prefix."""
    path = journal.path(ino)
    prefix = prefix.strip("/")
    if not prefix:
        return path
    # the root of a prefix mount is the prefix itself, never "prefix/" (a LIST of
    # "prefix//" finds nothing: the empty root of issue 8)
    return join_key(prefix, path) if path else prefix


__all__ = ["stream_listing", "merge_listing", "listing_snapshot", "stored_of", "key_of",
           "ObjectInfo", "ListingEnd"]
