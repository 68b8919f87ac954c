"""S3Store (and the engine above it) against a misbehaving network and server.

Every test talks to moto through :mod:`faultproxy`, switches a fault on, and asserts both
the outcome and that the proxy really injected the fault (so a test that no longer
provokes anything fails instead of passing vacuously).
"""
# ruff: noqa: F811  (the imported fixture is used as an argument name)
from __future__ import annotations

import http.client
import os
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from faultproxy import FaultProxy, fault_proxy  # noqa: F401  (fixture)
from helpers import MiB, sha256_file

from deltafs.api import make_engine
from deltafs.errors import (
    AlreadyExists,
    AccessDenied,
    BucketNotFound,
    IntegrityError,
    InvalidName,
    NotFound,
    Rejected,
    StoreError,
    Unreachable,
)
from deltafs.store import S3Store
from deltafs.store import s3 as s3mod


def proxied(proxy: FaultProxy, bucket: str, **kw: Any) -> S3Store:
    """An S3Store through the proxy with short timeouts (tests must stay fast).
    ``max_attempts`` is botocore's: retries after the first attempt."""
    args: dict[str, Any] = {"connect_timeout": 1, "read_timeout": 2, "max_attempts": 5}
    args.update(kw)
    return S3Store(bucket, endpoint_url=proxy.url, **args)


@pytest.fixture
def s3(moto_server: str) -> Any:
    """A plain client straight to moto (behind the proxy's back)."""
    return boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")


