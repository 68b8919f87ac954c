"""The Markdown tables: every figure that compares systems as a ratio to deltafs."""
from __future__ import annotations

from typing import Any, Callable

NA = "—"

#: (label, getter, format, compared as a ratio to deltafs)
Getter = Callable[[dict[str, Any]], Any]


def _req(phase: str) -> Getter:
    return lambda r: sum(v["count"] for v in r["requests"][phase].values()) \
        if phase in r.get("requests", {}) else None


def _identical(r: dict[str, Any]) -> Any:
    c, w = r.get("read_cold"), r.get("read_warm")
    if not c:
        return None
    ok = min(c["identical"], w["identical"]) if w else c["identical"]
    return f"{ok}/{c['files']}" + ("" if ok == c["files"] else " ✗")


SERIES_ROWS: list[tuple[str, Getter, str, bool]] = [
    ("stored / logical", lambda r: r.get("stored_ratio"), "{:.3f}", True),
    ("write until in bucket, s", lambda r: r.get("write", {}).get("seconds"), "{:.1f}", True),
    ("cp returned, s", lambda r: r.get("write", {}).get("cp_seconds"), "{:.1f}", True),
    ("cold read, MB/s", lambda r: (r.get("read_cold") or {}).get("mb_per_s"), "{:.0f}", True),
    ("warm read, MB/s", lambda r: (r.get("read_warm") or {}).get("mb_per_s"), "{:.0f}", True),
    ("deltafs get, cold, MB/s", lambda r: (r.get("get_cold") or {}).get("mb_per_s"), "{:.0f}",
     True),
    ("read back byte-identical", _identical, "{}", False),
    ("peak RSS during copy, MB", lambda r: r.get("peak_rss_mb"), "{:.0f}", True),
    ("S3 requests: write", _req("write"), "{:d}", True),
    ("S3 requests: cold read", _req("read_cold"), "{:d}", True),
    ("S3 requests: warm read", _req("read_warm"), "{:d}", True),
]

META_ROWS: list[tuple[str, Getter, str, bool]] = [
    ("create {n} files (cp -r, until in bucket), s", lambda r: r.get("create_seconds"), "{:.1f}", True),
    ("ls -l cold, s", lambda r: r.get("ls_cold"), "{:.2f}", True),
    ("ls -l warm, s", lambda r: r.get("ls_warm"), "{:.2f}", True),
    ("rsync -a --dry-run cold, s", lambda r: r.get("rsync_cold"), "{:.2f}", True),
    ("rsync -a --dry-run warm, s", lambda r: r.get("rsync_warm"), "{:.2f}", True),
    ("S3 requests: create", _req("create"), "{:d}", True),
    ("S3 requests: ls -l cold", _req("ls_cold"), "{:d}", True),
    ("S3 requests: ls -l warm", _req("ls_warm"), "{:d}", True),
    ("S3 requests: rsync cold", _req("rsync_cold"), "{:d}", True),
    ("S3 requests: rsync warm", _req("rsync_warm"), "{:d}", True),
]


def cell(value: Any, fmt: str, base: Any, ratio: bool, is_base: bool) -> str:
    if value is None:
        return NA
    try:
        text = fmt.format(value)
    except (ValueError, TypeError):
        text = str(value)
    if ratio and not is_base and isinstance(base, (int, float)) and isinstance(value, (int, float)):
        if base:
            text += f" ({value / base:.2g}×)" if value / base < 10 else f" ({value / base:.0f}×)"
    return text


def _rows(title: str, rows: list[tuple[str, Getter, str, bool]],
          results: dict[str, dict[str, Any]], systems: list[str], n: int = 0) -> list[str]:
    out = []
    base = results.get("deltafs") or {}
    for label, get, fmt, ratio in rows:
        cells = []
        bval = get(base) if base and not base.get("error") else None
        for s in systems:
            r = results.get(s)
            if r is None:
                cells.append(NA)
            elif r.get("error"):
                cells.append("failed")
            elif r.get("unavailable"):
                cells.append("n/a")
            else:
                try:
                    v = get(r)
                except (KeyError, TypeError):
                    v = None
                cells.append(cell(v, fmt, bval, ratio, s == "deltafs"))
        out.append(f"| {title} | {label.format(n=n)} | " + " | ".join(cells) + " |")
    return out


