"""Issue 9: several mounts of one bucket (two daemons, their own cache dirs), as teams
scale out. Each test checks one sentence of SEMANTICS.md, "Several mounts of one bucket".
"""
from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from faultproxy import FaultProxy, fault_proxy  # noqa: F401
from helpers import deltaglider_exe
from mountfixtures import Mount, release_versions

KiB = 1 << 10
TTL = 2.0


def _mount(bucket: str, endpoint: str, base: Path, *extra: str) -> Mount:
    m = Mount(bucket, endpoint, base, extra_args=["--listing-ttl", str(TTL), *extra])
    m.mount()
    return m


def _teardown(*mounts: Mount | None) -> None:
    for m in mounts:
        if m is not None:
            try:
                m.teardown()
            finally:
                m.dump_logs()


@pytest.fixture
def two(moto_server: str, bucket: str, tmp_path: Path) -> Iterator[tuple[Mount, Mount]]:
    a = b = None
    try:
        a = _mount(bucket, moto_server, tmp_path / "a")
        b = _mount(bucket, moto_server, tmp_path / "b")
        yield a, b
    finally:
        _teardown(a, b)


def _fresh(bucket: str, endpoint: str, base: Path) -> Mount:
    return _mount(bucket, endpoint, base)


def _read(p: Path) -> bytes | None:
    try:
        return p.read_bytes()
    except FileNotFoundError:
        return None


def test_overwrite_is_seen_whole_within_the_ttl(two: tuple[Mount, Mount]) -> None:
    """Close-to-open after at most the listing TTL; a reader never sees a mix."""
    a, b = two
    old, new = release_versions(2, 3 << 20, seed=9)
    (a.mountpoint / "f.bin").write_bytes(old)
    a.wait_idle(30)
    time.sleep(TTL)
    assert (b.mountpoint / "f.bin").read_bytes() == old  # B has read (and cached) it
    with open(a.mountpoint / "f.bin", "wb") as f:
        f.write(new)
        f.flush()
        os.fsync(f.fileno())  # in the bucket when this returns
    t0 = time.monotonic()
    seen_new_at = None
    reads = 0
    while time.monotonic() - t0 < TTL + 5:
        got = (b.mountpoint / "f.bin").read_bytes()  # B polls every 0.2 s
        reads += 1
        assert got in (old, new), f"read {reads}: bytes of neither version"
        if got == new:
            seen_new_at = time.monotonic() - t0
            break
        time.sleep(0.2)
    assert seen_new_at is not None, f"B still served the old version after {TTL + 5} s"
    assert os.stat(b.mountpoint / "f.bin").st_size == len(new)
    for _ in range(5):
        assert (b.mountpoint / "f.bin").read_bytes() == new


def test_open_of_a_name_replaced_behind_a_cached_lookup_opens_the_new_file(
        moto_server: str, bucket: str, tmp_path: Path) -> None:
    """The kernel still holds B's lookup of the name (entry timeout 1 s) when the open
    relists the directory and finds the object replaced: that open must give the new
    version, never EIO (the old inode was orphaned with no content)."""
    from deltafs.api import DeltaService

    b = Mount(bucket, moto_server, tmp_path / "b", extra_args=["--listing-ttl", "0.1"])
    svc = DeltaService(bucket, endpoint_url=moto_server, cache_dir=tmp_path / "svc")
    src = tmp_path / "src"
    src.mkdir()
    try:
        b.mount()
        for i in range(5):
            old, new = os.urandom(20 * KiB), os.urandom(20 * KiB)
            name = f"r{i}.bin"
            (src / name).write_bytes(old)
            svc.put(src / name, name)
            time.sleep(0.2)
            assert (b.mountpoint / name).read_bytes() == old  # cached lookup, cached file
            ino = os.stat(b.mountpoint / name).st_ino  # the dentry is fresh for ~1 s
            (src / name).write_bytes(new)
            svc.put(src / name, name)  # another writer replaces it
            time.sleep(0.15)  # B's listing is stale, its dentry is not
            assert (b.mountpoint / name).read_bytes() == new
            assert os.stat(b.mountpoint / name).st_ino != ino
        assert "has no content anywhere" not in b.log_text()
    finally:
        _teardown(b)


