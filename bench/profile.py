"""Where deltafs spends its time on a write and on a cold read (docs/performance.md).

    .venv/bin/python -m bench.profile [--count 20] [--series wheels] [--out DIR]

Mounts deltafs on a fresh moto server, copies a release series in (until ``deltafs
umount`` returns), then remounts with the cache wiped and reads every file back. During
each phase it records:

- a py-spy profile of the daemon (every thread, idle included, 100 Hz), summarised by
  what the thread was doing: xdelta3 (encode/decode through its pipes), SHA-256,
  S3 calls (boto3), the journal (SQLite), FUSE handlers, idle;
- the CPU seconds of the daemon itself, of its children (xdelta3: utime+stime of the
  reaped children) and of the moto server, from /proc/PID/stat.

py-spy must be installed (``.venv/bin/pip install py-spy``); without it only the CPU
figures are reported.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from . import data
from .motoserver import DRIVER_AGENT
from .measure import read_files, timed
from .run import CLEARED, FAKE_ENV, Moto, staging
from .systems import Ctx, Deltafs, wait_for

TICK = os.sysconf("SC_CLK_TCK")
RATE = 100

CATEGORIES = [
    # (category, substrings of a frame): a sample goes to the first category that any of
    # its frames matches, walking from the innermost frame outwards
    ("xdelta3 (encode/decode pipes)", ("deltafs/codec.py:", "codec.py:")),
    ("SHA-256", ("sha256", "hashlib", "_hashlib")),
    ("S3 calls (boto3)", ("store/s3.py", "botocore/", "urllib3/", "http/client.py", "boto3/",
                          "s3transfer/")),
    ("content cache", ("deltafs/cache.py", "diskcache/")),
    ("journal (SQLite)", ("sqlite3", "deltafs/journal.py")),
    ("FUSE handlers", ("deltafs/fs.py", "pyfuse3")),
]
def cpu(pid: int) -> tuple[float, float]:
    """(own utime+stime, reaped children's cutime+cstime) in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    u, s, cu, cs = (int(x) for x in fields[11:15])
    return (u + s) / TICK, (cu + cs) / TICK


IDLE_LEAVES = ("WorkerThread._work", "wait (threading.py", "select (selectors.py",
               "get_events", "epoll", "get (queue.py", "_wait_for_tstate_lock",
               "_fuse_loop", "read (pyfuse3", "handle_io")


def categorise(raw: Path) -> dict[str, Any]:
    """Summarise a py-spy ``--format raw`` file (collapsed stacks, one per line): the
    busy time of the daemon's threads, by what they were doing. The feeder threads that
    pump a file into xdelta3 are left out (they shadow the encode they serve); idle
    threads are counted apart."""
    busy: dict[str, Counter[str]] = defaultdict(Counter)
    idle: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    if not raw.exists():
        return {}
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        body = [f for f in stack.split(";") if not f.startswith(("thread ", "process "))]
        if not body or any("feeder (" in f for f in body):
            continue
        if any("engine.py" in f for f in body):
            kind = "upload/rebuild workers"
        elif body[0].startswith("_bootstrap"):
            kind = "other threads"
        else:
            kind = "main thread (trio + FUSE)"
        if any(k in body[-1] for k in IDLE_LEAVES) and kind != "upload/rebuild workers":
            idle[kind] += count
            continue
        cat = "other Python"
        for name, keys in CATEGORIES:
            if any(any(k in f for k in keys) for f in reversed(body)):
                cat = name
                break
        busy[kind][cat] += count
        leaves[body[-1]] += count
    return {"busy_thread_seconds": {k: {c: v / RATE for c, v in cnt.most_common()}
                                    for k, cnt in busy.items()},
            "idle_thread_seconds": {k: v / RATE for k, v in idle.items()},
            "top_leaves": [(k, v / RATE) for k, v in leaves.most_common(12)]}


def pyspy(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        return None
    return subprocess.Popen([exe, "record", "-p", str(pid), "-r", str(RATE), "--idle",
                             "--threads", "--nonblocking", "--format", "raw", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_pyspy(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
    try:
        proc.wait(timeout=30)   # it ends when the daemon exits
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile")
    p.add_argument("--series", default="wheels", choices=["wheels", "tars"])
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--out", default=None, help="directory for the raw profiles and JSON")
    p.add_argument("--summarise", metavar="DIR", help="summarise the raw profiles of an "
                   "earlier run and exit")
    a = p.parse_args(argv)
    if a.summarise:
        d = Path(a.summarise)
        print(json.dumps({n: categorise(d / f"{n}.raw") for n in ("write", "read")}, indent=1))
        return 0
    series = data.release_series(a.series, a.count)
    series.digests = {f.name: data.sha256_file(f) for f in series.files}
    work = Path(tempfile.mkdtemp(prefix="deltafs-profile-"))
    out = Path(a.out) if a.out else work / "out"
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(FAKE_ENV)
    moto = Moto(work, env)
    s3 = boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1",
                      aws_access_key_id="bench", aws_secret_access_key="bench-secret",
                      config=Config(user_agent_extra=DRIVER_AGENT))
    fs = Deltafs(Ctx(moto.url, work, env, s3))
    result: dict[str, Any] = {"series": series.describe()}
    try:
        s3.create_bucket(Bucket="profile")
        src = staging(work, series)
        # ---- write
        fs.mount("profile")
        spy = pyspy(fs.pid, out / "write.raw")
        time.sleep(1)
        m0 = cpu(moto.proc.pid)[0]
        t0 = time.perf_counter()
        timed(["cp", "-r", str(src), str(fs.mnt)])
        t_cp = time.perf_counter() - t0

        def idle() -> bool:
            st = fs.status()
            return st["pending_files"] == 0 and st.get("uploading", 0) == 0
        wait_for(idle, 3600, "uploads", interval=0.2)
        t_all = time.perf_counter() - t0
        own, kids = cpu(fs.pid)
        moto_cpu = cpu(moto.proc.pid)[0] - m0
        fs.unmount()
        stop_pyspy(spy)
        result["write"] = {"wall": t_all, "cp_returned": t_cp, "daemon_cpu": own,
                           "xdelta3_cpu": kids, "moto_cpu": moto_cpu,
                           "profile": categorise(out / "write.raw")}
        # ---- cold read
        fs.wipe_cache()
        fs.mount("profile")
        spy = pyspy(fs.pid, out / "read.raw")
        time.sleep(1)
        m0 = cpu(moto.proc.pid)[0]
        paths = [fs.mnt / series.name / f.name for f in series.files]
        r = read_files(paths, series.digests)
        own, kids = cpu(fs.pid)
        moto_cpu = cpu(moto.proc.pid)[0] - m0
        fs.unmount()
        stop_pyspy(spy)
        result["read_cold"] = {"wall": r["seconds"], "identical": r["identical"],
                               "daemon_cpu": own, "xdelta3_cpu": kids, "moto_cpu": moto_cpu,
                               "profile": categorise(out / "read.raw")}
    finally:
        fs.force_cleanup()
        moto.stop()
    (out / "profile.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"raw profiles in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
