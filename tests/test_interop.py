"""Acceptance 5: the bucket format is DeltaGlider's. Files written by deltafs come back
byte-identical through the real `deltaglider` 6.2.0 CLI, and files written by it come back
byte-identical through `deltafs get`, with their true sizes in listings."""
from __future__ import annotations

import gzip
import io
import random
import re
import subprocess
import tarfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import boto3
import pytest

from deltafs.api import make_engine
from deltafs.store.s3 import S3Store
from helpers import (
    MiB,
    bucket_objects,
    cli_env,
    deltaglider_exe,
    run_deltafs,
    sha256_file,
    write_file,
)


@pytest.fixture(autouse=True)
def _deltaglider_installed() -> None:
    """Fail (never skip) before any work when the test extras are missing."""
    deltaglider_exe()


VERSIONS = 4
_WORDS = [f"w{i:04d}" for i in range(3000)] + ["def", "return", "import", "class", "\n"]


# ------------------------------------------------------------------------ releases


def _members(version: int, rng: random.Random) -> dict[str, bytes]:
    """The files of release ``version``: mostly unchanged from one release to the next
    (one binary blob, text sources), with one source changed and one added per release."""
    base = random.Random(1234)
    members: dict[str, bytes] = {
        "bin/engine.so": base.randbytes(MiB + 12345),
        "assets/blob.dat": base.randbytes(512 * 1024),
    }
    for i in range(12):
        words = base.choices(_WORDS, k=12000)
        members[f"src/mod{i:02d}.py"] = " ".join(words).encode()
    for v in range(1, version + 1):
        changed = f"src/mod{v % 12:02d}.py"
        body = bytearray(members[changed])
        pos = rng.randrange(0, len(body) - 200)
        body[pos:pos + 100] = f"# patched in release {v}\n".encode().ljust(100, b"#")
        members[changed] = bytes(body)
        members[f"src/new_in_{v}.py"] = " ".join(rng.choices(_WORDS, k=2000)).encode()
        blob = bytearray(members["bin/engine.so"])
        blob[v * 1000:v * 1000 + 64] = rng.randbytes(64)
        members["bin/engine.so"] = bytes(blob)
    return members


def make_zip(path: Path, version: int) -> Path:
    rng = random.Random(version)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, body in sorted(_members(version, rng).items()):
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED if name.endswith(".so") else zipfile.ZIP_DEFLATED
            z.writestr(info, body)
    return path


def _tar_bytes(version: int) -> bytes:
    rng = random.Random(version)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for name, body in sorted(_members(version, rng).items()):
            info = tarfile.TarInfo(f"app-{version}/{name}")
            info.size = len(body)
            info.mtime = 1_700_000_000
            t.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def make_tar(path: Path, version: int) -> Path:
    return write_file(path, _tar_bytes(version))


def make_tgz(path: Path, version: int) -> Path:
    return write_file(path, gzip.compress(_tar_bytes(version), compresslevel=6, mtime=0))


MAKERS: dict[str, tuple[str, Callable[[Path, int], Path]]] = {
    "zip": ("app-{v}.zip", make_zip),
    "tar": ("app-{v}.tar", make_tar),
    "tgz": ("app-{v}.tar.gz", make_tgz),
}


# ------------------------------------------------------------------------ helpers


@pytest.fixture
def s3(moto_server: str) -> Any:
    return boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")


