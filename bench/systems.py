"""The systems under test, each driven through its own command line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]


def in_mount_table(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1].replace("\\040", " ") == target for line in f)


def wait_for(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class Ctx:
    """What every system needs: the S3 endpoint, a clean environment, a work directory
    and the driver's own S3 client (not counted by the request counter)."""

    def __init__(self, endpoint: str, work: Path, env: dict[str, str], s3: Any) -> None:
        self.endpoint = endpoint
        self.work = work
        self.env = env
        self.s3 = s3

    def objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        out: dict[str, int] = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                      Prefix=prefix):
            for o in page.get("Contents", []):
                out[o["Key"]] = o["Size"]
        return out


class System:
    name = ""
    label = ""
    kind = "mount"          # mount | cli | local
    #: stores files whole, so its storage equals the plain copy's
    plain = True

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.base = ctx.work / self.name
        self.base.mkdir(parents=True, exist_ok=True)
        self.mnt = self.base / "mnt"
        self.cache = self.base / "cache"
        self.log = self.base / "daemon.log"
        self.bucket = ""

    def why_unavailable(self) -> str | None:
        return None

    def version(self) -> str:
        return ""

    # mount systems -------------------------------------------------------------
    def mount(self, bucket: str) -> None:
        raise NotImplementedError

    def pids(self) -> list[int]:
        return []

    def finish_uploads_and_unmount(self, expect: dict[str, int] | None = None) -> None:
        """Return once everything written is in the bucket and the mount is gone."""
        self.unmount()

    def unmount(self) -> None:
        raise NotImplementedError

    def wipe_cache(self) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)

    def force_cleanup(self) -> None:
        if in_mount_table(self.mnt):
            subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)


class Deltafs(System):
    name = label = "deltafs"
    plain = False

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(ctx)
        self.exe = str(ROOT / ".venv" / "bin" / "deltafs")
        if not Path(self.exe).exists():
            self.exe = shutil.which("deltafs") or self.exe
        self.pid = 0
        self.logs: list[Path] = []

    def why_unavailable(self) -> str | None:
        return None if Path(self.exe).exists() else f"{self.exe} missing (run scripts/setup)"

    def version(self) -> str:
        res = subprocess.run([sys.executable, "-c",
                              "import importlib.metadata as m; print(m.version('deltafs'))"],
                             capture_output=True, text=True)
        return res.stdout.strip()

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(os.getxattr(self.mnt, "user.deltafs.status"))
        return data

    def mount(self, bucket: str) -> None:
        self.bucket = bucket
        self.mount_source(f"s3://{bucket}", ["--endpoint-url", self.ctx.endpoint])

    def mount_source(self, source: str, options: list[str], timeout: float = 120) -> None:
        """``deltafs mount SOURCE`` on this system's mountpoint and cache dir."""
        self.mnt.mkdir(parents=True, exist_ok=True)
        argv = [self.exe, "mount", source, str(self.mnt), "--cache-dir", str(self.cache),
                *options]
        res = subprocess.run(argv, capture_output=True, text=True, env=self.ctx.env,
                             timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"deltafs mount failed ({res.returncode}): "
                               f"{res.stderr.strip()}\n{tail(self.cache / 'deltafs.log')}")
        self.pid = int(self.status()["pid"])

    def pids(self) -> list[int]:
        return [self.pid] if self.pid else []

    def last_status(self) -> dict[str, Any]:
        try:
            return self.status()
        except OSError:
            return {}

    def finish_uploads_and_unmount(self, expect: dict[str, int] | None = None) -> None:
        # what `deltafs umount` does first, polled here to keep the daemon's final counts
        def idle() -> bool:
            st = self.status()
            self.status_at_unmount = st
            return st["pending_files"] == 0 and st.get("uploading", 0) == 0
        wait_for(idle, 3600, "deltafs's uploads", interval=0.2)
        self.unmount()

    def unmount(self) -> None:
        res = subprocess.run([self.exe, "umount", str(self.mnt)], capture_output=True,
                             text=True, env=self.ctx.env, timeout=3600)
        if res.returncode != 0:
            raise RuntimeError(f"deltafs umount failed ({res.returncode}): "
                               f"{res.stderr.strip()}\n{tail(self.cache / 'deltafs.log')}")
        self.pid = 0

    def wipe_cache(self) -> None:
        log = self.cache / "deltafs.log"
        if log.exists():
            keep = self.base / f"deltafs-{len(self.logs)}.log"
            shutil.copy(log, keep)
            self.logs.append(keep)
        super().wipe_cache()


