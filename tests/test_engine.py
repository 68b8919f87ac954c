"""The engine against moto S3 (and the local store): the acceptance scenarios for put/get,
concurrency, corruption, errors, delete, list, stats, verify and the reference cache."""
from __future__ import annotations

import contextlib
import gzip
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import boto3
import pytest

from deltafs.api import DeltaService, make_engine
from deltafs.engine import Engine, Policy
from deltafs.chain import is_hidden_key
from deltafs.errors import IntegrityError, NotFound, ReservedName
from deltafs.store.base import ObjectStore
from deltafs.store.s3 import S3Store
from helpers import (
    WRONG_CREDENTIALS,
    AuthMoto,
    MiB,
    bucket_objects,
    cli_env,
    corrupt_object,
    free_port,
    next_version,
    one_line_error,
    run_deltafs,
    sha256_bytes,
    sha256_file,
    write_file,
)


# ------------------------------------------------------------------------ fixtures


@pytest.fixture
def s3(moto_server: str) -> Any:
    """A plain boto3 client on the moto server (to look behind the engine's back)."""
    return boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")


@pytest.fixture
def engine(s3store: S3Store, tmp_path: Path) -> Engine:
    return make_engine(s3store, tmp_path / "cache")


@pytest.fixture(params=["s3store", "localstore"])
def any_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    """An engine over S3 and over the local store."""
    store: ObjectStore = request.getfixturevalue(request.param)
    return make_engine(store, tmp_path / "cache-any")


def keys_of(store: ObjectStore, prefix: str = "") -> dict[str, int]:
    """key -> size of every object under ``prefix`` (through the store itself)."""
    return {o.key: o.size for o in store.iter_objects(prefix)}


def visible(objects: dict[str, int]) -> set[str]:
    """The keys outside directories' hidden chain-blob prefixes (deltafs.chain)."""
    return {k for k in objects if not is_hidden_key(k)}


def versions(n: int, size: int, seed: int) -> Iterator[bytes]:
    """``n`` successive releases of ``size`` bytes (see helpers.next_version)."""
    rng = random.Random(seed)
    data = rng.randbytes(size)
    for _ in range(n):
        yield data
        data = next_version(data, rng)


def fresh_get(store: ObjectStore, key: str, out: Path, cache: Path) -> str:
    """Rebuild ``key`` with an empty cache (so the reference is downloaded); its SHA-256."""
    make_engine(store, cache).get(key, out)
    return sha256_file(out)


# -------------------------------------------------------------- Acceptance 2


def test_acceptance2_twenty_versions(s3store: S3Store, tmp_path: Path) -> None:
    """20 versions of a 20 MB release into one prefix: every get byte-identical, and the
    whole bucket stays under 1.1 x one release."""
    size = 20 * MiB
    svc = DeltaService(store=s3store, cache_dir=tmp_path / "cache")
    digests: dict[str, str] = {}
    kinds: list[str] = []
    for i, data in enumerate(versions(20, size, seed=20)):
        src = write_file(tmp_path / "src" / f"app-1.{i}.bin", data)
        r = svc.put(src, "releases/app/")
        kinds.append(r.kind)
        assert r.key == f"releases/app/app-1.{i}.bin"
        assert r.original_size == len(data)
        digests[r.key] = sha256_bytes(data)
        src.unlink()
    assert kinds[0] == "reference"
    assert kinds[1:] == ["delta"] * 19, kinds

    objects = keys_of(s3store)
    total = sum(objects.values())
    print(f"20 x 20 MiB stored in {total} bytes ({total / size:.3f} x one release)")
    assert total < 1.1 * size, objects
    assert visible(objects) == {"releases/app/reference.bin"} | {f"{k}.delta" for k in digests}
    blobs = set(objects) - visible(objects)
    assert len(blobs) == 19 + 1, blobs  # one per delta, and the sweep marker

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for key, digest in digests.items():
        written = svc.get(key, out_dir)
        assert written == out_dir / key.rsplit("/", 1)[1]
        assert sha256_file(written) == digest, key
        written.unlink()
    # a cold reader (empty cache) gets the same bytes
    last = list(digests)[-1]
    assert fresh_get(s3store, last, tmp_path / "cold", tmp_path / "cache2") == digests[last]


# -------------------------------------------------------------- Acceptance 3


@pytest.mark.slow
def test_acceptance3_block_moved_to_end(s3store: S3Store, tmp_path: Path) -> None:
    """160 MB: reference A+B, file B+A (A = 40 MB moved to the end): delta < 1 MB."""
    rng = random.Random(3)
    a = rng.randbytes(40 * MiB)
    b = rng.randbytes(120 * MiB)
    ref = write_file(tmp_path / "v1.img", a + b)
    moved = write_file(tmp_path / "v2.img", b + a)
    want = sha256_bytes(b + a)
    del a, b
    eng = make_engine(s3store, tmp_path / "cache")
    r1 = eng.put(ref, "img/v1.img")
    assert r1.kind == "reference"
    t0 = time.monotonic()
    r2 = eng.put(moved, "img/v2.img")
    print(f"160 MB moved-block put: {time.monotonic() - t0:.1f}s, delta {r2.stored_size} bytes")
    assert r2.kind == "delta", r2.reason
    assert r2.stored_size < MiB
    assert keys_of(s3store)["img/v2.img.delta"] < MiB
    ref.unlink()
    moved.unlink()
    out = tmp_path / "out.img"
    eng.get("img/v2.img", out)
    assert sha256_file(out) == want
    out.unlink()
    # and from a cold cache (the 160 MB reference downloaded, multipart-uploaded)
    assert fresh_get(s3store, "img/v2.img", out, tmp_path / "cache2") == want
    out.unlink()


# -------------------------------------------------------------- Acceptance 4


