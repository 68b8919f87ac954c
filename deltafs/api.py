"""The Python API for scripts that do not mount: ``from deltafs import DeltaService``.

    svc = DeltaService(bucket="releases", endpoint_url="http://127.0.0.1:9000")
    summary = svc.put("dist/app-2.0.0.zip", "v2.0.0/")
    print(summary.kind, summary.original_size, summary.stored_size)
    svc.get("v2.0.0/app-2.0.0.zip", "/tmp/app.zip")

``local_dir=`` selects a local store instead of S3. A destination ending in ``/`` means
"into this prefix"; anything else is the key itself.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .cache import ContentCache
from .engine import Engine, Entry, Policy, PutResult, Stats
from .errors import UsageError
from .format import StoredFile, split_key
from .store.base import ObjectStore

log = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 2 << 30


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/deltafs`` (``~/.cache/deltafs``): references live here between
    runs, so a put or get of a delta does not download the reference again."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deltafs"


def make_engine(store: ObjectStore, cache_dir: Path | None = None,
                cache_size: int = DEFAULT_CACHE_SIZE, policy: Policy = Policy()) -> Engine:
    cache_dir = cache_dir or default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    cache = ContentCache(cache_dir / "content", size_limit=cache_size)
    return Engine(store, cache, cache_dir / "tmp", policy)


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
    ) -> None:
        if store is None:
            if (bucket is None) == (local_dir is None):
                raise UsageError("DeltaService needs exactly one of bucket= or local_dir=")
            if bucket is not None:
                from .store.s3 import S3Store

                store = S3Store(bucket, endpoint_url=endpoint_url, region=region,
                                profile=profile)
            else:
                from .store.local import LocalStore

                store = LocalStore(Path(local_dir), create=create)  # type: ignore[arg-type]
        self.store = store
        policy = Policy.create(min_delta_size, max_ratio, level, format)
        self.engine = make_engine(store, Path(cache_dir) if cache_dir else None, cache_size,
                                  policy)

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
