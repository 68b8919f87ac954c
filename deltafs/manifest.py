"""Per-directory listing manifests: what a HEAD of each object would say, in one GET.

A delta's true size, mode, owner, mtime and SHA-256 live only in its S3 user metadata,
so a fresh mount would need one HEAD per file to list a directory. A manifest
(``<dir prefix>.deltafs-manifest``) stores those answers beside the objects. It is a
cache, never the authority: an entry is used only for an object whose ETag *and* object
size in the LIST are the ones the entry was made from; anything else is HEADed as before.
So a manifest that is stale, damaged, hostile, copied from another directory or written
by another version can cost requests, never correctness: every doubt means "not used".

One change the check cannot see: a metadata-only rewrite (``chmod``/``utimes`` are
in-place copies) keeps the content, so the object size and, for a single-part object,
the ETag (the MD5 of the content). Whoever rewrites an object's metadata must rewrite or
delete its directory's manifest. (A mount's own listing refresh has the same blind spot:
it HEADs only objects whose ETag changed.)

Body: gzip of UTF-8 JSON lines. The first line is a header
(``{"format": "deltafs-manifest", "version": 1, "dir": ..., "writer": ...,
"written_at": ..., "count": N}``), then one compact object per entry with short keys
(:data:`_WIRE`, written by :func:`_line`). Lines are split on the byte ``\\n`` only:
JSON escapes every control character, so no name can break a line (``str.splitlines``
would split on U+2028 and ``\\x85``, which JSON leaves as they are: never use it here).

Versioning: readers dispatch on the header's ``version`` (:data:`_READERS`). A later
version that changes the entries adds a reader and keeps this one, so it still reads v1
manifests; this reader ignores any version it does not know, and keys it does not know
(in the header and in entries), so additions that old readers may skip need no new
version.
"""
from __future__ import annotations

import bisect
import json
import logging
import os
import re
import stat
import time
import zlib
from array import array
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .format import (
    DELTA_SUFFIX,
    FORM_KEY,
    MANIFEST_NAME,
    NOTE_ZERO_DIFF,
    MAX_KEY_BYTES,
    REFERENCE_NAME,
    Attrs,
    Kind,
    StoredFile,
    classify,
    meta_get,
    split_key,
)

log = logging.getLogger(__name__)

FORMAT_NAME = "deltafs-manifest"
FORMAT_VERSION = 1
#: Decompressed bytes a manifest may have (~1.5 million typical entries): a small
#: hostile body must not make a mount inflate gigabytes.
MAX_DECOMPRESSED = 512 * 1024 * 1024
#: Entries a manifest may have. With the byte cap, this bounds the CPU a hostile but
#: well-formed body can cost (a few seconds); a directory this large is HEADed instead.
MAX_ENTRIES = 2_000_000
#: Longest line accepted. A real entry line stays below ~20 KiB (a 1,024-byte name,
#: reference key and ETag, every byte escaped as \u00XX); this stops a line without
#: newlines from growing a buffer until the cap.
MAX_LINE = 64 * 1024
COMPRESS_LEVEL = 6
_INFLATE_CHUNK = 1024 * 1024
_ENCODE_BATCH = 4096

_SURROGATE = re.compile(r"[\ud800-\udfff]")  # cannot be UTF-8: no S3 key holds one
_INT64 = 2**63
_ID_MAX = 2**32 - 1

#: Entry field -> key on the wire.
_WIRE = {
    "name": "n", "etag": "e", "object_size": "o", "kind": "k", "size": "s", "mode": "m",
    "uid": "u", "gid": "g", "mtime_ns": "t", "sha256": "h", "ref_key": "r",
    "ref_sha256": "rh", "symlink": "l", "form": "f",
}
#: ``form`` values: how a delta is stored, when not a plain delta (``deltafs stats``)
FORMS = ("zero-diff", "gzip")


def manifest_key(dir_prefix: str) -> str:
    """The manifest's object key for a directory (``""`` for the root, else ends in "/")."""
    _check_dir(dir_prefix)
    return dir_prefix + MANIFEST_NAME


def _check_dir(dir_prefix: str) -> None:
    if not isinstance(dir_prefix, str) or (dir_prefix and not dir_prefix.endswith("/")):
        raise ValueError(f"{dir_prefix!r} is not a directory prefix ('' or ending in '/')")


