"""Chained deltas: each file against the previous version, kept decodable whoever deletes.

In a directory in deltafs's format, a delta file is two objects:

- a *pointer*, ``<name>.delta``: DeltaGlider's delta metadata (sizes, SHA-256, the
  reference) plus ``deltafs-form: chain``; its body is :data:`extension.MAGIC` and a
  JSON header naming the *chain*: the SHA-256 of the file's content, of its base's
  content, and so on down to the reference's content;
- *blobs*, ``<dir>/.deltafs/<content>.<base>``: immutable and content-addressed, each
  the VCDIFF of one content against its base's content.

Deleting, overwriting or renaming a file touches only its pointer, so a delta that
another file's chain goes through is never lost, whichever mount or tool removes the
file. Blobs no pointer reaches any more are removed by a *sweep* (:func:`sweep`), which
announces itself with a flag object; a writer checks the flags around its put
(:func:`sweep_state`, :func:`confirm`) and encodes against the reference again when a
sweep may have taken a blob its chain needs. docs/architecture.md ("Chains") has the
argument and the measurements behind the depth bound.

Blocking: call from a worker thread.
"""
from __future__ import annotations

import json
import logging
import re
import struct
import time
import uuid
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Any, Callable, Iterable, Mapping

from .errors import AlreadyExists, Changed, IntegrityError, NotFound
from .extension import MAGIC, VERSION
from .store.base import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

#: the hidden sub-prefix of a directory that holds its blobs and sweep objects
HIDDEN = ".deltafs"
FORM_CHAIN = "chain"
FORM_CHAIN_GZIP = "chain+gzip"
CHAIN_FORMS = (FORM_CHAIN, FORM_CHAIN_GZIP)
#: metadata: the blob that yields the file's content (``<content>.<base>``), and depth
BLOB_KEY = "deltafs-blob"
DEPTH_KEY = "deltafs-depth"
#: A read decodes at most this many deltas (its chain's length). When the base is this
#: deep, the file is encoded against the base's ancestor at depth :data:`JUMP_TO`
#: instead: every ``MAX_DEPTH - JUMP_TO`` versions one delta spans that many versions,
#: so deltas never drift further than that from their base (architecture.md, "Chains").
MAX_DEPTH = 12
JUMP_TO = 4
#: at the bound, a jump back whose blob passes this share of the file also tries a
#: *keyframe* (the content against the empty content) and keeps the smaller: once jumps
#: have drifted as far as a whole file costs, the chain starts afresh
KEYFRAME_TRY = 0.25
#: the root of a chain that starts at a keyframe
ROOT_EMPTY = "empty"
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
#: blobs younger than this are never swept (a writer's blob before its pointer exists)
BLOB_GRACE = 3600.0
#: a sweep deletes nothing once this long has passed since it raised its flag; writers
#: wait for a younger flag to go, and ignore an older one (its sweeper died)
SWEEP_BOUND = 300.0
#: a flag older than this (a minute of clock skew allowed) can delete nothing any more
STALE_FLAG = SWEEP_BOUND + 60.0
#: under the hidden prefix: ``sweep/flag-<uuid>`` while a sweep runs, ``sweep/done``
#: rewritten by each sweep that deleted something
SWEEP_DIR = "sweep/"
FLAG_PREFIX = SWEEP_DIR + "flag-"
DONE_NAME = SWEEP_DIR + "done"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def hidden_prefix(deltaspace: str) -> str:
    return f"{deltaspace}/{HIDDEN}/" if deltaspace else f"{HIDDEN}/"


def is_hidden_key(key: str) -> bool:
    """A key inside some directory's hidden ``.deltafs/`` prefix (never a file)."""
    return key.startswith(f"{HIDDEN}/") or f"/{HIDDEN}/" in key


def is_done_marker(key: str) -> bool:
    """A directory's sweep marker (``<dir>/.deltafs/sweep/done``)."""
    return key == f"{HIDDEN}/{DONE_NAME}" or key.endswith(f"/{HIDDEN}/{DONE_NAME}")


