"""An indexed ListObjectsV2 for the benchmark's moto server (opt-in).

moto answers every LIST page by copying and sorting the whole bucket: a 100,000-key
bucket costs ~0.6 s per 1,000-key page, 61 s for one listing of it, where S3 answers a
page in tens of milliseconds whatever the bucket holds. In the scale benchmark that cost
is the server's, not the client's, and it hides what a client does with the listing. With
``DELTAFS_BENCH_INDEXED_LIST=1`` the server keeps each bucket's key names sorted (rebuilt
only after a write, as one timsort of nearly sorted names) and answers a page by bisection:
O(page) per page, as S3 does. The answers are the same: the same keys, common prefixes,
truncation and continuation tokens as moto's own code gives (``tests`` of the benchmark
compare the two on random buckets).

Only ``list_objects_v2`` of unversioned buckets is replaced; everything else is moto's.
"""
from __future__ import annotations

import bisect
import hashlib
import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

_lock = threading.Lock()


def install() -> None:
    from moto.s3 import models, utils

    store = utils._VersionedKeyStore  # noqa: SLF001

    def mark(self: Any) -> None:
        self.__dict__["_bench_gen"] = self.__dict__.get("_bench_gen", 0) + 1

    def adding(orig: Any) -> Any:
        """``orig`` (a setter), marking the store changed when it adds a key."""
        def wrapped(self: Any, key: str, value: Any) -> Any:
            new = not dict.__contains__(self, key)
            out = orig(self, key, value)
            if new:
                mark(self)
            return out
        return wrapped

    def removing(orig: Any) -> Any:
        def wrapped(self: Any, key: str) -> Any:
            out = orig(self, key)
            mark(self)
            return out
        return wrapped

    store.__setitem__ = adding(store.__setitem__)
    store.setlist = adding(store.setlist)
    store.pop = removing(store.pop)
    store.__delitem__ = removing(dict.__delitem__)

    orig_v2 = models.S3Backend.list_objects_v2

    def names(keys: Any) -> list[str]:
        gen = keys.__dict__.get("_bench_gen", 0)
        cached = keys.__dict__.get("_bench_sorted")
        if cached is None or cached[0] != gen:
            with _lock:
                cached = (gen, sorted(dict.keys(keys)))
                keys.__dict__["_bench_sorted"] = cached
        return cached[1]

    def list_objects_v2(self: Any, bucket: Any, prefix: str | None, delimiter: str | None,
                        continuation_token: str | None, start_after: str | None,
                        max_keys: int) -> Any:
        if isinstance(bucket, models.FakeTableStorageBucket) or \
                getattr(bucket, "is_versioned", False) or max_keys == 0:
            return orig_v2(self, bucket, prefix, delimiter, continuation_token, start_after,
                           max_keys)
        prefix = prefix or ""
        after = (self._pagination_tokens.get(continuation_token)
                 if continuation_token else start_after) or ""
        sorted_names = names(bucket.keys)
        i = bisect.bisect_left(sorted_names, prefix)
        if after:
            i = max(i, bisect.bisect_right(sorted_names, after))
        out: list[Any] = []
        truncated = False
        while i < len(sorted_names):
            name = sorted_names[i]
            if not name.startswith(prefix):
                break
            rest = name[len(prefix):]
            cut = rest.find(delimiter) if delimiter else -1
            if cut >= 0:
                common = prefix + rest[:cut + len(delimiter)]  # type: ignore[operator]
                if after and common <= after:
                    # the page before ended inside this common prefix
                    i = bisect.bisect_left(sorted_names, common[:-1] + chr(ord(common[-1]) + 1))
                    continue
                if len(out) == max_keys:
                    truncated = True
                    break
                out.append(common)
                i = bisect.bisect_left(sorted_names, common[:-1] + chr(ord(common[-1]) + 1))
                continue
            key = bucket.keys.get(name)
            if key is None or isinstance(key, models.FakeDeleteMarker):
                i += 1
                continue
            if len(out) == max_keys:
                truncated = True
                break
            out.append(key)
            i += 1
        token = None
        if truncated:
            last = out[-1]
            last_name = last.name if isinstance(last, models.FakeKey) else last
            token = hashlib.md5(last_name.encode("utf-8")).hexdigest()  # noqa: S324 - moto's
            self._pagination_tokens[token] = last_name
        return out, truncated, token

    models.S3Backend.list_objects_v2 = list_objects_v2
    log.info("indexed ListObjectsV2 installed")