def rand(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


# ------------------------------------------------------------------ the proxy itself


def test_proxy_forwards_and_counts(fault_proxy: FaultProxy, bucket: str) -> None:
    store = proxied(fault_proxy, bucket)
    store.put_bytes("a/b c", b"hello", {"x": "1"})
    assert store.get_bytes("a/b c")[0] == b"hello"
    assert store.head("a/b c") is not None and store.head("nope") is None
    assert [o.key for o in store.list("a/").objects] == ["a/b c"]
    c = fault_proxy.counts
    assert c[("PUT", "PutObject")] == 1 and c[("GET", "GetObject")] == 1
    assert c[("HEAD", "HeadObject")] == 2 and c[("GET", "ListObjectsV2")] == 1
    assert fault_proxy.requests(kind="PutObject")[0].key == "a/b c"
    assert fault_proxy.faults() == 0


def test_proxy_keeps_connections_alive_and_stops(moto_server: str, bucket: str,
                                                 s3: Any) -> None:
    proxy = FaultProxy(moto_server).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        for i in range(3):  # three requests, one connection
            conn.request("PUT", f"/{bucket}/k{i}", body=b"x" * i)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
        # a chunked request body is forwarded as it came
        conn.putrequest("PUT", f"/{bucket}/chunked")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        conn.send(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        # moto answers an unsigned GET 403 with an empty body: forwarded as it is
        conn.request("GET", f"/{bucket}/chunked")
        resp = conn.getresponse()
        assert resp.status == 403 and resp.read() == b""
        conn.close()
        assert proxy.seen("PUT", "PutObject") == 4
        assert s3.get_object(Bucket=bucket, Key="chunked")["Body"].read() == b"hello world"
        assert s3.get_object(Bucket=bucket, Key="k2")["Body"].read() == b"xx"
    finally:
        proxy.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()


# ------------------------------------------------------------------ outages


def test_outage_refused_is_unreachable_and_transient(fault_proxy: FaultProxy,
                                                     bucket: str) -> None:
    store = proxied(fault_proxy, bucket, max_attempts=1)
    store.put_bytes("k", b"v", {})  # leaves a kept-alive connection in the pool
    fault_proxy.set("refuse")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", fault_proxy.port), timeout=1).close()
    started = time.monotonic()
    for call in (lambda: store.get_bytes("k"), lambda: store.head("k"),
                 lambda: store.put_bytes("k2", b"v", {}), lambda: store.list("")):
        with pytest.raises(Unreachable) as exc:
            call()
        assert exc.value.permanent is False
        assert "\n" not in str(exc.value) and fault_proxy.url in str(exc.value)
    assert time.monotonic() - started < 8
    # the pooled connection was reset at its next request
    assert fault_proxy.faults("refuse") >= 1
    fault_proxy.clear()
    assert store.get_bytes("k")[0] == b"v"


def test_hang_times_out_as_unreachable(fault_proxy: FaultProxy, bucket: str) -> None:
    store = proxied(fault_proxy, bucket, max_attempts=0, read_timeout=1)
    store.put_bytes("k", b"v", {})
    fault_proxy.set("hang", method="GET")
    started = time.monotonic()
    with pytest.raises(Unreachable, match="read timeout") as exc:
        store.get_bytes("k")
    assert exc.value.permanent is False
    assert time.monotonic() - started < 5
    assert fault_proxy.faults("hang") == 1
    fault_proxy.clear()
    assert store.get_bytes("k")[0] == b"v"


def test_reset_before_answer_is_retried(fault_proxy: FaultProxy, bucket: str) -> None:
    """A connection reset right after the request line (no answer at all) is retried."""
    store = proxied(fault_proxy, bucket)
    store.put_bytes("k", b"v", {})
    fault_proxy.set("refuse", method="GET", count=2)
    assert store.get_bytes("k")[0] == b"v"
    assert fault_proxy.faults("refuse") == 2
    assert fault_proxy.seen("GET", "GetObject") == 3


# ------------------------------------------------------------------ 503 SlowDown


def test_slowdown_storm_is_retried_with_backoff(fault_proxy: FaultProxy,
                                                bucket: str) -> None:
    """Three 503 SlowDown in a row, then success. botocore backs off a throttled request
    by rand() * 1 s * 2**attempt; the jitter is seeded so the test takes a known ~2 s
    (unseeded it could take up to 7 s)."""
    store = proxied(fault_proxy, bucket)
    random.seed(39)
    fault_proxy.set("slowdown", count=3)
    started = time.monotonic()
    store.put_bytes("k", b"payload", {})
    assert time.monotonic() - started < 6
    assert fault_proxy.faults("slowdown") == 3
    puts = fault_proxy.requests(kind="PutObject")
    assert len(puts) == 4 and [p.fault for p in puts] == ["slowdown"] * 3 + [None]
    gaps = [b.time - a.time for a, b in zip(puts, puts[1:])]
    assert sum(gaps) > 0.5, f"no backoff between retries: {gaps}"
    fault_proxy.reset_counts()
    fault_proxy.set("slowdown", method="GET", count=1)
    assert store.get_bytes("k")[0] == b"payload"
    assert fault_proxy.faults("slowdown") == 1
    assert fault_proxy.seen("GET", "GetObject") == 2


def test_slowdown_longer_than_retries_is_transient(fault_proxy: FaultProxy,
                                                   bucket: str) -> None:
    store = proxied(fault_proxy, bucket, max_attempts=2)
    fault_proxy.set("slowdown")
    with pytest.raises(StoreError, match="SlowDown") as exc:
        store.put_bytes("some/key", b"x", {})
    assert not isinstance(exc.value, Rejected) and exc.value.permanent is False
    assert "some/key" in str(exc.value)
    assert fault_proxy.faults("slowdown") == 3  # the first attempt and 2 retries


# ------------------------------------------------------------------ classification


@pytest.mark.parametrize(
    ("status", "code", "expected", "permanent"),
    [
        (400, "InvalidArgument", Rejected, True),
        (400, "EntityTooLarge", Rejected, True),
        (405, "MethodNotAllowed", Rejected, True),
        (411, "MissingContentLength", Rejected, True),
        (400, "RequestTimeout", StoreError, False),
        (408, "RequestTimeout", StoreError, False),
        (429, "TooManyRequests", StoreError, False),
        (409, "OperationAborted", StoreError, False),
        (500, "InternalError", StoreError, False),
    ],
)
def test_status_classification(fault_proxy: FaultProxy, bucket: str, status: int,
                               code: str, expected: type, permanent: bool) -> None:
    store = proxied(fault_proxy, bucket, max_attempts=1)
    fault_proxy.set("status", kind="PutObject", status=status, code=code,
                    message="Injected\nfault")
    with pytest.raises(StoreError) as exc:
        store.put_bytes("dir/the key", b"x", {})
    assert type(exc.value) is expected, exc.value
    assert exc.value.permanent is permanent
    msg = str(exc.value)
    assert "PUT" in msg and "dir/the key" in msg and code in msg and "\n" not in msg
    assert fault_proxy.faults("status") >= 1


def test_rejected_on_head_and_get(fault_proxy: FaultProxy, bucket: str) -> None:
    store = proxied(fault_proxy, bucket, max_attempts=1)
    store.put_bytes("k", b"v", {})
    # (botocore answers a 400 on HeadObject with a HeadBucket, looking for a region
    # redirect, then sends the HeadObject once more: both get the 400)
    head_rule = fault_proxy.set("status", kind="HeadObject", status=400, code="BadRequest")
    with pytest.raises(Rejected, match=r"HEAD s3://.*/k refused: 400") as exc:
        store.head("k")
    assert exc.value.permanent is True
    assert head_rule.hits >= 1
    get_rule = fault_proxy.set("status", method="GET", status=416, code="InvalidRange")
    with pytest.raises(Rejected, match="InvalidRange"):
        store.get_bytes("k")
    assert get_rule.hits == 1
    # the classes that existed before keep theirs
    fault_proxy.clear()
    with pytest.raises(NotFound):
        store.get_bytes("missing")


def test_moto_refusals_are_rejected(fault_proxy: FaultProxy, bucket: str,
                                    tmp_path: Path) -> None:
    """Real 4xx answers from moto, no injection: parts below 5 MiB (EntityTooSmall) and
    a key with a newline (moto's router answers a 404 to the PUT)."""
    store = proxied(fault_proxy, bucket, multipart_threshold=1 * MiB)
    store.part_size = 1 * MiB  # below S3's minimum, on purpose
    src = tmp_path / "src"
    src.write_bytes(rand(3 * MiB))
    with pytest.raises(Rejected, match="EntityTooSmall") as exc:
        store.put_file("small/parts", src, {})
    assert exc.value.permanent and "small/parts" in str(exc.value)
    assert fault_proxy.seen("POST", "CompleteMultipartUpload") == 1
    with pytest.raises(Rejected) as exc:
        store.put_bytes("new\nline", b"x", {})
    assert "new\\nline" in str(exc.value) and "\n" not in str(exc.value)
    assert "404" in str(exc.value)
    store.put_bytes("plain", b"x", {})
    with pytest.raises(Rejected, match="COPY"):
        store.copy("plain", "copy\nhere", {})
    # a read of such a key, or a copy from a missing source, is still NotFound
    with pytest.raises(NotFound):
        store.get_bytes("new\nline")
    with pytest.raises(NotFound):
        store.copy("missing", "elsewhere", {})
    assert fault_proxy.faults() == 0


@pytest.mark.parametrize(
    ("method", "code", "status", "expected", "permanent"),
    [
        ("put_object", "404", 404, Rejected, True),  # a bare 404 to a write
        ("put_object", "NoSuchBucket", 404, BucketNotFound, True),
        ("put_object", "NoSuchUpload", 404, StoreError, False),  # someone aborted it
        ("put_object", "ConditionalRequestConflict", 409, StoreError, False),
        ("put_object", "AccessDenied", 403, AccessDenied, True),
        ("put_object", "InvalidRequest", 400, Rejected, True),
        ("put_object", "RequestTimeout", 400, StoreError, False),
        ("put_object", "KeyTooLongError", 400, InvalidName, None),
        ("get_object", "NoSuchKey", 404, NotFound, True),
        ("get_object", "404", 404, NotFound, True),
        ("get_object", "InvalidObjectState", 403, AccessDenied, True),
        ("get_object", "InvalidObjectState", 400, Rejected, True),
        ("get_object", "SlowDown", 503, StoreError, False),
    ],
)
def test_classification_table(s3store: S3Store, method: str, code: str, status: int,
                              expected: type, permanent: bool | None) -> None:
    """Answers that are hard to provoke from moto, stubbed: which class each becomes."""
    with Stubber(s3store._client) as stub:
        for _ in range(4):  # a conflict is retried by the store itself
            stub.add_client_error(method, code, "the\nmessage", http_status_code=status)
        with pytest.raises(Exception) as exc:
            if method == "put_object":
                s3store.put_bytes("a\tkey", b"x", {})
            else:
                s3store.get_bytes("a\tkey")
    assert type(exc.value) is expected, exc.value
    if permanent is not None:
        assert exc.value.permanent is permanent
    assert "\n" not in str(exc.value) and "\t" not in str(exc.value)


# ------------------------------------------------------------------ GET resume


def test_get_resumes_after_reset_mid_body(fault_proxy: FaultProxy, bucket: str, s3: Any,
                                          tmp_path: Path) -> None:
    data = rand(3 * MiB, seed=3)
    s3.put_object(Bucket=bucket, Key="big", Body=data)
    store = proxied(fault_proxy, bucket)
    fault_proxy.set("reset_body", kind="GetObject", count=1)
    dest = tmp_path / "out"
    info = store.get_file("big", dest)
    assert dest.read_bytes() == data and info.size == len(data)
    assert fault_proxy.faults("reset_body") == 1
    ranged = [r for r in fault_proxy.requests(kind="GetObject") if r.range]
    assert len(ranged) == 1
    start = int(ranged[0].range.split("=")[1].rstrip("-"))
    assert 0 < start < len(data)
    assert ranged[0].header("If-Match") == f'"{info.etag}"'


def test_get_resumes_repeatedly(fault_proxy: FaultProxy, bucket: str, s3: Any,
                                tmp_path: Path) -> None:
    """Every answer (the ranged ones too) breaks off halfway, three times in a row."""
    data = rand(3 * MiB, seed=4)
    s3.put_object(Bucket=bucket, Key="big", Body=data)
    store = proxied(fault_proxy, bucket)
    fault_proxy.set("reset_body", kind="GetObject", count=3)
    dest = tmp_path / "out"
    store.get_file("big", dest)
    assert sha256_file(dest) == sha256_file(_write(tmp_path / "want", data))
    assert fault_proxy.faults("reset_body") == 3
    assert fault_proxy.seen("GET", "GetObject", ranged=True) == 3
    # get_bytes resumes the same way
    fault_proxy.set("reset_body", kind="GetObject", count=1)
    got, _ = store.get_bytes("big")
    assert got == data and fault_proxy.faults("reset_body") == 4


def test_get_gives_up_after_bounded_resumes(fault_proxy: FaultProxy, bucket: str, s3: Any,
                                            tmp_path: Path) -> None:
    """A body that breaks off before its first byte each time: bounded, then transient."""
    s3.put_object(Bucket=bucket, Key="big", Body=rand(1 * MiB))
    store = proxied(fault_proxy, bucket, max_attempts=0)
    fault_proxy.set("reset_body", kind="GetObject", at=0)
    started = time.monotonic()
    with pytest.raises(StoreError) as exc:
        store.get_file("big", tmp_path / "out")
    assert exc.value.permanent is False
    assert time.monotonic() - started < 8
    assert 2 <= fault_proxy.faults("reset_body") <= 6


def test_get_resume_detects_a_replaced_object(fault_proxy: FaultProxy, bucket: str,
                                              s3: Any, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The object is replaced between the broken GET and its resume: the resume's
    If-Match fails, the GET says so, and the file never holds bytes of the new version."""
    old, new = rand(3 * MiB, seed=5), rand(3 * MiB, seed=6)
    s3.put_object(Bucket=bucket, Key="big", Body=old)
    store = proxied(fault_proxy, bucket)
    real = store._get_rest

    def replace_then_resume(*args: Any, **kw: Any) -> Any:
        s3.put_object(Bucket=bucket, Key="big", Body=new)
        return real(*args, **kw)

    monkeypatch.setattr(store, "_get_rest", replace_then_resume)
    fault_proxy.set("reset_body", kind="GetObject", count=1)
    dest = tmp_path / "out"
    with pytest.raises(StoreError, match="changed while it was being read") as exc:
        store.get_file("big", dest)
    assert exc.value.permanent is False
    assert fault_proxy.faults("reset_body") == 1
    assert fault_proxy.seen("GET", "GetObject", ranged=True) == 1
    got = dest.read_bytes()
    assert old.startswith(got) and 0 < len(got) < len(old)


# ------------------------------------------------------------------ uploads


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("phase", ["request", "response"])
def test_put_reset_is_retried(fault_proxy: FaultProxy, bucket: str, s3: Any,
                              tmp_path: Path, phase: str) -> None:
    """A reset while the body goes up, or after the server stored it but before the
    answer came back: the PUT is sent again and succeeds."""
    data = rand(3 * MiB, seed=7)
    store = proxied(fault_proxy, bucket)
    fault_proxy.set("reset_body", kind="PutObject", phase=phase, count=1)
    info = store.put_file("up/file", _write(tmp_path / "src", data), {"a": "1"})
    assert fault_proxy.faults("reset_body") == 1
    assert fault_proxy.seen("PUT", "PutObject") == 2
    assert s3.get_object(Bucket=bucket, Key="up/file")["Body"].read() == data
    assert info.etag == s3.head_object(Bucket=bucket, Key="up/file")["ETag"].strip('"')
    fault_proxy.set("reset_body", kind="PutObject", phase=phase, count=1)
    store.put_bytes("up/small", b"small body", {})
    assert s3.get_object(Bucket=bucket, Key="up/small")["Body"].read() == b"small body"
    assert fault_proxy.faults("reset_body") == 2


def test_multipart_reset_is_retried(fault_proxy: FaultProxy, bucket: str, s3: Any,
                                    tmp_path: Path) -> None:
    data = rand(12 * MiB, seed=8)
    store = proxied(fault_proxy, bucket, multipart_threshold=5 * MiB, part_size=5 * MiB)
    # two UploadParts break off while their body goes up, the next one is stored but its
    # answer is lost, and so is the answer to the complete
    fault_proxy.set("reset_body", kind="UploadPart", phase="request", count=2)
    fault_proxy.add("reset_body", kind="UploadPart", phase="response", count=1)
    fault_proxy.add("reset_body", kind="CompleteMultipartUpload", phase="response", count=1)
    store.put_file("mp/file", _write(tmp_path / "src", data), {})
    assert fault_proxy.faults("reset_body") == 4
    assert fault_proxy.seen("PUT", "UploadPart") == 3 + 3
    assert fault_proxy.seen("POST", "CompleteMultipartUpload") == 2
    assert s3.get_object(Bucket=bucket, Key="mp/file")["Body"].read() == data
    assert fault_proxy.seen("DELETE", "AbortMultipartUpload") == 0


# ------------------------------------------------------------------ corruption in transit


def test_flip_once_is_read_again(fault_proxy: FaultProxy, bucket: str,
                                 tmp_path: Path) -> None:
    """One GET with flipped bytes: the checksum S3 sent with the body catches it, the
    store reads the object again, the engine returns the right bytes."""
    store = proxied(fault_proxy, bucket)
    engine = make_engine(store, tmp_path / "cache")
    data = rand(48 * 1024, seed=9)  # below 64 KiB: one direct object, one GET
    engine.put(_write(tmp_path / "src.bin", data), "f/file.bin")
    fault_proxy.set("flip", kind="GetObject", count=1)
    dest = tmp_path / "got.bin"
    engine.get("f/file.bin", dest)
    assert dest.read_bytes() == data
    assert fault_proxy.faults("flip") == 1
    assert fault_proxy.seen("GET", "GetObject") == 2


def _assert_no_output(dest: Path) -> None:
    assert not dest.exists()
    assert [p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}")] == []


GZIP_MAGIC = b"\x1f\x8b\x08\x00"


@pytest.mark.parametrize(
    ("case", "size", "head", "kind", "multipart"),
    [
        ("small direct", 48 * 1024, b"", "direct", False),
        ("reference + delta", 1 * MiB, b"", "reference", False),
        ("multipart reference + delta", 6 * MiB, b"", "reference", True),
        ("multipart direct", 6 * MiB, GZIP_MAGIC, "direct", True),
    ],
)
def test_flip_every_get_is_integrity_error(fault_proxy: FaultProxy, bucket: str,
                                           tmp_path: Path, case: str, size: int,
                                           head: bytes, kind: str, multipart: bool) -> None:
    """Every GET flipped. Single-part objects fail the checksum S3 sends with them every
    time (the store gives up); multipart ones carry no whole-object checksum and fail the
    engine's SHA-256. Either way the get raises IntegrityError and no destination (nor
    a temporary file) appears."""
    store = proxied(fault_proxy, bucket, multipart_threshold=5 * MiB, part_size=5 * MiB)
    engine = make_engine(store, tmp_path / "cache")
    data = head + rand(size - len(head), seed=10)
    res = engine.put(_write(tmp_path / "src.bin", data), "f/file.bin")
    assert res.kind == kind, case
    assert (fault_proxy.seen("POST", "CreateMultipartUpload") > 0) == multipart
    fault_proxy.set("flip", kind="GetObject")
    dest = tmp_path / "out" / "file.bin"
    dest.parent.mkdir()
    with pytest.raises(IntegrityError):
        make_engine(store, tmp_path / "cache2").get("f/file.bin", dest)
    _assert_no_output(dest)
    assert fault_proxy.faults("flip") >= 1
    fault_proxy.clear()
    make_engine(store, tmp_path / "cache3").get("f/file.bin", dest)
    assert dest.read_bytes() == data


def test_flip_delta_is_integrity_error(fault_proxy: FaultProxy, bucket: str,
                                       tmp_path: Path) -> None:
    store = proxied(fault_proxy, bucket)
    engine = make_engine(store, tmp_path / "cache")
    v1 = rand(512 * 1024, seed=11)
    v2 = bytearray(v1)
    v2[1000:1100] = os.urandom(100)
    engine.put(_write(tmp_path / "v1.bin", v1), "d/v1.bin")
    res = engine.put(_write(tmp_path / "v2.bin", bytes(v2)), "d/v2.bin")
    assert res.kind == "delta"
    fault_proxy.set("flip", kind="GetObject", key="v2.bin")
    dest = tmp_path / "out" / "v2.bin"
    dest.parent.mkdir()
    with pytest.raises(IntegrityError):
        make_engine(store, tmp_path / "cache2").get("d/v2.bin", dest)
    _assert_no_output(dest)
    assert fault_proxy.faults("flip") >= 1
    assert {r.key for r in fault_proxy.requests(fault="flip")} == {"d/v2.bin.delta"}
    fault_proxy.clear()
    make_engine(store, tmp_path / "cache3").get("d/v2.bin", dest)
    assert dest.read_bytes() == bytes(v2)


# ------------------------------------------------------------------ large objects in parallel


def _max_in_flight(store: S3Store, method: str, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wrap the store's client ``method`` to record how many calls ran at once."""
    real = getattr(store._client, method)  # noqa: SLF001
    lock = threading.Lock()
    now, peak = [0], [0]

    def wrapped(*args: Any, **kw: Any) -> Any:
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        try:
            time.sleep(0.05)  # let the others start
            return real(*args, **kw)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(store._client, method, wrapped)  # noqa: SLF001
    return peak


def test_multipart_parts_go_up_in_parallel_and_keep_if_none_match(
        fault_proxy: FaultProxy, bucket: str, s3: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A 23 MiB file in 5 MiB parts: five UploadParts, several at once, one of them reset
    on its way up; then a conditional create of the same key (the HEAD that answers
    early is made to miss, as when another writer creates the key during the upload):
    the complete's If-None-Match refuses it, the upload is aborted, the object stays."""
    data = rand(23 * MiB, seed=21)
    store = proxied(fault_proxy, bucket, multipart_threshold=5 * MiB, part_size=5 * MiB)
    peak = _max_in_flight(store, "upload_part", monkeypatch)
    fault_proxy.set("reset_body", kind="UploadPart", phase="request", count=1)
    store.put_file("mp/new", _write(tmp_path / "src", data), {"a": "1"}, if_none_match=True)
    assert s3.get_object(Bucket=bucket, Key="mp/new")["Body"].read() == data
    assert fault_proxy.seen("PUT", "UploadPart") == 5 + 1 and peak[0] >= 2
    assert s3.head_object(Bucket=bucket, Key="mp/new")["Metadata"] == {"a": "1"}

    other = rand(23 * MiB, seed=22)
    monkeypatch.setattr(store, "head", lambda key: None)
    fault_proxy.reset_counts()
    with pytest.raises(AlreadyExists):
        store.put_file("mp/new", _write(tmp_path / "other", other), {},
                       if_none_match=True)
    assert fault_proxy.seen("POST", "CompleteMultipartUpload") == 1
    assert fault_proxy.seen("DELETE", "AbortMultipartUpload") == 1
    assert s3.get_object(Bucket=bucket, Key="mp/new")["Body"].read() == data
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_large_get_fetches_ranges_in_parallel_and_resumes_each(
        fault_proxy: FaultProxy, bucket: str, s3: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A 23 MiB object read in 5 MiB ranges: the ranged GETs run at once, each carries
    If-Match, two break off halfway and resume where they stopped."""
    data = rand(23 * MiB, seed=23)
    s3.put_object(Bucket=bucket, Key="big", Body=data)
    store = proxied(fault_proxy, bucket, multipart_threshold=5 * MiB, part_size=5 * MiB)
    monkeypatch.setattr(s3mod, "ONE_STREAM_ENOUGH", float("inf"))  # as over a slow link
    peak = _max_in_flight(store, "get_object", monkeypatch)
    fault_proxy.set("reset_body", kind="GetObject", ranged=True, count=2)
    dest = tmp_path / "out"
    info = store.get_file("big", dest)
    assert dest.read_bytes() == data and info.size == len(data)
    assert fault_proxy.faults("reset_body") == 2
    ranged = fault_proxy.requests(kind="GetObject")
    assert sum(1 for r in ranged if r.range) == 4 + 2
    assert all(r.header("If-Match") == f'"{info.etag}"' for r in ranged if r.range)
    assert peak[0] >= 2
    # the resumed ranges start inside their range, past its first byte
    starts = sorted(int(r.range.split("=")[1].split("-")[0]) for r in ranged if r.range)
    assert any(s % (5 * MiB) for s in starts), starts


def test_large_get_detects_an_object_replaced_between_ranges(
        fault_proxy: FaultProxy, bucket: str, s3: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = rand(12 * MiB, seed=24), rand(12 * MiB, seed=25)
    s3.put_object(Bucket=bucket, Key="big", Body=old)
    store = proxied(fault_proxy, bucket, multipart_threshold=5 * MiB, part_size=5 * MiB)
    monkeypatch.setattr(s3mod, "ONE_STREAM_ENOUGH", float("inf"))
    real = store._get_range  # noqa: SLF001
    replaced = threading.Event()

    def replace_first(*args: Any, **kw: Any) -> Any:
        if not replaced.is_set():
            replaced.set()
            s3.put_object(Bucket=bucket, Key="big", Body=new)
        return real(*args, **kw)

    monkeypatch.setattr(store, "_get_range", replace_first)
    with pytest.raises(StoreError, match="changed while it was being read") as exc:
        store.get_file("big", tmp_path / "out")
    assert exc.value.permanent is False


def test_a_fast_large_get_stays_one_stream_and_resumes_it(
        fault_proxy: FaultProxy, bucket: str, s3: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a fast link a large GET goes on in the stream that brought its first part
    (ranges would only add requests); when that stream breaks off later, one ranged GET
    with If-Match brings the rest."""
    data = rand(23 * MiB, seed=26)
    s3.put_object(Bucket=bucket, Key="big", Body=data)
    store = proxied(fault_proxy, bucket, multipart_threshold=5 * MiB, part_size=5 * MiB)
    monkeypatch.setattr(s3mod, "ONE_STREAM_ENOUGH", 0.0)
    fault_proxy.set("reset_body", kind="GetObject", ranged=False, at=15 * MiB, count=1)
    dest = tmp_path / "out"
    info = store.get_file("big", dest)
    assert dest.read_bytes() == data
    assert fault_proxy.faults("reset_body") == 1
    ranged = [r for r in fault_proxy.requests(kind="GetObject") if r.range]
    assert len(ranged) == 1 and ranged[0].header("If-Match") == f'"{info.etag}"'
    start, end = ranged[0].range.split("=")[1].split("-")
    assert 5 * MiB <= int(start) <= 15 * MiB and int(end) == len(data) - 1
