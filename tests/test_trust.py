"""Issue 8, "Trust": each way 0.1 served wrong bytes or lost a file, as a test on a real
mount (the prefix mount on a fresh cache, no. 1, is in test_mount.py; crash points are in
test_crash.py; S3 faults in test_mount_faults.py).
"""
from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest

from mountfixtures import (Mount, deltafs_exe, mounted, pid_alive, read_or_errno,  # noqa: F401
                          release_versions, sha_of)
from helpers import sha256_bytes
from test_mount import MotoProcess, own_moto  # noqa: F401  (the fixture)

KiB, MiB = 1 << 10, 1 << 20


def _key_names(m: Mount, prefix: str = "") -> set[str]:
    return set(m.objects(prefix))


# ----------------------------------------------------------------------------------------
# 2. a full cache disk: back-pressure and ENOSPC, never a hole, never a dead daemon

@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    where = tmp_path / "cachedisk"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_full_cache_disk_never_stores_wrong_bytes(own_moto: MotoProcess, small_disk: Path,
                                                  tmp_path: Path) -> None:
    bucket = "small-disk"
    client = boto3.client("s3", endpoint_url=own_moto.url, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    m = Mount(bucket, own_moto.url, tmp_path / "deltafs")
    m.cache = small_disk / "cache"
    src = tmp_path / "src"
    src.mkdir()
    sizes = [16 * MiB] * 50  # 800 MiB in all, one file at a time
    files = []
    for i, size in enumerate(sizes):
        p = src / f"f{i:02d}.bin"
        p.write_bytes(random.Random(i).randbytes(size))
        files.append(p)
    ok: list[Path] = []
    failed: list[tuple[Path, str]] = []

    def copy(p: Path) -> None:
        res = subprocess.run(["cp", str(p), str(m.mountpoint / p.name)], capture_output=True,
                             text=True, timeout=120)
        if res.returncode == 0:
            ok.append(p)
        else:
            failed.append((p, res.stderr.strip()))

    try:
        m.mount()
        assert os.listdir(m.mountpoint) == []  # the root is known before S3 goes away
        # S3 away: nothing drains, the staged files fill the 200 MB disk
        own_moto.stop()
        for p in files[:16]:
            copy(p)
        assert failed, "the cache disk never filled up"
        for p, err in failed:
            assert "No space left on device" in err, err
        assert pid_alive(m.pid or 0), "the daemon died on a full disk"
        st = m.status()
        assert st["pending_files"] >= 1
        # S3 back: uploads drain and make room; the rest goes one file at a time
        own_moto.start()
        client.create_bucket(Bucket=bucket)
        for p in files[16:]:
            copy(p)
        m.wait_idle(300)
        for p, err in failed:
            assert "No space left on device" in err, err
        # the same cache dir mounts again (its journal and cache index survived)
        m.umount()
        m.mount()
        m.wait_idle(120)
        m.umount()
        m.save_log()
        # every file whose close() succeeded reads back byte-identical from the bucket
        m.cache = tmp_path / "fresh-cache"
        m.mount()
        for p in ok:
            assert sha_of(m.mountpoint / p.name) == sha_of(p), f"{p.name} differs"
        for p, _ in failed:
            q = m.mountpoint / p.name
            if q.exists():  # a failed cp may leave a partial file: never a wrong byte
                data = q.read_bytes()
                assert p.read_bytes().startswith(data), f"{p.name}: bytes never written"
        # while S3 is back, uploads make room: most of the later copies go through
        assert len(ok) >= 20, (len(ok), [f[0].name for f in failed])
    finally:
        try:
            m.teardown()
        finally:
            m.dump_logs()


def _fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte with a file of its own (not the cache's, so
    nothing the daemon evicts makes room)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (MiB, 4 * KiB, 1):
            try:
                while os.write(fd, b"\1" * size):
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    assert os.statvfs(disk).f_bavail == 0
    return filler


def test_cold_read_of_a_delta_onto_a_full_cache_disk_fails_cleanly_then_reads_right(
        moto_server: str, bucket: str, small_disk: Path, tmp_path: Path,
        fuse_tools: None) -> None:
    """A cold read must rebuild the file (reference, blob, decode) on the cache disk
    before serving a byte. With no room for it, the open fails with ENOSPC and the log
    says so; with room for the file but not for the rebuild (reference and output), the
    rebuild hits the full disk half-way and the open fails with EIO. The daemon stays
    up; once there is room, the same open returns the right bytes (0.1 stored zeros
    under a valid SHA-256 when a disk filled up)."""
    from deltafs.content import LOW_WATER

    m = Mount(bucket, moto_server, tmp_path / "deltafs")
    m.use_cache(small_disk / "cache")
    datas = release_versions(3, 8 * MiB, seed=41)
    names = [f"app-1.{i}.bin" for i in range(3)]
    try:
        m.mount()
        (m.mountpoint / "rel").mkdir()
        for name, data in zip(names, datas):
            (m.mountpoint / "rel" / name).write_bytes(data)
        m.wait_idle(120)
        assert m.head(f"rel/{names[2]}.delta") is not None  # stored as a delta
        m.remount(wipe_cache=True)  # a new machine: nothing cached
        target = m.mountpoint / "rel" / names[2]
        assert sorted(os.listdir(m.mountpoint / "rel")) == names  # known, not cached
        assert target.stat().st_size == len(datas[2])
        filler = _fill(small_disk)
        got = read_or_errno(target)
        assert got == errno.ENOSPC, got if isinstance(got, int) else len(got)
        assert "cache disk full: rebuilding rel/app-1.2.bin" in m.log_text(), m.log_tail(20)
        # room for the file and the low-water mark, not for its reference as well
        os.truncate(filler, filler.stat().st_size - (len(datas[2]) + LOW_WATER + 4 * KiB))
        got = read_or_errno(target)
        assert got == errno.EIO, got if isinstance(got, int) else \
            f"read {len(got)} bytes with no room to rebuild them (right: {got == datas[2]})"
        assert "no room to rebuild it on the cache disk" in m.log_text(), m.log_tail(20)
        assert pid_alive(m.pid or 0), "the daemon died on a full cache disk"
        filler.unlink()
        assert sha_of(target) == sha256_bytes(datas[2])
        assert (m.mountpoint / "rel" / names[1]).read_bytes() == datas[1]
    finally:
        try:
            m.teardown()
        finally:
            m.dump_logs()


# ----------------------------------------------------------------------------------------
# 3. a damaged cache entry is never served

def _flip_cache_entries(cache_dir: Path) -> int:
    n = 0
    for p in (cache_dir / "content").rglob("*.val"):
        with open(p, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                continue
            off = size // 2
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0x5A]))
        n += 1
    return n


