"""A directory on disk used as a bucket: the embedded store for quick starts without S3.

Layout under the store root::

    .deltafs-store          marker (JSON: format name and version)
    objects/<dirs>/<name>.obj   object data, plain files a user can inspect
    meta/<dirs>/<name>.obj      sidecar JSON: size, ETag, mtime and user metadata
    tmp/                    uploads in progress (renamed into place when complete)
    locks/NN.lock           striped flock files serialising writers of the same key

Why the suffixes: in S3 ``a`` and ``a/b`` can both be objects, but on disk ``a`` cannot be
both a file and a directory. Every object file ends in ``.obj``; a directory name never
does (a key component that ends in ``.obj`` or ``.dir`` is stored as a directory named
``<component>.dir``), so object files and directories can never collide. A key ending in
``/`` (a directory marker) is the object with an empty last component: the file ``.obj``.

Why the sidecar is keyed by inode: data and sidecar are two files, and no rename can
replace both at once. Each sidecar maps the inode number of a data file to that file's
description; a writer (holding the key's lock) first adds the entry for its new data file,
then renames the data into place. A reader opens the data file, takes its inode from
``fstat`` and picks the matching entry, so it never pairs new bytes with old metadata or
the reverse, without taking any lock. A crash between the two steps leaves the old object
and its entry intact.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
import zlib
from collections import Counter
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping

from deltafs.errors import (
    AccessDenied,
    AlreadyExists,
    BucketNotFound,
    Changed,
    InvalidName,
    NotFound,
    StoreError,
)
from deltafs.store.base import Listing, ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

MARKER = ".deltafs-store"
STORE_FORMAT = "deltafs-local-store"
FORMAT_VERSION = 1
OBJ_SUFFIX = ".obj"
DIR_ESCAPE = ".dir"
CHUNK = 2**20
LOCK_STRIPES = 64
MAX_KEY_BYTES = 1024  # S3's limit, so a local store accepts exactly what a bucket would
MAX_NAME_BYTES = 255  # one path component on common filesystems
#: a reader that finds no sidecar entry for the data file it opened retries this often
#: (a concurrent writer may have pruned it) before treating the file as foreign
READ_RETRIES = 5
#: temp files untouched for this long belong to a dead process and are removed at open
STALE_TMP_SECONDS = 3600


def _enc_dir(component: str) -> str:
    """Directory name on disk for a key component that has children."""
    if component.endswith((OBJ_SUFFIX, DIR_ESCAPE)):
        return component + DIR_ESCAPE
    return component


def _dec_dir(name: str) -> str | None:
    """Key component for a directory name on disk, or ``None`` if we did not make it."""
    if name.endswith(OBJ_SUFFIX):
        return None
    if name.endswith(DIR_ESCAPE):
        inner = name[: -len(DIR_ESCAPE)]
        return inner if inner.endswith((OBJ_SUFFIX, DIR_ESCAPE)) else None
    return name


def _utf8_ok(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes on disk come back as surrogates
        return False
    return True


def _sort_key(key: str) -> bytes:
    """S3 orders keys by their UTF-8 bytes (not by code points of a UTF-16 world)."""
    return key.encode("utf-8")


class LocalStore(ObjectStore):
    """An :class:`ObjectStore` in a local directory; safe across threads and processes."""

    def __init__(self, root: Path, *, create: bool = False) -> None:
        self.root = Path(root).expanduser().absolute()
        self.name = str(self.root)
        self.objects = self.root / "objects"
        self.meta = self.root / "meta"
        self.tmp = self.root / "tmp"
        self.locks = self.root / "locks"
        self._counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        marker = self.root / MARKER
        with self._errors("open", None):
            if create:
                self.root.mkdir(parents=True, exist_ok=True)
                for d in (self.objects, self.meta, self.tmp, self.locks):
                    d.mkdir(exist_ok=True)
                if not marker.exists():
                    self._write_marker(marker)
            if not marker.is_file():
                raise BucketNotFound(
                    f"no deltafs store at {self.root} (create one with `deltafs init {self.root}`)"
                )
            self._read_marker(marker)
            for d in (self.objects, self.meta, self.tmp, self.locks):
                with contextlib.suppress(OSError):  # a read-only store still reads
                    d.mkdir(exist_ok=True)
        self._clean_tmp()

    # -- setup ----------------------------------------------------------------------------

    def _write_marker(self, marker: Path) -> None:
        tmp = self.tmp / f"marker-{uuid.uuid4().hex}"
        tmp.write_text(json.dumps({"format": STORE_FORMAT, "version": FORMAT_VERSION}) + "\n")
        os.replace(tmp, marker)

    def _read_marker(self, marker: Path) -> None:
        try:
            info = json.loads(marker.read_text())
            version = int(info["version"])
        except (ValueError, KeyError, TypeError):
            raise StoreError(f"{marker} is not a valid deltafs store marker") from None
        if version > FORMAT_VERSION:
            raise StoreError(
                f"the store at {self.root} has format version {version}; this deltafs"
                f" reads up to version {FORMAT_VERSION}"
            )

    def _clean_tmp(self) -> None:
        """Remove leftovers of crashed writers (any process: hence the age limit)."""
        cutoff = time.time() - STALE_TMP_SECONDS
        try:
            entries = list(os.scandir(self.tmp))
        except OSError:
            return
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)

    # -- helpers --------------------------------------------------------------------------

    def _count(self, op: str) -> None:
        with self._counts_lock:
            self._counts[op] += 1

    def stats(self) -> dict[str, int]:
        with self._counts_lock:
            return dict(self._counts)

    @contextlib.contextmanager
    def _errors(self, op: str, key: str | None) -> Iterator[None]:
        """Turn OSErrors into deltafs errors with the store and key in the message."""
        try:
            yield
        except (StoreError, InvalidName):
            raise
        except OSError as exc:
            where = f"{self.root}" + (f" key {key!r}" if key is not None else "")
            reason = exc.strerror or str(exc)
            if exc.errno == errno.ENAMETOOLONG:
                raise InvalidName(f"name too long for the local store: {key!r}") from exc
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise AccessDenied(f"local store {op} {where}: {reason}") from exc
            raise StoreError(f"local store {op} {where}: {reason}") from exc

    def _rel(self, key: str) -> Path:
        """The path of ``key`` relative to ``objects/`` (and ``meta/``); rejects keys a
        path could not carry safely."""
        if not key:
            raise InvalidName("empty key")
        if "\0" in key:
            raise InvalidName(f"key contains a NUL byte: {key!r}")
        try:
            raw = key.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidName(f"key is not valid UTF-8: {key!r}") from None
        if len(raw) > MAX_KEY_BYTES:
            raise InvalidName(f"key longer than {MAX_KEY_BYTES} bytes: {key[:60]!r}…")
        *dirs, name = key.split("/")
        if any(d in ("", ".", "..") for d in dirs) or name in (".", ".."):
            raise InvalidName(f"key has an empty, '.' or '..' component: {key!r}")
        parts = [_enc_dir(d) for d in dirs] + [name + OBJ_SUFFIX]
        if any(len(p.encode("utf-8")) > MAX_NAME_BYTES for p in parts):
            raise InvalidName(f"a component of {key!r} is too long for the local store")
        return Path(*parts)

    def _paths(self, key: str) -> tuple[Path, Path]:
        rel = self._rel(key)
        return self.objects / rel, self.meta / rel

    @contextlib.contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        """Exclusive writer lock for ``key`` across threads and processes (flock on a
        striped file: each call opens its own descriptor, so threads exclude each other
        too). Readers never lock."""
        stripe = zlib.crc32(key.encode("utf-8")) % LOCK_STRIPES
        fd = os.open(self.locks / f"{stripe:02x}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _place(action: Callable[[], None], parent: Path) -> None:
        """Run a rename/link into ``parent``, (re)creating it: a concurrent delete of a
        sibling may prune the directory between our mkdir and the rename."""
        for attempt in range(5):
            parent.mkdir(parents=True, exist_ok=True)
            try:
                action()
                return
            except FileNotFoundError:
                if attempt == 4 or parent.is_dir():
                    raise

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _new_tmp(self) -> Path:
        return self.tmp / uuid.uuid4().hex

    def _spool(self, src: IO[bytes]) -> tuple[Path, int, str]:
        """Copy a stream into a new temp file (fsynced); returns path, size, md5 hex."""
        tmp = self._new_tmp()
        digest = hashlib.md5(usedforsecurity=False)
        size = 0
        try:
            with open(tmp, "xb") as out:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return tmp, size, digest.hexdigest()

    @staticmethod
    def _md5_of(f: IO[bytes]) -> str:
        digest = hashlib.md5(usedforsecurity=False)
        while chunk := f.read(CHUNK):
            digest.update(chunk)
        return digest.hexdigest()

    # -- sidecars -------------------------------------------------------------------------

    @staticmethod
    def _read_sidecar(path: Path) -> dict[str, dict[str, Any]]:
        """Entries by inode number; a missing or unreadable sidecar has none."""
        try:
            with open(path, "rb") as f:
                doc = json.load(f)
            entries = doc["entries"]
            return entries if isinstance(entries, dict) else {}
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log.warning("ignoring unreadable sidecar %s: %s", path, exc)
            return {}

    def _write_sidecar(self, path: Path, entries: dict[str, dict[str, Any]]) -> None:
        """Replace the sidecar atomically (temp file, fsync, rename)."""
        if not entries:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        tmp = self._new_tmp()
        try:
            with open(tmp, "x", encoding="utf-8") as out:
                json.dump({"version": FORMAT_VERSION, "entries": entries}, out)
                out.flush()
                os.fsync(out.fileno())
            self._place(lambda: os.replace(tmp, path), path.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    @staticmethod
    def _entry_info(key: str, entry: Mapping[str, Any], with_meta: bool) -> ObjectInfo:
        return ObjectInfo(
            key=key,
            size=int(entry["size"]),
            etag=str(entry["etag"]),
            mtime=float(entry["mtime"]),
            metadata=dict(entry.get("metadata") or {}) if with_meta else None,
        )

    def _lookup(self, data: Path, meta: Path, st: os.stat_result) -> dict[str, Any] | None:
        entry = self._read_sidecar(meta).get(str(st.st_ino))
        if entry is not None and int(entry.get("size", -1)) == st.st_size:
            return entry
        return None

    def _foreign_entry(self, f: IO[bytes], st: os.stat_result, meta: Path) -> dict[str, Any]:
        """Describe a data file no writer recorded (placed or edited by hand): its own
        md5 and mtime; metadata kept only if the sidecar still names this very inode."""
        old = self._read_sidecar(meta).get(str(st.st_ino)) or {}
        etag = self._md5_of(f)
        f.seek(0)
        return {
            "size": st.st_size,
            "etag": etag,
            "mtime": st.st_mtime,
            "metadata": old.get("metadata") or {},
        }

    def _open_consistent(self, key: str) -> tuple[IO[bytes], dict[str, Any]]:
        """Open ``key``'s data and find the sidecar entry of exactly that file."""
        data, meta = self._paths(key)
        for attempt in range(READ_RETRIES + 1):
            try:
                f = open(data, "rb")
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                raise NotFound(f"{self.name}: no such key {key!r}") from None
            st = os.fstat(f.fileno())
            entry = self._lookup(data, meta, st)
            if entry is not None:
                return f, entry
            if attempt < READ_RETRIES:
                f.close()
                time.sleep(0.001 * 2**attempt)
        try:
            return f, self._foreign_entry(f, st, meta)
        except BaseException:
            f.close()
            raise

    def _describe(self, key: str, data: Path, meta: Path, with_meta: bool) -> ObjectInfo | None:
        """Info on one key without opening its data (unless it is foreign); ``None`` if
        it does not exist."""
        for attempt in range(READ_RETRIES + 1):
            try:
                st = os.stat(data)
            except (FileNotFoundError, NotADirectoryError):
                return None
            entry = self._lookup(data, meta, st)
            if entry is not None:
                return self._entry_info(key, entry, with_meta)
            if attempt < READ_RETRIES:
                time.sleep(0.001 * 2**attempt)
        try:
            f, entry = self._open_consistent(key)
        except NotFound:
            return None
        with f:
            return self._entry_info(key, entry, with_meta)

    # -- commit ---------------------------------------------------------------------------

    def _commit(
        self,
        key: str,
        tmp: Path,
        size: int,
        etag: str,
        metadata: Mapping[str, str],
        if_none_match: bool,
    ) -> ObjectInfo:
        """Publish a spooled temp file as ``key``: sidecar entry first, then the data
        (``link`` for a conditional create: it fails if the key exists, atomically)."""
        data, meta = self._paths(key)
        entry = {
            "size": size,
            "etag": etag,
            "mtime": time.time(),
            # S3 lowercases metadata keys; doing the same keeps both stores identical
            "metadata": {str(k).lower(): str(v) for k, v in metadata.items()},
        }
        try:
            ino = str(os.stat(tmp).st_ino)
            with self._lock(key):
                try:
                    current: str | None = str(os.stat(data).st_ino)
                except (FileNotFoundError, NotADirectoryError):
                    current = None
                if if_none_match and current is not None:
                    raise AlreadyExists(f"{self.name}: key {key!r} already exists")
                entries = {k: v for k, v in self._read_sidecar(meta).items() if k == current}
                entries[ino] = entry
                self._write_sidecar(meta, entries)
                try:
                    if if_none_match:
                        self._place(lambda: os.link(tmp, data), data.parent)
                    else:
                        self._place(lambda: os.replace(tmp, data), data.parent)
                except BaseException as exc:
                    entries.pop(ino, None)  # never leave an entry for a file not placed
                    with contextlib.suppress(OSError):
                        self._write_sidecar(meta, entries)
                    if isinstance(exc, FileExistsError):
                        raise AlreadyExists(f"{self.name}: key {key!r} already exists") from None
                    raise
                self._fsync_dir(data.parent)
                self._fsync_dir(meta.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return self._entry_info(key, entry, with_meta=True)

    # -- ObjectStore ----------------------------------------------------------------------

    def check(self) -> None:
        with self._errors("check", None):
            if not (self.root / MARKER).is_file():
                raise BucketNotFound(
                    f"no deltafs store at {self.root} (create one with `deltafs init {self.root}`)"
                )
            probe = self._new_tmp()
            try:
                probe.write_bytes(b"")
            except OSError as exc:
                raise AccessDenied(
                    f"local store {self.root} is not writable: {exc.strerror or exc}"
                ) from exc
            probe.unlink()

    def head(self, key: str) -> ObjectInfo | None:
        self._count("HEAD")
        with self._errors("HEAD", key):
            data, meta = self._paths(key)
            return self._describe(key, data, meta, with_meta=True)

    def _scan(self, path: Path) -> Iterator[tuple[str, str, os.DirEntry[str]]]:
        """Entries of one directory as (kind, key component, entry); kind is "obj" or
        "dir"; names we did not write (wrong suffix, invalid UTF-8, symlinks) are skipped."""
        try:
            entries = list(os.scandir(path))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if not _utf8_ok(entry.name):
                continue
            try:
                if entry.is_file(follow_symlinks=False) and entry.name.endswith(OBJ_SUFFIX):
                    yield "obj", entry.name[: -len(OBJ_SUFFIX)], entry
                elif entry.is_dir(follow_symlinks=False):
                    name = _dec_dir(entry.name)
                    if name:
                        yield "dir", name, entry
            except OSError:
                continue

    def _has_objects(self, path: Path) -> bool:
        """Whether a directory holds any object (empty leftovers are not prefixes)."""
        for kind, _, entry in self._scan(path):
            if kind == "obj" or self._has_objects(Path(entry.path)):
                return True
        return False

    def _walk(self, path: Path, key_prefix: str) -> Iterator[tuple[str, Path]]:
        """Every (key, data path) below a directory, recursively."""
        for kind, name, entry in self._scan(path):
            if kind == "obj":
                if key_prefix + name:
                    yield key_prefix + name, Path(entry.path)
            else:
                yield from self._walk(Path(entry.path), key_prefix + name + "/")

    def list(self, prefix: str, delimiter: str | None = "/") -> Listing:
        self._count("LIST")
        *dirs, partial = prefix.split("/")
        if any(d in ("", ".", "..") for d in dirs):
            return Listing()  # no key we accept can start like that
        base = self.objects.joinpath(*[_enc_dir(d) for d in dirs])
        dir_prefix = "".join(d + "/" for d in dirs)
        objects: list[tuple[str, Path]] = []
        prefixes: set[str] = set()
        with self._errors("LIST", prefix):
            if delimiter == "/":
                # one directory is one level: no need to walk the subtree
                for kind, name, entry in self._scan(base):
                    if not name.startswith(partial):
                        continue
                    if kind == "obj":
                        if dir_prefix + name:
                            objects.append((dir_prefix + name, Path(entry.path)))
                    elif self._has_objects(Path(entry.path)):
                        prefixes.add(dir_prefix + name + "/")
            else:
                for key, path in self._walk(base, dir_prefix):
                    if not key.startswith(prefix):
                        continue
                    rest = key[len(prefix) :]
                    if delimiter and delimiter in rest:
                        prefixes.add(prefix + rest[: rest.index(delimiter) + len(delimiter)])
                    else:
                        objects.append((key, path))
            objects.sort(key=lambda item: _sort_key(item[0]))
            listing = Listing(prefixes=sorted(prefixes, key=_sort_key))
            for key, path in objects:
                meta = self.meta / path.relative_to(self.objects)
                info = self._describe(key, path, meta, with_meta=False)
                if info is not None:  # deleted while we listed
                    listing.objects.append(info)
        return listing

    def get_file(self, key: str, dest: Path) -> ObjectInfo:
        self._count("GET")
        with self._errors("GET", key):
            f, entry = self._open_consistent(key)
            with f, open(dest, "wb") as out:
                shutil.copyfileobj(f, out, CHUNK)
        return self._entry_info(key, entry, with_meta=True)

    def get_bytes(self, key: str) -> tuple[bytes, ObjectInfo]:
        self._count("GET")
        with self._errors("GET", key):
            f, entry = self._open_consistent(key)
            with f:
                data = f.read()
        return data, self._entry_info(key, entry, with_meta=True)

    def put_file(
        self,
        key: str,
        src: Path,
        metadata: Mapping[str, str],
        *,
        if_none_match: bool = False,
    ) -> ObjectInfo:
        self._count("PUT")
        with self._errors("PUT", key):
            self._rel(key)  # reject a bad key before copying anything
            with open(src, "rb") as f:
                tmp, size, etag = self._spool(f)
            return self._commit(key, tmp, size, etag, metadata, if_none_match)

    def put_bytes(
        self,
        key: str,
        data: bytes,
        metadata: Mapping[str, str],
        *,
        if_none_match: bool = False,
    ) -> ObjectInfo:
        self._count("PUT")
        with self._errors("PUT", key):
            self._rel(key)
            tmp = self._new_tmp()
            try:
                with open(tmp, "xb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            etag = hashlib.md5(data, usedforsecurity=False).hexdigest()
            return self._commit(key, tmp, len(data), etag, metadata, if_none_match)

    def copy(self, src_key: str, dst_key: str, metadata: Mapping[str, str], *,
             if_match: str | None = None) -> ObjectInfo:
        self._count("COPY")
        with self._errors("COPY", src_key):
            if src_key == dst_key:
                return self._replace_metadata(src_key, metadata, if_match)
            self._rel(dst_key)
            f, entry = self._open_consistent(src_key)
            with f:
                if if_match is not None and str(entry["etag"]) != if_match:
                    raise Changed(f"{self.name}: {src_key!r} is not the object expected "
                                  "(another writer replaced it)")
                tmp, size, etag = self._spool(f)
            return self._commit(dst_key, tmp, size, etag, metadata, False)

    def _replace_metadata(self, key: str, metadata: Mapping[str, str],
                          if_match: str | None = None) -> ObjectInfo:
        """Copy onto itself: only the sidecar entry changes (one atomic rename)."""
        data, meta = self._paths(key)
        with self._lock(key):
            f, entry = self._open_consistent(key)
            with f:
                ino = str(os.fstat(f.fileno()).st_ino)
            if if_match is not None and str(entry["etag"]) != if_match:
                raise Changed(f"{self.name}: {key!r} is not the object expected "
                              "(another writer replaced it)")
            entry = {
                **entry,
                "mtime": time.time(),
                "metadata": {str(k).lower(): str(v) for k, v in metadata.items()},
            }
            self._write_sidecar(meta, {ino: entry})
            self._fsync_dir(meta.parent)
        return self._entry_info(key, entry, with_meta=True)

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        self._count("DELETE")
        with self._errors("DELETE", key):
            data, meta = self._paths(key)
            with self._lock(key):
                if if_match is not None:
                    f, entry = self._open_consistent(key)  # NotFound if it is gone
                    f.close()
                    if str(entry["etag"]) != if_match:
                        raise Changed(f"{self.name}: {key!r} is not the object expected "
                                      "(another writer replaced it)")
                for path in (data, meta):
                    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                        path.unlink()
                self._prune(data.parent, self.objects)
                self._prune(meta.parent, self.meta)

    @staticmethod
    def _prune(path: Path, top: Path) -> None:
        """Remove directories left empty up to ``top`` (a writer recreates any it needs)."""
        while path != top and top in path.parents:
            try:
                path.rmdir()
            except OSError:
                return
            path = path.parent
