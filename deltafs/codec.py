"""xdelta3 as a subprocess: encode with an early give-up, decode with a verified hash.

Why a subprocess: the binary is what DeltaGlider uses, so deltas stay mutually readable,
and a child process keeps big buffers out of our heap. Why we stream through pipes:
the target goes in on stdin and the delta comes out on stdout, so we always know how much
input xdelta3 has consumed and how much it has produced. That lets an encode stop as soon
as the delta is sure (or very likely) to be useless, instead of paying for the whole file,
and lets a decode hash the output on its way to disk (one pass, no re-read).

Every call is blocking: run it in a worker thread (the filesystem does so through trio).
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import queue
import select
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import membudget
from .blocksums import BLOCK as SUM_BLOCK, add_sums  # a decode hands the cache its sums
from .errors import CodecError, IntegrityError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
#: xdelta3 keeps this much of the source in memory by default; above it we raise -B so
#: that matches anywhere in a large reference are found (a block moved from the start of
#: a 160 MB file to its end must still match).
DEFAULT_SOURCE_WINDOW = 64 << 20
#: target window: output appears after each window, which is what makes early give-up
#: possible. 4 MiB costs < 0.1 % in delta size against the 8 MiB default.
TARGET_WINDOW = 4 << 20
#: xdelta3 refuses a smaller -W
MIN_TARGET_WINDOW = 16 << 10
#: xdelta3 refuses a smaller -B
MIN_SOURCE_WINDOW = 512 << 10


class CodecStats:
    """How many xdelta3 children this process ran and the seconds they took (for
    ``deltafs status`` and the metrics). Noted by the worker threads that run the codec,
    hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs = {"encode": 0, "decode": 0}
        self._seconds = {"encode": 0.0, "decode": 0.0}

    def note(self, kind: str, seconds: float) -> None:
        with self._lock:
            self._runs[kind] += 1
            self._seconds[kind] += seconds

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {"encodes": self._runs["encode"],
                    "encode_seconds": round(self._seconds["encode"], 6),
                    "decodes": self._runs["decode"],
                    "decode_seconds": round(self._seconds["decode"], 6)}


#: this process's xdelta3 runs (each encode and each decode attempt, whatever its end)
stats = CodecStats()


def xdelta3_path() -> str:
    """The xdelta3 binary, or a CodecError that says how to get it."""
    path = os.environ.get("DELTAFS_XDELTA3") or shutil.which("xdelta3")
    if not path or not os.access(path, os.X_OK):
        raise CodecError(
            "xdelta3 not found: install it (Debian/Ubuntu: apt-get install xdelta3) "
            "or set DELTAFS_XDELTA3 to the binary"
        )
    return path


@dataclass(frozen=True)
class EncodeResult:
    """Outcome of one encode. ``delta_size`` is ``None`` when the encode gave up."""

    delta_size: int | None
    command: str
    reason: str = ""  # why it gave up


@dataclass(frozen=True)
class Limits:
    """When an encode is not worth finishing.

    ``max_ratio``: a delta at or above this share of the file is discarded.
    ``hopeless_ratio``/``probe_fraction``: after ``probe_fraction`` of the input has gone in,
    output already at ``hopeless_ratio`` of the input means the delta will not pay off
    (on unrelated or compressed data xdelta3 emits ~100 % from the first window on).
    """

    max_ratio: float = 0.75
    hopeless_ratio: float = 0.9
    probe_fraction: float = 0.25
    probe_min_bytes: int = 4 << 20
    timeout: float = 3600.0
    #: the widest source window (-B) an encode may use; xdelta3 needs ~1.6x this in RAM
    max_window: int = 1 << 30
    #: xdelta3 compression level (-0 .. -9): -3, xdelta3's own default (see ``encode``)
    level: int = 3


#: xdelta3's large-match hash table, in bytes per byte of -B (rounded up to a power of
#: two), by level. Measured (peak RSS of an 8 KiB encode at -B 64 MiB, less 3.3 MB):
#: -0..-1: 8.6 MB, -2: 17, -3..-5: 33, -6: 66, -7..-9: 131.
_HASH_SHARE = {0: 0.125, 1: 0.125, 2: 0.25, 3: 0.5, 4: 0.5, 5: 0.5, 6: 1.0, 7: 2.0, 8: 2.0,
               9: 2.0}
_MiB = 1 << 20
#: the narrowest window an encode is narrowed to when memory is short
MIN_FIT_WINDOW = 8 << 20
#: what a decode keeps of its source by default (xdelta3's own -B default)
DECODE_WINDOW = 64 << 20
#: the narrowest source window a decode is given
MIN_DECODE_WINDOW = 8 << 20


