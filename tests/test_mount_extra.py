"""Mount behaviours the main acceptance tests do not reach: how-stored xattrs, a read-only
mount, and a full cache disk (clean cache entries go before a write fails)."""
from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from mountfixtures import Mount, mounted, mounted_any  # noqa: F401 - fixtures used by name

MiB = 1 << 20


def test_xattrs_say_how_a_file_is_stored(mounted: Mount) -> None:
    m = mounted
    base = os.urandom(2 * MiB)
    (m.mountpoint / "v1.bin").write_bytes(base)
    (m.mountpoint / "v2.bin").write_bytes(base[:MiB] + b"changed" + base[MiB:])
    m.wait_idle(60)
    p = m.mountpoint / "v2.bin"
    names = set(os.listxattr(p))
    assert {"user.deltafs.kind", "user.deltafs.stored_size", "user.deltafs.reference",
            "user.deltafs.sha256", "user.deltafs.state"} <= names
    assert os.getxattr(p, "user.deltafs.kind") == b"delta"
    assert os.getxattr(p, "user.deltafs.state") == b"clean"
    assert os.getxattr(p, "user.deltafs.reference") == b"reference.bin"
    stored = int(os.getxattr(p, "user.deltafs.stored_size"))
    head = m.head("v2.bin.delta")
    assert head is not None and stored == head["ContentLength"] < 100_000
    with pytest.raises(OSError) as ours:
        os.setxattr(p, "user.deltafs.kind", b"direct")
    assert ours.value.errno == errno.EPERM
    with pytest.raises(OSError) as other:
        os.setxattr(p, "user.comment", b"x")
    assert other.value.errno == errno.EOPNOTSUPP
    with pytest.raises(OSError) as absent:
        os.getxattr(p, "user.comment")
    assert absent.value.errno == errno.ENODATA


def test_other_xattr_namespaces_are_unsupported_so_ls_asks_once(mounted: Mount) -> None:
    """security.* and system.* (ACLs) answer ENOTSUP, not ENODATA: `ls -l` then stops
    asking the device for them after the first file, instead of two round trips per file;
    `cp -a` out of the mount treats ENOTSUP as "no ACL" and copies fine."""
    m = mounted
    p = m.mountpoint / "f.txt"
    p.write_bytes(b"x\n")
    for target in (p, m.mountpoint):
        for name in ("security.selinux", "system.posix_acl_access", "trusted.x"):
            with pytest.raises(OSError) as exc:
                os.getxattr(target, name)
            assert exc.value.errno == errno.EOPNOTSUPP, name
    with pytest.raises(OSError) as gone:  # libacl drops default ACLs this way
        os.removexattr(m.mountpoint, "system.posix_acl_default")
    assert gone.value.errno == errno.ENODATA
    listing = subprocess.run(["ls", "-l", str(m.mountpoint)], check=True,
                             capture_output=True, text=True).stdout
    assert listing.splitlines()[1].startswith("-rw-r--r-- 1 ")  # no ACL '+' or context '.'
    out = m.mountpoint.parent / "copied-out"
    subprocess.run(["cp", "-a", str(p), str(out)], check=True, capture_output=True)
    assert out.read_bytes() == b"x\n"


def test_read_only_mount_refuses_writes(mounted_any: Mount) -> None:
    m = mounted_any
    (m.mountpoint / "kept.txt").write_bytes(b"kept\n")
    m.umount()
    m.mount(["--read-only"])
    assert (m.mountpoint / "kept.txt").read_bytes() == b"kept\n"
    for action in (lambda: (m.mountpoint / "new.txt").write_bytes(b"x"),
                   lambda: os.unlink(m.mountpoint / "kept.txt"),
                   lambda: os.mkdir(m.mountpoint / "d")):
        with pytest.raises(OSError) as exc:
            action()
        assert exc.value.errno == errno.EROFS
    # read-only from the bucket alone
    m.remount(wipe_cache=True, extra_args=["--read-only"])
    assert os.listdir(m.mountpoint) == ["kept.txt"]
    assert (m.mountpoint / "kept.txt").read_bytes() == b"kept\n"


