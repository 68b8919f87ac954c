"""The ObjectStore contract, run against both S3Store (on moto) and LocalStore."""
from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from helpers import WRONG_CREDENTIALS, AuthMoto, free_port

from deltafs.errors import (
    AccessDenied,
    AlreadyExists,
    BucketNotFound,
    InvalidName,
    NotFound,
    Unreachable,
)
from deltafs.store import LocalStore, ObjectStore, S3Store

log = logging.getLogger(__name__)

MiB = 2**20


@pytest.fixture(params=["s3store", "localstore"])
def store(request: pytest.FixtureRequest) -> ObjectStore:
    """Each contract test runs once per store implementation."""
    return request.getfixturevalue(request.param)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- contract tests (both stores) ----------------------------------------------------------


def test_put_get_head_roundtrip(store: ObjectStore, tmp_path: Path) -> None:
    src = write(tmp_path / "src", b"hello world" * 1000)
    meta = {"dg-file-sha256": "abc", "deltafs-mode": "644"}
    put = store.put_file("dir/file.bin", src, meta)
    assert put.size == 11000 and put.etag == md5(src.read_bytes())

    head = store.head("dir/file.bin")
    assert head is not None
    assert head.size == 11000 and head.etag == put.etag and head.metadata == meta
    assert abs(head.mtime - put.mtime) < 5

    dest = tmp_path / "dest"
    got = store.get_file("dir/file.bin", dest)
    assert dest.read_bytes() == src.read_bytes()
    assert got.metadata == meta and got.etag == put.etag

    data, info = store.get_bytes("dir/file.bin")
    assert data == src.read_bytes() and info.metadata == meta and info.size == 11000

    listing = store.list("dir/")
    assert [o.key for o in listing.objects] == ["dir/file.bin"]
    assert listing.objects[0].metadata is None and listing.objects[0].etag == put.etag
    assert listing.objects[0].size == 11000

    # overwrite replaces content and metadata
    store.put_bytes("dir/file.bin", b"new", {"k": "v"})
    assert store.get_bytes("dir/file.bin")[0] == b"new"
    assert store.head("dir/file.bin").metadata == {"k": "v"}  # type: ignore[union-attr]


