"""The S3 object store, through boto3.

Every botocore/boto3 exception is translated into a :mod:`deltafs.errors` class at this
boundary, so the engine, the filesystem and the CLI only ever handle our own error types
and can print one actionable line.
"""
from __future__ import annotations

import contextlib
import datetime
import http.client
import io
import logging
import math
import os
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Iterator, Mapping

import boto3
import botocore.exceptions as bce
import botocore.session
import urllib3.exceptions
from botocore.config import Config
from botocore.parsers import ResponseParserFactory
from botocore.utils import parse_timestamp

from deltafs import options
from deltafs.errors import (
    AccessDenied,
    AlreadyExists,
    BucketNotFound,
    Changed,
    ConfigError,
    IntegrityError,
    InvalidName,
    NotFound,
    Rejected,
    StoreError,
    Unreachable,
)
from deltafs.format import MANIFEST_NAME, REFERENCE_NAME
from deltafs.store.base import Listing, ObjectInfo, ObjectStore
from deltafs.store.gate import RequestGate

log = logging.getLogger(__name__)

#: connections kept open: one per worker thread that may send a request at once (trio's
#: default thread limit is 40). At 16 the scale benchmark's 10,000 chained deltas logged
#: "Connection pool is full, discarding connection": each such request's connection is
#: closed after it, and the next one pays a new connection (a TLS handshake on real S3)
MAX_POOL = 40

MiB = 2**20
GiB = 2**30
#: chunk size for streaming GET bodies to disk: bounded memory whatever the object size
DOWNLOAD_CHUNK = 1 * MiB
#: S3 limits: CopyObject handles sources up to 5 GiB; a multipart upload has at most
#: 10,000 parts of at least 5 MiB (except the last)
MAX_SINGLE_COPY = 5 * GiB
MAX_PARTS = 10_000
MIN_PART = 5 * MiB
#: part size for server-side multipart copies of sources over 5 GiB
COPY_PART_SIZE = 512 * MiB
#: parts of one multipart upload (or ranges of one large GET) in flight at once. Each
#: streams from (or to) its own range of the file, so what this costs in memory is a few
#: socket buffers, not a part: on a link with latency one stream leaves it idle
TRANSFER_CONCURRENCY = 4
#: a large GET whose first part came at least this fast goes on in one stream
ONE_STREAM_ENOUGH = 150e6  # bytes per second
#: how often a conditional write is retried when S3 answers 409 ConditionalRequestConflict
#: (a concurrent conditional write on the same key was in flight; AWS says retry)
CONFLICT_RETRIES = 3

#: a GET whose body breaks off (reset, read timeout) is resumed with a ranged GET guarded
#: by the ETag of the first answer; it gives up after this many failures in a row that
#: brought no new byte, or after GET_MAX_RESUMES resumes in all
GET_RESUMES = 5
GET_MAX_RESUMES = 100
#: first pause before a resume, doubled per failure in a row (0.1, 0.2, 0.4, 0.8 s)
GET_BACKOFF = 0.1
#: a body that fails the checksum S3 sent with it (x-amz-checksum-*) is read again from
#: the start this many times before it is reported as corrupt
GET_CHECKSUM_RETRIES = 2

#: classes that bill every object as at least :data:`MIN_BILLED_SIZE` bytes
MIN_BILLED_CLASSES = frozenset({"STANDARD_IA", "ONEZONE_IA", "GLACIER_IR"})
MIN_BILLED_SIZE = 128 * 1024
#: ``chain.HIDDEN``, a directory's prefix of chain blobs and sweep objects (chain.py
#: imports the store layer, so the name cannot come from there; a test checks they agree)
HIDDEN_DIR = ".deltafs"


def write_settings(
    sse: str | None, sse_kms_key_id: str | None, storage_class: str | None
) -> tuple[str | None, str | None, str | None]:
    """The S3 write settings checked and spelled as S3 wants them (``aes256`` ->
    ``AES256``, ``standard_ia`` -> ``STANDARD_IA``); empty means unset. Raises
    :class:`ConfigError` saying why for a setting that cannot work (the checks are the
    options table's: :func:`deltafs.options.sse`, ``storage_class``, ``kms_key_problem``)."""
    sse = (sse or "").strip() or None
    key_id = (sse_kms_key_id or "").strip() or None
    cls = (storage_class or "").strip() or None
    try:
        sse = options.sse(sse) if sse is not None else None
        cls = options.storage_class(cls) if cls is not None else None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    problem = options.kms_key_problem(sse, key_id)
    if problem:
        raise ConfigError(problem)
    return sse, key_id, cls


def stays_standard(key: str) -> bool:
    """Whether ``key`` is one of the objects deltafs keeps in STANDARD whatever storage
    class is configured (see :class:`S3Store`): a directory's reference, its sweep
    objects (under ``.deltafs/``, beside the chain blobs, which take the class), a
    directory marker, a listing manifest. The format reserves these names, so no file is
    ever stored under one."""
    name = key.rpartition("/")[2]
    hidden = key.startswith(f"{HIDDEN_DIR}/") or f"/{HIDDEN_DIR}/" in key
    return (
        key.endswith("/")
        or name in (REFERENCE_NAME, MANIFEST_NAME)
        or (hidden and not _BLOB_NAME.match(name))
    )


#: a chain blob's name (``chain.blob_name``: content and base SHA-256s)
_BLOB_NAME = re.compile(r"^[0-9a-f]{64}\.[0-9a-f]{64}$")


#: API operation name -> the category reported by :meth:`S3Store.stats`
_OP_CATEGORY = {
    "HeadObject": "HEAD",
    "HeadBucket": "HEAD",
    "GetObject": "GET",
    "PutObject": "PUT",
    "ListObjectsV2": "LIST",
    "ListObjects": "LIST",
    "CopyObject": "COPY",
    "DeleteObject": "DELETE",
    "DeleteObjects": "DELETE",
    "CreateMultipartUpload": "MULTIPART",
    "UploadPart": "MULTIPART",
    "UploadPartCopy": "MULTIPART",
    "CompleteMultipartUpload": "MULTIPART",
    "AbortMultipartUpload": "MULTIPART",
}


