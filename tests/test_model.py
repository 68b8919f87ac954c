"""Model-based test of a real deltafs mount (issue 8, "Trust").

A Hypothesis state machine (:class:`FsMachine`) drives one real ``deltafs mount`` of a
moto bucket with random sequences of filesystem operations and keeps a plain in-memory
model beside it: path -> inode, inode -> bytes, a set of directories, the open file
descriptors. After every step the mount's tree (names, kinds, sizes, every byte) must
equal the model; every errno must be the one Linux would give for the model's tree.

Operations: create a file with content, ``pwrite`` at an offset (extending, leaving holes),
``truncate`` (shrink and extend, by path and on an open descriptor), rename (a file over
nothing, a file over a file, a directory, and the error cases), unlink, mkdir, rmdir
(empty, non-empty: ENOTEMPTY, a file: ENOTDIR), reserved names (EPERM), open
descriptors kept across steps (several on one file, written through each, closed in any
order, renamed or unlinked while open), fsync in the middle of writing (after it returns
the bucket must hold that version), and the mount's life:

- ``crash``: ``kill -9`` of the daemon, ``fusermount3 -u``, mount again with the SAME
  cache directory. Every file whose ``close()`` (or ``fsync()``) returned must come back
  with its bytes; a file open for writing at the crash may come back as it was at its
  last close/fsync or as it was when the daemon died (or not at all, or empty, if it was
  never closed), nothing else.
- ``remount_wiped``: ``deltafs umount`` (waits for every upload), wipe the cache, mount:
  the tree comes from the bucket alone and must be the same.
- ``wait_uploads_remount``: wait until nothing is pending, then remount (clean, or a
  ``kill -9``) with the same cache.
- ``faults_on``: the mount talks to S3 through ``tests/faultproxy.py``; for a few steps
  every request gets ``503 SlowDown``, or the connection is refused, or it takes 0.6 s
  longer. Writes must still work (they are staged locally); when the fault ends,
  everything must upload, and a wiped-cache remount must give the model's tree.
- ``pause``: sleep past the 0.5 s settle delay, so that the next steps race with
  uploads, moves and deletions in flight.

Names are short ASCII and UTF-8 from a small pool (so renames and creations collide);
sizes 0..300 KiB, many at or above 64 KiB, all cut from one shared random base with a few
bytes changed, so that versions of a file (and files of a directory) are similar and
uploads really produce deltas against the directory's ``reference.bin``.

One mount serves the whole test function (mounted with ``--listing-ttl 2`` so that
directories are listed again while files change under them); each Hypothesis example
works in a fresh top-level directory ``exNNNN``. At the end every example's final tree is
checked once more after a wiped-cache remount, and a summary (examples, steps, rules,
mounts, deltas in the bucket) is printed. Whenever nothing is pending (after waiting for
the uploads, after ``deltafs umount``, at the end), the bucket itself must hold exactly
the model: one object per file (``name`` or ``name.delta``), a marker per directory,
nothing left behind.

Profiles (environment variables):

- default (CI): 20 examples of at most 20 steps, at most 2 remounts/crashes/faults per
  example; under 2 minutes on a 2-core machine.
- ``DELTAFS_SOAK=1``: 500 examples of at most 50 steps, at most 6 remounts per example,
  each fault held until an upload failed (deltafs's own retry, not only botocore's);
  a couple of hours.
- ``DELTAFS_MODEL_EXAMPLES=N`` / ``DELTAFS_MODEL_STEPS=N`` override either profile;
  ``DELTAFS_MODEL_PREFIX=some/prefix`` mounts ``s3://BUCKET/some/prefix`` instead of the
  bucket's root; ``DELTAFS_MODEL_MOUNT_ARGS="--debug"`` adds mount arguments.

Run with ``-s`` to see the summary line; ``--hypothesis-seed=N`` picks the seed. A
failure prints Hypothesis's shortest step sequence, the operations as executed (with the
resolved paths) and the daemon log tail.
"""
from __future__ import annotations

import collections
import errno
import functools
import hashlib
import os
import random
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from mountfixtures import Mount, in_mount_table, pid_alive

try:  # the fault-injecting proxy (tests/faultproxy.py)
    from faultproxy import FaultProxy, fault_proxy  # noqa: F401  (fixture, used by name)
except ImportError:  # pragma: no cover - the fault rules need it
    FaultProxy = None  # type: ignore[assignment,misc]

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.usefixtures("fuse_tools"),
]

KiB = 1 << 10
MAX_SIZE = 300 * KiB
MIN_DELTA = 64 * KiB
#: every content is cut from this base (shared by all files: similar versions, deltas)
BASE = random.Random(0xDE17AF5).randbytes(MAX_SIZE + 64 * KiB)
#: the name pool: short ASCII, a space, UTF-8 (2- and 3-byte sequences)
NAMES = ("a", "b", "c.bin", "x y", "é", "日本", "Ωmega.tar")
MAX_DEPTH = 3
MAX_HANDLES = 4

SOAK = os.environ.get("DELTAFS_SOAK", "") not in ("", "0")
EXAMPLES = int(os.environ.get("DELTAFS_MODEL_EXAMPLES") or (500 if SOAK else 20))
STEPS = int(os.environ.get("DELTAFS_MODEL_STEPS") or (50 if SOAK else 20))
#: remounts (crash, wiped, clean) per example: they cost ~1-2 s each
MAX_CYCLES = 6 if SOAK else 2
#: mount ``s3://BUCKET/PREFIX`` instead of the bucket's root
PREFIX = os.environ.get("DELTAFS_MODEL_PREFIX", "")
#: more ``deltafs mount`` arguments (e.g. ``--debug``)
MOUNT_ARGS = os.environ.get("DELTAFS_MODEL_MOUNT_ARGS", "").split()
#: what the ``pause`` rule sleeps: past the 0.5 s settle delay, so that uploads start
PAUSES = [0.05, 0.6, 1.5] if SOAK else [0.05, 0.6]
#: steps a fault stays on (then the machine turns it off and checks the bucket)
FAULT_STEPS = (1, 4)
#: before a fault ends, wait (at most this long) until the daemon met it: in CI one
#: faulted request (botocore's retries); in the soak a failed upload (deltafs's backoff)
FAULT_HOLD = 30.0 if SOAK else 5.0


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _en(code: int | None) -> str:
    return "success" if code is None else errno.errorcode.get(code, str(code))


