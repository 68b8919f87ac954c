"""The scale benchmark (``scripts/bench --scale``): many small files in one directory, and
a mount whose journal holds a million rows.

1. ``--scale-files`` small files (200-2,000 bytes, part random, part text) in one
   directory go into a bucket two ways, each bucket its own: *through the mount* (a
   Python loop of open/write/close in a deltafs mount, until ``deltafs status`` shows
   nothing pending) and *foreign* (boto3 ``put_object`` from 16 threads, no metadata, as
   another tool would write them).
2. For each bucket, a fresh mount with an empty cache directory, then one after the
   other: ``ls -l`` (cold), ``ls -l`` again (warm), ``find MNT | wc -l``,
   ``rsync -a --dry-run MNT/scale/ EMPTY/`` and ``rm`` of the first ``--scale-rm`` files
   (one ``xargs -0 rm`` of their names) until nothing is pending. Each step records its
   wall time, the S3 requests by operation (moto's counter, so every request counts),
   the peak RSS of the daemon and its children (``clear_refs`` resets the daemon's
   VmHWM first, so the peak is the step's own) and the event loop's worst stall
   (``recent_loop_stall_ms`` of ``deltafs status``, polled once a second).
3. The same steps in a local directory, for comparison.
4. A journal of ``--journal-rows`` rows made directly in SQLite (no S3): the embedded
   local store mounted with a ``state.db`` filled beforehand, then ``statfs``, the
   status (the xattr and the CLI), creating a file and ``listdir`` + ``stat`` of a
   100-entry directory, each timed in-process (median of 20).

Returns the ``scale`` section of the results document; :func:`tables` renders it.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import stat
import statistics
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import boto3
from botocore.config import Config

from deltafs.manifest import MANIFEST_NAME

from .measure import RssSampler
from .motoserver import DRIVER_AGENT
from .systems import Deltafs, wait_for

if TYPE_CHECKING:
    from .run import Bench

STATUS_XATTR = "user.deltafs.status"
DIR = "scale"                     # the directory the files live in (key prefix "scale/")
DELTA_DIR = "builds"              # --scale-rm delta files, removed by one rm -r
DELTA_SIZE = 8192                 # their size, and the mount's --min-delta-size
FILES_PER_DIR = 1000              # journal: files per directory
SMALL_DIR_ENTRIES = 100           # journal: entries of the directory the ops run in
TRIES = 20                        # journal: timed tries per operation (median reported)
TARGET_MS = 10.0                  # journal: acceptance target of statfs, status, create
PENDING_TIMEOUT = 6 * 3600        # a 100,000-file write on moto takes many minutes
#: before a step, wait (up to the 10 s window) until the stall the daemon reports for its
#: last 10 s is below this, so the step's figure is not the previous step's
QUIET_MS = 20.0


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- data

def name(i: int) -> str:
    return f"f{i:06d}.dat"


def content(i: int) -> bytes:
    """File ``i``: 200-2,000 bytes, a random head then repeated text (seeded: the same
    bytes on every run)."""
    rng = random.Random(i * 7919 + 13)
    size = rng.randrange(200, 2001)
    head = rng.randbytes(rng.randrange(16, size // 2))
    line = f"file {i:06d}: settings, sources and logs repeat themselves like this.\n"
    body = line.encode() * (size // len(line) + 1)
    return (head + body)[:size]


def delta_name(i: int) -> str:
    """Names without digits: each its own series, so no version waits for another (the
    mount holds a version back until the one below it by name is uploaded)."""
    letters = ""
    for _ in range(4):
        i, r = divmod(i, 26)
        letters = chr(97 + r) + letters
    return f"build-{letters}.bin"


def delta_content(i: int, base: bytes) -> bytes:
    """Build ``i`` of one artifact: the base with 64 bytes changed (seeded)."""
    rng = random.Random(i * 104729 + 7)
    at = rng.randrange(len(base) - 64)
    return base[:at] + rng.randbytes(64) + base[at + 64:]


def total_bytes(n: int) -> int:
    return sum(len(content(i)) for i in range(n))


# ------------------------------------------------------------------------- helpers

class StatusPoller:
    """Reads ``deltafs status`` (the mountpoint's xattr) about once a second in a thread:
    the largest ``recent_loop_stall_ms`` seen (the worst stall of the last 10 s, so a
    step shorter than that may also show the end of the step before it), the daemon's
    ``max_loop_stall_ms`` at the start and end, and how long the slowest read took.
    Fields the daemon does not have are left None."""

    def __init__(self, mnt: Path, interval: float = 1.0) -> None:
        self.mnt = mnt
        self.interval = interval
        self.recent_max: float | None = None
        self.since_mount_start: float | None = None
        self.since_mount_end: float | None = None
        self.polls = 0
        self.slowest_ms = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def poll(self) -> dict[str, Any] | None:
        t0 = time.perf_counter()
        try:
            st: dict[str, Any] = json.loads(os.getxattr(self.mnt, STATUS_XATTR))
        except (OSError, ValueError):
            return None
        self.slowest_ms = max(self.slowest_ms, (time.perf_counter() - t0) * 1000)
        self.polls += 1
        return st

    def _note(self, st: dict[str, Any] | None, first: bool = False) -> None:
        if not st:
            return
        recent, since = st.get("recent_loop_stall_ms"), st.get("max_loop_stall_ms")
        if since is not None:
            if first:
                self.since_mount_start = float(since)
            self.since_mount_end = float(since)
        if recent is not None and not first:
            self.recent_max = max(self.recent_max or 0.0, float(recent))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._note(self.poll())

    def __enter__(self) -> "StatusPoller":
        self._note(self.poll(), first=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self._note(self.poll())  # a step shorter than the interval gets one sample too

    def settle(self, timeout: float = 11.0) -> float:
        """Wait until ``recent_loop_stall_ms`` is below :data:`QUIET_MS` (the previous
        step's stalls have left the 10 s window) or ``timeout``; the seconds waited."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            st = self.poll()
            if not st or st.get("recent_loop_stall_ms") is None \
                    or float(st["recent_loop_stall_ms"]) < QUIET_MS:
                break
            time.sleep(0.5)
        self.polls = 0
        self.slowest_ms = 0.0
        return time.monotonic() - t0

    def result(self) -> dict[str, Any]:
        rose = (self.since_mount_end is not None and self.since_mount_start is not None
                and self.since_mount_end > self.since_mount_start)
        return {"max_loop_stall_ms": self.recent_max,
                "max_loop_stall_since_mount_ms": self.since_mount_end,
                # the worst stall since mount was set during this step
                "new_worst_stall": rose,
                "status_polls": self.polls,
                "slowest_status_ms": round(self.slowest_ms, 1)}


def reset_hwm(pids: list[int]) -> None:
    """Reset the peak RSS (VmHWM) of these processes, so a step's peak is its own."""
    for p in pids:
        try:
            with open(f"/proc/{p}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def run(argv: list[str] | str, cwd: Path | None = None, stdin: Path | None = None,
        stdout: Path | None = None) -> str:
    """Run a command, check it succeeded; its stdout (or it went to ``stdout``)."""
    inp = open(stdin, "rb") if stdin else subprocess.DEVNULL
    out = open(stdout, "wb") if stdout else subprocess.PIPE
    try:
        res = subprocess.run(argv, cwd=cwd, stdin=inp, stdout=out, stderr=subprocess.PIPE,
                             shell=isinstance(argv, str))
    finally:
        for f in (inp, out):
            if hasattr(f, "close"):
                f.close()  # type: ignore[union-attr]
    if res.returncode != 0:
        raise RuntimeError(f"{argv} failed ({res.returncode}): "
                           f"{res.stderr.decode(errors='replace').strip()[-800:]}")
    return res.stdout.decode(errors="replace") if res.stdout else ""


def cmd(argv: list[str] | str, **kw: Any) -> None:
    """:func:`run` for a step (no result of its own)."""
    run(argv, **kw)


def req_total(counts: dict[str, dict[str, int]] | None) -> int | None:
    return None if counts is None else sum(v["count"] for v in counts.values())


def log_findings(path: Path, n: int = 30) -> list[str]:
    """The daemon log's warnings and errors (the last ``n``)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    keep = [ln for ln in lines if " WARNING " in ln or " ERROR " in ln or "stalled" in ln]
    return keep[-n:]


class ScaleDeltafs(Deltafs):
    """deltafs on a bucket of the scale benchmark (its own mountpoint and cache). Files
    from ``DELTA_SIZE`` bytes up are delta candidates, so the small files of the main
    directory stay plain objects and those of ``DELTA_DIR`` become chained deltas."""
    name = label = "deltafs-scale"

    def mount(self, bucket: str) -> None:
        self.bucket = bucket
        self.mount_source(f"s3://{bucket}", ["--endpoint-url", self.ctx.endpoint,
                                             "--min-delta-size", str(DELTA_SIZE)])


class JournalDeltafs(Deltafs):
    """deltafs on the embedded local store, with a journal filled beforehand."""
    name = label = "deltafs-journal"

    def mount_local(self, store: Path, ttl: float) -> None:
        self.mount_source(str(store), ["--listing-ttl", str(ttl)], timeout=1800)


# --------------------------------------------------------------------- the benchmark

class Scale:
    def __init__(self, bench: "Bench", files: int, rm: int, journal_rows: int,
                 local: bool, foreign: bool = True, mount: bool = True,
                 partial: Path | None = None) -> None:
        self.b = bench
        #: what is measured so far is written here before each step and after each part
        #: (a run stopped after an hour still leaves its figures), removed at the end
        self.partial = partial
        self._sofar: dict[str, Any] = {}
        self._part: tuple[str, dict[str, Any]] | None = None
        self.n = files
        self.rm = min(rm, files)
        self.rows = journal_rows
        self.local = local
        self.foreign = foreign
        self.mount = mount
        self.work = bench.work / "scale"
        self.work.mkdir(parents=True, exist_ok=True)
        self.df = ScaleDeltafs(bench.ctx)
        #: the files' keys (the bucket may also hold deltafs's own objects)
        self.keys = {f"{DIR}/{name(i)}" for i in range(self.n)}

    # ---------------------------------------------------------------- plumbing
    def step(self, fn: Callable[[], dict[str, Any] | None], df: Deltafs | None = None,
             s3: bool = True) -> dict[str, Any]:
        """Run one step: its wall time, S3 requests, the daemon's peak RSS and loop stall."""
        self.save_partial()
        poller = StatusPoller(df.mnt) if df else None
        settled = poller.settle() if poller else 0.0
        if s3:
            self.b.moto.reset()
        pids = df.pids() if df else []
        reset_hwm(pids)
        with RssSampler(df.pids if df else (lambda: [])) as mem:
            if poller:
                poller.__enter__()
            t0 = time.perf_counter()
            try:
                extra = fn() or {}
            finally:
                secs = time.perf_counter() - t0
                if poller:
                    poller.__exit__()
        r: dict[str, Any] = {"seconds": secs, **extra}
        if s3:
            counts = self.b.moto.counts()
            r["requests"] = counts
            r["requests_total"] = req_total(counts)
        if df:
            r["peak_rss_mb"] = mem.peak_mb
            r["peak_at_seconds"] = round(mem.peak_at, 1)
            r["peak_daemon_mb"] = mem.peak_roots_kb * 1024 / 1e6
            r["peak_processes"] = mem.peak_procs
            r["peak_detail"] = mem.peak_detail
            r.update(poller.result())  # type: ignore[union-attr]
            r["settle_seconds"] = settled
        return r

    def wait_idle(self, df: Deltafs) -> dict[str, Any]:
        """Until ``deltafs status`` shows nothing pending or uploading."""
        def idle() -> bool:
            st = df.status()
            df.status_at_unmount = st
            return st["pending_files"] == 0 and st.get("uploading", 0) == 0
        wait_for(idle, PENDING_TIMEOUT, "deltafs's uploads", interval=0.2)
        st = getattr(df, "status_at_unmount", {})
        return {"failed_files": st.get("failed_files", 0)}

    def save_partial(self) -> None:
        if self.partial is None:
            return
        doc = dict(self._sofar)
        if self._part is not None:
            doc[self._part[0]] = self._part[1]
        doc["incomplete"] = True
        tmp = self.partial.with_name(self.partial.name + ".part")
        try:
            tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
            tmp.replace(self.partial)
        except OSError as exc:
            log(f"scale: could not write {self.partial}: {exc}")

    def guarded(self, what: str, fn: Callable[[], dict[str, Any]],
                cleanup: Callable[[], None]) -> dict[str, Any]:
        log(f"scale: {what}")
        t0 = time.monotonic()
        try:
            r = fn()
        except Exception as exc:  # noqa: BLE001 - report and go on with the others
            log(f"scale: {what} FAILED: {exc}")
            traceback.print_exc(file=sys.stderr)
            try:
                cleanup()
            except Exception:  # noqa: BLE001
                pass
            return {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        log(f"scale: {what} done in {time.monotonic() - t0:.0f} s")
        return r

    def drop_bucket(self, bucket: str) -> None:
        """Empty (1,000 keys per DeleteObjects) and delete a bucket."""
        s3 = self.b.s3
        try:
            keys = list(self.b.ctx.objects(bucket))
            for i in range(0, len(keys), 1000):
                s3.delete_objects(Bucket=bucket, Delete={
                    "Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})
            s3.delete_bucket(Bucket=bucket)
        except Exception as exc:  # noqa: BLE001 - cleanup only
            log(f"could not drop bucket {bucket}: {exc}")

    def names_file(self) -> Path:
        p = self.work / "rm-names"
        if not p.exists():
            p.write_bytes(b"".join(name(i).encode() + b"\0" for i in range(self.rm)))
        return p

    # ------------------------------------------------------------ the steps
    def write_loop(self, d: Path) -> float:
        """Create the files in ``d`` (a Python loop: open, write, close)."""
        d.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        for i in range(self.n):
            with open(d / name(i), "wb") as f:
                f.write(content(i))
        return time.perf_counter() - t0

    def write_deltas(self, df: Deltafs) -> dict[str, Any]:
        """``--scale-rm`` builds of one 8 KiB artifact in ``DELTA_DIR``: the first is the
        directory's reference, the others chained deltas (checked in the bucket)."""
        d = df.mnt / DELTA_DIR
        d.mkdir()
        base = random.Random(3).randbytes(DELTA_SIZE)
        t0 = time.perf_counter()
        for i in range(self.rm):
            with open(d / delta_name(i), "wb") as f:
                f.write(delta_content(i, base))
        secs = time.perf_counter() - t0
        r = {"write_seconds": secs, "files": self.rm, **self.wait_idle(df)}
        keys = self.b.ctx.objects(df.bucket, f"{DELTA_DIR}/")  # type: ignore[attr-defined]
        r["deltas"] = sum(1 for k in keys if k.endswith(".delta"))
        r["ok"] = r["deltas"] == self.rm  # the reference's own file has its .delta too
        return r

    def rm_deltas(self, df: Deltafs) -> dict[str, Any]:
        """``rm -r`` of ``DELTA_DIR`` (cold: the fresh mount never listed it) until
        nothing is pending; the bucket must then hold nothing under it."""
        d = df.mnt / DELTA_DIR

        def rm() -> dict[str, Any]:
            t0 = time.perf_counter()
            run(["rm", "-r", str(d)])
            return {"rm_seconds": time.perf_counter() - t0, **self.wait_idle(df)}
        r = self.step(rm, df)
        r["files"] = self.rm
        if r.get("requests_total") is not None:
            r["requests_per_file"] = r["requests_total"] / self.rm
        r["entries"] = 0 if not d.exists() else len(os.listdir(d))
        r["expected"] = 0
        r["ok"] = r["entries"] == 0
        return r

    def put_foreign(self, bucket: str) -> dict[str, Any]:
        """PUT every file straight into the bucket, 16 at a time (not counted: the
        driver's agent; what is measured is what deltafs does with them later)."""
        s3 = boto3.client("s3", endpoint_url=self.b.moto.url, region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench-secret",
                          config=Config(user_agent_extra=DRIVER_AGENT,
                                        max_pool_connections=16))

        def put(i: int) -> None:
            s3.put_object(Bucket=bucket, Key=f"{DIR}/{name(i)}", Body=content(i))
        with ThreadPoolExecutor(16) as pool:
            for _ in pool.map(put, range(self.n), chunksize=64):
                pass
        return {"writer": "boto3 put_object, 16 threads, no metadata"}

    def listing_steps(self, root: Path, df: Deltafs | None, s3: bool,
                      others: int = 0) -> dict[str, Any]:
        """ls -l cold and warm, find | wc -l, rsync --dry-run, rm of the first files.
        ``others``: entries ``find`` also meets outside the directory."""
        d = root / DIR
        steps: dict[str, Any] = {}
        out = self.work / "ls.out"
        for phase in ("ls_cold", "ls_warm"):
            steps[phase] = self.step(lambda: cmd(["ls", "-l", str(d)], stdout=out), df, s3)
            with open(out, "rb") as f:
                lines = sum(1 for _ in f) - 1  # "total N"
            steps[phase].update(entries=lines, expected=self.n, ok=lines == self.n)
        got: dict[str, Any] = {}
        steps["find"] = self.step(
            lambda: got.update(out=run(f"find '{root}' | wc -l")), df, s3)
        count = int(got["out"].strip() or 0) - 2 - others  # the root and the directory
        steps["find"].update(entries=count, expected=self.n, ok=count == self.n)
        target = self.work / "rsync-target"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        steps["rsync"] = self.step(
            lambda: cmd(["rsync", "-a", "--dry-run", f"{d}/", f"{target}/"]), df, s3)
        names = self.names_file()

        def rm() -> dict[str, Any]:
            t0 = time.perf_counter()
            run(["xargs", "-0", "rm", "--"], cwd=d, stdin=names)
            r = {"rm_seconds": time.perf_counter() - t0}
            if df:
                r.update(self.wait_idle(df))
            else:
                run(["sync", "-f", str(d)])
            return r
        steps["rm"] = self.step(rm, df, s3)
        r = steps["rm"]
        r["files"] = self.rm
        if r.get("requests_total") is not None and self.rm:
            r["requests_per_file"] = r["requests_total"] / self.rm
        left = len(os.listdir(d))
        r.update(entries=left, expected=self.n - self.rm, ok=left == self.n - self.rm)
        return steps

    def cold_ls_by_heads(self, df: Deltafs, bucket: str) -> dict[str, Any]:
        """The issue's "today", measured in this run: a cold ``ls -l`` of the same
        directory with its listing manifest moved aside for the step, so that every file
        is HEADed (concurrently, as deltafs does now; 0.1 HEADed one at a time). The
        manifest is put back, byte for byte, before the next step."""
        s3 = self.b.ctx.s3
        key, side = f"{DIR}/{MANIFEST_NAME}", f"{DIR}-bench-aside{MANIFEST_NAME}"
        s3.copy_object(Bucket=bucket, Key=side, CopySource={"Bucket": bucket, "Key": key})
        s3.delete_object(Bucket=bucket, Key=key)
        try:
            df.wipe_cache()
            df.mount(bucket)
            out = self.work / "ls.out"
            r = self.step(lambda: cmd(["ls", "-l", str(df.mnt / DIR)], stdout=out), df)
            with open(out, "rb") as f:
                lines = sum(1 for _ in f) - 1  # "total N"
            r.update(entries=lines, expected=self.n, ok=lines == self.n)
            df.unmount()
        finally:
            s3.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": side})
            s3.delete_object(Bucket=bucket, Key=side)
        return r

    def bucket_part(self, how: str) -> dict[str, Any]:
        df = self.df
        bucket = self.b.bucket(f"scale-{how}")
        r: dict[str, Any] = {"bucket": bucket}
        self._part = (f"deltafs_{how}", r)  # filled in as it goes (save_partial)
        try:
            if how == "mount":
                df.wipe_cache()
                df.mount(bucket)
                if self.rm:
                    # first, while the bucket is nearly empty: a chained write LISTs
                    # ``.deltafs/sweep/`` twice, and moto's LIST costs O(keys in the
                    # bucket) whatever the prefix (0.5 s at 110,000 keys; S3's does not)
                    r["create_deltas"] = self.step(lambda: self.write_deltas(df), df)

                def create() -> dict[str, Any]:
                    secs = self.write_loop(df.mnt / DIR)
                    return {"write_seconds": secs, **self.wait_idle(df),
                            "writer": "Python loop: open, write, close"}
                r["create"] = self.step(create, df)
                r["create"]["status_at_end"] = {
                    k: v for k, v in getattr(df, "status_at_unmount", {}).items()
                    if k != "failed"}
                t0 = time.perf_counter()
                df.unmount()
                r["create"]["unmount_seconds"] = time.perf_counter() - t0
                r["log_create"] = log_findings(df.cache / "deltafs.log")
            else:
                r["create"] = self.step(lambda: self.put_foreign(bucket))
            objs = self.b.ctx.objects(bucket)
            t0 = time.perf_counter()
            pages = sum(1 for _ in self.b.ctx.s3.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=f"{DIR}/", Delimiter="/"))
            r["raw_list"] = {"seconds": time.perf_counter() - t0, "pages": pages}
            r["objects"] = len(objs)
            r["stored_bytes"] = sum(objs.values())
            r["files_in_bucket"] = sum(1 for k in objs if k in self.keys)
            r["create"]["ok"] = r["files_in_bucket"] == self.n
            if how == "mount":
                r["ls_cold_heads"] = self.cold_ls_by_heads(df, bucket)
            df.wipe_cache()
            t0 = time.perf_counter()
            df.mount(bucket)
            r["mount_seconds"] = time.perf_counter() - t0
            deltas = how == "mount" and self.rm > 0
            r["steps"] = self.listing_steps(df.mnt, df, s3=True,
                                            others=self.rm + 1 if deltas else 0)
            if deltas:
                r["steps"]["rm_deltas"] = self.rm_deltas(df)
            st = df.last_status()
            r["status_at_end"] = {k: v for k, v in st.items() if k != "failed"}
            r["log"] = log_findings(df.cache / "deltafs.log")
            df.unmount()
            left = [k for k in self.b.ctx.objects(bucket, f"{DIR}/") if k in self.keys]
            r["files_in_bucket_after_rm"] = len(left)
            r["steps"]["rm"]["bucket_ok"] = len(left) == self.n - self.rm
            if "rm_deltas" in r["steps"]:
                rest = self.b.ctx.objects(bucket, f"{DELTA_DIR}/")
                r["steps"]["rm_deltas"]["left_in_bucket"] = sorted(rest)[:20]
                r["steps"]["rm_deltas"]["bucket_ok"] = not rest
        finally:
            df.force_cleanup()
            self.drop_bucket(bucket)
        return r

    def local_part(self) -> dict[str, Any]:
        base = self.work / "local"
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir()
        r: dict[str, Any] = {}
        try:
            def create() -> dict[str, Any]:
                secs = self.write_loop(base / DIR)
                run(["sync", "-f", str(base / DIR)])
                return {"write_seconds": secs,
                        "writer": "Python loop: open, write, close; then sync -f"}
            r["create"] = self.step(create, s3=False)
            r["create"]["ok"] = True
            r["steps"] = self.listing_steps(base, None, s3=False)
            r["note"] = ("cold ls -l is the first after creating the files (its dentries and "
                         "inodes are likely cached: dropping them would drop every other "
                         "job's caches on a shared machine)")
        finally:
            shutil.rmtree(base, ignore_errors=True)
        return r

    # ------------------------------------------------------------- journal
    def journal_part(self) -> dict[str, Any]:
        # the driver otherwise never imports deltafs: here it must, to make the journal
        # exactly as the mount expects it (schema, source string) and the store's objects
        from deltafs.config import source_location
        from deltafs.journal import Journal
        from deltafs.store.local import LocalStore

        df = JournalDeltafs(self.b.ctx)
        base = df.base
        store = base / "store"
        shutil.rmtree(store, ignore_errors=True)
        df.wipe_cache()
        df.cache.mkdir(parents=True)
        r: dict[str, Any] = {"rows_files": self.rows}
        try:
            source = str(source_location(str(store)))  # makes the (empty) store
            r["source"] = source
            # The 100-entry directory exists in the store too: a mount forgets when each
            # directory was listed (recover() sets listed_at = 0), so its first use
            # lists it again, and rows the store lacks would be dropped as deleted.
            ls = LocalStore(store)
            small: list[tuple[str, int, str]] = []
            for i in range(SMALL_DIR_ENTRIES):
                body = content(i)
                info = ls.put_bytes(f"small/{name(i)}", body, {})
                small.append((name(i), len(body), info.etag))
            db_path = df.cache / "state.db"
            Journal(db_path, source).close()
            t0 = time.perf_counter()
            r.update(self.populate(db_path, small))
            r["populate_seconds"] = time.perf_counter() - t0
            r["state_db_mb"] = sum(p.stat().st_size for p in df.cache.glob("state.db*")) / 1e6
            t0 = time.perf_counter()
            df.mount_local(store, ttl=3600)
            r["mount_seconds"] = time.perf_counter() - t0
            r["ops"] = self.journal_ops(df)
            st = df.last_status()
            r["status_at_end"] = {k: v for k, v in st.items() if k != "failed"}
            r["daemon_rss_mb"] = _rss_mb(df.pid)
            r["log"] = log_findings(df.cache / "deltafs.log")
            t0 = time.perf_counter()
            df.unmount()
            r["unmount_seconds"] = time.perf_counter() - t0
        finally:
            df.force_cleanup()
            shutil.rmtree(store, ignore_errors=True)
            shutil.rmtree(df.cache, ignore_errors=True)
        return r

    def populate(self, db_path: Path, small: list[tuple[str, int, str]]) -> dict[str, Any]:
        """``rows`` file rows in directories of 1,000 (d0000/ ...) plus ``small/`` with
        100 entries, all published (remote_key set, dirty 0) and listed now: one
        transaction."""
        now = time.time()
        now_ns = time.time_ns()
        reg, dirm = stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755
        db = sqlite3.connect(str(db_path))
        ino = int(db.execute("SELECT coalesce(max(ino), 1) FROM nodes").fetchone()[0]) + 1
        ndirs = (self.rows + FILES_PER_DIR - 1) // FILES_PER_DIR
        cols = ("ino, parent, name, mode, uid, gid, size, mtime_ns, ctime_ns, atime_ns, "
                "sha256, remote_key, remote_etag, remote_kind, remote_size, dirty, listed_at")
        sql = f"INSERT INTO nodes ({cols}) VALUES ({', '.join('?' * 17)})"
        uid, gid = os.getuid(), os.getgid()

        def rows() -> Any:
            nonlocal ino
            left = self.rows
            for d in range(ndirs):
                dname, dino = f"d{d:04d}", ino
                ino += 1
                yield (dino, 1, dname, dirm, uid, gid, 0, now_ns, now_ns, now_ns,
                       None, None, None, None, None, 0, now)
                for f in range(min(FILES_PER_DIR, left)):
                    fname = f"f{f:06d}.dat"
                    size = 200 + (ino * 7919) % 1801
                    yield (ino, dino, fname, reg, uid, gid, size, now_ns, now_ns, now_ns,
                           f"{ino:064x}", f"{dname}/{fname}", f'"{ino:032x}"', "direct",
                           size, 0, None)
                    ino += 1
                left -= FILES_PER_DIR
            sino = ino
            ino += 1
            yield (sino, 1, "small", dirm, uid, gid, 0, now_ns, now_ns, now_ns,
                   None, None, None, None, None, 0, now)
            for fname, size, etag in small:
                yield (ino, sino, fname, reg, uid, gid, size, now_ns, now_ns, now_ns,
                       None, f"small/{fname}", etag, "direct", size, 0, None)
                ino += 1
        with db:
            db.executemany(sql, rows())
            db.execute("UPDATE nodes SET listed_at=? WHERE ino=1", (now,))
            db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('next_ino', ?)", (str(ino),))
        total = db.execute("SELECT count(*) FROM nodes").fetchone()[0]
        db.close()
        return {"rows_total": int(total), "directories": ndirs + 1,
                "small_dir_entries": len(small)}

    def journal_ops(self, df: JournalDeltafs) -> dict[str, Any]:
        mnt = df.mnt
        small = mnt / "small"
        ops: dict[str, Any] = {}

        def timeit(label: str, fn: Callable[[int], Any], target: float | None) -> None:
            times = []
            for i in range(TRIES + 1):  # the first try is reported apart
                t0 = time.perf_counter()
                fn(i)
                times.append((time.perf_counter() - t0) * 1000)
            med = statistics.median(times[1:])
            ops[label] = {"first_ms": times[0], "median_ms": med, "max_ms": max(times[1:]),
                          "tries": TRIES, "target_ms": target,
                          "ok": None if target is None else med < target}

        entries: dict[str, int] = {}

        def listdir(_: int) -> None:
            names = os.listdir(small)
            for n in names:
                os.stat(small / n)
            entries["n"] = len(names)

        def create(i: int) -> None:
            fd = os.open(small / f"new-{i:03d}.dat", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.close(fd)

        timeit("listdir_stat_100", listdir, None)
        ops["listdir_stat_100"]["entries"] = entries.get("n")
        timeit("statfs", lambda _: os.statvfs(mnt), TARGET_MS)
        timeit("status_xattr", lambda _: os.getxattr(mnt, STATUS_XATTR), TARGET_MS)
        timeit("status_cli", lambda _: run([df.exe, "status", "--json", str(mnt)]), None)
        timeit("create", create, TARGET_MS)
        ops["listdir_stat_100"]["ok"] = entries.get("n") == SMALL_DIR_ENTRIES
        st = df.last_status()
        ops["loop"] = {"max_loop_stall_ms": st.get("max_loop_stall_ms"),
                       "recent_loop_stall_ms": st.get("recent_loop_stall_ms")}
        return ops

    # ----------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "config": {"files": self.n, "rm": self.rm, "journal_rows": self.rows,
                       "file_bytes": "200-2000", "logical_bytes": total_bytes(self.n),
                       "directory": f"{DIR}/", "deltafs": "defaults (listing TTL 30 s)",
                       "journal_mount": "embedded local store, --listing-ttl 3600",
                       "tries": TRIES, "target_ms": TARGET_MS},
        }
        self._sofar = out
        if self.n:
            df = self.df
            hows = ("mount",) * self.mount + ("foreign",) * self.foreign
            for how in hows:
                out[f"deltafs_{how}"] = self.guarded(
                    f"{self.n} files {'through the mount' if how == 'mount' else 'foreign'}",
                    lambda how=how: self.bucket_part(how), df.force_cleanup)
                self._part = None
                self.save_partial()
            if self.local:
                out["local"] = self.guarded(f"{self.n} files in a local directory",
                                            self.local_part, lambda: None)
        if self.rows:
            out["journal"] = self.guarded(f"journal of {self.rows} rows", self.journal_part,
                                          lambda: None)
        if self.partial is not None:
            self.partial.unlink(missing_ok=True)  # the whole result follows
        return out


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return None


def failures(scale: dict[str, Any]) -> list[str]:
    """What went wrong (errors, wrong counts), for the driver's exit code."""
    bad = []
    for part, r in scale.items():
        if not isinstance(r, dict) or part == "config":
            continue
        if r.get("error"):
            bad.append(f"scale/{part}")
            continue
        for step in ("create", "create_deltas"):
            if (r.get(step) or {}).get("ok") is False:
                bad.append(f"scale/{part}/{step}")
        for step, s in (r.get("steps") or {}).items():
            if s.get("ok") is False or s.get("bucket_ok") is False:
                bad.append(f"scale/{part}/{step} ({s.get('entries')} of {s.get('expected')})")
        lst = (r.get("ops") or {}).get("listdir_stat_100")
        if lst and lst.get("ok") is False:
            bad.append(f"scale/{part}/listdir ({lst.get('entries')} entries)")
    return bad
