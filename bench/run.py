"""The benchmark driver (``scripts/bench`` runs it): one moto server, every series into
every system, then the tables and ``bench-results/<date>.json``."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any, Callable

import boto3
from botocore.config import Config

from . import data, report, scale
from .measure import RssSampler, drop_page_cache, fsync_all, raw_decode, read_files, timed
from .motoserver import DRIVER_AGENT
from .throttle import Throttle
from .systems import ROOT, Ctx, DeltaGlider, Deltafs, Local, System, make_systems, tail

ALL_SYSTEMS = ["deltafs", "deltafs-dg", "deltaglider", "deltaglider-zip", "s3fs", "rclone",
               "local"]
FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true",
}
CLEARED = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
           "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_ROLE_ARN",
           "AWS_WEB_IDENTITY_TOKEN_FILE")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Moto:
    """One moto S3 server (with the request counter) on 127.0.0.1."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logfile = work / "moto.log"
        with open(self.logfile, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.motoserver", "-H", "127.0.0.1", "-p",
                 str(self.port)], stdout=out, stderr=subprocess.STDOUT, env=env,
                cwd=str(ROOT))
        deadline = time.monotonic() + 30
        while True:
            try:
                self.counts()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto did not start: {tail(self.logfile)}")
                time.sleep(0.2)

    def counts(self) -> dict[str, dict[str, int]]:
        with urllib.request.urlopen(self.url + "/_bench/requests", timeout=10) as r:
            data: dict[str, dict[str, int]] = json.load(r)
        return data

    def reset(self) -> None:
        req = urllib.request.Request(self.url + "/_bench/reset", data=b"", method="POST")
        urllib.request.urlopen(req, timeout=10).read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def machine() -> dict[str, Any]:
    def first(path: str, key: str) -> str:
        try:
            for line in open(path):
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return ""
    osr = {}
    try:
        for line in open("/etc/os-release"):
            k, _, v = line.strip().partition("=")
            osr[k] = v.strip('"')
    except OSError:
        pass
    xd = subprocess.run(["xdelta3", "-V"], capture_output=True, text=True)
    return {
        "cpu": first("/proc/cpuinfo", "model name"),
        "cores": os.cpu_count(),
        "memory_gb": round(int(first("/proc/meminfo", "MemTotal").split()[0]) / 1e6, 1),
        "kernel": platform.release(),
        "os": osr.get("PRETTY_NAME", ""),
        "python": platform.python_version(),
        "xdelta3": (xd.stdout + xd.stderr).strip().splitlines()[0] if (xd.stdout + xd.stderr) else "",
        "loadavg_start": os.getloadavg(),
    }


def staging(work: Path, series: data.Series, suffix: str = "") -> Path:
    """A directory named like the series holding its files (hard links, else copies)."""
    d = work / "src" / (series.name + suffix.replace(".", "-")) / series.name
    if d.exists():
        return d
    d.mkdir(parents=True)
    for f in series.files:
        target = d / (f.name + suffix)
        try:
            os.link(f, target)
        except OSError:
            shutil.copyfile(f, target)
    return d