def blob_name(content: str, base: str) -> str:
    return f"{content}.{base}"


def blob_key(deltaspace: str, content: str, base: str) -> str:
    return hidden_prefix(deltaspace) + blob_name(content, base)


def parse_blob_name(name: str) -> tuple[str, str] | None:
    """``(content, base)`` SHA-256s of a blob's name; None for anything else."""
    content, _, base = name.partition(".")
    if _HEX64.match(content) and _HEX64.match(base):
        return content, base
    return None


# ------------------------------------------------------------------ object bodies

@dataclass(frozen=True)
class Pointer:
    """What a pointer's body says: the chain of content SHA-256s, top (the file's
    content) first and the reference's content last; how the reference's content is
    read (``raw`` or ``gunzip``); and the gzip recipe when the file is the content
    compressed again (None: the content is the file)."""

    chain: tuple[str, ...]
    root: str
    recipe: dict[str, Any] | None = None

    @property
    def depth(self) -> int:
        return len(self.chain) - 1

    @property
    def content_sha256(self) -> str:
        return self.chain[0]

    def blob_names(self) -> list[str]:
        """The blobs the chain goes through, top first (none when the file's content is
        the reference's)."""
        return [blob_name(self.chain[i], self.chain[i + 1]) for i in range(self.depth)]


def _framed(header: dict[str, Any]) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack(">I", len(raw)) + raw


def pointer_bytes(p: Pointer) -> bytes:
    return _framed({"v": VERSION, "form": FORM_CHAIN, "chain": list(p.chain),
                    "root": p.root, "target": p.recipe})