def deltaglider(args: list[str], endpoint: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """Run the real deltaglider CLI against the moto server (AWS_ENDPOINT_URL)."""
    env = cli_env(endpoint, {"DG_LOG_LEVEL": "WARNING", "HOME": str(cwd)})
    proc = subprocess.run([str(deltaglider_exe()), *args], env=env, capture_output=True, cwd=cwd,
                          timeout=300)
    assert proc.returncode == 0, (args, proc.stdout.decode()[-2000:], proc.stderr.decode()[-2000:])
    return proc


def build(kind: str, out_dir: Path) -> dict[str, Path]:
    """``VERSIONS`` releases of one kind: name -> path."""
    pattern, maker = MAKERS[kind]
    out_dir.mkdir(parents=True, exist_ok=True)
    return {pattern.format(v=v): maker(out_dir / pattern.format(v=v), v)
            for v in range(1, VERSIONS + 1)}


# ------------------------------------------------------------- deltafs -> deltaglider


@pytest.mark.parametrize("kind,fmt", [("zip", "deltaglider"), ("tar", "deltaglider"),
                                      ("tgz", "deltaglider")])
def test_deltafs_written_read_by_deltaglider(moto_server: str, bucket: str, s3: Any,
                                             tmp_path: Path, kind: str, fmt: str) -> None:
    """Strict mode writes only what DeltaGlider reads (the default's extension objects,
    chains and gzip deltas, are the next test)."""
    files = build(kind, tmp_path / "src")
    prefix = f"rel/{kind}/"
    proc = run_deltafs(["put", "--json", "--format", fmt, *map(str, files.values()),
                        f"s3://{bucket}/{prefix}"],
                       endpoint=moto_server, cache_dir=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr.decode()
    import json

    results = {r["key"]: r for r in json.loads(proc.stdout)}
    kinds = [results[prefix + name]["kind"] for name in files]
    objects = bucket_objects(s3, bucket, prefix)
    if kind == "tgz":
        # compressed streams are stored whole and never become a reference
        assert kinds == ["direct"] * VERSIONS
        assert set(objects) == {prefix + n for n in files}
    else:
        assert kinds == ["reference"] + ["delta"] * (VERSIONS - 1), kinds
        assert set(objects) == {prefix + "reference.bin"} | {prefix + n + ".delta" for n in files}
        for name, path in list(files.items())[1:]:
            assert objects[prefix + name + ".delta"] < path.stat().st_size / 4, name

    out = tmp_path / "dg-out"
    out.mkdir()
    for name, path in files.items():
        target = out / name
        deltaglider(["cp", f"s3://{bucket}/{prefix}{name}", str(target)], moto_server, tmp_path)
        assert sha256_file(target) == sha256_file(path), name
    ref = s3.head_object(Bucket=bucket, Key=prefix + "reference.bin")["Metadata"] \
        if prefix + "reference.bin" in objects else {}
    assert "deltafs-format" not in ref, ref


@pytest.mark.parametrize("kind", ["tgz", "zip", "tar"])
def test_extension_objects_make_deltaglider_fail_never_return_wrong_bytes(
        moto_server: str, bucket: str, s3: Any, tmp_path: Path, kind: str) -> None:
    """In a new directory deltafs stores each version as a chained delta (and .tar.gz
    files as deltas of their contents): extensions DeltaGlider cannot read. The real
    deltaglider 6.2.0 CLI must fail on them with an error, never hand back other bytes;
    deltafs reads them back exactly."""
    files = build(kind, tmp_path / "src")
    prefix = f"ext/{kind}/"
    proc = run_deltafs(["put", "--json", *map(str, files.values()), f"s3://{bucket}/{prefix}"],
                       endpoint=moto_server, cache_dir=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr.decode()
    import json

    results = {r["key"]: r for r in json.loads(proc.stdout)}
    assert [results[prefix + n]["kind"] for n in files] == \
        ["reference"] + ["delta"] * (VERSIONS - 1)
    objects = bucket_objects(s3, bucket, prefix, manifests=True)  # blobs included
    logical = sum(p.stat().st_size for p in files.values())
    assert sum(objects.values()) < 0.5 * logical, objects
    ref = s3.head_object(Bucket=bucket, Key=prefix + "reference.bin")["Metadata"]
    assert ref.get("deltafs-format") == "deltafs", ref
    for name in list(files)[1:]:
        meta = s3.head_object(Bucket=bucket, Key=prefix + name + ".delta")["Metadata"]
        assert meta.get("deltafs-form") in ("chain", "chain+gzip"), (name, meta)
    out = tmp_path / "dg-out"
    out.mkdir()
    failed = 0
    for name, path in files.items():
        target = out / name
        env = cli_env(moto_server, {"DG_LOG_LEVEL": "WARNING", "HOME": str(tmp_path)})
        res = subprocess.run([str(deltaglider_exe()), "cp", f"s3://{bucket}/{prefix}{name}",
                              str(target)], env=env, capture_output=True, cwd=tmp_path,
                             timeout=300)
        if res.returncode == 0:
            assert sha256_file(target) == sha256_file(path), name  # right bytes, or none
        else:
            failed += 1
            assert not target.exists() or sha256_file(target) == sha256_file(path), name
    assert failed >= VERSIONS - 1  # every extension object is refused
    back = tmp_path / "back"
    back.mkdir()
    for name, path in files.items():
        proc = run_deltafs(["get", f"s3://{bucket}/{prefix}{name}", str(back)],
                           endpoint=moto_server, cache_dir=tmp_path / "fresh-cache")
        assert proc.returncode == 0, proc.stderr.decode()
        assert (back / name).read_bytes() == path.read_bytes(), name


# ------------------------------------------------------------- deltaglider -> deltafs


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_deltaglider_written_read_by_deltafs(moto_server: str, bucket: str, s3: Any,
                                             tmp_path: Path, kind: str) -> None:
    files = build(kind, tmp_path / "src")
    prefix = f"dg/{kind}/"
    # deltaglider 6.2.0 drops the last component of a DEST ending in "/" (it would store
    # into "dg/"), so each file is given its full key
    for name, path in files.items():
        deltaglider(["cp", str(path), f"s3://{bucket}/{prefix}{name}"], moto_server, tmp_path)
    objects = bucket_objects(s3, bucket, prefix)
    assert prefix + "reference.bin" in objects, objects
    deltas = [k for k in objects if k.endswith(".delta")]
    assert len(deltas) == VERSIONS, objects  # deltaglider really wrote deltas

    out = tmp_path / "out"
    out.mkdir()
    for name, path in files.items():
        proc = run_deltafs(["get", f"s3://{bucket}/{prefix}{name}", str(out)],
                           endpoint=moto_server, cache_dir=tmp_path / "cache")
        assert proc.returncode == 0, proc.stderr.decode()
        assert sha256_file(out / name) == sha256_file(path), name

    # listings show the true sizes, never the delta sizes
    proc = run_deltafs(["ls", "-l", f"s3://{bucket}/{prefix}"], endpoint=moto_server,
                       cache_dir=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr.decode()
    listed: dict[str, int] = {}
    for line in proc.stdout.decode().splitlines():
        m = re.match(r"\s*(-?\d+)\s+\S+ \S+\s+(\S+)\s+(.+)$", line)
        assert m, line
        listed[m.group(3)] = int(m.group(1))
    assert listed == {name: path.stat().st_size for name, path in files.items()}, proc.stdout

    engine = make_engine(S3Store(bucket, endpoint_url=moto_server), tmp_path / "cache")
    entries = {e.key: e for e in engine.list(prefix)}
    assert set(entries) == {prefix + n for n in files}
    for name, path in files.items():
        e = entries[prefix + name]
        assert e.size == path.stat().st_size
        assert e.kind == "delta"
        assert e.stored_size == objects[prefix + name + ".delta"]
    # and verify agrees
    proc = run_deltafs(["verify", f"s3://{bucket}/{prefix}"], endpoint=moto_server,
                       cache_dir=tmp_path / "cache2")
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def test_mixed_prefix_deltafs_adds_to_deltaglider_deltaspace(moto_server: str, bucket: str,
                                                            tmp_path: Path) -> None:
    """deltaglider seeds a deltaspace, deltafs adds a version against that reference,
    and deltaglider reads deltafs's delta back."""
    files = build("zip", tmp_path / "src")
    names = list(files)
    prefix = "mixed/"
    deltaglider(["cp", str(files[names[0]]), f"s3://{bucket}/{prefix}{names[0]}"], moto_server,
                tmp_path)
    proc = run_deltafs(["put", "--json", str(files[names[1]]), f"s3://{bucket}/{prefix}"],
                       endpoint=moto_server, cache_dir=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr.decode()
    assert '"kind": "delta"' in proc.stdout.decode()
    target = tmp_path / "back.zip"
    deltaglider(["cp", f"s3://{bucket}/{prefix}{names[1]}", str(target)], moto_server, tmp_path)
    assert sha256_file(target) == sha256_file(files[names[1]])