#: sources xdelta3 decompresses itself (through an external program) unless given -D:
#: gzip, bzip2, xz, lzma, compress. xdelta3's own list, not ``format.is_compressed_stream``
#: (which is about what a byte delta gains: it has zstd, which xdelta3 reads raw)
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x5d\x00\x00", b"\x1f\x9d")


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def target_window(size: int) -> int:
    """-W for a target of ``size`` bytes. Fed through a pipe, xdelta3 cannot see the
    target's size and sizes its buffers and tables from -W: an 8 KiB file's encode took
    20.0 MB of RAM at -W 4 MiB and 3.7 MB at -W 16 KiB (``/usr/bin/time -f %M``, the
    target fed through a pipe). A target that fits in one window is encoded as that one window either
    way, so the delta is the same."""
    return min(TARGET_WINDOW, max(MIN_TARGET_WINDOW, _pow2(size)))


def encode_footprint(window: int, ref_size: int, size: int, level: int) -> int:
    """Predicted peak RSS of one ``xdelta3 -e``: the hash table (sized from -B, whatever
    the source), the source read into memory (up to -B), about three times the target
    window (:func:`target_window`) in buffers, and a few MiB of its own. Measured with
    ``/usr/bin/time -f %M``
    (docs/performance.md, "Memory"): 103.6 MB predicted 103 for a 15 MiB wheel at
    -6 -B 64 MiB, 71.6 for 71 at -B 32 MiB; 120.5 for 120 for a 190 MiB image at -3
    -B 64 MiB, 48.4 for 48 at -B 16 MiB; 67.2 for an 8 KiB file at -6 -B 64 MiB."""
    hashed = int(_pow2(window) * _HASH_SHARE.get(level, 2.0))
    body = min(ref_size, window) + 3 * target_window(size)
    slack = 8 * _MiB if size > _MiB or ref_size > _MiB else 0
    return 4 * _MiB + hashed + body + slack


def decode_footprint(ref_size: int, window: int = DECODE_WINDOW) -> int:
    """Predicted peak RSS of one ``xdelta3 -d``: the source blocks it keeps (up to -B)
    and ~8 MiB of windows and buffers (measured: 21 MB for a 15 MiB wheel, 72 MB for a
    190 MiB image at the default -B, 24 MB at -B 16 MiB)."""
    return min(ref_size, window) + 8 * _MiB


def fit_encode(window: int, ref_size: int, size: int, level: int, room: int) -> int:
    """The widest -B, at most ``window``, whose encode fits in ``room``: halved down to
    ``MIN_FIT_WINDOW`` (or ``window`` itself if smaller). Narrowing costs little where
    changes stay in place: xdelta3 slides its source window along with the target
    (identical deltas for the 190 MiB images at -B 16 MiB; +0.9 % for a wheel's delta
    at -B 32 MiB against 64)."""
    while encode_footprint(window, ref_size, size, level) > room \
            and window // 2 >= MIN_FIT_WINDOW:
        window //= 2
    return window


def fit_decode(ref_size: int, room: int) -> int:
    """-B for a decode: the default, halved while it does not fit in ``room`` (a smaller
    window is as correct, only re-reads source blocks from the page cache)."""
    window = DECODE_WINDOW
    while decode_footprint(ref_size, window) > room and window // 2 >= MIN_DECODE_WINDOW:
        window //= 2
    return window


def source_window(ref_size: int) -> int:
    """-B for a reference of ``ref_size``: the default, or the whole reference above it
    (rounded up to a MiB), so no match is lost to the window."""
    if ref_size <= DEFAULT_SOURCE_WINDOW:
        return DEFAULT_SOURCE_WINDOW
    return ((ref_size + (1 << 20) - 1) >> 20) << 20


def encode_window(ref_size: int, size: int, full_window: bool, max_window: int) -> int:
    """-B for one encode. xdelta3 allocates all of -B up front, whatever the source's
    size (68 MB of RAM for an 8 KiB file at the 64 MiB default). When the target is one
    target window and the source fits in -B, every match is found whatever -B is
    (measured: identical deltas), so small files get a window just over their
    reference. Larger targets keep the default: there -B also bounds how far each
    target window's source window reaches (a 16 MB wheel's delta grows 2 % at -B 16 MiB).
    An empty source (a chain's keyframe) needs no window at all."""
    if ref_size == 0 or (size <= TARGET_WINDOW and ref_size <= TARGET_WINDOW):
        return max(MIN_SOURCE_WINDOW, (ref_size + 0xFFFF) & ~0xFFFF)
    if not full_window:
        return DEFAULT_SOURCE_WINDOW
    return min(source_window(ref_size), max(max_window, DEFAULT_SOURCE_WINDOW))