def _read_dropping_cache(path: Path) -> bytes | None:
    """The file's bytes as the daemon serves them now (page cache dropped), or None
    for EIO."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        out = bytearray()
        while chunk := os.read(fd, MiB):
            out += chunk
        return bytes(out)
    except OSError as exc:
        assert exc.errno == errno.EIO, exc
        return None
    finally:
        os.close(fd)


def test_damaged_cache_entries_are_never_served(mounted: Mount) -> None:  # noqa: F811
    m = mounted
    versions = release_versions(3, 600 * KiB, seed=7)
    other = os.urandom(300 * KiB)
    d = m.mountpoint / "rel"
    d.mkdir()
    for i, v in enumerate(versions):
        (d / f"v{i}.bin").write_bytes(v)
    (d / "other.bin").write_bytes(other)
    want = {f"v{i}.bin": v for i, v in enumerate(versions)} | {"other.bin": other}
    m.wait_idle(60)
    for name, data in want.items():
        assert (d / name).read_bytes() == data
    assert _flip_cache_entries(m.cache) >= 3
    # while mounted: the kernel's pages dropped, every read reaches the daemon
    for name, data in want.items():
        got = _read_dropping_cache(d / name)
        assert got is None or got == data, f"{name}: damaged bytes served"
    # after a remount of the same cache dir
    _flip_cache_entries(m.cache)
    m.remount()
    for name, data in want.items():
        got = _read_dropping_cache(m.mountpoint / "rel" / name)
        assert got == data, f"{name}: not refetched after the damage"
    assert "damaged" in m.log_text()
    # a new version encoded against a damaged cached reference is still right
    _flip_cache_entries(m.cache)
    newer = release_versions(4, 600 * KiB, seed=7)[3]
    (m.mountpoint / "rel" / "v3.bin").write_bytes(newer)
    m.wait_idle(60)
    m.remount(wipe_cache=True)
    assert (m.mountpoint / "rel" / "v3.bin").read_bytes() == newer
    for name, data in want.items():
        assert (m.mountpoint / "rel" / name).read_bytes() == data


# ----------------------------------------------------------------------------------------
# 4. permanent errors stop, are reported and do not hold umount; umount --timeout holds

def test_permanent_upload_error_is_reported_and_does_not_block_umount(
        mounted: Mount) -> None:  # noqa: F811
    m = mounted
    bad = m.mountpoint / "bad\nname.txt"  # the test server refuses keys with a newline
    bad.write_bytes(b"refused by the server\n")
    (m.mountpoint / "good.txt").write_bytes(b"fine\n")
    deadline = time.monotonic() + 20
    while True:
        st = m.status()
        if st.get("failed_files"):
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.2)
    assert any("bad" in f["key"] for f in st["failed"]), st
    assert "failed for good" in m.log_text()
    fd = os.open(bad, os.O_RDWR)
    try:
        with pytest.raises(OSError) as exc:
            os.fsync(fd)
        assert exc.value.errno == errno.EIO
    finally:
        os.close(fd)
    n_lines = m.log_text().count("bad\\nname")
    time.sleep(3)
    assert m.log_text().count("bad\\nname") <= n_lines + 1, "a permanent error is retried"
    t0 = time.monotonic()
    m.umount(timeout=30)
    assert time.monotonic() - t0 < 15


def test_umount_timeout_returns_within_the_bound(own_moto: MotoProcess,
                                                 tmp_path: Path) -> None:
    bucket = "bounded"
    boto3.client("s3", endpoint_url=own_moto.url,
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    m = Mount(bucket, own_moto.url, tmp_path / "deltafs")
    try:
        m.mount()
        assert os.listdir(m.mountpoint) == []
        own_moto.stop()
        (m.mountpoint / "pending.bin").write_bytes(os.urandom(200 * KiB))
        pid = m.pid
        t0 = time.monotonic()
        res = subprocess.run([*deltafs_exe(), "umount", "--timeout", "3", str(m.mountpoint)],
                             capture_output=True, text=True, timeout=60)
        took = time.monotonic() - t0
        assert res.returncode == 0, res.stderr
        assert "still pending" in res.stderr
        assert took < 3 + 5, f"umount --timeout 3 took {took:.1f} s"
        deadline = time.monotonic() + 5
        while pid_alive(pid or 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(pid or 0)
        m.pid = None
        # the pending file is kept in the journal for the next mount
        own_moto.start()
        boto3.client("s3", endpoint_url=own_moto.url,
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        m.mount()
        m.wait_idle(60)
        assert any(k.startswith("pending.bin") for k in m.objects())
    finally:
        try:
            m.teardown()
        finally:
            m.dump_logs()


# ----------------------------------------------------------------------------------------
# 5. a deleted file never comes back

def test_deleted_file_does_not_come_back(moto_server: str, bucket: str,
                                         tmp_path: Path) -> None:
    m = Mount(bucket, moto_server, tmp_path / "deltafs", extra_args=["--listing-ttl", "1"])
    try:
        m.mount()
        f = m.mountpoint / "f"
        f.write_bytes(os.urandom(100 * KiB))
        os.chmod(f, 0o600)
        time.sleep(1)
        os.unlink(f)
        # unlinks that race the upload (it starts 0.5 s after close)
        for i in range(24):
            g = m.mountpoint / f"race{i}"
            g.write_bytes(b"hi\n")
            time.sleep(0.45 + 0.01 * i)
            os.unlink(g)
        for i in range(8):
            (m.mountpoint / f"d{i}" / "sub").mkdir(parents=True)
            time.sleep(0.1 * (i % 4))
            subprocess.run(["rm", "-rf", str(m.mountpoint / f"d{i}")], check=True)
        # rsync-, editor- and restic-style temp files: write, rename, unlink
        rng = random.Random(5)
        for i in range(30):
            tmp = m.mountpoint / f".tmp{i}"
            tmp.write_bytes(os.urandom(rng.choice([10, 80, 200]) * KiB))
            os.rename(tmp, m.mountpoint / f"lock{i}")
            time.sleep(rng.choice([0, 0.3, 0.6]))
            if rng.random() < 0.5:
                os.chmod(m.mountpoint / f"lock{i}", 0o640)
            os.unlink(m.mountpoint / f"lock{i}")
        m.wait_idle(60)
        time.sleep(2.5)  # past the listing TTL: the directory is listed again
        assert os.listdir(m.mountpoint) == []
        assert _key_names(m) == set(), m.objects()
        m.remount(wipe_cache=True)
        assert os.listdir(m.mountpoint) == []
        assert "failed unexpectedly" not in m.log_text()
    finally:
        try:
            m.teardown()
        finally:
            m.dump_logs()


# ----------------------------------------------------------------------------------------
# 6. fsync racing with mmap writeback never hangs the writer

MMAP_RACE = r'''
import ctypes, mmap, os, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
SYNC_FILE_RANGE_WRITE = 2
path = sys.argv[1]
with open(path, "wb") as f:
    f.write(os.urandom(1 << 20))
fd = os.open(path, os.O_RDWR)
mm = mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
stop = time.monotonic() + float(sys.argv[2])
errors = []
def dirty():
    i = 0
    while time.monotonic() < stop:
        page = (i * 4096) % (1 << 20)
        mm[page:page + 8] = i.to_bytes(8, "little")
        if i % 2:
            mm.flush(page, 4096)  # msync: writeback of the dirty page
        else:
            libc.sync_file_range(fd, ctypes.c_longlong(page), ctypes.c_longlong(4096),
                                 SYNC_FILE_RANGE_WRITE)
        i += 1
def sync():
    while time.monotonic() < stop:
        try:
            os.fsync(fd)
        except OSError as exc:
            errors.append(exc)
            return
ts = [threading.Thread(target=dirty), threading.Thread(target=sync)]
[t.start() for t in ts]
[t.join() for t in ts]
data = bytes(mm)
mm.close()
os.close(fd)
with open(path, "rb") as f:
    assert f.read() == data, "the file does not hold what the mapping wrote"
print("ok", len(errors))
'''


@pytest.mark.parametrize("store", ["s3", "local"])
def test_fsync_racing_mmap_writeback_does_not_hang(store: str, moto_server: str, bucket: str,
                                                   tmp_path: Path) -> None:
    if store == "s3":
        m = Mount(bucket, moto_server, tmp_path / "deltafs")
        try:
            m.mount()
            _mmap_race(m.mountpoint, m)
        finally:
            try:
                m.teardown()
            finally:
                m.dump_logs()
        return
    root = tmp_path / "store"
    subprocess.run([*deltafs_exe(), "init", str(root)], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = tmp_path / "cache"
    res = subprocess.run([*deltafs_exe(), "mount", str(root), str(mnt), "--cache-dir",
                          str(cache)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    try:
        _mmap_race(mnt, None)
        cpu = _daemon_cpu_after_idle(mnt)
        assert cpu < 0.5, f"the daemon spins at {cpu:.0%} CPU while idle"
    finally:
        r = subprocess.run([*deltafs_exe(), "umount", "--timeout", "10", str(mnt)],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        print((cache / "deltafs.log").read_text()[-3000:] if (cache / "deltafs.log").exists()
              else "")


def _mmap_race(mnt: Path, m: Mount | None) -> None:
    try:
        res = subprocess.run([sys.executable, "-c", MMAP_RACE, str(mnt / "mapped.bin"), "10"],
                             capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("the mmap writer hung (fsync racing with writeback)")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("ok 0"), res.stdout
    if m is not None:
        m.wait_idle(60)


def _daemon_cpu_after_idle(mnt: Path) -> float:
    import json

    pid = int(json.loads(os.getxattr(mnt, "user.deltafs.status"))["pid"])
    time.sleep(3)

    def ticks() -> int:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return int(parts[11]) + int(parts[12])

    t0, c0 = time.monotonic(), ticks()
    time.sleep(3)
    return (ticks() - c0) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - t0)


# ----------------------------------------------------------------------------------------
# 7. the word-processor save (write TMP, rename over DOC, create TMP again) loses nothing

def test_rename_then_recreate_loses_nothing(mounted: Mount) -> None:  # noqa: F811
    m = mounted
    d = m.mountpoint / "docs"
    d.mkdir()
    errors: list[str] = []
    finals: dict[str, tuple[bytes, bytes]] = {}

    def client(name: str, seed: int) -> None:
        rng = random.Random(seed)
        versions = release_versions(12, 100 * KiB, seed=seed)
        tmp, doc = d / f"~{name}.tmp", d / f"{name}.doc"
        try:
            for k, v in enumerate(versions):
                tmp.write_bytes(v)
                os.rename(tmp, doc)
                scratch = b"autosave %d of %s\n" % (k, name.encode()) * 2000
                tmp.write_bytes(scratch)
                with open(tmp, "rb") as f:
                    if f.read() != scratch:
                        errors.append(f"{name} round {k}: TMP reads wrong")
                if doc.read_bytes() != v:
                    errors.append(f"{name} round {k}: DOC reads wrong")
                time.sleep(rng.choice([0.0, 0.3, 0.6, 0.9]))
            finals[name] = (versions[-1], scratch)
        except OSError as exc:
            errors.append(f"{name}: {exc!r}")

    threads = [threading.Thread(target=client, args=(f"c{i}", i)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    m.wait_idle(120)
    m.remount(wipe_cache=True)
    for name, (doc, tmp) in finals.items():
        assert (m.mountpoint / "docs" / f"{name}.doc").read_bytes() == doc
        assert (m.mountpoint / "docs" / f"~{name}.tmp").read_bytes() == tmp
    assert "gone from the bucket" not in m.log_text()


# ----------------------------------------------------------------------------------------
# 8. errnos

def test_errnos(mounted: Mount) -> None:  # noqa: F811
    m = mounted
    long = "n" * 256
    for op in (lambda: open(m.mountpoint / long, "wb"), lambda: os.mkdir(m.mountpoint / long),
               lambda: os.stat(m.mountpoint / long)):
        with pytest.raises(OSError) as exc:
            op()
        assert exc.value.errno == errno.ENAMETOOLONG
    (m.mountpoint / ("n" * 255)).write_bytes(b"ok")  # 255 bytes is fine
    a = m.mountpoint / "a"
    a.mkdir()
    (a / "b").mkdir()
    (a / "c").mkdir()
    (a / "f").write_bytes(b"x")
    assert os.stat(a).st_nlink == 4
    assert os.stat(a / "b").st_nlink == 2
    fd = os.open(a / "f", os.O_RDONLY)
    try:
        os.unlink(a / "f")
        assert os.fstat(fd).st_nlink == 0
        assert os.read(fd, 10) == b"x"
    finally:
        os.close(fd)
    g = m.mountpoint / "g"
    g.write_bytes(b"y")
    with pytest.raises(OSError) as exc:
        os.truncate(g, 1 << 62)
    assert exc.value.errno == errno.EFBIG
    refused = [line for line in m.log_text().splitlines() if "EFBIG" in line]
    assert refused and all(" INFO " in line for line in refused), refused


# ----------------------------------------------------------------------------------------
# review: rows behind 1,000 held-back ones still upload

def test_uploads_are_not_starved_by_held_back_rows(mounted: Mount) -> None:  # noqa: F811
    import resource

    m = mounted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))
    held = []
    try:
        d = m.mountpoint / "held"
        d.mkdir()
        for i in range(1100):
            # closed (staged, dirty) and at once opened again for writing: held back
            (d / f"h{i:04d}").write_bytes(b"staged")
            held.append(open(d / f"h{i:04d}", "ab"))
        (m.mountpoint / "late.txt").write_bytes(b"behind 1,100 open files\n")
        deadline = time.monotonic() + 20
        while "late.txt" not in m.objects():
            assert time.monotonic() < deadline, "late.txt never uploaded"
            time.sleep(0.2)
    finally:
        for f in held:
            f.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    m.wait_idle(120)


# ----------------------------------------------------------------------------------------
# pjdfstest found: a new inode that reused a reaped one's number inherited its state
# (its directory marker never uploaded; umount hung). Numbers are never reused now.

def test_inode_numbers_are_never_reused(mounted: Mount) -> None:  # noqa: F811
    m = mounted
    seen: set[int] = set()
    for i in range(5):
        f = m.mountpoint / f"f{i}"
        f.write_bytes(b"hi\n")
        seen.add(os.stat(f).st_ino)
        os.unlink(f)
        time.sleep(0.3)
        d = m.mountpoint / f"d{i}"
        d.mkdir()
        ino = os.stat(d).st_ino
        assert ino not in seen, "an inode number came back"
        seen.add(ino)
    m.wait_idle(20)
    assert {f"d{i}/" for i in range(5)} <= set(m.objects())
    m.remount()
    (m.mountpoint / "after").write_bytes(b"x")
    assert os.stat(m.mountpoint / "after").st_ino not in seen