def test_an_open_reader_keeps_its_version(two: tuple[Mount, Mount]) -> None:
    a, b = two
    old, new = release_versions(2, 2 << 20, seed=3)
    (a.mountpoint / "g.bin").write_bytes(old)
    a.wait_idle(30)
    time.sleep(TTL)
    with open(b.mountpoint / "g.bin", "rb") as f:
        head = f.read(1 << 20)
        (a.mountpoint / "g.bin").write_bytes(new)
        a.wait_idle(30)
        time.sleep(TTL + 0.5)
        assert (b.mountpoint / "g.bin").read_bytes() in (old, new)  # a new open
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        rest = f.read()
    assert head + rest == old, "an open handle served a mix of two versions"


def test_delete_then_same_size_create_never_serves_the_old_bytes(
        two: tuple[Mount, Mount]) -> None:
    a, b = two
    g = os.urandom(300 * KiB)
    h = os.urandom(300 * KiB)
    (a.mountpoint / "g").write_bytes(g)
    a.wait_idle(30)
    time.sleep(TTL)
    assert (b.mountpoint / "g").read_bytes() == g
    ino_g = os.stat(b.mountpoint / "g").st_ino
    os.unlink(a.mountpoint / "g")
    (a.mountpoint / "h").write_bytes(h)
    a.wait_idle(30)
    time.sleep(TTL + 0.5)
    assert (b.mountpoint / "h").read_bytes() == h
    assert os.stat(b.mountpoint / "h").st_ino != ino_g
    assert not (b.mountpoint / "g").exists()


def test_same_name_written_at_once_ends_as_one_whole_version(
        two: tuple[Mount, Mount], moto_server: str, bucket: str, tmp_path: Path) -> None:
    a, b = two
    finals = []
    for r in range(10):
        va, vb = os.urandom(200 * KiB), os.urandom(200 * KiB)
        name = f"same{r}.bin"
        ta = threading.Thread(target=(a.mountpoint / name).write_bytes, args=(va,))
        tb = threading.Thread(target=(b.mountpoint / name).write_bytes, args=(vb,))
        ta.start(); tb.start(); ta.join(); tb.join()  # noqa: E702
        finals.append((name, va, vb))
    a.wait_idle(60)
    b.wait_idle(60)
    c = _fresh(bucket, moto_server, tmp_path / "c")
    try:
        for name, va, vb in finals:
            assert (c.mountpoint / name).read_bytes() in (va, vb), name
    finally:
        c.teardown()


@pytest.mark.parametrize("fmt", ["deltaglider", "auto"])
def test_emptying_a_directory_never_orphans_anothers_deltas(
        moto_server: str, bucket: str, tmp_path: Path, fmt: str) -> None:
    """A removes every file of a directory (its reference is no longer used, and with
    chains its blobs are swept) while B copies new versions into it: every file B wrote
    reads back, through a third, fresh mount and (in DeltaGlider's format) through
    DeltaGlider's own CLI."""
    a = b = None
    try:
        a = _mount(bucket, moto_server, tmp_path / "a", "--format", fmt)
        b = _mount(bucket, moto_server, tmp_path / "b", "--format", fmt)
        _emptying_while_copying(a, b, moto_server, bucket, tmp_path, fmt)
    finally:
        _teardown(a, b)


