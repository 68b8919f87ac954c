"""DeltaGlider's bucket format: keys and metadata, in both directions.

We write the spelling both DeltaGlider implementations read (``dg-<dashed>``) and read
every spelling they ever wrote (``dg-``, ``dg_``, bare underscored, bare dashed). The
POSIX attributes that DeltaGlider has no notion of live under ``deltafs-*`` keys, which
DeltaGlider ignores.
"""
from __future__ import annotations

import enum
import logging
import stat
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Mapping

from .version import __version__
from .errors import InvalidName, ReservedName

log = logging.getLogger(__name__)

REFERENCE_NAME = "reference.bin"
DELTA_SUFFIX = ".delta"
#: a directory's listing manifest (deltafs.manifest); the one definition of the name
MANIFEST_NAME = ".deltafs-manifest"
TOOL = f"deltafs/{__version__}"
NOTE_REFERENCE = "reference"
NOTE_ZERO_DIFF = "zero-diff (reference identical)"
NOTE_DELTA = "delta"
MAX_KEY_BYTES = 1024
MAX_NAME_BYTES = 255
#: S3 refuses user metadata above 2 KB in total (keys + values).
MAX_METADATA_BYTES = 2048


class Kind(str, enum.Enum):
    """How one logical file is stored."""

    REFERENCE = "reference"  # reference.bin itself (never a logical file)
    DELTA = "delta"
    DIRECT = "direct"
    FOREIGN = "foreign"  # an object no DeltaGlider-format writer made
    MARKER = "marker"  # a zero-byte "dir/" key


def meta_get(metadata: Mapping[str, str] | None, field: str) -> str | None:
    """Read ``field`` (given underscored, e.g. ``file_sha256``) in any spelling ever written.

    Order: ``dg-file-sha256``, ``dg_file_sha256``, ``file_sha256``, ``file-sha256``.
    S3 lowercases metadata keys; the local store keeps them as written, so both are tried.
    """
    if not metadata:
        return None
    dashed = field.replace("_", "-")
    for key in (f"dg-{dashed}", f"dg_{field}", field, dashed):
        value = metadata.get(key)
        if value is None:
            value = metadata.get(key.lower())
        if value not in (None, ""):
            return value
    return None


def utc_now_iso() -> str:
    """``2026-11-25T14:25:43.064633Z``: the spelling DeltaGlider writes and parses."""
    return datetime.now(timezone.utc).replace(tzinfo=None).isoformat() + "Z"


# ---------------------------------------------------------------------------- keys


def split_key(key: str) -> tuple[str, str]:
    """``"a/b/c.zip"`` -> ``("a/b", "c.zip")``; the bucket root is the deltaspace ``""``."""
    head, _, name = key.rpartition("/")
    return head, name


def join_key(deltaspace: str, name: str) -> str:
    return f"{deltaspace}/{name}" if deltaspace else name


def reference_key(deltaspace: str) -> str:
    return join_key(deltaspace, REFERENCE_NAME)


def delta_key(logical_key: str) -> str:
    return logical_key + DELTA_SUFFIX


def is_reserved_name(name: str) -> bool:
    """Names that would break a deltaspace if stored as files."""
    return name == REFERENCE_NAME or name.endswith(DELTA_SUFFIX)


def check_logical_key(key: str) -> None:
    """Refuse logical keys the format or S3 cannot hold, with a message saying why."""
    if not key or key.endswith("/"):
        raise InvalidName(f"'{key}' is not a file name (empty, or ends with '/')")
    parts = key.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidName(f"'{key}': empty, '.' and '..' path components are not allowed")
        if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise InvalidName(f"'{key}': a name component is longer than {MAX_NAME_BYTES} bytes")
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidName(f"{key!r} is not valid UTF-8, which S3 keys must be") from None
    if len(encoded) + len(DELTA_SUFFIX) > MAX_KEY_BYTES:
        raise InvalidName(f"'{key[:60]}…' is too long for an S3 key (1,024 bytes)")
    name = parts[-1]
    if name == REFERENCE_NAME:
        raise ReservedName(
            f"'{key}': the name 'reference.bin' is reserved by the bucket format "
            "(it holds the deltaspace's reference)"
        )
    if name.endswith(DELTA_SUFFIX):
        raise ReservedName(
            f"'{key}': names ending in '.delta' are reserved by the bucket format "
            "(they hold deltas); rename the file"
        )
    if ".deltafs" in parts:
        raise ReservedName(
            f"'{key}': the name '.deltafs' is reserved (it holds a directory's chain "
            "blobs)"
        )
    if name == MANIFEST_NAME:
        raise ReservedName(
            f"'{key}': the name '{MANIFEST_NAME}' is reserved (it holds a mount's listing "
            "manifest of the directory)"
        )