class DeltafsStrict(Deltafs):
    """deltafs in DeltaGlider's format (``--format deltaglider``): every delta against
    the directory's first file, no extension objects. The baseline chains must beat
    on storage without losing more than half the read speed (issue 10)."""

    name = "deltafs-dg"
    label = "deltafs --format deltaglider"

    def mount(self, bucket: str) -> None:
        self.bucket = bucket
        self.mount_source(f"s3://{bucket}", ["--endpoint-url", self.ctx.endpoint,
                                             "--format", "deltaglider"])


class ForegroundMount(System):
    """A peer whose mount is a foreground daemon we start and watch (s3fs, rclone)."""

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(ctx)
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, bucket: str, argv: list[str], env: dict[str, str]) -> None:
        """Start the daemon and return once the mountpoint answers (or raise why not)."""
        self.bucket = bucket
        self.mnt.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for(lambda: in_mount_table(self.mnt) or self.proc.poll() is not None,  # type: ignore[union-attr]
                     30, f"{self.name} to mount")
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {tail(self.log)}")
            os.stat(self.mnt)
        except BaseException:
            self.force_cleanup()
            raise

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc and self.proc.poll() is None else []

    def _reap(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class S3fs(ForegroundMount):
    name = label = "s3fs"

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(ctx)
        self.pw = self.base / "passwd"
        self.pw.write_text(f"{ctx.env['AWS_ACCESS_KEY_ID']}:{ctx.env['AWS_SECRET_ACCESS_KEY']}\n")
        self.pw.chmod(0o600)

    def why_unavailable(self) -> str | None:
        return None if shutil.which("s3fs") else "s3fs is not installed (apt-get install s3fs)"

    def version(self) -> str:
        res = subprocess.run(["s3fs", "--version"], capture_output=True, text=True)
        return (res.stdout.splitlines() or [""])[0]

    def mount(self, bucket: str) -> None:
        self._spawn(bucket, ["s3fs", bucket, str(self.mnt), "-f", "-o",
                             f"url={self.ctx.endpoint}", "-o", "use_path_request_style",
                             "-o", f"passwd_file={self.pw}"], self.ctx.env)

    def unmount(self) -> None:
        # s3fs uploads a file when it is closed: once cp returned, the data is in the bucket
        res = subprocess.run(["umount", str(self.mnt)], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"umount {self.mnt}: {res.stderr.strip()}")
        if self.proc:
            self.proc.wait(timeout=120)
            self.proc = None

    def force_cleanup(self) -> None:
        super().force_cleanup()
        self._reap()


class Rclone(ForegroundMount):
    name = label = "rclone"

    def __init__(self, ctx: Ctx, rc_port: int) -> None:
        super().__init__(ctx)
        self.rc = f"http://127.0.0.1:{rc_port}"
        self.rc_port = rc_port
        self.conf = self.base / "rclone.conf"
        self.conf.write_text(
            "[bench]\ntype = s3\nprovider = Other\n"
            f"access_key_id = {ctx.env['AWS_ACCESS_KEY_ID']}\n"
            f"secret_access_key = {ctx.env['AWS_SECRET_ACCESS_KEY']}\n"
            f"endpoint = {ctx.endpoint}\nregion = us-east-1\n")
        # rclone's AWS SDK refuses a custom CA bundle on its plain-HTTP transport
        self.env = {k: v for k, v in ctx.env.items() if k != "AWS_CA_BUNDLE"}

    def why_unavailable(self) -> str | None:
        return None if shutil.which("rclone") else "rclone is not installed (apt-get install rclone)"

    def version(self) -> str:
        res = subprocess.run(["rclone", "version"], capture_output=True, text=True)
        return (res.stdout.splitlines() or [""])[0]

    def mount(self, bucket: str) -> None:
        self._spawn(bucket, ["rclone", "--config", str(self.conf), "mount", f"bench:{bucket}",
                             str(self.mnt), "--vfs-cache-mode", "writes", "--cache-dir",
                             str(self.cache), "--rc", "--rc-addr",
                             f"127.0.0.1:{self.rc_port}", "--rc-no-auth"], self.env)

    def vfs_stats(self) -> dict[str, Any]:
        req = urllib.request.Request(self.rc + "/vfs/stats", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            data: dict[str, Any] = json.load(r)
        return data

    def finish_uploads_and_unmount(self, expect: dict[str, int] | None = None) -> None:
        def done() -> bool:
            dc = self.vfs_stats().get("diskCache", {})
            if dc.get("uploadsInProgress", 0) or dc.get("uploadsQueued", 0):
                return False
            if expect is None:
                return True
            have = self.ctx.objects(self.bucket)
            return all(have.get(k) == v for k, v in expect.items())
        wait_for(done, 3600, "rclone's uploads", interval=0.1)
        self.unmount()

    def unmount(self) -> None:
        res = subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True,
                             text=True)
        if res.returncode != 0:
            raise RuntimeError(f"fusermount3 -u {self.mnt}: {res.stderr.strip()}")
        if self.proc:
            self.proc.wait(timeout=300)
            self.proc = None

    def force_cleanup(self) -> None:
        if in_mount_table(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        self._reap()


class DeltaGlider(System):
    """``deltaglider cp`` of each file up, ``cp -r`` down (its CLI's reference cache lives
    as long as the process)."""
    name = "deltaglider"
    label = "deltaglider"
    kind = "cli"
    plain = False

    def __init__(self, ctx: Ctx, name: str = "deltaglider", label: str = "deltaglider") -> None:
        self.name, self.label = name, label
        super().__init__(ctx)
        self.exe = str(ROOT / ".venv" / "bin" / "deltaglider")
        self.env = dict(ctx.env, AWS_ENDPOINT_URL=ctx.endpoint, DG_SUPPRESS_DEPRECATION="1",
                        DG_LOG_LEVEL="WARNING")
        self.proc: subprocess.Popen[bytes] | None = None

    def why_unavailable(self) -> str | None:
        return None if Path(self.exe).exists() else f"{self.exe} missing (pip install deltaglider==6.2.0)"

    def version(self) -> str:
        res = subprocess.run([sys.executable, "-c",
                              "import importlib.metadata as m; print(m.version('deltaglider'))"],
                             capture_output=True, text=True)
        return res.stdout.strip()

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc and self.proc.poll() is None else []

    def cp(self, src: str, dst: str, recursive: bool = True) -> None:
        argv = [self.exe, "cp", *(["-r"] if recursive else []), "-q", src, dst]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env)
            rc = self.proc.wait()
        if rc != 0:
            raise RuntimeError(f"{' '.join(argv[1:])} exited {rc}: {tail(self.log)}")


class Local(System):
    name = label = "local"
    kind = "local"


def make_systems(ctx: Ctx, rc_port: int, names: Sequence[str]) -> list[System]:
    table: dict[str, Callable[[], System]] = {
        "deltafs": lambda: Deltafs(ctx),
        "deltafs-dg": lambda: DeltafsStrict(ctx),
        "deltaglider": lambda: DeltaGlider(ctx),
        "deltaglider-zip": lambda: DeltaGlider(ctx, "deltaglider-zip", "deltaglider as .zip"),
        "s3fs": lambda: S3fs(ctx),
        "rclone": lambda: Rclone(ctx, rc_port),
        "local": lambda: Local(ctx),
    }
    return [table[n]() for n in names]
