"""Prometheus metrics of a mount (issue 13): what ``deltafs status`` shows, for a fleet.

Two ways out, either or both:

- ``--metrics-port PORT`` serves the Prometheus text format over HTTP on
  ``--metrics-address`` (127.0.0.1 unless told otherwise), from a thread of its own;
- ``--metrics-textfile PATH`` writes the same exposition to ``PATH`` every interval,
  atomically (a temporary file in the same directory, renamed over it), for
  node_exporter's textfile collector. The file goes when the mount stops.

The rule of the daemon holds: the trio thread owns the filesystem's state, and no other
thread reads it. Every ``interval`` seconds the trio side builds a :class:`Snapshot`
from :func:`deltafs.status.mount_status` (the dict ``deltafs status`` shows) and swaps
it in; a scrape (the HTTP thread) and the text file writer (a worker thread) only turn
the latest snapshot, an immutable value, into text. A scrape never waits for the loop,
and a loop that stalls shows as an old ``deltafs_metrics_snapshot_timestamp_seconds``.

Every metric is listed in :data:`METRICS` (name, type, labels, help); docs/metrics.md
lists the same, and ``tests/test_metrics.py`` checks that the two agree.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

import trio
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .version import __version__
from .errors import ConfigError, DeltafsError

if TYPE_CHECKING:
    from .fs import DeltaFS

log = logging.getLogger(__name__)

#: seconds between two snapshots (and text file writes)
DEFAULT_INTERVAL = 2.0
#: exit code of a mount whose metrics cannot be served (port in use, text file unwritable)
EXIT_METRICS = 14
#: the outcome of requests a store does not classify (the local-directory store)
UNKNOWN = "unknown"


class MetricsError(DeltafsError):
    """The metrics cannot be served: the port is in use or refused, the address is not
    this host's, the text file cannot be written."""

    exit_code = EXIT_METRICS


# ------------------------------------------------------------------------- snapshot


@dataclass(frozen=True)
class Snapshot:
    """The numbers one scrape shows: taken on the trio thread, read by any thread."""

    source: str
    version: str
    taken_at: float  # time.time()
    start_time: float
    logical_bytes: int
    stored_bytes: int
    pending_files: int
    pending_bytes: int
    oldest_pending_seconds: float
    uploading: int
    uploaded_files: int
    uploaded_bytes: int
    failed_files: int
    #: (op, outcome, count), sorted
    requests: tuple[tuple[str, str, int], ...]
    cache_bytes: int
    cache_limit_bytes: int
    cache_hits: int
    cache_misses: int
    encodes: int
    encode_seconds: float
    decodes: int
    decode_seconds: float
    loop_stall_max_seconds: float
    loop_stall_recent_seconds: float
    s3_request_limit: int
    memory_limit_bytes: int
    memory_daemon_rss_bytes: int
    memory_codec_held_bytes: int
    memory_codec_children: int
    memory_codec_waiting: int
    memory_codec_waits: int
    memory_codec_wait_seconds: float
    read_ahead_started: int
    read_ahead_failed: int

    @classmethod
    def from_status(cls, status: Mapping[str, Any], *, version: str = __version__,
                    taken_at: float | None = None, started: float | None = None
                    ) -> "Snapshot":
        """From the dict of ``deltafs status`` (:func:`deltafs.status.mount_status`).
        Keys a status lacks count as 0, so an older daemon's status still converts.
        ``started``: the mount's start time, exact (else from the rounded uptime)."""
        now = time.time() if taken_at is None else taken_at
        outcomes = status.get("request_outcomes")
        if outcomes is not None:
            requests = tuple(sorted((str(op), str(outcome), int(n))
                                    for op, by in outcomes.items()
                                    for outcome, n in by.items()))
        else:  # a store that counts requests without telling how they ended
            requests = tuple(sorted((str(op), UNKNOWN, int(n))
                                    for op, n in (status.get("requests") or {}).items()))

        values: dict[str, float] = {}
        for name, (where, key, scale) in _FROM_STATUS.items():
            part = status if where is None else (status.get(where) or {})
            raw = part.get(key)
            value = float(raw) / scale if raw is not None else 0.0
            values[name] = int(value) if _INT_FIELDS.get(name) else value
        return cls(
            source=str(status.get("source", "")),
            version=version,
            taken_at=now,
            start_time=started if started is not None
            else now - float(status.get("uptime") or 0.0),
            requests=requests,
            **values,  # type: ignore[arg-type]
        )