# ----------------------------------------------------------------------------------------
# contents


@dataclass(frozen=True)
class Blob:
    """``size`` bytes of BASE from ``at + shift`` with ``edits`` (pos % size, byte)
    applied: versions of a file drawn this way are similar to each other."""

    size: int
    shift: int = 0
    edits: tuple[tuple[int, int], ...] = ()

    def render(self, at: int = 0) -> bytes:
        start = at + self.shift
        buf = bytearray(BASE[start:start + self.size])
        assert len(buf) == self.size
        for pos, val in self.edits:
            if self.size:
                buf[pos % self.size] = val
        return bytes(buf)


_edits = st.lists(st.tuples(st.integers(0, MAX_SIZE), st.integers(0, 255)),
                  max_size=3).map(tuple)
_shifts = st.sampled_from([0, 1, 4096, 64 * KiB])
file_sizes = st.one_of(
    st.integers(0, 2 * KiB),
    st.integers(MIN_DELTA, MAX_SIZE),
    st.sampled_from([0, 1, MIN_DELTA - 1, MIN_DELTA, 100 * KiB, MAX_SIZE]),
)
blobs = st.builds(Blob, size=file_sizes, shift=_shifts, edits=_edits)
chunks = st.builds(Blob, size=st.one_of(st.integers(1, 512), st.integers(1, 32 * KiB)),
                   shift=_shifts, edits=_edits)
offsets = st.one_of(st.integers(0, MAX_SIZE),
                    st.sampled_from([0, 4096, MIN_DELTA - 1, MIN_DELTA, 200 * KiB]))
picks = st.integers(0, 255)
names = st.sampled_from(NAMES)


# ----------------------------------------------------------------------------------------
# the shared context of one test function


@dataclass
class Ctx:
    mount: Mount
    proxy: Any  # FaultProxy or None
    examples: int = 0
    steps: int = 0
    rules: collections.Counter[str] = field(default_factory=collections.Counter)
    rule_secs: collections.Counter[str] = field(default_factory=collections.Counter)
    mounts: int = 0
    #: every example's operations, as executed, are appended here
    trace_file: Path | None = None
    #: exNNNN -> (files rel -> sha256, dirs) of every example that ended cleanly
    finished: dict[str, tuple[dict[str, str], set[str]]] = field(default_factory=dict)

    def reset(self) -> None:
        """After a failed example: a new daemon with an empty cache, so that whatever the
        failure left in the journal (a stuck upload, a broken state) cannot fail the
        examples Hypothesis runs next while it shrinks."""
        m = self.mount
        if self.proxy is not None:
            self.proxy.clear()
        if m.pid is not None and pid_alive(m.pid):
            m.kill9()
        m.pid = None
        m.force_unmount()
        m.wipe_cache()
        m.mount()
        self.mounts += 1

    def ensure_alive(self) -> None:
        """A previous (failed) example may have left the daemon dead: mount again."""
        m = self.mount
        if m.pid is not None and pid_alive(m.pid) and in_mount_table(m.mountpoint):
            return
        if m.pid is not None and pid_alive(m.pid):
            m.kill9()
        m.pid = None
        m.force_unmount()
        if self.proxy is not None:
            self.proxy.clear()
        m.mount()
        self.mounts += 1


@dataclass
class Handle:
    fd: int
    ino: int
    opened_as: str


