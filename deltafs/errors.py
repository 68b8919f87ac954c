"""Every error deltafs reports to a user, with the exit code the CLI uses for it.

Each class carries a one-line message meant for humans; the CLI prints ``deltafs: <msg>``
and exits with ``exit_code``; the filesystem maps them to an errno.
"""
from __future__ import annotations

import errno


class DeltafsError(Exception):
    """Base class: a failure with a message a user can act on."""

    exit_code = 1
    errno = errno.EIO


class UsageError(DeltafsError):
    """Bad arguments or options."""

    exit_code = 2
    errno = errno.EINVAL


class ConfigError(DeltafsError):
    """A configuration file or option that cannot work."""

    exit_code = 2
    errno = errno.EINVAL


class StoreError(DeltafsError):
    """The object store failed (after retries).

    ``permanent`` says whether trying the same request again can ever succeed: a 4xx
    answer other than 408/429 (a key the server refuses, AccessDenied, a missing
    bucket) is permanent; a network failure, a timeout, 5xx and throttling are not.
    The uploader stops retrying permanent failures and reports them; it backs off on
    the others."""

    exit_code = 3
    permanent = False


class NotFound(StoreError):
    """A key (or logical file) that does not exist."""

    exit_code = 4
    errno = errno.ENOENT
    permanent = True


class Rejected(StoreError):
    """The server refused the request for good (a 4xx other than 408/429): e.g. a key
    it will not store, an invalid argument, an entity too large."""

    permanent = True


class AlreadyExists(StoreError):
    """A conditional create lost: the key exists."""

    errno = errno.EEXIST


class Changed(StoreError):
    """A guarded request found another object than the one expected: another writer
    replaced or removed it (``If-Match`` failed). Retrying cannot help; the caller
    decides whose version wins."""

    permanent = True


class BucketNotFound(StoreError):
    """The bucket (or local store directory) does not exist."""

    exit_code = 5
    errno = errno.ENOENT
    permanent = True


class AccessDenied(StoreError):
    """Credentials are missing, wrong, or lack permission."""

    exit_code = 6
    errno = errno.EACCES
    permanent = True


class Unreachable(StoreError):
    """The endpoint cannot be reached (connection refused, DNS, timeout)."""

    exit_code = 7


class IntegrityError(DeltafsError):
    """Stored data is corrupt: a SHA-256 mismatch or an undecodable delta."""

    exit_code = 8
    errno = errno.EIO


class CodecError(DeltafsError):
    """xdelta3 failed, timed out, or is missing."""

    exit_code = 9
    errno = errno.EIO


class ReservedName(DeltafsError):
    """A name the bucket format reserves (``reference.bin``, ``*.delta``)."""

    exit_code = 2
    errno = errno.EPERM


class InvalidName(DeltafsError):
    """A name S3 or the format cannot carry (too long, invalid UTF-8, ``..``)."""

    exit_code = 2
    errno = errno.EINVAL
