"""Fixtures and helpers for the real-mount tests (``tests/test_mount*.py``).

A :class:`Mount` runs ``deltafs mount s3://BUCKET[/PREFIX] MNT --cache-dir CACHE
--endpoint-url URL`` as a subprocess (it returns once the mount is live) and knows how to
unmount, remount (optionally with a wiped or a new cache), read the daemon's status and
kill it. Its bucket helpers take paths relative to the mount's root (``m.key("a/b")`` is
the object key, ``m.objects()`` lists the keys under the prefix without it), so a test
reads the same on a bucket-root mount and on a prefix mount.

The ``mounted`` fixture yields a bucket-root mount of a fresh moto bucket; ``mounted_any``
runs the test twice, on a bucket-root mount and on a mount of ``s3://BUCKET/some/prefix``
(whose bucket also holds objects outside the prefix, which must stay out of sight and
untouched). Tests that remount use ``mounted_any``: a prefix mount remounted with a fresh
cache once showed an empty root. On teardown both unmount (``deltafs umount`` with a
timeout, then ``fusermount3 -u -z``), kill any daemon still alive and print the tail of
every daemon log they saw, which pytest shows when the test failed.

Import the fixtures explicitly in a test module::

    from mountfixtures import mounted, mounted_any  # noqa: F401
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import boto3
import pytest

from helpers import bucket_objects, next_version

ROOT = Path(__file__).resolve().parents[1]
STATUS_XATTR = "user.deltafs.status"


def deltafs_exe() -> list[str]:
    """The ``deltafs`` console script of the venv (or ``python -m deltafs.cli``)."""
    for cand in (Path(sys.executable).parent / "deltafs", ROOT / ".venv" / "bin" / "deltafs"):
        if cand.exists():
            return [str(cand)]
    return [sys.executable, "-m", "deltafs.cli"]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as dead: nobody may reap it here)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def in_mount_table(path: Path) -> bool:
    """Whether ``path`` is in /proc/mounts (works for a dead FUSE mount too, where
    ``os.path.ismount`` says False because stat fails with ENOTCONN)."""
    target = str(path)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 1 and parts[1].replace("\\040", " ") == target:
                    return True
    except OSError:
        pass
    return False


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log at {path}: {exc.strerror}>"
    return "\n".join(text.splitlines()[-lines:])


#: the prefix of ``mounted_any``'s prefix variant
PREFIX = "some/prefix"
#: objects outside ``PREFIX`` in the prefix variant's bucket (next to it, and names that
#: start like it): a prefix mount must neither show nor touch them
DECOYS = {"outside.txt": b"outside the prefix\n",
          "some/prefixed.txt": b"a sibling whose name starts like the prefix\n",
          "some/prefix-other/x.txt": b"a sibling directory\n"}


class Mount:
    """One deltafs mount of ``s3://bucket`` (or ``s3://bucket/prefix``) at ``mountpoint``
    with ``cache`` as cache dir."""

    def __init__(self, bucket: str, endpoint: str, base: Path,
                 extra_args: Sequence[str] = (), prefix: str = "") -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint = endpoint
        self.base = base
        self.mountpoint = base / "mnt"
        self.cache = base / "cache"
        self.logs_dir = base / "old-logs"
        self.extra_args = list(extra_args)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        self.pid: int | None = None
        self.pids: set[int] = set()
        self.generation = 0

    @property
    def source(self) -> str:
        """What is mounted: ``s3://bucket`` or ``s3://bucket/prefix``."""
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, rel: str = "") -> str:
        """The object key of ``rel``, a path relative to the mount's root ("a/b.txt", a
        directory prefix "a/", or "" for the root's own prefix)."""
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def url(self, rel: str) -> str:
        """``s3://bucket/KEY`` of ``rel`` (for deltafs get, deltaglider cp)."""
        return f"s3://{self.bucket}/{self.key(rel)}"

    # ------------------------------------------------------------------ life

    @property
    def log(self) -> Path:
        return self.cache / "deltafs.log"

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log, lines)

    def mount(self, extra_args: Sequence[str] | None = None, timeout: float = 60) -> None:
        args = self.extra_args if extra_args is None else list(extra_args)
        argv = [*deltafs_exe(), "mount", self.source, str(self.mountpoint),
                "--cache-dir", str(self.cache), "--endpoint-url", self.endpoint, *args]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, (
            f"deltafs mount failed ({res.returncode}): {res.stderr.strip()}\n"
            f"--- log tail ---\n{self.log_tail()}")
        assert os.path.ismount(self.mountpoint), "deltafs mount returned 0 but no mount"
        self.generation += 1
        self.pid = int(self.status()["pid"])
        self.pids.add(self.pid)

    def status(self) -> dict[str, Any]:
        """The daemon's status JSON (the root's ``user.deltafs.status`` xattr)."""
        data: dict[str, Any] = json.loads(os.getxattr(self.mountpoint, STATUS_XATTR))
        return data

    def status_cli(self) -> dict[str, Any]:
        """``deltafs status --json MNT``."""
        res = subprocess.run([*deltafs_exe(), "status", "--json", str(self.mountpoint)],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        data: dict[str, Any] = json.loads(res.stdout)
        return data

    def requests(self) -> dict[str, int]:
        return dict(self.status()["requests"])

    def wait_idle(self, timeout: float = 60) -> dict[str, Any]:
        """Poll the status until nothing is pending or uploading; return it."""
        # the kernel sends FUSE RELEASE after close() returned: give a file just closed
        # a moment to show up as pending
        time.sleep(0.2)
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if st["pending_files"] == 0 and st.get("uploading", 0) == 0:
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"uploads still pending after {timeout:.0f} s: {st}\n"
                                     f"--- log tail ---\n{self.log_tail()}")
            time.sleep(0.2)

    def umount(self, timeout: float = 90) -> None:
        """``deltafs umount`` (waits for uploads, unmounts, waits for the daemon); asserts
        it worked."""
        assert in_mount_table(self.mountpoint), f"{self.mountpoint} is not mounted"
        try:
            res = subprocess.run([*deltafs_exe(), "umount", str(self.mountpoint)],
                                 capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"deltafs umount did not finish in {timeout:.0f} s\n"
                                 f"--- log tail ---\n{self.log_tail()}") from None
        assert res.returncode == 0, (f"deltafs umount failed ({res.returncode}): "
                                     f"{res.stderr.strip()}\n--- log tail ---\n"
                                     f"{self.log_tail()}")
        assert not in_mount_table(self.mountpoint), "still mounted after deltafs umount"
        if self.pid is not None:
            assert not pid_alive(self.pid), "deltafs umount returned but the daemon lives"
        self.pid = None

    def save_log(self) -> None:
        """Keep the current daemon log (before the cache directory is wiped)."""
        if self.log.exists():
            self.logs_dir.mkdir(exist_ok=True)
            shutil.copy2(self.log, self.logs_dir / f"deltafs.{self.generation}.log")

    def wipe_cache(self) -> None:
        assert not in_mount_table(self.mountpoint), "wipe the cache of a mounted fs?"
        self.save_log()
        shutil.rmtree(self.cache, ignore_errors=True)

    def use_cache(self, cache: Path) -> None:
        """Mount with another cache directory from now on (the log of the current one is
        kept for ``dump_logs``)."""
        assert not in_mount_table(self.mountpoint), "switch the cache of a mounted fs?"
        self.save_log()
        self.cache = cache

    def remount(self, wipe_cache: bool = False, extra_args: Sequence[str] | None = None,
                new_cache: Path | None = None) -> None:
        """``deltafs umount``, optionally wipe the cache directory or switch to the new,
        empty directory ``new_cache``, mount again."""
        self.umount()
        if wipe_cache:
            self.wipe_cache()
        if new_cache is not None:
            assert not new_cache.exists() or not any(new_cache.iterdir()), new_cache
            self.use_cache(new_cache)
        self.mount(extra_args)

    def kill9(self) -> int:
        """SIGKILL the daemon (no drain, no unmount); returns its pid."""
        assert self.pid is not None
        pid = self.pid
        os.kill(pid, signal.SIGKILL)
        assert wait_dead(pid, 10), f"daemon {pid} survived SIGKILL"
        self.pid = None
        return pid

    def force_unmount(self) -> None:
        """Unmount a (possibly dead) mount: ``fusermount3 -u``, else ``-u -z``."""
        for argv in (["fusermount3", "-u"], ["fusermount3", "-u", "-z"]):
            if not in_mount_table(self.mountpoint):
                return
            subprocess.run([*argv, str(self.mountpoint)], capture_output=True, timeout=30)
        assert not in_mount_table(self.mountpoint), "fusermount3 -u -z left the mount"

    def teardown(self) -> None:
        """Best effort, bounded: ``deltafs umount --timeout`` (a daemon that cannot drain
        would hold it for its whole drain timeout), then ``fusermount3 -u -z``, then
        SIGKILL whatever daemon is left (the journal keeps what it had)."""
        if in_mount_table(self.mountpoint):
            try:
                subprocess.run([*deltafs_exe(), "umount", "--timeout", "5",
                                str(self.mountpoint)], capture_output=True, timeout=10)
            except subprocess.TimeoutExpired:
                pass
            if in_mount_table(self.mountpoint):
                subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)],
                               capture_output=True, timeout=30)
        for pid in self.pids:
            if pid_alive(pid) and not wait_dead(pid, 5):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                wait_dead(pid, 10)

    def dump_logs(self) -> None:
        """Print every daemon log this mount produced (pytest shows it on failure)."""
        if self.logs_dir.exists():
            for old in sorted(self.logs_dir.iterdir()):
                print(f"===== {old.name} (tail) =====")
                print(tail(old, 40))
        print(f"===== {self.log} (tail) =====")
        print(self.log_tail(80))

    # -------------------------------------------------------------- bucket

    def objects(self, prefix: str = "", manifests: bool = False) -> dict[str, int]:
        """key -> size of every object under the mount's root whose key, relative to that
        root, starts with ``prefix`` (paginated list_objects_v2). Keys are relative to the
        root: on a bucket-root mount the bucket's keys, on a prefix mount without the
        mount's ``prefix/``."""
        base = self.key("")
        return {k[len(base):]: size
                for k, size in bucket_objects(self.client, self.bucket, base + prefix,
                                              manifests).items()}

    def all_objects(self) -> dict[str, int]:
        """Full key -> size of every object in the bucket, inside the prefix or not."""
        return bucket_objects(self.client, self.bucket)

    def outside(self) -> dict[str, int]:
        """Full key -> size of the objects outside the mount's prefix (none for a
        bucket-root mount)."""
        base = self.key("")
        return {k: v for k, v in self.all_objects().items() if not k.startswith(base)}

    def head(self, rel: str) -> dict[str, Any] | None:
        """HEAD of the object of ``rel`` (relative to the mount's root), None if absent."""
        try:
            return dict(self.client.head_object(Bucket=self.bucket, Key=self.key(rel)))
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def put_object(self, rel: str, body: bytes, **kw: Any) -> None:
        """Another writer's PUT of ``rel`` (relative to the mount's root)."""
        self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=body, **kw)


