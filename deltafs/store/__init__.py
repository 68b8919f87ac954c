"""Object stores: the interface and its two implementations (S3 and a local directory)."""
from __future__ import annotations

import logging

from deltafs.store.base import Listing, ObjectInfo, ObjectStore
from deltafs.store.local import LocalStore
from deltafs.store.s3 import S3Store

log = logging.getLogger(__name__)

__all__ = ["ObjectStore", "ObjectInfo", "Listing", "S3Store", "LocalStore"]
