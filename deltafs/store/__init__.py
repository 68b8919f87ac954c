"""Object stores: the interface and its two implementations (S3 and a local directory).

The implementations load on first use (``deltafs.store.S3Store`` imports boto3, which
takes ~0.3 s): a command on a local store, or the mount helper's option check, never
pays for it."""
from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from deltafs.store.base import Listing, ObjectInfo, ObjectStore

if TYPE_CHECKING:
    from deltafs.store.local import LocalStore
    from deltafs.store.s3 import S3Store

log = logging.getLogger(__name__)

_LAZY = {"S3Store": "deltafs.store.s3", "LocalStore": "deltafs.store.local"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deltafs.store' has no attribute {name!r}")


__all__ = ["ObjectStore", "ObjectInfo", "Listing", "S3Store", "LocalStore"]