def dg_candidate(name: str) -> bool:
    from deltaglider.core.delta_extensions import is_delta_candidate  # type: ignore[import-not-found]
    return bool(is_delta_candidate(name))


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="deltafs-bench-", dir=args.workdir))
        self.env = {k: v for k, v in os.environ.items() if k not in CLEARED}
        self.env.update(FAKE_ENV)
        self.moto = Moto(self.work, self.env)
        self.s3 = boto3.client("s3", endpoint_url=self.moto.url, region_name="us-east-1",
                               aws_access_key_id="bench", aws_secret_access_key="bench-secret",
                               config=Config(user_agent_extra=DRIVER_AGENT))
        self.ctx = Ctx(self.moto.url, self.work, self.env, self.s3)
        self.systems = make_systems(self.ctx, free_port(), args.systems)
        self.unavailable: dict[str, str] = {}
        for s in self.systems:
            why = s.why_unavailable()
            if why:
                self.unavailable[s.name] = why
                log(f"{s.name} unavailable: {why}; going on without it")
        self.results: dict[str, dict[str, Any]] = {}

    # ----------------------------------------------------------------- helpers
    def bucket(self, name: str) -> str:
        b = re.sub(r"[^a-z0-9-]", "-", f"bench-{name}".lower())[:63]
        self.s3.create_bucket(Bucket=b)
        return b

    def drop_bucket(self, b: str) -> None:
        """Empty and delete a bucket so moto's memory and disk stay small."""
        try:
            for key in list(self.ctx.objects(b)):
                self.s3.delete_object(Bucket=b, Key=key)
            for up in self.s3.list_multipart_uploads(Bucket=b).get("Uploads", []):
                self.s3.abort_multipart_upload(Bucket=b, Key=up["Key"], UploadId=up["UploadId"])
            self.s3.delete_bucket(Bucket=b)
        except Exception as exc:  # noqa: BLE001 - cleanup only
            log(f"could not drop bucket {b}: {exc}")

    def counts(self) -> dict[str, dict[str, int]]:
        return self.moto.counts()

    def guarded(self, what: str, system: System, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if system.name in self.unavailable:
            return {"unavailable": self.unavailable[system.name]}
        log(f"{what}: {system.name}")
        t0 = time.monotonic()
        try:
            r = fn()
        except Exception as exc:  # noqa: BLE001 - report and go on with the others
            log(f"{what}: {system.name} FAILED: {exc}")
            traceback.print_exc(file=sys.stderr)
            system.force_cleanup()
            return {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        log(f"{what}: {system.name} done in {time.monotonic() - t0:.0f} s")
        return r

    # ------------------------------------------------------------------ series
    def mount_series(self, s: System, series: data.Series, cli: bool = True) -> dict[str, Any]:
        src = staging(self.work, series)
        bucket = self.bucket(f"{series.name}-{s.name}")
        r: dict[str, Any] = {"requests": {}}
        try:
            s.wipe_cache()
            s.mount(bucket)
            expect = {f"{series.name}/{f.name}": f.stat().st_size for f in series.files}
            self.moto.reset()
            with RssSampler(s.pids) as mem:
                t0 = time.perf_counter()
                timed(["cp", "-r", str(src), str(s.mnt)])
                t_cp = time.perf_counter() - t0
                s.finish_uploads_and_unmount(expect)
                t_all = time.perf_counter() - t0
            r["requests"]["write"] = self.counts()
            r["write"] = {"seconds": t_all, "cp_seconds": t_cp,
                          "mb_per_s": series.logical / 1e6 / t_all}
            r["peak_rss_mb"] = mem.peak_mb
            r["peak_rss_processes"] = mem.peak_procs
            if isinstance(s, Deltafs):
                r["deltafs_status"] = getattr(s, "status_at_unmount", {})
            self.storage(r, bucket, series)
            s.wipe_cache()
            s.mount(bucket)
            paths = [s.mnt / series.name / f.name for f in series.files]
            self.moto.reset()
            r["read_cold"] = read_files(paths, series.digests)
            r["requests"]["read_cold"] = self.counts()
            self.moto.reset()
            r["read_warm"] = read_files(paths, series.digests)
            r["requests"]["read_warm"] = self.counts()
            s.unmount()
            if isinstance(s, Deltafs) and cli:
                r["get_cold"] = self.cli_gets(s, bucket, series)
        finally:
            s.force_cleanup()
            self.drop_bucket(bucket)
        return r

    def cli_gets(self, s: Deltafs, bucket: str, series: data.Series) -> dict[str, Any]:
        """``deltafs get`` of every file in release order, one process each, sharing one
        new cache dir (a machine that fetches a series): the CLI's cold read."""
        out = self.work / "get-out"
        cache = self.work / "get-cache"
        for d in (out, cache):
            shutil.rmtree(d, ignore_errors=True)
        out.mkdir()
        self.moto.reset()
        t0 = time.perf_counter()
        for f in series.files:
            timed([s.exe, "get", "-q", "--cache-dir", str(cache), "--endpoint-url",
                   self.ctx.endpoint, f"s3://{bucket}/{series.name}/{f.name}", f"{out}/"],
                  env=self.ctx.env)
        secs = time.perf_counter() - t0
        r = read_files([out / f.name for f in series.files], series.digests)
        r.update(seconds=secs, mb_per_s=series.logical / 1e6 / secs,
                 requests=self.counts())
        for d in (out, cache):
            shutil.rmtree(d, ignore_errors=True)
        return r

    def storage(self, r: dict[str, Any], bucket: str, series: data.Series) -> None:
        objs = self.ctx.objects(bucket)
        r["objects"] = len(objs)
        r["stored_bytes"] = sum(objs.values())
        r["logical_bytes"] = series.logical
        r["stored_ratio"] = r["stored_bytes"] / series.logical
        r["object_sizes"] = objs
        r["references"] = {k: self.s3.head_object(Bucket=bucket, Key=k).get("Metadata", {})
                           for k in objs if k.endswith("reference.bin")}

    def dg_series(self, s: DeltaGlider, series: data.Series) -> dict[str, Any]:
        suffix = ".zip" if s.name == "deltaglider-zip" else ""
        src = staging(self.work, series, suffix)
        digests = {k + suffix: v for k, v in series.digests.items()}
        bucket = self.bucket(f"{series.name}-{s.name}")
        r: dict[str, Any] = {"requests": {}, "stored_as": suffix or "original names"}
        try:
            self.moto.reset()
            with RssSampler(s.pids) as mem:
                t0 = time.perf_counter()
                # one `deltaglider cp` per release, in release order: how a series is
                # published, and the first version becomes the reference as in deltafs
                # (`cp -r` would walk the directory in hash order and pick any of them)
                # (the full key: DeltaGlider 6.2.0 puts `cp FILE s3://B/dir/` at the
                # bucket's root, and `cp FILE s3://B/dir/other` at dir/FILE)
                for f in series.files:
                    name = f.name + suffix
                    s.cp(str(src / name), f"s3://{bucket}/{series.name}/{name}",
                         recursive=False)
                t_all = time.perf_counter() - t0
            r["requests"]["write"] = self.counts()
            r["write"] = {"seconds": t_all, "cp_seconds": t_all,
                          "mb_per_s": series.logical / 1e6 / t_all}
            r["peak_rss_mb"] = mem.peak_mb
            r["peak_rss_processes"] = mem.peak_procs
            self.storage(r, bucket, series)
            for phase in ("read_cold", "read_warm"):
                out = self.work / f"dg-out-{phase}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                self.moto.reset()
                t0 = time.perf_counter()
                s.cp(f"s3://{bucket}/{series.name}/", f"{out}/")
                secs = time.perf_counter() - t0
                r["requests"][phase] = self.counts()
                check = read_files([out / (f.name + suffix) for f in series.files], digests)
                check.update(seconds=secs, mb_per_s=series.logical / 1e6 / secs,
                             note="deltaglider cp -r to a local directory; every run of "
                                  "its CLI starts with an empty reference cache")
                r[phase] = check
                shutil.rmtree(out, ignore_errors=True)
        finally:
            self.drop_bucket(bucket)
        return r

    def local_series(self, s: Local, series: data.Series) -> dict[str, Any]:
        src = staging(self.work, series)
        dest = s.base / "dir"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        r: dict[str, Any] = {"requests": {}}
        t0 = time.perf_counter()
        timed(["cp", "-r", str(src), str(dest)])
        t_cp = time.perf_counter() - t0
        paths = [dest / series.name / f.name for f in series.files]
        fsync_all(paths)
        t_all = time.perf_counter() - t0
        r["write"] = {"seconds": t_all, "cp_seconds": t_cp,
                      "mb_per_s": series.logical / 1e6 / t_all, "note": "cp -r, then fsync of every file"}
        drop_page_cache(paths)
        r["read_cold"] = read_files(paths, series.digests)
        r["read_warm"] = read_files(paths, series.digests)
        shutil.rmtree(dest, ignore_errors=True)
        return r

    def run_series(self, series: data.Series) -> None:
        log(f"series {series.describe()}: hashing sources")
        series.digests = {f.name: data.sha256_file(f) for f in series.files}
        per: dict[str, Any] = {}
        self.results[series.name] = per
        for s in self.systems:
            what = f"{series.name}"
            if isinstance(s, DeltaGlider):
                if s.name == "deltaglider-zip" and all(dg_candidate(f.name) for f in series.files):
                    per[s.name] = None  # DeltaGlider deltas these names already
                    continue
                per[s.name] = self.guarded(what, s, lambda s=s: self.dg_series(s, series))
            elif isinstance(s, Local):
                per[s.name] = self.guarded(what, s, lambda s=s: self.local_series(s, series))
            else:
                per[s.name] = self.guarded(what, s, lambda s=s: self.mount_series(s, series))
        log(f"series {series.name}: raw xdelta3 -d of the same files")
        per["xdelta3"] = raw_decode(series.files, self.work)

    def run_throttled(self, series: list[data.Series]) -> dict[str, Any]:
        """The series again, with every system talking to S3 through one slow link
        (:mod:`bench.throttle`): what a delta store saves shows where bytes cost time.
        The local directory has no link to go through and is left out."""
        mbit, rtt = self.args.throttle_link
        out: dict[str, Any] = {"mbit": mbit, "rtt_ms": rtt, "results": {}}
        if not series:
            return out
        with Throttle(self.moto.port, mbit=mbit, rtt_ms=rtt) as link:
            work = self.work / "throttled"
            work.mkdir(exist_ok=True)
            ctx = Ctx(link.url, work, self.env, self.s3)
            names = [n for n in self.args.systems if n != "local"]
            systems = make_systems(ctx, free_port(), names)
            for ser in series:
                per: dict[str, Any] = {}
                out["results"][ser.name] = per
                log(f"throttled ({mbit:g} Mbit/s, {rtt:g} ms): {ser.describe()}")
                for s in systems:
                    what = f"{ser.name} through {mbit:g} Mbit/s"
                    if s.name in self.unavailable:
                        per[s.name] = {"unavailable": self.unavailable[s.name]}
                    elif isinstance(s, DeltaGlider):
                        if s.name == "deltaglider-zip" and all(
                                dg_candidate(f.name) for f in ser.files):
                            per[s.name] = None
                            continue
                        per[s.name] = self.guarded(what, s,
                                                   lambda s=s: self.dg_series(s, ser))
                    else:
                        per[s.name] = self.guarded(
                            what, s, lambda s=s: self.mount_series(s, ser, cli=False))
            out["link"] = link.describe()
        return out

    # ---------------------------------------------------------------- metadata
    def meta_mount(self, s: System, small: Path, n: int) -> dict[str, Any]:
        bucket = self.bucket(f"meta-{s.name}")
        r: dict[str, Any] = {"requests": {}}
        target = self.work / "rsync-target"
        target.mkdir(exist_ok=True)
        d = s.mnt / "meta"
        cmds = {"ls": ["ls", "-l", str(d)],
                "rsync": ["rsync", "-a", "--dry-run", f"{d}/", f"{target}/"]}
        try:
            s.wipe_cache()
            s.mount(bucket)
            expect = {f"meta/{f.name}": f.stat().st_size for f in small.iterdir()}
            self.moto.reset()
            t0 = time.perf_counter()
            timed(["cp", "-r", str(small), str(d)])
            s.finish_uploads_and_unmount(expect)
            r["create_seconds"] = time.perf_counter() - t0
            r["requests"]["create"] = self.counts()
            for op, argv in cmds.items():
                s.wipe_cache()
                s.mount(bucket)
                for temp in ("cold", "warm"):
                    self.moto.reset()
                    t0 = time.perf_counter()
                    out = subprocess.run(argv, capture_output=True, text=True)
                    r[f"{op}_{temp}"] = time.perf_counter() - t0
                    r["requests"][f"{op}_{temp}"] = self.counts()
                    if out.returncode != 0:
                        raise RuntimeError(f"{argv}: {out.stderr.strip()[-500:]}")
                    if op == "ls" and len(out.stdout.splitlines()) != n + 1:
                        raise RuntimeError(f"ls -l {d} ({temp}) listed "
                                           f"{len(out.stdout.splitlines()) - 1} of {n} files")
                s.unmount()
        finally:
            s.force_cleanup()
            self.drop_bucket(bucket)
        return r

    def meta_local(self, s: Local, small: Path, n: int) -> dict[str, Any]:
        d = s.base / "meta"
        shutil.rmtree(d, ignore_errors=True)
        target = self.work / "rsync-target"
        target.mkdir(exist_ok=True)
        r: dict[str, Any] = {"requests": {}}
        t0 = time.perf_counter()
        timed(["cp", "-r", str(small), str(d)])
        fsync_all(d.iterdir())
        r["create_seconds"] = time.perf_counter() - t0
        for temp in ("warm",):
            r[f"ls_{temp}"] = timed(["ls", "-l", str(d)])
            r[f"rsync_{temp}"] = timed(["rsync", "-a", "--dry-run", f"{d}/", f"{target}/"])
        r["note"] = "a local directory has no cold case that would not also drop other work's caches"
        shutil.rmtree(d, ignore_errors=True)
        return r

    def run_metadata(self) -> None:
        n = self.args.small_files
        small = data.small_files(self.work, n)
        per: dict[str, Any] = {}
        self.results["metadata"] = per
        for s in self.systems:
            if s.kind == "cli":
                per[s.name] = None
            elif isinstance(s, Local):
                per[s.name] = self.guarded("metadata", s, lambda s=s: self.meta_local(s, small, n))
            else:
                per[s.name] = self.guarded("metadata", s, lambda s=s: self.meta_mount(s, small, n))

    # --------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        a = self.args
        series: list[data.Series] = []
        if a.wheels:
            series.append(data.release_series("wheels", a.wheels))
        if a.tars:
            series.append(data.release_series("tars", a.tars))
        if a.tgz:
            series.append(data.tgz_series("python", a.tgz))
            series.append(data.tgz_series("gnu", a.tgz))
        if a.synthetic:
            count, _, mb = a.synthetic.partition("x")
            series.append(data.synthetic_series(int(count), int(mb) * 1_000_000))
        doc: dict[str, Any] = {
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "mode": "scale" if a.scale else "quick" if a.quick else "full",
            "machine": machine(),
            "note": a.note,
            "config": {"wheels": a.wheels, "tars": a.tars, "tgz": a.tgz,
                       "synthetic": a.synthetic,
                       "small_files": a.small_files, "scale_files": a.scale_files,
                       "scale_rm": a.scale_rm, "journal_rows": a.journal_rows,
                       "moto": self.moto.url,
                       "indexed_list": os.environ.get("DELTAFS_BENCH_INDEXED_LIST") == "1",
                       "rclone": "--vfs-cache-mode writes (default --vfs-write-back 5s)",
                       "s3fs": "defaults (no use_cache)", "deltafs": "defaults"},
            "systems": [{"name": s.name, "label": s.label,
                         "version": "" if s.name in self.unavailable else s.version(),
                         "unavailable": self.unavailable.get(s.name)} for s in self.systems],
            "series": [],
            "results": self.results,
        }
        t0 = time.monotonic()
        for ser in series:
            doc["series"].append({"name": ser.name, "label": ser.label, "files": len(ser.files),
                                  "logical_bytes": ser.logical,
                                  "mean_mb": ser.logical / len(ser.files) / 1e6,
                                  "names": [f.name for f in ser.files]})
            self.run_series(ser)
        if a.throttle_link:
            doc["throttled"] = self.run_throttled(
                [ser for ser in series if ser.name in a.throttle_series])
        if a.small_files:
            self.run_metadata()
        if a.scale_files or a.journal_rows:
            doc["scale"] = scale.Scale(self, a.scale_files, a.scale_rm, a.journal_rows,
                                       local="local" in a.systems,
                                       foreign=not a.scale_no_foreign,
                                       mount=not a.scale_no_mount,
                                       partial=getattr(a, "partial_out", None)).run()
        doc["machine"]["loadavg_end"] = os.getloadavg()
        doc["seconds"] = time.monotonic() - t0
        return doc

    def close(self) -> None:
        for s in self.systems:
            try:
                s.force_cleanup()
            except Exception:  # noqa: BLE001
                pass
        self.moto.stop()
        if self.args.keep_work:
            log(f"work directory kept: {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="small series (3 wheels, 2 tars, 3 × 8 MB synthetic, 200 small files; "
                        "scale: 500 files, rm 50, a journal of 20000 rows)")
    p.add_argument("--wheels", type=int, help="botocore wheels to copy (full: 20)")
    p.add_argument("--tars", type=int, help="botocore tars to copy (full: 20)")
    p.add_argument("--tgz", type=int, help="botocore tars as .tar.gz, made by Python and by "
                                          "GNU tar -czf, to copy (full: 20 each)")
    p.add_argument("--synthetic", help="COUNTxMB synthetic versions (full: 10x200)")
    p.add_argument("--small-files", type=int, help="files for the metadata tests (full: 2000)")
    p.add_argument("--scale", action="store_true",
                   help="only the scale benchmark (deltafs and a local directory): many small "
                        "files in one directory, and a journal of many rows")
    p.add_argument("--indexed-list", action="store_true",
                   help="the moto server answers LIST pages from a sorted index, in "
                        "O(page) as S3 does, instead of sorting the whole bucket per page "
                        "(bench/indexedlist.py; the answers are the same)")
    p.add_argument("--scale-files", type=int, metavar="N",
                   help="files in the directory of the scale benchmark (full: 100000, "
                        "--quick: 500; 0 skips that part)")
    p.add_argument("--scale-rm", type=int, metavar="N",
                   help="of those, how many the scale benchmark removes (full: 10000, "
                        "--quick: 50)")
    p.add_argument("--scale-no-foreign", action="store_true",
                   help="skip the scale benchmark's bucket of foreign objects (its second "
                        "100,000-file bucket, ~10 minutes)")
    p.add_argument("--scale-no-mount", action="store_true",
                   help="skip the scale benchmark's bucket written through the mount (the "
                        "longest part: its 100,000 creates, and the 10,000 chained deltas)")
    p.add_argument("--journal-rows", type=int, metavar="N",
                   help="file rows of the journal the scale benchmark mounts (full: "
                        "1000000, --quick: 20000; 0 skips that part)")
    p.add_argument("--throttle", default=None, metavar="MBIT/RTT_MS",
                   help="the bandwidth-limited run's link, both ways (full and --quick: "
                        "100/20, i.e. 100 Mbit/s and a 20 ms round trip; 0 skips that run)")
    p.add_argument("--throttle-series", default=None, metavar="NAMES",
                   help="series copied again through the slow link (full and --quick: "
                        "wheels)")
    p.add_argument("--systems", default=None,
                   help=f"comma-separated subset of {','.join(ALL_SYSTEMS)}")
    p.add_argument("--out", help="results JSON (default bench-results/<date>.json; "
                                 "--quick: bench-results/<date>-quick.json.tmp; --scale: "
                                 "bench-results/<date>-scale.json, with .tmp appended "
                                 "below the full sizes)")
    p.add_argument("--workdir", default=None, help="where mounts and caches go (default /tmp)")
    p.add_argument("--keep-work", action="store_true")
    p.add_argument("--note", default="", help="free text stored with the results")
    p.add_argument("--render", metavar="JSON", help="print the tables of an earlier run and exit")
    a = p.parse_args(argv)
    q = a.quick
    if a.scale:  # only the scale part
        a.wheels = a.tars = a.tgz = a.small_files = 0
        a.synthetic = ""
        a.throttle = "0"
    if a.throttle is None:
        a.throttle = "100/20"
    if a.throttle_series is None:
        a.throttle_series = "wheels"
    try:
        mbit, _, rtt = a.throttle.partition("/")
        a.throttle_link = (float(mbit), float(rtt or 20)) if float(mbit) > 0 else None
    except ValueError:
        p.error(f"--throttle: not MBIT/RTT_MS: {a.throttle!r}")
    a.throttle_series = [x for x in a.throttle_series.split(",") if x]
    for name, full, quick in (("wheels", 20, 3), ("tars", 20, 2), ("tgz", 20, 0),
                              ("synthetic", "10x200", "3x8"),
                              ("small_files", 2000, 200), *SCALE_SIZES):
        if getattr(a, name) is None:
            setattr(a, name, quick if q else full)
    if a.systems is None:
        a.systems = "deltafs,local" if a.scale else ",".join(ALL_SYSTEMS)
    a.systems = [s for s in a.systems.split(",") if s]
    bad = set(a.systems) - set(ALL_SYSTEMS)
    if bad:
        p.error(f"unknown systems {sorted(bad)}")
    if "deltafs" not in a.systems:
        a.systems.insert(0, "deltafs")
    return a


#: (option, full run, --quick) of the scale benchmark
SCALE_SIZES = (("scale_files", 100_000, 500), ("scale_rm", 10_000, 50),
               ("journal_rows", 1_000_000, 20_000))


def summary(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [f"deltafs benchmark, {doc['date']} ({doc['mode']}), {doc['seconds']:.0f} s: "
             f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, {m['os']}, kernel "
             f"{m['kernel']}; load average {m['loadavg_start'][0]:.1f} at start, "
             f"{m['loadavg_end'][0]:.1f} at end."]
    if doc["note"]:
        lines.append(doc["note"])
    for s in doc["systems"]:
        lines.append(f"- {s['label']}: " + (f"not run ({s['unavailable']})" if s["unavailable"]
                                            else s["version"]))
    for ser in doc["series"]:
        lines.append(f"- series {ser['name']}: {ser['files']} files, "
                     f"{ser['logical_bytes'] / 1e6:.0f} MB ({ser['names'][0]} …)")
    sc = (doc.get("scale") or {}).get("config")
    if sc:
        lines.append(f"- scale: {sc['files']:,} files of 200–2,000 bytes "
                     f"({sc['logical_bytes'] / 1e6:.0f} MB) in one directory, rm of "
                     f"{sc['rm']:,}; a journal of {sc['journal_rows']:,} file rows")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        doc = json.loads(Path(args.render).read_text())
        print(summary(doc) + "\n\n" + report.tables(doc))
        return 0
    if os.geteuid() != 0:
        print("scripts/bench: needs root (FUSE mounts of three systems)", file=sys.stderr)
        return 2
    date = dt.date.today().isoformat()
    if args.scale:
        small = any(getattr(args, k) < full for k, full, _ in SCALE_SIZES)
        name = f"{date}-scale.json" + (".tmp" if small else "")
    else:
        name = f"{date}-quick.json.tmp" if args.quick else f"{date}.json"
    out = Path(args.out) if args.out else ROOT / "bench-results" / name
    if args.indexed_list:
        os.environ["DELTAFS_BENCH_INDEXED_LIST"] = "1"  # the moto server inherits it
    # the scale steps' figures so far, while they run (an hour at 100,000 files)
    args.partial_out = out.with_name(out.name + ".partial")
    bench = Bench(args)
    try:
        doc = bench.run()
    finally:
        bench.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(out)
    print(summary(doc))
    print()
    print(report.tables(doc))
    print()
    print(f"results: {out}")
    failed = [f"{ser}/{sys_}" for ser, per in doc["results"].items()
              for sys_, r in per.items() if r and r.get("error")]
    failed += [f"{ser}/deltafs read back {ph} {r[ph]['identical']}/{r[ph]['files']}"
               for ser, per in doc["results"].items() if ser != "metadata"
               for r in [per.get("deltafs") or {}] for ph in ("read_cold", "read_warm")
               if ph in r and r[ph]["identical"] != r[ph]["files"]]
    failed += scale.failures(doc.get("scale") or {})
    if failed:
        print(f"failed: {', '.join(failed)} (see the JSON)", file=sys.stderr)
        return 1
    return 0