def _unframe(data: bytes, what: str) -> tuple[dict[str, Any], int]:
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise IntegrityError(f"{what} is not a deltafs extension object")
    (n,) = struct.unpack(">I", data[len(MAGIC):len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if n > 1 << 20 or start + n > len(data):
        raise IntegrityError(f"{what}: header truncated or too large")
    try:
        header = json.loads(data[start:start + n])
    except ValueError as exc:
        raise IntegrityError(f"{what}: header is not JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("v") != VERSION:
        raise IntegrityError(f"{what}: extension version "
                             f"{header.get('v') if isinstance(header, dict) else '?'} is "
                             "not one this deltafs reads: upgrade deltafs")
    return header, start + n


def parse_pointer(data: bytes, what: str = "pointer") -> Pointer:
    header, _ = _unframe(data, what)
    chain = header.get("chain")
    if header.get("form") != FORM_CHAIN or not isinstance(chain, list) or not chain or \
            not all(isinstance(s, str) and _HEX64.match(s) for s in chain):
        raise IntegrityError(f"{what}: not a chain pointer this deltafs reads "
                             f"(form {header.get('form')!r})")
    root = header.get("root")
    if root not in ("raw", "gunzip", ROOT_EMPTY):
        raise IntegrityError(f"{what}: unknown root form {root!r}")
    if root == ROOT_EMPTY and chain[-1] != EMPTY_SHA256:
        raise IntegrityError(f"{what}: a keyframe chain that does not end in nothing")
    if len(chain) - 1 > MAX_DEPTH:
        raise IntegrityError(f"{what}: a chain of {len(chain) - 1} deltas (at most "
                             f"{MAX_DEPTH} are read)")
    target = header.get("target")
    if target is not None and not isinstance(target, dict):
        raise IntegrityError(f"{what}: bad target")
    return Pointer(tuple(chain), root, target)


def blob_header(content: str, base: str, content_size: int) -> bytes:
    return _framed({"v": VERSION, "form": "blob", "content_sha256": content,
                    "base_sha256": base, "content_size": content_size})


def check_blob(data_head: bytes, content: str, base: str, what: str) -> int:
    """Validate a blob's header against the chain that led to it; return where its
    VCDIFF starts."""
    header, offset = _unframe(data_head, what)
    if header.get("form") != "blob" or header.get("content_sha256") != content or \
            header.get("base_sha256") != base:
        raise IntegrityError(f"{what}: its header names another content or base "
                             "than its key (a damaged or foreign object)")
    return offset


# ------------------------------------------------------------------ choosing a base

def template(name: str) -> str:
    """A release name with its numbers blanked: ``app-1.2.3.tgz`` -> ``app-#.#.#.tgz``;
    files of one series share it."""
    return re.sub(r"\d+", "#", name)


def rank(name: str, candidates: Iterable[tuple[str, str, float]], limit: int = 3
         ) -> list[str]:
    """Order ``(key, name, mtime)`` candidates as bases for ``name``: the same file's
    older version first; then its series (same template), the closest version first
    (``1.43.110``: ``1.43.109`` before ``1.43.111`` before ``1.42.9``), so that files
    copied in any order still find their neighbours; then the names most alike. Among
    equals, the newest. Returns keys."""
    mine = template(name)
    nums = _numbers(name)
    cands = sorted(candidates, key=lambda c: (c[2], _numbers(c[1])), reverse=True)

    def score(c: tuple[str, str, float]) -> tuple[Any, ...]:
        other = c[1]
        if other == name:
            return (0,)
        if template(other) == mine:
            theirs = _numbers(other)
            at = next((i for i, (a, b) in enumerate(zip(nums, theirs)) if a != b),
                      len(nums))
            diff = theirs[at] - nums[at] if at < min(len(nums), len(theirs)) else 0
            return (1, -at, abs(diff), diff > 0)
        return (2, -round(SequenceMatcher(None, name, other).ratio(), 2))

    cands.sort(key=score)  # stable: newest first within each score
    return [c[0] for c in cands[:limit]]


def _numbers(name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", name)[:8])


def next_base(chain: tuple[str, ...]) -> tuple[str, ...]:
    """The chain a new file's delta extends, given its chosen base's chain: the base
    itself, or its ancestor at depth :data:`JUMP_TO` when the base is at the bound.
    (Every jump of one chain lands on the same ancestor, so jumps drift further each
    time; the writer then tries a keyframe, :data:`KEYFRAME_TRY`.)"""
    depth = len(chain) - 1
    if depth < MAX_DEPTH:
        return chain
    return chain[depth - JUMP_TO:]


# ------------------------------------------------------------------ sweeps

@dataclass(frozen=True)
class SweepState:
    """What a writer saw of sweeps: the flags up (key -> mtime) and the ETag of the
    marker every finished sweep rewrites."""

    flags: Mapping[str, float]
    done: str
    #: when it was read (flags are judged live or stale as of then)
    at: float = 0.0


def sweep_state(store: ObjectStore, deltaspace: str, ensure: bool = False) -> SweepState:
    """The flags and the marker's ETag. ``ensure`` (a writer, before it chooses a base):
    create the marker when there is none, so that a sweep which then removes it (the
    last file of the directory went) still shows as a change."""
    prefix = hidden_prefix(deltaspace)
    flags: dict[str, float] = {}
    done = ""
    for o in store.iter_objects(prefix + SWEEP_DIR):
        name = o.key[len(prefix):]
        if name.startswith(FLAG_PREFIX):
            flags[o.key] = o.mtime
        elif name == DONE_NAME:
            done = o.etag
    if ensure and not done:
        try:
            done = store.put_bytes(prefix + DONE_NAME, uuid.uuid4().hex.encode(), {},
                                   if_none_match=True).etag
        except AlreadyExists:
            return sweep_state(store, deltaspace, ensure=True)  # (a sweep may clear it)
    return SweepState(flags, done, time.time())


def _live(flags: Mapping[str, float], now: float) -> dict[str, float]:
    return {k: t for k, t in flags.items() if now - t < STALE_FLAG}


def confirm(store: ObjectStore, deltaspace: str, before: SweepState,
            blob_keys: list[str], sleep: Callable[[float], None] = time.sleep,
            memory: Memory | None = None) -> bool:
    """After a writer's pointer is in the bucket: whether every blob its chain needs is
    there for good. A sweep that listed before the pointer existed may delete a blob
    until it lowers its flag; one that starts later sees the pointer. So: wait for the
    flags to go, then, if any sweep ran or was running since ``before``, look at each
    blob. False: a blob is gone (encode again against the reference)."""
    return confirmed(store, deltaspace, before, blob_keys, sleep, memory) is not None


def confirmed(store: ObjectStore, deltaspace: str, before: SweepState,
              blob_keys: list[str], sleep: Callable[[float], None] = time.sleep,
              memory: Memory | None = None) -> SweepState | None:
    """:func:`confirm`, returning the state it read (the blobs are there for good as of
    it) or None."""
    state = sweep_state(store, deltaspace)
    while _live(state.flags, time.time()):
        # until the newest flag's deadline at most (a sweeper that died leaves its flag)
        sleep(min(1.0, max(0.05, max(state.flags.values()) + STALE_FLAG - time.time())))
        state = sweep_state(store, deltaspace)
    if not _live(before.flags, time.time()) and state.flags.keys() == before.flags.keys() \
            and state.done == before.done:
        ok = True  # no sweep ran in between (a dead sweeper's flag aside): no delete
    else:
        ok = all(store.head(k) is not None for k in blob_keys)
    if memory is not None:
        memory.note_state(deltaspace, state)  # the next put's "before"
        if ok:
            memory.saw(deltaspace, state, blob_keys)  # there for good, as of ``state``
    return state if ok else None


def present(store: ObjectStore, keys: list[str], memory: "Memory | None" = None,
            deltaspace: str = "", state: SweepState | None = None) -> bool:
    """Whether every blob is in the bucket (concurrent HEADs). A writer asks this of
    its base's chain after taking the sweep state: a pointer whose own writer has not
    confirmed it yet may name a blob a sweep just took. With ``memory`` and the
    writer's ``state``, blobs seen since under the same state are not asked again."""
    if memory is not None and state is not None:
        keys = memory.unknown(deltaspace, state, keys)
    if not keys:
        return True
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(8, len(keys))) as pool:
        ok = all(info is not None for info in pool.map(store.head, keys))
    if ok and memory is not None and state is not None:
        memory.saw(deltaspace, state, keys)
    return ok


class Pending:
    """A chained put of this process whose pointer is known (its blob is encoded) but
    not yet in the bucket: the next version of its series may encode against its
    content meanwhile, and waits for :meth:`outcome` before uploading anything."""

    def __init__(self, key: str, pointer: Pointer, ref_sha256: str) -> None:
        import threading

        self.key = key
        self.pointer = pointer
        self.ref_sha256 = ref_sha256
        self._done = threading.Event()
        #: what its confirm read; None until then, or for good when it failed
        self._state: SweepState | None = None

    def finish(self, state: SweepState | None) -> None:
        """The put confirmed its pointer (``state``: what its confirm read, every blob
        of the chain there for good as of it), or did not (None). Only the first call
        counts."""
        if self._done.is_set():
            return
        self._state = state
        self._done.set()

    @property
    def failed(self) -> bool:
        """Finished without its announced pointer standing."""
        return self._done.is_set() and self._state is None

    def outcome(self, timeout: float) -> SweepState | None:
        """Wait for the put: the state its confirm read when the pointer stands as
        announced; None when it failed, changed its chain, or took too long."""
        return self._state if self._done.wait(timeout) else None


class Memory:
    """What one process knows of chains without asking the bucket again (thread-safe,
    bounded): blobs it saw in the bucket, and the pointers it wrote or read.

    Only a sweep deletes a blob, and every sweep shows in the sweep state (its flag
    before it deletes anything, then a new marker ETag; a sweeper that died leaves its
    flag). So a blob seen while the state was S, with no live flag in S, is still there
    as long as the state is exactly S again: same flags, same marker. Any other state
    and it is HEADed as before. A remembered pointer is only a base *candidate*: its
    chain's blobs are still checked this way, and the writer's :func:`confirm` covers
    the time after, so a pointer overwritten meanwhile by another mount costs a worse
    base, never a wrong byte. Saves per chained write a HEAD per blob of the base's
    chain and the base pointer's HEAD and GET (13.4 requests per file measured, now 6)."""

    SPACES = 256
    BLOBS = 4096
    POINTERS = 4096
    #: what was seen is trusted this long at most: bounds what a deleter that shows in
    #: no sweep state (an interrupted ``aws s3 rm``, a lifecycle rule) can cost
    TTL = 60.0

    def __init__(self) -> None:
        import threading
        from collections import OrderedDict

        self._lock = threading.Lock()
        self._blobs: OrderedDict[str, tuple[tuple[frozenset[str], str], set[str], float]] = \
            OrderedDict()
        self._pointers: OrderedDict[str, tuple[Pointer, str]] = OrderedDict()
        self._states: dict[str, tuple[SweepState, float]] = {}
        self._pending: dict[str, Pending] = {}
        #: puts that chose their base and encode now (set: announced or over)
        self._encoding: dict[str, threading.Event] = {}

    @staticmethod
    def _sig(state: SweepState) -> tuple[frozenset[str], str]:
        return frozenset(state.flags), state.done

    @staticmethod
    def same_state(later: SweepState, earlier: SweepState) -> bool:
        """Whether no sweep can have deleted anything between two reads of the state:
        the same flags and marker (a sweep raises a flag and rewrites the marker before
        its first delete), no flag live at the earlier read, and a marker at all."""
        return bool(earlier.done) and Memory._sig(later) == Memory._sig(earlier) and \
            bool(earlier.at) and not _live(earlier.flags, earlier.at)

    def unknown(self, deltaspace: str, state: SweepState, keys: list[str]) -> list[str]:
        """Those of ``keys`` not seen under exactly ``state``."""
        with self._lock:
            got = self._blobs.get(deltaspace)
            if got is None or got[0] != self._sig(state) or not state.done \
                    or time.monotonic() - got[2] > self.TTL:
                return keys
            return [k for k in keys if k not in got[1]]

    def saw(self, deltaspace: str, state: SweepState, keys: Iterable[str]) -> None:
        """``keys`` are in the bucket as of ``state`` (taken before they were seen)."""
        if not state.done or not state.at or _live(state.flags, state.at):
            return  # a sweep may be deleting: nothing is known for good
        sig = self._sig(state)
        with self._lock:
            got = self._blobs.pop(deltaspace, None)
            if got is None or got[0] != sig or time.monotonic() - got[2] > self.TTL:
                got = (sig, set(), time.monotonic())
            if len(got[1]) > self.BLOBS:
                got[1].clear()
            got[1].update(keys)
            self._blobs[deltaspace] = got
            while len(self._blobs) > self.SPACES:
                self._blobs.popitem(last=False)

    def note_state(self, deltaspace: str, state: SweepState) -> None:
        """``state`` was read after this process's pointer was in the bucket."""
        if not state.done:
            return  # no marker: a writer must create one first (sweep_state ensure)
        with self._lock:
            self._states.pop(deltaspace, None)
            self._states[deltaspace] = (state, time.monotonic())
            while len(self._states) > self.SPACES:
                self._states.pop(next(iter(self._states)))

    def state(self, deltaspace: str) -> SweepState | None:
        """The sweep state a confirm here read last (within :data:`TTL`), to stand as a
        later put's ``before``: any state read before a put chooses its base is a valid
        one. An older one only widens the window :func:`confirm` looks at, so a sweep
        in it costs that put a HEAD per blob, never a blob missed. Saves a LIST per
        chained put."""
        with self._lock:
            got = self._states.get(deltaspace)
        if got is None or time.monotonic() - got[1] > self.TTL:
            return None
        return got[0]

    def encoding(self, key: str) -> None:
        """The put of ``key`` chose its base and encodes now: the next version of its
        series may start preparing, and waits for :meth:`encoded` before choosing."""
        import threading

        # (two puts of one key at once happen only outside the mount, whose uploads
        # claim their keys: they share one event, and the first to end releases it)
        with self._lock:
            self._encoding.setdefault(key, threading.Event())

    def encoded(self, key: str) -> None:
        """The put of ``key`` announced itself, or ended without (idempotent)."""
        with self._lock:
            ev = self._encoding.pop(key, None)
        if ev is not None:
            ev.set()

    def is_encoding(self, key: str) -> bool:
        with self._lock:
            return key in self._encoding

    def wait_encoded(self, key: str, timeout: float) -> bool:
        """Wait until the put of ``key`` is no longer encoding (True at once when it
        is not); False when ``timeout`` passed first."""
        with self._lock:
            ev = self._encoding.get(key)
        return ev is None or ev.wait(timeout)

    def announce(self, pending: Pending) -> None:
        with self._lock:
            self._pending[pending.key] = pending
        self.encoded(pending.key)

    def withdraw(self, pending: Pending) -> None:
        """The put is over, or its announced pointer will not be written: a put still
        waiting for it is told (a no-op once confirmed) and nobody new finds it."""
        pending.finish(None)
        with self._lock:
            if self._pending.get(pending.key) is pending:
                del self._pending[pending.key]

    def pending(self, key: str) -> Pending | None:
        """The put of the logical ``key`` now uploading here, if it announced itself."""
        with self._lock:
            return self._pending.get(key)

    def recent_in(self, deltaspace: str, limit: int = 8) -> list[str]:
        """Base candidates in ``deltaspace`` that no listing and maybe no journal shows
        yet: the puts announced there, then the files whose pointers this process wrote
        or read there last; newest first. (A version that starts while the one before it
        finishes must find it between its announcement and its publication.)"""
        prefix = f"{deltaspace}/" if deltaspace else ""

        def here(k: str) -> bool:
            return k.startswith(prefix) and "/" not in k[len(prefix):]
        with self._lock:
            out = [k for k in reversed(self._pending) if here(k)][:limit]
            for k in reversed(self._pointers):
                if len(out) >= limit:
                    break
                if here(k) and k not in out:
                    out.append(k)
        return out

    def pointer(self, key: str) -> tuple[Pointer, str] | None:
        """The pointer this process last wrote or read at the logical ``key``, and its
        reference's SHA-256."""
        with self._lock:
            return self._pointers.get(key)

    def forget(self, key: str) -> None:
        """The file at the logical ``key`` was deleted or moved away by this process."""
        self.wrote(key, None)

    def wrote(self, key: str, p: Pointer | None, ref_sha256: str = "") -> None:
        with self._lock:
            self._pointers.pop(key, None)
            if p is not None:
                self._pointers[key] = (p, ref_sha256)
                while len(self._pointers) > self.POINTERS:
                    self._pointers.popitem(last=False)


def wait_no_sweep(store: ObjectStore, deltaspace: str,
                  sleep: Callable[[float], None] = time.sleep) -> None:
    """Until no live flag is up in ``deltaspace`` (a rename's old pointer then goes)."""
    state = sweep_state(store, deltaspace)
    while _live(state.flags, time.time()):
        sleep(min(1.0, max(0.05, max(state.flags.values()) + STALE_FLAG - time.time())))
        state = sweep_state(store, deltaspace)


def _content_of_name(name: str) -> str | None:
    parsed = parse_blob_name(name)
    return parsed[0] if parsed else None


def sweep(store: ObjectStore, deltaspace: str,
          heads: Callable[[list[str]], Mapping[str, Mapping[str, str] | None]],
          grace: float = BLOB_GRACE, now: float | None = None,
          dry_run: bool = False, final: bool = False, interval: float = 0.0) -> list[str]:
    """Remove the blobs of ``deltaspace`` that no pointer reaches and that are older
    than ``grace`` seconds; returns their keys. ``heads(keys)`` gives the metadata of
    each pointer key (None when gone).

    The flag goes up before the first listing and down after the last delete, which
    happens within :data:`SWEEP_BOUND` of the flag. Pointers are listed twice (before
    and after the blobs), so a rename that moved a pointer past the first listing is
    seen by the second.

    ``final``: the directory holds no file any more (the caller saw no delta): every
    blob goes whatever its age, then the marker, so that the prefix can vanish (a writer
    that raced this sees the marker change and checks its chain).

    ``interval``: skip the sweep when the last one (the marker's age) is more recent:
    a sweep reads every pointer of the directory, so deletes do not each pay for one."""
    hp = hidden_prefix(deltaspace)
    now = time.time() if now is None else now
    if interval > 0 and not final:
        marker = store.head(hp + DONE_NAME)
        if marker is None or now - marker.mtime < interval:
            return []  # no chain here, or swept (or first written) recently
    blobs: dict[str, ObjectInfo] = {}
    others: list[ObjectInfo] = []
    for o in store.iter_objects(hp):
        if _content_of_name(o.key[len(hp):]) is not None:
            blobs[o.key] = o
        else:
            others.append(o)
    old = [k for k, o in blobs.items() if final or now - o.mtime >= grace]
    if not old:
        if final and not dry_run:
            _clear(store, hp, others, now)
        return []
    flag = hp + f"{FLAG_PREFIX}{uuid.uuid4().hex}"
    started = time.monotonic()
    if not dry_run:
        store.put_bytes(flag, b"", {})
        # a new marker before anything is deleted: however this sweep ends (a failed
        # batch delete, an interrupt: its flag still goes in ``finally``), the state a
        # writer sees afterwards is never the one from before it (chain.Memory)
        store.put_bytes(hp + DONE_NAME, uuid.uuid4().hex.encode(), {})
        for o in others:
            if o.key[len(hp):].startswith(FLAG_PREFIX) and now - o.mtime >= STALE_FLAG:
                try:  # a sweeper that died: its deletes ended SWEEP_BOUND after its flag
                    store.delete(o.key)
                except NotFound:
                    pass
    try:
        prefix = f"{deltaspace}/" if deltaspace else ""
        seen: dict[str, str | None] = {}

        def read_pointers() -> None:
            keys = [o.key for o in store.iter_level(prefix)
                    if o.key.endswith(".delta") and o.key not in seen]
            for k, meta in heads(keys).items():
                seen[k] = (meta or {}).get(BLOB_KEY)

        read_pointers()
        # once more: a pointer renamed to a key the first listing had already passed,
        # from one it had not reached yet, was in neither place when listed
        read_pointers()
        by_content: dict[str, list[str]] = {}
        for k in blobs:
            name = k[len(hp):]
            by_content.setdefault(name.partition(".")[0], []).append(name)
        reach: set[str] = set()
        todo = [c for c in (_content_of_name(v) for v in seen.values() if v) if c]
        while todo:
            c = todo.pop()
            if c in reach:
                continue
            reach.add(c)
            for name in by_content.get(c, ()):
                todo.append(name.partition(".")[2])
        garbage = sorted(k for k in old if k[len(hp):].partition(".")[0] not in reach)
        if dry_run:
            return garbage
        if not garbage:
            store.put_bytes(hp + DONE_NAME, uuid.uuid4().hex.encode(), {})  # swept now
            return garbage
        if time.monotonic() - started > SWEEP_BOUND:
            log.warning("sweep of %s took longer than %.0f s; deleting nothing this time",
                        hp, SWEEP_BOUND)
            # recorded all the same: the next one waits its interval instead of running
            # (and overrunning) again at every delete
            store.put_bytes(hp + DONE_NAME, uuid.uuid4().hex.encode(), {})
            return []
        store.delete_many(garbage)
        if final and len(garbage) == len(blobs):
            _clear(store, hp, others, now)
        else:
            store.put_bytes(hp + DONE_NAME, uuid.uuid4().hex.encode(), {})
        log.info("swept %d unused chain blobs from %s", len(garbage), hp)
        return garbage
    finally:
        if not dry_run:
            try:
                store.delete(flag)
            except NotFound:
                pass


def _clear(store: ObjectStore, hp: str, others: list[ObjectInfo], now: float) -> None:
    """Remove the marker and dead flags of a directory left without blobs."""
    for o in others:
        name = o.key[len(hp):]
        if name == DONE_NAME or (name.startswith(FLAG_PREFIX) and now - o.mtime >= STALE_FLAG):
            try:
                store.delete(o.key)
            except NotFound:
                pass