def needs(cond: Callable[[Any], Any]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A precondition on state that the mount's answers shape (which files come back
    after a crash, whether an open succeeded under faults), checked inside the rule: a
    rule that finds nothing to act on does nothing. Hypothesis requires the choice of
    rules to depend on drawn data alone; a ``precondition`` on such state made it fail
    with ``FlakyStrategyDefinition`` (seen in a full run) instead of testing."""

    def deco(fn: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(fn)
        def wrapper(self: Any, **kw: Any) -> None:
            if cond(self):
                fn(self, **kw)

        return wrapper

    return deco


def step(fn: Callable[..., None]) -> Callable[..., None]:
    """Count the step, record it, handle the fault budget; mark the machine clean only
    when the rule returned."""

    @functools.wraps(fn)
    def wrapper(self: FsMachine, **kw: Any) -> None:
        self._begin(fn.__name__)
        t0 = time.monotonic()
        fn(self, **kw)
        self.ctx.rule_secs[fn.__name__] += time.monotonic() - t0
        self.clean = True

    return wrapper


class FsMachine(RuleBasedStateMachine):
    ctx: Ctx  # set by the test through the factory

    def __init__(self) -> None:
        super().__init__()
        ctx = self.ctx
        ctx.examples += 1
        ctx.ensure_alive()
        self.m = ctx.mount
        self.exname = f"ex{ctx.examples:04d}"
        self.root = self.m.mountpoint / self.exname
        self.trace: list[str] = []
        self.names: dict[str, int] = {}  # file path (relative to root) -> inode
        self.dirs: set[str] = set()  # directories (relative to root), root not included
        self.content: dict[int, bytearray] = {}
        #: what the last close/fsync/truncate staged; None: never staged (a file
        #: created by a descriptor still open)
        self.durable: dict[int, bytes | None] = {}
        self.handles: list[Handle] = []
        self.next_ino = 1
        self.cycles = 0
        self.faulty: str | None = None
        self.fault_started = 0.0
        self.fault_left = 0
        self.clean = True
        os.mkdir(self.root)
        self.log(f"mkdir {self.exname} (the example's root)")

    # ------------------------------------------------------------------ plumbing

    def log(self, line: str) -> None:
        self.trace.append(line)
        if self.ctx.trace_file is not None:
            with open(self.ctx.trace_file, "a", encoding="utf-8") as f:
                f.write(f"{self.exname} {time.strftime('%H:%M:%S')} {line}\n")

    def _begin(self, name: str) -> None:
        self.clean = False
        self.ctx.steps += 1
        self.ctx.rules[name] += 1
        if self.faulty:
            self.fault_left -= 1

    def fail(self, what: str) -> None:
        tail = self.m.log_tail(40) if self.m.log.exists() else "<no log>"
        raise AssertionError(
            f"{what}\n--- operations of this example, as executed ---\n"
            + "\n".join(f"  {i:2d}. {t}" for i, t in enumerate(self.trace, 1))
            + f"\n--- daemon log tail ({self.m.log}) ---\n{tail}")

    def p(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    def call(self, desc: str, want: int | None, fn: Callable[[], Any]) -> Any:
        """Run ``fn``; it must fail with errno ``want`` (None: succeed)."""
        self.log(f"{desc} -> expect {_en(want)}")
        try:
            out = fn()
        except OSError as exc:
            if exc.errno == errno.ENOTCONN or (self.m.pid and not pid_alive(self.m.pid)):
                self.fail(f"{desc}: the daemon died ({exc})")
            if want is None or exc.errno != want:
                self.fail(f"{desc}: got {_en(exc.errno)} ({exc.strerror}), expected "
                          f"{_en(want)}")
            return None
        if want is not None:
            self.fail(f"{desc}: succeeded, expected {_en(want)}")
        return out

    # model queries

    def files(self) -> list[str]:
        return sorted(self.names)

    def all_dirs(self) -> list[str]:
        return [""] + sorted(self.dirs)

    def parents(self) -> list[str]:
        """Directories a new entry may go to (bounded depth)."""
        return [d for d in self.all_dirs() if (d.count("/") + 1 if d else 0) < MAX_DEPTH]

    def entries(self) -> list[str]:
        return sorted([*self.names, *self.dirs])

    @staticmethod
    def join(d: str, name: str) -> str:
        return f"{d}/{name}" if d else name

    @staticmethod
    def parent_of(rel: str) -> str:
        return rel.rpartition("/")[0]

    def children(self, d: str) -> list[str]:
        pre = d + "/"
        return [e for e in self.entries() if e.startswith(pre) and "/" not in e[len(pre):]]

    def is_dir(self, rel: str) -> bool:
        return rel == "" or rel in self.dirs

    def writers(self, ino: int) -> int:
        return sum(1 for h in self.handles if h.ino == ino)

    def new_inode(self) -> int:
        ino = self.next_ino
        self.next_ino += 1
        self.content[ino] = bytearray()
        self.durable[ino] = None
        return ino

    def drop_if_unused(self, ino: int) -> None:
        if ino not in self.names.values() and not self.writers(ino):
            self.content.pop(ino, None)
            self.durable.pop(ino, None)

    def model_write(self, ino: int, off: int, data: bytes) -> None:
        buf = self.content[ino]
        if off > len(buf):
            buf.extend(bytes(off - len(buf)))
        buf[off:off + len(data)] = data

    def model_truncate(self, ino: int, size: int) -> None:
        buf = self.content[ino]
        if size < len(buf):
            del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))

    def staged(self, ino: int) -> None:
        self.durable[ino] = bytes(self.content[ino])

    # ------------------------------------------------------------------ comparison

    def compare(self, why: str) -> None:
        problems: list[str] = []
        got_dirs: set[str] = set()
        got_files: dict[str, tuple[int, bytes]] = {}

        def walk(d: Path, rel: str) -> None:
            for e in sorted(os.scandir(d), key=lambda e: e.name):
                r = self.join(rel, e.name)
                st_ = os.lstat(e.path)
                if stat.S_ISDIR(st_.st_mode):
                    got_dirs.add(r)
                    walk(Path(e.path), r)
                elif stat.S_ISREG(st_.st_mode):
                    with open(e.path, "rb") as f:
                        got_files[r] = (st_.st_size, f.read())
                else:
                    problems.append(f"{r!r}: unexpected file type {oct(st_.st_mode)}")

        try:
            walk(self.root, "")
        except OSError as exc:
            self.fail(f"{why}: walking the tree failed: {exc}")
        for r in sorted(self.dirs - got_dirs):
            problems.append(f"missing directory {r!r}")
        for r in sorted(got_dirs - self.dirs):
            problems.append(f"unexpected directory {r!r}")
        for r in sorted(set(self.names) - set(got_files)):
            problems.append(f"missing file {r!r} ({len(self.content[self.names[r]])} bytes)")
        for r in sorted(set(got_files) - set(self.names)):
            problems.append(f"unexpected file {r!r} ({got_files[r][0]} bytes)")
        for r in sorted(set(got_files) & set(self.names)):
            want = bytes(self.content[self.names[r]])
            size, data = got_files[r]
            if size != len(want):
                problems.append(f"{r!r}: st_size {size}, expected {len(want)}")
            if data != want:
                problems.append(f"{r!r}: content differs: {describe_diff(want, data)}")
        if problems:
            self.fail(f"{why}: the mount differs from the model:\n  " + "\n  ".join(problems))

    def check_bucket(self, why: str) -> None:
        """Nothing pending: the bucket must hold exactly the model (one object per file,
        ``name`` or ``name.delta``; a marker per directory; references only in
        directories of the model)."""
        problems = bucket_problems(self.m, self.exname, set(self.names), self.dirs)
        if problems:
            self.fail(f"{why}: the bucket differs from the model:\n  " + "\n  ".join(problems))

    @invariant()
    def matches_model(self) -> None:
        was, self.clean = self.clean, False
        if self.faulty and self.fault_left <= 0:
            self._end_faults()  # here, not in a rule: it closes the descriptors
        self.compare("after the last step")
        self.clean = was

    # ------------------------------------------------------------------ files

    @rule(d=picks, name=names, blob=blobs)
    @step
    def create(self, d: int, name: str, blob: Blob) -> None:
        """open(O_CREAT|O_TRUNC|O_WRONLY), write the content, close."""
        rel = self.join(pick(self.parents(), d), name)
        data = blob.render()
        want = errno.EISDIR if rel in self.dirs else None

        def do() -> None:
            fd = os.open(self.p(rel), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _write_all(fd, data, 0)
            finally:
                os.close(fd)

        if self.call(f"create {rel!r} with {blob} ({len(data)} bytes)", want, do) is None \
                and want is None:
            ino = self.names.get(rel)
            if ino is None:
                ino = self.names[rel] = self.new_inode()
            self.content[ino][:] = data
            self.staged(ino)

    @rule(f=picks, off=offsets, chunk=chunks)
    @needs(lambda self: self.names)
    @step
    def pwrite(self, f: int, off: int, chunk: Blob) -> None:
        """open(O_WRONLY) an existing file, pwrite at an offset (maybe past the end:
        a hole), close."""
        rel = pick(self.files(), f)
        off = min(off, MAX_SIZE - chunk.size)
        data = chunk.render(off)
        ino = self.names[rel]

        def do() -> None:
            fd = os.open(self.p(rel), os.O_WRONLY)
            try:
                _write_all(fd, data, off)
            finally:
                os.close(fd)

        self.call(f"pwrite {rel!r} at {off}: {chunk} ({len(data)} bytes; size was "
                  f"{len(self.content[ino])})", None, do)
        self.model_write(ino, off, data)
        self.staged(ino)

    @rule(f=picks, size=st.one_of(st.integers(0, MAX_SIZE),
                                  st.sampled_from([0, 1, MIN_DELTA - 1, MIN_DELTA])))
    @needs(lambda self: self.names)
    @step
    def truncate(self, f: int, size: int) -> None:
        """truncate(2) by path, shrinking or extending."""
        rel = pick(self.files(), f)
        ino = self.names[rel]
        self.call(f"truncate {rel!r} to {size} (was {len(self.content[ino])})", None,
                  lambda: os.truncate(self.p(rel), size))
        self.model_truncate(ino, size)
        if not self.writers(ino):
            self.staged(ino)  # as an open, cut, close (another writer: staged at its close)

    @rule(e=picks)
    @needs(lambda self: self.names or self.dirs)
    @step
    def unlink(self, e: int) -> None:
        rel = pick(self.entries(), e)
        want = errno.EISDIR if rel in self.dirs else None
        self.call(f"unlink {rel!r}", want, lambda: os.unlink(self.p(rel)))
        if want is None:
            ino = self.names.pop(rel)
            self.drop_if_unused(ino)

    @rule(d=picks, name=names)
    @step
    def mkdir(self, d: int, name: str) -> None:
        rel = self.join(pick(self.parents(), d), name)
        want = errno.EEXIST if rel in self.names or rel in self.dirs else None
        self.call(f"mkdir {rel!r}", want, lambda: os.mkdir(self.p(rel)))
        if want is None:
            self.dirs.add(rel)

    @rule(e=picks)
    @needs(lambda self: self.names or self.dirs)
    @step
    def rmdir(self, e: int) -> None:
        """rmdir of an empty directory, a non-empty one (ENOTEMPTY) or a file
        (ENOTDIR)."""
        rel = pick(self.entries(), e)
        if rel in self.names:
            want: int | None = errno.ENOTDIR
        elif self.children(rel):
            want = errno.ENOTEMPTY
        else:
            want = None
        self.call(f"rmdir {rel!r} ({len(self.children(rel))} entries)", want,
                  lambda: os.rmdir(self.p(rel)))
        if want is None:
            self.dirs.discard(rel)

    @rule(d=picks, name=st.sampled_from(["reference.bin", "x.delta", ".delta"]),
          kind=st.sampled_from(["create", "mkdir", "rename"]))
    @step
    def reserved_name(self, d: int, name: str, kind: str) -> None:
        """Names the bucket format reserves are refused with EPERM."""
        rel = self.join(pick(self.parents(), d), name)
        if kind == "create":
            self.call(f"create reserved {rel!r}", errno.EPERM,
                      lambda: os.close(os.open(self.p(rel), os.O_WRONLY | os.O_CREAT, 0o644)))
        elif kind == "mkdir":
            self.call(f"mkdir reserved {rel!r}", errno.EPERM, lambda: os.mkdir(self.p(rel)))
        elif self.names:
            src = pick(self.files(), d)
            self.call(f"rename {src!r} to reserved {rel!r}", errno.EPERM,
                      lambda: os.rename(self.p(src), self.p(rel)))

    # ------------------------------------------------------------------ rename

    def rename_errno(self, src: str, dst: str) -> int | None:
        """What Linux answers for rename(src, dst) in the model's tree (src exists, dst's
        parent is a directory)."""
        if src == dst:
            return None
        src_dir = src in self.dirs
        if src_dir and dst.startswith(src + "/"):
            return errno.EINVAL  # a directory below itself
        if src.startswith(dst + "/"):
            return errno.ENOTEMPTY  # the target is an ancestor of the source
        if dst in self.names:
            return errno.ENOTDIR if src_dir else None
        if dst in self.dirs:
            if not src_dir:
                return errno.EISDIR
            return errno.ENOTEMPTY if self.children(dst) else None
        return None

    def do_rename(self, src: str, dst: str) -> None:
        want = self.rename_errno(src, dst)
        kind = "dir" if src in self.dirs else "file"
        over = (" over a dir" if dst in self.dirs else " over a file" if dst in self.names
                else "")
        self.call(f"rename {kind} {src!r} -> {dst!r}{over}", want,
                  lambda: os.rename(self.p(src), self.p(dst)))
        if want is not None or src == dst:
            return
        if src in self.names:
            old = self.names.pop(dst, None)
            self.names[dst] = self.names.pop(src)
            if old is not None:
                self.drop_if_unused(old)
            return
        self.dirs.discard(dst)  # an empty directory replaced
        pre = src + "/"
        moved_dirs = {d for d in self.dirs if d == src or d.startswith(pre)}
        self.dirs -= moved_dirs
        self.dirs |= {dst + d[len(src):] for d in moved_dirs}
        for f in [f for f in self.names if f.startswith(pre)]:
            self.names[dst + f[len(src):]] = self.names.pop(f)

    @rule(e=picks, d=picks, name=names)
    @needs(lambda self: self.names or self.dirs)
    @step
    def rename(self, e: int, d: int, name: str) -> None:
        """A file or a directory to a name in some directory (new or existing: every
        case, errors included)."""
        src = pick(self.entries(), e)
        dst = self.join(pick(self.all_dirs(), d), name)
        if dst.count("/") >= MAX_DEPTH + 2:
            dst = name
        self.do_rename(src, dst)

    @rule(a=picks, b=picks)
    @needs(lambda self: len(self.names) >= 2)
    @step
    def rename_over_file(self, a: int, b: int) -> None:
        files = self.files()
        src = pick(files, a)
        dst = pick([f for f in files if f != src], b)
        self.do_rename(src, dst)

    # ------------------------------------------------------------------ sequences

    @precondition(lambda self: not self.faulty)
    @rule(f=picks, name=names, new=st.booleans(), first=chunks, off1=offsets,
          second=chunks, off2=offsets)
    @step
    def fsync_then_write(self, f: int, name: str, new: bool, first: Blob, off1: int,
                         second: Blob, off2: int) -> None:
        """open(O_RDWR|O_CREAT), pwrite, fsync (the bucket must then hold that
        version), pwrite again, close."""
        rel = self.target(f, name, new)
        if rel is None:
            return
        off1 = min(off1, MAX_SIZE - first.size)
        off2 = min(off2, MAX_SIZE - second.size)
        d1, d2 = first.render(off1), second.render(off2)
        fd = self.call(f"open {rel!r} O_RDWR|O_CREAT", None,
                       lambda: os.open(self.p(rel), os.O_RDWR | os.O_CREAT, 0o644))
        ino = self.names.get(rel)
        if ino is None:
            ino = self.names[rel] = self.new_inode()
        self.handles.append(Handle(fd, ino, rel))  # a crash-safe record while it is open
        try:
            self.call(f"  pwrite fd at {off1}: {first}", None, lambda: _write_all(fd, d1, off1))
            self.model_write(ino, off1, d1)
            self.call("  fsync fd", None, lambda: os.fsync(fd))
            self.staged(ino)
            self.check_published(rel, bytes(self.content[ino]))
            self.call(f"  pwrite fd at {off2}: {second}", None, lambda: _write_all(fd, d2, off2))
            self.model_write(ino, off2, d2)
        finally:
            self.handles = [h for h in self.handles if h.fd != fd]
        self.call("  close fd", None, lambda: os.close(fd))
        self.staged(ino)

    def check_published(self, rel: str, data: bytes) -> None:
        """After fsync: the object of ``rel`` holds ``data`` (its dg-file-sha256)."""
        seen = {}
        for r in (f"{self.exname}/{rel}.delta", f"{self.exname}/{rel}"):
            h = self.m.head(r)
            if h is not None:
                seen[r] = h.get("Metadata", {}).get("dg-file-sha256")
        if _sha(data) not in seen.values():
            self.fail(f"fsync of {rel!r} returned but the bucket does not hold that version "
                      f"(sha256 {_sha(data)[:16]}, {len(data)} bytes); objects: "
                      f"{ {k: (v or '')[:16] for k, v in seen.items()} }")

    def target(self, f: int, name: str, new: bool) -> str | None:
        """An existing file, or a new name in some directory (None if that name is a
        directory)."""
        if not new and self.names:
            return pick(self.files(), f)
        rel = self.join(pick(self.parents(), f), name)
        return None if rel in self.dirs else rel

    @rule(f=picks, name=names, new=st.booleans(), first=chunks, off1=offsets,
          second=chunks, off2=offsets, first_closes_first=st.booleans())
    @step
    def two_handles(self, f: int, name: str, new: bool, first: Blob, off1: int,
                    second: Blob, off2: int, first_closes_first: bool) -> None:
        """Two descriptors on one file, each writes, each sees the other's bytes, closed
        in either order."""
        rel = self.target(f, name, new)
        if rel is None:
            return
        off1 = min(off1, MAX_SIZE - first.size)
        off2 = min(off2, MAX_SIZE - second.size)
        d1, d2 = first.render(off1), second.render(off2)
        flags = os.O_RDWR | os.O_CREAT
        fd1 = self.call(f"open {rel!r} O_RDWR|O_CREAT as fd1", None,
                        lambda: os.open(self.p(rel), flags, 0o644))
        ino = self.names.get(rel)
        if ino is None:
            ino = self.names[rel] = self.new_inode()
        self.handles.append(Handle(fd1, ino, rel))
        fd2 = self.call(f"open {rel!r} O_RDWR as fd2", None, lambda: os.open(self.p(rel), flags))
        self.handles.append(Handle(fd2, ino, rel))
        self.call(f"  pwrite fd1 at {off1}: {first}", None, lambda: _write_all(fd1, d1, off1))
        self.model_write(ino, off1, d1)
        self.call(f"  pwrite fd2 at {off2}: {second}", None, lambda: _write_all(fd2, d2, off2))
        self.model_write(ino, off2, d2)
        want = bytes(self.content[ino])
        got = self.call("  read all through fd1", None, lambda: _read_all(fd1))
        if got != want:
            self.fail(f"fd1 of {rel!r} does not see both writes: {describe_diff(want, got)}")
        order = (fd1, fd2) if first_closes_first else (fd2, fd1)
        for fd in order:
            self.handles = [h for h in self.handles if h.fd != fd]
            self.call(f"  close fd{1 if fd == fd1 else 2}", None, lambda fd=fd: os.close(fd))
            self.staged(ino)

    # ------------------------------------------------------------------ open descriptors

    @rule(f=picks, name=names, new=st.booleans(), trunc=st.booleans())
    @needs(lambda self: len(self.handles) < MAX_HANDLES)
    @step
    def open_handle(self, f: int, name: str, new: bool, trunc: bool) -> None:
        """open(O_RDWR|O_CREAT[|O_TRUNC]) kept open across steps."""
        rel = self.target(f, name, new)
        if rel is None:
            return
        flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if trunc else 0)
        fd = self.call(f"open {rel!r} O_RDWR|O_CREAT{'|O_TRUNC' if trunc else ''} "
                       f"-> h{len(self.handles)}", None,
                       lambda: os.open(self.p(rel), flags, 0o644))
        ino = self.names.get(rel)
        if ino is None:
            ino = self.names[rel] = self.new_inode()
        self.handles.append(Handle(fd, ino, rel))
        if trunc:
            self.model_truncate(ino, 0)

    def handle(self, h: int) -> tuple[int, Handle]:
        i = h % len(self.handles)
        return i, self.handles[i]

    @rule(h=picks, off=offsets, chunk=chunks)
    @needs(lambda self: self.handles)
    @step
    def handle_write(self, h: int, off: int, chunk: Blob) -> None:
        i, hd = self.handle(h)
        off = min(off, MAX_SIZE - chunk.size)
        data = chunk.render(off)
        self.call(f"pwrite h{i} (opened as {hd.opened_as!r}) at {off}: {chunk}", None,
                  lambda: _write_all(hd.fd, data, off))
        self.model_write(hd.ino, off, data)

    @rule(h=picks, size=st.integers(0, MAX_SIZE))
    @needs(lambda self: self.handles)
    @step
    def handle_truncate(self, h: int, size: int) -> None:
        i, hd = self.handle(h)
        self.call(f"ftruncate h{i} (opened as {hd.opened_as!r}) to {size}", None,
                  lambda: os.ftruncate(hd.fd, size))
        self.model_truncate(hd.ino, size)

    @rule(h=picks)
    @needs(lambda self: self.handles)
    @step
    def handle_read(self, h: int) -> None:
        i, hd = self.handle(h)
        got = self.call(f"read all through h{i} (opened as {hd.opened_as!r})", None,
                        lambda: _read_all(hd.fd))
        want = bytes(self.content[hd.ino])
        if got != want:
            self.fail(f"h{i} reads other bytes than written: {describe_diff(want, got)}")

    @precondition(lambda self: not self.faulty)
    @rule(h=picks)
    @needs(lambda self: self.handles)
    @step
    def handle_fsync(self, h: int) -> None:
        i, hd = self.handle(h)
        self.call(f"fsync h{i} (opened as {hd.opened_as!r})", None, lambda: os.fsync(hd.fd))
        self.staged(hd.ino)
        rel = next((r for r, ino in self.names.items() if ino == hd.ino), None)
        if rel is not None:
            self.check_published(rel, bytes(self.content[hd.ino]))

    @rule(h=picks)
    @needs(lambda self: self.handles)
    @step
    def handle_close(self, h: int) -> None:
        i, hd = self.handle(h)
        del self.handles[i]
        self.call(f"close h{i} (opened as {hd.opened_as!r})", None, lambda: os.close(hd.fd))
        self.staged(hd.ino)
        self.drop_if_unused(hd.ino)

    def close_all(self) -> None:
        for i, hd in reversed(list(enumerate(self.handles))):
            self.handles.pop(i)
            self.call(f"close h{i} (opened as {hd.opened_as!r})", None,
                      lambda hd=hd: os.close(hd.fd))
            self.staged(hd.ino)
            self.drop_if_unused(hd.ino)

    @rule(seconds=st.sampled_from(PAUSES))
    @step
    def pause(self, seconds: float) -> None:
        """Let the daemon work: settled files start uploading (0.5 s after close), so
        that the next steps race with uploads, moves and deletions in flight."""
        self.log(f"sleep {seconds} s")
        time.sleep(seconds)

    # ------------------------------------------------------------------ the mount's life

    @precondition(lambda self: not self.faulty and self.cycles < MAX_CYCLES)
    @rule()
    @step
    def crash(self) -> None:
        """kill -9, fusermount3 -u, mount with the same cache: closed files are intact,
        files open for writing come back as at their last close/fsync or as written."""
        self.cycles += 1
        open_inos = {h.ino for h in self.handles}
        self.log(f"kill -9 the daemon ({len(self.handles)} descriptors open), "
                 "fusermount3 -u, mount with the same cache")
        self.m.kill9()
        self._close_handles()
        self.m.force_unmount()
        self.m.mount()
        self.ctx.mounts += 1
        # files open for writing at the crash: one of the allowed versions, adopted
        for rel, ino in sorted(self.names.items()):
            if ino not in open_inos:
                continue
            allowed = {bytes(self.content[ino])}
            durable = self.durable[ino]
            allowed.add(durable if durable is not None else b"")
            try:
                got: bytes | None = self.p(rel).read_bytes()
            except FileNotFoundError:
                got = None
            except OSError as exc:
                self.fail(f"after the crash, reading {rel!r} (open at the crash) failed: "
                          f"{exc}")
            if got is None and durable is None:
                self.log(f"  {rel!r} (open, never closed) is gone after the crash: allowed")
                del self.names[rel]
                continue
            if got not in allowed:
                self.fail(f"after the crash, {rel!r} (open for writing at the crash) is "
                          f"{'missing' if got is None else f'{len(got)} bytes, sha256 {_sha(got)[:16]}'}"
                          f"; allowed: last close/fsync ({len(durable or b'')} bytes) or as "
                          f"written ({len(self.content[ino])} bytes)")
            assert got is not None
            self.log(f"  {rel!r} (open at the crash) came back with {len(got)} bytes ("
                     f"{'as written' if got == bytes(self.content[ino]) else 'last close'})")
            self.content[ino][:] = got
        for ino in list(self.content):
            if ino not in self.names.values():
                self.content.pop(ino)
                self.durable.pop(ino, None)
            else:
                self.staged(ino)

    @precondition(lambda self: not self.faulty and self.cycles < MAX_CYCLES)
    @rule()
    @step
    def remount_wiped(self) -> None:
        """Close everything, deltafs umount (waits for uploads), wipe the cache, mount:
        the tree comes from the bucket alone."""
        self.cycles += 1
        self.close_all()
        self.log("deltafs umount (the bucket must then hold the model), wipe the cache, "
                 "mount")
        self.m.umount()
        self.check_bucket("after deltafs umount")
        self.m.wipe_cache()
        self.m.mount()
        self.ctx.mounts += 1

    @precondition(lambda self: not self.faulty and self.cycles < MAX_CYCLES)
    @rule(kill=st.booleans())
    @step
    def wait_uploads_remount(self, kill: bool) -> None:
        """Close everything, wait until nothing is pending, then remount with the same
        cache (cleanly, or by kill -9)."""
        self.cycles += 1
        self.close_all()
        self.log("wait until nothing is pending; the bucket must hold the model")
        wait_idle(self.m, 120)
        self.check_bucket("with nothing pending")
        if kill:
            self.log("kill -9, fusermount3 -u, mount with the same cache")
            self.m.kill9()
            self.m.force_unmount()
            self.m.mount()
        else:
            self.log("deltafs umount, mount with the same cache")
            self.m.remount()
        self.ctx.mounts += 1

    # ------------------------------------------------------------------ faults

    @precondition(lambda self: self.ctx.proxy is not None and not self.faulty
                  and self.cycles < MAX_CYCLES)
    @rule(mode=st.sampled_from(["slowdown", "refuse", "latency"]),
          steps=st.integers(*FAULT_STEPS))
    @step
    def faults_on(self, mode: str, steps: int) -> None:
        """For a few steps every S3 request fails (503 SlowDown, or connection refused)
        or takes 0.6 s longer (a slow S3: uploads, moves and deletes stay in flight
        while the next steps rename and unlink); the mount keeps working from its
        journal and staged files."""
        self.cycles += 1  # ending it costs a wiped-cache remount
        self.log(f"S3 faults on: {mode} for {steps} steps")
        if mode == "latency":
            self.ctx.proxy.set("hang", seconds=0.6)
        else:
            self.ctx.proxy.set(mode)
        self.fault_started = time.monotonic()
        self.faulty = mode
        self.fault_left = steps

    @precondition(lambda self: self.faulty)
    @rule()
    @step
    def faults_off(self) -> None:
        self._end_faults()

    def _end_faults(self) -> None:
        """Turn the faults off; everything must upload; a wiped-cache remount must give
        the model's tree."""
        proxy = self.ctx.proxy
        pending = self.m.status()["pending_files"]
        if pending:  # let the daemon meet the fault
            since = time.monotonic() - self.fault_started

            def met(p: Any) -> bool:
                if not SOAK or self.faulty == "latency":
                    return bool(p.faults() > 0)
                st_ = self.m.status()
                age = st_.get("last_error_age")
                return bool(st_.get("last_error")) and age is not None and \
                    age < time.monotonic() - self.fault_started

            proxy.wait_for(met, timeout=FAULT_HOLD)
            self.log(f"  (held {time.monotonic() - self.fault_started - since:.1f} s more; "
                     f"last error: {self.m.status().get('last_error', '')[:120]!r})")
        self.log(f"S3 faults off ({proxy.faults()} requests faulted, {pending} files "
                 "pending); wait for uploads; close everything; deltafs umount, wipe the "
                 "cache, mount")
        proxy.clear()
        proxy.reset_counts()
        self.faulty = None
        self.close_all()
        wait_idle(self.m, 180)
        self.check_bucket("after the S3 faults ended, with nothing pending")
        self.m.remount(wipe_cache=True)
        self.ctx.mounts += 1
        self.compare("after the S3 faults ended and a wiped-cache remount")

    # ------------------------------------------------------------------ end of example

    def _close_handles(self) -> None:
        """Drop every descriptor the model holds (their mount is going away)."""
        for hd in self.handles:
            try:
                os.close(hd.fd)
            except OSError:
                pass
        self.handles = []

    def teardown(self) -> None:
        if not self.clean:  # the example failed: leave a usable mount, check nothing
            self._close_handles()
            self.ctx.reset()
            return
        if self.faulty:
            self._end_faults()
        self.close_all()
        self.compare("at the end of the example (all descriptors closed)")
        self.ctx.finished[self.exname] = (
            {r: _sha(bytes(self.content[i])) for r, i in self.names.items()}, set(self.dirs))