def _outcome(http_response: Any) -> str:
    """How an API call ended, from its final HTTP answer (None: no answer at all)."""
    status = getattr(http_response, "status_code", None)
    if status is None:
        return "network_error"
    if status < 300 or status == 304:
        return "ok"
    if status == 404:
        return "not_found"
    if status == 412:
        return "precondition_failed"
    if status in (429, 503):
        return "throttled"
    return "client_error" if status < 500 else "server_error"


#: S3 error codes that mean "your credentials are wrong or not allowed to do this"
_DENIED_CODES = {
    "403",
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AccountProblem",
    "InvalidSecurity",
}

#: 4xx error codes that are worth retrying: S3 asks for a retry (timeouts, throttling,
#: a conflicting operation in flight) or a new attempt would start afresh (an upload id
#: someone aborted). Every other 4xx is the server refusing the request for good.
_TRANSIENT_4XX_CODES = {
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "LimitExceededException",
    "ConditionalRequestConflict",
    "OperationAborted",
    "NoSuchUpload",
}

#: botocore exceptions that mean "no usable credentials could be found or loaded"
_CREDENTIAL_ERRORS: tuple[type[Exception], ...] = tuple(
    cls
    for cls in (
        getattr(bce, name, None)
        for name in (
            "NoCredentialsError",
            "PartialCredentialsError",
            "CredentialRetrievalError",
            "NoAuthTokenError",
            "SSOError",
            "TokenRetrievalError",
            "UnauthorizedSSOTokenError",
        )
    )
    if isinstance(cls, type)
)

#: botocore exceptions that mean "the endpoint could not be reached or stopped answering"
_NETWORK_ERRORS: tuple[type[Exception], ...] = (bce.ConnectionError, bce.HTTPClientError)

#: what reading a response body raises when the connection breaks off in the middle
#: (a reset, a read timeout, fewer bytes than Content-Length); botocore wraps urllib3's
#: errors in these
_BODY_ERRORS: tuple[type[Exception], ...] = tuple(
    cls
    for cls in (
        getattr(bce, name, None)
        for name in (
            "ResponseStreamingError",
            "ReadTimeoutError",
            "IncompleteReadError",
            "ConnectionClosedError",
            "HTTPClientError",
            "ConnectionError",
        )
    )
    if isinstance(cls, type)
) + (urllib3.exceptions.HTTPError, http.client.HTTPException)

#: the body did not match the checksum header S3 sent with it (botocore's validation)
_CHECKSUM_ERRORS: tuple[type[Exception], ...] = tuple(
    cls for cls in (getattr(bce, "FlexibleChecksumError", None),) if isinstance(cls, type)
)


class _Slice(io.RawIOBase):
    """Bytes ``[start, start + length)`` of a file as a seekable stream: a part goes up
    straight from the file, and botocore can rewind it to sign it or to retry."""

    def __init__(self, path: Path, start: int, length: int) -> None:
        super().__init__()
        self._f = open(path, "rb")
        self._start, self._length, self._pos = start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def __len__(self) -> int:
        return self._length

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = min(max(0, base + offset), self._length)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        left = self._length - self._pos
        n = left if size is None or size < 0 else min(size, left)
        if n <= 0:
            return b""
        data = os.pread(self._f.fileno(), n, self._start + self._pos)
        self._pos += len(data)
        return data

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()


def _real_file(out: Any) -> bool:
    """Whether ``out`` is backed by a file descriptor (a BytesIO has ``fileno`` too)."""
    try:
        out.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return False
    return True


def _in_parallel(fn: Any, jobs: list[tuple[Any, ...]]) -> list[Any]:
    """``fn(*job)`` for every job, ``TRANSFER_CONCURRENCY`` at a time; results in job
    order. The first failure is raised once the jobs already running have ended (the
    rest never start)."""
    if len(jobs) <= 1:
        return [fn(*job) for job in jobs]
    results: list[Any] = [None] * len(jobs)
    with ThreadPoolExecutor(min(TRANSFER_CONCURRENCY, len(jobs)),
                            thread_name_prefix="s3-part") as pool:
        futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
        try:
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    return results


def _one_line(text: object) -> str:
    """Error texts from servers may span lines; our messages never do."""
    return " ".join(str(text).split())


def _show_key(key: str) -> str:
    """A key as it goes into a one-line message: control characters (a newline in a
    file name) escaped, everything else as it is."""
    if key.isprintable():
        return key
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in key)


def _strip_etag(etag: str | None) -> str:
    return (etag or "").strip('"')


def _stored(metadata: Mapping[str, str]) -> dict[str, str]:
    """Metadata as S3 will hand it back (keys lowercased), for the ObjectInfo we return."""
    return {str(k).lower(): str(v) for k, v in metadata.items()}


def _network_reason(exc: BaseException) -> str:
    """The most specific human reason behind a network failure ("Connection refused",
    "read timeout"), digging through botocore's and urllib3's wrappers."""
    if isinstance(exc, bce.ConnectTimeoutError):
        return "connect timeout"
    if isinstance(exc, bce.ReadTimeoutError):
        return "read timeout"
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cur = todo.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.strerror:
            return cur.strerror
        inner = getattr(cur, "kwargs", {}).get("error")
        for nxt in (inner, cur.__cause__, cur.__context__, getattr(cur, "reason", None)):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    return _one_line(exc)


class _SourceChanged(StoreError):
    """Internal: a ``CopySourceIfMatch`` guard failed (the source was replaced)."""


def _is_precondition(exc: BaseException) -> bool:
    if not isinstance(exc, bce.ClientError):
        return False
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status == 412 or exc.response.get("Error", {}).get("Code") == "PreconditionFailed"


#: the form S3 gives every LastModified of a LIST page in: ISO 8601, UTC, milliseconds
_ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z\Z")


def _timestamp(value: Any) -> datetime.datetime:
    """botocore's timestamp parser, without dateutil for the ISO form of LIST pages:
    dateutil took ~40 µs per key, half of the daemon's time for a cold listing of a
    large directory (issue 11: 1.7 of 3.4 CPU-s for 20,000 keys); ``fromisoformat``
    takes 0.2. Any other form (the HTTP dates of HEAD headers) goes to botocore's."""
    if isinstance(value, str) and _ISO_UTC.match(value):
        return datetime.datetime.fromisoformat(value)
    return parse_timestamp(value)  # type: ignore[no-any-return]