def tables(doc: dict[str, Any]) -> str:
    parts = []
    if doc.get("series") or doc["results"].get("metadata") is not None:
        parts.append(series_tables(doc))
    if (doc.get("throttled") or {}).get("results"):
        parts.append(throttled_tables(doc))
    if doc.get("scale"):
        parts.append(scale_tables(doc["scale"]))
    return "\n\n".join(parts)


def series_tables(doc: dict[str, Any]) -> str:
    systems = [s["name"] for s in doc["systems"]]
    labels = {s["name"]: s["label"] for s in doc["systems"]}
    head = "| series | metric | " + " | ".join(labels[s] for s in systems) + " |"
    sep = "|---|---|" + "---|" * len(systems)
    lines = [head, sep]
    for series in doc["series"]:
        title = f"{series['label']} ({series['files']} × {series['mean_mb']:.0f} MB)"
        lines += _rows(title, SERIES_ROWS, doc["results"].get(series["name"], {}), systems)
    meta = doc["results"].get("metadata")
    if meta is not None:
        n = doc["config"]["small_files"]
        lines += _rows(f"metadata ({n} small files)", META_ROWS, meta, systems, n)
    targets = series_targets(doc)
    if targets:
        lines += ["", "Issue 10 targets (ratios within this run):", ""] + targets
    targets = issue12_targets(doc)
    if targets:
        lines += ["", "Issue 12 targets (ratios within this run):", ""] + targets
    lines.append("")
    lines.append("Figures in parentheses: this system's figure divided by deltafs's from the "
                 "same run (for times and requests, above 1× means deltafs is better; for "
                 "MB/s, below 1×). n/a: the system could not be installed; —: does not apply.")
    lines.append("")
    lines.append("| series | system | phase | S3 requests by type |")
    lines.append("|---|---|---|---|")
    for sname, per in doc["results"].items():
        for s in systems:
            r = per.get(s) or {}
            for phase, counts in (r.get("requests") or {}).items():
                text = ", ".join(f"{k} {v['count']}" for k, v in
                                 sorted(counts.items(), key=lambda kv: -kv[1]["count"])) or "none"
                lines.append(f"| {sname} | {s} | {phase} | {text} |")
    return "\n".join(lines)


THROTTLED_ROWS: list[tuple[str, Getter, str, bool]] = [
    ("write until in bucket, s", lambda r: r.get("write", {}).get("seconds"), "{:.1f}", True),
    ("cp returned, s", lambda r: r.get("write", {}).get("cp_seconds"), "{:.1f}", True),
    ("cold read, MB/s", lambda r: (r.get("read_cold") or {}).get("mb_per_s"), "{:.0f}", True),
    ("stored / logical", lambda r: r.get("stored_ratio"), "{:.3f}", True),
    ("read back byte-identical", _identical, "{}", False),
    ("peak RSS during copy, MB", lambda r: r.get("peak_rss_mb"), "{:.0f}", True),
]


def throttled_tables(doc: dict[str, Any]) -> str:
    """The bandwidth-limited run: the same series through one slow link."""
    th = doc["throttled"]
    systems = [s["name"] for s in doc["systems"] if s["name"] != "local"]
    labels = {s["name"]: s["label"] for s in doc["systems"]}
    link = th.get("link") or {}
    lines = [f"Through a {th['mbit']:g} Mbit/s link with a {th['rtt_ms']:g} ms round trip "
             f"(bench/throttle.py; {link.get('bytes_up', 0) / 1e6:.0f} MB went up, "
             f"{link.get('bytes_down', 0) / 1e6:.0f} MB down, "
             f"{link.get('connections', 0)} connections):", "",
             "| series | metric | " + " | ".join(labels[s] for s in systems) + " |",
             "|---|---|" + "---|" * len(systems)]
    info = {x["name"]: x for x in doc.get("series", [])}
    for name, per in th["results"].items():
        ser = info.get(name, {})
        title = f"{ser.get('label', name)} ({ser.get('files', '?')} files)"
        lines += _rows(title, THROTTLED_ROWS, per, systems)
    return "\n".join(lines)


