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

import logging
import stat
import time
from dataclasses import dataclass, field

from .engine import Engine
from .format import MAX_NAME_BYTES, Kind, StoredFile, classify, join_key, split_key
from .journal import Journal, Node
from .store.base import ObjectInfo

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


def fetch_listing(engine: Engine, prefix: str, known: dict[str, str | None]) -> DirListing:
    """LIST ``prefix`` (a directory key ending in "/" or "" for the root) and HEAD the
    objects whose ETag differs from ``known`` (object key -> etag). Blocking: run in a
    worker thread."""
    listing = engine.store.list(prefix)
    files: dict[str, StoredFile] = {}
    dirs: set[str] = set()
    marker: StoredFile | None = None
    reference: ObjectInfo | None = None
    for p in listing.prefixes:
        name = p[len(prefix):].rstrip("/")
        if not valid_name(name):
            _warn_once(p, "not a valid file name")
            continue
        dirs.add(name)
    for o in listing.objects:
        if o.key == prefix:
            marker = classify(o.key, o.size, o.etag, o.mtime)
            continue
        f = classify(o.key, o.size, o.etag, o.mtime)
        if f is None:
            reference = o
            continue
        name = split_key(f.logical_key)[1]
        if not valid_name(name):
            _warn_once(o.key, "not a valid file name")
            continue
        old = files.get(name)
        if old is None or f.mtime > old.mtime:
            files[name] = f
    for name in list(files):
        if name in dirs:
            _warn_once(files[name].object_key, "a directory of the same name hides it")
            del files[name]
    need = [f.object_key for f in files.values() if known.get(f.object_key) != f.etag]
    if marker is not None and prefix and known.get(marker.object_key) != marker.etag:
        need.append(marker.object_key)
    # A sub-directory seen for the first time: its marker (if any) holds its attributes,
    # which rsync and tar compare before they ever open it. One HEAD per new directory.
    need += [f"{prefix}{d}/" for d in sorted(dirs) if f"{prefix}{d}/" not in known]
    dir_markers: dict[str, StoredFile] = {}
    for key, f in engine.head_many(need).items():
        if key == prefix:
            marker = f
        elif f.kind is Kind.MARKER:
            dir_markers[key[len(prefix):-1]] = f
        else:
            files[split_key(f.logical_key)[1]] = f
    return DirListing(files, dirs, marker, reference, dir_markers)


Snapshot = dict[int, tuple[str, str | None, str | None]]


def listing_snapshot(journal: Journal, dir_ino: int) -> Snapshot:
    """The rows under ``dir_ino`` as they are when a LIST goes out (ino -> name, remote
    key, ETag): a listing may only change rows that are still exactly like this."""
    return {n.ino: (n.name, n.remote_key, n.remote_etag) for n in journal.children(dir_ino)}


def merge_listing(journal: Journal, dir_ino: int, listing: DirListing, busy: set[int],
                  uid: int, gid: int, snapshot: Snapshot | None = None,
                  started: float = 0.0) -> list[tuple[int, str]]:
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
    existing = {n.name: n for n in journal.children(dir_ino)}
    doomed = journal.tombstone_keys()

    def unchanged(node: Node) -> bool:
        return snapshot is None or snapshot.get(node.ino) == (
            node.name, node.remote_key, node.remote_etag)

    for name, f in listing.files.items():
        node = existing.pop(name, None)
        if node is not None and (node.dirty or node.ino in busy or not unchanged(node)):
            continue
        if node is not None and node.remote_etag == f.etag and node.remote_key == f.object_key:
            continue
        if f.object_key in doomed or (started and journal.gone_since(f.object_key, started)):
            continue  # being deleted, or deleted by this mount after the LIST ran
        fields = _file_fields(f, uid, gid)
        if node is None:
            if journal.remote_claimed(f.object_key):
                continue  # a renamed file whose object has not moved yet
            journal.insert(parent=dir_ino, name=name, ctime_ns=now, atime_ns=now, **fields)
        elif node.is_dir:
            continue  # a local directory of that name wins until it is gone
        elif node.sha256 is not None and node.sha256 == f.sha256 and \
                node.size == (f.size if f.size is not None else f.object_size):
            journal.update(node.ino, **fields)  # same content (e.g. new attributes)
        else:
            _orphan(journal, node)
            gone.append((node.ino, name))
            journal.insert(parent=dir_ino, name=name, ctime_ns=now, atime_ns=now, **fields)
    for name in listing.dirs:
        node = existing.pop(name, None)
        m = listing.dir_markers.get(name)
        if node is None:
            fields = dict(mode=stat.S_IFDIR | DEFAULT_DIR_MODE, uid=uid, gid=gid,
                          mtime_ns=now, ctime_ns=now, atime_ns=now)
            if m is not None:
                fields.update(_marker_fields(m))
            journal.insert(parent=dir_ino, name=name, **fields)
        elif m is not None and not node.dirty and node.ino not in busy:
            journal.update(node.ino, **_marker_fields(m))
    for name, node in existing.items():
        # In the journal but not in the bucket: keep what is ours and not yet uploaded;
        # drop what was published and is gone (deleted by another writer).
        if node.dirty or node.ino in busy or node.remote_key is None or not unchanged(node):
            continue
        if node.is_dir:
            continue
        _orphan(journal, node)
        gone.append((node.ino, name))
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
    if f.kind is Kind.DIRECT and attrs.is_symlink:
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


def known_etags(journal: Journal, dir_ino: int) -> dict[str, str | None]:
    known = {n.remote_key: n.remote_etag for n in journal.children(dir_ino) if n.remote_key}
    here = journal.get(dir_ino)
    if here is not None and here.remote_key:
        known[here.remote_key] = here.remote_etag
    return known


__all__ = ["fetch_listing", "merge_listing", "listing_snapshot", "stored_of", "key_of", "known_etags",
           "ObjectInfo"]
