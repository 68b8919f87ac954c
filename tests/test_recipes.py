"""Issue 13: every recipe in the README runs as written.

The blocks are taken from README.md by their ``<!-- recipe: NAME -->`` marker and run by
bash (or python) with only what a user's environment would hold: ``AWS_ENDPOINT_URL``
and credentials for the session's moto server, ``BUCKET``, and the venv on ``PATH``.
A recipe that changes in the README is tested as changed; a marker that disappears
fails the test that needs it."""
from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import boto3
import pytest

from helpers import bucket_objects
from mountfixtures import release_versions

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def recipe(name: str) -> tuple[str, str]:
    """(language, code) of the README block marked ``<!-- recipe: name -->``."""
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- recipe: {re.escape(name)} -->\s*```(\w+)\n(.*?)```", text, re.S)
    assert m, f"README.md has no block marked 'recipe: {name}'"
    return m.group(1), m.group(2)


def run_recipe(name: str, cwd: Path, env: dict[str, str], timeout: float = 180
               ) -> subprocess.CompletedProcess[str]:
    lang, code = recipe(name)
    cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euc", code]
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"recipe {name} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


@pytest.fixture
def user_env(moto_server: str, bucket: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAFS_")}
    env.update(AWS_ENDPOINT_URL=moto_server, BUCKET=bucket,
               PATH=f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}",
               XDG_CACHE_HOME=str(tmp_path / "xdg-cache"), HOME=str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    yield env


def _dist(where: Path, versions: int = 4, size: int = 400_000) -> dict[str, bytes]:
    where.mkdir(parents=True, exist_ok=True)
    files = {}
    for i, data in enumerate(release_versions(versions, size, seed=13)):
        name = f"app-1.{i}.0.zip"
        (where / name).write_bytes(data)
        files[name] = data
    return files


def _client(endpoint: str) -> object:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _stored(endpoint: str, bucket: str, prefix: str) -> dict[str, int]:
    return bucket_objects(_client(endpoint), bucket, prefix, False)


@pytest.mark.mount
@pytest.mark.usefixtures("fuse_tools")
def test_ci_step_into_a_mounted_bucket(user_env: dict[str, str], moto_server: str,
                                       bucket: str, tmp_path: Path) -> None:
    files = _dist(tmp_path / "job" / "dist")
    user_env["MNT"] = str(tmp_path / "mnt")
    run_recipe("ci-mount", tmp_path / "job", user_env)
    assert not os.path.ismount(tmp_path / "mnt")
    keys = _stored(moto_server, bucket, "releases/app/")
    # in the bucket when umount returned: one reference and a delta per version
    assert "releases/app/reference.bin" in keys
    assert sum(k.endswith(".delta") for k in keys) == len(files), keys  # the first too
    assert sum(keys.values()) < 0.5 * sum(map(len, files.values()))
    out = tmp_path / "back"
    out.mkdir()
    for name, data in files.items():
        subprocess.run(["deltafs", "get", f"s3://{bucket}/releases/app/{name}", str(out)],
                       env=user_env, check=True, capture_output=True)
        assert (out / name).read_bytes() == data


def test_ci_step_with_deltafs_put(user_env: dict[str, str], moto_server: str, bucket: str,
                                  tmp_path: Path) -> None:
    files = _dist(tmp_path / "job" / "dist")
    res = run_recipe("ci-put", tmp_path / "job", user_env)
    for name in files:
        assert name in res.stdout  # ls -l lists every version
    keys = _stored(moto_server, bucket, "releases/app/")
    assert sum(k.endswith(".delta") for k in keys) == len(files), keys  # the first too


@pytest.mark.mount
@pytest.mark.usefixtures("fuse_tools")
def test_nightly_backup_with_rotation(user_env: dict[str, str], moto_server: str,
                                      bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "srv-app"
    src.mkdir()
    rng = random.Random(7)
    for i in range(20):  # ~400 KB that gzip cannot shrink: well above min_delta_size
        (src / f"data{i}.txt").write_text(rng.randbytes(10_000).hex())
    mnt = tmp_path / "mnt"
    user_env.update(MNT=str(mnt), SRC=str(src))
    try:
        # last month's nights: two archives, one past the 30 days
        run_recipe("nightly-backup", tmp_path, user_env)
        today = time.strftime("%Y-%m-%d")
        first = mnt / "app" / f"app-{today}.tar.gz"
        old, recent = mnt / "app" / "app-2000-01-01.tar.gz", mnt / "app" / "app-2000-01-02.tar.gz"
        os.rename(first, old)
        subprocess.run(["cp", str(old), str(recent)], check=True)
        os.utime(old, (time.time() - 40 * 86400,) * 2)
        os.utime(recent, (time.time() - 10 * 86400,) * 2)
        (src / "data3.txt").write_text("changed tonight\n" * 100)
        # tonight: the mount is already there (mountpoint -q), the old one rotates out
        res = run_recipe("nightly-backup", tmp_path, user_env)
        assert "pending" in res.stdout  # deltafs status printed
        assert sorted(os.listdir(mnt / "app")) == ["app-2000-01-02.tar.gz", first.name]
        listing = subprocess.run(["tar", "-tzf", str(first)], capture_output=True, text=True,
                                 check=True).stdout
        assert "./data3.txt" in listing
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["deltafs", "umount", str(mnt)], env=user_env, timeout=120)
    keys = _stored(moto_server, bucket, "backups/app/")
    assert not any("2000-01-01" in k for k in keys), keys  # rotated out of the bucket too
    assert any(k.endswith(".delta") for k in keys), keys   # tonight's is a delta


def test_python_api_snippet(user_env: dict[str, str], moto_server: str, bucket: str,
                            tmp_path: Path) -> None:
    files = _dist(tmp_path / "job" / "dist")
    res = run_recipe("python-api", tmp_path / "job", user_env)
    last = sorted(files)[-1]
    assert f"{last}: delta" in res.stdout, res.stdout
    assert re.search(r"saved \d+%", res.stdout), res.stdout
    assert Path(f"/tmp/{last}").read_bytes() == files[last]
    os.unlink(f"/tmp/{last}")


# ---------------------------------------------------------------------- at boot

BOOT_PATHS = [Path("/usr/local/bin/deltafs"), Path("/sbin/mount.deltafs"),
              Path("/etc/deltafs/releases.toml"), Path("/etc/fstab"),
              Path("/etc/systemd/system/deltafs@.service")]


def _save(paths: list[Path]) -> dict[Path, tuple[str, bytes | str | None]]:
    out: dict[Path, tuple[str, bytes | str | None]] = {}
    for p in paths:
        if p.is_symlink():
            out[p] = ("link", os.readlink(p))
        elif p.exists():
            out[p] = ("file", p.read_bytes())
        else:
            out[p] = ("none", None)
    return out


def _restore(saved: dict[Path, tuple[str, bytes | str | None]]) -> None:
    for p, (kind, value) in saved.items():
        if p.is_symlink() or p.exists():
            p.unlink()
        if kind == "link":
            p.symlink_to(str(value))
        elif kind == "file":
            p.write_bytes(value)  # type: ignore[arg-type]


def _unit_lines(unit: Path, key: str, name: str) -> list[str]:
    """A unit's ``key=`` command with ``%I`` filled in, as systemd runs it (a leading
    ``-`` only means "failure is fine")."""
    for line in unit.read_text().splitlines():
        if line.startswith(f"{key}="):
            return line.split("=", 1)[1].lstrip("-").replace("%I", name).split()
    raise AssertionError(f"{unit} has no {key}=")


@pytest.mark.mount
@pytest.mark.usefixtures("fuse_tools")
def test_boot_setup_with_fstab_and_with_the_unit(user_env: dict[str, str], moto_server: str,
                                                 bucket: str, tmp_path: Path) -> None:
    """The README's set-up as written, then the fstab line (mount(8) and the helper
    read the config by name), then the unit: `systemctl` cannot run in this container,
    so a stand-in records the call and the test runs the installed unit's ExecStart,
    ExecStop and ExecStopPost the way systemd would."""
    if os.geteuid() != 0:
        pytest.fail("the boot recipes install into /etc, /sbin and /usr/local/bin: root only")
    mnt = Path("/mnt/releases")
    assert not os.path.ismount(mnt), "/mnt/releases is in use on this machine"
    saved = _save(BOOT_PATHS)
    made_mnt = not mnt.exists()
    made_etc = not Path("/etc/deltafs").exists()
    client = _client(moto_server)
    try:
        run_recipe("boot-setup", ROOT, user_env)
        assert os.path.realpath("/sbin/mount.deltafs") == str(VENV_BIN / "mount.deltafs")
        # "then edit it": the source, the keys and this test's own cache and log
        creds = tmp_path / "releases.credentials"
        creds.write_text("[default]\naws_access_key_id = testing\n"
                         "aws_secret_access_key = testing\n")
        creds.chmod(0o600)
        conf = Path("/etc/deltafs/releases.toml")
        text = conf.read_text()
        for key, value in (("source", f"s3://{bucket}/releases"),
                           ("credentials_file", str(creds)),
                           ("cache_dir", str(tmp_path / "cache")),
                           ("log_file", str(tmp_path / "deltafs.log"))):
            text, n = re.subn(rf"(?m)^{key} = .*$", f'{key} = "{value}"', text)
            assert n == 1, key
        text = re.sub(r"(?m)^region = .*$", "", text)
        conf.write_text(text)

        run_recipe("boot-fstab", ROOT, user_env)
        assert os.path.ismount(mnt)
        (mnt / "from-fstab.txt").write_text("booted by fstab\n")
        subprocess.run(["deltafs", "umount", str(mnt)], env=user_env, check=True, timeout=120)
        assert "releases/from-fstab.txt" in bucket_objects(client, bucket, "releases/")

        stub = tmp_path / "stub-bin"
        stub.mkdir()
        calls = tmp_path / "systemctl.calls"
        (stub / "systemctl").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
        (stub / "systemctl").chmod(0o755)
        env = {**user_env, "PATH": f"{stub}:{user_env['PATH']}"}
        run_recipe("boot-systemd", ROOT, env)
        assert calls.read_text().split() == ["enable", "--now", "deltafs@releases"]
        unit = Path("/etc/systemd/system/deltafs@.service")
        start = subprocess.Popen(_unit_lines(unit, "ExecStart", "releases"), env=user_env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while not os.path.ismount(mnt):
                assert start.poll() is None, start.stderr.read()  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "the unit's mount never came up"
                time.sleep(0.1)
            assert (mnt / "from-fstab.txt").read_text() == "booted by fstab\n"
            (mnt / "from-unit.txt").write_text("booted by the unit\n")
            subprocess.run(_unit_lines(unit, "ExecStop", "releases"), env=user_env,
                           check=True, timeout=300)
            assert start.wait(60) == 0
        finally:
            if start.poll() is None:
                start.terminate()
                start.wait(60)
            subprocess.run(_unit_lines(unit, "ExecStopPost", "releases"), env=user_env,
                           timeout=60)
        assert "releases/from-unit.txt" in bucket_objects(client, bucket, "releases/")
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])
        _restore(saved)
        for made, d in ((made_mnt, mnt), (made_etc, Path("/etc/deltafs"))):
            if made:
                try:
                    d.rmdir()
                except OSError:
                    pass
