"""Real-mount tests: ``deltafs mount`` of a moto bucket, driven with cp, rsync, tar,
kill -9, deltaglider, and raw syscalls. Every comparison is by SHA-256.

They need root and /dev/fuse (skipped without) and fusermount3 (missing, they fail).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import io
import os
import re
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import boto3
import pytest

from helpers import cli_env, corrupt_object, deltaglider_exe, free_port, run_deltafs, wait_http
from helpers import sha256_bytes as sha_of_bytes
from mountfixtures import (  # noqa: F401 - fixtures are used by name
    PREFIX,
    Mount,
    diff_snapshots,
    logical_names,
    mounted,
    mounted_any,
    release_versions,
    run,
    sha_of,
    snapshot,
)

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.usefixtures("fuse_tools"),  # a missing fusermount3 fails, with how to install
]

KiB = 1 << 10
MiB = 1 << 20
MIN_DELTA = 64 * KiB
BASE_NS = 1_700_000_000_123_456_789  # mtimes with every nanosecond digit set


# ----------------------------------------------------------------------------------------
# source trees

def set_mtime(p: Path, ns: int) -> None:
    os.utime(p, ns=(ns, ns), follow_symlinks=False)


def build_tree(src: Path, releases: int = 20, release_size: int = 2 * MiB) -> Path:
    """Nested dirs, empty file, empty dir, symlinks, modes, UTF-8 and spaces in names,
    ``releases`` versions of a release file in one directory; ns-precise mtimes."""
    src.mkdir(parents=True)
    files: dict[str, bytes] = {
        "a/b/c/deep.txt": b"deep\n" * 300,
        "a/readme.md": b"# readme\n" + bytes(range(256)) * 40,
        "empty.txt": b"",
        "naïve file ü.txt": "naïve contents ü ☃\n".encode() * 50,
        "dir with space/file with space.txt": b"spaces " * 1000,
        "script.sh": b"#!/bin/sh\necho hi\n",
        "secret.txt": b"top secret\n",
        "medium.bin": os.urandom(200 * KiB),
    }
    for rel, data in files.items():
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    os.chmod(src / "script.sh", 0o755)
    os.chmod(src / "secret.txt", 0o600)
    (src / "emptydir").mkdir()
    rel_dir = src / "releases"
    rel_dir.mkdir()
    for i, data in enumerate(release_versions(releases, release_size, seed=1234)):
        (rel_dir / f"app-1.0.{i}.bin").write_bytes(data)
    os.symlink("a/b/c/deep.txt", src / "link")
    os.symlink("nowhere/at/all", src / "dangling")
    # ns-precise mtimes: files and links first, then directories (deepest first)
    n = 0
    all_paths = sorted(src.rglob("*"), key=lambda p: (-len(p.parts), str(p)))
    for p in all_paths:
        if not p.is_dir() or p.is_symlink():
            set_mtime(p, BASE_NS + n * 1_000_001_001)
            n += 1
    for p in all_paths:
        if p.is_dir() and not p.is_symlink():
            set_mtime(p, BASE_NS + n * 1_000_001_001)
            n += 1
    return src


FILE_FIELDS = ("kind", "mode", "size", "sha256", "target", "mtime_ns")


def assert_same_tree(want: Path, got: Path, what: str, m: Mount | None = None,
                     fields=FILE_FIELDS, dir_fields=("kind",)) -> None:
    problems = diff_snapshots(snapshot(want), snapshot(got), fields=fields,
                              dir_fields=dir_fields)
    log = f"\n--- log tail ---\n{m.log_tail(30)}" if m is not None else ""
    assert not problems, f"{what}: {len(problems)} differences:\n" + \
        "\n".join(problems[:40]) + log


# ----------------------------------------------------------------------------------------
# 1. cp -a

def test_cp_a_tree_roundtrip(mounted_any: Mount, tmp_path: Path) -> None:
    m = mounted_any
    src = build_tree(tmp_path / "src")
    dst = m.mountpoint / "tree"
    run(["cp", "-a", str(src), str(dst)])
    # live mount: files and links exactly (content, mode, mtime to the ns), dirs by mode
    assert_same_tree(src, dst, "after cp -a", m, dir_fields=("kind", "mode"))
    assert os.readlink(dst / "link") == "a/b/c/deep.txt"
    assert (dst / "link").read_bytes() == (src / "a/b/c/deep.txt").read_bytes()
    assert list((dst / "emptydir").iterdir()) == []

    m.remount(wipe_cache=True)
    # from the bucket alone
    assert_same_tree(src, dst, "after umount, cache wipe and mount", m)
    assert os.readlink(dst / "link") == "a/b/c/deep.txt"
    assert os.readlink(dst / "dangling") == "nowhere/at/all"
    assert (dst / "emptydir").is_dir() and list((dst / "emptydir").iterdir()) == []
    # and the releases are stored as deltas against one reference
    keys = m.objects("tree/releases/")
    assert "tree/releases/reference.bin" in keys, sorted(keys)
    deltas = [k for k in keys if k.endswith(".delta")]
    assert len(deltas) == 20, sorted(keys)
    stored = sum(keys.values())
    assert stored < 20 * 2 * MiB * 0.25, f"20 versions of 2 MiB stored in {stored} bytes"


# ----------------------------------------------------------------------------------------
# 2. rsync -a, twice

RSYNC_TEMP = re.compile(r"(^|/)\.[^/]+\.[A-Za-z0-9]{6}(\.delta)?$")


def build_rsync_tree(src: Path) -> Path:
    src.mkdir(parents=True)
    rel = src / "releases"
    rel.mkdir()
    for i, data in enumerate(release_versions(6, 1 * MiB, seed=77)):
        (rel / f"tool-2.{i}.bin").write_bytes(data)
    (rel / "NOTES.txt").write_bytes(b"notes\n" * 100)
    docs = src / "docs" / "guide"
    docs.mkdir(parents=True)
    for i in range(5):
        (docs / f"page {i}.html").write_bytes(f"<p>page {i} é</p>\n".encode() * (50 + i))
    (src / "docs" / "big.pdf").write_bytes(os.urandom(300 * KiB))
    (src / "empty").write_bytes(b"")
    (src / "emptydir").mkdir()
    (src / "top.txt").write_bytes(b"top\n")
    os.chmod(src / "top.txt", 0o640)
    os.symlink("docs/guide/page 0.html", src / "index.html")
    n = 0
    for p in sorted(src.rglob("*"), key=lambda p: (-len(p.parts), str(p))):
        set_mtime(p, BASE_NS + n * 7_000_000_011)
        n += 1
    set_mtime(src, BASE_NS - 1)
    return src


def check_bucket_layout(m: Mount, src: Path, prefix: str) -> None:
    """Each directory holds reference.bin (iff it has files >= 64 KiB), one object per
    file (symlinks included), its marker, and nothing else; no rsync temp names."""
    keys = m.objects()
    temp = [k for k in keys if RSYNC_TEMP.search(k)]
    assert not temp, f"rsync temp names left in the bucket: {temp}"
    dotted = [k for k in keys if any(part.startswith(".") for part in k.split("/"))]
    assert not dotted, f"keys with dot-names (the source has none): {dotted}"
    expected_keys: set[str] = set()
    problems: list[str] = []
    for dirpath, dirnames, filenames in os.walk(src):
        d = Path(dirpath)
        rel = d.relative_to(src).as_posix()
        dprefix = prefix + ("" if rel == "." else rel + "/")
        names = set(filenames) | {n for n in dirnames if (d / n).is_symlink()}
        by_name = logical_names(keys, dprefix)
        if set(by_name) != names:
            problems.append(f"{dprefix}: objects for {sorted(by_name)}, files {sorted(names)}")
        for name, objs in by_name.items():
            if len(objs) != 1:
                problems.append(f"{dprefix}{name}: {len(objs)} objects {objs}")
            expected_keys.update(objs)
        eligible = any((d / f).stat().st_size >= MIN_DELTA for f in filenames
                       if not (d / f).is_symlink())
        has_ref = dprefix + "reference.bin" in keys
        if eligible != has_ref:
            problems.append(f"{dprefix}: reference.bin {'present' if has_ref else 'missing'}"
                            f" but delta-eligible files: {eligible}")
        if has_ref:
            expected_keys.add(dprefix + "reference.bin")
        expected_keys.add(dprefix)  # the directory marker (optional)
    extra = sorted(set(keys) - expected_keys)
    if extra:
        problems.append(f"objects that belong to no file: {extra}")
    assert not problems, "bucket layout:\n" + "\n".join(problems)


def test_rsync_twice_transfers_nothing(mounted_any: Mount, tmp_path: Path) -> None:
    m = mounted_any
    src = build_rsync_tree(tmp_path / "src")
    dst = m.mountpoint / "dst"
    run(["rsync", "-a", f"{src}/", f"{dst}/"])
    assert_same_tree(src, dst, "after rsync -a", m)
    out = run(["rsync", "-a", "--itemize-changes", f"{src}/", f"{dst}/"]).stdout
    assert out.strip() == "", f"second rsync -a transferred/changed:\n{out}\n{m.log_tail(20)}"
    m.wait_idle(60)
    check_bucket_layout(m, src, "dst/")

    m.remount()
    out = run(["rsync", "-a", "--itemize-changes", f"{src}/", f"{dst}/"]).stdout
    assert out.strip() == "", f"rsync -a after a remount changed:\n{out}\n{m.log_tail(20)}"
    assert_same_tree(src, dst, "after remount", m)

    # from the bucket alone no file needs transferring (directories carry no attributes
    # in the bucket, so their times may be re-set: those lines are left out)
    m.remount(wipe_cache=True)
    out = run(["rsync", "-a", "--itemize-changes", f"{src}/", f"{dst}/"]).stdout
    file_lines = [ln for ln in out.splitlines() if ln and not ln.startswith(".d")]
    assert not file_lines, ("rsync -a after a cache wipe re-transferred files:\n"
                            + "\n".join(file_lines))
    m.wait_idle(60)
    check_bucket_layout(m, src, "dst/")


# ----------------------------------------------------------------------------------------
# 3. tar

def build_small_tree(src: Path, seed: int = 5) -> Path:
    src.mkdir(parents=True)
    vs = release_versions(3, 400 * KiB, seed=seed)
    for i, data in enumerate(vs):
        (src / "pkg").mkdir(exist_ok=True)
        (src / "pkg" / f"lib-{i}.so").write_bytes(data)
    (src / "etc" / "conf.d").mkdir(parents=True)
    (src / "etc" / "conf.d" / "a.conf").write_bytes(b"key = value\n" * 20)
    (src / "etc" / "empty.conf").write_bytes(b"")
    (src / "bin").mkdir()
    (src / "bin" / "run").write_bytes(b"#!/bin/sh\nexit 0\n")
    os.chmod(src / "bin" / "run", 0o750)
    os.chmod(src / "etc" / "conf.d" / "a.conf", 0o600)
    os.symlink("../pkg/lib-2.so", src / "bin" / "lib.so")
    (src / "var").mkdir()
    return src


TAR_FIELDS = ("kind", "mode", "size", "sha256", "target")


def test_tar_roundtrip(mounted_any: Mount, tmp_path: Path) -> None:
    m = mounted_any
    src = build_small_tree(tmp_path / "src")
    # tar -xf into the mount
    archive = tmp_path / "in.tar"
    run(["tar", "-cf", str(archive), "-C", str(src), "."])
    into = m.mountpoint / "extracted"
    into.mkdir()
    run(["tar", "-xf", str(archive), "-C", str(into)])
    assert_same_tree(src, into, "tar -xf into the mount", m, fields=TAR_FIELDS,
                     dir_fields=("kind", "mode"))
    # tar -cf from the mount, extracted locally
    out = tmp_path / "out.tar"
    run(["tar", "-cf", str(out), "-C", str(into), "."])
    local = tmp_path / "local"
    local.mkdir()
    run(["tar", "-xf", str(out), "-C", str(local)])
    assert_same_tree(src, local, "tar -cf from the mount", m, fields=TAR_FIELDS,
                     dir_fields=("kind", "mode"))
    # tar keeps mtimes to the second
    a, b = snapshot(src), snapshot(local)
    bad = [r for r in a if a[r].kind == "file" and a[r].mtime_ns // 10**9 != b[r].mtime_ns // 10**9]
    assert not bad, f"mtimes changed through tar: {bad}"
    # and from the bucket alone
    m.remount(wipe_cache=True)
    out2 = tmp_path / "out2.tar"
    run(["tar", "-cf", str(out2), "-C", str(into), "."])
    local2 = tmp_path / "local2"
    local2.mkdir()
    run(["tar", "-xf", str(out2), "-C", str(local2)])
    assert_same_tree(src, local2, "tar -cf after a cache wipe", m, fields=TAR_FIELDS)


# ----------------------------------------------------------------------------------------
# 4. kill -9 right after cp

def test_kill9_after_cp_replays(mounted_any: Mount, tmp_path: Path) -> None:
    m = mounted_any
    src = tmp_path / "src"
    src.mkdir()
    versions = release_versions(20, 1536 * KiB, seed=99)
    for i, data in enumerate(versions):
        (src / f"build-{i:02d}.bin").write_bytes(data)
    want = {p.name: sha_of(p) for p in src.iterdir()}
    crash = m.mountpoint / "crash"
    crash.mkdir()
    pid = m.status_cli()["pid"]
    assert pid == m.pid
    run(["cp", *sorted(str(p) for p in src.iterdir()), str(crash)])
    m.kill9()
    m.force_unmount()
    m.mount()  # same cache directory: the journal replays

    def view() -> dict[str, str]:
        return {p.name: sha_of(p) for p in crash.iterdir() if p.name != "last.bin"}

    got = view()
    assert got == want, (f"after kill -9 and remount: missing {sorted(set(want) - set(got))},"
                         f" wrong {sorted(k for k in got if got[k] != want.get(k))}")
    m.wait_idle(120)
    by_name = logical_names(m.objects("crash/"), "crash/")
    assert set(by_name) == set(want), f"in the bucket: {sorted(by_name)}"
    assert all(len(v) == 1 for v in by_name.values()), by_name

    # once more on an idle mount, with SIGKILL microseconds after close() returned
    last = os.urandom(100 * KiB)
    with open(crash / "last.bin", "wb") as f:
        f.write(last)
    m.kill9()
    m.force_unmount()
    m.mount()
    last_survived = (crash / "last.bin").exists() and \
        sha_of(crash / "last.bin") == sha_of_bytes(last)
    m.wait_idle(60)

    m.remount(wipe_cache=True)
    assert view() == want, "read back from the bucket alone differs"
    assert last_survived, ("a file whose close() had returned was lost by kill -9 "
                           "(the daemon stages it in RELEASE, which the kernel sends after "
                           "close() returns; flush() does nothing)")
    assert sha_of(crash / "last.bin") == sha_of_bytes(last)


# ----------------------------------------------------------------------------------------
# 5. deltaglider interop

def make_zip(version: int, blob: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        info = zipfile.ZipInfo("app/payload.bin", date_time=(2024, 1, 1, 0, 0, 0))
        z.writestr(info, blob, compress_type=zipfile.ZIP_STORED)
        for j in range(5):
            info = zipfile.ZipInfo(f"app/module{j}.py", date_time=(2024, 1, 1, 0, 0, 0))
            z.writestr(info, f"# module {j} version {version}\n".encode() * 400,
                       compress_type=zipfile.ZIP_DEFLATED)
        z.writestr(zipfile.ZipInfo("app/VERSION", date_time=(2024, 1, 1, 0, 0, 0)),
                   f"1.{version}\n")
    return buf.getvalue()


def make_tar(blob: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in (("data/blob.bin", blob), ("data/README", b"read me\n" * 100)):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 1_700_000_000
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def deltaglider(args: list[str], endpoint: str, timeout: float = 120
                ) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([str(deltaglider_exe()), *args], capture_output=True, text=True, timeout=timeout,
                         env=cli_env(endpoint))
    assert res.returncode == 0, f"deltaglider {' '.join(args)} failed:\n{res.stderr[-3000:]}"
    return res


def test_deltaglider_interop(mounted_any: Mount, tmp_path: Path) -> None:
    m = mounted_any
    # written through a mount in DeltaGlider's format (the default writes chained
    # deltas, which deltaglider refuses: tests/test_interop.py), read with deltaglider
    m.remount(extra_args=["--format", "deltaglider"])
    blobs = release_versions(4, 600 * KiB, seed=3)
    written: dict[str, bytes] = {}
    for i, blob in enumerate(blobs):
        written[f"rel/app-1.{i}.zip"] = make_zip(i, blob)
    written["rel/bundle.tar"] = make_tar(blobs[-1])
    (m.mountpoint / "rel").mkdir()
    for key, data in written.items():
        (m.mountpoint / key).write_bytes(data)
    m.wait_idle(60)
    keys = m.objects("rel/")
    assert "rel/reference.bin" in keys, sorted(keys)
    out = tmp_path / "dg-out"
    out.mkdir()
    for key, data in written.items():
        dest = out / Path(key).name
        deltaglider(["cp", m.url(key), str(dest)], m.endpoint)
        assert dest.exists(), f"deltaglider cp {m.url(key)} wrote nothing"
        assert sha_of(dest) == sha_of_bytes(data), f"deltaglider read {key} differently"

    # put with deltaglider, read through the mount
    dg_src = tmp_path / "dg-src"
    dg_src.mkdir()
    # deltaglider 6.2.0 deltas only archive-like names (.zip, ...), and with a bare
    # ``s3://bucket/dir/`` destination it drops ``dir/``: give the full key
    versions = release_versions(4, 1 * MiB, seed=11)
    for i, data in enumerate(versions):
        p = dg_src / f"tool-{i}.zip"
        p.write_bytes(data)
        deltaglider(["cp", str(p), m.url(f"dg/tool-{i}.zip")], m.endpoint)
    dg_keys = m.objects("dg/")
    assert "dg/reference.bin" in dg_keys and len(
        [k for k in dg_keys if k.endswith(".delta")]) == 4, f"deltaglider stored: {dg_keys}"

    def check_mount_view(what: str) -> None:
        for i, data in enumerate(versions):
            p = m.mountpoint / "dg" / f"tool-{i}.zip"
            st = os.stat(p)
            assert st.st_size == len(data), f"{what}: {p.name} size {st.st_size}, " \
                f"true size {len(data)}"
            assert sha_of(p) == sha_of_bytes(data), f"{what}: {p.name} content differs"
        names = sorted(os.listdir(m.mountpoint / "dg"))
        assert names == sorted(f"tool-{i}.zip" for i in range(4)), f"{what}: {names}"

    # (the live mount listed the root moments ago and trusts that listing for the TTL;
    # test_remount_sees_bucket_changes checks what a remount with the cache kept shows)
    m.remount(wipe_cache=True)
    check_mount_view("remount, wiped cache")
    for key, data in written.items():
        assert sha_of(m.mountpoint / key) == sha_of_bytes(data), key


def test_remount_sees_bucket_changes(mounted_any: Mount) -> None:
    """Objects another writer put while we were unmounted show after a remount that
    keeps the cache (the journal's listing time must not outlive the mount)."""
    m = mounted_any
    (m.mountpoint / "d").mkdir()
    (m.mountpoint / "d" / "mine.txt").write_bytes(b"mine\n")
    assert sorted(os.listdir(m.mountpoint)) == ["d"]
    m.umount()
    m.put_object("theirs.txt", b"theirs\n")
    m.put_object("d/theirs.txt", b"theirs too\n")
    m.mount()
    assert sorted(os.listdir(m.mountpoint)) == ["d", "theirs.txt"], \
        "a remount (cache kept) serves the previous mount's listing of / without LISTing"
    assert sorted(os.listdir(m.mountpoint / "d")) == ["mine.txt", "theirs.txt"]
    assert (m.mountpoint / "theirs.txt").read_bytes() == b"theirs\n"
    # and from the bucket alone
    m.remount(wipe_cache=True)
    assert sorted(os.listdir(m.mountpoint)) == ["d", "theirs.txt"]
    assert sorted(os.listdir(m.mountpoint / "d")) == ["mine.txt", "theirs.txt"]
    assert (m.mountpoint / "d" / "mine.txt").read_bytes() == b"mine\n"


def test_prefix_mount_with_a_new_cache_finds_its_tree(moto_server: str, bucket: str,
                                                      tmp_path: Path, fuse_tools: None
                                                      ) -> None:
    """Issue 8: in 0.1 a mount of s3://bucket/PREFIX with a fresh cache showed an empty
    root. A tree copied into a prefix mount is all there after a mount with a new, empty
    cache directory, through ``deltafs get`` and through a mount of the bucket's root."""
    src = build_small_tree(tmp_path / "w", seed=17)
    fields, dir_fields = ("kind", "size", "sha256", "target"), ("kind",)  # cp -r: no modes
    m = Mount(bucket, moto_server, tmp_path / "prefix-mount", prefix="p")
    whole = Mount(bucket, moto_server, tmp_path / "root-mount")
    try:
        m.mount()
        run(["cp", "-r", str(src), str(m.mountpoint / "w")])
        assert_same_tree(src, m.mountpoint / "w", "cp -r into the prefix mount", m,
                         fields=fields, dir_fields=dir_fields)
        m.umount()
        m.use_cache(tmp_path / "new-cache")  # not wiped: another, empty directory
        m.mount()
        assert run(["ls", str(m.mountpoint)]).stdout.split() == ["w"], \
            f"ls of the prefix mount with a new cache\n{m.log_tail(30)}"
        run(["stat", str(m.mountpoint / "w")])
        assert stat.S_ISDIR(os.stat(m.mountpoint / "w").st_mode)
        assert_same_tree(src, m.mountpoint / "w", "prefix mount, new cache", m,
                         fields=fields, dir_fields=dir_fields)
        m.umount()
        assert all(k.startswith("p/w/") for k in m.all_objects()), sorted(m.all_objects())

        # deltafs get of every file, by its key under p/
        got = tmp_path / "got"
        files = [p for p in src.rglob("*") if p.is_file() and not p.is_symlink()]
        for f in files:
            rel = f.relative_to(src).as_posix()
            dest = got / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            res = run_deltafs(["get", f"s3://{bucket}/p/w/{rel}", str(dest)],
                              endpoint=moto_server, cache_dir=tmp_path / "get-cache")
            assert res.returncode == 0, (rel, res.stderr.decode())
            assert sha_of(dest) == sha_of(f), f"deltafs get s3://{bucket}/p/w/{rel} differs"

        # a mount of the bucket's root sees the same tree under p/
        whole.mount()
        assert sorted(os.listdir(whole.mountpoint)) == ["p"]
        assert sorted(os.listdir(whole.mountpoint / "p")) == ["w"]
        assert_same_tree(src, whole.mountpoint / "p" / "w", "bucket-root mount, under p/",
                         whole, fields=fields, dir_fields=dir_fields)
    finally:
        for mount in (m, whole):
            try:
                mount.teardown()
            finally:
                mount.dump_logs()


# ----------------------------------------------------------------------------------------
# 6. overwrite, append, truncate, rename over, rename dir, delete last file

def walk_view(root: Path) -> dict[str, tuple[str, int | None, str | None]]:
    return {rel: (e.kind, e.size, e.sha256 or e.target)
            for rel, e in snapshot(root).items()}


def test_mutations_survive_cache_wipe(mounted_any: Mount, tmp_path: Path) -> None:
    m = mounted_any
    root = m.mountpoint
    vs = release_versions(4, 300 * KiB, seed=21)
    layout = {
        "d1/a.bin": vs[0], "d1/b.bin": vs[1], "d1/c.txt": b"c" * 5000,
        "d1/grow.txt": b"g" * 100,
        "d2/x.bin": vs[2], "d2/y.txt": b"y" * 3000, "d2/sub/z.txt": b"z" * 10,
        "d3/only.txt": b"the only one\n", "top.txt": b"top\n", "victim.txt": b"victim\n",
    }
    for rel, data in layout.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    m.remount()  # everything published: the changes below go through the bucket paths
    # overwrite
    (root / "d1/a.bin").write_bytes(vs[3])
    # append
    with open(root / "d1/b.bin", "ab") as f:
        f.write(b"appended tail " * 1000)
    # truncate (shrink and grow)
    run(["truncate", "-s", "1000", str(root / "d1/c.txt")])
    run(["truncate", "-s", "70000", str(root / "d1/grow.txt")])
    # rename over an existing file
    os.rename(root / "top.txt", root / "victim.txt")
    # rename a directory with files in it
    os.rename(root / "d2", root / "d2-renamed")
    # delete the last file of a directory
    os.unlink(root / "d3/only.txt")
    # and the same on files not uploaded yet
    (root / "fresh.txt").write_bytes(b"fresh\n" * 100)
    (root / "fresh2.txt").write_bytes(b"fresh2\n" * 100)
    os.rename(root / "fresh.txt", root / "fresh2.txt")
    with open(root / "fresh2.txt", "ab") as f:
        f.write(b"more\n")
    before = walk_view(root)
    # the expected state, independently
    assert before["d1/a.bin"] == ("file", len(vs[3]), sha_of_bytes(vs[3]))
    assert before["d1/b.bin"][1] == len(vs[1]) + 14000
    assert before["d1/c.txt"] == ("file", 1000, sha_of_bytes(b"c" * 1000))
    assert before["d1/grow.txt"] == ("file", 70000,
                                     sha_of_bytes(b"g" * 100 + b"\0" * 69900))
    assert before["victim.txt"] == ("file", 4, sha_of_bytes(b"top\n"))
    assert "top.txt" not in before and "d2" not in before
    assert before["d2-renamed/sub/z.txt"] == ("file", 10, sha_of_bytes(b"z" * 10))
    assert before["d3"] == ("dir", None, None)
    assert not any(k.startswith("d3/") for k in before)
    assert before["fresh2.txt"] == ("file", 605, sha_of_bytes(b"fresh\n" * 100 + b"more\n"))

    # a handful of small changes: they reach the bucket within seconds
    m.wait_idle(30)
    m.remount(wipe_cache=True)
    after = walk_view(root)
    problems = [f"{k}: before {before.get(k)} after {after.get(k)}"
                for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    assert not problems, "tree differs after a wiped remount:\n" + "\n".join(problems)
    keys = m.objects()
    stale = [k for k in keys if k.startswith(("d2/", "top.txt", "d3/only", "fresh.txt"))]
    assert not stale, f"objects of renamed/deleted files remain: {stale}"


# ----------------------------------------------------------------------------------------
# 7. corruption and S3 outage

def test_corrupt_delta_is_eio(mounted_any: Mount) -> None:
    m = mounted_any
    vs = release_versions(3, 300 * KiB, seed=8)
    (m.mountpoint / "c").mkdir()
    # v0 first and alone, so that it seeds reference.bin (uploads run concurrently)
    for i, data in enumerate(vs):
        (m.mountpoint / "c" / f"v{i}.bin").write_bytes(data)
        m.wait_idle(60)
    keys = m.objects("c/", manifests=True)
    assert {"c/v1.bin.delta", "c/v2.bin.delta"} <= set(keys), sorted(keys)
    # chained deltas: a small pointer and a blob holding the delta (tests/test_chain.py)
    meta = (m.head("c/v2.bin.delta") or {}).get("Metadata", {})
    v2_blob = f"c/.deltafs/{meta['deltafs-blob']}"
    # real deltas (not the zero-diff one of the seeding file), so flipped bytes matter
    assert keys[v2_blob] > 1000, keys
    m.umount()
    corrupt_object(m.client, m.bucket, m.key("c/v1.bin.delta"), how="garbage")
    corrupt_object(m.client, m.bucket, m.key(v2_blob), how="flip")
    m.wipe_cache()
    m.mount()
    for name in ("v1.bin", "v2.bin"):
        with pytest.raises(OSError) as info:
            (m.mountpoint / "c" / name).read_bytes()
        assert info.value.errno == errno.EIO, f"{name}: {info.value!r}"
        errors = [ln for ln in m.log_text().splitlines()
                  if (" ERROR " in ln or " WARNING " in ln) and f"c/{name}" in ln]
        assert errors, f"no error line in the log names c/{name}:\n{m.log_tail(30)}"
    # the intact version still reads
    assert sha_of(m.mountpoint / "c" / "v0.bin") == sha_of_bytes(vs[0])


class MotoProcess:
    """A moto server this test owns (so it can be stopped and started again)."""

    def __init__(self, logdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logdir = logdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with open(self.logdir / f"moto-{self.starts}.log", "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
        wait_http(self.url + "/", timeout=30)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def own_moto(tmp_path: Path, aws_env: None):  # type: ignore[no-untyped-def]
    moto = MotoProcess(tmp_path)
    moto.start()
    try:
        yield moto
    finally:
        moto.stop()


@pytest.mark.parametrize("prefix", ["", PREFIX], ids=["root", "prefix"])
def test_s3_outage_writes_queue_and_replay(own_moto: MotoProcess, tmp_path: Path,
                                           prefix: str) -> None:
    bucket = "outage-bucket"
    client = boto3.client("s3", endpoint_url=own_moto.url, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    m = Mount(bucket, own_moto.url, tmp_path / "deltafs", prefix=prefix)
    try:
        m.mount()
        cached = os.urandom(300 * KiB)
        (m.mountpoint / "cached.bin").write_bytes(cached)
        assert (m.mountpoint / "cached.bin").read_bytes() == cached
        m.wait_idle(30)
        own_moto.stop()
        # S3 is down: a write lands in the journal, a cached read is served
        new = os.urandom(200 * KiB) + b"offline"
        src = tmp_path / "new.bin"
        src.write_bytes(new)
        (m.mountpoint / "offline").mkdir()
        t0 = time.monotonic()
        run(["cp", str(src), str(m.mountpoint / "offline" / "new.bin")], timeout=60)
        assert time.monotonic() - t0 < 20, "cp waited on the dead S3"
        assert sha_of(m.mountpoint / "cached.bin") == sha_of_bytes(cached)
        assert sha_of(m.mountpoint / "offline" / "new.bin") == sha_of_bytes(new)
        time.sleep(2)
        st = m.status()
        assert st["pending_files"] >= 1, st
        # S3 is back (empty: moto keeps no state): the pending upload completes
        own_moto.start()
        client.create_bucket(Bucket=bucket)
        deadline = time.monotonic() + 60
        while True:
            st = m.status()
            names = logical_names(m.objects("offline/"), "offline/")
            if st["pending_files"] == 0 and "new.bin" in names:
                break
            assert time.monotonic() < deadline, (
                f"not uploaded 60 s after S3 came back: status {st}, objects {names}\n"
                f"{m.log_tail(30)}")
            time.sleep(0.5)
        m.remount(wipe_cache=True)
        assert sha_of(m.mountpoint / "offline" / "new.bin") == sha_of_bytes(new)
    finally:
        try:
            m.teardown()
        finally:
            m.dump_logs()


# ----------------------------------------------------------------------------------------
# 8. ls -l of a known directory after a remount: no HEAD per file

def test_the_daemon_runs_with_the_c_allocator(mounted: Mount) -> None:
    """``deltafs mount`` runs itself again with ``PYTHONMALLOC=malloc`` (memtrim.py:
    Python's arenas fragment and never shrink; glibc's heaps are trimmed), pins the mmap
    threshold, and the mount works as ever."""
    pid = int(mounted.status()["pid"])
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = f.read().split(b"\0")
    assert b"PYTHONMALLOC=malloc" in env and b"MALLOC_ARENA_MAX=2" in env
    # and it pinned glibc's mmap threshold (large blocks off the heap)
    assert mounted.status()["memory"]["mmap_threshold"] == 128 << 10
    with open(f"/proc/{pid}/comm") as f:  # still called deltafs in ps, top and pgrep
        assert f.read().strip() == "deltafs"
    (mounted.mountpoint / "f").write_bytes(b"x" * 1000)
    assert (mounted.mountpoint / "f").read_bytes() == b"x" * 1000


def test_ls_after_remount_does_not_head_each_file(mounted_any: Mount, tmp_path: Path) -> None:
    m = mounted_any
    d = m.mountpoint / "many"
    d.mkdir()
    n = 600
    t0 = time.monotonic()
    for i in range(n):
        with open(d / f"f{i:05d}.txt", "wb") as f:
            f.write(b"x%d\n" % i)
    t1 = time.monotonic()
    m.wait_idle(240)
    print(f"created {n} files in {t1 - t0:.1f} s, uploaded {time.monotonic() - t1:.1f} s later")
    # remount keeping the cache, with a short listing TTL so ``ls`` does list again
    m.remount(extra_args=["--listing-ttl", "1"])
    time.sleep(1.5)
    before = m.requests()
    res = run(["ls", "-l", str(d)])
    after = m.requests()
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("-")]
    assert len(lines) == n
    heads = after.get("HEAD", 0) - before.get("HEAD", 0)
    lists = after.get("LIST", 0) - before.get("LIST", 0)
    assert heads <= 10, f"ls -l of {n} known files issued {heads} HEADs ({lists} LISTs)"
    assert lists >= 1, "ls -l did not even list (TTL 1 s): the test did not exercise it"


# ----------------------------------------------------------------------------------------
# 9. reserved names, hard links, rename flags

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(a: Path, b: Path, flags: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    try:
        fn = libc.renameat2
    except AttributeError:
        pytest.skip("libc has no renameat2")
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                   ctypes.c_uint]
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(a))


def expect_errno(code: int, fn, *args) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno == code, \
        f"{fn.__name__}{args}: {errno.errorcode.get(info.value.errno)} " \
        f"instead of {errno.errorcode[code]}"


def test_reserved_names_links_rename_flags(mounted: Mount) -> None:
    m = mounted
    root = m.mountpoint
    (root / "sub").mkdir()
    (root / "a.txt").write_bytes(b"a")
    (root / "b.txt").write_bytes(b"b")
    expect_errno(errno.EPERM, open, root / "reference.bin", "wb")
    expect_errno(errno.EPERM, open, root / "sub" / "reference.bin", "wb")
    expect_errno(errno.EPERM, open, root / "x.delta", "wb")
    expect_errno(errno.EPERM, open, root / "sub" / "x.delta", "wb")
    expect_errno(errno.EPERM, os.mkdir, root / "reference.bin")
    expect_errno(errno.EPERM, os.rename, root / "a.txt", root / "a.txt.delta")
    expect_errno(errno.EPERM, os.symlink, "a.txt", root / "l.delta")
    expect_errno(errno.EPERM, os.link, root / "a.txt", root / "hard.txt")
    assert not (root / "hard.txt").exists()
    expect_errno(errno.EINVAL, renameat2, root / "a.txt", root / "b.txt", RENAME_EXCHANGE)
    assert (root / "a.txt").read_bytes() == b"a" and (root / "b.txt").read_bytes() == b"b"
    expect_errno(errno.EEXIST, renameat2, root / "a.txt", root / "b.txt", RENAME_NOREPLACE)
    renameat2(root / "a.txt", root / "c.txt", RENAME_NOREPLACE)
    assert (root / "c.txt").read_bytes() == b"a"
    assert sorted(os.listdir(root)) == ["b.txt", "c.txt", "sub"]
    m.wait_idle(30)
    keys = set(m.objects())
    bad = [k for k in keys if k.endswith((".delta", "reference.bin", "hard.txt"))]
    assert not bad, f"refused names reached the bucket: {bad}"
    assert {"b.txt", "c.txt"} <= keys and "a.txt" not in keys, sorted(keys)


# ----------------------------------------------------------------------------------------
# 10. fsync

def published_sha(m: Mount, key: str) -> str | None:
    found = m.head(key) or m.head(key + ".delta")
    return None if found is None else found.get("Metadata", {}).get("dg-file-sha256")


def test_fsync_waits_for_the_bucket(mounted: Mount) -> None:
    m = mounted
    data = os.urandom(1 * MiB)
    path = m.mountpoint / "synced.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
        got = published_sha(m, "synced.bin")
        assert got is not None, f"fsync returned before the upload: {sorted(m.objects())}"
        assert got == sha_of_bytes(data), "the object in the bucket is not what was fsynced"
    finally:
        os.close(fd)
    assert sha_of(path) == sha_of_bytes(data)


def test_write_after_fsync_same_descriptor(mounted_any: Mount) -> None:
    """fsync, then more writes on the same descriptor, another fsync, close: the bucket
    ends up with all the bytes."""
    m = mounted_any
    data = os.urandom(1 * MiB)
    path = m.mountpoint / "synced.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    second_fsync_error: OSError | None = None
    try:
        os.write(fd, data)
        os.fsync(fd)
        assert published_sha(m, "synced.bin") == sha_of_bytes(data)
        os.write(fd, b"tail")
        try:
            os.fsync(fd)
        except OSError as exc:
            second_fsync_error = exc
        else:
            assert published_sha(m, "synced.bin") == sha_of_bytes(data + b"tail"), \
                "the second fsync returned before the new content was in the bucket"
    finally:
        os.close(fd)
    m.wait_idle(30)
    m.remount(wipe_cache=True)
    assert sha_of(path) == sha_of_bytes(data + b"tail"), (
        f"bytes written after an fsync on the same descriptor were lost (size "
        f"{os.stat(path).st_size}, want {len(data) + 4}); second fsync: "
        f"{second_fsync_error!r}")
    assert second_fsync_error is None, f"second fsync failed: {second_fsync_error!r}"