def _is_delta_name(name: str) -> bool:
    """The rule ``format.classify`` uses: the name alone decides delta or not."""
    return name.endswith(DELTA_SUFFIX) and len(name) > len(DELTA_SUFFIX)


def _is_int(value: object) -> bool:
    return type(value) is int  # JSON true/false are bools, which are ints to Python


# ----------------------------------------------------------------------------- entries


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """What a HEAD of one object in the directory said, and which version of it.

    Construction checks every field (``ValueError``): an entry exists only if
    :func:`metadata_of` can reproduce, through ``format.classify``, exactly the
    ``StoredFile`` it stands for. ``mode``, ``uid``, ``gid`` and ``mtime_ns`` are
    ``None`` when the object has no ``deltafs-*`` metadata for them (written by
    DeltaGlider or another tool): the mount's defaults apply then, as after a HEAD.
    """

    name: str  # object key relative to the directory: "app.zip.delta", "notes.txt"
    etag: str
    object_size: int
    kind: str  # "delta" or "direct" (a direct entry without sha256 is a foreign object)
    size: int  # the true file size (a direct object's is its object size)
    mode: int | None  # full st_mode, S_IFREG or S_IFLNK
    uid: int | None
    gid: int | None
    mtime_ns: int | None
    sha256: str | None
    ref_key: str | None  # bucket-relative key of a delta's reference
    symlink: bool = False
    ref_sha256: str | None = None  # needed to rebuild a delta without a HEAD
    form: str | None = None  # "zero-diff" (seeded the reference), "gzip" (extension)

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem is not None:
            raise ValueError(f"{self.name!r}: {problem}")


def _problem(e: ManifestEntry) -> str | None:
    """Why ``e`` cannot stand for a HEAD answer, or ``None`` when it can.

    Runs once per entry a manifest holds, so it is written for speed (``type(x) is int``
    keeps JSON's ``true`` out of integer fields)."""
    name = e.name
    if type(name) is not str or not name:
        return "name is not a non-empty string"
    if "/" in name:
        return "name contains '/'"
    if name == REFERENCE_NAME or name == MANIFEST_NAME:
        return "name is reserved"
    if not _s3_key_text(name):
        return "name is not UTF-8 text of at most 1,024 bytes"
    etag = e.etag
    if type(etag) is not str or not etag or len(etag) > 1024:
        return "etag is not a non-empty string"
    object_size, size, kind = e.object_size, e.size, e.kind
    if type(object_size) is not int or object_size < 0:
        return "object_size is not a non-negative integer"
    if kind == "delta":
        if not _is_delta_name(name):
            return "kind 'delta' for a name without '.delta'"
    elif kind == "direct":
        if _is_delta_name(name):
            return "kind 'direct' for a '.delta' name"
    else:
        return "kind is neither 'delta' nor 'direct'"
    if type(size) is not int or size < 0:
        return "size is not a non-negative integer"
    if kind == "direct" and size != object_size:
        return "a direct object's size is its object size"
    mode = e.mode
    if mode is not None and (type(mode) is not int or mode & ~0o7777 not in _FILE_TYPES):
        return "mode is not a regular file's or a symlink's st_mode"
    uid, gid, mtime_ns = e.uid, e.gid, e.mtime_ns
    if uid is not None and (type(uid) is not int or not 0 <= uid <= _ID_MAX):
        return "uid is not a 32-bit id"
    if gid is not None and (type(gid) is not int or not 0 <= gid <= _ID_MAX):
        return "gid is not a 32-bit id"
    if mtime_ns is not None and (type(mtime_ns) is not int or not -_INT64 <= mtime_ns < _INT64):
        return "mtime_ns is not a 64-bit integer"
    if e.sha256 is not None and not _is_sha256(e.sha256):
        return "sha256 is not 64 hex digits"
    if e.ref_sha256 is not None and not _is_sha256(e.ref_sha256):
        return "ref_sha256 is not 64 hex digits"
    if e.form is not None and (e.form not in FORMS or e.kind != "delta"):
        return "form is not one a delta has"
    ref = e.ref_key
    if ref is not None and (type(ref) is not str or not ref or ref.startswith("/")
                            or not _s3_key_text(ref)):
        return "ref_key is not a bucket-relative key"
    if type(e.symlink) is not bool:
        return "symlink is not a boolean"
    if e.symlink != (mode is not None and stat.S_ISLNK(mode)):
        return "symlink disagrees with mode"
    return None