def issue12_targets(doc: dict[str, Any]) -> list[str]:
    """Issue 12's acceptance figures that one run can show, each a ratio in that run."""
    res = doc["results"]
    out: list[str] = []
    rss = [((res.get(ser) or {}).get("deltafs") or {}).get("peak_rss_mb")
           for ser in ("wheels", "synthetic")]
    for ser, v in zip(("wheels", "synthetic"), rss):
        if v is not None:
            out.append(f"- peak RSS of deltafs and its children copying {ser}: {v:.0f} MB "
                       f"(target ≤ 150) " + _mark(v <= 150))
    th = ((doc.get("throttled") or {}).get("results") or {}).get("wheels") or {}
    w = (th.get("deltafs") or {}).get("write", {}).get("seconds")
    for peer in ("s3fs", "rclone"):
        p = (th.get(peer) or {}).get("write", {}).get("seconds")
        if w and p:
            out.append(f"- wheels behind {doc['throttled']['mbit']:g} Mbit/s, write until in "
                       f"bucket: {w:.1f} s, {w / p:.2f}× {peer}'s {p:.1f} s (target ≤ 0.5×) "
                       + _mark(w / p <= 0.5))
    wh = res.get("wheels") or {}
    cold = ((wh.get("deltafs") or {}).get("read_cold") or {}).get("mb_per_s")
    rc = ((wh.get("rclone") or {}).get("read_cold") or {}).get("mb_per_s")
    if cold and rc:
        out.append(f"- wheels, loopback cold read: {cold:.0f} MB/s, {cold / rc:.2f}× rclone's "
                   f"{rc:.0f} (target ≥ 0.75×) " + _mark(cold / rc >= 0.75))
    raw = (wh.get("xdelta3") or {}).get("mb_per_s")
    if cold and raw:
        out.append(f"- wheels, cold read against raw `xdelta3 -d` of the same files "
                   f"({raw:.0f} MB/s): {cold / raw:.2f}× (target ≥ 0.5×) "
                   + _mark(cold / raw >= 0.5))
    return out


def series_targets(doc: dict[str, Any]) -> list[str]:
    """Issue 10's acceptance figures, each a ratio within one run: storage by series,
    cold reads against deltafs in DeltaGlider's format, write time against s3fs."""
    res = doc["results"]
    out: list[str] = []

    def get(series: str, system: str, *path: str) -> Any:
        v: Any = res.get(series, {}).get(system) or {}
        for p in path:
            v = (v or {}).get(p) if isinstance(v, dict) else None
        return v

    limits = {"wheels": 0.15, "tars": 0.12, "tgz-python": 0.2, "tgz-gnu": 0.2}
    for series, limit in limits.items():
        ratio = get(series, "deltafs", "stored_ratio")
        if ratio is not None:
            dg = get(series, "deltaglider", "stored_ratio")
            out.append(f"- {series}: stored/logical {ratio:.3f} (target ≤ {limit}"
                       + (f"; DeltaGlider {dg:.3f}" if dg is not None else "") + ") "
                       + _mark(ratio <= limit))
    for what, path in (("mount", ("read_cold", "mb_per_s")), ("deltafs get", ("get_cold", "mb_per_s"))):
        a, b = get("wheels", "deltafs", *path), get("wheels", "deltafs-dg", *path)
        if a and b:
            out.append(f"- wheels, cold read through {what}: {a:.0f} MB/s, "
                       f"{a / b:.2f}× of --format deltaglider's {b:.0f} (target ≥ 0.5×) "
                       + _mark(a / b >= 0.5))
    w, s3 = get("wheels", "deltafs", "write", "seconds"), get("wheels", "s3fs", "write", "seconds")
    if w and s3:
        out.append(f"- wheels, write until in bucket: {w:.1f} s, {w / s3:.2f}× s3fs's "
                   f"{s3:.1f} s (target ≤ 2.5×, 0.2's figure) " + _mark(w / s3 <= 2.5))
    return out