def test_empty_object_and_marker(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("d/", b"", {})
    store.put_file("d/empty", write(tmp_path / "e", b""), {})
    assert store.head("d/").size == 0  # type: ignore[union-attr]
    assert store.get_file("d/empty", tmp_path / "out").size == 0
    assert (tmp_path / "out").read_bytes() == b""
    assert [o.key for o in store.list("d/").objects] == ["d/", "d/empty"]
    assert store.list("").prefixes == ["d/"]


def test_utf8_and_space_names(store: ObjectStore) -> None:
    keys = ["ünï cödé/fïlé 1.txt", "space dir/a b c", "日本/語.zip", "emoji/🎉.bin"]
    for key in keys:
        store.put_bytes(key, key.encode(), {"name": "x"})
    for key in keys:
        assert store.get_bytes(key)[0] == key.encode()
    everything = [o.key for o in store.list("", delimiter=None).objects]
    assert everything == sorted(keys, key=lambda k: k.encode())
    assert [o.key for o in store.list("space dir/").objects] == ["space dir/a b c"]


def test_key_and_longer_key_below_it(store: ObjectStore) -> None:
    """S3 lets ``a`` and ``a/b`` coexist; so must every store (incl. names with our
    on-disk suffixes)."""
    for key in ["a", "a/b", "a/b/c", "x.obj", "x.obj/y", "z.dir/w.dir", "z.dir.obj"]:
        store.put_bytes(key, key.encode(), {})
    for key in ["a", "a/b", "a/b/c", "x.obj", "x.obj/y", "z.dir/w.dir", "z.dir.obj"]:
        assert store.get_bytes(key)[0] == key.encode()
    top = store.list("")
    assert [o.key for o in top.objects] == ["a", "x.obj", "z.dir.obj"]
    assert top.prefixes == ["a/", "x.obj/", "z.dir/"]
    assert [o.key for o in store.list("a/").objects] == ["a/b"]
    assert store.list("a/").prefixes == ["a/b/"]
    store.delete("a")
    assert store.head("a") is None and store.get_bytes("a/b/c")[0] == b"a/b/c"


def test_delimiter_listing(store: ObjectStore) -> None:
    keys = [
        "v1/app.zip",
        "v1/apple/x",
        "v1/apple/y/z",
        "v1/apricot",
        "v1/banana/q",
        "v1/b.txt",
        "v10/file",
        "v2/app.zip",
        "top",
    ]
    for key in keys:
        store.put_bytes(key, b"x", {})

    mid = store.list("v1/app")  # a prefix ending mid-name
    assert [o.key for o in mid.objects] == ["v1/app.zip"]
    assert mid.prefixes == ["v1/apple/"]

    one = store.list("v1/")
    assert [o.key for o in one.objects] == ["v1/app.zip", "v1/apricot", "v1/b.txt"]
    assert one.prefixes == ["v1/apple/", "v1/banana/"]

    root = store.list("")
    assert [o.key for o in root.objects] == ["top"]
    assert root.prefixes == ["v1/", "v10/", "v2/"]

    assert store.list("v1").prefixes == ["v1/", "v10/"]

    deep = store.list("v1/", delimiter=None)
    assert [o.key for o in deep.objects] == sorted(k for k in keys if k.startswith("v1/"))
    assert deep.prefixes == []
    assert [o.key for o in store.iter_objects("v1/apple")] == ["v1/apple/x", "v1/apple/y/z"]

    assert store.list("nothing/") == store.list("v1/zzz") == type(mid)()


def reference_listing(
    keys: list[str], prefix: str, delimiter: str | None
) -> tuple[list[str], list[str]]:
    """S3's documented listing semantics, written out plainly."""
    objects, prefixes = [], set()
    for key in sorted(keys, key=lambda k: k.encode()):
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        if delimiter and delimiter in rest:
            prefixes.add(prefix + rest[: rest.index(delimiter) + len(delimiter)])
        else:
            objects.append(key)
    return objects, sorted(prefixes, key=lambda p: p.encode())


def test_listing_matches_s3_semantics(store: ObjectStore) -> None:
    keys = [
        "a", "a/", "a/b", "a/b/", "a/b/c", "a-b", "a-b/c-d", "ab", "é/x", "z/é", "z/e",
        "z/\u00ff", "z/\U0001f600", "z/\uffff", "d1/d2/d3/f", "d1/f-1", "d1/f-2/g",
    ]
    for key in keys:
        store.put_bytes(key, b"", {})
    for prefix in ["", "a", "a/", "a/b", "a-", "z/", "d1/", "d1/f", "d1/d2/", "nope", "z/\u00ff"]:
        for delimiter in ["/", "-", None]:
            listing = store.list(prefix, delimiter)
            got = ([o.key for o in listing.objects], listing.prefixes)
            assert got == reference_listing(keys, prefix, delimiter), (prefix, delimiter)


def test_conditional_create(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("ref/reference.bin", b"first", {"who": "one"}, if_none_match=True)
    with pytest.raises(AlreadyExists):
        store.put_bytes("ref/reference.bin", b"second", {"who": "two"}, if_none_match=True)
    with pytest.raises(AlreadyExists):
        store.put_file(
            "ref/reference.bin", write(tmp_path / "f", b"third"), {}, if_none_match=True
        )
    data, info = store.get_bytes("ref/reference.bin")
    assert data == b"first" and info.metadata == {"who": "one"}
    # after a delete the key can be created again
    store.delete("ref/reference.bin")
    store.put_bytes("ref/reference.bin", b"again", {}, if_none_match=True)
    assert store.get_bytes("ref/reference.bin")[0] == b"again"


def test_big_file_roundtrip(store: ObjectStore, tmp_path: Path) -> None:
    """12 MiB: multipart for S3 (5 MiB parts below), a plain streamed copy locally."""
    if isinstance(store, S3Store):
        store.multipart_threshold = 5 * MiB
        store.part_size = 5 * MiB
    data = os.urandom(12 * MiB)
    src = write(tmp_path / "big", data)
    info = store.put_file("big/file", src, {"dg-file-size": str(len(data))}, if_none_match=True)
    assert info.size == len(data)
    out = tmp_path / "out"
    got = store.get_file("big/file", out)
    assert got.size == len(data) and got.metadata == {"dg-file-size": str(len(data))}
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
    with pytest.raises(AlreadyExists):
        store.put_file("big/file", src, {}, if_none_match=True)
    if isinstance(store, S3Store):
        assert info.etag.endswith("-3")  # three parts: 5 + 5 + 2 MiB
        assert store.stats()["MULTIPART"] >= 5  # create, 3 parts, complete


def test_copy_replaces_metadata(store: ObjectStore) -> None:
    store.put_bytes("src/a", b"payload", {"old": "1"})
    info = store.copy("src/a", "dst/b", {"new": "2"})
    assert info.size == 7 and info.metadata == {"new": "2"}
    data, got = store.get_bytes("dst/b")
    assert data == b"payload" and got.metadata == {"new": "2"}
    assert store.head("src/a").metadata == {"old": "1"}  # type: ignore[union-attr]
    # in place: only metadata changes
    store.copy("src/a", "src/a", {"mode": "600"})
    data, got = store.get_bytes("src/a")
    assert data == b"payload" and got.metadata == {"mode": "600"}
    with pytest.raises(NotFound):
        store.copy("src/missing", "dst/c", {})


def test_delete_and_delete_many(store: ObjectStore) -> None:
    keys = [f"del/{i:03d}" for i in range(20)]
    for key in keys:
        store.put_bytes(key, b"x", {})
    store.put_bytes("keep", b"k", {})
    store.delete("del/000")
    assert store.head("del/000") is None
    store.delete("del/000")  # deleting a missing key is fine
    store.delete_many(keys[1:] + ["del/never-existed"])
    assert store.list("del/", delimiter=None).objects == []
    assert store.list("").prefixes == []
    assert [o.key for o in store.list("").objects] == ["keep"]


def test_missing_key(store: ObjectStore, tmp_path: Path) -> None:
    assert store.head("no/such/key") is None
    with pytest.raises(NotFound):
        store.get_bytes("no/such/key")
    with pytest.raises(NotFound):
        store.get_file("no/such/key", tmp_path / "x")


def test_stats_count_operations(store: ObjectStore) -> None:
    store.put_bytes("s/a", b"1", {})
    store.head("s/a")
    store.get_bytes("s/a")
    store.list("s/")
    store.copy("s/a", "s/b", {})
    store.delete("s/b")
    stats = store.stats()
    for op in ("PUT", "HEAD", "GET", "LIST", "COPY", "DELETE"):
        assert stats.get(op, 0) >= 1, op


def test_concurrent_threads(store: ObjectStore) -> None:
    """Clients are shared between worker threads."""

    def work(i: int) -> None:
        key = f"t/{i % 5}"
        store.put_bytes(key, str(i).encode() * 10, {"i": str(i)})
        data, info = store.get_bytes(key)
        # whatever version we read, content and metadata belong together
        assert data == info.metadata["i"].encode() * 10  # type: ignore[index]

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(80)))


