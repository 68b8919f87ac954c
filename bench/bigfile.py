"""Large files in bounded memory (issue 12): two versions of one large file (default
2,000 MB) through ``deltafs put``/``get`` and through a mount, each step's peak RSS of
deltafs and its children, and the upload of one large object in parallel parts against
one stream.

    .venv/bin/python -m bench.bigfile [--mb 2000] [--out FILE]

Steps, each on a fresh moto server's bucket:

1. ``deltafs put`` of version 1 (becomes the reference: a multipart upload), then of
   version 2 (a delta against it: xdelta3 with its window narrowed to fit the memory
   limit), then ``deltafs get`` of version 2 with an empty cache (the reference in
   parallel ranges, then the decode). Each a process of its own, defaults.
2. A mount (defaults): ``cp`` of both versions into one directory until ``deltafs
   umount`` returns; then a fresh mount with the cache wiped and ``cat`` of version 2.
3. ``S3Store.put_file`` and ``get_file`` of version 1 with 4 parts in flight and with 1
   (``store.s3.TRANSFER_CONCURRENCY``): parts, seconds. (On loopback the GET's first part
   comes fast enough that the rest stays one stream either way.)

Peak RSS: ``RssSampler`` over the process and its descendants (0.2 s, and VmHWM). The
versions are made of one 1 MiB random block repeated, each MiB stamped with its index,
version 2 with 4 KiB changed in every 97th MiB and 1 MiB inserted in the middle.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from .measure import RssSampler
from .motoserver import DRIVER_AGENT
from .run import CLEARED, FAKE_ENV, Moto
from .systems import ROOT, Ctx, Deltafs

MiB = 1 << 20
LIMIT_MB = 144 * MiB / 1e6  # deltafs's default --memory-limit, in MB


def make_version(path: Path, mb: int, variant: int) -> str:
    rng = random.Random(9)
    block = rng.randbytes(MiB)
    extra = random.Random(100 + variant)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(mb):
            buf = bytearray(block)
            pos = (i * 7919) % (MiB - 64)
            buf[pos:pos + 16] = i.to_bytes(16, "little")
            if variant and i % 97 == 0:
                at = extra.randrange(0, MiB - 4096)
                buf[at:at + 4096] = extra.randbytes(4096)
            if variant and i == mb // 2:
                ins = extra.randbytes(MiB)
                digest.update(ins)
                f.write(ins)
            digest.update(buf)
            f.write(buf)
    return digest.hexdigest()


def sha_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def log(msg: str) -> None:
    print(f"[bigfile {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Run:
    def __init__(self, work: Path, mb: int) -> None:
        self.work = work
        self.mb = mb
        self.env = {k: v for k, v in __import__("os").environ.items() if k not in CLEARED}
        self.env.update(FAKE_ENV)
        self.moto = Moto(work, self.env)
        self.s3 = boto3.client("s3", endpoint_url=self.moto.url, region_name="us-east-1",
                               aws_access_key_id="bench", aws_secret_access_key="bench-secret",
                               config=Config(user_agent_extra=DRIVER_AGENT))
        self.exe = str(ROOT / ".venv" / "bin" / "deltafs")

    def requests(self) -> dict[str, int]:
        return {k: v["count"] for k, v in self.moto.counts().items()}

    def cli(self, label: str, argv: list[str]) -> dict[str, Any]:
        self.moto.reset()
        t0 = time.perf_counter()
        proc = subprocess.Popen([self.exe, *argv, "--endpoint-url", self.moto.url],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        with RssSampler(lambda: [proc.pid]) as mem:
            out, err = proc.communicate()
        secs = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{label}: {err.decode()[-2000:]}")
        r = {"seconds": secs, "peak_rss_mb": mem.peak_mb, "requests": self.requests()}
        log(f"{label}: {secs:.1f} s, peak {mem.peak_mb:.0f} MB, {r['requests']}")
        return r

    def run(self) -> dict[str, Any]:
        v1, v2 = self.work / "big-v1.bin", self.work / "big-v2.bin"
        log(f"making two versions of {self.mb} MB")
        sha1, sha2 = make_version(v1, self.mb, 0), make_version(v2, self.mb, 1)
        doc: dict[str, Any] = {"mb": self.mb, "limit_mb": LIMIT_MB,
                               "bytes": [v1.stat().st_size, v2.stat().st_size]}
        # 1. the CLI
        self.s3.create_bucket(Bucket="big-cli")
        cache = self.work / "cli-cache"
        doc["put_v1"] = self.cli("put v1", ["put", str(v1), "s3://big-cli/big/v1.bin",
                                            "--cache-dir", str(cache)])
        doc["put_v2"] = self.cli("put v2", ["put", str(v2), "s3://big-cli/big/v2.bin",
                                            "--cache-dir", str(cache)])
        objs = {o["Key"]: o["Size"] for o in self.s3.list_objects_v2(
            Bucket="big-cli", Prefix="big/").get("Contents", [])}
        doc["cli_objects"] = objs
        shutil.rmtree(cache)
        out = self.work / "got.bin"
        doc["get_v2"] = self.cli("get v2 (empty cache)", ["get", "s3://big-cli/big/v2.bin",
                                                         str(out), "--cache-dir", str(cache)])
        doc["get_v2"]["identical"] = sha_file(out) == sha2
        out.unlink()
        shutil.rmtree(cache)
        # 2. the mount
        self.s3.create_bucket(Bucket="big-mount")
        ctx = Ctx(self.moto.url, self.work, self.env, self.s3)
        df = Deltafs(ctx)
        try:
            df.wipe_cache()
            df.mount("big-mount")
            self.moto.reset()
            (df.mnt / "big").mkdir()
            t0 = time.perf_counter()
            with RssSampler(df.pids) as mem:
                subprocess.run(["cp", str(v1), str(v2), str(df.mnt / "big")], check=True)
                t_cp = time.perf_counter() - t0
                df.finish_uploads_and_unmount()
            doc["mount_copy"] = {"seconds": time.perf_counter() - t0, "cp_seconds": t_cp,
                                 "peak_rss_mb": mem.peak_mb, "requests": self.requests(),
                                 "memory": (getattr(df, "status_at_unmount", {}) or {}
                                            ).get("memory")}
            log(f"mount copy: {doc['mount_copy']}")
            df.wipe_cache()
            df.mount("big-mount")
            self.moto.reset()
            t0 = time.perf_counter()
            with RssSampler(df.pids) as mem:
                h = hashlib.sha256()
                with open(df.mnt / "big" / v2.name, "rb") as f:
                    while chunk := f.read(MiB):
                        h.update(chunk)
            doc["mount_cold_read"] = {"seconds": time.perf_counter() - t0,
                                      "peak_rss_mb": mem.peak_mb,
                                      "identical": h.hexdigest() == sha2,
                                      "requests": self.requests()}
            log(f"mount cold read: {doc['mount_cold_read']}")
            df.unmount()
        finally:
            df.force_cleanup()
        return doc

    def transfer(self, v1: Path, sha1: str) -> dict[str, Any]:
        """3. One object of v1's size with 4 parts in flight and with 1."""
        import os

        from deltafs.store import s3 as s3mod

        os.environ.update(FAKE_ENV)  # this process's own client: the bench's fake keys
        self.s3.create_bucket(Bucket="big-raw")
        out = self.work / "got.bin"
        doc: dict[str, Any] = {}

        for n in (4, 1):
            s3mod.TRANSFER_CONCURRENCY = n
            store = s3mod.S3Store("big-raw", endpoint_url=self.moto.url)
            self.moto.reset()
            t0 = time.perf_counter()
            store.put_file(f"raw/v1-{n}", v1, {})
            up = time.perf_counter() - t0
            parts = self.requests().get("UploadPart", 0)
            t0 = time.perf_counter()
            store.get_file(f"raw/v1-{n}", out)
            down = time.perf_counter() - t0
            ok = sha_file(out) == sha1
            out.unlink()
            self.s3.delete_object(Bucket="big-raw", Key=f"raw/v1-{n}")
            doc[str(n)] = {"put_seconds": up, "parts": parts, "get_seconds": down,
                           "identical": ok}
            log(f"transfer with {n} in flight: {doc[str(n)]}")
        return doc


