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