# -- S3 specifics ----------------------------------------------------------------------------


def test_s3_pagination_and_batched_delete(s3store: S3Store) -> None:
    keys = [f"many/{i:05d}" for i in range(1050)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3store.put_bytes(k, b"", {}), keys))
    before = s3store.stats().get("LIST", 0)
    listed = [o.key for o in s3store.list("many/").objects]
    assert listed == keys
    assert s3store.stats()["LIST"] - before == 2  # two pages of at most 1,000
    assert [o.key for o in s3store.iter_objects("many/")] == keys
    before = s3store.stats().get("DELETE", 0)
    s3store.delete_many(keys)
    assert s3store.stats()["DELETE"] - before == 2  # two batches
    assert s3store.list("many/").objects == []


def test_s3_conditional_multipart_complete(s3store: S3Store, tmp_path: Path) -> None:
    """The If-None-Match on CompleteMultipartUpload itself (not only the early HEAD)
    refuses to replace an existing key, and the refused upload is aborted."""
    s3store.multipart_threshold = s3store.part_size = 5 * MiB
    s3store.put_bytes("mp/key", b"original", {})
    src = write(tmp_path / "big", os.urandom(6 * MiB))
    with pytest.raises(AlreadyExists):
        s3store._put_multipart("mp/key", src, {}, if_none_match=True)
    assert s3store.get_bytes("mp/key")[0] == b"original"
    client = boto3.client("s3", endpoint_url=s3store.endpoint, region_name="us-east-1")
    assert not client.list_multipart_uploads(Bucket=s3store.bucket).get("Uploads")