#: Snapshot field -> (the status's sub-dict or None for the top level, its key, divisor);
#: a key a status lacks counts as 0
_FROM_STATUS: dict[str, tuple[str | None, str, float]] = {
    **{k: (None, k, 1.0) for k in (
        "logical_bytes", "stored_bytes", "pending_files", "pending_bytes",
        "oldest_pending_seconds", "uploading", "uploaded_files", "uploaded_bytes",
        "failed_files", "cache_bytes", "cache_hits", "cache_misses")},
    "cache_limit_bytes": (None, "cache_limit", 1.0),
    **{k: ("codec", k, 1.0) for k in ("encodes", "encode_seconds", "decodes",
                                      "decode_seconds")},
    "loop_stall_max_seconds": (None, "max_loop_stall_ms", 1000.0),
    "loop_stall_recent_seconds": (None, "recent_loop_stall_ms", 1000.0),
    "s3_request_limit": ("s3_requests_at_once", "limit", 1.0),
    **{f"memory_{k}": ("memory", k, 1.0) for k in (
        "codec_children", "codec_waiting", "codec_waits", "codec_wait_seconds")},
    "memory_limit_bytes": ("memory", "limit", 1.0),
    "memory_daemon_rss_bytes": ("memory", "daemon_rss", 1.0),
    "memory_codec_held_bytes": ("memory", "codec_held", 1.0),
    "read_ahead_started": ("read_ahead", "started", 1.0),
    "read_ahead_failed": ("read_ahead", "failed", 1.0),
}
#: which of them are whole numbers (from the dataclass's annotations)
_INT_FIELDS = {name: Snapshot.__annotations__[name] == "int" for name in _FROM_STATUS}


def take_snapshot(fs: "DeltaFS") -> Snapshot:
    """The mount's numbers now. On the trio thread only (it reads the filesystem)."""
    from .status import mount_status

    return Snapshot.from_status(mount_status(fs), started=fs.started)


# -------------------------------------------------------------------------- metrics

GAUGE = "gauge"
COUNTER = "counter"
INFO = "info"

#: what a metric's value function returns: one number, or (label values, number) pairs
Values = float | Iterable[tuple[tuple[str, ...], float]]


@dataclass(frozen=True)
class MetricSpec:
    """One metric as exposed: ``name`` in full (counters end in ``_total``, the info
    metric in ``_info``); ``labels`` besides ``source``, which every metric carries."""

    name: str
    type: str
    help: str
    value: Callable[[Snapshot], Values]
    labels: tuple[str, ...] = ()