def encode(
    source: Path,
    target: Path,
    out: Path,
    *,
    limits: Limits = Limits(),
    full_window: bool = True,
) -> EncodeResult:
    """Write the VCDIFF of ``target`` against ``source`` to ``out``.

    Returns ``delta_size=None`` (and removes ``out``) when the delta would reach
    ``limits.max_ratio`` of the target, found out as early as the output shows it.
    ``full_window=False`` keeps xdelta3's default source window (enough when target and
    source are aligned, e.g. the zero-diff delta of a file against itself).
    """
    binary = xdelta3_path()
    size = target.stat().st_size
    ref_size = source.stat().st_size
    window = encode_window(ref_size, size, full_window, limits.max_window)
    # the level trades match search depth for memory and time. The 19 pairs of release
    # wheels at -B 16 MiB: -6 makes 1.1 % smaller deltas than -3 for 1.25-1.5x the
    # encode time (17.3 s against 13.9 s on the AMD machine of 2026-12-02; 5.8 against
    # 3.9 s on the Intel one of 2026-12-01). Through a mount the whole series stored
    # 0.1299 of its size at -6 and 0.1304 at -3, and was in the bucket after 24.8 s
    # against 18.9: the encodes of a series run one after another (each against the
    # version before), so the level is the write's speed, and 0.4 % more bytes costs a
    # fraction of a second even on a 20 Mbit/s uplink. -3 it is (xdelta3's default);
    # --level 6 or 9 (DeltaGlider's: 0.2 % less again for twice the time and ~200 MB
    # of RAM) for who pays more for storage than for time.
    # above the default window the level's hash tables grow with it: -3 keeps a 1 GB
    # encode near 125 MB of RAM where -6 needs 160 MB
    level = limits.level if ref_size <= DEFAULT_SOURCE_WINDOW else min(limits.level, 3)
    budget = membudget.current()
    narrowed = fit_encode(window, ref_size, size, level, budget.room())
    if narrowed != window:
        log.debug("encode of %s: -B %d MiB instead of %d (memory limit)", target.name,
                  narrowed >> 20, window >> 20)
        window = narrowed
    need = encode_footprint(window, ref_size, size, level)
    with budget.hold(need, f"encode of {target.name}"):
        t0 = time.monotonic()
        try:
            return _encode_run(binary, source, target, out, size, window, level, limits)
        finally:
            stats.note("encode", time.monotonic() - t0)


def _encode_run(binary: str, source: Path, target: Path, out: Path, size: int, window: int,
                level: int, limits: Limits) -> EncodeResult:
    args = [binary, "-e", f"-{level}", "-c", "-D", "-S", "djw", "-W", str(target_window(size)),
            "-B", str(window), "-s", str(source)]
    command = f"xdelta3 -e -{level} -D -S djw -B {window} -s reference.bin"
    budget = max(int(size * limits.max_ratio), 1) if size else None
    probe_at = max(int(size * limits.probe_fraction), limits.probe_min_bytes)

    fed = 0
    feed_error: list[BaseException] = []

    def feeder(stdin) -> None:  # type: ignore[no-untyped-def]
        nonlocal fed
        try:
            with open(target, "rb") as f:
                while chunk := f.read(CHUNK):
                    stdin.write(chunk)
                    fed += len(chunk)
        except BrokenPipeError:
            pass  # we killed xdelta3 on purpose, or it failed: stderr says which
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            feed_error.append(exc)
        finally:
            try:
                stdin.close()
            except OSError:
                pass

    deadline = time.monotonic() + limits.timeout
    proc = _spawn(args, stdin=subprocess.PIPE)
    thread = threading.Thread(target=feeder, args=(proc.stdin,), daemon=True)
    thread.start()
    produced = 0
    reason = ""
    try:
        with open(out, "wb") as f:
            assert proc.stdout is not None
            while chunk := proc.stdout.read(CHUNK):
                f.write(chunk)
                produced += len(chunk)
                if budget is not None and produced >= budget:
                    reason = f"delta passed {limits.max_ratio:.0%} of the file"
                    break
                if fed >= probe_at and fed < size and produced >= fed * limits.hopeless_ratio:
                    reason = (f"delta was {produced / fed:.0%} of the first {fed >> 20} MiB: "
                              "no similarity to the reference")
                    break
                if time.monotonic() > deadline:
                    raise CodecError(f"xdelta3 encode timed out after {limits.timeout:.0f} s")
        if reason:
            proc.kill()
    except BaseException:
        proc.kill()
        raise
    finally:
        thread.join()
        proc.stdin = None  # closed by the feeder; keep communicate() from touching it
        stderr = _finish(proc, deadline)
    if reason:
        out.unlink(missing_ok=True)
        log.debug("encode of %s given up: %s", target, reason)
        return EncodeResult(None, command, reason)
    if feed_error:
        out.unlink(missing_ok=True)
        raise CodecError(f"cannot read {target}: {feed_error[0]}")
    if proc.returncode != 0:
        out.unlink(missing_ok=True)
        raise CodecError(f"xdelta3 encode failed: {stderr}")
    if budget is not None and produced >= budget:
        out.unlink(missing_ok=True)
        return EncodeResult(None, command, f"delta passed {limits.max_ratio:.0%} of the file")
    return EncodeResult(produced, command)


