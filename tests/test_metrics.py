"""The Prometheus exporter (deltafs/metrics.py, docs/metrics.md).

Unit level: the snapshot from a status dict, the exposition of every documented metric
(docs and code must agree), the text file writer, the HTTP server on a free port, a port
in use, the refresh loop and its clean stop; the counters behind the metrics (the S3
store's request outcomes, the codec's seconds). Mount level: ``deltafs mount
--metrics-port`` (and ``--metrics-textfile``) with files copied in, scraped and parsed.
"""
from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
import socket
import stat
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from helpers import free_port
from mountfixtures import Mount, deltafs_exe, in_mount_table, release_versions

from deltafs import codec, metrics
from deltafs.errors import ConfigError, DeltafsError, Unreachable
from deltafs.metrics import (
    COUNTER,
    INFO,
    METRICS,
    MetricsError,
    MetricsExporter,
    Snapshot,
    render,
    start_metrics,
    write_textfile,
)
from deltafs.store import S3Store

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"

#: a status as ``deltafs status`` shows it, every number distinct
STATUS: dict[str, Any] = {
    "pid": 4242,
    "source": "s3://fleet/releases",
    "uptime": 120.0,
    "pending_files": 3,
    "pending_bytes": 3000,
    "oldest_pending_seconds": 4.5,
    "uploading": 2,
    "uploaded_files": 17,
    "uploaded_bytes": 170_000,
    "cache_bytes": 5_000_000,
    "cache_limit": 10 << 30,
    "cache_hits": 40,
    "cache_misses": 9,
    "logical_bytes": 8_000_000,
    "stored_bytes": 900_000,
    "requests": {"PUT": 20, "HEAD": 7, "GET": 4},
    "request_outcomes": {"PUT": {"ok": 19, "precondition_failed": 1},
                         "HEAD": {"ok": 2, "not_found": 5}, "GET": {"ok": 4}},
    "codec": {"encodes": 12, "encode_seconds": 3.25, "decodes": 6, "decode_seconds": 0.5},
    "failed_files": 1,
    "failed": [{"key": "x", "error": "refused"}],
    "last_error": "refused",
    "max_loop_stall_ms": 87.5,
    "recent_loop_stall_ms": 12.5,
    "s3_requests_at_once": {"limit": 12, "ceiling": 40, "in_flight": 3, "waited": 8,
                            "narrowed": 2},
    "memory": {"limit": 144 << 20, "daemon_rss": 60 << 20, "codec_held": 30 << 20,
               "codec_children": 2, "codec_waiting": 1, "codec_peak_held": 50 << 20,
               "codec_waits": 3, "codec_wait_seconds": 1.75, "codec_alone": 0,
               "mmap_threshold": 1 << 20},
    "read_ahead": {"started": 11, "failed": 2},
    "last_error_age": 3.0,
}

#: metric -> value the STATUS above must give (source label only)
EXPECTED = {
    "deltafs_logical_bytes": 8_000_000,
    "deltafs_stored_bytes": 900_000,
    "deltafs_pending_files": 3,
    "deltafs_pending_bytes": 3000,
    "deltafs_oldest_pending_seconds": 4.5,
    "deltafs_uploading": 2,
    "deltafs_uploaded_files_total": 17,
    "deltafs_uploaded_bytes_total": 170_000,
    "deltafs_failed_files": 1,
    "deltafs_cache_bytes": 5_000_000,
    "deltafs_cache_limit_bytes": 10 << 30,
    "deltafs_cache_hits_total": 40,
    "deltafs_cache_misses_total": 9,
    "deltafs_encodes_total": 12,
    "deltafs_encode_seconds_total": 3.25,
    "deltafs_decodes_total": 6,
    "deltafs_decode_seconds_total": 0.5,
    "deltafs_loop_stall_max_seconds": 0.0875,
    "deltafs_loop_stall_recent_seconds": 0.0125,
    "deltafs_s3_request_limit": 12,
    "deltafs_memory_limit_bytes": 144 << 20,
    "deltafs_memory_daemon_rss_bytes": 60 << 20,
    "deltafs_memory_codec_held_bytes": 30 << 20,
    "deltafs_memory_codec_children": 2,
    "deltafs_memory_codec_waiting": 1,
    "deltafs_memory_codec_waits_total": 3,
    "deltafs_memory_codec_wait_seconds_total": 1.75,
    "deltafs_read_ahead_started_total": 11,
    "deltafs_read_ahead_failed_total": 2,
    "deltafs_start_time_seconds": 1_000_000.0 - 120.0,
    "deltafs_metrics_snapshot_timestamp_seconds": 1_000_000.0,
}