_FILE_TYPES = (stat.S_IFREG, stat.S_IFLNK)  # the only types format.Attrs gives back
_HEX_DIGITS = "0123456789abcdefABCDEF"


def _is_sha256(value: object) -> bool:
    return type(value) is str and len(value) == 64 and not value.strip(_HEX_DIGITS)


def _s3_key_text(text: str) -> bool:
    """UTF-8-encodable (no lone surrogate) and no longer than an S3 key."""
    if text.isascii():
        return len(text) <= MAX_KEY_BYTES
    return not _SURROGATE.search(text) and len(text.encode("utf-8")) <= MAX_KEY_BYTES


def _form(stored: StoredFile) -> str | None:
    if stored.kind is not Kind.DELTA or stored.metadata is None:
        return None
    if stored.metadata.get(FORM_KEY) == "gzip":
        return "gzip"
    if meta_get(stored.metadata, "note") == NOTE_ZERO_DIFF:
        return "zero-diff"
    return None


def metadata_of(entry: ManifestEntry) -> dict[str, str]:
    """The user metadata a HEAD would have returned, as far as ``format`` reads it.

    Spelled as ``format`` writes it, so ``classify(key, object_size, etag, mtime,
    metadata_of(entry))`` has the entry's kind, size, sha256, ref_key, ref_sha256 and
    attrs. It is *not* the object's full metadata (``dg-tool``, ``dg-note``,
    ``dg-created-at``... are missing): the result is a :class:`ManifestMetadata`, so code
    about to copy an object's metadata can tell it must HEAD first.
    """
    meta = ManifestMetadata(
        Attrs(mode=entry.mode, uid=entry.uid, gid=entry.gid, mtime_ns=entry.mtime_ns)
        .to_metadata())
    if entry.sha256 is not None:  # without it, a direct object classifies as foreign
        meta["dg-file-sha256"] = entry.sha256
    if entry.kind == "delta" or entry.sha256 is not None:
        meta["dg-file-size"] = str(entry.size)
    if entry.ref_key is not None:
        meta["dg-ref-key"] = entry.ref_key
    if entry.ref_sha256 is not None:
        meta["dg-ref-sha256"] = entry.ref_sha256
    if entry.form == "zero-diff":
        meta["dg-note"] = NOTE_ZERO_DIFF
    elif entry.form == "gzip":
        meta[FORM_KEY] = "gzip"
    return meta


class ManifestMetadata(dict[str, str]):
    """Metadata rebuilt from a manifest entry, not read from the object: enough for every
    ``StoredFile`` property, too little to write back to S3 (a server-side copy with it
    would drop the object's other ``dg-*`` fields)."""


def from_manifest(stored: StoredFile) -> bool:
    """Whether ``stored``'s metadata came from a manifest (see :class:`ManifestMetadata`)."""
    return isinstance(stored.metadata, ManifestMetadata)


def stored_from(dir_prefix: str, entries: Mapping[str, ManifestEntry], key: str,
                size: int, etag: str, mtime: float) -> StoredFile | None:
    """The ``StoredFile`` a HEAD of the listed object ``key`` would give, if the manifest
    has an entry for exactly this version of it (same ETag and object size); else
    ``None`` and the caller HEADs."""
    if not key.startswith(dir_prefix):
        return None
    entry = entries.get(key[len(dir_prefix):])
    if entry is None or entry.etag != etag or entry.object_size != size:
        return None
    return classify(key, size, etag, mtime, metadata_of(entry))


def entry_of(stored: StoredFile) -> ManifestEntry | None:
    """The manifest entry for a file whose metadata is known (from a HEAD, a PUT or a
    copy); ``None`` when there is nothing to cache: markers, references, a listing-only
    ``StoredFile``, a delta without ``dg-file-size``, or metadata a manifest cannot
    reproduce exactly (e.g. a malformed SHA-256: that object keeps being HEADed)."""
    if stored.metadata is None or stored.kind not in (Kind.DELTA, Kind.DIRECT, Kind.FOREIGN):
        return None
    size = stored.size
    if size is None:
        return None
    attrs = stored.attrs
    try:
        return ManifestEntry(
            name=split_key(stored.object_key)[1],
            etag=stored.etag,
            object_size=stored.object_size,
            kind="delta" if stored.kind is Kind.DELTA else "direct",
            size=size,
            mode=attrs.mode,
            uid=attrs.uid,
            gid=attrs.gid,
            mtime_ns=attrs.mtime_ns,
            sha256=stored.sha256,
            ref_key=stored.ref_key,
            symlink=attrs.is_symlink,
            ref_sha256=stored.ref_sha256,
            form=_form(stored),
        )
    except ValueError as exc:
        log.debug("not in the manifest: %s: %s", stored.object_key, exc)
        return None


