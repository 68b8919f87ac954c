"""A fault-injecting HTTP proxy in front of the moto S3 server, for tests.

The proxy runs in threads of the pytest process, listens on 127.0.0.1 (a free port) and
forwards every request to the session's moto server. A test switches faults on and off
while it runs::

    from faultproxy import fault_proxy  # noqa: F401  (the fixture)

    def test_x(fault_proxy, bucket):
        store = S3Store(bucket, endpoint_url=fault_proxy.url)
        fault_proxy.set("slowdown", method="GET", count=2)   # the next 2 GETs get a 503
        ...
        assert fault_proxy.faults() == 2
        fault_proxy.clear()

Modes (``set``/``add``):

``refuse``
    Without a filter or count, the proxy stops listening (new connections are refused,
    ``ECONNREFUSED``) and resets kept-alive connections at their next request. With a
    filter or a count, a matching request's connection is reset (RST) as soon as its
    headers are read.
``hang``
    Read the request, then answer nothing until the rule is cleared (the connection is
    then closed) or, with ``seconds=S``, for S seconds and then forward it normally
    (injected latency).
``late``
    Forward the request at once, then hold the server's answer for ``seconds=S`` (or
    until the rule is cleared) before sending it: the client gets a true but old answer,
    as from a request that was slow on its way back.
``slowdown``
    Answer ``503`` with an S3 ``<Error><Code>SlowDown</Code>…`` body.
``status``
    Answer ``status`` (default 400) with an S3 error body of ``code`` (default
    ``InvalidArgument``) and ``message``.
``reset_body``
    A request with a body (PUT, UploadPart, POST with XML): read ``at`` bytes of it
    (default: half) and reset the connection (SO_LINGER 0). A request without a body:
    forward it, send the response's headers and ``at`` bytes of its body (default: half),
    then reset. ``phase="request"``/``"response"`` forces one of the two.
``flip``
    Forward, then invert ``nbytes`` bytes (default 16) of a 2xx response body at
    ``offset`` (default: the middle); the length stays the same. HEAD requests never
    match a flip rule; an error answer or an empty body passes unchanged (but counts).

Filters (all optional, all must match): ``method`` ("GET" or a set), ``kind`` (the S3
operation, e.g. "GetObject", "PutObject", "UploadPart", "HeadObject", "ListObjectsV2",
"CreateMultipartUpload", "CompleteMultipartUpload", "CopyObject"; or a set), ``key`` (a
substring of the object key), ``query`` (a substring of the raw query string),
``ranged`` (True: only requests with a Range header; False: only without). ``count=N``
faults the next N matching requests only, then the rule stops matching.

API (all thread-safe):

- ``set(mode, *, method=None, kind=None, key=None, query=None, ranged=None, count=None,
  **params) -> Rule``: replace every fault by this one. ``add(...)``: the same, beside
  the current ones (the first matching rule applies). ``clear()``: no more faults.
- ``Rule.hits``: how many requests that rule took (counted when the request arrives).
- ``url``, ``port``; ``counts``: a Counter of ``(method, kind)`` for every request;
  ``log``: every :class:`Request` (method, kind, bucket, key, query, headers, time,
  fault).
- ``seen(method=None, kind=None, *, ranged=None, fault=None) -> int``: requests that
  match (``fault=True``: faulted ones, a mode name: faulted with that mode, ``False``:
  untouched ones); ``faults(mode=None) -> int``; ``requests(**attrs) -> list[Request]``
  (e.g. ``requests(kind="GetObject", fault="flip")``); ``reset_counts()``;
  ``wait_for(predicate, timeout=10) -> bool`` (polls ``predicate(proxy)``).
- ``start()`` / ``stop()`` (or a ``with`` block, or the ``fault_proxy`` fixture).

Notes: a mount daemon (another process) reaches the proxy too: pass ``proxy.url`` as
``--endpoint-url``. botocore's ``retries={"max_attempts": N}`` (S3Store's
``max_attempts``) counts retries after the first attempt, so a fault with ``count=N+1``
outlasts them. botocore answers a 400 to HeadObject with a HeadBucket and one more
HeadObject (its region-redirect probe). moto closes every connection after its answer
(``Connection: close``); the proxy keeps the client's connection alive and reconnects
upstream.
"""
from __future__ import annotations