def _live(m: Mount, before_teardown: Callable[[], None] | None = None) -> Iterator[Mount]:
    """Mount ``m``, yield it; then unmount (after ``before_teardown``, e.g. clearing a
    fault proxy), reap and print the logs, and check that a prefix mount left the
    objects outside its prefix as they were."""
    if m.prefix:
        for key, body in DECOYS.items():
            m.client.put_object(Bucket=m.bucket, Key=key, Body=body)
    try:
        m.mount()
        yield m
    finally:
        try:
            if before_teardown is not None:
                before_teardown()
            m.teardown()
        finally:
            m.dump_logs()
    if m.prefix:
        outside = m.outside()
        assert outside == {k: len(v) for k, v in DECOYS.items()}, (
            f"the mount of {m.source} wrote or removed objects outside its prefix: "
            f"{sorted(outside)}")


@pytest.fixture
def mounted(moto_server: str, bucket: str, tmp_path: Path, fuse_tools: None
            ) -> Iterator[Mount]:
    """A live deltafs mount of a fresh moto bucket's root (function scope)."""
    yield from _live(Mount(bucket, moto_server, tmp_path / "deltafs"))


@pytest.fixture(params=["root", "prefix"])
def mounted_any(request: pytest.FixtureRequest, moto_server: str, bucket: str,
                tmp_path: Path, fuse_tools: None) -> Iterator[Mount]:
    """Like ``mounted``, once on the bucket's root and once on ``s3://BUCKET/some/prefix``
    (objects outside the prefix in that bucket: ``DECOYS``). For the tests that remount:
    every remount of the prefix variant must find the tree again, with a wiped cache too."""
    prefix = PREFIX if request.param == "prefix" else ""
    yield from _live(Mount(bucket, moto_server, tmp_path / "deltafs", prefix=prefix))