class S3Store(ObjectStore):
    """A bucket on S3 or any S3-compatible server (MinIO, moto, Ceph, R2, …).

    The boto3 client is created once: clients are thread-safe (sessions are not), and the
    engine calls us from many worker threads at once.

    Write settings (docs/architecture.md, "S3 settings"). ``sse`` (``AES256`` or
    ``aws:kms``, with ``sse_kms_key_id`` for a key of one's own) goes on every request
    that makes an object: PutObject, CreateMultipartUpload, and CopyObject, since a copy
    does not keep its source's encryption (nor its storage class) unless asked; renames
    and attribute changes are copies. ``storage_class`` goes on the same requests, by
    the role of the object, which the key tells (:func:`stays_standard`):

    - file content (a delta or a file stored whole, chain pointers and chain blobs
      included): the configured class. In deltafs's own format the blobs hold nearly
      all of a directory's delta bytes: a class that skipped them would save nothing;
    - a directory's ``reference.bin`` and its sweep objects (``.deltafs/``): STANDARD.
      A reference is read by every cold delta read of its directory on every machine
      (the infrequent-access classes bill each GB read and 30 days at least, GLACIER_IR
      90), it is one object per directory, and REDUCED_REDUNDANCY would put the one
      object every delta needs at risk;
    - directory markers (``dir/``) and listing manifests: STANDARD. Tiny, rewritten often;
    - any object under 128 KiB, when the class bills 128 KiB at least per object
      (STANDARD_IA, ONEZONE_IA, GLACIER_IR): STANDARD, which costs less for it (S3's own
      lifecycle transitions skip such objects too): files under the 64 KiB delta
      threshold, chain pointers and most zero-diff deltas.

    EXPRESS_ONEZONE is the one class of the directory buckets it exists in (STANDARD is
    refused there), so it goes on every object. Without ``storage_class`` no class is
    sent at all, and without ``sse`` no encryption header: the bucket's defaults apply.
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        multipart_threshold: int = 64 * MiB,
        part_size: int = 16 * MiB,
        max_pool: int = MAX_POOL,
        connect_timeout: float = 5,
        read_timeout: float = 60,
        max_attempts: int = 5,
        sse: str | None = None,
        sse_kms_key_id: str | None = None,
        storage_class: str | None = None,
    ) -> None:
        #: the write settings as sent (``None``: not sent); see the class docstring
        self.sse, self.sse_kms_key_id, self.storage_class = write_settings(
            sse, sse_kms_key_id, storage_class)
        self._sse_args: dict[str, str] = {}
        if self.sse is not None:
            self._sse_args["ServerSideEncryption"] = self.sse
        if self.sse_kms_key_id is not None:
            self._sse_args["SSEKMSKeyId"] = self.sse_kms_key_id
        self.bucket = bucket
        self.name = f"s3://{bucket}"
        self.multipart_threshold = max(multipart_threshold, 1)
        #: whether the server takes ``If-Match`` on DeleteObject (AWS since 2024, moto);
        #: switched off at the first 501/NotImplemented answer
        self.conditional_deletes = True
        self.part_size = max(part_size, MIN_PART)
        self.copy_part_size = COPY_PART_SIZE
        self._counts: Counter[str] = Counter()
        #: (category, outcome) -> API calls finished (counted after botocore's retries)
        self._outcomes: Counter[tuple[str, str]] = Counter()
        self._counts_lock = threading.Lock()

        core = botocore.session.get_session()
        parsers = ResponseParserFactory()
        parsers.set_parser_defaults(timestamp_parser=_timestamp)
        core.register_component("response_parser_factory", parsers)
        try:
            session = boto3.session.Session(
                botocore_session=core,
                profile_name=profile,
                aws_access_key_id=access_key,
                aws_secret_access_key=secret_key,
                region_name=region,
            )
        except bce.ProfileNotFound:
            raise ConfigError(f"AWS profile {profile!r} is not configured") from None
        except bce.BotoCoreError as exc:
            raise ConfigError(f"cannot load AWS configuration: {_one_line(exc)}") from None
        region_name = session.region_name or "us-east-1"

        def make_client(path_style: bool) -> Any:
            config = Config(
                retries={"max_attempts": max_attempts, "mode": "standard"},
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                max_pool_connections=max_pool,
                s3={"addressing_style": "path" if path_style else "auto"},
            )
            return session.client(
                "s3", endpoint_url=endpoint_url, region_name=region_name, config=config
            )

        try:
            client = make_client(path_style=endpoint_url is not None)
            # An endpoint may also come from AWS_ENDPOINT_URL(_S3) or the config file;
            # S3-compatible servers generally need path-style addressing then too.
            if endpoint_url is None and "amazonaws.com" not in (client.meta.endpoint_url or ""):
                client = make_client(path_style=True)
        except bce.BotoCoreError as exc:
            raise ConfigError(f"cannot configure the S3 client: {_one_line(exc)}") from None
        #: how many requests may be inside botocore at once (every thread); a mount
        #: narrows it while its event loop lags (deltafs.gatecontrol)
        self.gate = RequestGate(max_pool)
        client._make_api_call = self.gate.wrap(client._make_api_call)
        self._client = client
        self.endpoint: str = client.meta.endpoint_url
        client.meta.events.register("before-call.s3", self._count_call)
        client.meta.events.register("after-call.s3", self._count_outcome)
        client.meta.events.register("after-call-error.s3", self._count_outcome)
        log.debug("S3 store %s at %s (region %s)", self.name, self.endpoint, region_name)

    # -- bookkeeping ----------------------------------------------------------------------

    def _count_call(self, model: Any = None, **_: Any) -> None:
        """botocore ``before-call`` hook: one count per API call (pages included)."""
        name = getattr(model, "name", "?")
        with self._counts_lock:
            self._counts[_OP_CATEGORY.get(name, name)] += 1

    def stats(self) -> dict[str, int]:
        with self._counts_lock:
            return dict(self._counts)

    def _count_outcome(self, event_name: str = "", http_response: Any = None,
                       **_: Any) -> None:
        """botocore ``after-call`` / ``after-call-error`` hook: how each call ended."""
        name = event_name.rsplit(".", 1)[-1]
        key = (_OP_CATEGORY.get(name, name), _outcome(http_response))
        with self._counts_lock:
            self._outcomes[key] += 1

    def request_outcomes(self) -> dict[str, dict[str, int]]:
        """Finished API calls by category and outcome (``ok``, ``not_found``,
        ``precondition_failed``, ``throttled``, ``client_error``, ``server_error``,
        ``network_error``), for ``deltafs status`` and the metrics."""
        out: dict[str, dict[str, int]] = {}
        with self._counts_lock:
            for (op, outcome), n in self._outcomes.items():
                out.setdefault(op, {})[outcome] = n
        return out

    # -- write settings -------------------------------------------------------------------

    def storage_class_for(self, key: str, size: int) -> str | None:
        """The storage class an object of ``size`` bytes written as ``key`` gets (see
        the class docstring); ``None`` when no storage class is configured."""
        cls = self.storage_class
        if cls is None or cls == "EXPRESS_ONEZONE":
            return cls
        if stays_standard(key) or (cls in MIN_BILLED_CLASSES and size < MIN_BILLED_SIZE):
            return "STANDARD"
        if cls == "REDUCED_REDUNDANCY" and _BLOB_NAME.match(key.rpartition("/")[2]):
            return "STANDARD"  # every later version of its chain needs it, as a reference
        return cls

    def _write_args(self, key: str, size: int) -> dict[str, str]:
        """Encryption and storage class for a request that makes the object ``key``."""
        args = dict(self._sse_args)
        cls = self.storage_class_for(key, size)
        if cls is not None:
            args["StorageClass"] = cls
        return args

    # -- error translation ----------------------------------------------------------------

    def _what(self, op: str, key: str | None) -> str:
        return f"{op} {self._path(key)}" if key is not None else f"{op} {self.name}"

    def _path(self, key: str | None) -> str:
        return f"{self.name}/{_show_key(key)}" if key is not None else self.name

    def _translate(
        self, exc: BaseException, op: str, key: str | None, conditional: bool = False
    ) -> Exception:
        """Map one botocore/boto3 (or local file) exception to a deltafs error."""
        what = self._what(op, key)
        if isinstance(exc, bce.ClientError):
            err = exc.response.get("Error", {}) or {}
            code = str(err.get("Code") or "")
            message = _one_line(err.get("Message") or "")
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            detail = f"{code or status}" + (f": {message}" if message else "")
            if code == "NoSuchBucket":
                return BucketNotFound(
                    f"bucket {self.bucket!r} does not exist at {self.endpoint}"
                )
            if code in _DENIED_CODES or status == 403:
                return AccessDenied(
                    f"access denied: {what} ({code or status}); check the credentials"
                    " (AWS_ACCESS_KEY_ID/AWS_PROFILE) and the bucket policy"
                )
            if code in ("PreconditionFailed", "412") or status == 412:
                if conditional:
                    return AlreadyExists(f"{self._path(key)} already exists")
                return StoreError(f"S3 {what} failed: precondition failed ({code})")
            if code == "KeyTooLongError":
                return InvalidName(f"key too long for S3: {key!r}")
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                # a read of a missing key, or a copy whose source is gone; a bare 404 to
                # a write is the server refusing the URL (moto: a key with a newline)
                if op not in ("PUT", "COPY") or code == "NoSuchKey":
                    return NotFound(f"{self._path(key)} does not exist")
            if (
                400 <= status < 500
                and status not in (408, 429)
                and code not in _TRANSIENT_4XX_CODES
            ):
                # the server refuses this request for good (a key it will not store, an
                # invalid argument, a part too small, a 404 on a write): retrying the
                # same request cannot help
                return Rejected(f"S3 {what} refused: {detail} (HTTP {status})")
            return StoreError(f"S3 {what} failed: {detail}")
        if isinstance(exc, _CREDENTIAL_ERRORS):
            return AccessDenied(
                f"no usable AWS credentials for {self.name}: {_one_line(exc)}; check"
                " AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws"
            )
        if isinstance(exc, _NETWORK_ERRORS):
            return Unreachable(
                f"cannot reach S3 endpoint {self.endpoint}: {_network_reason(exc)}"
            )
        if isinstance(exc, bce.BotoCoreError):
            return StoreError(f"S3 {what} failed: {_one_line(exc)}")
        if isinstance(exc, OSError):
            return StoreError(f"{what}: local file error: {exc.strerror or exc}")
        return StoreError(f"S3 {what} failed: {type(exc).__name__}: {_one_line(exc)}")

    @contextlib.contextmanager
    def _errors(self, op: str, key: str | None, *, conditional: bool = False) -> Iterator[None]:
        """Run a block of boto3 calls, turning whatever escapes into a deltafs error."""
        try:
            yield
        except (StoreError, InvalidName):
            raise
        except (bce.BotoCoreError, bce.ClientError, OSError) as exc:
            mapped = self._translate(exc, op, key, conditional)
            log.debug("%s -> %s", self._what(op, key), mapped)
            raise mapped from exc

    @staticmethod
    def _is_conflict(exc: BaseException) -> bool:
        """409 ConditionalRequestConflict: another conditional write raced ours; retry."""
        return (
            isinstance(exc, bce.ClientError)
            and exc.response.get("Error", {}).get("Code") == "ConditionalRequestConflict"
        )

    # -- reads ----------------------------------------------------------------------------

    def check(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except bce.ClientError as exc:
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            code = str(exc.response.get("Error", {}).get("Code") or "")
            if status == 404 or code in ("404", "NoSuchBucket", "NotFound"):
                raise BucketNotFound(
                    f"bucket {self.bucket!r} does not exist at {self.endpoint}"
                ) from exc
            if status == 301 or code in ("301", "PermanentRedirect"):
                raise StoreError(
                    f"bucket {self.bucket!r} is in another region than configured;"
                    " set --region or AWS_DEFAULT_REGION"
                ) from exc
            raise self._translate(exc, "check", None) from exc
        except (bce.BotoCoreError, OSError) as exc:
            raise self._translate(exc, "check", None) from exc

    def head(self, key: str) -> ObjectInfo | None:
        with self._errors("HEAD", key):
            try:
                resp = self._client.head_object(Bucket=self.bucket, Key=key)
            except bce.ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 404 or exc.response.get("Error", {}).get("Code") in (
                    "404",
                    "NoSuchKey",
                    "NotFound",
                ):
                    return None
                raise
        return self._info_from_response(key, resp)

    @staticmethod
    def _info_from_response(key: str, resp: Mapping[str, Any]) -> ObjectInfo:
        modified = resp.get("LastModified")
        return ObjectInfo(
            key=key,
            size=int(resp.get("ContentLength") or 0),
            etag=_strip_etag(resp.get("ETag")),
            mtime=modified.timestamp() if modified is not None else time.time(),
            metadata=dict(resp.get("Metadata") or {}),
        )

    def _pages(self, prefix: str, delimiter: str | None) -> Iterator[dict[str, Any]]:
        """ListObjectsV2 pages (1,000 keys each) with errors translated."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        paginator = self._client.get_paginator("list_objects_v2")
        with self._errors("LIST", prefix):
            for page in paginator.paginate(**kwargs, PaginationConfig={"PageSize": 1000}):
                yield page

    @staticmethod
    def _listed(item: Mapping[str, Any]) -> ObjectInfo:
        return ObjectInfo(
            key=item["Key"],
            size=int(item.get("Size") or 0),
            etag=_strip_etag(item.get("ETag")),
            mtime=item["LastModified"].timestamp() if item.get("LastModified") else 0.0,
            metadata=None,
        )

    def list(self, prefix: str, delimiter: str | None = "/") -> Listing:
        listing = Listing()
        for page in self._pages(prefix, delimiter):
            listing.objects.extend(self._listed(item) for item in page.get("Contents", ()))
            listing.prefixes.extend(p["Prefix"] for p in page.get("CommonPrefixes", ()))
        return listing

    def iter_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        for page in self._pages(prefix, None):
            for item in page.get("Contents", ()):
                yield self._listed(item)

    def iter_pages(self, prefix: str) -> Iterator[Listing]:
        for page in self._pages(prefix, "/"):
            yield Listing([self._listed(item) for item in page.get("Contents", ())],
                          [p["Prefix"] for p in page.get("CommonPrefixes", ())])


    def get_file(self, key: str, dest: Path) -> ObjectInfo:
        with self._errors("GET", key):
            out = open(dest, "wb")
        with out:
            return self._download(key, out)

    def get_bytes(self, key: str) -> tuple[bytes, ObjectInfo]:
        buf = io.BytesIO()
        info = self._download(key, buf)
        return buf.getvalue(), info

    def _download(self, key: str, out: Any) -> ObjectInfo:
        """GET ``key`` into the binary file object ``out`` (written from its start).

        A body that breaks off in the middle (a reset, a read timeout) is resumed where it
        stopped with ``Range: bytes=N-`` guarded by ``If-Match`` the first answer's ETag,
        so the bytes of two versions never meet in one file: if the object was replaced
        in between, the GET fails saying so. A body that fails the checksum S3 sent with
        it is read again from the start, a few times, then reported as corrupt."""
        what = self._what("GET", key)
        with self._errors("GET", key):
            resp = self._client.get_object(Bucket=self.bucket, Key=key)
        info = self._info_from_response(key, resp)
        etag = resp.get("ETag")
        if etag and info.size >= self.multipart_threshold and _real_file(out):
            return self._download_ranges(key, out, resp, info, etag)
        received = 0
        in_a_row = 0  # failures since the last byte that came through
        resumes = 0
        bad_checksums = 0
        while True:
            body = resp["Body"]
            broken: Exception | None = None
            try:
                while True:
                    try:
                        chunk = body.read(DOWNLOAD_CHUNK)
                    except _CHECKSUM_ERRORS as exc:
                        broken = exc
                        break
                    except _BODY_ERRORS as exc:
                        broken = exc
                        break
                    if not chunk:
                        break
                    with self._errors("GET", key):
                        out.write(chunk)
                    received += len(chunk)
                    in_a_row = 0
            finally:
                with contextlib.suppress(Exception):
                    body.close()
            if broken is None:
                break
            restart = False
            if isinstance(broken, _CHECKSUM_ERRORS):
                bad_checksums += 1
                if bad_checksums > GET_CHECKSUM_RETRIES:
                    raise IntegrityError(
                        f"S3 {what}: the body did not match the checksum the server sent"
                        f" with it, {bad_checksums} times (corrupted in transit or in"
                        f" storage): {_one_line(broken)}"
                    ) from broken
                log.warning("%s: checksum mismatch (%s); reading it again", what, broken)
                restart = True
            else:
                in_a_row += 1
                resumes += 1
                if in_a_row >= GET_RESUMES or resumes > GET_MAX_RESUMES:
                    log.debug("%s: giving up after %d resumes", what, resumes)
                    raise self._translate(broken, "GET", key) from broken
                log.info(
                    "%s: body broke off after %d of %d bytes (%s); resuming",
                    what, received, info.size, _network_reason(broken),
                )
                if not etag:
                    restart = True  # nothing to guard a resume with: start again
            if restart:
                with self._errors("GET", key):
                    out.seek(0)
                    out.truncate()
                received = 0
            time.sleep(GET_BACKOFF * 2 ** max(in_a_row - 1, bad_checksums - 1, 0))
            resp = self._get_rest(key, etag, received, info.size)
            if resp is None:
                break  # every byte had arrived already
            if received and not resp.get("ContentRange"):
                # a server that ignores Range answers with the whole object: take it all
                with self._errors("GET", key):
                    out.seek(0)
                    out.truncate()
                received = 0
        if received != info.size:
            raise StoreError(f"S3 {what}: got {received} bytes, expected {info.size}")
        return info

    def _download_ranges(self, key: str, out: Any, resp: dict[str, Any], info: ObjectInfo,
                         etag: str) -> ObjectInfo:
        """A large object, written at offsets. The first answer's body brings the first
        part; if it came at ``ONE_STREAM_ENOUGH`` or faster, the same stream brings the
        rest (more requests would only add work: a server on the same machine streams at
        600 MB/s, and moto copies the whole object for every range). Else the rest comes
        in part-size ranges, ``TRANSFER_CONCURRENCY`` at a time: one stream over a link
        with latency leaves it idle. Every range is guarded by ``If-Match`` the first
        answer's ETag, and one that breaks off resumes where it stopped, as a whole GET
        does; another ETag fails the GET (two versions never meet in one file). No
        checksum covers a range: the content's SHA-256, checked after decoding, does."""
        what = self._what("GET", key)
        size = info.size
        part = self._part_size_for(size)
        first_body: Any = resp["Body"]
        try:
            with self._errors("GET", key):
                fd = out.fileno()
                os.ftruncate(fd, 0)
        except BaseException:
            with contextlib.suppress(Exception):
                first_body.close()
            raise

        def fetch(start: int, end: int, body: Any = None) -> None:
            pos = start
            in_a_row = resumes = 0
            while pos < end:
                try:
                    if body is None:
                        body = self._get_range(key, etag, pos, end)["Body"]
                    pos = self._pump(key, body, fd, pos, end)
                    in_a_row = 0
                except (*_BODY_ERRORS, *_CHECKSUM_ERRORS) as exc:
                    in_a_row += 1
                    resumes += 1
                    if in_a_row >= GET_RESUMES or resumes > GET_MAX_RESUMES:
                        raise self._translate(exc, "GET", key) from exc
                    log.info("%s: range %d-%d broke off at byte %d (%s); resuming",
                             what, start, end - 1, getattr(exc, "deltafs_pos", pos),
                             _network_reason(exc))
                    pos = getattr(exc, "deltafs_pos", pos)
                    time.sleep(GET_BACKOFF * 2 ** (in_a_row - 1))
                finally:
                    if body is not None:
                        with contextlib.suppress(Exception):
                            body.close()
                        body = None

        try:
            first = min(part, size)
            t0 = time.monotonic()
            pos = 0
            try:
                pos = self._pump(key, first_body, fd, 0, first)
            except (*_BODY_ERRORS, *_CHECKSUM_ERRORS) as exc:
                pos = getattr(exc, "deltafs_pos", 0)
                with contextlib.suppress(Exception):
                    first_body.close()
                first_body = None
            if first_body is not None and \
                    first / max(time.monotonic() - t0, 1e-6) >= ONE_STREAM_ENOUGH:
                fetch(first, size, first_body)  # the stream keeps up: the rest from it
                first_body = None
            else:
                if first_body is not None:
                    with contextlib.suppress(Exception):
                        first_body.close()
                    first_body = None
                jobs = [(pos, first)] if pos < first else []
                jobs += [(start, min(start + part, size)) for start in range(first, size, part)]
                _in_parallel(fetch, jobs)
        finally:
            if first_body is not None:
                with contextlib.suppress(Exception):
                    first_body.close()
        return info

    def _pump(self, key: str, body: Any, fd: int, pos: int, end: int) -> int:
        """Copy ``body`` to ``fd`` from offset ``pos`` up to ``end``; returns ``end``. A
        body that breaks off raises, carrying how far it got in ``deltafs_pos``."""
        try:
            while pos < end:
                chunk = body.read(min(DOWNLOAD_CHUNK, end - pos))
                if not chunk:
                    raise urllib3.exceptions.ProtocolError(
                        f"the body ended at byte {pos} of {end}")
                with self._errors("GET", key):
                    os.pwrite(fd, chunk, pos)
                pos += len(chunk)
        except (*_BODY_ERRORS, *_CHECKSUM_ERRORS) as exc:
            exc.deltafs_pos = pos  # type: ignore[attr-defined]
            raise
        return pos

    def _get_range(self, key: str, etag: str, start: int, end: int) -> dict[str, Any]:
        """GET bytes ``[start, end)`` of ``key``, only if its ETag is still ``etag``."""
        what = self._what("GET", key)
        with self._errors("GET", key):
            try:
                resp: dict[str, Any] = self._client.get_object(
                    Bucket=self.bucket, Key=key, IfMatch=etag, Range=f"bytes={start}-{end - 1}")
            except bce.ClientError as exc:
                if _is_precondition(exc):
                    raise StoreError(
                        f"S3 {what}: the object changed while it was being read"
                        f" (its ETag is no longer {etag}); read it again"
                    ) from exc
                raise
        if _strip_etag(resp.get("ETag")) != _strip_etag(etag) or not str(
                resp.get("ContentRange", "")).startswith(f"bytes {start}-{end - 1}/"):
            with contextlib.suppress(Exception):
                resp["Body"].close()
            raise StoreError(
                f"S3 {what}: asked for bytes {start}-{end - 1} of version {etag}, got "
                f"{resp.get('ContentRange')} of {resp.get('ETag')}; read it again")
        return resp

    def _get_rest(
        self, key: str, etag: str | None, start: int, size: int
    ) -> dict[str, Any] | None:
        """GET ``key`` from byte ``start`` on, only if its ETag is still ``etag``; ``None``
        when there is nothing left to read."""
        what = self._what("GET", key)
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if etag:
            kwargs["IfMatch"] = etag
        if start:
            if start >= size:
                return None
            kwargs["Range"] = f"bytes={start}-"
        with self._errors("GET", key):
            try:
                resp: dict[str, Any] = self._client.get_object(**kwargs)
            except bce.ClientError as exc:
                if etag and _is_precondition(exc):
                    raise StoreError(
                        f"S3 {what}: the object changed while it was being read"
                        f" (its ETag is no longer {etag}); read it again"
                    ) from exc
                raise
        if etag and _strip_etag(resp.get("ETag")) != _strip_etag(etag):
            with contextlib.suppress(Exception):
                resp["Body"].close()
            raise StoreError(
                f"S3 {what}: the object changed while it was being read"
                f" (ETag {resp.get('ETag')} instead of {etag}); read it again"
            )
        content_range = resp.get("ContentRange")
        if start and content_range and not (
            content_range.startswith(f"bytes {start}-") and content_range.endswith(f"/{size}")
        ):
            with contextlib.suppress(Exception):
                resp["Body"].close()
            raise StoreError(
                f"S3 {what}: asked for bytes {start}- of {size}, got {content_range}"
            )
        return resp

    # -- writes ---------------------------------------------------------------------------

    def put_file(
        self,
        key: str,
        src: Path,
        metadata: Mapping[str, str],
        *,
        if_none_match: bool = False,
    ) -> ObjectInfo:
        with self._errors("PUT", key):
            size = Path(src).stat().st_size
        if size < self.multipart_threshold:
            return self._put_single(key, src, size, metadata, if_none_match)
        if if_none_match and self.head(key) is not None:
            # cheap early answer: do not upload gigabytes only to have the complete refused
            raise AlreadyExists(f"{self._path(key)} already exists")
        return self._put_multipart(key, src, metadata, if_none_match=if_none_match)

    def _put_single(
        self, key: str, src: Path, size: int, metadata: Mapping[str, str], if_none_match: bool
    ) -> ObjectInfo:
        """One PutObject streaming the open file (botocore rewinds it on retries)."""
        extra: dict[str, Any] = {"IfNoneMatch": "*"} if if_none_match else {}
        for attempt in range(CONFLICT_RETRIES + 1):
            with self._errors("PUT", key, conditional=if_none_match):
                try:
                    with open(src, "rb") as body:
                        resp = self._client.put_object(
                            Bucket=self.bucket, Key=key, Body=body, Metadata=dict(metadata),
                            **extra, **self._write_args(key, size),
                        )
                    break
                except bce.ClientError as exc:
                    if not (self._is_conflict(exc) and attempt < CONFLICT_RETRIES):
                        raise
            time.sleep(0.1 * 2**attempt)
        return ObjectInfo(key, size, _strip_etag(resp.get("ETag")), time.time(), _stored(metadata))

    def _part_size_for(self, size: int) -> int:
        """The configured part size, grown if needed to stay within 10,000 parts."""
        return max(self.part_size, math.ceil(size / MAX_PARTS))

    def _put_multipart(
        self, key: str, src: Path, metadata: Mapping[str, str], *, if_none_match: bool
    ) -> ObjectInfo:
        """Multipart upload, ``TRANSFER_CONCURRENCY`` parts at a time, each streamed from
        its range of the file (never a part in memory). The conditional create is the
        complete's ``If-None-Match``. Aborted on any failure so no orphaned parts keep
        costing storage."""
        with self._errors("PUT", key):
            size = Path(src).stat().st_size
            upload_id = self._client.create_multipart_upload(
                Bucket=self.bucket, Key=key, Metadata=dict(metadata),
                **self._write_args(key, size),
            )["UploadId"]
        try:
            part_size = self._part_size_for(size)
            ranges = [(n, start, min(part_size, size - start)) for n, start in
                      enumerate(range(0, max(size, 1), part_size), start=1)]

            def upload(number: int, start: int, length: int) -> dict[str, Any]:
                with _Slice(src, start, length) as body:
                    resp = self._client.upload_part(
                        Bucket=self.bucket, Key=key, UploadId=upload_id,
                        PartNumber=number, Body=body, ContentLength=length,
                    )
                return {"PartNumber": number, "ETag": resp["ETag"]}

            with self._errors("PUT", key):
                parts = _in_parallel(upload, ranges)
            resp = self._complete(key, upload_id, parts, if_none_match)
        except BaseException:
            self._abort(key, upload_id)
            raise
        return ObjectInfo(key, size, _strip_etag(resp.get("ETag")), time.time(), _stored(metadata))

    def _complete(
        self, key: str, upload_id: str, parts: list[dict[str, Any]], if_none_match: bool
    ) -> dict[str, Any]:
        extra: dict[str, Any] = {"IfNoneMatch": "*"} if if_none_match else {}
        for attempt in range(CONFLICT_RETRIES + 1):
            with self._errors("PUT", key, conditional=if_none_match):
                try:
                    return self._client.complete_multipart_upload(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        MultipartUpload={"Parts": parts},
                        **extra,
                    )
                except bce.ClientError as exc:
                    if not (self._is_conflict(exc) and attempt < CONFLICT_RETRIES):
                        raise
            time.sleep(0.1 * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _abort(self, key: str, upload_id: str) -> None:
        """Best effort: a failed abort only leaves parts a lifecycle rule can reap."""
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception as exc:  # noqa: BLE001 - the original failure matters more
            log.warning("could not abort multipart upload of %s/%s: %s", self.name, key, exc)

    def put_bytes(
        self,
        key: str,
        data: bytes,
        metadata: Mapping[str, str],
        *,
        if_none_match: bool = False,
    ) -> ObjectInfo:
        extra: dict[str, Any] = {"IfNoneMatch": "*"} if if_none_match else {}
        for attempt in range(CONFLICT_RETRIES + 1):
            with self._errors("PUT", key, conditional=if_none_match):
                try:
                    resp = self._client.put_object(
                        Bucket=self.bucket, Key=key, Body=data, Metadata=dict(metadata),
                        **extra, **self._write_args(key, len(data)),
                    )
                    break
                except bce.ClientError as exc:
                    if not (self._is_conflict(exc) and attempt < CONFLICT_RETRIES):
                        raise
            time.sleep(0.1 * 2**attempt)
        return ObjectInfo(
            key, len(data), _strip_etag(resp.get("ETag")), time.time(), _stored(metadata)
        )

    def copy(self, src_key: str, dst_key: str, metadata: Mapping[str, str], *,
             if_match: str | None = None) -> ObjectInfo:
        """HEAD the source (for its size, content type and ETag), then copy it guarded by
        ``CopySourceIfMatch`` so a source replaced in between is detected and retried.
        With ``if_match`` (the ETag the caller last saw) a replaced source is not
        retried: :class:`Changed` (another writer won)."""
        for attempt in range(CONFLICT_RETRIES + 1):
            with self._errors("COPY", src_key):
                try:
                    src = self._client.head_object(Bucket=self.bucket, Key=src_key)
                except bce.ClientError as exc:
                    if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                        raise NotFound(f"{self._path(src_key)} does not exist") from exc
                    raise
            if if_match is not None and _strip_etag(src.get("ETag")) != _strip_etag(if_match):
                raise Changed(f"S3 COPY {self._path(src_key)}: not the object expected "
                              "(another writer replaced it)")
            size = int(src.get("ContentLength") or 0)
            try:
                if size > MAX_SINGLE_COPY:
                    return self._copy_multipart(src_key, dst_key, src, metadata)
                return self._copy_single(src_key, dst_key, src, metadata)
            except _SourceChanged:
                if if_match is not None:
                    raise Changed(f"S3 COPY {self._path(src_key)}: not the object expected "
                                  "(another writer replaced it)") from None
                # the source was replaced between our HEAD and the copy: look again
                if attempt == CONFLICT_RETRIES:
                    raise StoreError(
                        f"S3 COPY {self._path(src_key)}: the source keeps changing"
                    ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _copy_args(self, dst_key: str, src: Mapping[str, Any]) -> dict[str, Any]:
        """What a copy must say to keep the source's content type (REPLACE drops it), and
        the write settings: S3 does not carry encryption or storage class over."""
        args: dict[str, Any] = self._write_args(dst_key, int(src.get("ContentLength") or 0))
        if src.get("ContentType"):
            args["ContentType"] = src["ContentType"]
        return args

    def _copy_single(
        self, src_key: str, dst_key: str, src: Mapping[str, Any], metadata: Mapping[str, str]
    ) -> ObjectInfo:
        with self._errors("COPY", dst_key):
            try:
                resp = self._client.copy_object(
                    Bucket=self.bucket,
                    Key=dst_key,
                    CopySource={"Bucket": self.bucket, "Key": src_key},
                    CopySourceIfMatch=src["ETag"],
                    Metadata=dict(metadata),
                    MetadataDirective="REPLACE",
                    **self._copy_args(dst_key, src),
                )
            except bce.ClientError as exc:
                if _is_precondition(exc):
                    raise _SourceChanged(f"{self._path(src_key)} changed") from exc
                raise
        result = resp.get("CopyObjectResult", {})
        modified = result.get("LastModified")
        return ObjectInfo(
            key=dst_key,
            size=int(src.get("ContentLength") or 0),
            etag=_strip_etag(result.get("ETag")),
            mtime=modified.timestamp() if modified else time.time(),
            metadata=_stored(metadata),
        )

    def _copy_multipart(
        self, src_key: str, dst_key: str, src: Mapping[str, Any], metadata: Mapping[str, str]
    ) -> ObjectInfo:
        """Server-side copy in ranges (UploadPartCopy), needed above CopyObject's 5 GiB."""
        size = int(src.get("ContentLength") or 0)
        part_size = max(self.copy_part_size, math.ceil(size / MAX_PARTS), MIN_PART)
        with self._errors("COPY", dst_key):
            upload_id = self._client.create_multipart_upload(
                Bucket=self.bucket, Key=dst_key, Metadata=dict(metadata),
                **self._copy_args(dst_key, src),
            )["UploadId"]
        try:
            parts: list[dict[str, Any]] = []
            with self._errors("COPY", dst_key):
                for number, start in enumerate(range(0, size, part_size), start=1):
                    end = min(start + part_size, size) - 1
                    try:
                        resp = self._client.upload_part_copy(
                            Bucket=self.bucket,
                            Key=dst_key,
                            UploadId=upload_id,
                            PartNumber=number,
                            CopySource={"Bucket": self.bucket, "Key": src_key},
                            CopySourceRange=f"bytes={start}-{end}",
                            CopySourceIfMatch=src["ETag"],
                        )
                    except bce.ClientError as exc:
                        if _is_precondition(exc):
                            raise _SourceChanged(f"{self._path(src_key)} changed") from exc
                        raise
                    parts.append({"PartNumber": number, "ETag": resp["CopyPartResult"]["ETag"]})
            resp = self._complete(dst_key, upload_id, parts, False)
        except BaseException:
            self._abort(dst_key, upload_id)
            raise
        return ObjectInfo(dst_key, size, _strip_etag(resp.get("ETag")), time.time(), _stored(metadata))

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Remove ``key``. With ``if_match``, a conditional delete (``If-Match``): only
        the object this mount last saw goes. A server that does not take the condition
        (501/NotImplemented, or it is ignored: see :attr:`conditional_deletes`) gets a
        HEAD and an ETag comparison first instead, which leaves a window of one round
        trip in which another writer's new object can be deleted."""
        if if_match is None:
            with self._errors("DELETE", key):
                self._client.delete_object(Bucket=self.bucket, Key=key)
            return
        if self.conditional_deletes:
            with self._errors("DELETE", key):
                try:
                    self._client.delete_object(Bucket=self.bucket, Key=key,
                                               IfMatch=f'"{_strip_etag(if_match)}"')
                    return
                except bce.ClientError as exc:
                    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                    code = str(exc.response.get("Error", {}).get("Code") or "")
                    if _is_precondition(exc):
                        raise Changed(f"S3 DELETE {self._path(key)}: not the object expected "
                                      "(another writer replaced it)") from exc
                    if status == 404 or code in ("NoSuchKey", "NotFound"):
                        raise NotFound(f"{self._path(key)} does not exist") from exc
                    if status != 501 and code not in ("NotImplemented", "InvalidArgument"):
                        raise
                    log.warning("%s does not take conditional deletes (%s): comparing the "
                                "ETag with a HEAD first from now on", self.name, code or status)
                    self.conditional_deletes = False
        info = self.head(key)
        if info is None:
            raise NotFound(f"{self._path(key)} does not exist")
        if _strip_etag(info.etag) != _strip_etag(if_match):
            raise Changed(f"S3 DELETE {self._path(key)}: not the object expected "
                          "(another writer replaced it)")
        with self._errors("DELETE", key):
            self._client.delete_object(Bucket=self.bucket, Key=key)

    def delete_many(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            with self._errors("DELETE", batch[0]):
                resp = self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                raise StoreError(
                    f"S3 DELETE {self.name}: {len(errors)} of {len(batch)} keys failed, e.g."
                    f" {first.get('Key')!r}: {first.get('Code')} {_one_line(first.get('Message', ''))}"
                )