# ---------------------------------------------------------------------------- scale

SCALE_PARTS = [("deltafs_mount", "deltafs, written through the mount"),
               ("deltafs_foreign", "deltafs, foreign objects (boto3)"),
               ("local", "local directory")]
SCALE_STEPS = [("ls_cold", "ls -l, cold"), ("ls_warm", "ls -l, warm"),
               ("find", "find MNT \\| wc -l"), ("rsync", "rsync -a --dry-run"),
               ("rm", "rm of {rm} plain files (xargs -0 rm)"),
               ("rm_deltas", "rm -r of {rm} delta files (cold)")]


def _num(v: Any, fmt: str) -> str:
    return NA if v is None else fmt.format(v)


def _scale_row(part: str, step: str, r: dict[str, Any], files: int) -> str:
    secs = _num(r.get("seconds"), "{:.2f}")
    if r.get("write_seconds") is not None:
        secs += f" (loop {r['write_seconds']:.2f})"
    elif r.get("rm_seconds") is not None:
        secs += f" (rm {r['rm_seconds']:.2f})"
    if r.get("ok") is False or r.get("bucket_ok") is False:
        secs += f" ✗ {r.get('entries')} of {r.get('expected')}"
    total = r.get("requests_total")
    per = NA if total is None or not files else f"{total / files:.2f}"
    stall = r.get("max_loop_stall_ms")
    cells = [secs, _num(total, "{:,}"), per, _num(r.get("peak_rss_mb"), "{:.0f}"),
             _num(stall, "{:.0f}")]
    return f"| {part} | {step} | " + " | ".join(cells) + " |"