import collections
import fcntl
import logging
import select
import socket
import struct
import termios
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import pytest

log = logging.getLogger(__name__)

MODES = ("refuse", "hang", "late", "slowdown", "status", "reset_body", "flip")
#: headers that describe one hop, not the message: never forwarded as they came
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
                "trailer", "upgrade", "expect"}
_MAX_LINE = 65536


class _Closed(Exception):
    """The peer closed the connection (between requests: a normal end)."""


def _lower_set(value: str | Iterable[str] | None) -> set[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return {value.lower()}
    return {v.lower() for v in value}


@dataclass
class Rule:
    """One fault: a mode, its parameters, a filter and an optional count."""

    mode: str
    params: dict[str, Any]
    method: set[str] | None = None
    kind: set[str] | None = None
    key: str | None = None
    query: str | None = None
    ranged: bool | None = None
    count: int | None = None
    #: how many requests this rule faulted so far
    hits: int = 0
    released: threading.Event = field(default_factory=threading.Event)

    @property
    def unfiltered(self) -> bool:
        return (self.method is None and self.kind is None and self.key is None
                and self.query is None and self.ranged is None and self.count is None)

    def matches(self, req: Request) -> bool:
        if self.released.is_set() or (self.count is not None and self.hits >= self.count):
            return False
        if self.mode == "flip" and req.method.upper() == "HEAD":
            return False  # no body to flip
        if self.method is not None and req.method.lower() not in self.method:
            return False
        if self.kind is not None and req.kind.lower() not in self.kind:
            return False
        if self.key is not None and (req.key is None or self.key not in req.key):
            return False
        if self.query is not None and self.query not in req.query:
            return False
        if self.ranged is not None and self.ranged != (req.header("range") is not None):
            return False
        return True


@dataclass
class Request:
    """One request the proxy saw (and what it did to it)."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    bucket: str | None
    key: str | None
    query: str
    kind: str
    time: float
    #: the mode applied to it, or None if it was forwarded untouched
    fault: str | None = None

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    @property
    def range(self) -> str | None:
        return self.header("range")


def s3_kind(method: str, bucket: str | None, key: str | None, query: str,
            headers: dict[str, str]) -> str:
    """The S3 API operation of a path-style request (best effort, enough for tests)."""
    q = urllib.parse.parse_qs(query, keep_blank_values=True)
    copy = "x-amz-copy-source" in headers
    m = method.upper()
    if bucket is None:
        return "ListBuckets" if m == "GET" else f"{m}Service"
    if key is None:
        if m == "GET":
            if "list-type" in q:
                return "ListObjectsV2"
            if "uploads" in q:
                return "ListMultipartUploads"
            if "location" in q:
                return "GetBucketLocation"
            return "ListObjects"
        if m == "HEAD":
            return "HeadBucket"
        if m == "PUT":
            return "CreateBucket"
        if m == "POST" and "delete" in q:
            return "DeleteObjects"
        if m == "DELETE":
            return "DeleteBucket"
        return f"{m}Bucket"
    if m == "GET":
        return "ListParts" if "uploadId" in q else "GetObject"
    if m == "HEAD":
        return "HeadObject"
    if m == "PUT":
        if "partNumber" in q and "uploadId" in q:
            return "UploadPartCopy" if copy else "UploadPart"
        return "CopyObject" if copy else "PutObject"
    if m == "POST":
        if "uploads" in q:
            return "CreateMultipartUpload"
        if "uploadId" in q:
            return "CompleteMultipartUpload"
        return "PostObject"
    if m == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in q else "DeleteObject"
    return f"{m}Object"


def _unsent(sock: socket.socket) -> int:
    """Bytes still in the kernel's send queue (Linux TIOCOUTQ); 0 if unknown."""
    try:
        buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
        return int(struct.unpack("i", buf)[0])
    except OSError:
        return 0


def _rst(sock: socket.socket, drain: float = 0.0) -> None:
    """Close with SO_LINGER 0: the peer sees a connection reset, not a clean end. With
    ``drain``, first wait (at most that long) until what was sent has left, since a
    reset throws away whatever is still queued."""
    deadline = time.monotonic() + drain
    while drain and _unsent(sock) > 0 and time.monotonic() < deadline:
        time.sleep(0.002)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def _read_line(rfile: Any) -> bytes:
    line = rfile.readline(_MAX_LINE + 1)
    if len(line) > _MAX_LINE:
        raise ValueError("header line too long")
    return bytes(line)


def _read_headers(rfile: Any) -> list[tuple[str, str]]:
    headers: list[tuple[str, str]] = []
    while True:
        line = _read_line(rfile)
        if not line:
            raise _Closed("connection closed inside the headers")
        if line in (b"\r\n", b"\n"):
            return headers
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))


