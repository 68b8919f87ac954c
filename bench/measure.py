"""Timing, reading, and memory sampling helpers."""
from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence


def proc_children() -> dict[int, list[int]]:
    """ppid -> child pids, from /proc."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree(pids: Iterable[int]) -> set[int]:
    kids = proc_children()
    seen: set[int] = set()
    todo = list(pids)
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        todo.extend(kids.get(p, ()))
    return seen


def status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cmdline(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return None


def _name(pid: int) -> str:
    line = _cmdline(pid) or b""
    return os.path.basename(line.split(b"\0", 1)[0]).decode(errors="replace") or "?"


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def not_yet_exec(pid: int) -> bool:
    """A child forked (or vforked: the same memory) by its parent and not yet running
    another program: its RSS is the parent's pages, already counted."""
    mine = _cmdline(pid)
    return mine is not None and mine == _cmdline(_ppid(pid))


class RssSampler:
    """Samples the summed RSS of some processes and all their descendants every
    ``interval`` seconds; ``peak`` is the largest sum seen, or the largest VmHWM of a
    root process if that is larger (a peak between two samples). A child caught between
    fork and exec is left out (:func:`not_yet_exec`): it would count the parent twice
    (seen: 241 MB for a daemon at 110 MB spawning xdelta3 thousands of times)."""

    def __init__(self, roots: Callable[[], Sequence[int]], interval: float = 0.2) -> None:
        self.roots = roots
        self.interval = interval
        self.peak_kb = 0
        self.peak_procs = 0
        #: when the peak came (seconds after the start) and how much of it the root
        #: processes held themselves (the rest: their children, e.g. xdelta3)
        self.peak_at = 0.0
        self.peak_roots_kb = 0
        #: the processes summed at the peak: "name:pid:kB", largest first (what the
        #: children were, when a peak is more than the daemon)
        self.peak_detail: list[str] = []
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        roots = [p for p in self.roots() if p]
        if not roots:
            return
        pids = {p for p in tree(roots) if p in roots or not not_yet_exec(p)}
        rss = {p: status_kb(p, "VmRSS") for p in pids}
        total = sum(rss.values())
        hwm = max(status_kb(p, "VmHWM") for p in roots)
        now = time.monotonic() - self._start
        if total > self.peak_kb:
            self.peak_kb, self.peak_procs = total, len(pids)
            self.peak_at = now
            self.peak_roots_kb = sum(rss.get(p, 0) for p in roots)
            self.peak_detail = [f"{_name(p)}:{p}:{kb}" for p, kb in
                                sorted(rss.items(), key=lambda i: -i[1])]
        if hwm > self.peak_kb:
            # a peak between two samples, of a root process alone
            self.peak_kb, self.peak_at, self.peak_roots_kb = hwm, now, hwm
            self.peak_detail = [f"VmHWM:{p}:{hwm}" for p in roots]

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    @property
    def peak_mb(self) -> float:
        return self.peak_kb * 1024 / 1e6


def drop_page_cache(paths: Iterable[Path]) -> None:
    """Evict these files from the page cache (only these: other work is left alone)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fsync_all(paths: Iterable[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_files(paths: Sequence[Path], expect: dict[str, str]) -> dict[str, object]:
    """Read every file whole (1 MiB reads), hashing it; the wall time, the bytes, and how
    many came back byte-identical to the source (SHA-256)."""
    t0 = time.perf_counter()
    nbytes = 0
    same = 0
    bad: list[str] = []
    errors: list[str] = []
    for p in paths:
        h = hashlib.sha256()
        try:
            with open(p, "rb", buffering=0) as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    nbytes += len(chunk)
        except OSError as exc:
            errors.append(f"{p.name}: {exc}")
            continue
        if h.hexdigest() == expect.get(p.name):
            same += 1
        else:
            bad.append(p.name)
    secs = time.perf_counter() - t0
    return {"seconds": secs, "bytes": nbytes, "identical": same, "files": len(paths),
            "mismatched": bad, "errors": errors,
            "mb_per_s": nbytes / 1e6 / secs if secs > 0 else None}


def timed(argv: Sequence[str] | str, **kw: object) -> float:
    """Run a command (output discarded), check it succeeded, return its wall time."""
    t0 = time.perf_counter()
    res = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         shell=isinstance(argv, str), **kw)  # type: ignore[call-overload]
    secs = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{argv} failed ({res.returncode}): "
                           f"{res.stderr.decode(errors='replace').strip()[-800:]}")
    return secs


def raw_decode(files: Sequence[Path], work: Path) -> dict[str, object]:
    """The codec's own speed on a series, for the cold-read comparison: each version is
    encoded against the one before it (deltafs's settings: ``-6 -S djw``, 4 MiB target
    windows, -B 64 MiB), then ``xdelta3 -d`` of every delta is timed, output written to a
    file as a decode into the cache does (no S3, no FUSE, no hashing). MB/s = bytes of
    the decoded versions / the decodes' wall time."""
    if len(files) < 2:
        return {}
    d = work / "raw-decode"
    d.mkdir(exist_ok=True)
    pairs = list(zip(files, files[1:]))
    for i, (ref, tgt) in enumerate(pairs):
        with open(d / f"{i}.vcdiff", "wb") as out:
            subprocess.run(["xdelta3", "-e", "-6", "-c", "-S", "djw", "-W", str(4 << 20),
                            "-B", str(64 << 20), "-s", str(ref), str(tgt)],
                           stdout=out, check=True)
    for ref, _ in pairs:  # the sources come from the page cache, as the cache's do
        ref.read_bytes()
    total = 0
    t0 = time.perf_counter()
    for i, (ref, tgt) in enumerate(pairs):
        with open(d / "out", "wb") as out:
            subprocess.run(["xdelta3", "-d", "-c", "-s", str(ref), str(d / f"{i}.vcdiff")],
                           stdout=out, check=True)
        total += tgt.stat().st_size
    secs = time.perf_counter() - t0
    delta_bytes = sum((d / f"{i}.vcdiff").stat().st_size for i in range(len(pairs)))
    for p in d.iterdir():
        p.unlink()
    d.rmdir()
    return {"files": len(pairs), "bytes": total, "seconds": secs,
            "mb_per_s": total / 1e6 / secs, "delta_bytes": delta_bytes}