# 0.1's cold `ls -l` (issue 11): 61.3 s for 20,000 files written through the mount, one HEAD
# per file; the target is 10x faster per file.
COLD_LS_0_1_S_PER_FILE = 61.3 / 20_000


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def scale_targets(sc: dict[str, Any]) -> list[str]:
    """The scale issue's acceptance points, checked against this run's figures."""
    n, rm = sc["config"]["files"], sc["config"]["rm"]
    mnt = (sc.get("deltafs_mount") or {}).get("steps") or {}
    fgn = (sc.get("deltafs_foreign") or {}).get("steps") or {}
    loc = (sc.get("local") or {}).get("steps") or {}
    rows: list[str] = []

    def lists(step: dict[str, Any]) -> int:
        return ((step.get("requests") or {}).get("ListObjectsV2") or {}).get("count", 0)

    def add(what: str, figure: str, ok: bool) -> None:
        rows.append(f"| {what} | {figure} | {_mark(ok)} |")

    for label, steps in (("written through the mount", mnt), ("foreign objects", fgn)):
        cold = steps.get("ls_cold")
        if cold and cold.get("requests_total") is not None:
            extra = cold["requests_total"] - lists(cold)
            add(f"cold `ls -l`, {label}: requests beyond the LIST pages ≤ 10",
                f"{lists(cold)} LIST + {extra}", extra <= 10)
    for part, label in (("deltafs_mount", "written through the mount"),
                        ("deltafs_foreign", "foreign objects")):
        raw = (sc.get(part) or {}).get("raw_list") or {}
        cold = ((sc.get(part) or {}).get("steps") or {}).get("ls_cold") or {}
        if raw.get("seconds") and cold.get("seconds"):
            rows.append(f"| cold `ls -l`, {label}, against boto3 listing the same prefix "
                        f"({raw['pages']} pages, {raw['seconds']:.2f} s) | "
                        f"{cold['seconds']:.2f} s: {cold['seconds'] / raw['seconds']:.1f}× | |")
    cold = mnt.get("ls_cold")
    if cold and cold.get("seconds") and n:
        was = COLD_LS_0_1_S_PER_FILE * n
        add("cold `ls -l`, written through the mount: ≥ 10× faster than 0.1 "
            f"({was:.0f} s at 0.1's 3.07 ms per file)", f"{was / cold['seconds']:.0f}×",
            cold["seconds"] * 10 <= was)
    heads = (sc.get("deltafs_mount") or {}).get("ls_cold_heads") or {}
    if cold and cold.get("seconds") and heads.get("seconds"):
        ratio = heads["seconds"] / cold["seconds"]
        add("cold `ls -l`, written through the mount: ≥ 10× faster than a HEAD per file "
            f"(same run, same bucket, its manifest moved aside: {heads['seconds']:.1f} s, "
            f"{heads.get('requests_total') or 0:,} requests)", f"{ratio:.1f}×", ratio >= 10)
    warm, lwarm = mnt.get("ls_warm"), loc.get("ls_warm")
    if warm and lwarm and lwarm.get("seconds"):
        ratio = warm["seconds"] / lwarm["seconds"]
        add("warm `ls -l` within 3× a local directory",
            f"{warm['seconds']:.2f} s vs {lwarm['seconds']:.2f} s: {ratio:.1f}×", ratio <= 3)
    for step, what in (("rm_deltas", "`rm -r` of {} delta files"),
                       ("rm", "`rm` of {} plain files")):
        r = mnt.get(step)
        if r and r.get("requests_total") is not None and rm:
            add(what.format(f"{rm:,}") + ": ≤ 1.1 requests per file",
                f"{r['requests_total'] / rm:.2f}", r["requests_total"] <= 1.1 * rm)
    every = [s for part in ("deltafs_mount", "deltafs_foreign")
             for s in [(sc.get(part) or {}).get("create") or {},
                       (sc.get(part) or {}).get("create_deltas") or {},
                       *((sc.get(part) or {}).get("steps") or {}).values()]]
    rss = [s["peak_rss_mb"] for s in every if s.get("peak_rss_mb") is not None]
    stall = [s["max_loop_stall_ms"] for s in every if s.get("max_loop_stall_ms") is not None]
    if rss:
        add("daemon peak RSS < 150 MB in every step", f"{max(rss):.0f} MB", max(rss) < 150)
    if stall:
        add("`max_loop_stall_ms` < 100 in every step", f"{max(stall):.0f} ms",
            max(stall) < 100)
    if not rows:
        return []
    return ["| target | this run | |", "|---|---|---|", *rows, ""]