def decode(
    source: Path,
    delta: Path,
    out: Path,
    expected_sha256: str,
    *,
    timeout: float = 3600.0,
    sums: bytearray | None = None,
) -> None:
    """Rebuild a file into ``out`` and check it against ``expected_sha256``. ``sums``:
    filled with the sum of each cache block of the output, computed as it is written
    (the cache takes them, instead of reading the file again).

    Tries without ``-D`` first (what Python DeltaGlider wrote needs that), then with
    ``-D`` (what a writer that encoded against a compressed reference with ``-D`` needs).
    On failure ``out`` is removed and IntegrityError says why; never is a wrong byte kept.
    A full disk (or quota, or file size limit) is the OSError our write raised, not a
    corrupt object, and is not tried again.
    """
    xdelta3_path()  # a missing binary is a CodecError, not a corrupt object
    errors: list[str] = []
    ref_size = source.stat().st_size
    with open(source, "rb") as f:
        compressed = f.read(6).startswith(_COMPRESSED_MAGIC)
    budget = membudget.current()
    for extra in ([], ["-D"]):
        if compressed and not extra:
            # xdelta3 reads a compressed source through a decompressor pipe, which it
            # cannot seek: a window narrower than the encoder's fails, and what it keeps
            # is up to -B of the *decompressed* stream
            window, need = DECODE_WINDOW, DECODE_WINDOW + 8 * _MiB
        else:
            window = fit_decode(ref_size, budget.room())
            need = decode_footprint(ref_size, window)
            if window != DECODE_WINDOW:
                extra = [*extra, "-B", str(window)]
        if sums is not None:
            del sums[:]
        try:
            with budget.hold(need, f"decode of {delta.name}", first=True):
                t0 = time.monotonic()
                try:
                    digest = _decode_once(source, delta, out, extra, timeout, sums)
                finally:
                    stats.note("decode", time.monotonic() - t0)
        except OSError:
            out.unlink(missing_ok=True)
            raise
        except CodecError as exc:
            errors.append(str(exc))
            continue
        if digest == expected_sha256:
            return
        errors.append(f"SHA-256 mismatch ({digest[:12]}… instead of {expected_sha256[:12]}…)")
    out.unlink(missing_ok=True)
    raise IntegrityError("; ".join(dict.fromkeys(errors)))


#: output buffers of one decode: one filled from the pipe while the others are hashed
#: and written
DECODE_RING = 3


