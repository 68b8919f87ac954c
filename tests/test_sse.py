"""S3 write settings (issue 13): server-side encryption and storage class on every object
deltafs writes, by the object's role, against the moto server (which records both and
shows them on HEAD; a HEAD says no StorageClass for STANDARD)."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import boto3
import pytest

from deltafs import chain
from deltafs.api import DeltaService, make_engine
from deltafs.errors import AlreadyExists, ConfigError, UsageError
from deltafs.engine import Policy
from deltafs.format import MANIFEST_NAME, REFERENCE_NAME, Attrs, reference_key
from deltafs.manifest import manifest_key
from deltafs.store.s3 import HIDDEN_DIR, S3Store, stays_standard, write_settings
from helpers import MiB, next_version, write_file

KiB = 1024
KMS_KEY = "arn:aws:kms:us-east-1:123456789012:key/0e6c3a8b-5d9f-4a37-9e1b-2f0d7c5a4b61"


@pytest.fixture
def s3(moto_server: str) -> Any:
    """A plain boto3 client, to look at what the server recorded."""
    return boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")


def settings(s3: Any, bucket: str, key: str) -> tuple[str | None, str | None, str]:
    """(encryption, KMS key id, storage class) of ``key`` as a HEAD reports them."""
    head = s3.head_object(Bucket=bucket, Key=key)
    return (head.get("ServerSideEncryption"), head.get("SSEKMSKeyId"),
            head.get("StorageClass", "STANDARD"))


def store(moto_server: str, bucket: str, **kwargs: Any) -> S3Store:
    return S3Store(bucket, endpoint_url=moto_server, **kwargs)


def body(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


# ------------------------------------------------------------------ validation


def test_settings_are_normalised() -> None:
    assert write_settings("aes256", None, "standard_ia") == ("AES256", None, "STANDARD_IA")
    assert write_settings("AWS:KMS", KMS_KEY, " glacier_ir ") == ("aws:kms", KMS_KEY,
                                                                 "GLACIER_IR")
    assert write_settings(None, None, None) == (None, None, None)
    assert write_settings("", "", "") == (None, None, None)
    assert write_settings(None, None, "standard-ia")[2] == "STANDARD_IA"


@pytest.mark.parametrize("cls", ["GLACIER", "deep_archive"])
def test_archive_storage_classes_refused(moto_server: str, bucket: str, cls: str) -> None:
    with pytest.raises(ConfigError, match="restored.*reference at once.*GLACIER_IR"):
        store(moto_server, bucket, storage_class=cls)


def test_unknown_storage_class_and_encryption_refused(moto_server: str, bucket: str) -> None:
    with pytest.raises(ConfigError, match="unknown storage class 'COLD'.*STANDARD_IA"):
        store(moto_server, bucket, storage_class="COLD")
    with pytest.raises(ConfigError, match="unknown server-side encryption 'aws:dsse'"):
        store(moto_server, bucket, sse="aws:dsse")


@pytest.mark.parametrize("sse", [None, "AES256"])
def test_kms_key_id_needs_aws_kms(moto_server: str, bucket: str, sse: str | None) -> None:
    with pytest.raises(ConfigError, match="KMS key id only applies with .*aws:kms"):
        store(moto_server, bucket, sse=sse, sse_kms_key_id=KMS_KEY)


def test_service_passes_settings_and_refuses_them_elsewhere(moto_server: str, bucket: str,
                                                            tmp_path: Path) -> None:
    svc = DeltaService(bucket, endpoint_url=moto_server, cache_dir=tmp_path / "cache",
                       sse="aws:kms", sse_kms_key_id=KMS_KEY, storage_class="onezone_ia")
    assert isinstance(svc.store, S3Store)
    assert (svc.store.sse, svc.store.sse_kms_key_id, svc.store.storage_class) == (
        "aws:kms", KMS_KEY, "ONEZONE_IA")
    with pytest.raises(UsageError, match="storage_class= are S3 settings.*local_dir="):
        DeltaService(local_dir=tmp_path / "local", create=True, storage_class="STANDARD_IA")
    with pytest.raises(UsageError, match="sse=, sse_kms_key_id= configure.*store="):
        DeltaService(store=svc.store, sse="aws:kms", sse_kms_key_id=KMS_KEY)
    with pytest.raises(ConfigError, match="GLACIER"):
        DeltaService(bucket, endpoint_url=moto_server, storage_class="GLACIER")


# ------------------------------------------------------------------ roles


def test_role_of_each_key() -> None:
    """Every key the format reserves for shared or bookkeeping objects stays STANDARD;
    the names come from the modules that write them (a renamed one would fail here)."""
    assert HIDDEN_DIR == chain.HIDDEN
    sha = "a" * 64
    for key in (reference_key(""), reference_key("rel/v1"), "rel/", "rel/sub/",
                manifest_key(""), manifest_key("rel/"),
                chain.hidden_prefix("rel") + chain.DONE_NAME,
                chain.hidden_prefix("") + chain.FLAG_PREFIX + "x"):
        assert stays_standard(key), key
    # chain blobs hold a chained directory's delta bytes: they take the class
    for key in ("rel/app.zip", "rel/app.zip.delta", "app.zip", "rel/my-reference.bin",
                f"rel/x{MANIFEST_NAME}", "rel/x.deltafs/y", f"{REFERENCE_NAME}x",
                chain.blob_key("rel", sha, sha), chain.blob_key("", sha, sha)):
        assert not stays_standard(key), key


def test_storage_class_by_role_and_size(moto_server: str, bucket: str) -> None:
    ia = store(moto_server, bucket, storage_class="STANDARD_IA")
    big = 128 * KiB
    assert ia.storage_class_for("rel/app.zip.delta", big) == "STANDARD_IA"
    assert ia.storage_class_for("rel/app.zip.delta", big - 1) == "STANDARD"  # billed 128 KiB
    assert ia.storage_class_for("rel/reference.bin", 10 * MiB) == "STANDARD"
    tiering = store(moto_server, bucket, storage_class="intelligent_tiering")
    assert tiering.storage_class_for("rel/app.zip", 10) == "INTELLIGENT_TIERING"
    assert tiering.storage_class_for("rel/reference.bin", big) == "STANDARD"
    express = store(moto_server, bucket, storage_class="EXPRESS_ONEZONE")
    assert express.storage_class_for("rel/reference.bin", 10) == "EXPRESS_ONEZONE"
    assert store(moto_server, bucket).storage_class_for("rel/app.zip", big) is None


# ------------------------------------------------------------------ each write request


def test_plain_puts_carry_the_settings(moto_server: str, bucket: str, s3: Any,
                                       tmp_path: Path) -> None:
    st = store(moto_server, bucket, sse="aws:kms", sse_kms_key_id=KMS_KEY,
               storage_class="STANDARD_IA")
    st.put_file("rel/app.bin", write_file(tmp_path / "app", body(200 * KiB)), {})
    st.put_bytes("rel/app2.bin", body(130 * KiB), {})
    st.put_bytes("rel/small.bin", b"x" * 100, {})
    st.put_file("rel/reference.bin", write_file(tmp_path / "ref", body(200 * KiB)), {})
    st.put_bytes("rel/", b"", {})
    assert settings(s3, bucket, "rel/app.bin") == ("aws:kms", KMS_KEY, "STANDARD_IA")
    assert settings(s3, bucket, "rel/app2.bin") == ("aws:kms", KMS_KEY, "STANDARD_IA")
    assert settings(s3, bucket, "rel/small.bin") == ("aws:kms", KMS_KEY, "STANDARD")
    assert settings(s3, bucket, "rel/reference.bin") == ("aws:kms", KMS_KEY, "STANDARD")
    assert settings(s3, bucket, "rel/") == ("aws:kms", KMS_KEY, "STANDARD")


def test_no_settings_sends_nothing(moto_server: str, bucket: str, s3: Any) -> None:
    calls: list[dict[str, Any]] = []
    st = store(moto_server, bucket)
    st._client.meta.events.register(
        "provide-client-params.s3.*", lambda params, **_: calls.append(dict(params)))
    st.put_bytes("a", b"x" * (200 * KiB), {})
    st.copy("a", "b", {})
    assert calls and not [c for c in calls if {"ServerSideEncryption", "SSEKMSKeyId",
                                               "StorageClass"} & set(c)]
    assert settings(s3, bucket, "b") == (None, None, "STANDARD")


@pytest.mark.parametrize("how", ["bytes", "file"])
def test_conditional_put_carries_the_settings(moto_server: str, bucket: str, s3: Any,
                                              tmp_path: Path, how: str) -> None:
    st = store(moto_server, bucket, sse="AES256", storage_class="ONEZONE_IA")
    data = body(150 * KiB)
    if how == "bytes":
        st.put_bytes("rel/new.bin", data, {}, if_none_match=True)
    else:
        st.put_file("rel/new.bin", write_file(tmp_path / "new", data), {}, if_none_match=True)
    assert settings(s3, bucket, "rel/new.bin") == ("AES256", None, "ONEZONE_IA")
    with pytest.raises(AlreadyExists):
        st.put_bytes("rel/new.bin", b"other", {}, if_none_match=True)


def test_multipart_put_carries_the_settings(moto_server: str, bucket: str, s3: Any,
                                            tmp_path: Path) -> None:
    st = store(moto_server, bucket, sse="aws:kms", sse_kms_key_id=KMS_KEY,
               storage_class="GLACIER_IR", multipart_threshold=5 * MiB, part_size=5 * MiB)
    src = write_file(tmp_path / "big", os.urandom(11 * MiB))
    before = st.stats().get("MULTIPART", 0)
    st.put_file("rel/big.bin", src, {}, if_none_match=True)
    assert st.stats()["MULTIPART"] - before == 5  # create, 3 parts, complete
    assert settings(s3, bucket, "rel/big.bin") == ("aws:kms", KMS_KEY, "GLACIER_IR")
    assert st.get_bytes("rel/big.bin")[0] == src.read_bytes()


def test_copies_carry_the_settings(moto_server: str, bucket: str, s3: Any,
                                   tmp_path: Path) -> None:
    """A copy made by another client without settings keeps none of its source's: ours
    carries them, to a file's key (the configured class) and to a reference's."""
    data = body(300 * KiB)
    s3.put_object(Bucket=bucket, Key="src/app.bin", Body=data,
                  ContentType="application/zip")
    st = store(moto_server, bucket, sse="AES256", storage_class="STANDARD_IA")
    st.copy("src/app.bin", "dst/app.bin", {"k": "v"})
    st.copy("src/app.bin", "dst/reference.bin", {})
    head = s3.head_object(Bucket=bucket, Key="dst/app.bin")
    assert settings(s3, bucket, "dst/app.bin") == ("AES256", None, "STANDARD_IA")
    assert head["ContentType"] == "application/zip" and head["Metadata"] == {"k": "v"}
    assert settings(s3, bucket, "dst/reference.bin") == ("AES256", None, "STANDARD")
    # an attribute change is a copy in place: the settings stay
    st.copy("dst/app.bin", "dst/app.bin", {"k": "w"})
    assert settings(s3, bucket, "dst/app.bin") == ("AES256", None, "STANDARD_IA")
    assert st.get_bytes("dst/app.bin")[0] == data


def test_multipart_copy_carries_the_settings(moto_server: str, bucket: str, s3: Any,
                                             tmp_path: Path) -> None:
    """The >5 GiB copy path (CreateMultipartUpload + UploadPartCopy), with small parts."""
    st = store(moto_server, bucket, sse="aws:kms", sse_kms_key_id=KMS_KEY,
               storage_class="INTELLIGENT_TIERING", multipart_threshold=5 * MiB,
               part_size=5 * MiB)
    data = os.urandom(11 * MiB)
    s3.put_object(Bucket=bucket, Key="mc/src", Body=data)
    st.copy_part_size = 5 * MiB
    src = s3.head_object(Bucket=bucket, Key="mc/src")
    st._copy_multipart("mc/src", "mc/dst", src, {"b": "2"})
    assert settings(s3, bucket, "mc/dst") == ("aws:kms", KMS_KEY, "INTELLIGENT_TIERING")
    assert st.get_bytes("mc/dst")[0] == data


# ------------------------------------------------------------------ through the engine


def _versions(tmp_path: Path, size: int, change: int) -> tuple[Path, Path]:
    rng = random.Random(11)
    v1 = rng.randbytes(size)
    v2 = next_version(v1, rng, change=change)
    return (write_file(tmp_path / "src" / "app-1.0.bin", v1),
            write_file(tmp_path / "src" / "app-1.1.bin", v2))


def test_service_put_reference_standard_delta_configured(moto_server: str, bucket: str,
                                                         s3: Any, tmp_path: Path) -> None:
    """Two versions into one prefix of a DeltaGlider directory: the reference stays
    STANDARD, the delta (over 128 KiB) gets STANDARD_IA; all encrypted."""
    v1, v2 = _versions(tmp_path, 2 * MiB, change=400 * KiB)
    svc = DeltaService(bucket, endpoint_url=moto_server, cache_dir=tmp_path / "cache",
                       format="deltaglider", sse="AES256", storage_class="standard_ia")
    assert svc.put(v1, "rel/").kind == "reference"
    r2 = svc.put(v2, "rel/")
    assert r2.kind == "delta" and r2.stored_size >= 128 * KiB, r2
    assert settings(s3, bucket, "rel/reference.bin") == ("AES256", None, "STANDARD")
    assert settings(s3, bucket, "rel/app-1.1.bin.delta") == ("AES256", None, "STANDARD_IA")
    # the first file's own (zero-diff) delta is tiny: STANDARD costs less than 128 KiB
    assert settings(s3, bucket, "rel/app-1.0.bin.delta") == ("AES256", None, "STANDARD")
    out = tmp_path / "out.bin"
    DeltaService(bucket, endpoint_url=moto_server, cache_dir=tmp_path / "cold").get(
        "rel/app-1.1.bin", out)
    assert out.read_bytes() == v2.read_bytes()


def test_chain_directory_blobs_take_the_class(moto_server: str, bucket: str, s3: Any,
                                              tmp_path: Path) -> None:
    """In deltafs's format a version is a pointer plus a chain blob: blob and pointer
    take the class (here INTELLIGENT_TIERING, which bills no minimum size), the
    reference stays STANDARD; all encrypted with the key."""
    # (every blob checked below takes the class: see the loop)
    v1, v2 = _versions(tmp_path, MiB, change=16 * KiB)
    svc = DeltaService(bucket, endpoint_url=moto_server, cache_dir=tmp_path / "cache",
                       sse="aws:kms", sse_kms_key_id=KMS_KEY,
                       storage_class="INTELLIGENT_TIERING")
    svc.put(v1, "rel/")
    svc.put(v2, "rel/")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    blobs = [k for k in keys if k.startswith(chain.hidden_prefix("rel"))]
    assert blobs, keys
    for key in keys:
        # the reference and the sweep's bookkeeping stay STANDARD
        expected = "STANDARD" if stays_standard(key) else "INTELLIGENT_TIERING"
        assert expected == "STANDARD" or key in blobs or not key.startswith(
            chain.hidden_prefix("rel")), key
        assert settings(s3, bucket, key) == ("aws:kms", KMS_KEY, expected), key


def test_engine_move_and_attrs_keep_the_settings(moto_server: str, bucket: str, s3: Any,
                                                 tmp_path: Path) -> None:
    """A rename into a directory without a reference copies the reference along (it
    stays STANDARD) and the delta (the class); a rename of a file stored whole and an
    attribute change (copies in place) keep the settings too."""
    v1, v2 = _versions(tmp_path, 2 * MiB, change=400 * KiB)
    st = store(moto_server, bucket, sse="aws:kms", sse_kms_key_id=KMS_KEY,
               storage_class="STANDARD_IA")
    eng = make_engine(st, tmp_path / "cache", policy=Policy.create(format="deltaglider"))
    eng.put(v1, "old/app-1.0.bin")
    assert eng.put(v2, "old/app-1.1.bin").kind == "delta"
    plain = eng.put(write_file(tmp_path / "plain", body(200 * KiB, seed=5)), "old/notes.txt")
    assert plain.kind == "direct"

    moved = eng.move(eng.stat("old/app-1.1.bin"), "new/app-1.1.bin")
    assert moved.object_key == "new/app-1.1.bin.delta"
    assert settings(s3, bucket, "new/reference.bin") == ("aws:kms", KMS_KEY, "STANDARD")
    assert settings(s3, bucket, "new/app-1.1.bin.delta") == ("aws:kms", KMS_KEY,
                                                             "STANDARD_IA")
    eng.move(eng.stat("old/notes.txt"), "new/notes.txt")
    assert settings(s3, bucket, "new/notes.txt") == ("aws:kms", KMS_KEY, "STANDARD_IA")
    eng.set_attrs(eng.stat("new/notes.txt"), Attrs(mode=0o100600))
    assert settings(s3, bucket, "new/notes.txt") == ("aws:kms", KMS_KEY, "STANDARD_IA")
    assert s3.head_object(Bucket=bucket, Key="new/notes.txt")["Metadata"]["deltafs-mode"] \
        == "600"
    out = tmp_path / "out.bin"
    make_engine(st, tmp_path / "cold").get("new/app-1.1.bin", out)
    assert out.read_bytes() == v2.read_bytes()


# ------------------------------------------------ through the mount and the command line


def _expected_class(key: str, size: int, cls: str) -> str:
    return "STANDARD" if stays_standard(key) or size < 128 * 1024 else cls


def _check_every_object(s3: Any, bucket: str, sse: str, kms: str | None,
                        cls: str) -> dict[str, str]:
    """Every object in the bucket (bookkeeping included) carries the encryption, and
    the storage class its role and size call for; returns key -> class."""
    seen = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", ()):
            got = settings(s3, bucket, o["Key"])
            want = (sse, kms, _expected_class(o["Key"], o["Size"], cls))
            assert got == want, (o["Key"], o["Size"], got, want)
            seen[o["Key"]] = got[2]
    return seen


@pytest.mark.mount
@pytest.mark.usefixtures("fuse_tools")
def test_a_mount_writes_every_object_with_the_settings(moto_server: str, bucket: str,
                                                       s3: Any, tmp_path: Path) -> None:
    """Files, deltas, references, markers and manifests written through a mount, then
    renamed (in a directory and into another one, which copies the reference along) and
    chmod'ed (a copy in place): every object is encrypted and in its class."""
    from mountfixtures import Mount

    m = Mount(bucket, moto_server, tmp_path / "deltafs",
              extra_args=["--sse", "AES256", "--storage-class", "STANDARD_IA"])
    try:
        m.mount()
        rng = random.Random(3)
        v1 = rng.randbytes(600 * 1024)
        v2 = next_version(v1, rng)
        (m.mountpoint / "rel").mkdir()
        (m.mountpoint / "rel" / "app-1.bin").write_bytes(v1)
        (m.mountpoint / "rel" / "app-2.bin").write_bytes(v2)
        (m.mountpoint / "whole").mkdir()
        (m.mountpoint / "whole" / "a.bin").write_bytes(rng.randbytes(300 * 1024))
        (m.mountpoint / "whole" / "b.bin").write_bytes(rng.randbytes(300 * 1024))
        (m.mountpoint / "whole" / "note.txt").write_bytes(b"small\n")
        m.wait_idle(60)
        os.rename(m.mountpoint / "whole" / "b.bin", m.mountpoint / "whole" / "c.bin")
        (m.mountpoint / "moved").mkdir()
        os.rename(m.mountpoint / "rel" / "app-2.bin", m.mountpoint / "moved" / "app-2.bin")
        os.chmod(m.mountpoint / "rel" / "app-1.bin", 0o600)
        os.chmod(m.mountpoint / "whole" / "a.bin", 0o600)
        m.wait_idle(60)
        m.remount(wipe_cache=True)  # the bytes come back from the bucket
        assert (m.mountpoint / "moved" / "app-2.bin").read_bytes() == v2
    finally:
        try:
            m.teardown()
        finally:
            m.dump_logs()
    seen = _check_every_object(s3, bucket, "AES256", None, "STANDARD_IA")
    assert "whole/c.bin" in seen and "moved/reference.bin" in seen, seen
    assert seen["whole/c.bin"] == "STANDARD_IA" and seen["moved/reference.bin"] == "STANDARD"
    assert any(k.endswith("/") for k in seen)  # markers were checked too


def test_deltafs_put_writes_every_object_with_the_settings(moto_server: str, bucket: str,
                                                           s3: Any, tmp_path: Path) -> None:
    import subprocess
    import sys

    rng = random.Random(4)
    v1 = rng.randbytes(400 * 1024)
    files = [write_file(tmp_path / "app-1.bin", v1),
             write_file(tmp_path / "app-2.bin", next_version(v1, rng)),
             write_file(tmp_path / "other.bin", rng.randbytes(300 * 1024))]
    deltafs = str(Path(sys.executable).parent / "deltafs")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    res = subprocess.run([deltafs, "put", "--endpoint-url", moto_server, "--sse", "aws:kms",
                          "--sse-kms-key-id", KMS_KEY, "--storage-class", "onezone-ia",
                          *map(str, files), f"s3://{bucket}/rel/"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    seen = _check_every_object(s3, bucket, "aws:kms", KMS_KEY, "ONEZONE_IA")
    assert "ONEZONE_IA" in seen.values() and "STANDARD" in seen.values(), seen