def table(doc: dict[str, Any]) -> str:
    lim = doc["limit_mb"]
    lines = [f"| {doc['mb']:,} MB file, two versions | seconds | peak RSS, MB | "
             f"within {lim:.0f} MB | S3 requests |", "|---|---|---|---|---|"]
    for key, label in (("put_v1", "`deltafs put` v1 (the reference)"),
                       ("put_v2", "`deltafs put` v2 (a delta)"),
                       ("get_v2", "`deltafs get` v2, empty cache"),
                       ("mount_copy", "mount: `cp` v1 v2, until uploaded"),
                       ("mount_cold_read", "mount: cold read of v2")):
        r = doc.get(key) or {}
        if not r:
            continue
        reqs = ", ".join(f"{k} {v}" for k, v in sorted(r.get("requests", {}).items()))
        lines.append(f"| {label} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{'✓' if r['peak_rss_mb'] <= lim else '✗'} | {reqs} |")
    t = doc.get("transfer") or {}
    if t:
        lines += ["", "| one object of v1's size | parts | PUT, s | GET, s |",
                  "|---|---|---|---|"]
        for n, r in t.items():
            lines.append(f"| {n} in flight | {r['parts']} | {r['put_seconds']:.1f} | "
                         f"{r['get_seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bigfile", description=__doc__)
    p.add_argument("--mb", type=int, default=2000)
    p.add_argument("--out", default=None)
    p.add_argument("--transfer-only", action="store_true",
                   help="only step 3 (parallel parts against one stream)")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="deltafs-bigfile-"))
    run = Run(work, a.mb)
    try:
        if a.transfer_only:
            v1 = work / "big-v1.bin"
            doc = {"mb": a.mb, "limit_mb": LIMIT_MB,
                   "transfer": run.transfer(v1, make_version(v1, a.mb, 0))}
        else:
            doc = run.run()
            doc["transfer"] = run.transfer(work / "big-v1.bin", sha_file(work / "big-v1.bin"))
    finally:
        run.moto.stop()
        shutil.rmtree(work, ignore_errors=True)
    out = Path(a.out) if a.out else ROOT / "bench-results" / \
        f"{time.strftime('%Y-%m-%d')}-bigfile.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(doc))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
