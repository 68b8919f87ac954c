"""Where a command points: ``s3://bucket/prefix/...`` or a path inside a local store.

A local store is a directory holding a ``.deltafs-store`` marker (``deltafs init DIR``
makes one); a plain path names the store found at or above it, and the rest of the path
is the key. ``DEST`` ending in ``/`` means "into this prefix"; the trailing slash is kept
so callers can tell.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import BucketNotFound, UsageError

log = logging.getLogger(__name__)

MARKER = ".deltafs-store"


@dataclass(frozen=True)
class Location:
    """A parsed location: the store it lives in and the key (or prefix) within it."""

    bucket: str | None  # S3 bucket, or None for a local store
    root: Path | None  # local store root, or None for S3
    key: str  # may be "" (the store's root) or end with "/" (a prefix)

    @property
    def is_s3(self) -> bool:
        return self.bucket is not None

    @property
    def is_prefix(self) -> bool:
        return self.key == "" or self.key.endswith("/")

    def child(self, name: str) -> "Location":
        return Location(self.bucket, self.root, self.key + name)

    def __str__(self) -> str:
        if self.bucket is not None:
            return f"s3://{self.bucket}/{self.key}"
        return str(self.root / self.key) if self.key else str(self.root)


def parse(text: str) -> Location:
    """Parse ``s3://bucket/key`` or a local-store path."""
    if text.startswith("s3://"):
        rest = text[5:]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise UsageError(f"'{text}': no bucket name (expected s3://BUCKET/PREFIX)")
        return Location(bucket, None, key)
    if "://" in text:
        raise UsageError(f"'{text}': only s3:// URLs and local store paths are supported")
    return _local(text)


def find_store_root(path: Path) -> Path | None:
    """The nearest directory at or above ``path`` holding the store marker."""
    for candidate in (path, *path.parents):
        if (candidate / MARKER).is_file():
            return candidate
    return None


def _local(text: str) -> Location:
    path = Path(os.path.abspath(text))
    root = find_store_root(path)
    if root is None:
        raise BucketNotFound(
            f"no deltafs store at or above {path} (create one with `deltafs init DIR`, "
            "or use an s3:// URL)"
        )
    key = path.relative_to(root).as_posix()
    key = "" if key == "." else key
    if text.endswith("/") and key:
        key += "/"
    return Location(None, root, key)