def test_s3_multipart_copy(s3store: S3Store, tmp_path: Path) -> None:
    """The >5 GiB copy path (UploadPartCopy), exercised with small parts."""
    s3store.multipart_threshold = s3store.part_size = 5 * MiB
    data = os.urandom(12 * MiB)
    s3store.put_file("mc/src", write(tmp_path / "src", data), {"a": "1"})
    s3store.copy_part_size = 5 * MiB
    src = s3store._client.head_object(Bucket=s3store.bucket, Key="mc/src")
    info = s3store._copy_multipart("mc/src", "mc/dst", src, {"b": "2"})
    assert info.size == len(data)
    got, head = s3store.get_bytes("mc/dst")
    assert got == data and head.metadata == {"b": "2"}


def test_s3_missing_bucket(moto_server: str) -> None:
    store = S3Store("no-such-bucket-for-deltafs", endpoint_url=moto_server)
    with pytest.raises(BucketNotFound, match="does not exist"):
        store.check()
    with pytest.raises(BucketNotFound):
        store.get_bytes("k")
    with pytest.raises(BucketNotFound):
        store.list("")
    with pytest.raises(BucketNotFound):
        store.put_bytes("k", b"x", {})


def test_s3_check_ok(s3store: S3Store) -> None:
    s3store.check()
    assert s3store.name.startswith("s3://test-")


def test_s3_unreachable() -> None:
    port = free_port()
    store = S3Store(
        "bucket",
        endpoint_url=f"http://127.0.0.1:{port}",
        max_attempts=1,
        connect_timeout=1,
        read_timeout=1,
    )
    with pytest.raises(Unreachable, match=f"cannot reach S3 endpoint http://127.0.0.1:{port}"):
        store.check()
    with pytest.raises(Unreachable):
        store.get_bytes("k")
    with pytest.raises(Unreachable):
        store.put_bytes("k", b"x", {})


def test_s3_no_credentials(moto_server: str, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = S3Store(bucket, endpoint_url=moto_server, max_attempts=1)
    with pytest.raises(AccessDenied, match="credentials") as exc:
        store.check()
    assert "testing" not in str(exc.value)


@pytest.mark.parametrize("case", WRONG_CREDENTIALS)
def test_s3_wrong_credentials(moto_auth_server: AuthMoto, case: str) -> None:
    """A server that checks signatures (moto with INITIAL_NO_AUTH_ACTION_COUNT) refuses
    the key pair: every operation is AccessDenied, the secret never shown;
    the right key pair works on the same store."""
    auth = moto_auth_server
    key_id, secret = auth.wrong(case)
    store = S3Store(auth.bucket, endpoint_url=auth.url, access_key=key_id,
                    secret_key=secret)
    for op in (store.check, lambda: store.get_bytes("k"), lambda: store.list(""),
               lambda: store.put_bytes("k", b"x", {})):
        with pytest.raises(AccessDenied, match="check the credentials") as exc:
            op()
        assert secret not in str(exc.value)
    good = S3Store(auth.bucket, endpoint_url=auth.url, access_key=auth.allowed[0],
                   secret_key=auth.allowed[1])
    good.check()
    good.put_bytes(f"store-{case}", b"x", {})
    assert good.get_bytes(f"store-{case}")[0] == b"x"


def test_s3_access_denied_mapping(s3store: S3Store) -> None:
    """Each 403 code maps to AccessDenied, a 500 does not (stubbed answers)."""
    with Stubber(s3store._client) as stub:
        stub.add_client_error("head_bucket", "403", http_status_code=403)
        stub.add_client_error("get_object", "InvalidAccessKeyId", http_status_code=403)
        stub.add_client_error("put_object", "SignatureDoesNotMatch", http_status_code=403)
        stub.add_client_error("get_object", "InternalError", "boom\nsecond line", 500)
        with pytest.raises(AccessDenied, match="check the credentials"):
            s3store.check()
        with pytest.raises(AccessDenied):
            s3store.get_bytes("k")
        with pytest.raises(AccessDenied):
            s3store.put_bytes("k", b"x", {})
        with pytest.raises(Exception) as exc:
            s3store.get_bytes("some/key")
        assert type(exc.value).__name__ == "StoreError"
        assert "GET" in str(exc.value) and "some/key" in str(exc.value)
        assert "InternalError" in str(exc.value) and "\n" not in str(exc.value)


# -- LocalStore specifics ------------------------------------------------------------------


def test_local_missing_store(tmp_path: Path) -> None:
    with pytest.raises(BucketNotFound, match="deltafs init"):
        LocalStore(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(BucketNotFound):
        LocalStore(tmp_path / "plain")
    LocalStore(tmp_path / "new", create=True).check()
    LocalStore(tmp_path / "new").check()  # reopening an existing store


@pytest.mark.parametrize(
    "key", ["../escape", "a/../b", "a/./b", "a//b", "/abs", "..", ".", "", "nul\0byte"]
)
def test_local_rejects_unsafe_keys(localstore: LocalStore, key: str) -> None:
    with pytest.raises(InvalidName):
        localstore.put_bytes(key, b"x", {})
    assert not (localstore.root.parent / "escape.obj").exists()


def test_local_layout_is_inspectable(localstore: LocalStore) -> None:
    localstore.put_bytes("v1/app.zip", b"zipdata", {})
    assert (localstore.root / "objects" / "v1" / "app.zip.obj").read_bytes() == b"zipdata"


def test_local_handplaced_file_is_foreign(localstore: LocalStore) -> None:
    """A file copied into objects/ by hand is served like an object without metadata."""
    path = localstore.root / "objects" / "hand" / "made.obj"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"by hand")
    info = localstore.head("hand/made")
    assert info is not None and info.etag == md5(b"by hand") and info.metadata == {}
    assert localstore.get_bytes("hand/made")[0] == b"by hand"


def _race_worker(root: str, worker: int, keys: list[str], barrier, results) -> None:  # type: ignore[no-untyped-def]
    store = LocalStore(Path(root))
    barrier.wait()
    for key in keys:
        try:
            store.put_bytes(key, f"worker {worker}".encode(), {"w": str(worker)}, if_none_match=True)
            results.put((key, worker))
        except AlreadyExists:
            pass


def test_local_conditional_create_race_across_processes(localstore: LocalStore) -> None:
    ctx = multiprocessing.get_context("spawn")
    keys = [f"race/{i}/reference.bin" for i in range(25)]
    barrier = ctx.Barrier(4)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_race_worker, args=(str(localstore.root), w, keys, barrier, results))
        for w in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    winners: dict[str, list[int]] = {}
    while not results.empty():
        key, worker = results.get(timeout=5)
        winners.setdefault(key, []).append(worker)
    assert sorted(winners) == sorted(keys)
    for key, won in winners.items():
        assert len(won) == 1, (key, won)
        data, info = localstore.get_bytes(key)
        assert data == f"worker {won[0]}".encode() and info.metadata == {"w": str(won[0])}


