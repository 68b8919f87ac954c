"""``deltafs mount``, ``deltafs umount`` and ``deltafs status``.

``status`` and ``umount`` talk to the daemon through the read-only extended attribute
``user.deltafs.status`` of the mountpoint (JSON): no socket to secure or find.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import options
from .errors import DeltafsError, UsageError
from .units import human

log = logging.getLogger(__name__)

STATUS_XATTR = "user.deltafs.status"


class NotMounted(DeltafsError):
    exit_code = 10


class StaleMountFound(NotMounted):
    """The mountpoint holds a dead mount (its daemon died)."""

    exit_code = 13


def read_status(mountpoint: Path) -> dict[str, Any]:
    try:
        raw = os.getxattr(mountpoint, STATUS_XATTR)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise StaleMountFound(
                f"{mountpoint} is a stale mount (its daemon died): `deltafs umount "
                f"{mountpoint}` removes it; the next mount uploads what was pending") from None
        raise NotMounted(f"{mountpoint} is not a deltafs mount ({exc.strerror})") from None
    data: dict[str, Any] = json.loads(raw)
    return data


def cmd_mount(args: argparse.Namespace) -> int:
    from .config import build_mount_config, load_file, merge, parse_options
    from .daemon import mount

    opts = parse_options(args.options or [], origin="option")
    option_config = opts.settings.pop("config", None)
    config_ref = args.config or option_config
    file_settings = load_file(config_ref) if config_ref else {}
    source, mountpoint = args.source, args.mountpoint
    if mountpoint is None and source is not None and file_settings.get("source"):
        source, mountpoint = None, source  # `deltafs mount --config NAME MOUNTPOINT`
    flags = {"source": source, "mountpoint": mountpoint, **options.from_args(args, "mount")}
    for name in ("allow_other", "read_only", "debug"):
        flags[name] = flags[name] or None  # an absent switch leaves the file's value
    flags.pop("quiet", None)
    flags.pop("verbose", None)
    settings = merge(file_settings, opts.settings, flags)
    cfg = build_mount_config(settings, foreground=args.foreground, extra_fuse=opts.fuse)
    return mount(cfg)


def _mountpoint_arg(args: argparse.Namespace) -> Path:
    """MOUNTPOINT, or the ``mountpoint`` of ``--config NAME``."""
    if args.mountpoint:
        return Path(args.mountpoint).absolute()
    if getattr(args, "config", None):
        from .config import load_file

        mp = load_file(args.config).get("mountpoint")
        if not mp:
            raise UsageError(f"config {args.config} has no `mountpoint = ...`; give MOUNTPOINT")
        return Path(mp).absolute()
    raise UsageError("give MOUNTPOINT (or --config NAME)")


def cmd_umount(args: argparse.Namespace) -> int:
    mnt = _mountpoint_arg(args)
    if args.stale:
        return _unmount_stale(mnt)
    try:
        status = read_status(mnt)
    except StaleMountFound:
        # what the caller wants from umount: the dead mount gone (uploads it had pending
        # wait in its journal for the next mount)
        print(f"deltafs: {mnt} was a stale mount (its daemon died)", file=sys.stderr)
        return _unmount_stale(mnt, known=True)
    pid = int(status["pid"])
    tty = sys.stderr.isatty()
    deadline = time.monotonic() + args.timeout if args.timeout else None
    last = None
    hurry = False
    while True:
        status = read_status(mnt)
        files, nbytes = status["pending_files"], status["pending_bytes"]
        failed = int(status.get("failed_files", 0))
        if files <= failed and status.get("uploading", 0) == 0:
            if failed:
                print(f"deltafs: {failed} changes failed for good and stay pending (see "
                      f"`deltafs status {mnt}` and the log); unmounting", file=sys.stderr)
            break
        if deadline is not None and time.monotonic() > deadline:
            print(f"deltafs: {files} changes ({nbytes} bytes) still pending after "
                  f"{args.timeout:.0f} s; unmounting anyway (the next mount uploads them)",
                  file=sys.stderr)
            hurry = True
            break
        if tty and (files, nbytes) != last:
            print(f"waiting for {files} uploads ({nbytes} bytes)…", file=sys.stderr)
            last = (files, nbytes)
        if status.get("last_error") and tty:
            print(f"  last error: {status['last_error']}", file=sys.stderr)
        time.sleep(0.2)
    if hurry or deadline is not None:
        # the daemon would otherwise drain again for its --drain-timeout after the
        # unmount: with --timeout, the caller's bound is the one that holds
        try:
            os.kill(pid, signal.SIGUSR2)
        except ProcessLookupError:
            pass
    res = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        raise DeltafsError(f"fusermount3 -u {mnt} failed: {res.stderr.strip()}")
    while _alive(pid):
        time.sleep(0.1)
    return 0


def _unmount_stale(mnt: Path, known: bool = False) -> int:
    """``umount --stale``: remove a dead mount (its daemon died) from MNT; a live mount or
    none is left alone. What was pending stays in the journal for the next mount.
    ``known``: the caller found it dead already."""
    if not known:
        try:
            os.stat(mnt)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                return 0
        else:
            return 0
    res = subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        raise DeltafsError(f"fusermount3 -u -z {mnt} failed: {res.stderr.strip()}")
    print(f"deltafs: removed the stale mount on {mnt}", file=sys.stderr)
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
    mnt = _mountpoint_arg(args)
    if args.watch:
        return _watch(mnt, max(0.1, args.interval), args.json)
    status = read_status(mnt)
    if args.json:
        json.dump(status, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    _print_status(mnt, status)
    return 0


def _watch(mnt: Path, every: float, as_json: bool) -> int:
    """``status --watch``: the status again every ``every`` seconds, with upload rates
    since the last refresh; the screen is redrawn on a terminal, a block (or a JSON
    line) is appended on a pipe. Ends on Ctrl-C (exit 0) or when the mount goes."""
    tty = sys.stdout.isatty() and not as_json
    last: tuple[float, int, int] | None = None
    try:
        while True:
            try:
                s = read_status(mnt)
            except NotMounted as exc:
                if last is None:
                    raise
                print(f"deltafs: {exc}", file=sys.stderr)
                return 0
            now = time.monotonic()
            if last is not None and now > last[0]:
                dt = now - last[0]
                s["rates"] = {"uploaded_files_per_s": round((s["uploaded_files"] - last[1]) / dt, 2),
                              "uploaded_bytes_per_s": round((s["uploaded_bytes"] - last[2]) / dt)}
            last = (now, s["uploaded_files"], s["uploaded_bytes"])
            if as_json:
                print(json.dumps(s), flush=True)
            else:
                if tty:
                    sys.stdout.write("\x1b[H\x1b[2J")  # home, clear
                print(time.strftime("%H:%M:%S"), end=" ")
                _print_status(mnt, s)
                r = s.get("rates")
                if r:
                    print(f"  rate:     {r['uploaded_files_per_s']:.1f} files/s, "
                          f"{human(r['uploaded_bytes_per_s'])}/s uploaded")
                print("", flush=True)
            time.sleep(every)
    except KeyboardInterrupt:
        return 0


def _print_status(mnt: Path, s: dict[str, Any]) -> None:
    print(f"{mnt}: {s['source']} (pid {s['pid']}, up {s['uptime']:.0f} s)")
    print(f"  pending:  {s['pending_files']} files, {human(s['pending_bytes'])}, oldest "
          f"{s['oldest_pending_seconds']:.0f} s, {s['uploading']} uploading")
    print(f"  uploaded: {s['uploaded_files']} files, {human(s['uploaded_bytes'])}")
    print(f"  cache:    {human(s['cache_bytes'])}")
    print(f"  logical:  {human(s['logical_bytes'])}, stored {human(s['stored_bytes'])}")
    reqs = ", ".join(f"{k} {v}" for k, v in sorted(s["requests"].items())) or "none"
    print(f"  requests: {reqs}")
    if "max_loop_stall_ms" in s:
        print(f"  loop:     worst stall {s['max_loop_stall_ms']:.0f} ms since mount, "
              f"{s['recent_loop_stall_ms']:.0f} ms in the last 10 s")
    m = s.get("memory")
    if m:
        limit = human(m["limit"]) if m.get("limit") else "none"
        print(f"  memory:   limit {limit}, daemon {human(m['daemon_rss'])}, xdelta3 "
              f"{m['codec_children']} holding {human(m['codec_held'])} "
              f"({m['codec_waiting']} waiting; waited {m['codec_waits']} times, "
              f"{m['codec_wait_seconds']:.0f} s)")
    ra = s.get("read_ahead")
    if ra:
        print(f"  read-ahead: {ra['started']} files rebuilt before they were opened, "
              f"{ra['failed']} failed; {ra.get('objects_used', 0)} of "
              f"{ra.get('objects_fetched', 0)} objects fetched ahead used")
    if s.get("last_error"):
        print(f"  last error ({s['last_error_age']:.0f} s ago): {s['last_error']}")


def add_mount_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """``mount``, ``umount`` and ``status``. ``mount`` takes the options table's
    ``mount`` settings (not ``common``'s ``cli`` ones)."""
    _ = common
    sp = sub.add_parser(
        "mount", help="mount a bucket (or local store)",
        description="Mount a bucket (or local store). Settings come from --config (a TOML "
                    "file, /etc/deltafs/NAME.toml), then -o options, then flags; the later "
                    "wins. Exit codes: 2 bad usage or config, 5 no bucket, 6 bad "
                    "credentials, 7 endpoint unreachable, 9 xdelta3 missing, 10 mountpoint "
                    "missing or busy, "
                    "11 cache directory unusable, 12 FUSE refused, 13 stale mount, 14 metrics "
                    "port in use.")
    sp.set_defaults(func=cmd_mount, json=False)
    sp.add_argument("source", metavar="SOURCE", nargs="?",
                    help="s3://bucket[/prefix] or a store directory (or from --config)")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?",
                    help="an existing empty directory (or from --config)")
    sp.add_argument("--config", metavar="NAME|FILE", default=None,
                    help="a TOML config file; a bare NAME means /etc/deltafs/NAME.toml")
    sp.add_argument("-o", dest="options", action="append", metavar="OPTS",
                    help="mount(8)-style options: key=value settings (cache_dir=..., "
                         "endpoint_url=...), FUSE options (allow_other, auto_unmount) and "
                         "mount flags (nosuid, nodev, noexec, ro); repeatable")
    sp.add_argument("-f", "--foreground", action="store_true",
                    help="stay in the foreground (systemd Type=notify: READY=1 once live)")
    options.add_arguments(sp, "mount")

    sp = sub.add_parser("umount", help="wait for pending uploads, then unmount")
    sp.set_defaults(func=cmd_umount, json=False, debug=False, verbose=0)
    sp.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    sp.add_argument("--config", metavar="NAME|FILE", default=None,
                    help="take MOUNTPOINT from this config file")
    sp.add_argument("--timeout", type=float, default=0,
                    help="stop waiting for uploads after this many seconds (default: wait)")
    sp.add_argument("--stale", action="store_true",
                    help="only remove a stale mount (its daemon died); a live one is left")

    sp = sub.add_parser("status", help="pending uploads, cache, requests, last error")
    sp.set_defaults(func=cmd_status, debug=False, verbose=0)
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--watch", action="store_true",
                    help="refresh with upload rates until Ctrl-C or the mount goes "
                         "(with --json: one line per refresh)")
    sp.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                    help="seconds between refreshes of --watch (default 2)")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    sp.add_argument("--config", metavar="NAME|FILE", default=None,
                    help="take MOUNTPOINT from this config file")
