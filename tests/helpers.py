"""Helpers shared by test modules (import as ``from helpers import …``)."""
from __future__ import annotations

import logging
import socket
import time
import urllib.error
import urllib.request

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 20.0) -> None:
    """Poll ``url`` until an HTTP server answers (any status), or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answered, just not with 200
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing answered at {url} within {timeout}s") from None
            time.sleep(0.05)


# ----------------------------------------------------------------------------------------
# Data, hashing and CLI helpers for the engine/CLI/interop tests (appended).

import hashlib  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Mapping, Sequence  # noqa: E402

MiB = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def next_version(data: bytes, rng: random.Random, *, overwrites: int = 5,
                 change: int = 4096) -> bytes:
    """A plausible next release: a few small overwrites, one insertion of ``change``
    bytes and one deletion of ``change`` bytes (positions and bytes from ``rng``)."""
    buf = bytearray(data)
    for _ in range(overwrites):
        pos = rng.randrange(0, len(buf) - 64)
        n = rng.randrange(8, 64)
        buf[pos:pos + n] = rng.randbytes(n)
    pos = rng.randrange(0, len(buf))
    buf[pos:pos] = rng.randbytes(change)
    pos = rng.randrange(0, len(buf) - change)
    del buf[pos:pos + change]
    return bytes(buf)


def write_file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def cli_env(endpoint: str | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a CLI subprocess: the test's fake AWS env plus the endpoint."""
    env = dict(os.environ)
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    env["DG_SUPPRESS_DEPRECATION"] = "1"
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    if extra:
        env.update(extra)
    return env


def run_deltafs(args: Sequence[str], *, endpoint: str | None, cache_dir: Path | None,
                extra_env: Mapping[str, str] | None = None, timeout: float = 300,
                cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m deltafs.cli ARGS`` (with ``--cache-dir`` after the subcommand)."""
    argv = [sys.executable, "-m", "deltafs.cli", *args]
    if cache_dir is not None and args:
        argv.insert(4, f"--cache-dir={cache_dir}")
    return subprocess.run(argv, env=cli_env(endpoint, extra_env), capture_output=True,
                          timeout=timeout, cwd=cwd)


def one_line_error(proc: subprocess.CompletedProcess[bytes]) -> str:
    """Assert the process failed with exactly one ``deltafs: ...`` line on stderr and no
    traceback; return that line."""
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode != 0, f"expected failure, got 0; stderr={err!r}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("deltafs: "), lines[0]
    return lines[0]


def bucket_objects(client, bucket: str, prefix: str = "") -> dict[str, int]:  # type: ignore[no-untyped-def]
    """key -> size of every object under ``prefix`` (boto3 listing)."""
    out: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", ()):
            out[item["Key"]] = int(item["Size"])
    return out


def corrupt_object(client, bucket: str, key: str, how: str = "flip") -> None:  # type: ignore[no-untyped-def]
    """Overwrite ``key``'s bytes in place, keeping its user metadata: ``flip`` inverts a
    few bytes in the middle (same size), ``garbage`` replaces the body with junk."""
    head = client.head_object(Bucket=bucket, Key=key)
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    if how == "flip":
        buf = bytearray(body)
        mid = len(buf) // 2
        for i in range(mid, min(mid + 16, len(buf))):
            buf[i] ^= 0xFF
        new = bytes(buf)
    else:
        new = b"garbage, not the stored bytes " * max(1, len(body) // 30)
    assert new != body
    client.put_object(Bucket=bucket, Key=key, Body=new, Metadata=head["Metadata"])