# ------------------------------------------------------------------------------ encode

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_quote = json.encoder.encode_basestring  # C: quotes and escapes like json.dumps


def _line(e: ManifestEntry) -> str:
    """An entry as its compact JSON object: short keys, ``None`` and ``False`` left out.

    Built by hand, ~3x faster than a dict through ``json``: every free-form string goes
    through JSON's own escaping, and the rest is already checked by the constructor
    (ints are ints, ``kind`` is one of two words, hashes are hex)."""
    s = (f'{{"n":{_quote(e.name)},"e":{_quote(e.etag)},"o":{e.object_size},'
         f'"k":"{e.kind}","s":{e.size}')
    if e.mode is not None:
        s += f',"m":{e.mode}'
    if e.uid is not None:
        s += f',"u":{e.uid}'
    if e.gid is not None:
        s += f',"g":{e.gid}'
    if e.mtime_ns is not None:
        s += f',"t":{e.mtime_ns}'
    if e.sha256 is not None:
        s += f',"h":"{e.sha256}"'
    if e.ref_key is not None:
        s += f',"r":{_quote(e.ref_key)}'
    if e.ref_sha256 is not None:
        s += f',"rh":"{e.ref_sha256}"'
    if e.symlink:
        s += ',"l":true'
    if e.form is not None:
        s += f',"f":"{e.form}"'
    return s + "}"


def encode(dir_prefix: str, entries: Iterable[ManifestEntry], writer: str) -> bytes:
    """The manifest body for ``dir_prefix``: gzip-compressed JSON lines, header first.

    ``writer`` says who wrote it (e.g. ``deltafs/0.1.0 host pid``), for humans. Two
    entries with one name are a caller's bug (``ValueError``): a reader could not know
    which to believe.
    """
    with Encoder(dir_prefix, writer) as enc:
        for e in entries:
            enc.add(e)
        return enc.finish()


class Encoder:
    """Builds a manifest from entries given one at a time, holding only their encoded
    lines (spooled to a temporary file past a few MB): a 100,000-entry directory must not
    cost the daemon a list of 100,000 rows and entries at once (issue 11: RSS)."""

    def __init__(self, dir_prefix: str, writer: str, spool_dir: str | None = None,
                 unique_names: bool = False) -> None:
        """``unique_names``: the caller guarantees no name comes twice (rows of one
        directory in the journal, unique by ``(parent, name)``), so the set that checks
        it is not kept: ~10 MB for 100,000 names, every time the manifest of a directory
        being filled is rewritten."""
        import tempfile

        _check_dir(dir_prefix)
        self.dir_prefix = dir_prefix
        self.writer = str(writer)
        self.count = 0
        self.total = 0
        self._names: set[str] | None = None if unique_names else set()
        self._pending: list[str] = []
        self._spool = tempfile.SpooledTemporaryFile(max_size=1 << 20, dir=spool_dir)

    def __enter__(self) -> "Encoder":
        return self

    def __exit__(self, *exc: object) -> None:
        self._spool.close()

    def add(self, e: ManifestEntry) -> None:
        if self._names is not None:
            if e.name in self._names:
                raise ValueError("two manifest entries with the same name")
            self._names.add(e.name)
        self.count += 1
        if self.count > MAX_ENTRIES:
            raise ValueError(f"{self.count} entries: readers refuse more than {MAX_ENTRIES}")
        self._pending.append(_line(e))
        if len(self._pending) >= _ENCODE_BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._pending.append("")
            raw = "\n".join(self._pending).encode("utf-8")
            self._pending = []
            self.total += len(raw)
            if self.total > MAX_DECOMPRESSED:
                raise ValueError(f"{self.total} bytes: readers refuse more than "
                                 f"{MAX_DECOMPRESSED}")
            self._spool.write(raw)

    def finish(self) -> bytes:
        out: list[bytes] = []
        self._compress(out.append)
        return b"".join(out)

    def finish_file(self, path: str) -> int:
        """The body written to ``path`` instead of returned (a 100,000-entry manifest is
        a few MB the daemon need not hold); returns its size."""
        with open(path, "wb") as f:
            self._compress(f.write)
            return f.tell()

    def _compress(self, write: Callable[[bytes], object]) -> None:
        self._flush()
        header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "dir": self.dir_prefix,
                  "writer": self.writer, "written_at": time.time(), "count": self.count}
        comp = zlib.compressobj(COMPRESS_LEVEL, zlib.DEFLATED, 31)  # gzip wrapper, CRC-32
        raw = _ENCODER.encode(header).encode("utf-8") + b"\n"
        if self.total + len(raw) > MAX_DECOMPRESSED:
            raise ValueError(f"{self.total + len(raw)} bytes: readers refuse more than "
                             f"{MAX_DECOMPRESSED}")
        write(comp.compress(raw))
        self._spool.seek(0)
        while chunk := self._spool.read(1 << 20):
            write(comp.compress(chunk))
        write(comp.flush())


