"""The `deltafs` command as a user runs it (a subprocess): destinations, --json, the local
store, rm -r, analyze and get to stdout."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import boto3
import pytest

from helpers import (
    MiB,
    bucket_objects,
    next_version,
    one_line_error,
    run_deltafs,
    sha256_bytes,
    sha256_file,
    write_file,
)


@pytest.fixture
def s3(moto_server: str) -> Any:
    return boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")


@pytest.fixture
def releases(tmp_path: Path) -> list[Path]:
    """Three related 1 MiB releases."""
    rng = random.Random(5)
    data = rng.randbytes(MiB)
    out = []
    for i in range(1, 4):
        out.append(write_file(tmp_path / "src" / f"app-{i}.bin", data))
        data = next_version(data, rng)
    return out


class Cli:
    """``deltafs`` bound to the moto endpoint and a private cache dir."""

    def __init__(self, endpoint: str | None, cache: Path) -> None:
        self.endpoint = endpoint
        self.cache = cache

    def __call__(self, *args: str, ok: bool = True, **kw: Any) -> Any:
        proc = run_deltafs(list(args), endpoint=self.endpoint, cache_dir=self.cache, **kw)
        if ok:
            assert proc.returncode == 0, (args, proc.stdout.decode(), proc.stderr.decode())
            assert b"Traceback" not in proc.stderr
        return proc


@pytest.fixture
def cli(moto_server: str, tmp_path: Path) -> Cli:
    return Cli(moto_server, tmp_path / "cache")


# ------------------------------------------------------------------- put / get


def test_put_into_prefix_vs_as_key(cli: Cli, bucket: str, s3: Any, releases: list[Path]) -> None:
    cli("put", "-q", str(releases[0]), f"s3://{bucket}/p/")
    cli("put", "-q", str(releases[1]), f"s3://{bucket}/p/renamed.bin")
    cli("put", "-q", str(releases[2]), f"s3://{bucket}/p/sub")  # no slash: the key "p/sub"
    objects = bucket_objects(s3, bucket)
    assert set(objects) == {"p/reference.bin", "p/app-1.bin.delta", "p/renamed.bin.delta",
                            "p/sub.delta"}
    # several files into one prefix, even without the trailing slash
    cli("put", "-q", str(releases[0]), str(releases[1]), f"s3://{bucket}/q")
    assert {"q/app-1.bin.delta", "q/app-2.bin.delta"} <= set(bucket_objects(s3, bucket))


def test_put_output_line(cli: Cli, bucket: str, releases: list[Path]) -> None:
    proc = cli("put", str(releases[0]), str(releases[1]), f"s3://{bucket}/p/")
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("reference") and lines[0].endswith(f"s3://{bucket}/p/app-1.bin")
    assert lines[1].startswith("delta") and lines[1].endswith(f"s3://{bucket}/p/app-2.bin")


def test_get_into_directory_and_file(cli: Cli, bucket: str, tmp_path: Path,
                                     releases: list[Path]) -> None:
    cli("put", "-q", *map(str, releases), f"s3://{bucket}/p/")
    out = tmp_path / "out"
    out.mkdir()
    cli("get", f"s3://{bucket}/p/app-2.bin", str(out))
    assert sha256_file(out / "app-2.bin") == sha256_file(releases[1])
    cli("get", f"s3://{bucket}/p/app-3.bin", str(out) + "/")
    assert sha256_file(out / "app-3.bin") == sha256_file(releases[2])
    cli("get", f"s3://{bucket}/p/app-1.bin", str(out / "named.bin"))
    assert sha256_file(out / "named.bin") == sha256_file(releases[0])
    # default destination: the current directory
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cli("get", f"s3://{bucket}/p/app-1.bin", cwd=cwd)
    assert sha256_file(cwd / "app-1.bin") == sha256_file(releases[0])
    # overwriting an existing file
    cli("get", f"s3://{bucket}/p/app-3.bin", str(out / "named.bin"))
    assert sha256_file(out / "named.bin") == sha256_file(releases[2])
    assert sorted(p.name for p in out.iterdir()) == ["app-2.bin", "app-3.bin", "named.bin"]


def test_get_errors(cli: Cli, bucket: str, tmp_path: Path, releases: list[Path]) -> None:
    cli("put", "-q", str(releases[0]), f"s3://{bucket}/p/")
    missing = cli("get", f"s3://{bucket}/p/nope.bin", str(tmp_path), ok=False)
    line = one_line_error(missing)
    assert missing.returncode == 4 and "p/nope.bin" in line
    nodir = cli("get", f"s3://{bucket}/p/app-1.bin", str(tmp_path / "no" / "such") + "/",
                ok=False)
    assert nodir.returncode == 2
    one_line_error(nodir)
    prefix = cli("get", f"s3://{bucket}/p/", str(tmp_path), ok=False)
    assert prefix.returncode == 2
    one_line_error(prefix)


def test_get_to_stdout(cli: Cli, bucket: str, releases: list[Path]) -> None:
    cli("put", "-q", *map(str, releases[:2]), f"s3://{bucket}/p/")
    proc = cli("get", f"s3://{bucket}/p/app-2.bin", "-")
    assert sha256_bytes(proc.stdout) == sha256_file(releases[1])
    proc = cli("get", f"s3://{bucket}/p/app-1.bin", "-")
    assert sha256_bytes(proc.stdout) == sha256_file(releases[0])


def test_put_missing_source(cli: Cli, bucket: str, tmp_path: Path, s3: Any) -> None:
    proc = cli("put", str(tmp_path / "nope"), f"s3://{bucket}/p/", ok=False)
    line = one_line_error(proc)
    assert proc.returncode == 2 and "nope" in line
    proc = cli("put", str(tmp_path), f"s3://{bucket}/p/", ok=False)
    assert proc.returncode == 2 and "-r" in one_line_error(proc)
    assert bucket_objects(s3, bucket, manifests=True) == {}


def test_put_recursive(cli: Cli, bucket: str, tmp_path: Path, s3: Any,
                       releases: list[Path]) -> None:
    tree = tmp_path / "tree"
    write_file(tree / "a.txt", b"a")
    write_file(tree / "d" / "b.txt", b"b")
    cli("put", "-q", "-r", str(tree), f"s3://{bucket}/t/")
    assert set(bucket_objects(s3, bucket)) == {"t/tree/a.txt", "t/tree/d/b.txt"}


# ------------------------------------------------------------------------- json


def test_json_outputs_parse(cli: Cli, bucket: str, releases: list[Path]) -> None:
    put = json.loads(cli("put", "--json", *map(str, releases), f"s3://{bucket}/p/").stdout)
    assert [r["kind"] for r in put] == ["reference", "delta", "delta"]
    assert [r["sha256"] for r in put] == [sha256_file(p) for p in releases]
    assert all(r["original_size"] == MiB or r["kind"] != "reference" for r in put)

    ls = json.loads(cli("ls", "--json", f"s3://{bucket}/p/").stdout)
    assert {e["key"]: e["size"] for e in ls} == {
        f"p/{p.name}": p.stat().st_size for p in releases}
    assert all(e["type"] == "file" and e["kind"] == "delta" for e in ls)
    assert all(e["stored_size"] < e["size"] for e in ls)

    stats = json.loads(cli("stats", "--json", f"s3://{bucket}/p/").stdout)
    assert stats["files"] == 3 and stats["references"] == 1
    assert stats["logical_bytes"] == sum(p.stat().st_size for p in releases)
    assert stats["stored_bytes"] < stats["logical_bytes"]
    assert stats["by_kind"] == {"delta": 3}

    verify = json.loads(cli("verify", "--json", f"s3://{bucket}/p/").stdout)
    assert [v["ok"] for v in verify] == [True, True, True]


def test_ls_plain_and_long(cli: Cli, bucket: str, releases: list[Path]) -> None:
    cli("put", "-q", *map(str, releases[:2]), f"s3://{bucket}/p/")
    cli("put", "-q", str(releases[2]), f"s3://{bucket}/p/sub/")
    plain = cli("ls", f"s3://{bucket}/p/").stdout.decode().split()
    assert plain == ["app-1.bin", "app-2.bin", "sub/"]
    long = cli("ls", "-l", f"s3://{bucket}/p/").stdout.decode().splitlines()
    sizes = {}
    for line in long:
        m = re.match(r"\s*(\S+)\s+.*\s(\S+)$", line)
        assert m, line
        sizes[m.group(2)] = m.group(1)
    assert sizes == {"app-1.bin": str(releases[0].stat().st_size),
                     "app-2.bin": str(releases[1].stat().st_size), "sub/": "DIR"}
    rec = cli("ls", "-R", f"s3://{bucket}/p/").stdout.decode().split()
    assert rec == ["app-1.bin", "app-2.bin", "sub/app-3.bin"]
    missing = cli("ls", f"s3://{bucket}/nothing-here", ok=False)
    assert missing.returncode == 4
    one_line_error(missing)


# ------------------------------------------------------------------ local store


def test_init_and_local_store(tmp_path: Path, releases: list[Path]) -> None:
    cli = Cli(None, tmp_path / "cache")
    store = tmp_path / "store"
    out = cli("init", str(store)).stdout.decode()
    assert str(store) in out
    assert (store / ".deltafs-store").is_file()
    cli("put", "-q", str(releases[0]), f"{store}/v1/")
    cli("put", "-q", str(releases[1]), f"{store}/v1/")
    listed = cli("ls", f"{store}/v1/").stdout.decode().split()
    assert listed == ["app-1.bin", "app-2.bin"]
    info = json.loads(cli("ls", "--json", f"{store}/v1/").stdout)
    assert [e["size"] for e in info] == [releases[0].stat().st_size, releases[1].stat().st_size]
    assert [e["kind"] for e in info] == ["delta", "delta"]
    dest = tmp_path / "got"
    dest.mkdir()
    cli("get", f"{store}/v1/app-2.bin", str(dest))
    assert sha256_file(dest / "app-2.bin") == sha256_file(releases[1])
    # a relative path inside the store works from any directory
    cli("get", "store/v1/app-1.bin", str(dest), cwd=tmp_path)
    assert sha256_file(dest / "app-1.bin") == sha256_file(releases[0])
    cli("rm", "-q", f"{store}/v1/app-1.bin")
    assert cli("ls", f"{store}/v1/").stdout.decode().split() == ["app-2.bin"]


def test_path_outside_any_store(tmp_path: Path) -> None:
    cli = Cli(None, tmp_path / "cache")
    proc = cli("ls", str(tmp_path / "nowhere") + "/", ok=False)
    line = one_line_error(proc)
    assert proc.returncode == 5 and "deltafs init" in line
    proc = cli("ls", "ftp://x/y", ok=False)
    assert proc.returncode == 2
    one_line_error(proc)


# --------------------------------------------------------------------------- rm


def test_rm_and_rm_recursive(cli: Cli, bucket: str, s3: Any, releases: list[Path]) -> None:
    cli("put", "-q", *map(str, releases), f"s3://{bucket}/p/")
    cli("put", "-q", str(releases[0]), f"s3://{bucket}/p/sub/")
    cli("put", "-q", str(releases[1]), f"s3://{bucket}/keep/")
    no_r = cli("rm", f"s3://{bucket}/p/", ok=False)
    assert no_r.returncode == 2
    one_line_error(no_r)
    whole = cli("rm", "-r", f"s3://{bucket}/", ok=False)
    assert whole.returncode == 2 and "--force" in one_line_error(whole)
    cli("rm", "-q", f"s3://{bucket}/p/app-1.bin")
    assert "p/app-1.bin.delta" not in bucket_objects(s3, bucket)
    out = cli("rm", "-r", f"s3://{bucket}/p/").stdout.decode()
    assert "removed 3 files" in out
    assert set(bucket_objects(s3, bucket)) == {"keep/reference.bin", "keep/app-2.bin.delta"}
    missing = cli("rm", f"s3://{bucket}/p/app-2.bin", ok=False)
    assert missing.returncode == 4
    one_line_error(missing)


# ---------------------------------------------------------------------- analyze


def test_analyze_plain_bucket(cli: Cli, bucket: str, s3: Any, releases: list[Path]) -> None:
    for p in releases:
        s3.put_object(Bucket=bucket, Key=f"plain/{p.name}", Body=p.read_bytes())
    s3.put_object(Bucket=bucket, Key="plain/README", Body=b"hello")
    before = bucket_objects(s3, bucket)
    proc = cli("analyze", f"s3://{bucket}/plain/")
    lines = proc.stdout.decode().splitlines()
    savings = [line for line in lines if line.startswith("Potential savings:")]
    assert len(savings) == 1, lines
    pct = float(re.match(r"Potential savings: ([\d.]+)%", savings[0]).group(1))  # type: ignore[union-attr]
    assert 50 < pct < 100, savings[0]
    assert bucket_objects(s3, bucket) == before  # nothing written
    data = json.loads(cli("analyze", "--json", f"s3://{bucket}/plain/").stdout)
    assert data["objects"] == 4 and data["sampled"] >= 1


def test_no_command_and_version(cli: Cli) -> None:
    assert cli("--version").stdout.decode().startswith("deltafs ")
    assert cli(ok=False).returncode == 2
