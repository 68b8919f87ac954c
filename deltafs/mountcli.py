"""``deltafs mount``, ``deltafs umount`` and ``deltafs status``.

``status`` and ``umount`` talk to the daemon through the read-only extended attribute
``user.deltafs.status`` of the mountpoint (JSON): no socket to secure or find.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .errors import DeltafsError, UsageError

log = logging.getLogger(__name__)

STATUS_XATTR = "user.deltafs.status"


class NotMounted(DeltafsError):
    exit_code = 10


def read_status(mountpoint: Path) -> dict[str, Any]:
    try:
        raw = os.getxattr(mountpoint, STATUS_XATTR)
    except OSError as exc:
        raise NotMounted(f"{mountpoint} is not a deltafs mount ({exc.strerror})") from None
    data: dict[str, Any] = json.loads(raw)
    return data


def cmd_mount(args: argparse.Namespace) -> int:
    from .cli import parse_size  # noqa: F401 - sizes parsed by argparse already
    from .daemon import MountConfig, mount
    from .locations import Location, parse

    if args.source.startswith("s3://"):
        source = parse(args.source)
    else:
        source = _local_source(Path(args.source))
    cfg = MountConfig(
        source=source, mountpoint=Path(args.mountpoint),
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        cache_size=args.cache_size, foreground=args.foreground,
        endpoint_url=args.endpoint_url, region=args.region, profile=args.profile,
        allow_other=args.allow_other, read_only=args.read_only, log_file=args.log_file,
        debug=args.debug, upload_concurrency=args.upload_concurrency,
        max_ratio=args.max_ratio, min_delta_size=args.min_delta_size,
        listing_ttl=args.listing_ttl, drain_timeout=args.drain_timeout,
    )
    _ = Location
    return mount(cfg)


def _local_source(path: Path):  # type: ignore[no-untyped-def]
    """A local store directory as a mount source; an empty or new directory becomes one."""
    from .locations import MARKER, Location, find_store_root
    from .store.local import LocalStore

    path = path.absolute()
    root = find_store_root(path)
    if root is None:
        if path.exists() and any(path.iterdir()):
            raise UsageError(f"{path} is neither a deltafs store nor empty "
                             "(create a store with `deltafs init DIR`)")
        LocalStore(path, create=True)
        root = path
    key = path.relative_to(root).as_posix()
    key = "" if key == "." else key + "/"
    _ = MARKER
    return Location(None, root, key)


def cmd_umount(args: argparse.Namespace) -> int:
    mnt = Path(args.mountpoint).absolute()
    status = read_status(mnt)
    pid = int(status["pid"])
    tty = sys.stderr.isatty()
    deadline = time.monotonic() + args.timeout if args.timeout else None
    last = None
    while True:
        status = read_status(mnt)
        files, nbytes = status["pending_files"], status["pending_bytes"]
        if files == 0 and status.get("uploading", 0) == 0:
            break
        if deadline is not None and time.monotonic() > deadline:
            print(f"deltafs: {files} changes ({nbytes} bytes) still pending after "
                  f"{args.timeout:.0f} s; unmounting anyway (the next mount uploads them)",
                  file=sys.stderr)
            break
        if tty and (files, nbytes) != last:
            print(f"waiting for {files} uploads ({nbytes} bytes)…", file=sys.stderr)
            last = (files, nbytes)
        if status.get("last_error") and tty:
            print(f"  last error: {status['last_error']}", file=sys.stderr)
        time.sleep(0.2)
    res = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        raise DeltafsError(f"fusermount3 -u {mnt} failed: {res.stderr.strip()}")
    while _alive(pid):
        time.sleep(0.1)
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def cmd_status(args: argparse.Namespace) -> int:
    from .cli import human

    status = read_status(Path(args.mountpoint).absolute())
    if args.json:
        json.dump(status, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    s = status
    print(f"{args.mountpoint}: {s['source']} (pid {s['pid']}, up {s['uptime']:.0f} s)")
    print(f"  pending:  {s['pending_files']} files, {human(s['pending_bytes'])}, oldest "
          f"{s['oldest_pending_seconds']:.0f} s, {s['uploading']} uploading")
    print(f"  uploaded: {s['uploaded_files']} files, {human(s['uploaded_bytes'])}")
    print(f"  cache:    {human(s['cache_bytes'])}")
    print(f"  logical:  {human(s['logical_bytes'])}, stored {human(s['stored_bytes'])}")
    reqs = ", ".join(f"{k} {v}" for k, v in sorted(s["requests"].items())) or "none"
    print(f"  requests: {reqs}")
    if s.get("last_error"):
        print(f"  last error ({s['last_error_age']:.0f} s ago): {s['last_error']}")
    return 0


def add_mount_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    from .cli import parse_size

    sp = sub.add_parser("mount", parents=[common], help="mount a bucket (or local store)")
    sp.set_defaults(func=cmd_mount, json=False)
    sp.add_argument("source", metavar="SOURCE", help="s3://bucket[/prefix] or a store directory")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    sp.add_argument("-f", "--foreground", action="store_true")
    sp.add_argument("--allow-other", action="store_true",
                    help="let other users in (the kernel checks modes)")
    sp.add_argument("--read-only", action="store_true")
    sp.add_argument("--log-file", default=None,
                    help="a path, 'stderr' or 'syslog' (default: CACHE_DIR/deltafs.log)")
    sp.add_argument("--upload-concurrency", type=int, default=4)
    sp.add_argument("--listing-ttl", type=float, default=30.0,
                    help="seconds a directory listing is trusted (default 30)")
    sp.add_argument("--drain-timeout", type=float, default=60.0,
                    help="seconds to finish uploads at unmount/SIGTERM (default 60)")
    sp.set_defaults(cache_size=10 << 30)
    _ = parse_size

    sp = sub.add_parser("umount", help="wait for pending uploads, then unmount")
    sp.set_defaults(func=cmd_umount, json=False, debug=False, verbose=0)
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    sp.add_argument("--timeout", type=float, default=0,
                    help="stop waiting for uploads after this many seconds (default: wait)")

    sp = sub.add_parser("status", help="pending uploads, cache, requests, last error")
    sp.set_defaults(func=cmd_status, debug=False, verbose=0)
    sp.add_argument("--json", action="store_true")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