# ------------------------------------------------------------------------------ decode


class _Unusable(Exception):
    """The whole manifest is not to be used; the message says why (one log line)."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _inflate(body: bytes, limit: int) -> Iterator[bytes]:
    """The decompressed body, in chunks, never more than ``limit`` bytes in all; checks
    the gzip trailer (CRC-32 and length) and that nothing follows it."""
    if not body:
        raise _Unusable("empty body")
    if not body.startswith(b"\x1f\x8b"):
        raise _Unusable("not gzip data")
    d = zlib.decompressobj(wbits=31)
    data = body
    total = 0
    try:
        while not d.eof:
            chunk = d.decompress(data, _INFLATE_CHUNK)
            stuck = not chunk and len(d.unconsumed_tail) == len(data)
            data = d.unconsumed_tail
            total += len(chunk)
            if total > limit:
                raise _Unusable(f"inflates to more than {limit} bytes")
            if chunk:
                yield chunk
            elif stuck:  # input used up (or no progress): truncated, reported below
                break
    except zlib.error as exc:
        raise _Unusable(f"damaged gzip data ({exc})") from None
    if not d.eof:
        raise _Unusable("truncated (the gzip stream does not end)")
    if d.unused_data:
        raise _Unusable("bytes after the end of the gzip stream")


def _verify(body: bytes, limit: int) -> int:
    """First pass: the body's integrity and inflated size, before any parsing (a bomb or
    a damaged body costs one inflate, no memory); returns how many lines it has."""
    return sum(chunk.count(b"\n") for chunk in _inflate(body, limit))


def _lines(body: bytes, limit: int) -> Iterator[bytes]:
    """Split the inflated body on ``\\n`` as it streams; every line must end with one."""
    rest = b""
    for chunk in _inflate(body, limit):
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        if len(rest) > MAX_LINE or (parts and max(map(len, parts)) > MAX_LINE):
            raise _Unusable(f"a line longer than {MAX_LINE} bytes")
        yield from parts
    if rest:
        raise _Unusable("the last line does not end")


def _json(line: bytes, number: int) -> dict[str, Any]:
    try:
        value = _DECODER.decode(line.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _Unusable(f"line {number} is not UTF-8 JSON ({exc})") from None
    if not isinstance(value, dict):
        raise _Unusable(f"line {number} is not a JSON object")
    return value


def _check_header_v1(header: dict[str, Any], line_count: int) -> None:
    count = header.get("count")
    if not _is_int(count) or count < 0:
        raise _Unusable("header 'count' is not a non-negative integer")
    if count > MAX_ENTRIES:
        raise _Unusable(f"{count} entries, more than {MAX_ENTRIES}")
    if line_count != count + 1:
        raise _Unusable(f"{line_count - 1} entry lines where the header says {count}")
    if not isinstance(header.get("writer"), str):
        raise _Unusable("header 'writer' is not a string")
    written_at = header.get("written_at")
    if not isinstance(written_at, (int, float)) or isinstance(written_at, bool):
        raise _Unusable("header 'written_at' is not a number")


def _entry_v1(obj: dict[str, Any], shared: dict[str, str] | None = None) -> ManifestEntry:
    """One version 1 entry line, parsed (``KeyError``/``ValueError``/``TypeError``)."""
    kind, ref_key, ref_sha256 = obj.get("k"), obj.get("r"), obj.get("rh")
    if shared is not None:
        if isinstance(kind, str):
            kind = shared.setdefault(kind, kind)
        if isinstance(ref_key, str):
            ref_key = shared.setdefault(ref_key, ref_key)
        if isinstance(ref_sha256, str):
            ref_sha256 = shared.setdefault(ref_sha256, ref_sha256)
    get = obj.get
    return ManifestEntry(  # positional, in field order: measurably faster
        obj["n"], obj["e"], obj["o"], kind, obj["s"], get("m"), get("u"),
        get("g"), get("t"), get("h"), ref_key, get("l", False), ref_sha256,
        get("f"))


def _valid_v1(dir_prefix: str, header: dict[str, Any], lines: Iterator[bytes],
              line_count: int, shared: dict[str, str] | None,
              seen: Container[str] | None = None
              ) -> Iterator[tuple[ManifestEntry, bytes]]:
    """The valid entries of a version 1 manifest with their lines, in file order;
    invalid ones (and, with ``seen``, a name already in it) are skipped and logged once
    (at the end)."""
    _check_header_v1(header, line_count)
    skipped = 0
    first_skip = ""
    for number, line in enumerate(lines, start=2):  # as many as counted: _verify saw them
        obj = _json(line, number)
        try:
            entry = _entry_v1(obj, shared)
            if seen is not None and entry.name in seen:
                raise ValueError(f"{entry.name!r}: a second entry with this name")
        except (KeyError, ValueError, TypeError) as exc:
            why = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            skipped += 1
            first_skip = first_skip or f"line {number}: {why}"
            continue
        yield entry, line
    if skipped:
        log.warning("listing manifest %s: skipped %d invalid entr%s (first: %s)",
                    manifest_key(dir_prefix), skipped, "y" if skipped == 1 else "ies",
                    first_skip[:300])


def _read_v1(dir_prefix: str, header: dict[str, Any], lines: Iterator[bytes],
             line_count: int) -> dict[str, ManifestEntry]:
    """Entries of a version 1 manifest; invalid ones are skipped and logged once, and of
    two entries with one name the first is kept."""
    entries: dict[str, ManifestEntry] = {}
    shared: dict[str, str] = {}  # one string per reference key and hash, not one per delta
    for entry, _ in _valid_v1(dir_prefix, header, lines, line_count, shared, entries):
        entries[entry.name] = entry
    return entries


class Indexed(Mapping[str, ManifestEntry]):
    """A decoded manifest that keeps its entries on disk: their lines in an unnamed
    spool file, and in memory a sorted array of (hash of the name, offset, length),
    20 bytes per entry. A 100,000-entry directory's manifest cost the daemon 55 MB as a
    dict of entries (issue 11: RSS); this costs 2 MB. Lookups read and parse one line
    (a worker thread's job: listings run in worker threads). Of two entries with one
    name the first is kept, as :func:`decode` does."""

    def __init__(self, spool: Any, hashes: array, offsets: array, lengths: array) -> None:
        self._spool = spool
        self._fd = spool.fileno()
        self._hashes, self._offsets, self._lengths = hashes, offsets, lengths

    def _at(self, i: int) -> ManifestEntry:
        line = os.pread(self._fd, self._lengths[i], self._offsets[i])
        return _entry_v1(_json(line, 0))

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        h = hash(name)
        i = bisect.bisect_left(self._hashes, h)
        while i < len(self._hashes) and self._hashes[i] == h:
            try:
                entry = self._at(i)  # sorted by (hash, offset): the first of a name first
            except (OSError, ValueError, KeyError, TypeError, _Unusable):
                return default  # the spool went away (closed): the caller HEADs
            if entry.name == name:
                return entry
            i += 1
        return default

    def __getitem__(self, name: str) -> ManifestEntry:
        entry = self.get(name)
        if entry is None:
            raise KeyError(name)
        return entry  # type: ignore[no-any-return]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self._hashes)):
            yield self._at(i).name

    def __len__(self) -> int:
        return len(self._hashes)  # exact: drop_repeats left one entry per name

    def __bool__(self) -> bool:
        return len(self._hashes) > 0

    def close(self) -> None:
        self._spool.close()

    def drop_repeats(self, key: str) -> None:
        """Of two entries with one name keep the first, as :func:`decode` does (and
        warn once). Names with one hash are next to each other: rare, and cheap."""
        h, keep, dropped = self._hashes, [], []
        for i in range(len(h)):
            if i and h[i] == h[i - 1]:
                name = self._at(i).name
                j = i - 1
                while j >= 0 and h[j] == h[i] and self._at(j).name != name:
                    j -= 1
                if j >= 0 and h[j] == h[i]:
                    dropped.append(name)
                    continue
            keep.append(i)
        if dropped:
            self._hashes = array("q", (h[i] for i in keep))
            self._offsets = array("q", (self._offsets[i] for i in keep))
            self._lengths = array("i", (self._lengths[i] for i in keep))
            log.warning("listing manifest %s: skipped %d invalid entr%s (first: %r: a "
                        "second entry with this name)", key, len(dropped),
                        "y" if len(dropped) == 1 else "ies", dropped[0][:200])


def decode_indexed(dir_prefix: str, body: bytes, spool_dir: str | None = None, *,
                   limit: int = MAX_DECOMPRESSED) -> Indexed | None:
    """:func:`decode`, with the entries kept on disk (:class:`Indexed`) instead of in
    memory. Every check :func:`decode` makes is made (the body, the header, each entry);
    ``None`` and one warning when the manifest must not be used."""
    import tempfile

    key = manifest_key(dir_prefix)
    spool = tempfile.TemporaryFile(dir=spool_dir)
    try:
        line_count = _verify(body, limit)
        lines = _lines(body, limit)
        header = _header(dir_prefix, lines)
        if header.get("version") != 1:
            raise _Unusable(f"format version {header.get('version')!r}: no indexed reader")
        hashes, offsets, lengths = array("q"), array("q"), array("i")
        at = 0
        for entry, line in _valid_v1(dir_prefix, header, lines, line_count, None):
            spool.write(line)
            hashes.append(hash(entry.name))
            offsets.append(at)
            lengths.append(len(line))
            at += len(line)
        spool.flush()
        order = sorted(range(len(hashes)), key=lambda i: (hashes[i], offsets[i]))
        index = Indexed(spool, array("q", (hashes[i] for i in order)),
                        array("q", (offsets[i] for i in order)),
                        array("i", (lengths[i] for i in order)))
        index.drop_repeats(key)
        return index
    except _Unusable as exc:
        spool.close()
        log.warning("ignoring listing manifest %s: %s", key, str(exc)[:300])
        return None
    except BaseException:
        spool.close()
        raise


#: version -> reader. A later version adds its reader here and keeps the older ones.
_READERS: dict[int, Callable[[str, dict[str, Any], Iterator[bytes], int],
                             dict[str, ManifestEntry]]] = {1: _read_v1}


def _header(dir_prefix: str, lines: Iterator[bytes]) -> dict[str, Any]:
    """The header line: ours, of a version this code reads, for this directory."""
    first = next(lines, None)
    if first is None:
        raise _Unusable("no header line")
    try:
        header = _json(first, 1)
    except _Unusable:
        raise _Unusable("no manifest header (an older version or another tool)") from None
    if header.get("format") != FORMAT_NAME:
        raise _Unusable("no manifest header (an older version or another tool)")
    version = header.get("version")
    if not _is_int(version) or version not in _READERS:
        raise _Unusable(f"format version {version!r}, this reader knows "
                        f"{sorted(_READERS)}")
    if header.get("dir") != dir_prefix:
        raise _Unusable(f"written for directory {header.get('dir')!r} "
                        "(copied or moved from there)")
    return header


def decode(dir_prefix: str, body: bytes, *, limit: int = MAX_DECOMPRESSED
           ) -> dict[str, ManifestEntry] | None:
    """Name -> entry from a manifest body read at ``manifest_key(dir_prefix)``.

    ``None`` (and one warning saying why) when the body must not be used at all:
    damaged, truncated, too big once inflated (``limit``), written for another directory
    (a copied or moved manifest), without our header (an older version or another
    tool), or of a version this code does not read. Entries with invalid fields are
    skipped, the others kept.
    """
    key = manifest_key(dir_prefix)
    try:
        line_count = _verify(body, limit)
        lines = _lines(body, limit)
        header = _header(dir_prefix, lines)
        return _READERS[header["version"]](dir_prefix, header, lines, line_count)
    except _Unusable as exc:
        log.warning("ignoring listing manifest %s: %s", key, str(exc)[:300])
        return None