def _requests(s: Snapshot) -> Values:
    return [((op, outcome), n) for op, outcome, n in s.requests]


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("deltafs_mount_info", INFO,
               "The mount: its source (s3://bucket[/prefix]) and the deltafs version; "
               "always 1.",
               lambda s: [((s.version,), 1)], ("version",)),
    MetricSpec("deltafs_start_time_seconds", GAUGE,
               "When the mount started, in seconds since the epoch.",
               lambda s: s.start_time),
    MetricSpec("deltafs_metrics_snapshot_timestamp_seconds", GAUGE,
               "When the daemon took the numbers shown, in seconds since the epoch (taken "
               "every couple of seconds; an old one means the event loop is stuck).",
               lambda s: s.taken_at),
    MetricSpec("deltafs_logical_bytes", GAUGE,
               "Bytes of all files in the mount as they read (committed state, refreshed "
               "every few seconds).",
               lambda s: s.logical_bytes),
    MetricSpec("deltafs_stored_bytes", GAUGE,
               "Bytes the bucket holds for them: objects, deltas and references.",
               lambda s: s.stored_bytes),
    MetricSpec("deltafs_pending_files", GAUGE,
               "Changes not yet in the bucket (files to upload, deletes to carry out).",
               lambda s: s.pending_files),
    MetricSpec("deltafs_pending_bytes", GAUGE,
               "Bytes of the files waiting to be uploaded.",
               lambda s: s.pending_bytes),
    MetricSpec("deltafs_oldest_pending_seconds", GAUGE,
               "Age of the oldest staged file still waiting to be uploaded (0 when none; "
               "looks at the first 200 pending changes).",
               lambda s: s.oldest_pending_seconds),
    MetricSpec("deltafs_uploading", GAUGE,
               "Uploads running, plus reference checks due after deletes (what umount "
               "waits for).",
               lambda s: s.uploading),
    MetricSpec("deltafs_uploaded_files_total", COUNTER,
               "Files uploaded since the mount started.",
               lambda s: s.uploaded_files),
    MetricSpec("deltafs_uploaded_bytes_total", COUNTER,
               "Bytes of the files uploaded since the mount started (their logical size).",
               lambda s: s.uploaded_bytes),
    MetricSpec("deltafs_failed_files", GAUGE,
               "Pending changes that failed for good (a key the server refuses) or keep "
               "failing on a bucket-wide cause; umount does not wait for them.",
               lambda s: s.failed_files),
    MetricSpec("deltafs_s3_requests_total", COUNTER,
               "Object store requests since the mount started, after the client's retries, "
               "by type (GET, PUT, HEAD, LIST, COPY, DELETE, MULTIPART) and outcome (ok, "
               "not_found, precondition_failed, throttled, client_error, server_error, "
               "network_error; unknown for a local-directory store).",
               _requests, ("op", "outcome")),
    MetricSpec("deltafs_cache_bytes", GAUGE,
               "Bytes the content cache holds on disk.",
               lambda s: s.cache_bytes),
    MetricSpec("deltafs_cache_limit_bytes", GAUGE,
               "The content cache's size limit (--cache-size).",
               lambda s: s.cache_limit_bytes),
    MetricSpec("deltafs_cache_hits_total", COUNTER,
               "Opens and read-aheads that found the file's content in the cache.",
               lambda s: s.cache_hits),
    MetricSpec("deltafs_cache_misses_total", COUNTER,
               "Opens and read-aheads that had to rebuild the content from the bucket "
               "(or wait for a rebuild already running).",
               lambda s: s.cache_misses),
    MetricSpec("deltafs_encodes_total", COUNTER,
               "xdelta3 encodes run (those given up as useless and those that failed "
               "included).",
               lambda s: s.encodes),
    MetricSpec("deltafs_encode_seconds_total", COUNTER,
               "Seconds the xdelta3 encodes ran (not counting waits for memory).",
               lambda s: s.encode_seconds),
    MetricSpec("deltafs_decodes_total", COUNTER,
               "xdelta3 decodes run (each attempt).",
               lambda s: s.decodes),
    MetricSpec("deltafs_decode_seconds_total", COUNTER,
               "Seconds the xdelta3 decodes ran, hashing and writing the output included "
               "(not counting waits for memory).",
               lambda s: s.decode_seconds),
    MetricSpec("deltafs_loop_stall_max_seconds", GAUGE,
               "The longest the event loop was held up since the mount started "
               "(deltafs status: max_loop_stall_ms).",
               lambda s: s.loop_stall_max_seconds),
    MetricSpec("deltafs_loop_stall_recent_seconds", GAUGE,
               "The longest the event loop was held up in the last 10 seconds "
               "(deltafs status: recent_loop_stall_ms).",
               lambda s: s.loop_stall_recent_seconds),
    MetricSpec("deltafs_s3_request_limit", GAUGE,
               "S3 requests allowed inside botocore at once, narrowed while the event "
               "loop lags (deltafs status: s3_requests_at_once; 0: not an S3 store).",
               lambda s: s.s3_request_limit),
    MetricSpec("deltafs_memory_limit_bytes", GAUGE,
               "The --memory-limit for the daemon and its xdelta3 children together "
               "(0: no limit).",
               lambda s: s.memory_limit_bytes),
    MetricSpec("deltafs_memory_daemon_rss_bytes", GAUGE,
               "The daemon's resident memory.",
               lambda s: s.memory_daemon_rss_bytes),
    MetricSpec("deltafs_memory_codec_held_bytes", GAUGE,
               "Memory held under the limit by the xdelta3 children running now (their "
               "predicted footprint).",
               lambda s: s.memory_codec_held_bytes),
    MetricSpec("deltafs_memory_codec_children", GAUGE,
               "xdelta3 children running now.",
               lambda s: s.memory_codec_children),
    MetricSpec("deltafs_memory_codec_waiting", GAUGE,
               "xdelta3 runs waiting for room under the memory limit now.",
               lambda s: s.memory_codec_waiting),
    MetricSpec("deltafs_memory_codec_waits_total", COUNTER,
               "xdelta3 runs that had to wait for room under the memory limit.",
               lambda s: s.memory_codec_waits),
    MetricSpec("deltafs_memory_codec_wait_seconds_total", COUNTER,
               "Seconds xdelta3 runs waited for room under the memory limit.",
               lambda s: s.memory_codec_wait_seconds),
    MetricSpec("deltafs_read_ahead_started_total", COUNTER,
               "Files rebuilt ahead of a reader going through a directory in name order.",
               lambda s: s.read_ahead_started),
    MetricSpec("deltafs_read_ahead_failed_total", COUNTER,
               "Read-aheads that failed (the open of that file tries again).",
               lambda s: s.read_ahead_failed),
)


