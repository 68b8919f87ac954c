"""What ``deltafs status`` shows about a mount (the root's ``user.deltafs.status``)."""
from __future__ import annotations

import gc
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from . import codec, membudget, memtrim

if TYPE_CHECKING:
    from .fs import DeltaFS

log = logging.getLogger(__name__)


def mount_status(fs: "DeltaFS") -> dict[str, Any]:
    files, nbytes = fs.journal.pending()
    # refreshed in a worker thread with the totals (a row and a stat per pending file
    # here held the loop ~100 ms while workers computed: each gives the GIL up)
    staged_at = fs.oldest_staged()
    oldest = max(0.0, time.time() - staged_at) if files and staged_at else 0.0
    fs.writeback.pending_failed()  # forgets failures of files gone since
    w = fs.writeback.state
    failed = ([{"key": k, "error": w.failed[i]} for i, k in w.failed_keys.items()]
              + [{"key": k, "error": e} for k, e in w.tomb_failed.items()])
    return {
        "pid": os.getpid(),
        "source": fs.source,
        "uptime": round(time.time() - fs.started, 1),
        "pending_files": files,
        "pending_bytes": nbytes,
        "oldest_pending_seconds": round(oldest, 1),
        # uploads running, plus reference checks due after deletes (umount waits for both)
        "uploading": len(fs.writeback._active) + fs.writeback.collects_due(),  # noqa: SLF001
        "uploaded_files": w.uploaded_files,
        "uploaded_bytes": w.uploaded_bytes,
        "cache_bytes": fs.cache.volume(),
        "cache_limit": fs.cache.size_limit,
        # opens and read-aheads that found their content in the cache, or rebuilt it
        "cache_hits": fs.contents.cache_hits,
        "cache_misses": fs.contents.cache_misses,
        # committed state, refreshed in the background at most every ~2 s
        "logical_bytes": fs.totals()[0],
        "stored_bytes": fs.totals()[1],
        "requests": fs.engine.store.stats(),
        # finished requests by type and outcome (ok, not_found, ...; S3 only, else None)
        "request_outcomes": _outcomes(fs.engine.store),
        # xdelta3 runs of this daemon and the seconds they took
        "codec": codec.stats.snapshot(),
        # changes that failed for good (a key the server refuses) or keep failing on a
        # bucket-wide cause (no bucket, refused credentials): umount does not wait for them
        "failed_files": len(failed),
        "failed": failed[:50],
        "last_error": w.last_error,
        # how late a 10 ms timer fired: anything blocking the event loop shows here
        "max_loop_stall_ms": round(fs.loop_stall.max_ms, 1),
        "recent_loop_stall_ms": round(fs.loop_stall.recent_ms(), 1),
        # S3 requests allowed inside botocore at once, narrowed while the loop lags
        # (gatecontrol.py); None: not an S3 store
        "s3_requests_at_once": _gate(fs),
        # the event loop thread's nice value, raised over the rest of the daemon so that
        # it waits less for a core (priority.py); None: not permitted (not root)
        "loop_thread_nice": fs.loop_nice,
        # garbage collections run from the loop by generation, and the longest (gcpace.py)
        # (and the automatic threshold the pacing leaves as a net for bursts)
        "garbage_collections": {"paced": list(fs.gc_pace.runs),
                                "worst_ms": round(fs.gc_pace.worst_ms, 1),
                                "auto_threshold": gc.get_threshold()[0]},
        # the --memory-limit and what the xdelta3 children hold under it
        # (and glibc's mmap threshold, pinned by the daemon: memtrim.py)
        "memory": {**membudget.current().status(), "mmap_threshold": memtrim.pinned},
        # files rebuilt ahead of a reader going through a directory in name order; the
        # objects of the file after next fetched meanwhile, and how many a rebuild used
        "read_ahead": {"started": fs.read_ahead.stats.started,
                       "failed": fs.read_ahead.stats.failed,
                       "objects_fetched": fs.read_ahead.stats.fetched,
                       "objects_used": fs.engine.prefetched.used},
        # the kernel's read-ahead window for this mount: its largest read request, bytes
        # (kernelra.py)
        "kernel_read_ahead": fs.kernel_read_ahead,
        "last_error_age": round(time.time() - w.last_error_at, 1) if w.last_error else None,
    }


def _outcomes(store: Any) -> dict[str, dict[str, int]] | None:
    outcomes = getattr(store, "request_outcomes", None)
    return outcomes() if outcomes is not None else None


def _gate(fs: "DeltaFS") -> dict[str, Any] | None:
    control = fs.gate_control  # set by the daemon for an S3 store
    if control is None:
        return None
    gate = control.gate
    return {"limit": gate.limit, "ceiling": gate.ceiling, "in_flight": gate.busy,
            "waited": gate.waited, "narrowed": control.narrowed,
            "adaptive": control.fixed is None}