def _hdict(headers: list[tuple[str, str]]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers}


def _read_exact(rfile: Any, n: int) -> bytes:
    data = rfile.read(n)
    if len(data) != n:
        raise _Closed(f"connection closed after {len(data)} of {n} body bytes")
    return bytes(data)


def _iter_chunked_raw(rfile: Any) -> Iterator[bytes]:
    """The raw bytes of a chunked body, piece by piece (framing included)."""
    while True:
        size_line = _read_line(rfile)
        if not size_line:
            raise _Closed("connection closed inside a chunked body")
        yield size_line
        size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers, then the empty line
                line = _read_line(rfile)
                if not line:
                    raise _Closed("connection closed inside chunked trailers")
                yield line
                if line in (b"\r\n", b"\n"):
                    return
        yield _read_exact(rfile, size + 2)


def _dechunk(raw: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        end = raw.index(b"\n", pos)
        size = int(raw[pos:end].split(b";", 1)[0].strip() or b"0", 16)
        pos = end + 1
        if size == 0:
            return bytes(out)
        out += raw[pos:pos + size]
        pos += size + 2


def _s3_error_xml(code: str, message: str, resource: str = "") -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{resource}</Resource><RequestId>faultproxy</RequestId></Error>"
    ).encode()


_REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 409: "Conflict", 411: "Length Required",
            412: "Precondition Failed", 413: "Payload Too Large", 416: "Range Not Satisfiable",
            429: "Too Many Requests", 500: "Internal Server Error", 501: "Not Implemented",
            502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