def families(snap: Snapshot) -> Iterator[Metric]:
    """The metric families of ``snap``, in :data:`METRICS` order."""
    for spec in METRICS:
        labels = ["source", *spec.labels]
        family: Any
        if spec.type == INFO:
            family = InfoMetricFamily(spec.name.removesuffix("_info"), spec.help,
                                      labels=["source"])
            for values, _ in spec.value(snap):  # type: ignore[union-attr]
                family.add_metric([snap.source], dict(zip(spec.labels, values)))
            yield family
            continue
        cls = CounterMetricFamily if spec.type == COUNTER else GaugeMetricFamily
        family = cls(spec.name, spec.help, labels=labels)
        value = spec.value(snap)
        if isinstance(value, (int, float)):
            family.add_metric([snap.source], float(value))
        else:
            for values, n in value:
                family.add_metric([snap.source, *values], float(n))
        yield family


class SnapshotCollector(Collector):
    """A prometheus_client collector that shows the latest snapshot handed to it.
    :meth:`update` (trio thread) swaps the reference; :meth:`collect` (the HTTP thread)
    reads it once: both see a whole snapshot, never a mix."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def update(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        return list(families(self._snapshot))


def render(snap: Snapshot) -> bytes:
    """The Prometheus text exposition of ``snap``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snap))
    return generate_latest(registry)


# ---------------------------------------------------------------------- text file