# ----------------------------------------------------------------------------------------
# helpers


def pick(seq: list[str], i: int) -> str:
    return seq[i % len(seq)]


def _write_all(fd: int, data: bytes, off: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], off + done)


def _read_all(fd: int) -> bytes:
    out = bytearray()
    while chunk := os.pread(fd, 1 << 20, len(out)):
        out += chunk
    return bytes(out)


def describe_diff(want: bytes, got: bytes | None) -> str:
    if got is None:
        return "unreadable"
    first = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b),
                 min(len(want), len(got)))
    zeros = got[first:first + 16] == bytes(len(got[first:first + 16]))
    return (f"expected {len(want)} bytes (sha256 {_sha(want)[:16]}), got {len(got)} "
            f"(sha256 {_sha(got)[:16]}); first difference at offset {first}"
            f"{' (zeros there)' if zeros and first < len(got) else ''}")


def bucket_problems(m: Mount, ex: str, files: set[str], dirs: set[str]) -> list[str]:
    """How the objects under ``ex/`` differ from the tree ``files``/``dirs`` (relative
    to ``ex``)."""
    keys = m.objects(f"{ex}/")
    problems: list[str] = []
    stored: dict[str, list[str]] = collections.defaultdict(list)
    markers: set[str] = set()
    for k in sorted(keys):
        rel = k[len(ex) + 1:]
        if k.endswith("/"):
            markers.add(rel.rstrip("/"))
        elif rel.rpartition("/")[2] == "reference.bin":
            parent = rel.rpartition("/")[0]
            if parent and parent not in dirs:
                problems.append(f"a reference in a directory the tree lacks: {k!r}")
        else:
            stored[rel.removesuffix(".delta")].append(k)
    for rel in sorted(files - set(stored)):
        problems.append(f"no object for the file {rel!r}")
    for rel in sorted(set(stored) - files):
        problems.append(f"an object of no file (left behind): {stored[rel]}")
    for rel, ks in sorted(stored.items()):
        if len(ks) > 1:
            problems.append(f"{rel!r} is stored twice: {ks}")
    for d in sorted((dirs | {""}) - markers):
        problems.append(f"no marker for the directory {d or ex!r}")
    for d in sorted(markers - dirs - {""}):
        problems.append(f"a marker of no directory (left behind): {ex}/{d}/")
    return problems