# ------------------------------------------------------------------------ attributes


@dataclass(frozen=True)
class Attrs:
    """POSIX attributes deltafs keeps beside DeltaGlider's metadata."""

    mode: int | None = None  # full st_mode including the file type bits
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None

    @property
    def is_symlink(self) -> bool:
        return self.mode is not None and stat.S_ISLNK(self.mode)

    def to_metadata(self) -> dict[str, str]:
        meta: dict[str, str] = {}
        if self.mode is not None:
            meta["deltafs-mode"] = format(stat.S_IMODE(self.mode), "o")
            if stat.S_ISLNK(self.mode):
                meta["deltafs-type"] = "symlink"
        if self.uid is not None:
            meta["deltafs-uid"] = str(self.uid)
        if self.gid is not None:
            meta["deltafs-gid"] = str(self.gid)
        if self.mtime_ns is not None:
            meta["deltafs-mtime-ns"] = str(self.mtime_ns)
        return meta

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str] | None) -> "Attrs":
        if not metadata:
            return cls()

        def num(key: str, base: int = 10) -> int | None:
            value = metadata.get(key)
            if value is None:
                return None
            try:
                return int(value, base)
            except ValueError:
                log.warning("ignoring malformed metadata %s=%r", key, value)
                return None

        mode = num("deltafs-mode", 8)
        if mode is not None:
            kind = stat.S_IFLNK if metadata.get("deltafs-type") == "symlink" else stat.S_IFREG
            mode = kind | stat.S_IMODE(mode)
        return cls(mode=mode, uid=num("deltafs-uid"), gid=num("deltafs-gid"),
                   mtime_ns=num("deltafs-mtime-ns"))

    def merged(self, other: "Attrs") -> "Attrs":
        """``other``'s set fields win."""
        return replace(
            self,
            **{k: v for k, v in other.__dict__.items() if v is not None},
        )


# -------------------------------------------------------------------------- metadata


#: on a reference: its directory is in deltafs's format (extension objects allowed)
FORMAT_KEY = "deltafs-format"
FORMAT_DELTAFS = "deltafs"
#: on an extension delta: which extension form its body is
FORM_KEY = "deltafs-form"


def reference_metadata(source_name: str, sha256: str, extended: bool = False
                       ) -> dict[str, str]:
    meta = {
        "dg-tool": TOOL,
        "dg-source-name": _meta_safe(source_name),
        "dg-file-sha256": sha256,
        "dg-created-at": utc_now_iso(),
        "dg-note": NOTE_REFERENCE,
    }
    if extended:
        meta[FORMAT_KEY] = FORMAT_DELTAFS
    return meta


def delta_metadata(
    *,
    name: str,
    sha256: str,
    size: int,
    ref_key: str,
    ref_sha256: str,
    delta_size: int,
    delta_cmd: str,
    zero_diff: bool,
    attrs: Attrs = Attrs(),
) -> dict[str, str]:
    meta = {
        "dg-tool": TOOL,
        "dg-original-name": _meta_safe(name),
        "dg-file-sha256": sha256,
        "dg-file-size": str(size),
        "dg-created-at": utc_now_iso(),
        "dg-ref-key": ref_key,  # dropped below when not ASCII
        "dg-ref-path": split_key(ref_key)[1],
        "dg-ref-sha256": ref_sha256,
        "dg-delta-size": str(delta_size),
        "dg-delta-cmd": delta_cmd,
        "dg-note": NOTE_ZERO_DIFF if zero_diff else NOTE_DELTA,
    }
    if not ref_key.isascii():
        # S3 metadata is ASCII; readers fall back to dg-ref-path (relative to the delta's
        # own directory). Python DeltaGlider needs dg-ref-key, so it cannot read deltas
        # in directories with non-ASCII names (it cannot write them either).
        del meta["dg-ref-key"]
    meta.update(attrs.to_metadata())
    return _fit(meta)


def direct_metadata(*, name: str, sha256: str, size: int, attrs: Attrs = Attrs()) -> dict[str, str]:
    meta = {
        "dg-tool": TOOL,
        "dg-original-name": _meta_safe(name),
        "dg-file-sha256": sha256,
        "dg-file-size": str(size),
        "dg-created-at": utc_now_iso(),
        "dg-compression": "none",
    }
    meta.update(attrs.to_metadata())
    return _fit(meta)


