"""Shared fixtures: a moto S3 server for the session (and a second one that checks
credentials), fresh buckets and stores."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import boto3
import botocore.exceptions
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so test modules can `import helpers`

from helpers import AuthMoto, free_port, require_tool, wait_http  # noqa: E402

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


def _start_moto(port: int, logfile: Path, extra_env: dict[str, str] | None = None
                ) -> subprocess.Popen[bytes]:
    env = os.environ.copy()
    env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)  # only moto_auth_server checks credentials
    env.update(extra_env or {})
    with open(logfile, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def moto_server(aws_env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server subprocess on a free local port; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logfile = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = _start_moto(port, logfile)
    try:
        try:
            wait_http(url + "/", timeout=30)
        except TimeoutError:
            proc.kill()
            raise RuntimeError(f"moto server did not start: {logfile.read_text()[-2000:]}")
        yield url
    finally:
        _stop(proc)


#: requests the set-up of ``moto_auth_server`` makes before authentication starts
_AUTH_SETUP_ACTIONS = 5


@pytest.fixture(scope="session")
def moto_auth_server(aws_env: None, tmp_path_factory: pytest.TempPathFactory
                     ) -> Iterator[AuthMoto]:
    """A second moto server, on its own free port, that enforces authentication.

    moto accepts any credentials unless started with ``INITIAL_NO_AUTH_ACTION_COUNT=N``:
    it then serves its first N requests (S3 and IAM alike, counted over the whole
    process; ``/moto-api/`` is not counted) without checks, and every later request must
    carry the access key of a user in its own IAM (else 403 InvalidAccessKeyId), a SigV4
    signature made with that user's secret (else 403 SignatureDoesNotMatch), and be
    allowed by that user's policies (else 403 AccessDenied; a HEAD gets a bare 403).
    The N set-up requests here create the two IAM users and their keys; the bucket is
    created with the allowed user's keys, so it is already an authenticated request.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logfile = tmp_path_factory.mktemp("moto-auth") / "moto.log"
    proc = _start_moto(port, logfile,
                       {"INITIAL_NO_AUTH_ACTION_COUNT": str(_AUTH_SETUP_ACTIONS)})
    try:
        try:
            wait_http(url + "/moto-api/", timeout=30)  # not an S3 request: not counted
        except TimeoutError:
            raise RuntimeError(f"moto server did not start: {logfile.read_text()[-2000:]}")
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1")
        keys = []
        for user in ("deltafs-allowed", "deltafs-no-policy"):  # 2 requests each
            iam.create_user(UserName=user)
            key = iam.create_access_key(UserName=user)["AccessKey"]
            keys.append((key["AccessKeyId"], key["SecretAccessKey"]))
        iam.put_user_policy(  # the 5th and last unchecked request
            UserName="deltafs-allowed", PolicyName="s3-all",
            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        server = AuthMoto(url=url, bucket=f"auth-{uuid.uuid4().hex[:16]}", allowed=keys[0],
                          no_policy=keys[1])
        server.client().create_bucket(Bucket=server.bucket)
        # authentication is on: the session's fake key pair is refused, the user's works
        try:
            boto3.client("s3", endpoint_url=url, region_name="us-east-1").list_objects_v2(
                Bucket=server.bucket)
        except botocore.exceptions.ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            assert status == 403, exc.response
        else:
            raise RuntimeError("moto accepted an unknown access key although started with "
                               f"INITIAL_NO_AUTH_ACTION_COUNT={_AUTH_SETUP_ACTIONS}")
        server.client().list_objects_v2(Bucket=server.bucket)
        yield server
    finally:
        _stop(proc)


@pytest.fixture
def fuse_tools() -> None:
    """Tests that mount need fusermount3: missing, it is a failure saying how to install
    it, not a skip (root and /dev/fuse, which no install gives, are skip conditions)."""
    require_tool("fusermount3", "fuse3")


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
