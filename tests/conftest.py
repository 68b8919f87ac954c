"""Shared fixtures: a moto S3 server for the session, fresh buckets and stores."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import boto3
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so test modules can `import helpers`

from helpers import free_port, wait_http  # noqa: E402

from deltafs.store import LocalStore, S3Store  # noqa: E402

log = logging.getLogger(__name__)

#: fake credentials and no real AWS configuration: tests must never reach a real account
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
#: variables that would redirect boto3 to a real profile, token or endpoint
CLEARED_AWS_ENV = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


@pytest.fixture(scope="session", autouse=True)
def aws_env() -> Iterator[None]:
    """Fake AWS credentials for the whole session, real config files ignored."""
    with pytest.MonkeyPatch.context() as mp:
        for name in CLEARED_AWS_ENV:
            mp.delenv(name, raising=False)
        for name, value in FAKE_AWS_ENV.items():
            mp.setenv(name, value)
        yield


@pytest.fixture(scope="session")
def moto_server(aws_env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server subprocess on a free local port; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logfile = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
    try:
        try:
            wait_http(url + "/", timeout=30)
        except TimeoutError:
            proc.kill()
            raise RuntimeError(f"moto server did not start: {logfile.read_text()[-2000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def bucket(moto_server: str) -> str:
    """A fresh, uniquely named, empty bucket on the moto server."""
    name = f"test-{uuid.uuid4().hex[:20]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(
        Bucket=name
    )
    return name


@pytest.fixture
def s3store(moto_server: str, bucket: str) -> S3Store:
    return S3Store(bucket, endpoint_url=moto_server)


@pytest.fixture
def localstore(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store", create=True)
