"""moto's S3 server with a request counter in front of it.

Runs exactly what ``python -m moto.server -H HOST -p PORT`` runs (moto's WSGI app under
werkzeug's threaded server), wrapped in a WSGI middleware that classifies every S3 request
by its operation (PutObject, GetObject, UploadPart, CopyObject, ListObjectsV2, ...) and
counts it with the bytes it carried. No proxy hop, no request bodies kept: the counting
costs nothing measurable.

    python -m bench.motoserver -H 127.0.0.1 -p PORT

``GET /_bench/requests`` returns the counts as JSON, ``POST /_bench/reset`` zeroes them.
Requests whose User-Agent contains ``deltafs-bench-driver`` (the driver's own listing of
the bucket to measure storage) are not counted.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections import defaultdict
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs

DRIVER_AGENT = "deltafs-bench-driver"


def classify(method: str, path: str, query: str, headers: dict[str, str]) -> str:
    """The S3 operation name of a path-style request."""
    q = parse_qs(query, keep_blank_values=True)
    parts = path.lstrip("/").split("/", 1)
    bucket = parts[0]
    key = parts[1] if len(parts) > 1 else ""
    if not bucket:
        return "ListBuckets" if method == "GET" else f"{method} /"
    if not key:
        if method == "GET":
            if "list-type" in q:
                return "ListObjectsV2"
            sub = [k for k in q if k not in ("prefix", "delimiter", "marker", "max-keys",
                                              "encoding-type", "continuation-token",
                                              "start-after", "fetch-owner")]
            if sub:
                return "GetBucket" + sub[0].title().replace("-", "")
            return "ListObjects"
        if method == "HEAD":
            return "HeadBucket"
        if method == "PUT":
            return "CreateBucket" if not q else "PutBucket" + next(iter(q)).title()
        if method == "POST" and "delete" in q:
            return "DeleteObjects"
        if method == "DELETE":
            return "DeleteBucket"
        return f"{method} bucket"
    copy = "x-amz-copy-source" in headers
    if method == "GET":
        return "GetObjectTagging" if "tagging" in q else "GetObject"
    if method == "HEAD":
        return "HeadObject"
    if method == "PUT":
        if "partNumber" in q:
            return "UploadPartCopy" if copy else "UploadPart"
        if "tagging" in q:
            return "PutObjectTagging"
        return "CopyObject" if copy else "PutObject"
    if method == "POST":
        if "uploads" in q:
            return "CreateMultipartUpload"
        if "uploadId" in q:
            return "CompleteMultipartUpload"
        return "PostObject"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in q else "DeleteObject"
    return f"{method} object"


class Counter:
    """WSGI middleware: counts requests by operation; serves /_bench/*."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.counts: dict[str, dict[str, int]] = defaultdict(
            lambda: {"count": 0, "bytes_in": 0, "bytes_out": 0})

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self.lock:
            return {k: dict(v) for k, v in sorted(self.counts.items())}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if path.startswith("/_bench/"):
            if path == "/_bench/reset" and method == "POST":
                with self.lock:
                    self.counts.clear()
                body = b"{}"
            else:
                body = json.dumps(self.snapshot()).encode()
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        if DRIVER_AGENT in environ.get("HTTP_USER_AGENT", "") or path.startswith("/moto-api"):
            return self.app(environ, start_response)
        headers = {k[5:].lower().replace("_", "-"): v for k, v in environ.items()
                   if k.startswith("HTTP_")}
        op = classify(method, path, environ.get("QUERY_STRING", ""), headers)
        try:
            nin = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            nin = 0
        # streaming uploads (aws-chunked) announce the payload size separately
        nin = int(headers.get("x-amz-decoded-content-length", nin) or nin)
        out = {"n": 0}

        def sr(status: str, resp_headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            for k, v in resp_headers:
                if k.lower() == "content-length" and method != "HEAD":
                    try:
                        out["n"] = int(v)
                    except ValueError:
                        pass
            return start_response(status, resp_headers, exc_info) if exc_info else \
                start_response(status, resp_headers)

        result = self.app(environ, sr)
        with self.lock:
            c = self.counts[op]
            c["count"] += 1
            c["bytes_in"] += nin
            c["bytes_out"] += out["n"]
        return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=5000)
    args = parser.parse_args(argv)
    os.environ.setdefault("MOTO_PORT", str(args.port))

    from moto.moto_server.werkzeug_app import (DomainDispatcherApplication,
                                               MotoRequestHandler, create_backend_app)
    from werkzeug.serving import run_simple

    if os.environ.get("DELTAFS_BENCH_INDEXED_LIST") == "1":
        from .indexedlist import install

        install()  # LIST pages in O(page), as S3 answers them (see bench/indexedlist.py)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = DomainDispatcherApplication(create_backend_app)
    app.debug = True  # type: ignore[attr-defined]
    run_simple(args.host, args.port, Counter(app), threaded=True,
               request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