@pytest.fixture
def small_cache(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 64 MiB tmpfs to serve as a mount's cache disk."""
    where = tmp_path / "smallcache"
    where.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_full_cache_disk_evicts_clean_data_then_enospc(moto_server: str, bucket: str,
                                                        tmp_path: Path,
                                                        small_cache: Path) -> None:
    m = Mount(bucket, moto_server, tmp_path / "m")
    m.cache = small_cache / "cache"
    try:
        m.mount(["--cache-size", "1G"])  # the disk, not the size bound, is the limit
        for i in range(2):  # 40 MB of clean, cached content
            (m.mountpoint / f"old{i}.bin").write_bytes(os.urandom(20 * MiB))
        m.wait_idle(120)
        # a new 30 MB file does not fit beside the 40 MB cache entries on 64 MB: the
        # clean entries must make room, and the write must succeed
        fresh = os.urandom(30 * MiB)
        (m.mountpoint / "fresh.bin").write_bytes(fresh)
        m.wait_idle(120)
        assert m.head("fresh.bin") is not None or m.head("fresh.bin.delta") is not None
        assert "evicted" in m.log_text()
        # more than the whole disk cannot be staged: ENOSPC, and the mount lives on
        with pytest.raises(OSError) as exc:
            with open(m.mountpoint / "huge.bin", "wb") as f:
                for _ in range(80):
                    f.write(os.urandom(MiB))
        assert exc.value.errno == errno.ENOSPC
        assert m.status()["pid"] == m.pid
        assert (m.mountpoint / "fresh.bin").stat().st_size == len(fresh)
    finally:
        m.teardown()
        m.dump_logs()


def test_fsyncdir_waits_for_every_file_of_the_directory(mounted: Mount) -> None:
    m = mounted
    d = m.mountpoint / "batch"
    d.mkdir()
    for i in range(5):
        (d / f"f{i}.txt").write_bytes(os.urandom(1000))
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    # no waiting here: fsync of the directory returned only once all five were stored
    assert {f"batch/f{i}.txt" for i in range(5)} <= set(m.objects("batch/"))


def _series_on_a_fresh_cache(m: Mount, n: int) -> tuple[list[str], list[bytes]]:
    from mountfixtures import release_versions

    datas = release_versions(n, 512 << 10, seed=17)
    names = [f"tool-1.{i:02d}.bin" for i in range(n)]
    (m.mountpoint / "rel").mkdir()
    for name, data in zip(names, datas):
        (m.mountpoint / "rel" / name).write_bytes(data)
    m.wait_idle(120)
    m.remount(wipe_cache=True)
    assert sorted(os.listdir(m.mountpoint / "rel")) == names
    return names, datas


def test_a_directory_read_in_name_order_has_its_next_file_rebuilt_ahead(
        mounted_any: Mount) -> None:
    """Read-ahead across files (readahead.py): after three files of a directory are
    opened in name order, the next one is rebuilt into the cache while the third is
    read, so its own open costs no request; every byte is still the right one. On the
    bucket's root and on a prefix, each remounted with an empty cache (a new machine)."""
    import time

    m = mounted_any
    names, datas = _series_on_a_fresh_cache(m, 6)
    for name, data in zip(names[:3], datas[:3]):
        assert (m.mountpoint / "rel" / name).read_bytes() == data
    deadline = time.monotonic() + 30
    while m.status()["read_ahead"]["started"] < 1:
        assert time.monotonic() < deadline, m.status()["read_ahead"]
        time.sleep(0.05)
    nxt = m.mountpoint / "rel" / names[3]
    deadline = time.monotonic() + 30
    while os.getxattr(nxt, "user.deltafs.cached") != b"1":  # rebuilt ahead, unopened
        assert time.monotonic() < deadline, ("the next file was never rebuilt ahead",
                                             m.status()["read_ahead"])
        time.sleep(0.05)
    assert os.getxattr(m.mountpoint / "rel" / names[5], "user.deltafs.cached") == b"0"
    assert nxt.read_bytes() == datas[3]
    assert m.status()["read_ahead"]["failed"] == 0
    for name, data in zip(names[4:], datas[4:]):
        assert (m.mountpoint / "rel" / name).read_bytes() == data
    # while the next file was rebuilt, the one after it had its objects fetched, and its
    # rebuild used them (prefetch.py)
    ra = m.status()["read_ahead"]
    assert ra["objects_fetched"] >= 1 and ra["objects_used"] >= 1, ra
    from mountfixtures import deltafs_exe

    shown = subprocess.run([*deltafs_exe(), "status", str(m.mountpoint)],
                           capture_output=True, text=True, timeout=30)
    assert "files rebuilt before they were opened, 0 failed" in shown.stdout, shown.stdout


def test_files_read_out_of_order_are_not_rebuilt_ahead(mounted: Mount) -> None:
    """A reader that does not go through the directory in name order costs nothing
    more: no file is rebuilt before it is opened."""
    m = mounted
    names, datas = _series_on_a_fresh_cache(m, 6)
    for i in (0, 2, 4, 1, 3, 5):  # every other file: a loose "in order" would read ahead
        assert (m.mountpoint / "rel" / names[i]).read_bytes() == datas[i]
    assert m.status()["read_ahead"] == {"started": 0, "failed": 0, "objects_fetched": 0,
                                        "objects_used": 0}


def test_a_file_open_for_writing_is_never_rebuilt_ahead_and_keeps_its_write_after_a_crash(
        mounted: Mount) -> None:
    """Found by review: the next file of a directory read in order was rebuilt ahead even
    while open for writing (written, not yet closed, so not yet staged), and the rebuild
    wrote the bucket's hash over the row of the working file: after a crash the mount
    took the working file for published and dropped the write. Such a file is not read
    ahead, and a rebuild never overwrites the hash of a row with local content."""
    import time

    m = mounted
    names, datas = _series_on_a_fresh_cache(m, 6)
    p3 = m.mountpoint / "rel" / names[3]
    fd = os.open(p3, os.O_WRONLY)
    try:
        os.pwrite(fd, b"new", 0)
        os.fsync(fd)  # staged and in the journal: what a crash must keep
        os.pwrite(fd, b"newer", 0)
        os.sync()  # this write reaches the daemon's working file
        for name, data in zip(names[:3], datas[:3]):
            assert (m.mountpoint / "rel" / name).read_bytes() == data
        time.sleep(1.0)  # a read-ahead, had one started, has run
        assert m.status()["read_ahead"]["started"] == 0, m.status()["read_ahead"]
        assert os.getxattr(p3, "user.deltafs.cached") == b"1"  # its own content, here
        m.kill9()
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    m.force_unmount()
    m.mount()
    # "a file that was open for writing at the crash keeps what had been written"
    # (SEMANTICS.md, Durability): the last write, not only the fsynced one
    got = p3.read_bytes()
    assert got == b"newer" + datas[3][5:], got[:8]


def _window_kb(mountpoint: Path) -> int:
    dev = os.stat(mountpoint).st_dev
    knob = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    return int(knob.read_text())


def test_kernel_read_ahead_window_is_raised_for_this_mount_only(mounted: Mount) -> None:
    """The kernel splits a read into requests no larger than the mount's read-ahead
    window (128 KiB unless raised); the mount raises its own to 1 MiB, and
    ``--kernel-read-ahead 0`` leaves the kernel's."""
    m = mounted
    assert _window_kb(m.mountpoint) == 1024
    assert m.status()["kernel_read_ahead"] == MiB
    data = os.urandom(3 * MiB + 5)
    (m.mountpoint / "f.bin").write_bytes(data)
    m.wait_idle(60)
    with open(m.mountpoint / "f.bin", "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert f.read() == data
    m.remount(wipe_cache=True, extra_args=[*m.extra_args, "--kernel-read-ahead", "0"])
    assert _window_kb(m.mountpoint) == 128
    assert m.status()["kernel_read_ahead"] == 128 << 10
    assert (m.mountpoint / "f.bin").read_bytes() == data


def test_read_ahead_window_is_raised_never_lowered_and_never_fatal(tmp_path: Path) -> None:
    """kernelra.apply against a stand-in sysfs: raises a smaller window, keeps a larger
    one (a udev rule's), reports an unwritable or missing knob without raising."""
    from deltafs.kernelra import apply

    dev = os.stat(tmp_path).st_dev
    knob = tmp_path / "bdi" / f"{os.major(dev)}:{os.minor(dev)}" / "read_ahead_kb"
    knob.parent.mkdir(parents=True)
    knob.write_text("128\n")
    assert apply(tmp_path, MiB, tmp_path / "bdi") == MiB
    assert knob.read_text().strip() == "1024"
    knob.write_text("4096\n")
    assert apply(tmp_path, MiB, tmp_path / "bdi") == 4 * MiB  # kept, not lowered
    assert apply(tmp_path, 0, tmp_path / "bdi") == 4 * MiB
    knob.unlink()
    knob.parent.rmdir()
    assert apply(tmp_path, MiB, tmp_path / "bdi") is None  # no such device: said, not raised
    assert apply(tmp_path / "gone", MiB, tmp_path / "bdi") is None


def test_a_cache_from_before_the_xxh3_sums_is_still_used_and_checked(mounted: Mount) -> None:
    """An upgrade keeps its cache: entries whose block sums are CRC-32s (what versions
    before 2026-12-02 wrote) are read without a GET, and a damaged block in one is still
    caught and fetched again, never served."""
    import sqlite3
    import zlib

    from deltafs.cache import BLOCK

    m = mounted
    datas = {f"f{i}.bin": os.urandom(3 * BLOCK + 100 * i) for i in range(3)}
    for name, data in datas.items():
        (m.mountpoint / name).write_bytes(data)
    m.wait_idle(60)
    for name, data in datas.items():
        assert (m.mountpoint / name).read_bytes() == data  # in the cache now
    m.umount()
    db = sqlite3.connect(m.cache / "content" / "cache.db")
    rows = db.execute("SELECT key, filename FROM Cache").fetchall()
    files = {}
    for key, filename in rows:
        path = m.cache / "content" / filename
        body = path.read_bytes()
        old = b"".join(zlib.crc32(body[i:i + BLOCK]).to_bytes(4, "little")
                       for i in range(0, len(body), BLOCK))
        db.execute("UPDATE Cache SET tag = ? WHERE key = ?", (old, key))
        files[hashlib.sha256(body).hexdigest()] = path
    db.commit()
    db.close()
    assert len(files) >= 3
    m.mount()
    before = m.requests()
    for name, data in datas.items():
        with open(m.mountpoint / name, "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            assert f.read() == data
    assert m.requests().get("GET", 0) == before.get("GET", 0)  # served from the old cache
    victim = files[hashlib.sha256(datas["f1.bin"]).hexdigest()]
    with open(victim, "r+b") as f:  # one bit in block 2 of an old-sums entry
        f.seek(2 * BLOCK + 3)
        b = f.read(1)
        f.seek(2 * BLOCK + 3)
        f.write(bytes([b[0] ^ 1]))
    with open(m.mountpoint / "f1.bin", "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert f.read() == datas["f1.bin"]
    assert "is damaged (block 2" in m.log_text()
