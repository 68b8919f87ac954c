"""Mounts at boot (issue 4): the ``mount.deltafs`` helper behind ``mount -t deltafs`` and
fstab, config files, the systemd notify protocol, the stop/drain lifecycle and the units.

Every test that mounts needs root and /dev/fuse (marker ``mount``). Tests that must make
uploads hang run their own moto server and freeze it with SIGSTOP (the session server is
shared with other tests): a frozen server accepts connections but never answers, which
is what a stuck network looks like to the daemon.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import boto3
import pytest

from helpers import AuthMoto, bucket_objects, free_port, require_tool, wait_http
from mountfixtures import deltafs_exe, in_mount_table, logical_names, pid_alive, tail, wait_dead

from deltafs import config as dconfig
from deltafs import mounthelper
from deltafs.errors import ConfigError, UsageError

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD_DIR = ROOT / "systemd"
HELPER_LINK = Path("/sbin/mount.deltafs")

#: mount tests: skipped without root or the FUSE device (what no install can give); with
#: ``usefixtures("fuse_tools")`` a missing fusermount3 fails (scripts/setup installs it)
needs_root_fuse = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse")


def helper_exe() -> Path:
    for cand in (Path(sys.executable).parent / "mount.deltafs",
                 ROOT / ".venv" / "bin" / "mount.deltafs"):
        if cand.exists():
            return cand
    pytest.fail("the mount.deltafs console script is not installed "
                "(pip install -e . after adding it to [project.scripts])")


# ----------------------------------------------------------------------------- fixtures


class Cleanup:
    """Mountpoints to unmount and processes to kill when a test ends, whatever happened."""

    def __init__(self) -> None:
        self.mountpoints: list[Path] = []
        self.procs: list[subprocess.Popen[Any]] = []
        self.pids: list[int] = []
        self.logs: list[Path] = []

    def run(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for mp in self.mountpoints:
            if in_mount_table(mp):
                subprocess.run([*deltafs_exe(), "umount", "--timeout", "10", str(mp)],
                               capture_output=True, timeout=60)
            if in_mount_table(mp):
                subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True,
                               timeout=30)
        for pid in self.pids:
            if pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                wait_dead(pid, 10)
        for log in self.logs:
            print(f"===== {log} (tail) =====")
            print(tail(log, 60))


@pytest.fixture
def cleanup() -> Iterator[Cleanup]:
    c = Cleanup()
    try:
        yield c
    finally:
        c.run()


class OwnMoto:
    """A moto server of this test only, so it can be frozen (SIGSTOP) and thawed."""

    def __init__(self, base: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = base / "moto.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
        wait_http(self.url + "/", timeout=30)
        self.client = boto3.client("s3", endpoint_url=self.url, region_name="us-east-1")
        self.frozen = False

    def bucket(self) -> str:
        name = f"boot-{uuid.uuid4().hex[:16]}"
        self.client.create_bucket(Bucket=name)
        return name

    def freeze(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            self.proc.send_signal(signal.SIGCONT)
            self.frozen = False

    def stop(self) -> None:
        self.thaw()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def own_moto(aws_env: None, tmp_path: Path) -> Iterator[OwnMoto]:
    m = OwnMoto(tmp_path)
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
def sbin_helper() -> Iterator[Path]:
    """/sbin/mount.deltafs -> the venv's console script (created if missing, and then
    removed afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("linking /sbin/mount.deltafs needs root")
    require_tool("mount", "mount")
    created = False
    if not os.path.lexists(HELPER_LINK):
        HELPER_LINK.symlink_to(helper_exe())
        created = True
    try:
        yield HELPER_LINK
    finally:
        if created:
            HELPER_LINK.unlink(missing_ok=True)


