"""Crash points: the daemon dies at every named step (``DELTAFS_CRASH_AT``), then the same
cache dir is mounted again, and then the bucket alone (a fresh cache): every operation
that was acknowledged is there, nothing deleted comes back, nothing is wrong.

One scenario walks every step: create + write + close of a new file, an overwrite that
becomes a delta, the rename of a published file (a server-side move), the unlink of a
published file (a tombstone), while uploads run in the background.
"""
from __future__ import annotations

import errno
import os
import re
import time
from pathlib import Path

import pytest

from deltafs.crashpoints import STEPS
from mountfixtures import Mount, pid_alive, release_versions

ROOT = Path(__file__).resolve().parents[1]
KiB = 1024


def test_every_crash_point_in_the_code_is_tested() -> None:
    """The list the tests walk is the list in the code, both ways."""
    named: set[str] = set()
    for path in (ROOT / "deltafs").rglob("*.py"):
        named |= set(re.findall(r'crash_point\("([^"]+)"\)', path.read_text()))
    assert named == set(STEPS)


def _attempt(fn) -> bool:  # type: ignore[no-untyped-def]
    """Run one user operation; True if it was acknowledged (returned without error)."""
    try:
        fn()
        return True
    except OSError as exc:
        assert exc.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO,
                             errno.ENOENT), exc
        return False


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.write(data[len(data) // 2:])


@pytest.mark.parametrize("step", STEPS)
def test_crash_at(step: str, moto_server: str, bucket: str, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> None:
    m = Mount(bucket, moto_server, tmp_path / "deltafs")
    old_b, new_b = release_versions(2, 200 * KiB, seed=len(step))
    c_data = os.urandom(100 * KiB)
    e_data = os.urandom(70 * KiB)
    keep = os.urandom(90 * KiB)
    new_a = release_versions(3, 200 * KiB, seed=len(step))[2]
    try:
        m.mount()
        d = m.mountpoint / "d"
        d.mkdir()
        (d / "b.bin").write_bytes(old_b)
        (d / "c.bin").write_bytes(c_data)
        (d / "e.bin").write_bytes(e_data)
        (d / "keep.bin").write_bytes(keep)
        m.wait_idle(60)
        m.umount()

        monkeypatch.setenv("DELTAFS_CRASH_AT", step)
        m.mount()
        monkeypatch.delenv("DELTAFS_CRASH_AT")
        pid = m.pid
        assert pid is not None
        acked = {
            "a": _attempt(lambda: _write(d / "a.bin", new_a)),
            "b": _attempt(lambda: _write(d / "b.bin", new_b)),
            "c": _attempt(lambda: os.rename(d / "c.bin", d / "c2.bin")),
            "e": _attempt(lambda: os.unlink(d / "e.bin")),
        }
        deadline = time.monotonic() + 30
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(pid), f"crash point {step} was never reached\n{m.log_tail(30)}"
        assert f"crash point {step} reached" in m.log_text()
        m.pid = None
        m.force_unmount()

        def check(where: str) -> None:
            names = set(os.listdir(d))
            assert (d / "keep.bin").read_bytes() == keep, where
            if acked["a"]:
                assert (d / "a.bin").read_bytes() == new_a, where
            elif "a.bin" in names:
                got = (d / "a.bin").read_bytes()
                assert new_a.startswith(got), f"{where}: a.bin holds bytes never written"
            b = (d / "b.bin").read_bytes()
            if acked["b"]:
                assert b == new_b, where
            else:
                assert b == old_b or new_b.startswith(b), f"{where}: b.bin is neither version"
            if acked["c"]:
                assert "c.bin" not in names and (d / "c2.bin").read_bytes() == c_data, where
            else:
                assert ("c.bin" in names) != ("c2.bin" in names), (where, names)
                only = d / ("c.bin" if "c.bin" in names else "c2.bin")
                assert only.read_bytes() == c_data, where
            if acked["e"]:
                assert "e.bin" not in names, f"{where}: an unlinked file came back"
            elif "e.bin" in names:  # not acknowledged: it may or may not have happened
                assert (d / "e.bin").read_bytes() == e_data, where

        # the same cache dir: the journal replays what was pending
        m.mount()
        check(f"after the crash at {step}, same cache")
        seen = set(os.listdir(d))
        m.wait_idle(60)
        m.umount()
        # the bucket alone
        m.wipe_cache()
        m.mount()
        check(f"after the crash at {step}, fresh cache")
        assert set(os.listdir(d)) == seen, "the bucket disagrees with the replayed journal"
        keys = m.objects("d/")
        assert not any(k.startswith("d/e.bin") for k in keys) or not acked["e"], keys
    finally:
        try:
            m.teardown()
        finally:
            m.dump_logs()


def test_a_renamed_and_rewritten_file_does_not_come_back_after_a_crash(
        moto_server: str, bucket: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the model test: the tombstone of a file's old object (renamed, then
    rewritten, so uploaded anew) was queued in a transaction after the publish. A crash
    between the two commits (or a listing merged between them) found the old object
    unclaimed and brought the old name back. Both now go in one transaction."""
    m = Mount(bucket, moto_server, tmp_path / "deltafs")
    old, new = os.urandom(90 * KiB), os.urandom(90 * KiB)
    try:
        m.mount()
        d = m.mountpoint / "d"
        d.mkdir()
        (d / "f.bin").write_bytes(old)
        m.wait_idle(60)
        m.umount()
        monkeypatch.setenv("DELTAFS_CRASH_AT", "publish-after-commit")
        m.mount()
        monkeypatch.delenv("DELTAFS_CRASH_AT")
        pid = m.pid
        assert pid is not None
        with open(d / "f.bin", "r+b") as fh:  # renamed while open: one upload, new key
            fh.truncate(0)
            fh.write(new)
            os.rename(d / "f.bin", d / "f2.bin")
        deadline = time.monotonic() + 30
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(pid), m.log_tail(30)
        m.pid = None
        m.force_unmount()
        m.mount()
        assert sorted(os.listdir(d)) == ["f2.bin"]
        assert (d / "f2.bin").read_bytes() == new
        m.wait_idle(60)
        assert not any(k.startswith("d/f.bin") for k in m.objects("d/")), m.objects("d/")
    finally:
        try:
            m.teardown()
        finally:
            m.dump_logs()
