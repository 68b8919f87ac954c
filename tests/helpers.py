"""Helpers shared by test modules (import as ``from helpers import …``)."""
from __future__ import annotations

import logging
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import boto3

from deltafs.format import MANIFEST_NAME as MANIFEST

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


#: the ways ``AuthMoto.wrong`` gets credentials wrong
WRONG_CREDENTIALS = ("unknown-key", "wrong-secret", "no-policy")


@dataclass(frozen=True)
class AuthMoto:
    """A moto S3 server that checks credentials like S3 does (see ``moto_auth_server``)."""

    url: str
    #: an existing bucket that ``allowed`` may do anything in
    bucket: str
    #: (access key id, secret) of an IAM user with an ``s3:*`` policy
    allowed: tuple[str, str]
    #: (access key id, secret) of an IAM user without any policy: it signs correctly,
    #: and every action is refused (AccessDenied)
    no_policy: tuple[str, str]

    def wrong(self, case: str) -> tuple[str, str]:
        """A key pair the server refuses, for each of ``WRONG_CREDENTIALS``: an access key
        it does not know, the allowed user's key with a wrong secret, a user whose
        signature is right but who may do nothing."""
        if case == "unknown-key":
            return ("AKIAWRONGKEY00000000", "wrong-secret-for-an-unknown-key")
        if case == "wrong-secret":
            return (self.allowed[0], "wrong-secret-" + self.allowed[1][::-1])
        if case == "no-policy":
            return self.no_policy
        raise ValueError(case)

    def env(self, creds: tuple[str, str]) -> dict[str, str]:
        """Environment variables that make boto3 (and a deltafs subprocess) use ``creds``."""
        return {"AWS_ACCESS_KEY_ID": creds[0], "AWS_SECRET_ACCESS_KEY": creds[1]}

    def client(self, creds: tuple[str, str] | None = None) -> Any:
        key_id, secret = creds or self.allowed
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=key_id, aws_secret_access_key=secret)


# ----------------------------------------------------------------------------------------
# Data, hashing and CLI helpers for the engine/CLI/interop tests (appended).

import hashlib  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Mapping, Sequence  # noqa: E402

import pytest  # noqa: E402

MiB = 1 << 20


def require_tool(name: str, package: str) -> str:
    """The path of the program ``name`` (a name on PATH or an absolute path); a missing
    one fails the test with how to install it (scripts/setup installs them all)."""
    import shutil

    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: apt-get install {package} "
                    "(scripts/setup installs every program the tests need)", pytrace=False)
    return found


#: the DeltaGlider release the interop tests are written against (pyproject's test extra)
DELTAGLIDER_VERSION = "6.2.0"


def deltaglider_exe() -> Path:
    """The ``deltaglider`` CLI of the running interpreter's venv (else one on PATH), the
    version the test extras pin. Missing or another version is a test failure that says
    how to install it, never a skip."""
    import importlib.metadata
    import shutil

    how = (f"it comes with the test extras: {sys.executable} -m pip install -e '.[test]' "
           "(scripts/setup does it)")
    found = shutil.which("deltaglider", path=str(Path(sys.executable).parent)) or \
        shutil.which("deltaglider")
    if found is None:
        pytest.fail(f"the deltaglider CLI is not installed; {how}", pytrace=False)
    try:
        version = importlib.metadata.version("deltaglider")
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version != DELTAGLIDER_VERSION:
        pytest.fail(f"deltaglider {version or '(not in this venv)'} found at {found}, the "
                    f"tests need {DELTAGLIDER_VERSION}; {how}", pytrace=False)
    return Path(found)


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




def bucket_objects(client, bucket: str, prefix: str = "",  # type: ignore[no-untyped-def]
                   manifests: bool = False) -> dict[str, int]:
    """key -> size of every object under ``prefix`` (boto3 listing); directories' listing
    manifests (tests/test_scale.py) and the chain blobs and sweep objects under their
    hidden ``.deltafs/`` prefixes (tests/test_chain.py) only with ``manifests=True``:
    the bookkeeping beside the files."""
    out: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", ()):
            key = item["Key"]
            if manifests or not (key.rsplit("/", 1)[-1] == MANIFEST or key.startswith(
                    ".deltafs/") or "/.deltafs/" in key):
                out[key] = int(item["Size"])
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