def write_textfile(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: a reader (node_exporter) sees the old
    file or the new one, never half of one. The temporary file is in the same directory
    (so the rename stays on one filesystem) and ends in ``.tmp``, which node_exporter
    skips (it reads ``*.prom``). Readable by all (0644 less the umask): node_exporter
    usually runs as another user. Blocking: from a worker thread."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _remove_textfile(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("metrics: cannot remove %s: %s", path, exc.strerror)


# -------------------------------------------------------------------------- server


def check_port(port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"metrics port {port!r}: give a TCP port from 1 to 65535 "
                          "(0, any free port, would leave Prometheus nowhere to look)")


def _bind(address: str, port: int, registry: CollectorRegistry) -> Any:
    """Start prometheus_client's HTTP server thread on ``address:port``; a MetricsError
    that says why it cannot. Blocking (a name may need resolving): from a worker
    thread."""
    where = f"{address}:{port}"
    try:
        started = start_http_server(port, addr=address, registry=registry)
    except socket.gaierror as exc:
        raise MetricsError(f"metrics address {address!r}: {exc.strerror}") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise MetricsError(f"metrics port {where} is in use (another mount or program "
                               "listens there): choose another --metrics-port") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise MetricsError(f"metrics port {where}: not allowed to listen there "
                               "(ports below 1024 need root)") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise MetricsError(f"metrics address {address!r} is not an address of this "
                               "host") from None
        raise MetricsError(f"cannot serve metrics on {where}: "
                           f"{exc.strerror or exc}") from None
    return started[0]  # (server, thread); the thread is a daemon and ends with it


def _shutdown(httpd: Any) -> None:
    httpd.shutdown()  # waits for serve_forever to notice (at most its 0.5 s poll)
    httpd.server_close()


class MetricsExporter:
    """One mount's metrics: :meth:`start` (binds the port, writes the text file once,
    failing with :class:`MetricsError`), then :meth:`run` in the mount's nursery until it
    is cancelled, which stops the server and removes the text file."""

    def __init__(self, fs: "DeltaFS", *, port: int | None, address: str = "127.0.0.1",
                 textfile: str | None = None, interval: float = DEFAULT_INTERVAL,
                 snapshot: Callable[["DeltaFS"], Snapshot] = take_snapshot) -> None:
        if port is not None:
            check_port(port)
        if interval <= 0:
            raise ConfigError(f"metrics interval {interval!r}: must be positive")
        self.fs = fs
        self.port = port
        self.address = address
        self.textfile = os.path.abspath(textfile) if textfile else None
        self.interval = interval
        self._take = snapshot
        self.collector: SnapshotCollector | None = None
        self._httpd: Any = None
        self._file_failing = False
        self._snapshot_failing = False
        #: whether the text file is ours to remove (a start that failed on the port
        #: leaves a file someone else wrote there alone)
        self._wrote = False
        self._closed = False

    @property
    def bound(self) -> tuple[str, int] | None:
        """(address, port) the HTTP server listens on, once started."""
        if self._httpd is None:
            return None
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    async def start(self) -> None:
        """Take the first snapshot and open the outputs. A port in use, an address not
        this host's, an unwritable text file: MetricsError, and nothing left running."""
        self.collector = SnapshotCollector(self._take(self.fs))
        try:
            if self.port is not None:
                registry = CollectorRegistry(auto_describe=False)
                registry.register(self.collector)
                self._httpd = await trio.to_thread.run_sync(_bind, self.address, self.port,
                                                            registry)
                log.info("metrics: serving on http://%s:%d/metrics", self.address,
                         self.port)
            if self.textfile is not None:
                if not self.textfile.endswith(".prom"):
                    log.warning("metrics: node_exporter's textfile collector reads only "
                                "*.prom files, not %s", self.textfile)
                try:
                    await trio.to_thread.run_sync(_render_and_write, self.textfile,
                                                  self.collector.snapshot)
                except OSError as exc:
                    raise MetricsError(f"cannot write the metrics file {self.textfile}: "
                                       f"{exc.strerror or exc}") from None
                self._wrote = True
                log.info("metrics: writing %s every %.0f s", self.textfile, self.interval)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.aclose()
            raise

    async def run(self) -> None:
        """Refresh the snapshot (and the text file) every ``interval`` until cancelled;
        then stop serving. Failures are logged, never the mount's end."""
        try:
            while True:
                await trio.sleep(self.interval)
                await self.refresh()
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    async def refresh(self) -> None:
        assert self.collector is not None, "start() first"
        try:
            snap = self._take(self.fs)
        except Exception as exc:  # noqa: BLE001 - scrapes show the last good one
            if not self._snapshot_failing:
                log.warning("metrics: cannot take a snapshot (showing the last one): %r",
                            exc)
            self._snapshot_failing = True
            return
        self._snapshot_failing = False
        self.collector.update(snap)
        if self.textfile is None:
            return
        try:
            await trio.to_thread.run_sync(_render_and_write, self.textfile, snap)
        except OSError as exc:
            if not self._file_failing:
                log.warning("metrics: cannot write %s (will keep trying): %s",
                            self.textfile, exc.strerror or exc)
            self._file_failing = True
        else:
            if self._file_failing:
                log.info("metrics: %s written again", self.textfile)
            self._file_failing = False

    async def aclose(self) -> None:
        """Stop the HTTP server and remove the text file (once)."""
        if self._closed:
            return
        self._closed = True
        if self._httpd is not None:
            httpd, self._httpd = self._httpd, None
            await trio.to_thread.run_sync(_shutdown, httpd)
        if self.textfile is not None and self._wrote:
            await trio.to_thread.run_sync(_remove_textfile, self.textfile)


def _render_and_write(path: str, snap: Snapshot) -> None:
    write_textfile(path, render(snap))


async def start_metrics(fs: "DeltaFS", *, port: int | None, address: str = "127.0.0.1",
                        textfile: str | None = None, interval: float = DEFAULT_INTERVAL
                        ) -> MetricsExporter | None:
    """The daemon's entry point: ``None`` when neither ``port`` nor ``textfile`` is set;
    else a started exporter (a port in use raises :class:`MetricsError` now, so the
    mount fails to start), whose ``run`` goes into the mount's nursery."""
    if port is None and not textfile:
        return None
    exporter = MetricsExporter(fs, port=port, address=address, textfile=textfile,
                               interval=interval)
    await exporter.start()
    return exporter


__all__ = ["METRICS", "MetricSpec", "MetricsError", "MetricsExporter", "Snapshot",
           "SnapshotCollector", "start_metrics", "take_snapshot", "render",
           "write_textfile", "DEFAULT_INTERVAL", "EXIT_METRICS"]