def _meta_safe(value: str) -> str:
    """S3 metadata travels as HTTP headers: ASCII only. Non-ASCII names are kept
    percent-encoded (the key already carries the real name; this field is informational)."""
    if value.isascii() and value.isprintable():
        return value
    from urllib.parse import quote

    return quote(value, safe="/ ")


def _fit(meta: dict[str, str]) -> dict[str, str]:
    """Drop informational fields if the metadata would pass S3's 2 KB limit."""
    def size() -> int:
        return sum(len(k) + len(v) for k, v in meta.items())

    for optional in ("dg-delta-cmd", "dg-original-name"):
        if size() <= MAX_METADATA_BYTES:
            break
        meta.pop(optional, None)
    return meta


# --------------------------------------------------------------------- stored files


@dataclass(frozen=True)
class StoredFile:
    """One logical file as the bucket holds it (from a key and, when known, metadata)."""

    logical_key: str
    object_key: str
    kind: Kind
    object_size: int
    etag: str
    mtime: float
    metadata: Mapping[str, str] | None = None

    @property
    def name(self) -> str:
        return split_key(self.logical_key)[1]

    @property
    def sha256(self) -> str | None:
        return meta_get(self.metadata, "file_sha256")

    @property
    def size(self) -> int | None:
        """The true file size; ``None`` when a delta's metadata is not known yet."""
        if self.kind is Kind.DELTA:
            value = meta_get(self.metadata, "file_size")
            if value is None:
                return None
            try:
                return int(value)
            except ValueError:
                return None
        return self.object_size

    @property
    def ref_key(self) -> str | None:
        """Bucket-relative key of the reference a delta was encoded against."""
        full = meta_get(self.metadata, "ref_key")
        if full:
            return full.lstrip("/")
        rel = meta_get(self.metadata, "ref_path")
        if rel:
            return join_key(split_key(self.object_key)[0], rel)
        return None

    @property
    def ref_sha256(self) -> str | None:
        return meta_get(self.metadata, "ref_sha256")

    @property
    def attrs(self) -> Attrs:
        return Attrs.from_metadata(self.metadata)

    @property
    def mtime_ns(self) -> int:
        """The file's mtime: ours if we wrote it, else the object's last-modified."""
        attrs = self.attrs
        if attrs.mtime_ns is not None:
            return attrs.mtime_ns
        return int(self.mtime * 1e9)


def classify(key: str, size: int, etag: str, mtime: float,
             metadata: Mapping[str, str] | None = None) -> StoredFile | None:
    """What the object ``key`` is, as a logical file; ``None`` for reference.bin.

    Whether a plain key is ``direct`` or ``foreign`` needs its metadata; without it the
    key is reported ``direct`` (its object size is its file size either way).
    """
    deltaspace, name = split_key(key)
    if name == REFERENCE_NAME:
        return None
    if key.endswith("/"):
        return StoredFile(key, key, Kind.MARKER, size, etag, mtime, metadata)
    if name.endswith(DELTA_SUFFIX) and len(name) > len(DELTA_SUFFIX):
        logical = key[: -len(DELTA_SUFFIX)]
        return StoredFile(logical, key, Kind.DELTA, size, etag, mtime, metadata)
    kind = Kind.DIRECT
    if metadata is not None and meta_get(metadata, "file_sha256") is None:
        kind = Kind.FOREIGN
    return StoredFile(key, key, kind, size, etag, mtime, metadata)


def is_zstd(head: bytes) -> bool:
    """zstd's magic. Unlike gzip, bzip2 and xz streams, zstd's (at its usual levels)
    keep unchanged input as unchanged output, so two versions delta well byte for byte
    (two botocore tars as `zstd -3`: 3.8 % of the file; bzip2 -9: 99.8 %; xz -6: 68 %)."""
    return head.startswith(b"\x28\xb5\x2f\xfd")


def is_compressed_stream(head: bytes) -> bool:
    """gzip, bzip2, xz or zstd magic: such a file never becomes a reference (a reader that
    decodes without ``-D`` would decompress it) and gains nothing from a byte delta."""
    return (
        head.startswith(b"\x1f\x8b")
        or head.startswith(b"BZh")
        or head.startswith(b"\xfd7zXZ\x00")
        or head.startswith(b"\x28\xb5\x2f\xfd")
    )