# ----------------------------------------------------------------------------------------
# data and tree helpers

def release_versions(n: int, size: int, seed: int) -> list[bytes]:
    """``n`` versions of a release file: a random base, each next version the previous
    one with a few overwrites, an insertion and a deletion."""
    rng = random.Random(seed)
    data = rng.randbytes(size)
    out = [data]
    for _ in range(n - 1):
        data = next_version(data, rng)
        out.append(data)
    return out


def read_or_errno(path: Path) -> bytes | int:
    """The file's bytes, or the errno its open/read failed with."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        return exc.errno or -1


def sha_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Entry:
    kind: str  # "file", "dir", "link"
    mode: int
    size: int | None
    sha256: str | None
    mtime_ns: int
    target: str | None


def snapshot(root: Path, *, files_only_mtime: bool = True) -> dict[str, Entry]:
    """relative path -> Entry for everything under ``root`` (not following links)."""
    out: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        for name in dirnames + filenames:
            p = d / name
            rel = p.relative_to(root).as_posix()
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = Entry("link", st.st_mode, None, None, st.st_mtime_ns,
                                 os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = Entry("dir", st.st_mode, None, None, st.st_mtime_ns, None)
            else:
                out[rel] = Entry("file", st.st_mode, st.st_size, sha_of(p), st.st_mtime_ns,
                                 None)
    return out


def diff_snapshots(want: dict[str, Entry], got: dict[str, Entry],
                   fields: Sequence[str] = ("kind", "mode", "size", "sha256", "target"),
                   dir_fields: Sequence[str] | None = None) -> list[str]:
    """Human-readable differences (empty when equal on ``fields``)."""
    problems: list[str] = []
    for rel in sorted(set(want) - set(got)):
        problems.append(f"missing: {rel!r}")
    for rel in sorted(set(got) - set(want)):
        problems.append(f"unexpected: {rel!r} ({got[rel].kind})")
    for rel in sorted(set(want) & set(got)):
        a, b = want[rel], got[rel]
        use = dir_fields if (a.kind == "dir" and dir_fields is not None) else fields
        for f in use:
            va, vb = getattr(a, f), getattr(b, f)
            if va != vb:
                if f == "mode":
                    problems.append(f"{rel!r}: mode {oct(va)} != {oct(vb)}")
                elif f == "mtime_ns":
                    note = ""
                    if va // 1000 == vb // 1000:
                        note = " (equal to the microsecond: ns precision lost)"
                    elif va // 10**9 == vb // 10**9:
                        note = " (equal to the second: sub-second precision lost)"
                    problems.append(f"{rel!r}: mtime_ns {va} != {vb}{note}")
                else:
                    problems.append(f"{rel!r}: {f} {va!r} != {vb!r}")
    return problems


def run(argv: Sequence[str], timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, capture text output, assert it succeeded."""
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)
    assert res.returncode == 0, (f"{' '.join(map(str, argv))} failed ({res.returncode}):\n"
                                 f"stdout: {res.stdout[-2000:]}\nstderr: {res.stderr[-2000:]}")
    return res


def logical_names(keys: Sequence[str] | set[str] | dict[str, int], directory: str
                  ) -> dict[str, list[str]]:
    """For the objects directly under ``directory`` ("" = bucket root, else "a/b/"):
    logical file name -> object keys that store it (``name`` or ``name.delta``);
    ``reference.bin`` and the directory marker are left out."""
    out: dict[str, list[str]] = {}
    for k in keys:
        if not k.startswith(directory):
            continue
        rest = k[len(directory):]
        if not rest or "/" in rest or rest == "reference.bin":
            continue
        name = rest[:-len(".delta")] if rest.endswith(".delta") else rest
        out.setdefault(name, []).append(k)
    return out


def is_eio(exc: OSError) -> bool:
    return exc.errno == errno.EIO


__all__ = ["Mount", "mounted", "mounted_any", "PREFIX", "DECOYS", "release_versions",
           "read_or_errno",
           "snapshot", "diff_snapshots", "run", "sha_of", "logical_names", "Entry", "tail",
           "pid_alive", "wait_dead", "in_mount_table", "deltafs_exe"]