class Notifications:
    """A datagram socket standing in for systemd's ``$NOTIFY_SOCKET``; every message is
    recorded with whether the mountpoint was live when it arrived."""

    def __init__(self, mountpoint: Path) -> None:
        # AF_UNIX paths are limited to 108 bytes: a short directory, not tmp_path
        self.dir = Path(tempfile.mkdtemp(prefix="dfsn-", dir="/tmp"))
        self.path = self.dir / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.mountpoint = mountpoint
        self.messages: list[tuple[str, bool, bool]] = []  # text, ismount, st_dev differs

    def receive(self, timeout: float) -> str | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return None
        text = data.decode()
        live = os.path.ismount(self.mountpoint)
        try:
            other_dev = os.stat(self.mountpoint).st_dev != os.stat(self.mountpoint.parent).st_dev
        except OSError:
            other_dev = False
        self.messages.append((text, live, other_dev))
        return text

    def wait_for(self, needle: str, timeout: float) -> tuple[str, bool, bool]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.receive(max(0.05, deadline - time.monotonic()))
            if text is not None and needle in text.split("\n"):
                return self.messages[-1]
        raise AssertionError(f"no {needle!r} within {timeout} s; got {self.messages!r}")

    def drain_until_exit(self, proc: subprocess.Popen[Any], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            self.receive(0.2)
        while self.receive(0.05) is not None:
            pass

    def texts(self) -> list[str]:
        return [line for text, _, _ in self.messages for line in text.split("\n")]

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def foreground(source: str, mnt: Path, cache: Path, endpoint: str, *extra: str,
               env: dict[str, str] | None = None, log: Path | None = None
               ) -> subprocess.Popen[Any]:
    """``deltafs mount --foreground`` as systemd's Type=notify service would run it."""
    argv = [*deltafs_exe(), "mount", "--foreground", source, str(mnt), "--cache-dir",
            str(cache), "--endpoint-url", endpoint, *extra]
    out = open(log, "ab") if log is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                env=env if env is not None else os.environ.copy())
    finally:
        if log is not None:
            out.close()  # type: ignore[union-attr]