def documented() -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (type, labels) from the table of docs/metrics.md."""
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\|\s*`(deltafs_\w+)`\s*\|\s*(\w+)\s*\|([^|]*)\|", line)
        if m:
            name, kind, labels = m.groups()
            assert name not in out, f"{name} documented twice"
            out[name] = (kind, tuple(re.findall(r"`(\w+)`", labels)))
    return out


def parse(text: str) -> dict[str, Any]:
    """Exposition -> {"types": {name: type}, "helps": {...}, "samples": {name: [(labels,
    value)]}}, names as exposed (counters with their ``_total``)."""
    types: dict[str, str] = {}
    helps: dict[str, str] = {}
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        types[name] = fam.type
        helps[name] = fam.documentation
        samples.setdefault(name, [])
        for s in fam.samples:
            samples.setdefault(s.name, []).append((dict(s.labels), s.value))
    return {"types": types, "helps": helps, "samples": samples}


def value(parsed: dict[str, Any], name: str, **labels: str) -> float:
    found = [v for lab, v in parsed["samples"].get(name, [])
             if all(lab.get(k) == want for k, want in labels.items())]
    assert len(found) == 1, (name, labels, parsed["samples"].get(name))
    return float(found[0])


def exposed_type(spec_type: str) -> str:
    # the Prometheus text format has no info type: an info metric is a gauge of 1
    return "gauge" if spec_type == INFO else spec_type


def check_every_metric(parsed: dict[str, Any], source: str) -> None:
    """Every documented metric is exposed, with its type, a help text, and samples that
    carry the documented labels (and the mount's source)."""
    docs = documented()
    assert set(parsed["types"]) == set(docs), (
        f"exposed but not documented: {sorted(set(parsed['types']) - set(docs))}; "
        f"documented but not exposed: {sorted(set(docs) - set(parsed['types']))}")
    for name, (kind, labels) in docs.items():
        assert parsed["types"][name] == exposed_type(kind), name
        assert parsed["helps"][name].strip(), f"{name} has no help text"
        for lab, _ in parsed["samples"][name]:
            assert set(lab) == set(labels), (name, lab, labels)
            # (a mount shows its source as deltafs status does: s3://bucket/)
            assert lab["source"].rstrip("/") == source.rstrip("/")


def scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return str(r.read().decode())


def scrape_openmetrics(port: int) -> list[Any]:
    """What Prometheus itself asks for (it prefers OpenMetrics)."""
    from prometheus_client.openmetrics.parser import (
        text_string_to_metric_families as openmetrics_families,
    )

    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                 headers={"Accept": "application/openmetrics-text"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        return list(openmetrics_families(r.read().decode()))


def refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


# --------------------------------------------------------------------- docs and code


def test_docs_and_code_list_the_same_metrics() -> None:
    """docs/metrics.md's table and METRICS: same names, types and labels (a metric
    added to one and not the other fails here)."""
    docs = documented()
    code = {m.name: (m.type, ("source", *m.labels)) for m in METRICS}
    assert docs == code
    for m in METRICS:
        assert m.name.startswith("deltafs_")
        assert m.name.endswith("_total") == (m.type == COUNTER), m.name
        assert m.help.strip(), m.name
    assert len({m.name for m in METRICS}) == len(METRICS)


# --------------------------------------------------------------------- the snapshot


def test_exposition_of_a_snapshot() -> None:
    snap = Snapshot.from_status(STATUS, version="9.9.9", taken_at=1_000_000.0)
    parsed = parse(render(snap).decode())
    check_every_metric(parsed, "s3://fleet/releases")
    for name, want in EXPECTED.items():
        assert value(parsed, name) == pytest.approx(want), name
    assert value(parsed, "deltafs_mount_info", version="9.9.9") == 1
    reqs = {(lab["op"], lab["outcome"]): v
            for lab, v in parsed["samples"]["deltafs_s3_requests_total"]}
    assert reqs == {("PUT", "ok"): 19, ("PUT", "precondition_failed"): 1,
                    ("HEAD", "ok"): 2, ("HEAD", "not_found"): 5, ("GET", "ok"): 4}


def test_snapshot_is_immutable_and_exact_start_time() -> None:
    snap = Snapshot.from_status(STATUS, taken_at=50.0, started=7.25)
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.pending_files = 0  # type: ignore[misc]
    assert isinstance(snap.requests, tuple)
    assert snap.start_time == 7.25


def test_store_without_outcomes_and_an_older_status() -> None:
    """A local-directory store counts requests without outcomes: outcome="unknown". A
    status lacking the newer keys (an older daemon) converts with zeros."""
    old = {k: v for k, v in STATUS.items()
           if k not in ("request_outcomes", "codec", "cache_hits", "cache_misses",
                        "cache_limit", "read_ahead", "memory")}
    parsed = parse(render(Snapshot.from_status(old)).decode())
    check_every_metric(parsed, "s3://fleet/releases")
    assert value(parsed, "deltafs_s3_requests_total", op="PUT", outcome="unknown") == 20
    assert value(parsed, "deltafs_cache_hits_total") == 0
    assert value(parsed, "deltafs_encodes_total") == 0
    empty = parse(render(Snapshot.from_status({"source": "s3://b", "requests": {},
                                               "request_outcomes": {}})).decode())
    check_every_metric(empty, "s3://b")
    assert empty["samples"]["deltafs_s3_requests_total"] == []


# --------------------------------------------------------------------- the text file


def test_textfile_written_atomically(tmp_path: Path) -> None:
    path = tmp_path / "deltafs.prom"
    old_mask = os.umask(0o022)
    try:
        write_textfile(str(path), b"first 1\n")
        held = open(path, "rb")  # a reader in the middle of the old file
        write_textfile(str(path), b"second 2\n")
    finally:
        os.umask(old_mask)
    with held:
        assert held.read() == b"first 1\n"  # renamed over, never rewritten in place
    assert path.read_bytes() == b"second 2\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # node_exporter runs as another user
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deltafs.prom"]  # no temp left
    with pytest.raises(OSError):
        write_textfile(str(tmp_path / "missing" / "x.prom"), b"x\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deltafs.prom"]


# --------------------------------------------------------------------- the exporter


class FakeFs:
    """What the exporter's snapshot function gets; counts where it was called from."""

    def __init__(self) -> None:
        self.status = dict(STATUS)
        self.threads: set[int] = set()

    def take(self, fs: "FakeFs") -> Snapshot:
        self.threads.add(threading.get_ident())
        return Snapshot.from_status(self.status, started=1234.5)


def test_http_server_serves_the_latest_snapshot(tmp_path: Path) -> None:
    fs = FakeFs()
    port = free_port()
    textfile = tmp_path / "m.prom"

    async def main() -> None:
        exp = MetricsExporter(fs, port=port, textfile=str(textfile),  # type: ignore[arg-type]
                              interval=60, snapshot=fs.take)
        await exp.start()
        try:
            assert exp.bound == ("127.0.0.1", port)
            for path in ("/metrics", "/"):
                parsed = parse(await trio.to_thread.run_sync(scrape, port, path))
                check_every_metric(parsed, "s3://fleet/releases")
                assert value(parsed, "deltafs_pending_files") == 3
                assert value(parsed, "deltafs_start_time_seconds") == 1234.5
            on_file = parse(textfile.read_text())
            check_every_metric(on_file, "s3://fleet/releases")
            om = await trio.to_thread.run_sync(scrape_openmetrics, port)
            assert len(om) == len(METRICS)
            # a new snapshot: the next scrape and the file show it
            fs.status["pending_files"] = 99
            await exp.refresh()
            parsed = parse(await trio.to_thread.run_sync(scrape, port, "/metrics"))
            assert value(parsed, "deltafs_pending_files") == 99
            assert value(parse(textfile.read_text()), "deltafs_pending_files") == 99
        finally:
            await exp.aclose()
        assert await trio.to_thread.run_sync(refused, port), "still listening after close"
        assert not textfile.exists(), "the text file outlived the exporter"

    trio.run(main)
    # only the trio thread read the (fake) filesystem: never the HTTP thread
    assert fs.threads == {threading.get_ident()}


def test_run_refreshes_until_cancelled(tmp_path: Path) -> None:
    fs = FakeFs()
    port = free_port()
    textfile = tmp_path / "m.prom"

    async def main() -> None:
        exp = MetricsExporter(fs, port=port, textfile=str(textfile),  # type: ignore[arg-type]
                              interval=0.05, snapshot=fs.take)
        await exp.start()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(exp.run)
            for n in (5, 6, 7):
                fs.status["uploaded_files"] = n
                with trio.fail_after(10):
                    while True:
                        await trio.sleep(0.02)
                        try:
                            got = value(parse(textfile.read_text()),
                                        "deltafs_uploaded_files_total")
                        except FileNotFoundError:
                            continue
                        if got == n:
                            break
            parsed = parse(await trio.to_thread.run_sync(scrape, port, "/metrics"))
            assert value(parsed, "deltafs_uploaded_files_total") == 7
            nursery.cancel_scope.cancel()
        assert await trio.to_thread.run_sync(refused, port)
        assert not textfile.exists()
        assert [p.name for p in tmp_path.iterdir()] == []

    trio.run(main)


def test_snapshot_failure_keeps_the_last_one() -> None:
    fs = FakeFs()
    port = free_port()

    async def main() -> None:
        exp = MetricsExporter(fs, port=port, interval=60,  # type: ignore[arg-type]
                              snapshot=fs.take)
        await exp.start()
        try:
            fs.status = None  # type: ignore[assignment]  # not a status: it fails ...
            await exp.refresh()  # ... logged, the last good snapshot stays
            parsed = parse(await trio.to_thread.run_sync(scrape, port, "/metrics"))
            assert value(parsed, "deltafs_pending_files") == 3
        finally:
            await exp.aclose()

    trio.run(main)


def test_port_in_use_fails_the_start(tmp_path: Path) -> None:
    """MetricsError (exit 14); a text file at the path, not written by this exporter
    (another mount's, a crashed one's), is left alone."""
    textfile = tmp_path / "m.prom"
    textfile.write_text("someone else's\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        async def main() -> None:
            fs = FakeFs()
            exp = MetricsExporter(fs, port=port, textfile=str(textfile),  # type: ignore[arg-type]
                                  snapshot=fs.take)
            with pytest.raises(MetricsError) as info:
                await exp.start()
            assert info.value.exit_code == metrics.EXIT_METRICS == 14
            assert f"127.0.0.1:{port} is in use" in str(info.value)
            assert isinstance(info.value, DeltafsError)

        trio.run(main)
    assert textfile.read_text() == "someone else's\n"


@pytest.mark.parametrize("port", [0, -1, 65536, True])
def test_bad_ports_refused(port: int) -> None:
    with pytest.raises(ConfigError) as info:
        MetricsExporter(FakeFs(), port=port)  # type: ignore[arg-type]
    assert info.value.exit_code == 2


def test_bad_address_and_unwritable_textfile(tmp_path: Path) -> None:
    async def main() -> None:
        fs = FakeFs()
        with pytest.raises(MetricsError, match="not an address of this host"):
            await MetricsExporter(fs, port=free_port(), address="192.0.2.1",  # type: ignore[arg-type]
                                  snapshot=fs.take).start()
        with pytest.raises(MetricsError, match="cannot write the metrics file"):
            await MetricsExporter(fs, port=None,  # type: ignore[arg-type]
                                  textfile=str(tmp_path / "no" / "such" / "m.prom"),
                                  snapshot=fs.take).start()
        assert await start_metrics(FakeFs(), port=None, textfile=None) is None  # type: ignore[arg-type]

    trio.run(main)


# ------------------------------------------------------- the counters behind the metrics


def test_snapshot_of_a_real_filesystem(tmp_path: Path) -> None:
    """take_snapshot on a DeltaFS (no FUSE session) over a local store: mount_status
    gives every key the snapshot reads."""
    from deltafs.fs import DeltaFS, Options
    from deltafs.journal import Journal
    from deltafs.store.local import LocalStore
    from deltafs.wiring import make_engine

    store = LocalStore(tmp_path / "store", create=True)
    engine = make_engine(store, tmp_path / "cache")
    journal = Journal(tmp_path / "state.db", "/x/store")
    try:
        fs = DeltaFS(engine, journal, engine.cache, "", tmp_path / "files", Options(),
                     "/x/store")
        snap = metrics.take_snapshot(fs)
        assert snap.source == "/x/store"
        assert snap.start_time == fs.started
        assert snap.cache_limit_bytes == engine.cache.size_limit > 0
        assert snap.memory_daemon_rss_bytes > 0
        check_every_metric(parse(render(snap).decode()), "/x/store")
    finally:
        journal.close()


def test_s3_store_counts_outcomes(s3store: S3Store) -> None:
    s3store.put_bytes("a.txt", b"hello", {})
    assert s3store.head("missing.txt") is None
    assert s3store.get_bytes("a.txt")[0] == b"hello"
    out = s3store.request_outcomes()
    assert out["PUT"]["ok"] >= 1
    assert out["HEAD"]["not_found"] == 1
    assert out["GET"]["ok"] == 1
    # each finished call counted once, as in stats()
    totals = {op: sum(by.values()) for op, by in out.items()}
    assert totals == s3store.stats()


def test_s3_store_counts_network_errors() -> None:
    dead = S3Store("nobucket", endpoint_url=f"http://127.0.0.1:{free_port()}",
                   max_attempts=1, connect_timeout=1)
    with pytest.raises(Unreachable):
        dead.check()
    assert dead.request_outcomes() == {"HEAD": {"network_error": 1}}


def test_codec_counts_runs_and_seconds(tmp_path: Path) -> None:
    rng = random.Random(5)
    ref = tmp_path / "ref"
    new = tmp_path / "new"
    data = rng.randbytes(300_000)
    ref.write_bytes(data)
    new.write_bytes(data[:1000] + b"changed" + data[1000:])
    before = codec.stats.snapshot()
    res = codec.encode(ref, new, tmp_path / "delta")
    assert res.delta_size is not None
    codec.decode(ref, tmp_path / "delta", tmp_path / "out", codec.sha256_file(new))
    after = codec.stats.snapshot()
    assert after["encodes"] == before["encodes"] + 1
    assert after["decodes"] == before["decodes"] + 1
    assert after["encode_seconds"] > before["encode_seconds"]
    assert after["decode_seconds"] > before["decode_seconds"]


# --------------------------------------------------------------------- a real mount

def scrape_until(port: int, ready: Any, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        parsed = parse(scrape(port))
        if ready(parsed):
            return parsed
        assert time.monotonic() < deadline, f"metrics never settled: {parsed['samples']}"
        time.sleep(0.3)


@pytest.mark.mount
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
@pytest.mark.usefixtures("fuse_tools")
def test_mount_with_metrics_port(moto_server: str, bucket: str, tmp_path: Path) -> None:
    """``deltafs mount --metrics-port P --metrics-textfile F``: similar files copied in,
    the scrape (and the file) show plausible numbers; after umount nothing listens and
    the file is gone."""
    port = free_port()
    textfile = tmp_path / "textfile" / "deltafs.prom"
    textfile.parent.mkdir()
    m = Mount(bucket, moto_server, tmp_path / "deltafs",
              extra_args=["--metrics-port", str(port), "--metrics-textfile", str(textfile)])
    src = tmp_path / "src"
    src.mkdir()
    versions = release_versions(4, 600_000, seed=13)
    for i, data in enumerate(versions):
        (src / f"app-1.{i}.bin").write_bytes(data)
    copied = sum(len(v) for v in versions)
    try:
        m.mount()
        for f in sorted(src.iterdir()):
            shutil.copyfile(f, m.mountpoint / f.name)
        m.wait_idle()
        parsed = scrape_until(port, lambda p: (
            # (the totals are refreshed every few seconds, after the uploads' commit)
            value(p, "deltafs_logical_bytes") == copied
            and value(p, "deltafs_stored_bytes") > 0
            and value(p, "deltafs_uploaded_files_total") == len(versions)
            and value(p, "deltafs_pending_files") == 0))
        check_every_metric(parsed, m.source)
        assert value(parsed, "deltafs_mount_info", version=metrics.__version__) == 1
        stored = value(parsed, "deltafs_stored_bytes")
        assert stored < copied / 2, (stored, copied)  # three of four are deltas
        # what the bucket holds for the files (here: exactly the objects but the
        # listing manifest; bounded both ways so that a chain's layout may vary)
        assert sum(m.objects().values()) * 0.9 <= stored <= sum(m.all_objects().values())
        assert value(parsed, "deltafs_uploaded_bytes_total") == copied
        assert value(parsed, "deltafs_s3_requests_total", op="PUT", outcome="ok") > 0
        assert value(parsed, "deltafs_encodes_total") >= len(versions) - 1
        assert value(parsed, "deltafs_encode_seconds_total") > 0
        assert value(parsed, "deltafs_cache_bytes") > 0
        assert value(parsed, "deltafs_cache_limit_bytes") > 0
        assert value(parsed, "deltafs_loop_stall_max_seconds") >= 0
        assert value(parsed, "deltafs_memory_daemon_rss_bytes") > 0
        assert value(parsed, "deltafs_failed_files") == 0
        assert abs(time.time() - value(parsed, "deltafs_metrics_snapshot_timestamp_seconds")
                   ) < 30
        # what `deltafs status` shows agrees
        st = m.status()
        assert st["uploaded_files"] == len(versions)
        assert st["request_outcomes"]["PUT"]["ok"] >= value(
            parsed, "deltafs_s3_requests_total", op="PUT", outcome="ok")
        assert st["codec"]["encodes"] >= value(parsed, "deltafs_encodes_total")
        # the S3 request gate: its ceiling is the connection pool; a limit between
        gate = st["s3_requests_at_once"]
        assert gate["ceiling"] == 40
        assert 2 <= gate["limit"] <= 40 and gate["in_flight"] >= 0
        assert 2 <= value(parsed, "deltafs_s3_request_limit") <= 40
        # reading a file back: a cache hit (its upload left it there)
        assert (m.mountpoint / "app-1.3.bin").read_bytes() == versions[3]
        scrape_until(port, lambda p: value(p, "deltafs_cache_hits_total")
                     + value(p, "deltafs_cache_misses_total") >= 1)
        # the text file holds the same metrics
        on_file = parse(textfile.read_text())
        check_every_metric(on_file, m.source)
        assert value(on_file, "deltafs_logical_bytes") == copied
        m.umount()
        assert refused(port), "the metrics port still answers after umount"
        assert not textfile.exists(), "the metrics file outlived the mount"
        assert list(textfile.parent.iterdir()) == []
    finally:
        m.teardown()
        m.dump_logs()


@pytest.mark.mount
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
@pytest.mark.usefixtures("fuse_tools")
def test_mount_fails_on_a_metrics_port_in_use(moto_server: str, bucket: str,
                                               tmp_path: Path) -> None:
    """A port in use fails the mount's start (exit 14, the reason on stderr), and leaves
    nothing mounted."""
    m = Mount(bucket, moto_server, tmp_path / "deltafs")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        try:
            res = subprocess.run(
                [*deltafs_exe(), "mount", m.source, str(m.mountpoint), "--cache-dir",
                 str(m.cache), "--endpoint-url", moto_server, "--metrics-port", str(port)],
                capture_output=True, text=True, timeout=60)
            assert res.returncode == 14, (res.returncode, res.stderr, m.log_tail())
            assert f"metrics port 127.0.0.1:{port} is in use" in res.stderr
            assert res.stderr.count("\n") == 1, res.stderr  # one line
            assert not in_mount_table(m.mountpoint)
        finally:
            m.teardown()
