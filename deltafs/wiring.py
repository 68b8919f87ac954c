"""The one place that turns settings into a store and an engine, for the commands, the
mount daemon and the Python API alike: the same setting means the same thing everywhere
(issue 13 found the cache size defaulting to 2G on one command and 10G on another)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

from . import options
from .cache import ContentCache
from .engine import Engine, Policy
from .errors import UsageError
from .locations import Location
from .store.base import ObjectStore

log = logging.getLogger(__name__)

#: the S3 settings every object write carries (see ``S3Store``)
OBJECT_SETTINGS = ("sse", "sse_kms_key_id", "storage_class")
#: the settings that make a store
STORE_SETTINGS = ("endpoint_url", "region", "profile", "credentials_file", *OBJECT_SETTINGS)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/deltafs`` (``~/.cache/deltafs``): references live here between
    runs, so a put or get of a delta does not download the reference again."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deltafs"


def open_store(source: Location, settings: Mapping[str, Any], *, create: bool = False,
               max_attempts: int | None = None,
               read_timeout: float | None = None) -> ObjectStore:
    """The store ``source`` names, with the settings of the options table (missing ones
    take their defaults). ``create``: a local store directory may be made."""
    if source.is_s3:
        from .store.s3 import S3Store

        profile = settings.get("profile")
        if settings.get("credentials_file"):
            from .config import use_credentials_file

            profile = use_credentials_file(settings["credentials_file"], profile)
        extra: dict[str, Any] = {k: settings[k] for k in OBJECT_SETTINGS
                                 if settings.get(k) is not None}
        if max_attempts is not None:
            extra["max_attempts"] = max_attempts
        if read_timeout is not None:
            extra["read_timeout"] = read_timeout
        assert source.bucket is not None
        return S3Store(source.bucket, endpoint_url=settings.get("endpoint_url"),
                       region=settings.get("region"), profile=profile, **extra)
    given = [k for k in OBJECT_SETTINGS if settings.get(k) is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: S3 settings, and {source.root} is a local "
                         "store (it takes none)")
    from .store.local import LocalStore

    assert source.root is not None
    return LocalStore(source.root, create=create)


def policy(settings: Mapping[str, Any]) -> Policy:
    s = options.effective(settings, "cli")
    return Policy.create(s["min_delta_size"], s["max_ratio"], s["level"], s["format"])


def make_engine(store: ObjectStore, cache_dir: Path | None = None,
                cache_size: int = options.BY_NAME["cache_size"].default,
                policy: Policy = Policy()) -> Engine:
    cache_dir = cache_dir or default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    cache = ContentCache(cache_dir / "content", size_limit=cache_size)
    return Engine(store, cache, cache_dir / "tmp", policy)


def engine(store: ObjectStore, settings: Mapping[str, Any],
           cache_dir: Path | None = None) -> Engine:
    """An engine over ``store`` with the settings' cache and policy (``cache_dir``, when
    given, wins over the setting: a mount keeps its content below its own directory)."""
    s = options.effective(settings, "cli")
    where = cache_dir or (Path(s["cache_dir"]) if s.get("cache_dir") else None)
    return make_engine(store, where, s["cache_size"], policy(s))