def scale_tables(sc: dict[str, Any]) -> str:
    cfg = sc["config"]
    n, rm = cfg["files"], cfg["rm"]
    lines: list[str] = []
    if n:
        lines += scale_targets(sc)
        lines += [f"| scale: {n:,} files in one directory | step | seconds | S3 requests | "
                  "requests per file | peak RSS, MB | loop stall, ms |",
                  "|---|---|---|---|---|---|---|"]
        for key, label in SCALE_PARTS:
            r = sc.get(key)
            if r is None:
                continue
            if r.get("error"):
                lines.append(f"| {label} | failed: {r['error'][:200]} | | | | | |")
                continue
            c = r.get("create") or {}
            what = ("create (Python loop), until in bucket" if key == "deltafs_mount" else
                    "put_object × 16 threads (not deltafs)" if key == "deltafs_foreign" else
                    "create (Python loop), then sync -f")
            if key == "deltafs_foreign":
                c = {k: v for k, v in c.items() if k not in ("requests_total",)}
            lines.append(_scale_row(label, what, c, n))
            if r.get("create_deltas"):
                lines.append(_scale_row(label, f"create {rm:,} delta files of 8 KiB, until "
                                        "in bucket", r["create_deltas"], rm))
            for step, slabel in SCALE_STEPS:
                s = (r.get("steps") or {}).get(step)
                if s is not None:
                    lines.append(_scale_row(label, slabel.format(rm=f"{rm:,}"), s,
                                            rm if step.startswith("rm") else n))
        lines += ["", "Seconds: wall time of the step (create and rm: until nothing is "
                  "pending, for the local directory until `sync -f` returned; in parentheses "
                  "the Python loop, or the `rm` itself). "
                  "Requests: every S3 request of the step (moto's counter); per file: "
                  f"divided by {n:,} ({rm:,} for rm). Peak RSS: the daemon and its children "
                  "during the step. Loop stall: the largest `recent_loop_stall_ms` of "
                  "`deltafs status` (worst event-loop stall of the last 10 s), polled once "
                  "a second during the step; —: not reported by this deltafs.", "",
                  "| scale | system | step | S3 requests by type |", "|---|---|---|---|"]
        for key, label in SCALE_PARTS[:2]:
            r = sc.get(key) or {}
            steps = {"create": r.get("create") or {},
                     **({"create_deltas": r["create_deltas"]} if r.get("create_deltas") else {}),
                     **(r.get("steps") or {})}
            for step, s in steps.items():
                counts = s.get("requests")
                if counts is None or (key == "deltafs_foreign" and step == "create"):
                    continue
                text = ", ".join(f"{k} {v['count']}" for k, v in
                                 sorted(counts.items(), key=lambda kv: -kv[1]["count"])) or "none"
                lines.append(f"| {n:,} files | {label} | {step} | {text} |")
    j = sc.get("journal")
    if j is not None:
        if lines:
            lines.append("")
        if j.get("error"):
            lines.append(f"journal of {cfg['journal_rows']:,} rows: failed: {j['error']}")
            return "\n".join(lines)
        ops = j.get("ops") or {}
        lines += [f"| journal: {j['rows_total']:,} rows ({cfg['journal_rows']:,} files in "
                  f"{j['directories']:,} directories) | median, ms | first, ms | max, ms | "
                  "target |", "|---|---|---|---|---|"]
        labels = [("statfs", "statfs (os.statvfs of the mountpoint)"),
                  ("status_xattr", "status: read the xattr user.deltafs.status"),
                  ("status_cli", "status: `deltafs status --json` (CLI, with Python's start)"),
                  ("create", "create a file (open O_CREAT + close) in the 100-entry directory"),
                  ("listdir_stat_100", "os.listdir + os.stat of each of the 100 entries")]
        for key, label in labels:
            o = ops.get(key)
            if not o:
                continue
            tgt = NA
            if o.get("target_ms") is not None:
                tgt = f"< {o['target_ms']:.0f} ms " + ("✓" if o.get("ok") else "✗")
            elif o.get("ok") is False:
                tgt = f"✗ {o.get('entries')} entries"
            lines.append(f"| {label} | {o['median_ms']:.2f} | {o['first_ms']:.2f} | "
                         f"{o['max_ms']:.2f} | {tgt} |")
        loop = ops.get("loop") or {}
        lines += ["", f"Journal: filled in {j['populate_seconds']:.1f} s "
                  f"(state.db {j['state_db_mb']:.0f} MB); mount {j['mount_seconds']:.2f} s, "
                  f"unmount {_num(j.get('unmount_seconds'), '{:.2f}')} s; daemon RSS "
                  f"{_num(j.get('daemon_rss_mb'), '{:.0f}')} MB; worst loop stall since mount "
                  f"{_num(loop.get('max_loop_stall_ms'), '{:.0f}')} ms. Median of "
                  f"{cfg['tries']} tries after a first one."]
    return "\n".join(lines)