class _Upstream:
    """One connection to the upstream server, reopened when it closed."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.sock: socket.socket | None = None
        self.rfile: Any = None

    def close(self) -> None:
        if self.rfile is not None:
            try:
                self.rfile.close()
            except OSError:
                pass
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = self.rfile = None

    def _connect(self) -> None:
        self.close()
        self.sock = socket.create_connection((self.host, self.port), timeout=60)
        self.rfile = self.sock.makefile("rb")

    def exchange(self, head: bytes, body: bytes, method: str
                 ) -> tuple[bytes, list[tuple[str, str]], bytes]:
        """Send one request, return (status line, headers, decoded body)."""
        for attempt in (0, 1):
            fresh = self.sock is None
            if fresh:
                self._connect()
            assert self.sock is not None
            try:
                self.sock.sendall(head + body)
                status_line = _read_line(self.rfile)
                if not status_line:
                    raise _Closed("upstream closed")
            except (OSError, _Closed):
                self.close()
                if fresh or attempt:
                    raise
                continue  # a kept-alive connection the server had closed: once more
            break
        while True:
            headers = _read_headers(self.rfile)
            code = int(status_line.split()[1])
            if code >= 200 or code == 101:
                break
            status_line = _read_line(self.rfile)  # skip 1xx interim answers
        h = _hdict(headers)
        if method == "HEAD" or code in (204, 304):
            data = b""
        elif "chunked" in h.get("transfer-encoding", "").lower():
            data = _dechunk(b"".join(_iter_chunked_raw(self.rfile)))
        elif "content-length" in h:
            data = _read_exact(self.rfile, int(h["content-length"]))
        else:
            data = bytes(self.rfile.read())
            h["connection"] = "close"
        if h.get("connection", "").lower() == "close" or status_line.startswith(b"HTTP/1.0"):
            self.close()
        return status_line, headers, data


class FaultProxy:
    """See the module docstring. ``start()`` / ``stop()``, or use the ``fault_proxy``
    fixture, which does both."""

    def __init__(self, upstream: str, host: str = "127.0.0.1") -> None:
        parts = urllib.parse.urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.host = host
        self.port = 0
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        #: every request seen, in arrival order
        self.log: list[Request] = []
        self._rules: list[Rule] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._upstreams: set[_Upstream] = set()
        self._threads: list[threading.Thread] = []
        self._accept_thread: threading.Thread | None = None
        #: requests being served now (from their head read to their answer relayed or
        #: their connection reset), and the most at once since ``reset_counts``
        self.in_flight = 0
        self.max_in_flight = 0
        self._counted = threading.local()

    # ------------------------------------------------------------------ public API

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def set(self, mode: str, *, method: str | Iterable[str] | None = None,
            kind: str | Iterable[str] | None = None, key: str | None = None,
            query: str | None = None, ranged: bool | None = None,
            count: int | None = None, **params: Any) -> Rule:
        """Replace every fault by this one; returns the rule (its ``hits`` counts)."""
        self.clear()
        return self.add(mode, method=method, kind=kind, key=key, query=query,
                        ranged=ranged, count=count, **params)

    def add(self, mode: str, *, method: str | Iterable[str] | None = None,
            kind: str | Iterable[str] | None = None, key: str | None = None,
            query: str | None = None, ranged: bool | None = None,
            count: int | None = None, **params: Any) -> Rule:
        """Add a fault beside the current ones (the first matching rule applies)."""
        if mode not in MODES:
            raise ValueError(f"unknown fault mode {mode!r}; one of {MODES}")
        rule = Rule(mode, dict(params), _lower_set(method), _lower_set(kind), key, query,
                    ranged, count)
        with self._lock:
            self._rules.append(rule)
            self._update_listening()
        log.info("faultproxy: %s %s", mode, rule)
        return rule

    def clear(self) -> None:
        """No more faults: requests pass; held (``hang``) requests are closed; a refused
        port listens again."""
        with self._lock:
            for rule in self._rules:
                rule.released.set()
            self._rules.clear()
            self._update_listening()

    def seen(self, method: str | None = None, kind: str | None = None, *,
             ranged: bool | None = None, fault: str | bool | None = None) -> int:
        """How many requests matched: ``fault=True`` only faulted ones, a mode name only
        those faulted with that mode, ``False`` only untouched ones."""
        with self._lock:
            reqs = list(self.log)
        n = 0
        for r in reqs:
            if method is not None and r.method.upper() != method.upper():
                continue
            if kind is not None and r.kind != kind:
                continue
            if ranged is not None and ranged != (r.range is not None):
                continue
            if fault is True and r.fault is None or fault is False and r.fault is not None:
                continue
            if isinstance(fault, str) and r.fault != fault:
                continue
            n += 1
        return n

    def faults(self, mode: str | None = None) -> int:
        """How many requests were faulted (with ``mode``, or any)."""
        return self.seen(fault=mode if mode is not None else True)

    def requests(self, **kw: Any) -> list[Request]:
        """The recorded requests whose attributes equal ``kw`` (e.g. kind="GetObject")."""
        with self._lock:
            reqs = list(self.log)
        return [r for r in reqs if all(getattr(r, k) == v for k, v in kw.items())]

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()
            self.log.clear()
            self.max_in_flight = self.in_flight

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> bool:
        """Poll ``predicate(self)`` until true (True) or the timeout (False)."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    # ------------------------------------------------------------------ life

    def start(self) -> FaultProxy:
        with self._lock:
            self._open_listener()
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True,
                                               name=f"faultproxy-{self.port}")
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Stop listening, close every connection, join every thread (bounded)."""
        self._stopping.set()
        self.clear()
        with self._lock:
            self._close_listener()
        if self._accept_thread is not None:
            self._accept_thread.join(5)
        with self._lock:
            conns = list(self._conns)
            socks = conns + [u.sock for u in self._upstreams if u.sock is not None]
            threads = list(self._threads)
        for c in socks:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in threads:
            t.join(5)
        alive = [t for t in threads if t.is_alive()]
        if alive:
            log.warning("faultproxy: %d connection threads still alive at stop", len(alive))

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ listening

    def _open_listener(self) -> None:
        """Caller holds the lock. Binds the same port again after a ``refuse``."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for attempt in range(50):
            try:
                s.bind((self.host, self.port))
                break
            except OSError:
                if attempt == 49 or not self.port:
                    s.close()
                    raise
                time.sleep(0.02)
        s.listen(128)
        self.port = s.getsockname()[1]
        self._listener = s

    def _close_listener(self) -> None:
        """Caller holds the lock. Connections waiting in the backlog are reset."""
        if self._listener is not None:
            try:  # stops listening at once (a plain close waits for a select() on it)
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None

    def _update_listening(self) -> None:
        """Caller holds the lock: listen unless an unfiltered ``refuse`` rule is on."""
        want = not self._stopping.is_set() and not any(
            r.mode == "refuse" and r.unfiltered for r in self._rules)
        if want and self._listener is None:
            self._open_listener()
        elif not want and self._listener is not None:
            self._close_listener()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                listener = self._listener
            if listener is None:
                time.sleep(0.02)
                continue
            try:
                ready, _, _ = select.select([listener], [], [], 0.05)
                if not ready:
                    continue
                conn, _addr = listener.accept()
            except (OSError, ValueError):
                continue  # closed under us by a refuse, or by stop
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                 name=f"faultproxy-conn-{self.port}")
            with self._lock:
                if self._stopping.is_set():
                    conn.close()
                    return
                self._conns.add(conn)
                self._threads = [x for x in self._threads if x.is_alive()]
                self._threads.append(t)
            t.start()

    # ------------------------------------------------------------------ one connection

    def _match(self, req: Request) -> Rule | None:
        """Record the request; the first rule that matches it (counted as a hit)."""
        with self._lock:
            self.counts[(req.method, req.kind)] += 1
            self.log.append(req)
            for rule in self._rules:
                if rule.matches(req):
                    rule.hits += 1
                    req.fault = rule.mode
                    return rule
        return None

    def _serve(self, conn: socket.socket) -> None:
        rfile = conn.makefile("rb")
        upstream = _Upstream(self.upstream_host, self.upstream_port)
        with self._lock:
            self._upstreams.add(upstream)
        reset = False
        try:
            while not self._stopping.is_set():
                try:
                    keep = self._one_request(conn, rfile, upstream)
                finally:
                    if getattr(self._counted, "on", False):
                        self._counted.on = False
                        with self._lock:
                            self.in_flight -= 1
                if keep is None:  # the connection was reset on purpose
                    reset = True
                    return
                if not keep:
                    return
        except (_Closed, OSError, ValueError) as exc:
            log.debug("faultproxy: connection ended: %s", exc)
        finally:
            upstream.close()
            with self._lock:
                self._conns.discard(conn)
                self._upstreams.discard(upstream)
            try:
                rfile.close()
            except OSError:
                pass
            if not reset:
                try:
                    conn.close()
                except OSError:
                    pass

    def _reset(self, conn: socket.socket, rfile: Any, drain: float = 0.0) -> None:
        try:
            rfile.close()
        except OSError:
            pass
        _rst(conn, drain)

    def _one_request(self, conn: socket.socket, rfile: Any, upstream: _Upstream
                     ) -> bool | None:
        """Serve one request: True to keep the connection, False to close it, None after a
        deliberate reset."""
        line = _read_line(rfile)
        if not line:
            return False
        if line in (b"\r\n", b"\n"):
            return True
        method, target, version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        headers = _read_headers(rfile)
        h = _hdict(headers)
        split = urllib.parse.urlsplit(target)
        parts = urllib.parse.unquote(split.path).lstrip("/").split("/", 1)
        bucket = parts[0] or None
        key = parts[1] if len(parts) > 1 and parts[1] else None
        req = Request(method, target, headers, bucket, key, split.query,
                      s3_kind(method, bucket, key, split.query, h), time.monotonic())
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self._counted.on = True
        rule = self._match(req)
        keep_alive = h.get("connection", "").lower() != "close" and version != "HTTP/1.0"

        if rule is not None and rule.mode == "refuse":
            self._reset(conn, rfile)
            return None

        chunked = "chunked" in h.get("transfer-encoding", "").lower()
        length = int(h.get("content-length") or 0)
        has_body = chunked or length > 0
        if h.get("expect", "").lower() == "100-continue" and has_body:
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

        phase = None
        if rule is not None and rule.mode == "reset_body":
            phase = rule.params.get("phase", "auto")
            if phase == "auto":
                phase = "request" if has_body else "response"
        if phase == "request":
            total = length or int(h.get("x-amz-decoded-content-length") or 0) or 131072
            at = int(rule.params.get("at", total // 2))  # type: ignore[union-attr]
            got = 0
            if chunked:
                for piece in _iter_chunked_raw(rfile):
                    got += len(piece)
                    if got >= at:
                        break
            else:
                _read_exact(rfile, min(at, length))
            self._reset(conn, rfile)
            return None

        if chunked:
            body = b"".join(_iter_chunked_raw(rfile))
        else:
            body = _read_exact(rfile, length) if length else b""

        if rule is not None and rule.mode == "hang":
            seconds = rule.params.get("seconds")
            released = rule.released.wait(seconds)
            if seconds is None or released or self._stopping.is_set():
                return False  # close; the client has given up long ago
            # a latency only: go on and forward it

        if rule is not None and rule.mode in ("slowdown", "status"):
            if rule.mode == "slowdown":
                status, code = 503, "SlowDown"
                message = rule.params.get("message", "Please reduce your request rate.")
            else:
                status = int(rule.params.get("status", 400))
                code = str(rule.params.get("code", "InvalidArgument"))
                message = str(rule.params.get("message", "Injected by faultproxy"))
            payload = _s3_error_xml(code, message, split.path)
            out = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
                   "Content-Type: application/xml",
                   f"Content-Length: {0 if method == 'HEAD' else len(payload)}",
                   "x-amz-request-id: faultproxy",
                   f"Connection: {'keep-alive' if keep_alive else 'close'}"]
            conn.sendall(("\r\n".join(out) + "\r\n\r\n").encode()
                         + (b"" if method == "HEAD" else payload))
            return keep_alive

        # forward
        fwd = [f"{method} {target} HTTP/1.1"]
        fwd += [f"{k}: {v}" for k, v in headers
                if k.lower() not in _HOP_HEADERS or k.lower() == "transfer-encoding"]
        head = ("\r\n".join(fwd) + "\r\n\r\n").encode("latin-1")
        status_line, rheaders, data = upstream.exchange(head, body, method.upper())

        status_code = int(status_line.split()[1])
        if rule is not None and rule.mode == "flip" and data and 200 <= status_code < 300:
            n = max(1, int(rule.params.get("nbytes", 16)))
            offset = int(rule.params.get("offset", max(0, len(data) // 2 - n // 2)))
            buf = bytearray(data)
            for i in range(offset, min(offset + n, len(buf))):
                buf[i] ^= 0xFF
            data = bytes(buf)

        no_body = method.upper() == "HEAD" or status_code in (204, 304)
        out_headers = [(k, v) for k, v in rheaders
                       if k.lower() not in _HOP_HEADERS and k.lower() != "content-length"]
        if no_body:
            out_headers += [(k, v) for k, v in rheaders if k.lower() == "content-length"]
        else:
            out_headers.append(("Content-Length", str(len(data))))
        out_headers.append(("Connection", "keep-alive" if keep_alive else "close"))
        resp_head = (status_line.decode("latin-1").rstrip("\r\n") + "\r\n"
                     + "".join(f"{k}: {v}\r\n" for k, v in out_headers) + "\r\n").encode("latin-1")

        if rule is not None and rule.mode == "late":
            rule.released.wait(rule.params.get("seconds"))
            if self._stopping.is_set():
                return False
        if phase == "response":
            # the server did the work; the client gets part of the answer, or (for an
            # answer without a body) none of it
            if data:
                at = int(rule.params.get("at", len(data) // 2))  # type: ignore[union-attr]
                conn.sendall(resp_head + data[:at])
            self._reset(conn, rfile, drain=2.0)
            return None
        conn.sendall(resp_head + (b"" if no_body else data))
        return keep_alive


@pytest.fixture
def fault_proxy(moto_server: str) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of the session's moto server (function scope);
    stopped (all its threads and sockets) at teardown."""
    proxy = FaultProxy(moto_server).start()
    try:
        yield proxy
    finally:
        proxy.stop()


__all__ = ["FaultProxy", "Rule", "Request", "fault_proxy", "s3_kind", "MODES"]