class _Writer:
    """Writes a decode's output chunks to its file in a thread of its own, so that the
    write (measured in the daemon: 36 ms of a 16 MB wheel's 64 ms decode, the page cache
    taking new pages) overlaps the hashing and the wait for xdelta3 instead of adding
    to them. Buffers go back to the reader once written; a write error is kept for the
    reader to raise (the buffers keep coming back, so the reader never blocks on a dead
    writer)."""

    def __init__(self, f: "io.FileIO", bufs: list[bytearray]) -> None:
        self.f, self.bufs = f, bufs
        self.free: "queue.SimpleQueue[int]" = queue.SimpleQueue()
        self.todo: "queue.SimpleQueue[tuple[int, int] | None]" = queue.SimpleQueue()
        self.error: BaseException | None = None
        for i in range(len(bufs)):
            self.free.put(i)
        self.thread = threading.Thread(target=self._run, name="deltafs-decode-write",
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.todo.get()) is not None:
            i, n = item
            if self.error is None:
                try:
                    with memoryview(self.bufs[i]) as view:
                        done = 0
                        while done < n:  # a short write is continued, never dropped
                            done += self.f.write(view[done:n]) or 0
                except BaseException as exc:  # noqa: BLE001 - raised by the reader
                    self.error = exc
            self.free.put(i)

    def take(self) -> int:
        """A buffer to fill (raises the write error, if any)."""
        i = self.free.get()
        if self.error is not None:
            raise self.error
        return i

    def close(self) -> None:
        """Wait for every queued write; raise the write error, if any."""
        self.todo.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def _pump(fd: int, ready: "select.poll", deadline: float, timeout: float,
          bufs: list[bytearray], writer: _Writer, digest: "hashlib._Hash",
          sums: bytearray | None) -> None:
    """Read xdelta3's output into the ring until its end: each chunk is handed to the
    writer, then hashed and summed here (both only read the buffer; it is filled again
    only once both are done)."""
    while True:
        i = writer.take()
        # fill the whole chunk (a pipe gives at most what it holds): every chunk but the
        # last is a whole number of cache blocks, summed in place
        with memoryview(bufs[i]) as view:
            n = 0
            while n < CHUNK:
                # wait for output no longer than the deadline: a hung xdelta3 must not
                # hold this worker thread for ever
                if not ready.poll(max(0.0, deadline - time.monotonic()) * 1000):
                    raise CodecError(f"xdelta3 decode timed out after {timeout:.0f} s")
                got = os.readv(fd, [view[n:]])
                if not got:
                    break
                n += got
            if not n:
                writer.free.put(i)
                return
            writer.todo.put((i, n))
            with view[:n] as data:
                digest.update(data)
                if sums is not None:
                    add_sums(sums, data)
        if time.monotonic() > deadline:
            raise CodecError(f"xdelta3 decode timed out after {timeout:.0f} s")
        if n < CHUNK:
            return


def _decode_once(source: Path, delta: Path, out: Path, extra: list[str], timeout: float,
                 sums: bytearray | None = None) -> str:
    args = [xdelta3_path(), "-d", "-c", *extra, "-s", str(source), str(delta)]
    deadline = time.monotonic() + timeout
    digest = hashlib.sha256()
    proc = _spawn(args, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    _widen_pipe(fd)
    ready = select.poll()
    ready.register(fd, select.POLLIN)
    bufs = [bytearray(CHUNK) for _ in range(DECODE_RING)]
    try:
        with open(out, "wb", buffering=0) as f:
            writer = _Writer(f, bufs)
            try:
                _pump(fd, ready, deadline, timeout, bufs, writer, digest, sums)
            except BaseException as exc:
                # the writer is stopped and joined while the file is still open (review:
                # joined after the ``with``, it wrote to a closed, maybe reused, fd)
                writer.todo.put(None)
                writer.thread.join()
                if isinstance(writer.error, OSError) and isinstance(exc, Exception) and \
                        not isinstance(exc, OSError):
                    # a full disk that the reader saw as a timeout or an error of its own
                    # is still a full disk (not retried, not a corrupt object)
                    raise writer.error from None
                raise
            writer.close()  # every byte hashed is in the file, or this raises
    except BaseException:
        proc.kill()
        _finish(proc, deadline)
        raise
    stderr = _finish(proc, deadline)
    if proc.returncode != 0:
        raise CodecError(f"xdelta3 decode failed: {stderr or f'exit {proc.returncode}'}")
    return digest.hexdigest()


def _widen_pipe(fd: int) -> None:
    """Let xdelta3 run a chunk ahead of us: through the default 64 KiB pipe the two take
    turns (a 16 MB wheel's decode: 53 ms; with 1 MiB, 36 ms; xdelta3 to a file, 24-33).
    Up to ``/proc/sys/fs/pipe-max-size`` (1 MiB by default); smaller, or not at all, is
    only slower."""
    for size in (CHUNK, 256 << 10):
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
            return
        except OSError:
            continue


def _spawn(args: list[str], stdin: int) -> subprocess.Popen:  # type: ignore[type-arg]
    try:
        return subprocess.Popen(args, stdin=stdin, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, bufsize=0)
    except OSError as exc:
        raise CodecError(f"cannot run xdelta3: {exc}") from None


def _finish(proc: subprocess.Popen, deadline: float) -> str:  # type: ignore[type-arg]
    """Reap the child and return its stderr (last line, trimmed)."""
    try:
        _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    text = (err or b"").decode("utf-8", "replace").strip()
    return text.splitlines()[-1] if text else ""


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in chunks (never whole in memory)."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)  # one buffer, reused: no fresh 1 MiB mapping per chunk (memtrim)
    with open(path, "rb", buffering=0) as f, memoryview(buf) as view:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()