@pytest.mark.parametrize("size", [2 * MiB, 12 * MiB])
def test_acceptance4_unrelated_file_stored_direct(any_engine: Engine, tmp_path: Path,
                                                  size: int) -> None:
    """A random file in a prefix that has a reference is stored whole, with no delta."""
    rng = random.Random(size)
    seed = write_file(tmp_path / "v1.bin", rng.randbytes(size))
    other_data = rng.randbytes(size)
    other = write_file(tmp_path / "other.bin", other_data)
    assert any_engine.put(seed, "p/v1.bin").kind == "reference"
    r = any_engine.put(other, "p/other.bin")
    assert r.kind == "direct"
    assert r.stored_size == r.original_size == size
    assert r.reason
    objects = keys_of(any_engine.store)
    assert "p/other.bin.delta" not in objects
    assert objects["p/other.bin"] == size
    assert visible(objects) == {"p/reference.bin", "p/v1.bin.delta", "p/other.bin"}
    out = tmp_path / "out"
    any_engine.get("p/other.bin", out)
    assert sha256_file(out) == sha256_bytes(other_data)


def test_a_short_cache_disk_asks_room_for_the_reference_only_when_it_must_be_downloaded(
        localstore: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scratch space a delta encode needs: its outputs (at most 1.5x the file) and,
    only when it is not in the cache, the reference. With room for the first but not
    both, a put whose reference is cached is a delta; one whose reference must be
    downloaded (a new machine) is stored direct, not failed."""
    size = 4 * MiB
    v1, v2 = _two_versions(tmp_path, size=size)
    assert make_engine(localstore, tmp_path / "cache").put(v1, "p/v1.bin").kind == "reference"
    real = os.statvfs

    class Short:
        def __init__(self, st: os.statvfs_result) -> None:
            self.f_frsize = 4096
            # room for the delta path's scratch (1.5x the file) and 18 MiB, not for a
            # reference beside it
            self.f_bavail = (size * 3 // 2 + (18 << 20)) // 4096
            self._st = st

        def __getattr__(self, name: str) -> object:
            return getattr(self._st, name)

    monkeypatch.setattr("deltafs.engine.os.statvfs", lambda path: Short(real(path)))
    warm = make_engine(localstore, tmp_path / "cache")
    assert warm.put(v2, "p/v2.bin").kind == "delta"
    cold = make_engine(localstore, tmp_path / "new-machine")
    got = cold.put(v2, "p/v3.bin")
    assert got.kind == "direct" and "local space" in got.reason
    out = tmp_path / "out"
    cold.get("p/v3.bin", out)
    assert sha256_file(out) == sha256_file(v2)


@pytest.mark.parametrize("why", ["no room", "ENOSPC"])
def test_a_delta_whose_reference_moved_then_stored_direct_leaves_no_pointer(
        localstore: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        why: str) -> None:
    """An attempt uploads a plain delta, its closing HEAD finds the reference replaced,
    and the next attempt stores the file direct (no room to download the new reference,
    or the disk fills up while it downloads): the first attempt's ``.delta`` is removed,
    also when the caller skips the other-form check (the uploader does, for a file never
    published). It would otherwise stay beside the direct object, and ``stat`` finds the
    ``.delta`` first."""
    import dataclasses
    import errno

    v1, v2 = _two_versions(tmp_path)
    eng = make_engine(localstore, tmp_path / "cache", policy=Policy.create(format="deltaglider"))
    assert eng.put(v1, "p/v1.bin").kind == "reference"
    real_head = eng._head_reference
    calls: list[int] = []

    def head(space: str) -> Any:
        ref = real_head(space)
        calls.append(1)
        if len(calls) >= 2 and ref is not None:  # from the closing HEAD on: "replaced"
            return dataclasses.replace(ref, sha256="0" * 64)
        return ref

    monkeypatch.setattr(eng, "_head_reference", head)
    if why == "no room":
        monkeypatch.setattr(eng, "_room_for_encode", lambda need: len(calls) < 2)
    else:
        monkeypatch.setattr(eng.cache, "has", lambda sha: True)  # no room check: fetch
        real_fetch = eng._fetch_reference

        def fetch(*args: Any, **kw: Any) -> bool:
            if len(calls) >= 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_fetch(*args, **kw)

        monkeypatch.setattr(eng, "_fetch_reference", fetch)
    got = eng.put(v2, "p/v2.bin", check_other=False)
    assert got.kind == "direct" and "local space" in got.reason
    objects = keys_of(localstore)
    assert "p/v2.bin.delta" not in objects and "p/v2.bin" in objects
    out = tmp_path / "out"
    make_engine(localstore, tmp_path / "other").get("p/v2.bin", out)
    assert sha256_file(out) == sha256_file(v2)


def test_compressed_file_never_becomes_reference_in_deltaglider_format(
        s3store: S3Store, tmp_path: Path) -> None:
    """In strict mode (what the deltaglider CLI reads) a gzip file is stored whole and
    never seeds a reference; the default format takes them apart (tests/test_gzip.py)."""
    engine = make_engine(s3store, tmp_path / "cache", policy=Policy.create(format="deltaglider"))
    rng = random.Random(44)
    gz = write_file(tmp_path / "a.tar.gz", gzip.compress(rng.randbytes(MiB), 1))
    r = engine.put(gz, "g/a.tar.gz")
    assert r.kind == "direct"
    assert set(keys_of(engine.store)) == {"g/a.tar.gz"}
    plain = write_file(tmp_path / "b.bin", rng.randbytes(MiB))
    assert engine.put(plain, "g/b.bin").kind == "reference"


def test_small_file_stored_direct(any_engine: Engine, tmp_path: Path) -> None:
    f = write_file(tmp_path / "small.txt", b"hello\n" * 100)
    r = any_engine.put(f, "s/small.txt")
    assert r.kind == "direct" and r.stored_size == 600
    assert set(keys_of(any_engine.store)) == {"s/small.txt"}


def test_reserved_names_refused_by_engine(any_engine: Engine, tmp_path: Path) -> None:
    f = write_file(tmp_path / "f", random.Random(1).randbytes(MiB))
    for key in ("p/reference.bin", "reference.bin", "p/x.delta"):
        with pytest.raises(ReservedName, match="reserved"):
            any_engine.put(f, key)
    assert keys_of(any_engine.store) == {}


# -------------------------------------------------------------- Acceptance 6

_RUNNER = r"""
import os, sys, time
ready, barrier = sys.argv[1], sys.argv[2]
from deltafs.cli import main
import deltafs.store.s3  # noqa: F401 - import everything before the barrier
open(ready, "w").close()
deadline = time.monotonic() + 60
while not os.path.exists(barrier):
    if time.monotonic() > deadline:
        sys.exit(99)
    time.sleep(0.0005)
sys.exit(main(sys.argv[3:]))
"""


def test_acceptance6_concurrent_first_writers(moto_server: str, bucket: str,
                                              s3store: S3Store, tmp_path: Path) -> None:
    """Two CLI processes start a new deltaspace at the same moment, 10 rounds: both files
    always read back byte-identical."""
    runner = write_file(tmp_path / "runner.py", _RUNNER.encode())
    rng = random.Random(6)
    base = rng.randbytes(MiB)
    data = {"a.bin": base, "b.bin": next_version(base, rng)}
    srcs = {name: write_file(tmp_path / "src" / name, body) for name, body in data.items()}
    env = cli_env(moto_server)
    raced = 0
    for rnd in range(10):
        prefix = f"round-{rnd}/"
        sync = tmp_path / f"sync-{rnd}"
        sync.mkdir()
        barrier = sync / "go"
        procs = []
        for name, src in srcs.items():
            argv = [sys.executable, str(runner), str(sync / f"ready-{name}"), str(barrier),
                    "put", f"--cache-dir={tmp_path / f'cache-{rnd}-{name}'}", "-q", "-v",
                    str(src), f"s3://{bucket}/{prefix}"]
            procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE))
        deadline = time.monotonic() + 60
        while not all((sync / f"ready-{n}").exists() for n in srcs):
            assert time.monotonic() < deadline, "runners did not start"
            time.sleep(0.01)
        barrier.touch()
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, (rnd, p.returncode, err.decode())
            raced += b"another writer created" in err
        objects = keys_of(s3store, prefix)
        for name, body in data.items():
            out_path = tmp_path / f"out-{rnd}-{name}"
            got = fresh_get(s3store, prefix + name, out_path, tmp_path / f"cold-{rnd}-{name}")
            assert got == sha256_bytes(body), (rnd, name, objects)
        assert visible(objects) == {f"{prefix}reference.bin", f"{prefix}a.bin.delta",
                                    f"{prefix}b.bin.delta"}, (rnd, objects)
    print(f"concurrent first writers: {raced} of 10 rounds lost the conditional create")


# -------------------------------------------------------------- Acceptance 7


def _two_versions(tmp_path: Path, size: int = MiB, seed: int = 7) -> tuple[Path, Path]:
    rng = random.Random(seed)
    v1 = rng.randbytes(size)
    v2 = next_version(v1, rng, change=16 * 1024)
    return write_file(tmp_path / "src" / "v1.bin", v1), write_file(tmp_path / "src" / "v2.bin", v2)


@pytest.mark.parametrize("how", ["flip", "garbage"])
def test_acceptance7_corrupt_delta(moto_server: str, bucket: str, s3store: S3Store, s3: Any,
                                   tmp_path: Path, how: str) -> None:
    """A corrupted delta: `deltafs get` fails with one line naming the key, and nothing
    (not even a temp file) appears in the destination directory."""
    v1, v2 = _two_versions(tmp_path)
    eng = make_engine(s3store, tmp_path / "cache")
    eng.put(v1, "p/v1.bin")
    assert eng.put(v2, "p/v2.bin").kind == "delta"
    corrupt_object(s3, bucket, "p/v2.bin.delta", how)
    dest_dir = tmp_path / "dest"
    dest_dir.mkdir()
    proc = run_deltafs(["get", f"s3://{bucket}/p/v2.bin", str(dest_dir / "v2.bin")],
                       endpoint=moto_server, cache_dir=tmp_path / "cache")
    line = one_line_error(proc)
    assert proc.returncode == IntegrityError.exit_code, line
    assert "p/v2.bin" in line
    assert list(dest_dir.iterdir()) == []
    # into the directory, the same
    proc = run_deltafs(["get", f"s3://{bucket}/p/v2.bin", str(dest_dir)],
                       endpoint=moto_server, cache_dir=tmp_path / "cache")
    one_line_error(proc)
    assert list(dest_dir.iterdir()) == []
    # the uncorrupted file still reads back
    ok = run_deltafs(["get", f"s3://{bucket}/p/v1.bin", str(dest_dir)],
                     endpoint=moto_server, cache_dir=tmp_path / "cache")
    assert ok.returncode == 0, ok.stderr
    assert sha256_file(dest_dir / "v1.bin") == sha256_file(v1)


def test_acceptance7_corrupt_reference(moto_server: str, bucket: str, s3store: S3Store,
                                       s3: Any, tmp_path: Path) -> None:
    """A corrupted reference.bin (cache cleared, so it is downloaded): one line naming the
    reference, non-zero, no destination file, no leftover."""
    v1, v2 = _two_versions(tmp_path)
    eng = make_engine(s3store, tmp_path / "cache")
    eng.put(v1, "p/v1.bin")
    eng.put(v2, "p/v2.bin")
    corrupt_object(s3, bucket, "p/reference.bin", "flip")
    dest_dir = tmp_path / "dest"
    dest_dir.mkdir()
    for name in ("v1.bin", "v2.bin"):
        proc = run_deltafs(["get", f"s3://{bucket}/p/{name}", str(dest_dir / name)],
                           endpoint=moto_server, cache_dir=tmp_path / f"empty-cache-{name}")
        line = one_line_error(proc)
        assert proc.returncode == IntegrityError.exit_code, line
        assert "p/reference.bin" in line
        assert list(dest_dir.iterdir()) == []
    # verify says so too, exit 1
    proc = run_deltafs(["verify", f"s3://{bucket}/p/"], endpoint=moto_server,
                       cache_dir=tmp_path / "empty-cache-verify")
    assert proc.returncode == 1
    assert b"0 of 2 files verified" in proc.stdout


@pytest.mark.parametrize("name,dest", [
    ("reference.bin", "p/"),
    ("x.delta", "p/"),
    ("ok.bin", "p/reference.bin"),
    ("ok.bin", "p/app.zip.delta"),
])
def test_acceptance7_reserved_names_refused(moto_server: str, bucket: str, s3: Any,
                                            tmp_path: Path, name: str, dest: str) -> None:
    src = write_file(tmp_path / name, random.Random(1).randbytes(MiB))
    proc = run_deltafs(["put", str(src), f"s3://{bucket}/{dest}"], endpoint=moto_server,
                       cache_dir=tmp_path / "cache")
    line = one_line_error(proc)
    assert proc.returncode == ReservedName.exit_code
    assert "reserved" in line
    assert bucket_objects(s3, bucket, manifests=True) == {}


# -------------------------------------------------------------- Acceptance 8


def test_acceptance8_missing_bucket(moto_server: str, tmp_path: Path) -> None:
    missing = f"missing-{uuid.uuid4().hex[:12]}"
    proc = run_deltafs(["ls", f"s3://{missing}/"], endpoint=moto_server,
                       cache_dir=tmp_path / "cache")
    line = one_line_error(proc)
    assert proc.returncode == 5, line
    assert missing in line


def test_acceptance8_unreachable_endpoint(moto_server: str, tmp_path: Path) -> None:
    port = free_port()
    t0 = time.monotonic()
    proc = run_deltafs(["ls", "--endpoint-url", f"http://127.0.0.1:{port}", "s3://any/"],
                       endpoint=None, cache_dir=tmp_path / "cache", timeout=60)
    elapsed = time.monotonic() - t0
    line = one_line_error(proc)
    assert proc.returncode == 7, line
    assert f"127.0.0.1:{port}" in line
    assert elapsed < 30, f"took {elapsed:.1f}s to give up"


def _no_xdelta_env(tmp_path: Path) -> dict[str, str]:
    empty_bin = tmp_path / "empty-bin"
    empty_bin.mkdir(exist_ok=True)
    return {"DELTAFS_XDELTA3": "/nonexistent", "PATH": str(empty_bin)}


def test_acceptance8_missing_xdelta3(moto_server: str, bucket: str, s3store: S3Store,
                                     s3: Any, tmp_path: Path) -> None:
    """A put that needs a delta, without xdelta3: one line, exit 9, nothing written."""
    v1, v2 = _two_versions(tmp_path)
    eng = make_engine(s3store, tmp_path / "cache")
    eng.put(v1, "p/v1.bin")
    before = bucket_objects(s3, bucket)
    proc = run_deltafs(["put", str(v2), f"s3://{bucket}/p/"], endpoint=moto_server,
                       cache_dir=tmp_path / "cache", extra_env=_no_xdelta_env(tmp_path))
    line = one_line_error(proc)
    assert proc.returncode == 9, line
    assert "xdelta3 not found" in line
    assert bucket_objects(s3, bucket) == before


def test_acceptance8_missing_xdelta3_on_get(moto_server: str, bucket: str, s3store: S3Store,
                                            tmp_path: Path) -> None:
    """A get of a delta without xdelta3 says so (exit 9), not that the data is corrupt."""
    v1, v2 = _two_versions(tmp_path)
    eng = make_engine(s3store, tmp_path / "cache")
    eng.put(v1, "p/v1.bin")
    eng.put(v2, "p/v2.bin")
    dest = tmp_path / "dest"
    dest.mkdir()
    # a fresh cache: the put's own cache holds v2's content and needs no decode
    proc = run_deltafs(["get", f"s3://{bucket}/p/v2.bin", str(dest)], endpoint=moto_server,
                       cache_dir=tmp_path / "cold", extra_env=_no_xdelta_env(tmp_path))
    line = one_line_error(proc)
    assert "xdelta3 not found" in line
    assert list(dest.iterdir()) == []
    assert proc.returncode == 9, line


def test_acceptance8_missing_xdelta3_first_put_leaves_nothing(
        moto_server: str, bucket: str, s3: Any, tmp_path: Path) -> None:
    """The first put into an empty prefix also needs xdelta3 (the zero-diff delta): it
    fails with one line and must not leave an orphan reference.bin behind."""
    v1, _ = _two_versions(tmp_path)
    proc = run_deltafs(["put", str(v1), f"s3://{bucket}/p/"], endpoint=moto_server,
                       cache_dir=tmp_path / "cache", extra_env=_no_xdelta_env(tmp_path))
    line = one_line_error(proc)
    assert proc.returncode == 9, line
    assert bucket_objects(s3, bucket, manifests=True) == {}


@pytest.mark.parametrize("command", ["ls", "put"])
@pytest.mark.parametrize("case", WRONG_CREDENTIALS)
def test_acceptance8_wrong_credentials(moto_auth_server: AuthMoto, tmp_path: Path,
                                       case: str, command: str) -> None:
    """`deltafs ls`/`put` with credentials S3 refuses (against a moto that checks them):
    exit 6 with one line naming the problem, no traceback, no secret, nothing written."""
    auth = moto_auth_server
    creds = auth.wrong(case)
    src = write_file(tmp_path / "f.bin", os.urandom(100_000))
    args = {"ls": ["ls", f"s3://{auth.bucket}/"],
            "put": ["put", str(src), f"s3://{auth.bucket}/{case}/"]}[command]
    t0 = time.monotonic()
    proc = run_deltafs(args, endpoint=auth.url, cache_dir=tmp_path / "cache",
                       extra_env=auth.env(creds), timeout=120)
    elapsed = time.monotonic() - t0
    line = one_line_error(proc)
    assert proc.returncode == 6, (proc.returncode, line)
    assert "access denied" in line.lower() or "credentials" in line.lower(), line
    assert creds[1] not in line, "the secret key must not be printed"
    assert elapsed < 60, f"a refused request took {elapsed:.0f} s (retried a 403?)"
    assert bucket_objects(auth.client(), auth.bucket, f"{case}/", manifests=True) == {}


def test_acceptance8_right_credentials_on_the_checking_server(moto_auth_server: AuthMoto,
                                                              tmp_path: Path) -> None:
    """The same commands with the right key pair work there: exit 6 above is the
    credentials, not the server."""
    auth = moto_auth_server
    src = write_file(tmp_path / "f.bin", os.urandom(100_000))
    env = auth.env(auth.allowed)
    prefix = f"ok-{uuid.uuid4().hex[:8]}/"
    put = run_deltafs(["put", "-q", str(src), f"s3://{auth.bucket}/{prefix}"],
                      endpoint=auth.url, cache_dir=tmp_path / "cache", extra_env=env)
    assert put.returncode == 0, put.stderr.decode()
    ls = run_deltafs(["ls", f"s3://{auth.bucket}/{prefix}"], endpoint=auth.url,
                     cache_dir=tmp_path / "cache", extra_env=env)
    assert ls.returncode == 0, ls.stderr.decode()
    assert ls.stdout.decode().split() == ["f.bin"]


# ------------------------------------------------------------------------ delete


def test_delete_keeps_reference_until_last_delta(any_engine: Engine, tmp_path: Path) -> None:
    v1, v2 = _two_versions(tmp_path)
    any_engine.put(v1, "d/v1.bin")
    any_engine.put(v2, "d/v2.bin")
    small = write_file(tmp_path / "small", b"x" * 100)
    any_engine.put(small, "d/small")
    assert "d/reference.bin" in keys_of(any_engine.store)
    any_engine.delete("d/v1.bin")  # the file that seeded the reference
    objects = keys_of(any_engine.store)
    assert "d/reference.bin" in objects and "d/v1.bin.delta" not in objects
    out = tmp_path / "out"
    any_engine.get("d/v2.bin", out)
    assert sha256_file(out) == sha256_file(v2)
    any_engine.delete("d/v2.bin")
    assert set(keys_of(any_engine.store)) == {"d/small"}
    any_engine.delete("d/small")
    assert keys_of(any_engine.store) == {}
    with pytest.raises(NotFound):
        any_engine.delete("d/v2.bin")


def test_delete_in_one_deltaspace_leaves_others(engine: Engine, tmp_path: Path) -> None:
    v1, v2 = _two_versions(tmp_path)
    engine.put(v1, "x/v1.bin")
    engine.put(v2, "x/sub/v2.bin")
    engine.delete("x/v1.bin")
    assert set(keys_of(engine.store)) == {"x/sub/reference.bin", "x/sub/v2.bin.delta"}


# --------------------------------------------------------------------- list/stats


def test_list_reports_true_sizes(any_engine: Engine, tmp_path: Path) -> None:
    v1, v2 = _two_versions(tmp_path)
    any_engine.put(v1, "l/v1.bin")
    any_engine.put(v2, "l/v2.bin")
    any_engine.put(write_file(tmp_path / "n", b"n" * 10), "l/note.txt")
    any_engine.put(v1, "l/sub/copy.bin")
    stored = keys_of(any_engine.store)
    entries = {e.key: e for e in any_engine.list("l/")}
    assert set(entries) == {"l/v1.bin", "l/v2.bin", "l/note.txt", "l/sub/"}
    assert entries["l/sub/"].is_dir
    for name, src in (("v1.bin", v1), ("v2.bin", v2)):
        e = entries[f"l/{name}"]
        assert e.size == src.stat().st_size
        assert e.stored_size == stored[f"l/{name}.delta"] < e.size
        assert e.kind == "delta"
        assert e.sha256 == sha256_file(src)
    assert entries["l/note.txt"].size == 10 and entries["l/note.txt"].kind == "direct"
    rec = {e.key: e.size for e in any_engine.list("l/", recursive=True)}
    assert rec == {"l/v1.bin": v1.stat().st_size, "l/v2.bin": v2.stat().st_size,
                   "l/note.txt": 10, "l/sub/copy.bin": v1.stat().st_size}


def test_stats_logical_vs_stored(any_engine: Engine, tmp_path: Path) -> None:
    v1, v2 = _two_versions(tmp_path)
    any_engine.put(v1, "st/v1.bin")
    any_engine.put(v2, "st/v2.bin")
    any_engine.put(write_file(tmp_path / "n", b"n" * 10), "st/note.txt")
    s = any_engine.stats("st/")
    stored = keys_of(any_engine.store, "st/")
    assert s.files == 3
    assert s.logical_bytes == v1.stat().st_size + v2.stat().st_size + 10
    assert s.stored_bytes == sum(stored.values())
    assert s.references == 1 and s.reference_bytes == stored["st/reference.bin"]
    assert s.by_kind == {"delta": 2, "direct": 1}
    assert 0 < s.savings < 1


# ---------------------------------------------------------------- overwrite


def test_overwrite_delta_with_direct(any_engine: Engine, tmp_path: Path) -> None:
    """Same name, related then unrelated content: one object for the name, and the
    reference goes once nothing uses it."""
    v1, v2 = _two_versions(tmp_path)
    any_engine.put(v1, "o/app.bin")
    unrelated = write_file(tmp_path / "u", random.Random(99).randbytes(MiB))
    r = any_engine.put(unrelated, "o/app.bin")
    assert r.kind == "direct"
    assert set(keys_of(any_engine.store)) == {"o/app.bin"}
    out = tmp_path / "out"
    any_engine.get("o/app.bin", out)
    assert sha256_file(out) == sha256_file(unrelated)


def test_overwrite_keeps_reference_used_by_others(any_engine: Engine, tmp_path: Path) -> None:
    v1, v2 = _two_versions(tmp_path)
    any_engine.put(v1, "o/a.bin")
    any_engine.put(v2, "o/b.bin")
    unrelated = write_file(tmp_path / "u", random.Random(98).randbytes(MiB))
    assert any_engine.put(unrelated, "o/a.bin").kind == "direct"
    assert visible(keys_of(any_engine.store)) == {"o/reference.bin", "o/a.bin", "o/b.bin.delta"}
    out = tmp_path / "out"
    any_engine.get("o/b.bin", out)
    assert sha256_file(out) == sha256_file(v2)


def test_overwrite_direct_with_delta(any_engine: Engine, tmp_path: Path) -> None:
    v1, v2 = _two_versions(tmp_path)
    any_engine.put(write_file(tmp_path / "s", b"tiny"), "o/app.bin")
    any_engine.put(v1, "o/app.bin")
    assert visible(keys_of(any_engine.store)) == {"o/reference.bin", "o/app.bin.delta"}
    any_engine.put(v2, "o/app.bin")
    assert visible(keys_of(any_engine.store)) == {"o/reference.bin", "o/app.bin.delta"}
    out = tmp_path / "out"
    any_engine.get("o/app.bin", out)
    assert sha256_file(out) == sha256_file(v2)
    assert [e.key for e in any_engine.list("o/")] == ["o/app.bin"]


# ------------------------------------------------------------------------ verify


def test_verify_reports_corruption(moto_server: str, bucket: str, s3store: S3Store, s3: Any,
                                   tmp_path: Path) -> None:
    v1, v2 = _two_versions(tmp_path)
    eng = make_engine(s3store, tmp_path / "cache")
    eng.put(v1, "v/v1.bin")
    eng.put(v2, "v/v2.bin")
    eng.put(write_file(tmp_path / "n", b"n" * 10), "v/note.txt")
    assert eng.verify("v/") == [("v/note.txt", None), ("v/v1.bin", None), ("v/v2.bin", None)]
    corrupt_object(s3, bucket, "v/v2.bin.delta", "flip")
    corrupt_object(s3, bucket, "v/note.txt", "flip")
    results = dict(eng.verify("v/"))
    assert results["v/v1.bin"] is None
    assert results["v/v2.bin"] and "v/v2.bin" in results["v/v2.bin"]
    assert results["v/note.txt"] and "v/note.txt" in results["v/note.txt"]
    proc = run_deltafs(["verify", f"s3://{bucket}/v/"], endpoint=moto_server,
                       cache_dir=tmp_path / "cache")
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout.decode()
    assert "FAILED v/v2.bin" in out and "FAILED v/note.txt" in out
    assert "1 of 3 files verified, 2 FAILED" in out
    ok = run_deltafs(["verify", f"s3://{bucket}/v/v1.bin"], endpoint=moto_server,
                     cache_dir=tmp_path / "cache")
    assert ok.returncode == 0, ok.stderr
    assert b"1 of 1 files verified" in ok.stdout


# ------------------------------------------------------------------ reference cache


def test_reference_cache_avoids_downloads(moto_server: str, bucket: str, tmp_path: Path) -> None:
    """After a put in a cache dir, further puts and gets there never GET reference.bin
    (DeltaGlider's format: one object per delta; chains: the next test)."""
    v1, v2 = _two_versions(tmp_path)
    cache = tmp_path / "cache"
    store = S3Store(bucket, endpoint_url=moto_server)
    strict = Policy.create(format="deltaglider")
    eng = make_engine(store, cache, policy=strict)
    eng.put(v1, "c/v1.bin")
    assert store.stats().get("GET", 0) == 0
    eng.put(v2, "c/v2.bin")
    assert store.stats().get("GET", 0) == 0, store.stats()
    eng.get("c/v2.bin", tmp_path / "o1")
    assert store.stats().get("GET", 0) == 1, store.stats()  # the delta only
    assert sha256_file(tmp_path / "o1") == sha256_file(v2)

    # another process with the same cache dir
    store2 = S3Store(bucket, endpoint_url=moto_server)
    make_engine(store2, cache, policy=strict).get("c/v2.bin", tmp_path / "o2")
    assert store2.stats().get("GET", 0) == 1, store2.stats()

    # a cold cache downloads the reference once, then never again
    store3 = S3Store(bucket, endpoint_url=moto_server)
    cold = make_engine(store3, tmp_path / "cold", policy=strict)
    cold.get("c/v2.bin", tmp_path / "o3")
    assert store3.stats().get("GET", 0) == 2, store3.stats()
    cold.get("c/v1.bin", tmp_path / "o4")
    assert store3.stats().get("GET", 0) == 3, store3.stats()
    assert sha256_file(tmp_path / "o4") == sha256_file(v1)


def test_reference_cache_not_aliased_to_source_file(moto_server: str, bucket: str,
                                                    s3store: S3Store, tmp_path: Path) -> None:
    """The cache must own its copy of a reference: editing the source file in place after
    the put that seeded the reference must not change what later puts encode against."""
    rng = random.Random(70)
    v1_data = rng.randbytes(MiB)
    v2_data = next_version(v1_data, rng)
    v1 = write_file(tmp_path / "work" / "app.bin", v1_data)
    cache = tmp_path / "cache"
    eng = make_engine(s3store, cache)
    eng.put(v1, "r/app-1.bin")
    # the user rebuilds the file in place (same inode), e.g. a build writing its output
    with open(v1, "r+b") as f:
        f.write(v2_data[: len(v1_data)])
    v2 = write_file(tmp_path / "v2.bin", v2_data)
    eng.put(v2, "r/app-2.bin")
    got = tmp_path / "got"
    sha = fresh_get(s3store, "r/app-2.bin", got, tmp_path / "cold-cache")
    assert sha == sha256_bytes(v2_data)
    # and the writer's own cache still serves the true reference
    eng.get("r/app-1.bin", tmp_path / "got1")
    assert sha256_file(tmp_path / "got1") == sha256_bytes(v1_data)


def test_get_missing_file(engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        engine.get("nope/x.bin", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert os.listdir(tmp_path) == ["cache"]


# ------------------------------------------------------------------ edge cases


def test_bucket_root_deltaspace(any_engine: Engine, tmp_path: Path) -> None:
    """The bucket root is a deltaspace too: reference.bin at the root, collected after."""
    v1, v2 = _two_versions(tmp_path)
    any_engine.put(v1, "v1.bin")
    assert any_engine.put(v2, "v2.bin").kind == "delta"
    assert visible(keys_of(any_engine.store)) == {"reference.bin", "v1.bin.delta",
                                                  "v2.bin.delta"}
    assert [e.key for e in any_engine.list("")] == ["v1.bin", "v2.bin"]
    out = tmp_path / "out"
    any_engine.get("v2.bin", out)
    assert sha256_file(out) == sha256_file(v2)
    any_engine.delete("v1.bin")
    any_engine.delete("v2.bin")
    assert keys_of(any_engine.store) == {}


def test_non_ascii_name_round_trip(any_engine: Engine, tmp_path: Path) -> None:
    """Names S3 metadata cannot carry as-is (non-ASCII) still store and read back."""
    v1, v2 = _two_versions(tmp_path)
    any_engine.put(v1, "ünï/çødé 1.bin")
    r = any_engine.put(v2, "ünï/çødé 2 – ß.bin")
    assert r.kind == "delta"
    out = tmp_path / "out"
    any_engine.get("ünï/çødé 2 – ß.bin", out)
    assert sha256_file(out) == sha256_file(v2)
    assert [e.key for e in any_engine.list("ünï/")] == ["ünï/çødé 1.bin", "ünï/çødé 2 – ß.bin"]


def test_empty_file_round_trip(any_engine: Engine, tmp_path: Path) -> None:
    empty = write_file(tmp_path / "empty", b"")
    r = any_engine.put(empty, "e/empty")
    assert r.kind == "direct" and r.original_size == 0
    out = tmp_path / "out"
    any_engine.get("e/empty", out)
    assert out.read_bytes() == b""
    assert [(e.key, e.size) for e in any_engine.list("e/")] == [("e/empty", 0)]


# ------------------------------------------------------------------ references (gc)


def test_gc_removes_only_unused_references_past_the_grace(any_engine: Engine,
                                                          tmp_path: Path) -> None:
    v1, v2 = _two_versions(tmp_path)
    any_engine.put(v1, "g/v1.bin")
    any_engine.put(v2, "h/v2.bin")
    # a reference left behind (a removal that crashed half-way, another tool)
    any_engine.store.delete("g/v1.bin.delta")
    assert any_engine.gc("", grace=3600) == []
    assert any_engine.gc("", grace=0, dry_run=True) == ["g/reference.bin"]
    assert "g/reference.bin" in keys_of(any_engine.store)
    assert any_engine.gc("", grace=0) == ["g/reference.bin"]
    assert set(keys_of(any_engine.store)) == {"h/reference.bin", "h/v2.bin.delta"}


@contextlib.contextmanager
def _after_reference_delete(engine: Engine, then: Callable[[], None]) -> Iterator[list[str]]:
    """Run ``then`` (another writer's step) right after the engine's first DELETE of
    ``r/reference.bin``; yields the list that records that it ran."""
    real_delete = engine.store.delete
    raced: list[str] = []

    def racing_delete(key: str, **kw: object) -> None:
        real_delete(key, **kw)  # type: ignore[arg-type]
        if key == "r/reference.bin" and not raced:
            raced.append(key)
            then()

    engine.store.delete = racing_delete  # type: ignore[method-assign]
    try:
        yield raced
    finally:
        engine.store.delete = real_delete  # type: ignore[method-assign]


def test_reference_replaced_by_a_new_seed_during_removal_orphans_no_delta(
        any_engine: Engine, tmp_path: Path) -> None:
    """Seen in CI with two mounts: a collector removes the unused reference; a writer's
    delta (encoded against it, its own check done before the DELETE) lands, and another
    upload seeds a *different* reference before the collector puts the old one back. The
    collector's restore then fails; the delta must be stored again, not orphaned."""
    from deltafs.format import reference_metadata

    v1, v2 = _two_versions(tmp_path)
    v3 = write_file(tmp_path / "src" / "v3.bin", random.Random(99).randbytes(MiB))
    any_engine.put(v1, "s/v1.bin")  # s/: the same reference content, to borrow a delta
    any_engine.put(v2, "s/v2.bin")
    any_engine.put(v1, "r/v1.bin")
    def their_delta_and_new_seed() -> None:
        info = any_engine.store.head("s/v2.bin.delta")
        assert info is not None
        meta = dict(info.metadata or {})
        meta["dg-ref-key"] = "r/reference.bin"
        any_engine.store.copy("s/v2.bin.delta", "r/v2.bin.delta", meta)
        any_engine.store.put_file("r/reference.bin", v3,
                                  reference_metadata("v3.bin", sha256_file(v3)),
                                  if_none_match=True)

    with _after_reference_delete(any_engine, their_delta_and_new_seed) as raced:
        any_engine.delete("r/v1.bin")
    assert raced
    out = tmp_path / "out.bin"
    make_engine(any_engine.store, tmp_path / "fresh").get("r/v2.bin", out)
    assert sha256_file(out) == sha256_file(v2)


def test_reference_removal_puts_it_back_when_a_delta_appears(any_engine: Engine,
                                                             tmp_path: Path) -> None:
    """Another writer stores a delta between the LIST that found the reference unused
    and its DELETE: the reference comes back, so that delta stays decodable."""
    v1, v2 = _two_versions(tmp_path)
    any_engine.put(v1, "r/v1.bin")
    ref_before = any_engine.store.head("r/reference.bin")
    assert ref_before is not None
    # the other writer's delta lands right after the delete
    with _after_reference_delete(any_engine, lambda: any_engine.store.put_bytes(
            "r/other.bin.delta", b"their delta", {})) as raced:
        any_engine.delete("r/v1.bin")
    assert raced
    after = any_engine.store.head("r/reference.bin")
    assert after is not None and after.metadata == ref_before.metadata
    out = tmp_path / "out"
    any_engine.store.get_file("r/reference.bin", out)
    assert sha256_file(out) == sha256_file(v1)


def test_bulk_listing_streams_and_keeps_the_newer_form(any_engine: Engine,
                                                       tmp_path: Path) -> None:
    """``iter_files`` decides a name's plain and ``.delta`` forms though other keys sort
    between them ("a" < "a-1" < "a.delta"), keeps the newer, and yields in batches; the
    bulk commands built on it (ls -R, stats, verify, rm -r) agree with the in-memory
    listing."""
    from deltafs.engine import BULK_BATCH
    from deltafs.format import Kind
    from deltafs.store.base import ObjectInfo

    def obj(key: str, mtime: float) -> ObjectInfo:
        return ObjectInfo(key, 10, f"e-{key}", mtime, None)

    stream = [obj("d/a", 1.0), obj("d/a-1", 5.0), obj("d/a-1/x", 5.0), obj("d/a.delta", 2.0),
              obj("d/b", 3.0), obj("d/b.delta", 1.0), obj("d/c.delta", 1.0),
              obj("d/reference.bin", 1.0), obj("d/z", 1.0)]
    got = {f.logical_key: f for f in any_engine.iter_files(iter(stream), sizes=False)}
    assert sorted(got) == ["d/a", "d/a-1", "d/a-1/x", "d/b", "d/c", "d/z"]
    assert got["d/a"].kind is Kind.DELTA  # the newer form
    assert got["d/b"].kind is not Kind.DELTA
    # through a real store: more files than a batch, in two directories
    rng = random.Random(3)
    base = rng.randbytes(70_000)
    src = tmp_path / "f"
    n = BULK_BATCH + 5
    for i in range(n):
        src.write_bytes(base[:i] + b"!" + base[i + 1:] if i < 3 else f"{i}".encode())
        any_engine.put(src, f"bulk/{'big' if i < 3 else 'small'}/f{i:05d}")
    listed = any_engine.list("bulk/", recursive=True)
    assert len(listed) == n and [e.key for e in listed] == sorted(e.key for e in listed)
    assert {e.key: e.size for e in listed}["bulk/big/f00001"] == 70_000  # a delta's true size
    assert sorted(e.key for e in any_engine.list("bulk/")) == ["bulk/big/", "bulk/small/"]
    s = any_engine.stats("bulk/")
    assert s.files == n and s.by_kind.get("delta") == 3  # the first too (against reference.bin)
    assert all(err is None for _, err in any_engine.iter_verify("bulk/big/"))
    assert any_engine.delete_tree("bulk/") == n
    assert any_engine.list("bulk/", recursive=True) == []
    assert list(any_engine.store.iter_objects("bulk/")) == []


def test_a_reference_removed_between_its_head_and_its_get_is_looked_for_again(
        any_engine: Engine, tmp_path: Path) -> None:
    """Another mount empties the directory and its collector removes the reference just
    after this put HEADed it: the GET's 404 must send the put to look again (and seed a
    new reference), not fail the file for good (seen once in a suite run: a file stayed
    pending, 'failed for good', until it changed)."""
    rng = random.Random(11)
    v1 = rng.randbytes(300_000)
    v2 = bytearray(v1)
    v2[1000:1010] = b"x" * 10
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(v1)
    b.write_bytes(bytes(v2))
    any_engine.put(a, "rel/a.bin")
    # a fresh engine (another process: nothing remembered) over the same store
    other = make_engine(any_engine.store, tmp_path / "cache-other")
    original = other._fetch_reference  # noqa: SLF001
    removed: list[str] = []

    def fetch(ref_key: str, *args: Any, **kwargs: Any) -> Any:
        if not removed:  # the other mount's collector, between HEAD and GET
            other.store.delete(ref_key)
            other.store.delete("rel/a.bin.delta")
            removed.append(ref_key)
        return original(ref_key, *args, **kwargs)

    other._fetch_reference = fetch  # type: ignore[method-assign]  # noqa: SLF001
    r = other.put(b, "rel/b.bin")
    assert removed == ["rel/reference.bin"]
    assert r.kind in ("reference", "delta")
    out = tmp_path / "out.bin"
    make_engine(any_engine.store, tmp_path / "cache-fresh").get("rel/b.bin", out)
    assert out.read_bytes() == bytes(v2)