def dirty_rows(m: Mount) -> str:
    """The journal's dirty rows (read-only, beside the live daemon), for a message."""
    import sqlite3

    try:
        db = sqlite3.connect(f"file:{m.cache / 'state.db'}?mode=ro", uri=True, timeout=5)
        try:
            rows = db.execute("SELECT ino, parent, name, mode, size, dirty, staged, sha256, "
                              "remote_key FROM nodes WHERE dirty != 0").fetchall()
            tombs = db.execute("SELECT object_key, kind FROM tombstones").fetchall()
        finally:
            db.close()
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        return f"<journal unreadable: {exc}>"
    out = [f"ino={r[0]} parent={r[1]} name={r[2]!r} {'dir' if stat.S_ISDIR(r[3]) else 'file'} "
           f"size={r[4]} dirty={r[5]} staged={r[6]} sha256={(r[7] or '')[:12]} "
           f"remote_key={r[8]}" for r in rows]
    out += [f"tombstone {k} ({kind})" for k, kind in tombs]
    return "\n".join(out) or "<no dirty rows>"


def wait_idle(m: Mount, timeout: float) -> None:
    try:
        m.wait_idle(timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- dirty rows of the journal ---\n{dirty_rows(m)}"
                             ) from None


def tree_of(root: Path) -> tuple[dict[str, str], set[str]]:
    files: dict[str, str] = {}
    dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root).as_posix()
        rel = "" if rel == "." else rel
        for d in dirnames:
            dirs.add(f"{rel}/{d}" if rel else d)
        for f in filenames:
            files[f"{rel}/{f}" if rel else f] = _sha((Path(dirpath) / f).read_bytes())
    return files, dirs


