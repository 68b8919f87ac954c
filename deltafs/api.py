"""The Python API for scripts that do not mount: ``from deltafs import DeltaService``.

    svc = DeltaService(bucket="releases", endpoint_url="http://127.0.0.1:9000")
    summary = svc.put("dist/app-2.0.0.zip", "v2.0.0/")
    print(summary.kind, summary.original_size, summary.stored_size)
    svc.get("v2.0.0/app-2.0.0.zip", "/tmp/app.zip")

``local_dir=`` selects a local store instead of S3. A destination ending in ``/`` means
"into this prefix"; anything else is the key itself. ``sse=`` (``"AES256"`` or
``"aws:kms"``, with ``sse_kms_key_id=``) and ``storage_class=`` go on every object
written to S3 (:class:`deltafs.store.s3.S3Store` says which objects stay STANDARD).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from . import options, wiring
from .engine import Engine, Entry, PutResult, Stats
from .errors import UsageError
from .format import StoredFile, split_key
from .locations import Location
from .store.base import ObjectStore
from .wiring import default_cache_dir, make_engine  # noqa: F401  (the API's names)

log = logging.getLogger(__name__)

#: the cache bound when none is given (the options table's: the same for every command)
DEFAULT_CACHE_SIZE: int = options.BY_NAME["cache_size"].default


class DeltaService:
    """Delta-compressed storage of files in one bucket (or local store)."""

    def __init__(
        self,
        bucket: str | None = None,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        local_dir: str | os.PathLike[str] | None = None,
        create: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
        max_ratio: float = 0.75,
        min_delta_size: int = 64 << 10,
        level: int | None = None,
        format: str | None = None,
        store: ObjectStore | None = None,
        sse: str | None = None,
        sse_kms_key_id: str | None = None,
        storage_class: str | None = None,
    ) -> None:
        s3_settings = "=, ".join(name for name, value in (
            ("sse", sse), ("sse_kms_key_id", sse_kms_key_id),
            ("storage_class", storage_class)) if value is not None)
        if s3_settings and store is not None:
            raise UsageError(f"{s3_settings}= configure the S3 store DeltaService makes for"
                             " bucket=: with store=, give them to that store")
        if store is None:
            if (bucket is None) == (local_dir is None):
                raise UsageError("DeltaService needs exactly one of bucket= or local_dir=")
            if s3_settings and bucket is None:
                raise UsageError(f"{s3_settings}= are S3 settings: a local store"
                                 " (local_dir=) takes none")
            source = Location(bucket, None, "") if bucket is not None else \
                Location(None, Path(local_dir).absolute(), "")  # type: ignore[arg-type]
            store = wiring.open_store(source, {
                "endpoint_url": endpoint_url, "region": region, "profile": profile,
                "sse": sse, "sse_kms_key_id": sse_kms_key_id,
                "storage_class": storage_class}, create=create)
        self.store = store
        self.engine = wiring.engine(store, {
            "cache_dir": str(cache_dir) if cache_dir else None, "cache_size": cache_size,
            "max_ratio": max_ratio, "min_delta_size": min_delta_size, "level": level,
            "format": format})

    def put(self, path: str | os.PathLike[str], dest: str = "") -> PutResult:
        """Store the file ``path`` at ``dest`` (``"v2/"``: into that prefix, keeping the
        file's name; ``"v2/app.zip"``: as that key; ``""``: the bucket root)."""
        src = Path(path)
        if not src.is_file():
            raise UsageError(f"{src}: not a regular file")
        key = dest + src.name if (dest == "" or dest.endswith("/")) else dest
        return self.engine.put(src, key.lstrip("/"))

    def get(self, key: str, dest: str | os.PathLike[str] | None = None) -> Path:
        """Rebuild ``key`` (verified) into ``dest`` (a file, or an existing directory;
        default: the current directory). Returns the path written."""
        target = Path(dest) if dest is not None else Path(".")
        if target.is_dir() or str(dest).endswith("/"):
            target = target / split_key(key)[1]
        self.engine.get(key.lstrip("/"), target)
        return target

    def stat(self, key: str) -> StoredFile:
        return self.engine.stat(key.lstrip("/"))

    def list(self, prefix: str = "", recursive: bool = False) -> list[Entry]:
        return self.engine.list(prefix, recursive=recursive)

    def delete(self, key: str) -> None:
        self.engine.delete(key.lstrip("/"))

    def stats(self, prefix: str = "") -> Stats:
        return self.engine.stats(prefix)

    def verify(self, prefix: str = "") -> list[tuple[str, str | None]]:
        return self.engine.verify(prefix)