def _emptying_while_copying(a: Mount, b: Mount, moto_server: str, bucket: str,
                            tmp_path: Path, fmt: str) -> None:
    import subprocess

    from helpers import cli_env

    rng = random.Random(11)
    versions = release_versions(40, 256 * KiB, seed=11)
    acked: dict[str, bytes] = {}
    k = 0
    for r in range(6):
        d = f"rel{r}"
        (a.mountpoint / d).mkdir()
        for i in range(2):
            (a.mountpoint / d / f"a{i}.bin").write_bytes(versions[k % 40]); k += 1  # noqa: E702
        a.wait_idle(30)
        time.sleep(TTL + 0.2)
        assert os.path.isdir(b.mountpoint / d)

        def remove() -> None:
            time.sleep(rng.random() * 0.8)
            for i in range(2):
                os.unlink(a.mountpoint / d / f"a{i}.bin")

        def copy() -> None:
            nonlocal k
            for i in range(3):
                time.sleep(rng.random() * 0.4)
                data = versions[(k + i) % 40]
                (b.mountpoint / d / f"b{i}.bin").write_bytes(data)
                acked[f"{d}/b{i}.bin"] = data

        t1, t2 = threading.Thread(target=remove), threading.Thread(target=copy)
        t1.start(); t2.start(); t1.join(); t2.join()  # noqa: E702
        k += 3
    a.wait_idle(60)
    b.wait_idle(60)
    c = _fresh(bucket, moto_server, tmp_path / "c")
    try:
        for rel, data in acked.items():
            assert (c.mountpoint / rel).read_bytes() == data, rel
    finally:
        c.teardown()
    # DeltaGlider reads what deltafs wrote in its format, references included
    out = tmp_path / "dg"
    out.mkdir()
    for rel in (list(acked)[:: 7] if fmt == "deltaglider" else []):
        res = subprocess.run([deltaglider_exe(), "cp", f"s3://{bucket}/{rel}",
                              str(out / rel.replace("/", "_"))],
                             env=cli_env(moto_server), capture_output=True, timeout=120)
        assert res.returncode == 0, res.stderr.decode()[-1000:]
        assert (out / rel.replace("/", "_")).read_bytes() == acked[rel], rel
    logs = [m.log_text() for m in (a, b)]
    removed = sum(t.count("no delta uses it any more") for t in logs)
    races = sum(t.count("putting the reference back") + t.count("vanished while")
                for t in logs)
    swept = sum(t.count("a sweep took a blob") for t in logs)
    print(f"references removed while the other mount wrote: {removed}; races that "
          f"really happened (a delta stored while its reference went) and were repaired: "
          f"{races}; chain puts that lost a blob to a sweep and were stored again: {swept}")


def test_delete_and_rename_of_one_file_on_two_mounts(two: tuple[Mount, Mount]) -> None:
    """A deletes a file while B renames it, and the other way round: the renamed file
    survives; no stale tombstone deletes what the other mount wrote."""
    a, b = two
    for r, (deleter, renamer) in enumerate(((a, b), (b, a))):
        data = os.urandom(150 * KiB)
        (a.mountpoint / f"f{r}").write_bytes(data)
        a.wait_idle(30)
        time.sleep(TTL + 0.2)
        assert (renamer.mountpoint / f"f{r}").read_bytes() == data  # cached there
        os.unlink(deleter.mountpoint / f"f{r}")
        os.rename(renamer.mountpoint / f"f{r}", renamer.mountpoint / f"g{r}")
        deleter.wait_idle(30)
        renamer.wait_idle(30)
        keys = set(a.objects())
        assert f"g{r}" in keys or f"g{r}.delta" in keys, keys
        time.sleep(TTL + 0.2)
        for m in (a, b):
            assert (m.mountpoint / f"g{r}").read_bytes() == data


def test_a_pending_delete_never_removes_a_newer_object(
        fault_proxy: FaultProxy, moto_server: str, bucket: str,  # noqa: F811
        tmp_path: Path) -> None:
    """A mount kept offline with a pending delete while another mount rewrites that key:
    when S3 is back, the newer object survives."""
    a = Mount(bucket, fault_proxy.url, tmp_path / "a", extra_args=["--listing-ttl", str(TTL)])
    b = None
    try:
        a.mount()
        b = _mount(bucket, moto_server, tmp_path / "b")
        # small files are stored direct: both versions live at the same key "k.bin"
        old, new = os.urandom(30 * KiB), os.urandom(30 * KiB)
        (a.mountpoint / "k.bin").write_bytes(old)
        a.wait_idle(30)
        fault_proxy.set("refuse")  # A is offline
        os.unlink(a.mountpoint / "k.bin")  # its delete waits in A's journal
        time.sleep(1)
        assert a.status()["pending_files"] >= 1
        time.sleep(TTL)
        (b.mountpoint / "k.bin").write_bytes(new)  # B rewrites the key meanwhile
        b.wait_idle(30)
        fault_proxy.clear()  # A is back: its delete runs, guarded by the old ETag
        a.wait_idle(60)
        time.sleep(TTL + 0.2)
        assert (b.mountpoint / "k.bin").read_bytes() == new
        assert (a.mountpoint / "k.bin").read_bytes() == new
        # either the guarded DELETE was refused (412), or A had listed B's object first
        # and dropped its stale tombstone; never an unguarded delete of B's object
        assert "another writer has replaced it" in a.log_text() or \
            fault_proxy.seen(method="DELETE") == 0, a.log_tail()
    finally:
        _teardown(a, b)
