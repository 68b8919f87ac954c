"""The object-store interface every layer above talks to.

Stores are synchronous and thread-safe: the engine calls them from worker threads, never
from the trio loop. Keys are plain strings without a leading slash, exactly as in S3.
Errors are always subclasses of :class:`deltafs.errors.StoreError`, so callers never see
botocore or OSError types leak through.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or a HEAD tells about one object.

    ``metadata`` is ``None`` when it is unknown (a listing does not carry user metadata);
    a HEAD or a GET always fills it (possibly with an empty dict).
    """

    key: str
    size: int
    etag: str
    mtime: float  # last-modified, seconds since the epoch
    metadata: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Listing:
    """One level of a delimiter listing: the objects directly under a prefix and the
    sub-prefixes (each ending in the delimiter)."""

    objects: list[ObjectInfo] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)


class ObjectStore(abc.ABC):
    """A flat key space with per-object string metadata (S3 semantics)."""

    #: a short human name for messages and logs, e.g. ``s3://bucket`` or ``/srv/store``
    name: str

    @abc.abstractmethod
    def check(self) -> None:
        """Fail fast with a clear StoreError if the store is unusable (missing bucket,
        bad credentials, unreachable endpoint, unwritable directory)."""

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Size, ETag, mtime and metadata of ``key``; ``None`` if it does not exist."""

    @abc.abstractmethod
    def list(self, prefix: str, delimiter: str | None = "/") -> Listing:
        """Everything under ``prefix``: with a delimiter, one level (objects and
        sub-prefixes); without, every key below, recursively. Pagination is handled
        inside; results are sorted by key (UTF-8 byte order, as S3 does)."""

    def iter_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object below ``prefix`` recursively; may stream page by page."""
        yield from self.list(prefix, delimiter=None).objects

    def iter_pages(self, prefix: str) -> Iterator[Listing]:
        """One level under ``prefix`` (objects and sub-prefixes), a LIST page at a time:
        a directory of any size is processed in bounded memory."""
        yield self.list(prefix)

    def iter_level(self, prefix: str) -> Iterator[ObjectInfo]:
        """The objects directly under ``prefix`` (one level), page by page: a caller
        that stops early pays only for the pages it read."""
        for page in self.iter_pages(prefix):
            yield from page.objects

    @abc.abstractmethod
    def get_file(self, key: str, dest: Path) -> ObjectInfo:
        """Stream ``key`` into the file ``dest`` (created or truncated) without holding
        the object in memory; returns the object's info including metadata."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> tuple[bytes, ObjectInfo]:
        """A small object whole, with its info (for tiny objects only)."""

    @abc.abstractmethod
    def put_file(
        self,
        key: str,
        src: Path,
        metadata: Mapping[str, str],
        *,
        if_none_match: bool = False,
    ) -> ObjectInfo:
        """Upload the file ``src`` as ``key`` (multipart above a threshold).

        With ``if_none_match`` the put succeeds only if ``key`` does not exist yet and
        raises :class:`deltafs.errors.AlreadyExists` otherwise (atomic create).
        """

    @abc.abstractmethod
    def put_bytes(
        self,
        key: str,
        data: bytes,
        metadata: Mapping[str, str],
        *,
        if_none_match: bool = False,
    ) -> ObjectInfo:
        """Upload a small in-memory body (directory markers, symlinks, tiny deltas)."""

    @abc.abstractmethod
    def copy(self, src_key: str, dst_key: str, metadata: Mapping[str, str], *,
             if_match: str | None = None) -> ObjectInfo:
        """Server-side copy with the metadata replaced (also used to change metadata in
        place with ``src_key == dst_key``). With ``if_match`` the source must still have
        that ETag, else :class:`deltafs.errors.Changed` (another writer replaced it)."""

    @abc.abstractmethod
    def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Remove ``key``; deleting a missing key is not an error. With ``if_match`` only
        the object with that ETag is removed: another one raises
        :class:`deltafs.errors.Changed`, a missing one :class:`deltafs.errors.NotFound`."""

    def delete_many(self, keys: list[str]) -> None:
        """Remove several keys (batched where the store can)."""
        for key in keys:
            self.delete(key)

    def stats(self) -> dict[str, int]:
        """Request counts by operation, for ``deltafs status`` and tests."""
        return {}