def test_guarded_delete_and_copy_keep_another_writers_object(store: ObjectStore) -> None:
    """Deletes and copies carry the ETag the caller last saw: another writer's newer
    object is never removed or taken (issue 9)."""
    from deltafs.errors import Changed, NotFound

    old = store.put_bytes("k", b"old", {})
    new = store.put_bytes("k", b"new!", {})
    assert old.etag != new.etag
    with pytest.raises(Changed):
        store.delete("k", if_match=old.etag)
    with pytest.raises(Changed):
        store.copy("k", "k2", {}, if_match=old.etag)
    assert store.head("k2") is None
    store.copy("k", "k2", {}, if_match=new.etag)
    store.delete("k", if_match=new.etag)
    assert store.head("k") is None
    with pytest.raises(NotFound):
        store.delete("k", if_match=new.etag)


def test_listing_times_are_parsed_without_dateutil(s3store: S3Store, moto_server: str,
                                                   bucket: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11: botocore parsed every LastModified of a LIST page with dateutil (~40 µs a
    key: half the daemon's time in a cold listing of 20,000 files). A LIST page's times
    (ISO 8601, UTC) are parsed without it, to the same instants boto3 reports; the HTTP
    dates of a HEAD still parse (through botocore's own parser)."""
    import boto3
    import dateutil.parser

    s3store.put_bytes("t/a.txt", b"a", {})
    s3store.put_bytes("t/b.txt", b"b", {})
    plain = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    want = {o["Key"]: o["LastModified"].timestamp()
            for o in plain.list_objects_v2(Bucket=bucket, Prefix="t/")["Contents"]}
    used: list[str] = []
    real = dateutil.parser.parse

    def spy(value: str, *a: Any, **kw: Any) -> Any:
        used.append(value)
        return real(value, *a, **kw)
    monkeypatch.setattr(dateutil.parser, "parse", spy)
    got = {o.key: o.mtime for page in s3store.iter_pages("t/") for o in page.objects}
    assert got == want and len(got) == 2
    assert used == []  # no key of the page went through dateutil
    head = s3store.head("t/a.txt")
    assert head is not None and abs(head.mtime - want["t/a.txt"]) < 1.0
