"""Races found by an adversarial review of the content state machine
(docs/architecture.md, "Invariants"), each a test on a real mount that failed before
its fix. Each test states the interleaving it provokes."""
# ruff: noqa: F811
from __future__ import annotations

import mmap
import os
import threading
import time
from pathlib import Path

import boto3
import pytest
from faultproxy import FaultProxy, fault_proxy  # noqa: F401
from mountfixtures import Mount, _live, mounted  # noqa: F401
from test_mount_faults import pm  # noqa: F401  (the proxied mount fixture)

MiB = 1 << 20




def _drop_pages(path: Path) -> None:
    """Drop the kernel's clean pages of ``path`` so the next read goes to the daemon."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _direct_read(fd: int, size: int, off: int = 0) -> bytes:
    """A read that bypasses the page cache (FUSE sends it to the daemon with this fd's
    handle)."""
    buf = mmap.mmap(-1, size)
    n = os.preadv(fd, [buf], off)
    return bytes(buf[:n])


def test_read_through_rdwr_handle(mounted: Mount) -> None:
    """A read through a handle opened O_RDWR: fs.read asserts ``h.src`` (only read
    handles have one), so the daemon answers EIO."""
    p = mounted.mountpoint / "f"
    p.write_bytes(b"A" * 100_000)
    mounted.wait_idle()
    fd = os.open(p, os.O_RDWR | os.O_DIRECT)
    try:
        got = _direct_read(fd, 1 << 17)
    finally:
        os.close(fd)
    assert got == b"A" * 100_000


def test_rdwr_buffered_read(mounted: Mount) -> None:
    """Same without O_DIRECT: ``open(path, "r+b").read()``, what every editor, sqlite
    and ``rsync --inplace`` do."""
    p = mounted.mountpoint / "f"
    p.write_bytes(b"A" * 100_000)
    mounted.remount()  # no page of it in the kernel's cache, as after any remount
    with open(p, "r+b") as f:
        assert f.read() == b"A" * 100_000


def test_append_after_remount(mounted: Mount) -> None:
    """``echo >> file`` after a remount: the last page is partial, the kernel reads it
    through the writing handle first."""
    p = mounted.mountpoint / "log"
    p.write_bytes(b"line\n" * 1001)
    mounted.remount()
    with open(p, "ab") as f:
        f.write(b"more\n")
    assert p.read_bytes() == b"line\n" * 1001 + b"more\n"


def test_partial_page_overwrite(mounted: Mount) -> None:
    """A write of a few bytes into the middle of an existing page: with the writeback
    cache on, the kernel reads the page first (through the writing handle)."""
    p = mounted.mountpoint / "f"
    p.write_bytes(b"A" * 100_000)
    mounted.wait_idle()
    _drop_pages(p)
    with open(p, "r+b") as f:
        f.seek(50_000)
        f.write(b"xyz")
    want = bytearray(b"A" * 100_000)
    want[50_000:50_003] = b"xyz"
    _drop_pages(p)
    assert p.read_bytes() == bytes(want)


def test_reader_open_across_rewrite_clean(mounted: Mount) -> None:
    """A reader opened on a clean (cached) file keeps a CachedFile; another process
    rewrites the file and closes it. The reader's later reads that reach the daemon
    (pages not in the kernel's cache) still serve the old content: the open's Source
    never looks at the new state. Local filesystems (and SEMANTICS: "Within one mount,
    everything is immediate") serve the new bytes."""
    p = mounted.mountpoint / "f"
    p.write_bytes(b"A" * 256 * 1024)
    mounted.wait_idle()
    r = os.open(p, os.O_RDONLY | os.O_DIRECT)
    try:
        assert _direct_read(r, 4096) == b"A" * 4096
        with open(p, "r+b") as f:  # an in-place rewrite, same size
            f.write(b"B" * 256 * 1024)
        assert p.read_bytes() == b"B" * 256 * 1024  # a fresh open sees it
        assert _direct_read(r, 4096) == b"B" * 4096, "reader still served the old content"
    finally:
        os.close(r)


def test_reader_open_across_rewrite_staged(mounted: Mount) -> None:
    """A reader opened on a staged (not yet uploaded) file reads the writer's working
    file while a writer is open, and its own old fd again once the writer is gone:
    it sees new bytes, then old bytes again."""
    p = mounted.mountpoint / "f"
    # a long settle is not available from the mount command line: keep the file
    # pending by holding a reader while writing (no upload needed to show it)
    p.write_bytes(b"A" * 8192)
    r = os.open(p, os.O_RDONLY | os.O_DIRECT)
    try:
        w = os.open(p, os.O_RDWR | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 8192)
            buf[:] = b"B" * 8192
            os.pwritev(w, [buf], 0)
            seen_while_open = _direct_read(r, 8192)
        finally:
            os.close(w)
        seen_after_close = _direct_read(r, 8192)
    finally:
        os.close(r)
    assert seen_while_open == b"B" * 8192
    assert seen_after_close == b"B" * 8192, "new bytes, then the old ones again"


def test_fsync_while_another_writer_writes(mounted: Mount) -> None:
    """fsync stages seq N and waits for ``published_seq >= N``. A write by another
    handle after the stage makes the row point to a new unhashed working file: the
    upload of N is then not "recorded" (the row changed) and no further upload can
    start (sha256 NULL) until that other writer closes or fsyncs. SEMANTICS: "writes to
    the same file go on meanwhile". Here fsync returns only when the other writer
    stops (after 15 s)."""
    p = mounted.mountpoint / "f"
    data = os.urandom(16 * MiB)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, data)
    stop = threading.Event()

    def other_writer() -> None:
        w = os.open(p, os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)
        buf[:] = b"z" * 4096
        deadline = time.monotonic() + 15
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                os.pwritev(w, [buf], 20 * MiB)  # past the fsynced part
                time.sleep(0.005)
        finally:
            os.close(w)

    t = threading.Thread(target=other_writer)
    t.start()
    time.sleep(0.2)
    started = time.monotonic()
    try:
        os.fsync(fd)
        took = time.monotonic() - started
    finally:
        stop.set()
        t.join()
        os.close(fd)
    print("TOOK", took)
    assert took < 10, f"fsync took {took:.1f} s: it waited for the other writer to stop"


def test_parent_dir_renamed_during_upload(pm: Mount, fault_proxy: FaultProxy) -> None:
    """An upload of d/f is in flight (PUT held 3 s by the proxy); ``mv d e``. The
    upload's ``_published`` compares only the row's own parent and name, which did not
    change, so it records ``remote_key = d/f``, clears dirty, and nothing ever moves the
    object: the bucket keeps d/f, e/f is never written, and a remount with an empty
    cache shows d/f (its marker gone) instead of e/f."""
    m = pm
    d = m.mountpoint / "d"
    d.mkdir()
    m.wait_idle()
    rule = fault_proxy.set("hang", kind="PutObject", key="d/f", seconds=3, count=1)
    (d / "f").write_bytes(b"payload\n" * 100)
    assert fault_proxy.wait_for(lambda _p: rule.hits >= 1, timeout=10)
    os.rename(d, m.mountpoint / "e")
    m.wait_idle()
    objs = m.objects()
    m.remount()  # same cache dir
    gone = not (m.mountpoint / "e" / "f").exists()
    assert "e/f" in objs and "d/f" not in objs and not gone, (
        f"bucket {sorted(objs)}; e/f gone after a remount with the same cache: {gone}")


@pytest.fixture
def pm_ttl(fault_proxy: FaultProxy, moto_server: str, bucket: str, tmp_path: Path,
           fuse_tools: None):  # type: ignore[no-untyped-def]
    m = Mount(bucket, fault_proxy.url, tmp_path / "deltafs", extra_args=["--listing-ttl", "2"])
    m.client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    yield from _live(m, before_teardown=fault_proxy.clear)


def test_listing_brings_back_deleted_file(pm_ttl: Mount, fault_proxy: FaultProxy) -> None:
    """unlink d/a queues a tombstone. A LIST of d goes out while the DELETE is still on
    its way (the LIST sees d/a); the DELETE completes and drops the tombstone; the
    listing (slowed by a HEAD of an object another writer added) is merged afterwards:
    d/a is not in ``doomed`` any more, no live row claims it, so merge_listing inserts
    it again. Invariant 7 ("objects with a pending delete ... do not come back").
    The ghost then reads EIO and makes ``rmdir`` fail with ENOTEMPTY."""
    m = pm_ttl
    d = m.mountpoint / "d"
    d.mkdir()
    (d / "a").write_bytes(b"a" * 1000)
    m.wait_idle()
    m.put_object("d/new", b"another writer")
    os.listdir(d)  # fresh listing now
    fault_proxy.set("hang", kind="DeleteObject", seconds=4, count=1)
    fault_proxy.add("hang", kind="HeadObject", key="d/new", seconds=5, count=1)
    os.unlink(d / "a")
    time.sleep(2.2)  # the listing of d is stale now; the DELETE is still held
    names = os.listdir(d)  # LIST now (sees d/a), HEAD of d/new held until after the DELETE
    assert "a" not in names, f"the unlinked file is back: {names}"


def test_fsync_by_reader_while_writer_open_deadlocks(mounted: Mount) -> None:
    """v1 of f is staged (pending). Process A opens f for writing and writes (the data
    stays in the page cache). Process B opens f read-only and fsyncs: the kernel flushes
    A's pages first (the row now points to A's unhashed working file), then FUSE_FSYNC
    waits for a published version. The uploader never takes the row (sha256 NULL) until
    A stages; but fuse_fsync holds the inode lock for the whole wait, and A's next
    write(2) needs that lock: A never gets to close, B never returns. Both sit in D
    state; SIGKILL frees neither (the FUSE request was sent), only killing the daemon
    does. (Without A's second write, B merely waits until A closes.)"""
    import subprocess
    import sys

    p = mounted.mountpoint / "f"
    p.write_bytes(b"1" * 8192)
    a = subprocess.Popen([sys.executable, "-c", (
        "import os,sys,time\n"
        f"fd=os.open({str(p)!r}, os.O_WRONLY)\n"
        "os.write(fd, b'2'*4096)\n"
        "print('wrote', flush=True)\n"
        "time.sleep(2)\n"
        "os.write(fd, b'3'*4096)\n"  # a logger's next line
        "os.close(fd)\n"
        "print('closed', flush=True)\n")], stdout=subprocess.PIPE, text=True)
    assert a.stdout is not None
    assert a.stdout.readline().strip() == "wrote"
    b = subprocess.Popen([sys.executable, "-c", (
        "import os\n"
        f"fd=os.open({str(p)!r}, os.O_RDONLY)\n"
        "os.fsync(fd)\n"
        "print('synced', flush=True)\n")], stdout=subprocess.PIPE, text=True)
    try:
        b.wait(timeout=15)
        b_done = True
    except subprocess.TimeoutExpired:
        b_done = False
    try:
        a.wait(timeout=10)  # its second write, 2 s after the first, then close
        a_done = True
    except subprocess.TimeoutExpired:
        a_done = False
    if not (a_done and b_done):
        # SIGKILL does not free a process whose FUSE request was sent; only the
        # daemon's death does (the requests then fail with ENOTCONN)
        mounted.kill9()
        b.wait(timeout=30)
        a.wait(timeout=30)
        mounted.force_unmount()
    assert b_done and a_done, f"fsync returned: {b_done}; writer finished: {a_done}"


def test_failed_put_after_object_written_leaks_and_resurrects(
        pm: Mount, fault_proxy: FaultProxy) -> None:
    """engine.put writes d/f.delta and only then HEADs the reference again; that HEAD
    fails (500 past botocore's retries), so the put raises and the row never records
    the object (remote_key stays NULL). The user deletes d/f: ``_remove`` only
    tombstones ``remote_key``, so d/f.delta stays in the bucket for good and the file
    comes back at the next listing. Invariant 6 ("every object this mount writes is
    either some live row's remote_key or a tombstone")."""
    m = pm
    d = m.mountpoint / "d"
    d.mkdir()
    m.wait_idle()
    hold = fault_proxy.set("hang", kind="PutObject", key="d/f.delta", seconds=2, count=1)
    (d / "f").write_bytes(os.urandom(200_000))
    assert fault_proxy.wait_for(lambda _p: hold.hits >= 1, timeout=15)
    fail = fault_proxy.add("status", kind="HeadObject", key="d/reference.bin", status=500,
                           code="InternalError", message="injected", count=1000)
    deadline = time.monotonic() + 60
    while "upload of d/f failed" not in m.log_text():
        assert time.monotonic() < deadline, m.log_tail()
        time.sleep(0.2)
    assert fail.hits >= 1
    os.unlink(d / "f")
    fault_proxy.clear()
    m.wait_idle()
    left = sorted(m.objects("d/"))
    m.remount(wipe_cache=True)
    back = os.listdir(m.mountpoint / "d")
    assert "d/f.delta" not in left and "f" not in back, (
        f"bucket after the delete: {left}; d after a remount: {back}")


def test_truncate_racing_open_for_write(mounted: Mount) -> None:
    """truncate(2) of a file nobody has open goes through ``_truncate``: open_write,
    truncate, close_writer. close_writer sees writers == 0 and awaits ``stage`` (its
    work is dirty), then closes ``s.work``'s fd and drops it without looking at
    ``writers`` again. An open for writing that got the shared Working meanwhile (it
    waited on the inode lock that trio handed to it first) is left with a Working whose
    fd is closed (EBADF on its next write) or, once the number is reused, another file's
    descriptor: its copy on write then copies an unrelated file."""
    p = mounted.mountpoint / "f"
    p.write_bytes(b"x" * 65536)
    stop = time.monotonic() + 10
    errors: list[str] = []

    def truncater() -> None:
        k = 0
        while time.monotonic() < stop:
            k += 1
            try:
                os.truncate(p, 4096 * (1 + k % 8))
            except OSError as exc:
                errors.append(f"truncate: {exc}")

    def writer() -> None:
        buf = mmap.mmap(-1, 4096)
        buf[:] = b"w" * 4096
        while time.monotonic() < stop:
            try:
                fd = os.open(p, os.O_WRONLY | os.O_DIRECT)
            except OSError as exc:
                errors.append(f"open: {exc}")
                continue
            try:
                os.pwritev(fd, [buf], 0)
                os.pwritev(fd, [buf], 4096)
            except OSError as exc:
                errors.append(f"write: {exc}")
            finally:
                try:
                    os.close(fd)
                except OSError as exc:
                    errors.append(f"close: {exc}")

    ts = [threading.Thread(target=truncater), threading.Thread(target=writer),
          threading.Thread(target=writer)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    log = mounted.log_text()
    bad = [line for line in log.splitlines() if "Bad file descriptor" in line
           or "failed unexpectedly" in line]
    assert not errors and not bad, (errors[:5], bad[:5])




def test_rename_chain_b_to_c_then_a_to_b(pm: Mount, fault_proxy: FaultProxy) -> None:
    """a and b published. ``mv b c``; its copy fails once (503 past botocore's retries,
    so the row waits in backoff); ``mv a b``. a's move (copy a -> b) runs while b's move
    to c is still pending and overwrites b's object; b's move then finds b changed (its
    copy is conditional on the ETag) and fails for good. b's content is in no object
    any more; the replay from the cache only saves it while the content is cached (here
    the cache was wiped after b was published). ``_blocked`` only holds back new CONTENT,
    not a MOVE onto a key another row still has to move away (invariant 8)."""
    m = pm
    a, b, c = (m.mountpoint / n for n in "abc")
    b.write_bytes(b"content of b\n" * 10)
    m.wait_idle()
    m.umount()
    m.wipe_cache()
    m.mount()
    a.write_bytes(b"content of a\n" * 10)
    assert b.exists()
    m.wait_idle()
    fail = fault_proxy.set("slowdown", kind="CopyObject", key="c", count=6)
    os.rename(b, c)
    assert fault_proxy.wait_for(lambda _p: fail.hits >= 6, timeout=30)
    os.rename(a, b)
    fault_proxy.clear()
    try:
        m.wait_idle(timeout=30)
    except AssertionError:
        pass
    st = m.status()
    m.umount()
    m.wipe_cache()
    m.mount()  # what the bucket holds
    got_b = b.read_bytes() if b.exists() else None
    got_c = c.read_bytes() if c.exists() else None
    assert (got_b, got_c) == (b"content of a\n" * 10, b"content of b\n" * 10), (
        f"b={got_b!r:.30} c={got_c!r:.30}; status: failed={st.get('failed')} "
        f"last_error={st.get('last_error')}")


def test_failed_entry_outlives_unlink_and_umount_skips_pending(
        pm: Mount, fault_proxy: FaultProxy) -> None:
    """A file whose upload failed for good is unlinked: its entry stays in
    ``SyncState.failed`` (nothing drops it for an orphan or a reaped row), so status
    keeps listing it and ``failed_files`` counts it. ``deltafs umount`` (and drain)
    stop waiting when ``pending_files <= failed_files``: another file whose upload is
    merely being retried is then left behind, the umount saying only that changes
    failed for good."""
    import subprocess

    from mountfixtures import deltafs_exe

    m = pm
    fault_proxy.set("status", kind="PutObject", key="bad", status=400,
                    code="InvalidArgument", message="refused", count=10_000)
    (m.mountpoint / "bad").write_bytes(b"refused\n")
    deadline = time.monotonic() + 30
    while m.status()["failed_files"] < 1:
        assert time.monotonic() < deadline, m.log_tail()
        time.sleep(0.2)
    os.unlink(m.mountpoint / "bad")
    fault_proxy.add("slowdown", kind="PutObject", key="good", count=10_000)
    (m.mountpoint / "good").write_bytes(b"retried\n")
    time.sleep(1.5)
    st = m.status()
    assert st["failed_files"] == 0, f"failed after the unlink: {st['failed']}"
    # umount waits for the retried upload (it is not a permanent failure)
    proc = subprocess.Popen([*deltafs_exe(), "umount", str(m.mountpoint)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    assert proc.poll() is None, "umount gave up on an upload that is only retried"
    fault_proxy.clear()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "good" in m.objects(), "umount left 'good' behind"
    m.pid = None


# ---------------------------------------------------------------------------------------
# found by the Hypothesis soak (tests/test_model.py), made deterministic with latency


def test_unlink_during_the_upload_of_a_new_version(pm: Mount, fault_proxy: FaultProxy) -> None:
    """v1 published, v2's PUT in flight, unlink: the tombstone queued for v1 waits for the
    key, the upload then queues one for v2; the first must not drop the second."""
    m = pm
    f = m.mountpoint / "f"
    f.write_bytes(os.urandom(30 * 1024))
    m.wait_idle(30)
    fault_proxy.set("hang", method="PUT", seconds=1.5)
    f.write_bytes(os.urandom(30 * 1024))
    time.sleep(0.8)  # past the settle delay: v2's PUT is held by the proxy
    os.unlink(f)
    time.sleep(1.5)
    fault_proxy.clear()
    m.wait_idle(30)
    assert not [k for k in m.objects() if k.startswith("f")], m.objects()
    m.remount(wipe_cache=True)
    assert not (m.mountpoint / "f").exists()


def test_rmdir_mkdir_while_the_old_marker_is_deleted(pm: Mount, fault_proxy: FaultProxy) -> None:
    m = pm
    fault_proxy.set("hang", method="PUT", seconds=0.5)
    fault_proxy.add("hang", method="DELETE", seconds=1.5)
    (m.mountpoint / "a").mkdir()
    time.sleep(0.2)
    (m.mountpoint / "a").rmdir()
    (m.mountpoint / "a").mkdir()
    m.wait_idle(30)
    fault_proxy.clear()
    assert "a/" in m.objects(), m.objects()
    m.remount(wipe_cache=True)
    assert (m.mountpoint / "a").is_dir()


def test_rmdir_then_crash_while_the_marker_uploads(pm: Mount, fault_proxy: FaultProxy) -> None:
    m = pm
    fault_proxy.set("hang", method="PUT", seconds=1.0)
    (m.mountpoint / "b").mkdir()
    time.sleep(0.2)
    (m.mountpoint / "b").rmdir()
    time.sleep(0.5)  # the marker PUT is in flight
    m.kill9()
    m.force_unmount()
    time.sleep(1.0)
    fault_proxy.clear()
    m.mount()
    m.wait_idle(30)
    assert "b" not in os.listdir(m.mountpoint)
    assert "b/" not in m.objects(), m.objects()
