"""``scripts/bench --quick`` runs end to end and produces every table row and the JSON.

It mounts deltafs, s3fs-fuse and rclone (FUSE, root) against one moto server and runs
DeltaGlider 6.2.0, so it takes a minute or two; it needs the release series cache of
``scripts/fetch-release-series`` (``scripts/bench`` fetches it when missing).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                       reason="the benchmark mounts FUSE filesystems: needs root and /dev/fuse"),
]

SYSTEMS = ["deltafs", "deltafs --format deltaglider", "deltaglider", "deltaglider as .zip",
           "s3fs", "rclone", "local"]
SERIES = ["botocore wheels", "synthetic"]
SERIES_ROWS = [
    "stored / logical", "write until in bucket, s", "cp returned, s", "cold read, MB/s",
    "warm read, MB/s", "deltafs get, cold, MB/s", "read back byte-identical",
    "peak RSS during copy, MB",
    "S3 requests: write", "S3 requests: cold read", "S3 requests: warm read",
]
META_ROWS = [
    "create 60 files (cp -r, until in bucket), s", "ls -l cold, s", "ls -l warm, s",
    "rsync -a --dry-run cold, s", "rsync -a --dry-run warm, s", "S3 requests: create",
    "S3 requests: ls -l cold", "S3 requests: ls -l warm", "S3 requests: rsync cold",
    "S3 requests: rsync warm",
]


def table(stdout: str) -> dict[tuple[str, str], list[str]]:
    """(series, metric) -> the system cells, from the main Markdown table."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| series | metric |"))
    cols = [c.strip() for c in lines[head].strip("|").split("|")][2:]
    assert cols == SYSTEMS, cols
    rows: dict[tuple[str, str], list[str]] = {}
    for line in lines[head + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[(cells[0], cells[1])] = cells[2:]
    return rows


CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deltafs-bench"
FETCH = ROOT / "scripts" / "fetch-release-series"


def ensure_release_series() -> None:
    """Fetch the release series once (a one-time download, not part of the timed run)."""
    if len(list((CACHE / "wheels").glob("*.whl"))) >= 3 and \
            len(list((CACHE / "tars").glob("*.tar"))) >= 3:
        return
    if not FETCH.exists():
        pytest.fail(f"{CACHE} lacks the release series (>= 3 botocore wheels in wheels/, "
                    f"their re-tarred trees in tars/) and {FETCH} is missing: fetch the "
                    "series into it (scripts/bench does it when the fetch script is there)",
                    pytrace=False)
    env = dict(os.environ, PATH=f"{ROOT / '.venv' / 'bin'}:{os.environ.get('PATH', '')}")
    subprocess.run(["bash", str(FETCH), str(CACHE)], check=True, timeout=1800, env=env,
                   stdout=subprocess.DEVNULL)


def test_bench_quick(tmp_path: Path) -> None:
    ensure_release_series()
    out = tmp_path / "quick.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")
           or k == "AWS_CA_BUNDLE"}
    # --quick, trimmed further: every system on the wheels (zip) and on synthetic images
    # (plain binaries; the tars take the same path), fewer small files and journal rows
    res = subprocess.run([str(ROOT / "scripts" / "bench"), "--quick", "--tars", "0",
                          "--synthetic", "2x4", "--small-files", "60", "--scale-files", "200",
                          "--scale-rm", "20", "--journal-rows", "5000", "--out", str(out),
                          "--throttle", "400/10",
                          "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    assert res.returncode == 0, f"stdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-5000:]}"
    rows = table(res.stdout)
    titles = {series for series, _ in rows}
    for name in SERIES:
        title = next((t for t in titles if t.startswith(name)), None)
        assert title, f"no rows for series {name}: {sorted(titles)}"
        for metric in SERIES_ROWS:
            cells = rows.get((title, metric))
            assert cells, f"row missing: {title} / {metric}"
            assert "failed" not in cells, f"{title} / {metric}: {cells}"
            assert cells[0] not in ("—", "n/a"), f"no deltafs figure: {title} / {metric}"
        # deltafs reads back every file byte-identical, and so does every other system
        n = title.split("(")[1].split()[0]
        for system, cell in zip(SYSTEMS, rows[(title, "read back byte-identical")]):
            assert cell in (f"{n}/{n}", "—", "n/a"), f"{system} on {title}: {cell}"
    meta = next(t for t in titles if t.startswith("metadata"))
    for metric in META_ROWS:
        assert (meta, metric) in rows, f"row missing: {meta} / {metric}"
    assert "| series | system | phase | S3 requests by type |" in res.stdout

    doc = json.loads(out.read_text())
    # the scale steps' running figures (written before each step) give way to the result
    assert not out.with_name(out.name + ".partial").exists()
    assert "incomplete" not in doc["scale"]
    assert doc["mode"] == "quick"
    assert [s["label"] for s in doc["systems"]] == SYSTEMS
    assert {"cpu", "cores", "memory_gb", "kernel", "loadavg_start", "loadavg_end"} <= set(doc["machine"])
    for series in ("wheels", "synthetic"):
        r = doc["results"][series]["deltafs"]
        assert r["read_cold"]["identical"] == r["read_cold"]["files"] == \
            len(next(s for s in doc["series"] if s["name"] == series)["names"])
        assert r["read_warm"]["mismatched"] == [] and r["read_warm"]["errors"] == []
        assert 0 < r["stored_ratio"] < 1, r["stored_ratio"]
        assert r["requests"]["write"].get("PutObject", {}).get("count", 0) > 0
        assert r["peak_rss_mb"] > 0
        for system, rr in doc["results"][series].items():
            assert rr is None or "error" not in rr, f"{series}/{system}: {rr.get('error')}"
    # the bandwidth-limited run: every system again on the wheels, through the slow link
    th = doc["throttled"]
    assert (th["mbit"], th["rtt_ms"]) == (400, 10)
    assert th["link"]["bytes_up"] > 0 and th["link"]["bytes_down"] > 0
    n_wheels = len(next(s for s in doc["series"] if s["name"] == "wheels")["names"])
    for system, rr in th["results"]["wheels"].items():
        assert rr is None or "error" not in rr, f"throttled {system}: {rr.get('error')}"
    r = th["results"]["wheels"]["deltafs"]
    assert r["read_cold"]["identical"] == n_wheels and r["write"]["seconds"] > 0
    assert "Through a 400 Mbit/s link with a 10 ms round trip" in res.stdout
    assert doc["results"]["wheels"]["xdelta3"]["mb_per_s"] > 0
    assert "Issue 12 targets" in res.stdout
    meta_r = doc["results"]["metadata"]["deltafs"]
    assert meta_r["ls_cold"] > 0 and meta_r["rsync_warm"] > 0
