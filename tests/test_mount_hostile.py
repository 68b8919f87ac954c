"""Hostile bucket contents and unstorable names through a real mount.

A bucket may hold keys no POSIX path can carry; none may crash the daemon or escape the
mountpoint. Names that S3 cannot store fail with the errno SEMANTICS.md documents.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from mountfixtures import Mount, mounted, mounted_any  # noqa: F401 - fixtures used by name


def _visible(root: Path) -> set[str]:
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            seen.add(os.path.relpath(os.path.join(dirpath, n), root))
    return seen


def test_hostile_keys_are_skipped_not_fatal(mounted_any: Mount) -> None:
    m = mounted_any
    long_name = "L" * 300
    hostile = ["../escape.txt", "a//b.txt", "./dot.txt", "x/../y.txt", "/lead.txt",
               f"{long_name}.txt", "f", "f/g.txt", "ok.txt", "x/fine.txt"]
    for key in hostile:
        m.put_object(key, key.encode())  # under the mount's prefix, if any
    m.remount(wipe_cache=True)
    seen = _visible(m.mountpoint)
    # the file "f" is hidden by the directory "f/"; every invalid name is skipped
    assert seen == {"a", "x", "x/fine.txt", "f", "f/g.txt", "ok.txt"}, seen
    assert (m.mountpoint / "ok.txt").read_bytes() == b"ok.txt"
    assert (m.mountpoint / "f" / "g.txt").read_bytes() == b"f/g.txt"
    assert not (m.mountpoint.parent / "escape.txt").exists()
    log = m.log_text()
    assert "skipping object" in log and "not a valid file name" in log
    assert m.status()["pid"] == m.pid  # still alive and answering


def test_unstorable_names_fail_with_documented_errno(mounted: Mount) -> None:
    root = m = mounted
    root = m.mountpoint
    with pytest.raises(OSError) as bad_utf8:
        os.open(os.fsencode(str(root)) + b"/bad-\xff\xfe.txt", os.O_CREAT | os.O_WRONLY, 0o644)
    assert bad_utf8.value.errno == errno.EINVAL
    # a key over S3's 1,024 bytes, built from names that are each legal (<= 255 bytes)
    d = root
    for i in range(4):
        d = d / (f"{i}" * 250)
        d.mkdir()
    with pytest.raises(OSError) as too_long:
        (d / ("n" * 60)).write_bytes(b"x")
    assert too_long.value.errno == errno.ENAMETOOLONG
    assert "1,024 bytes" in m.log_text()