# ----------------------------------------------------------------------------------------
# the test


@pytest.fixture
def model_mount(moto_server: str, bucket: str, tmp_path: Path,
                request: pytest.FixtureRequest) -> Iterator[tuple[Mount, Any]]:
    """One mount for the whole test, its S3 traffic through the fault proxy when
    tests/faultproxy.py exists."""
    proxy = request.getfixturevalue("fault_proxy") if FaultProxy is not None else None
    endpoint = proxy.url if proxy is not None else moto_server
    m = Mount(bucket, endpoint, tmp_path / "deltafs",
              extra_args=["--listing-ttl", "2", *MOUNT_ARGS], prefix=PREFIX)
    try:
        m.mount()
        yield m, proxy
    finally:
        try:
            if proxy is not None:
                proxy.clear()
            m.teardown()
        finally:
            m.dump_logs()


def test_model(model_mount: tuple[Mount, Any], capsys: pytest.CaptureFixture[str],
               request: pytest.FixtureRequest) -> None:
    m, proxy = model_mount
    ctx = Ctx(m, proxy, mounts=1, trace_file=m.base / "model-trace.log")
    started = time.monotonic()

    def report(extra: str) -> None:
        """The counts, to quote: on the terminal with -s, in the report with -rA (and
        as the test's user property ``model_summary``)."""
        text = (f"[test_model] {'soak' if SOAK else 'ci'} profile: {ctx.examples} examples, "
                f"{ctx.steps} steps ({ctx.steps / max(1, ctx.examples):.1f}/example) in "
                f"{time.monotonic() - started:.0f} s; {ctx.mounts} mounts{extra}\n"
                "[test_model] rules (count, seconds): " + ", ".join(
                    f"{k} {v} {ctx.rule_secs[k]:.0f}s"
                    for k, v in sorted(ctx.rules.items(), key=lambda kv: -kv[1])))
        request.node.user_properties.append(("model_summary", text))
        print(text)  # in the captured output (-rA, or a failure's report)
        if request.config.getoption("capture") != "no":
            with capsys.disabled():  # and on the terminal at once
                print("\n" + text)

    class Machine(FsMachine):
        pass

    Machine.ctx = ctx
    Machine.__name__ = Machine.__qualname__ = "FsMachine"
    try:
        run_state_machine_as_test(Machine, settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            database=None,
            print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                   HealthCheck.filter_too_much, HealthCheck.data_too_large],
        ))
    except BaseException:
        report(" (a failure: see below)")
        raise

    # every example's final tree once more, from the bucket alone
    ctx.ensure_alive()
    wait_idle(m, 60)
    m.remount(wipe_cache=True)
    ctx.mounts += 1
    problems = []
    for ex, (files, dirs) in sorted(ctx.finished.items()):
        problems += [f"{ex}: {p}" for p in bucket_problems(m, ex, set(files), dirs)]
        got_files, got_dirs = tree_of(m.mountpoint / ex)
        if (got_files, got_dirs) != (files, dirs):
            problems.append(f"{ex}: files {sorted(set(files) ^ set(got_files))} or "
                            f"contents {sorted(k for k in files if got_files.get(k) not in (None, files[k]))} "
                            f"or dirs {sorted(dirs ^ got_dirs)} differ")
    keys = m.objects()
    deltas = sum(1 for k in keys if k.endswith(".delta"))
    refs = sum(1 for k in keys if k.endswith("reference.bin"))
    report(f"; bucket: {len(keys)} objects, {deltas} deltas, {refs} references, "
           f"{sum(keys.values())} bytes stored")
    assert not problems, ("after a final wiped-cache remount:\n  " + "\n  ".join(problems)
                          + f"\n--- daemon log tail ---\n{m.log_tail(60)}")
    assert deltas > 0, "no file was stored as a delta: the test does not exercise deltas"