def wait_mounted(mnt: Path, proc: subprocess.Popen[Any] | None = None,
                 timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.ismount(mnt):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the daemon exited ({proc.returncode}) before mounting")
        if time.monotonic() > deadline:
            raise AssertionError(f"{mnt} not mounted within {timeout} s")
        time.sleep(0.05)


def daemon_status(mnt: Path) -> dict[str, Any]:
    """The daemon's status JSON (``user.deltafs.status`` on the mount's root)."""
    data: dict[str, Any] = json.loads(os.getxattr(mnt, "user.deltafs.status"))
    return data


def run_cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*deltafs_exe(), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def bucket_file(endpoint: str, bucket: str, key: str, tmp: Path) -> bytes:
    """A logical file read straight from the bucket (a fresh cache: no mount involved)."""
    from deltafs import DeltaService

    svc = DeltaService(bucket=bucket, endpoint_url=endpoint, cache_dir=tmp / "svc-cache")
    out = tmp / f"from-bucket-{uuid.uuid4().hex[:8]}"
    svc.get(key, out)
    return out.read_bytes()


# ------------------------------------------------------------ option and config parsing


def test_helper_argv_follows_mount8_convention() -> None:
    inv = mounthelper.parse_argv(["s3://b/p", "/mnt/x", "-o", "ro,cache_dir=/c", "-f", "-n",
                                  "-s", "-v"])
    assert inv is not None
    assert (inv.source, inv.mountpoint, inv.options) == ("s3://b/p", "/mnt/x",
                                                         ["ro,cache_dir=/c"])
    assert inv.fake and inv.no_mtab and inv.sloppy and inv.verbose
    inv = mounthelper.parse_argv(["-fv", "-oallow_other", "src", "/m", "-t", "deltafs"])
    assert inv is not None and inv.fake and inv.verbose and not inv.sloppy
    assert inv.options == ["allow_other"]
    with pytest.raises(UsageError):
        mounthelper.parse_argv(["only-one"])
    with pytest.raises(UsageError):
        mounthelper.parse_argv(["s", "/m", "-x"])
    with pytest.raises(UsageError):
        mounthelper.parse_argv(["s", "/m", "-t", "nfs"])


def test_option_strings_map_drop_pass_and_reject() -> None:
    o = dconfig.parse_options([
        "rw,nosuid,nodev,noexec,_netdev,nofail,defaults,noauto,user,users,"
        "x-systemd.mount-timeout=30,x-systemd.automount,comment=systemd.automount,"
        "allow_other,auto_unmount,noatime,nodiratime,cache_dir=/var/cache/x,cache-size=20G,"
        "endpoint_url=http://h:9000,region=eu-west-1,profile=p,upload_concurrency=8,"
        "max_ratio=0.5,log_file=syslog,listing_ttl=5,drain_timeout=7,config=rel"])
    s = o.settings
    assert s["cache_dir"] == "/var/cache/x" and s["cache_size"] == 20 << 30
    assert s["endpoint_url"] == "http://h:9000" and s["region"] == "eu-west-1"
    assert s["profile"] == "p" and s["upload_concurrency"] == 8 and s["max_ratio"] == 0.5
    assert s["log_file"] == "syslog" and s["listing_ttl"] == 5 and s["drain_timeout"] == 7
    assert s["allow_other"] is True and s["config"] == "rel" and "read_only" not in s
    assert o.fuse == ["nosuid", "nodev", "noexec", "auto_unmount", "noatime"]
    assert "nodiratime" in o.dropped  # libfuse 3 refuses it
    assert set(o.dropped) >= {"_netdev", "nofail", "defaults", "noauto", "user", "users",
                              "x-systemd.mount-timeout=30", "comment=systemd.automount"}
    assert dconfig.parse_options(["ro"]).settings["read_only"] is True
    assert dconfig.parse_options(["rw,read_only"]).settings["read_only"] is True
    assert dconfig.parse_options(["log=journal"]).settings["log_file"] == "syslog"
    for bad in ("ro,rw", "cache_dir=/a,cache_dir=/b", "nosuid,suid", "bogus",
                "max_ratio=2", "upload_concurrency=0", "cache_size=lots",
                "aws_secret_access_key=abc", "secret_key=abc", "cache_dir", "config="):
        with pytest.raises(UsageError) as err:
            dconfig.parse_options([bad])
        assert err.value.exit_code == 2, bad
    sloppy = dconfig.parse_options(["bogus,cache_dir=/c"], sloppy=True)
    assert sloppy.ignored == ["bogus"] and sloppy.settings == {"cache_dir": "/c"}


def test_config_file_settings_and_command_line_wins(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dconfig.CONFIG_DIR_ENV, str(tmp_path))
    (tmp_path / "mnt").mkdir()
    (tmp_path / "rel.toml").write_text(
        'source = "s3://from-file/pre"\n'
        f'mountpoint = "{tmp_path}/mnt"\n'
        'endpoint = "http://file:9000"\n'
        'region = "eu-central-1"\n'
        'cache_dir = "/var/cache/from-file"\n'
        'cache_size = "3G"\n'
        'upload_concurrency = 2\n'
        'max_ratio = 0.6\n'
        'log_file = "journal"\n'
        'allow_other = true\n'
        'fuse_options = ["noexec"]\n')
    cfg, _, ref = mounthelper.resolve(mounthelper.Invocation(
        "s3://from-cli/x", "/mnt/cli", ["config=rel,cache_dir=/c/cli,upload_concurrency=6"]))
    assert ref == "rel"
    assert str(cfg.source) == "s3://from-cli/x" and str(cfg.mountpoint) == "/mnt/cli"
    assert str(cfg.cache_dir) == "/c/cli" and cfg.upload_concurrency == 6  # cli wins
    assert cfg.endpoint_url == "http://file:9000" and cfg.region == "eu-central-1"
    assert cfg.cache_size == 3 << 30 and cfg.max_ratio == 0.6 and cfg.log_file == "syslog"
    assert cfg.allow_other and cfg.fuse_options == ["noexec"]
    # SOURCE may be the config's bare name; its source and settings apply
    cfg, _, ref = mounthelper.resolve(mounthelper.Invocation("rel", "/mnt/y", ["rw"]))
    assert ref == "rel" and str(cfg.source) == "s3://from-file/pre"
    assert str(cfg.mountpoint) == "/mnt/y" and str(cfg.cache_dir) == "/var/cache/from-file"
    # what cannot work is a config error (exit 2), named with its file
    for text, needle in [('secret_key = "x"\n', "secret"),
                         ('aws_secret_access_key = "x"\n', "credentials_file"),
                         ('colour = "red"\n', "unknown setting 'colour'"),
                         ('cache_dir = "relative"\n', "absolute"),
                         ('max_ratio = 3\n', "max_ratio"),
                         ('source = \n', "not valid TOML"),
                         ('[mount]\nsource = "s3://b"\n', "tables"),
                         ('fuse_options = ["max_read=4096"]\n', "not a FUSE option")]:
        (tmp_path / "bad.toml").write_text(text)
        with pytest.raises(ConfigError) as err:
            dconfig.load_file("bad")
        assert err.value.exit_code == 2
        assert needle in str(err.value) and str(tmp_path / "bad.toml") in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        dconfig.load_file("missing")


def test_helper_fake_mount_validates_and_mounts_nothing(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    exe = str(helper_exe())
    res = subprocess.run([exe, "s3://some-bucket/p", str(mnt), "-f", "-v", "-o",
                          "_netdev,nofail,allow_other,cache_dir=/tmp/x,endpoint_url=http://h"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert "would mount s3://some-bucket/p on" in res.stderr
    assert "dropped (for mount/systemd only): _netdev,nofail" in res.stderr
    assert not in_mount_table(mnt)
    res = subprocess.run([exe, "s3://b", str(mnt), "-f", "-o", "ro,rw"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "contradictory mount options 'ro' and 'rw'" in res.stderr
    res = subprocess.run([exe, "s3://b", str(mnt), "-f", "-o", "frobnicate"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "unknown mount option 'frobnicate'" in res.stderr
    res = subprocess.run([exe, "s3://b", str(mnt), "-f", "-s", "-o", "frobnicate"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


# --------------------------------------------------------------------- mount -t deltafs


@pytest.mark.mount
@needs_root_fuse
@pytest.mark.usefixtures("fuse_tools")
def test_mount_t_deltafs_with_fstab_options(sbin_helper: Path, moto_server: str, bucket: str,
                                            tmp_path: Path, cleanup: Cleanup) -> None:
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    cleanup.mountpoints.append(mnt)
    cleanup.logs.append(cache / "deltafs.log")
    # mount(8) runs /sbin/mount.deltafs with its own environment: the AWS_* credentials
    # the test session set reach the helper (and its daemon) that way
    opts = (f"_netdev,nofail,allow_other,cache_dir={cache},endpoint_url={moto_server},"
            "x-systemd.mount-timeout=30,noauto,comment=test")
    t0 = time.monotonic()
    res = subprocess.run(["mount", "-t", "deltafs", f"s3://{bucket}", str(mnt), "-o", opts],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"mount failed ({res.returncode}): {res.stderr}"
    # the helper returned only once the mount was live
    assert os.path.ismount(mnt), "mount returned 0 but nothing is mounted"
    assert time.monotonic() - t0 < 30
    line = next(line for line in open("/proc/self/mounts") if f" {mnt} " in line)
    assert " fuse.deltafs " in line and "allow_other" in line, line
    pid = int(daemon_status(mnt)["pid"])
    cleanup.pids.append(pid)

    rng = random.Random(4)
    files = {f"f{i}.bin": rng.randbytes(150_000 + i) for i in range(4)}
    files["note.txt"] = b"hello from fstab\n"
    for name, data in files.items():
        (mnt / name).write_bytes(data)
    for name, data in files.items():
        assert (mnt / name).read_bytes() == data
    res = run_cli("umount", str(mnt))
    assert res.returncode == 0, res.stderr
    assert not in_mount_table(mnt)
    assert not pid_alive(pid)
    # everything is in the bucket the moment `deltafs umount` returns
    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    names = logical_names(bucket_objects(client, bucket), "")
    assert set(files) <= set(names), names
    assert bucket_file(moto_server, bucket, "f2.bin", tmp_path) == files["f2.bin"]
    assert bucket_file(moto_server, bucket, "note.txt", tmp_path) == files["note.txt"]


# ------------------------------------------------------------------ mount-time failures


@pytest.mark.mount
@needs_root_fuse
@pytest.mark.usefixtures("fuse_tools")
@pytest.mark.parametrize("case", ["no-bucket", "unreachable", "no-mountpoint",
                                  "no-credentials", "wrong-credentials",
                                  "bad-credentials-file"])
def test_helper_fails_fast_with_the_reason(case: str, moto_server: str, bucket: str,
                                           tmp_path: Path,
                                           request: pytest.FixtureRequest) -> None:
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    env = os.environ.copy()
    source, endpoint, opts = f"s3://{bucket}", moto_server, []
    # no credentials at all (boto3 refuses to sign: exit 6), a key pair S3 refuses (a
    # moto that checks signatures: exit 6) and a credentials_file that cannot work
    # (exit 2); a wrong bucket and an unreachable endpoint stand for what a real S3
    # would refuse
    if case == "no-bucket":
        source, code, reason = "s3://no-such-bucket-for-deltafs", 5, "does not exist"
    elif case == "unreachable":
        endpoint = f"http://127.0.0.1:{free_port()}"
        code, reason = 7, "cannot reach S3 endpoint"
    elif case == "no-mountpoint":
        mnt = tmp_path / "missing"
        code, reason = 10, "does not exist (create it with mkdir)"
    elif case == "no-credentials":
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.pop(name, None)
        env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
        code, reason = 6, "no usable AWS credentials"
    elif case == "wrong-credentials":
        auth: AuthMoto = request.getfixturevalue("moto_auth_server")
        source, endpoint = f"s3://{auth.bucket}", auth.url
        env.update(auth.env(auth.wrong("wrong-secret")))
        code, reason = 6, "access denied"
    else:
        creds = tmp_path / "creds"
        creds.write_text("[other]\naws_access_key_id = a\naws_secret_access_key = b\n")
        opts = [f"credentials_file={creds}"]
        code, reason = 2, "has no [default] section"
    argv = [str(helper_exe()), source, str(mnt), "-o",
            ",".join([f"cache_dir={cache}", f"endpoint_url={endpoint}", "_netdev", *opts])]
    t0 = time.monotonic()
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    elapsed = time.monotonic() - t0
    try:
        assert res.returncode == code, (res.returncode, res.stderr)
        assert reason in res.stderr, res.stderr
        assert res.stderr.startswith("deltafs: ") and "Traceback" not in res.stderr
        assert elapsed < 15, f"took {elapsed:.1f} s"
        assert not in_mount_table(mnt)
    finally:
        if in_mount_table(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


@pytest.mark.mount
@needs_root_fuse
@pytest.mark.usefixtures("fuse_tools")
def test_busy_mountpoint_cache_in_use_and_stale_mount(moto_server: str, bucket: str,
                                                     tmp_path: Path, cleanup: Cleanup) -> None:
    mnt, cache, other = tmp_path / "mnt", tmp_path / "cache", tmp_path / "other"
    mnt.mkdir()
    other.mkdir()
    cleanup.mountpoints += [mnt, other]
    exe = str(helper_exe())

    def helper(mp: Path, cache_dir: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, f"s3://{bucket}", str(mp), "-o",
                               f"cache_dir={cache_dir},endpoint_url={moto_server}"],
                              capture_output=True, text=True, timeout=60)

    res = helper(mnt, cache)
    assert res.returncode == 0, res.stderr
    pid = int(daemon_status(mnt)["pid"])
    cleanup.pids.append(pid)
    res = helper(mnt, tmp_path / "cache2")
    assert res.returncode == 10 and "is already a mountpoint" in res.stderr, res.stderr
    res = helper(other, cache)
    assert res.returncode == 11 and "is in use by another deltafs mount" in res.stderr
    assert not in_mount_table(other)
    # a daemon that died leaves a dead mount behind: named as such, with its own code
    os.kill(pid, signal.SIGKILL)
    assert wait_dead(pid, 10)
    res = helper(mnt, cache)
    assert res.returncode == 13 and "holds a stale mount" in res.stderr, res.stderr
    res = run_cli("status", str(mnt))
    assert res.returncode == 13 and f"{mnt} is a stale mount" in res.stderr \
        and f"deltafs umount {mnt}" in res.stderr, res.stderr
    res = run_cli("umount", "--stale", str(mnt))
    assert res.returncode == 0 and not in_mount_table(mnt), res.stderr
    res = helper(mnt, cache)
    assert res.returncode == 0, res.stderr
    pid = int(daemon_status(mnt)["pid"])
    cleanup.pids.append(pid)
    # plain umount of a dead daemon's mount names it and removes it (issue 13)
    os.kill(pid, signal.SIGKILL)
    assert wait_dead(pid, 10)
    res = run_cli("umount", str(mnt))
    assert res.returncode == 0 and f"{mnt} was a stale mount" in res.stderr \
        and "removed the stale mount" in res.stderr, res.stderr
    assert not in_mount_table(mnt)


@pytest.mark.mount
@needs_root_fuse
@pytest.mark.usefixtures("fuse_tools")
def test_config_file_with_credentials_file(moto_server: str, bucket: str, tmp_path: Path,
                                           cleanup: Cleanup) -> None:
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    cleanup.mountpoints.append(mnt)
    cleanup.logs.append(tmp_path / "daemon.log")
    creds = tmp_path / "creds"
    creds.write_text("[backup]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    creds.chmod(0o600)
    conf = tmp_path / "rel.toml"
    conf.write_text(f'source = "s3://{bucket}/rel"\nmountpoint = "{mnt}"\n'
                    f'endpoint_url = "{moto_server}"\ncache_dir = "{cache}"\n'
                    f'credentials_file = "{creds}"\nprofile = "backup"\n'
                    f'log_file = "{tmp_path}/daemon.log"\nupload_concurrency = 2\n')
    # no credentials anywhere but the file the config names
    env = os.environ.copy()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(name, None)
    env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    res = run_cli("mount", "--config", str(conf), env=env)
    assert res.returncode == 0, res.stderr
    assert os.path.ismount(mnt)
    cleanup.pids.append(int(daemon_status(mnt)["pid"]))
    (mnt / "a.txt").write_bytes(b"via config\n")
    res = run_cli("umount", "--config", str(conf), env=env)  # MOUNTPOINT from the file
    assert res.returncode == 0, res.stderr
    assert not in_mount_table(mnt)
    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    assert "rel/a.txt" in bucket_objects(client, bucket)
    # without the file, the same environment has no credentials: exit 6, nothing mounted
    conf.write_text(conf.read_text().replace(f'credentials_file = "{creds}"\n', "")
                    .replace('profile = "backup"\n', ""))
    res = run_cli("mount", "--config", str(conf), env=env)
    assert res.returncode == 6 and "no usable AWS credentials" in res.stderr, res.stderr
    assert not in_mount_table(mnt)


# ---------------------------------------------------------- notify, signals, lifecycle


@pytest.mark.mount
@needs_root_fuse
@pytest.mark.usefixtures("fuse_tools")
def test_notify_ready_after_stat_and_status_while_draining(own_moto: OwnMoto, tmp_path: Path,
                                                          cleanup: Cleanup) -> None:
    bucket = own_moto.bucket()
    mnt, cache, log = tmp_path / "mnt", tmp_path / "cache", tmp_path / "daemon.log"
    mnt.mkdir()
    cleanup.mountpoints.append(mnt)
    cleanup.logs.append(log)
    notes = Notifications(mnt)
    try:
        env = os.environ.copy()
        env["NOTIFY_SOCKET"] = str(notes.path)
        drain = 3.0
        proc = foreground(f"s3://{bucket}", mnt, cache, own_moto.url, "--drain-timeout",
                          str(drain), "--listing-ttl", "600", env=env, log=log)
        cleanup.procs.append(proc)
        _, live, other_dev = notes.wait_for("READY=1", 30)
        assert live and other_dev, f"READY=1 came before the mountpoint answered: {notes.messages}"
        assert all(m[1] for m in notes.messages), "a message said ready before the mount"
        os.listdir(mnt)  # the root listing is fresh: no S3 needed to create files in it
        own_moto.freeze()  # uploads now hang
        for i in range(3):
            (mnt / f"p{i}.bin").write_bytes(os.urandom(100_000))
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        notes.drain_until_exit(proc, drain + 20)
        elapsed = time.monotonic() - t0
        assert proc.returncode == 0, (proc.returncode, tail(log))
        assert elapsed < drain + 6, f"exited after {elapsed:.1f} s (bound {drain} s)"
        texts = notes.texts()
        assert "STOPPING=1" in texts, texts
        draining = [t for t in texts if t.startswith("STATUS=draining:")]
        assert draining, texts
        counts = [int(re.match(r"STATUS=draining: (\d+) pending", t).group(1))  # type: ignore[union-attr]
                  for t in draining]
        assert max(counts) >= 3, draining
        assert not in_mount_table(mnt)
    finally:
        own_moto.thaw()
        notes.close()


@pytest.mark.mount
@needs_root_fuse
@pytest.mark.usefixtures("fuse_tools")
def test_sigterm_during_copy_exits_in_bound_and_next_mount_replays(
        own_moto: OwnMoto, tmp_path: Path, cleanup: Cleanup) -> None:
    bucket = own_moto.bucket()
    mnt, cache, log = tmp_path / "mnt", tmp_path / "cache", tmp_path / "daemon.log"
    mnt.mkdir()
    cleanup.mountpoints.append(mnt)
    cleanup.logs += [log, cache / "deltafs.log"]
    drain = 3.0
    proc = foreground(f"s3://{bucket}", mnt, cache, own_moto.url, "--drain-timeout",
                      str(drain), "--listing-ttl", "600", log=log)
    cleanup.procs.append(proc)
    wait_mounted(mnt, proc)
    (mnt / "early.txt").write_bytes(b"uploaded before the freeze\n")
    deadline = time.monotonic() + 20
    # (the kernel sends RELEASE after close() returns: wait for the object, not only for
    # an empty queue)
    while "early.txt" not in bucket_objects(own_moto.client, bucket) or \
            daemon_status(mnt)["pending_files"]:
        assert time.monotonic() < deadline, "early.txt never uploaded"
        time.sleep(0.1)
    os.listdir(mnt)
    own_moto.freeze()  # from here on, uploads hang: the drain cannot finish them

    written: dict[str, bytes] = {}  # files whose close() succeeded
    errors: list[BaseException] = []
    started = threading.Event()
    rng = random.Random(7)
    payloads = [rng.randbytes(256 * 1024 + i) for i in range(40)]

    def copy() -> None:
        try:
            for i, data in enumerate(payloads):
                name = f"copy{i:02d}.bin"
                with open(mnt / name, "wb") as f:
                    for off in range(0, len(data), 64 * 1024):
                        f.write(data[off:off + 64 * 1024])
                        started.set()
                        time.sleep(0.01)
                written[name] = data
        except OSError as exc:  # EROFS once the daemon stops taking writes
            errors.append(exc)

    t = threading.Thread(target=copy, daemon=True)
    t.start()
    try:
        assert started.wait(10)
        while len(written) < 3:
            time.sleep(0.02)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # mid-file: copy03 is being written
        proc.wait(drain + 20)
        elapsed = time.monotonic() - t0
        t.join(30)
        assert proc.returncode == 0, (proc.returncode, tail(log))
        assert elapsed < drain + 6, f"exited after {elapsed:.1f} s (bound {drain} s)"
        assert errors, "the copy never noticed the stop"
        assert len(written) < len(payloads)
        assert "still pending; the next mount uploads them" in log.read_text() or \
            "exiting now; the journal keeps what is pending" in log.read_text(), tail(log)
        assert not in_mount_table(mnt)
    finally:
        own_moto.thaw()
    # same cache directory: the journal replays what was pending
    res = run_cli("mount", f"s3://{bucket}", str(mnt), "--cache-dir", str(cache),
                  "--endpoint-url", own_moto.url)
    assert res.returncode == 0, res.stderr
    cleanup.pids.append(int(daemon_status(mnt)["pid"]))
    assert "replaying" in (cache / "deltafs.log").read_text()
    for name, data in written.items():
        assert (mnt / name).read_bytes() == data, name
    assert (mnt / "early.txt").read_bytes() == b"uploaded before the freeze\n"
    res = run_cli("umount", str(mnt))
    assert res.returncode == 0, res.stderr
    names = logical_names(bucket_objects(own_moto.client, bucket), "")
    assert set(written) | {"early.txt"} <= set(names), (sorted(written), sorted(names))
    for name in list(written)[-2:]:
        assert bucket_file(own_moto.url, bucket, name, tmp_path) == written[name]


@pytest.mark.mount
@needs_root_fuse
@pytest.mark.usefixtures("fuse_tools")
def test_sigusr1_dumps_every_stack_to_the_log(moto_server: str, bucket: str, tmp_path: Path,
                                               cleanup: Cleanup) -> None:
    mnt, cache, log = tmp_path / "mnt", tmp_path / "cache", tmp_path / "daemon.log"
    mnt.mkdir()
    cleanup.mountpoints.append(mnt)
    proc = foreground(f"s3://{bucket}", mnt, cache, moto_server, "--log-file", str(log))
    cleanup.procs.append(proc)
    wait_mounted(mnt, proc)
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    main_stack = re.compile(r'File ".*daemon\.py", line \d+ in serve')
    while not main_stack.search(log.read_text(errors="replace")):  # the main thread's stack
        assert time.monotonic() < deadline, tail(log)
        time.sleep(0.05)
    text = log.read_text(errors="replace")
    assert text.count("most recent call first") >= 2, "only one thread dumped"
    assert proc.poll() is None, "SIGUSR1 must not stop the daemon"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert not in_mount_table(mnt)


# ------------------------------------------------------------------------ systemd units


def test_systemd_analyze_verify_accepts_every_unit(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    units = sorted(p for p in SYSTEMD_DIR.iterdir()
                   if p.suffix in (".service", ".mount", ".automount", ".socket", ".timer"))
    kinds = {p.suffix for p in units}
    assert {".service", ".mount"} <= kinds, units
    service = (SYSTEMD_DIR / "deltafs@.service").read_text()
    assert re.search(r"^Type=notify$", service, re.M)
    assert re.search(r"^ExecStop=.*deltafs umount", service, re.M)
    # the units run /usr/local/bin/deltafs (README: link it there); verify checks it exists
    link = Path("/usr/local/bin/deltafs")
    created = False
    if not os.path.lexists(link):
        if os.geteuid() != 0:
            pytest.skip("needs /usr/local/bin/deltafs (or root to link it)")
        link.symlink_to(Path(deltafs_exe()[0]))
        created = True
    try:
        res = subprocess.run([analyze, "verify", "--man=no", *map(str, units)],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
    finally:
        if created:
            link.unlink(missing_ok=True)
    ours = [line for line in (res.stdout + res.stderr).splitlines()
            if any(p.name in line or p.stem.rstrip("@") + "@" in line for p in units)]
    assert res.returncode == 0, res.stdout + res.stderr
    assert not ours, ours


def test_docs_cover_every_mount_exit_code() -> None:
    from deltafs import daemon, metrics

    readme = (ROOT / "README.md").read_text()
    trouble = (ROOT / "TROUBLESHOOTING.md").read_text()
    for code in (2, 5, 6, 7, daemon.EXIT_MOUNTPOINT, daemon.EXIT_CACHE, daemon.EXIT_FUSE,
                 daemon.EXIT_STALE, metrics.EXIT_METRICS):
        assert re.search(rf"^\| {code} \|", readme, re.M), f"exit {code} not in README"
        assert re.search(rf"\bexit {code}\b", trouble), f"exit {code} not in TROUBLESHOOTING"
    for message in ("holds a stale mount", "is already a mountpoint", "does not exist (create it",
                    "is in use by another deltafs mount", "no usable AWS credentials",
                    "cannot reach S3 endpoint", "unknown mount option",
                    "contradictory mount options"):
        assert message in trouble, message
