"""Logical files over an object store: put, get, delete, list, stats, verify.

The one place that knows how a file becomes a reference, a delta or a direct object and
back. The CLI, the Python API and the filesystem all go through it. Every method blocks
(S3 calls, hashing, xdelta3): call it from a worker thread when on an event loop. The
engine holds no mutable state of its own beyond the store and the content cache, which
are both safe across threads and processes.
"""
from __future__ import annotations

import errno
import heapq
import logging
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from . import chain, codec, extension, gzrecipe, membudget
from .cache import ContentCache, digest_file
from .crashpoints import crash_point
from .prefetch import Prefetched
from .errors import AlreadyExists, Changed, IntegrityError, NotFound, StoreError
from .format import (
    DELTA_SUFFIX,
    NOTE_ZERO_DIFF,
    FORM_KEY,
    FORMAT_DELTAFS,
    FORMAT_KEY,
    Attrs,
    MANIFEST_NAME,
    Kind,
    StoredFile,
    check_logical_key,
    classify,
    delta_key,
    delta_metadata,
    direct_metadata,
    is_compressed_stream,
    is_zstd,
    meta_get,
    reference_key,
    reference_metadata,
    split_key,
)
from .store.base import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

#: wide-window encodes cost ~1.6x the reference size in RAM: never two at once
_WIDE_ENCODES = threading.Lock()
#: bulk commands (ls -R, stats, verify, rm -r) work in batches of this many keys
BULK_BATCH = 1000


FORMATS = ("auto", "deltafs", "deltaglider")


@dataclass(frozen=True)
class Policy:
    """Which files get a delta, and when a delta is worth keeping.

    Every file of at least ``min_delta_size`` bytes is a candidate, whatever its name;
    the encode itself decides (see :mod:`codec`), giving up early when the output shows
    the delta will not beat ``max_ratio``. Compressed streams (gzip, bzip2, xz, zstd) skip
    the encode: a byte delta of them gains nothing, and the format forbids them as
    references.
    """

    min_delta_size: int = 64 << 10
    max_ratio: float = 0.75
    #: ``auto``: new directories in deltafs's format (extension objects), directories
    #: whose reference another writer (or strict mode) made stay DeltaGlider's;
    #: ``deltaglider``: only what the deltaglider CLI reads; ``deltafs``: extensions in
    #: every directory this writer seeds or finds seeded in deltafs's format
    format: str = "auto"
    #: a delta above this share of the file, against a reference larger than xdelta3's
    #: default window, is tried again with a window over the whole reference
    retry_ratio: float = 0.05
    limits: codec.Limits = field(default_factory=codec.Limits)
    #: in a deltafs-format directory, encode each file against a recent version (a
    #: chain, :mod:`deltafs.chain`) rather than the reference; off: the reference only
    chains: bool = os.environ.get("DELTAFS_CHAINS", "1") != "0"

    def codec_limits(self) -> codec.Limits:
        from dataclasses import replace

        return replace(self.limits, max_ratio=self.max_ratio)

    @classmethod
    def create(cls, min_delta_size: int | None = None, max_ratio: float | None = None,
               level: int | None = None, format: str | None = None) -> "Policy":
        """A policy from user settings; ``None`` keeps the default."""
        from dataclasses import replace

        policy = cls()
        if format is not None:
            if format not in FORMATS:
                raise ValueError(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
            policy = replace(policy, format=format)
        if min_delta_size is not None:
            policy = replace(policy, min_delta_size=min_delta_size)
        if max_ratio is not None:
            policy = replace(policy, max_ratio=max_ratio)
        if level is not None:
            policy = replace(policy, limits=replace(policy.limits, level=level))
        return policy


@dataclass(frozen=True)
class PutResult:
    """What a put did: ``kind`` is ``reference`` (the file seeded its directory's
    reference), ``delta`` or ``direct``; ``stored_size`` counts every byte it added to the
    bucket (for a reference: reference.bin plus its zero-diff delta)."""

    key: str
    kind: str
    original_size: int
    stored_size: int
    sha256: str
    reason: str = ""
    object_key: str = ""  # the object that now holds the file (key or key.delta)
    etag: str = ""  # its ETag, so an index can tell it apart from later changes
    #: the size of that object when it is not ``stored_size`` (a chain's pointer: its
    #: blob is stored beside it); -1: the same
    object_size: int = -1

    @property
    def ratio(self) -> float:
        return self.stored_size / self.original_size if self.original_size else 0.0


@dataclass(frozen=True)
class Entry:
    """One line of a listing: a file (true size) or a directory."""

    key: str  # logical key; directories end with "/"
    is_dir: bool
    size: int = 0
    stored_size: int = 0
    mtime_ns: int = 0
    kind: str = "dir"
    sha256: str | None = None
    attrs: Attrs = field(default_factory=Attrs)
    stored: StoredFile | None = None


@dataclass
class Stats:
    """Logical against stored bytes under a prefix."""

    files: int = 0
    logical_bytes: int = 0
    stored_bytes: int = 0
    references: int = 0
    reference_bytes: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    #: form -> {"files", "logical_bytes", "stored_bytes"}: ``reference`` (the files that
    #: seeded a reference, with the references), ``delta``, ``gzip delta`` (a delta of a
    #: gzip file's content), ``direct``, ``foreign``
    by_form: dict[str, dict[str, int]] = field(default_factory=dict)

    def add_form(self, form: str, files: int, logical: int, stored: int) -> None:
        d = self.by_form.setdefault(form, {"files": 0, "logical_bytes": 0, "stored_bytes": 0})
        d["files"] += files
        d["logical_bytes"] += logical
        d["stored_bytes"] += stored

    @property
    def savings(self) -> float:
        return 1 - self.stored_bytes / self.logical_bytes if self.logical_bytes else 0.0


#: why a file was stored direct when the cache disk had no room for its delta encode
NO_SCRATCH = "no local space for the delta encode"


@dataclass(frozen=True)
class Reference:
    """A deltaspace's reference as fetched: its key, SHA-256 and size."""

    key: str
    sha256: str
    size: int
    etag: str
    #: seeded in deltafs's format: extension objects may be written against it
    extended: bool = False


class _Sentinel(str):
    """A reason that is one object (compared with ``is``)."""


#: what :meth:`Engine._put_chain` returns when the reference it encoded against is not
#: the bucket's any more (the put then starts again)
_REF_MOVED = _Sentinel("the directory's reference changed")


def part_path(dest: Path) -> Path:
    """Where :meth:`Engine.get` builds ``dest`` before the rename (a progress bar reads
    its size)."""
    return dest.with_name(f".{dest.name}.deltafs-{os.getpid()}.part")

class Engine:
    """put/get/delete/list over one store, with a shared content cache."""

    def __init__(
        self,
        store: ObjectStore,
        cache: ContentCache,
        tmp_dir: Path,
        policy: Policy = Policy(),
        head_concurrency: int = 16,
    ) -> None:
        self.store = store
        self.cache = cache
        self.tmp_dir = tmp_dir
        self.policy = policy
        self.head_concurrency = head_concurrency
        #: blobs seen and pointers written, so a chained write does not ask again
        self.chain_memory = chain.Memory()
        #: per deltaspace, the reference last seen by a HEAD and when (see
        #: :meth:`_known_reference`)
        self._refs: dict[str, tuple[Reference | None, float]] = {}
        self._refs_lock = threading.Lock()
        #: reads a put makes beside its own thread (the closing check of the reference
        #: while the chain is confirmed); made on first use
        self._side: ThreadPoolExecutor | None = None
        #: called (from the put's thread) when a chained put announced itself: its
        #: next version need not wait for the upload (the mount's writeback sets it)
        self.on_announce: Callable[[], None] | None = None
        #: objects the read-ahead fetched for a rebuild to come (see :mod:`prefetch`)
        self.prefetched = Prefetched(tmp_dir / "ahead")
        tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    # ------------------------------------------------------------------ helpers

    @contextmanager
    def _scratch(self) -> Iterator[Path]:
        """A private temp directory on the cache's filesystem, removed afterwards."""
        path = Path(tempfile.mkdtemp(prefix="op-", dir=self.tmp_dir))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def _head_reference(self, deltaspace: str) -> Reference | None:
        asked = time.monotonic()
        info = self.store.head(reference_key(deltaspace))
        if info is None:
            self._saw_reference(deltaspace, None, asked)
            return None
        sha = meta_get(info.metadata, "file_sha256")
        if not sha:
            raise IntegrityError(
                f"{self.store.name}/{info.key} has no dg-file-sha256: not a reference "
                "any DeltaGlider-format writer made"
            )
        ref = Reference(info.key, sha, info.size, info.etag,
                        (info.metadata or {}).get(FORMAT_KEY) == FORMAT_DELTAFS)
        self._saw_reference(deltaspace, ref, asked)
        return ref

    #: how long the reference a HEAD saw stands in for the HEAD a put opens with
    REFERENCE_MEMORY = 30.0

    def _known_reference(self, deltaspace: str) -> Reference | None:
        """The reference this process saw last in ``deltaspace`` (within
        :data:`REFERENCE_MEMORY`), for a put to encode against without asking first.
        Safe because what makes a put correct is its *closing* check (a HEAD after its
        delta is in the bucket, which sees any removal or replacement that happened
        since, and puts the reference back or encodes again); the opening HEAD only
        chose what to encode against. A remembered reference that turns out replaced
        costs an encode; one whose content is no longer fetchable costs a HEAD."""
        with self._refs_lock:
            got = self._refs.get(deltaspace)
        if got is None or time.monotonic() - got[1] > self.REFERENCE_MEMORY:
            return None
        return got[0]

    def _saw_reference(self, deltaspace: str, ref: Reference | None,
                       asked: float | None = None) -> None:
        """What a HEAD sent at ``asked`` (monotonic; None: now) found. An answer to an
        older question than the one remembered is dropped: a slow HEAD must not bring
        back a reference a later HEAD, or this process's own delete, saw gone."""
        asked = time.monotonic() if asked is None else asked
        with self._refs_lock:
            got = self._refs.get(deltaspace)
            if got is not None and got[1] > asked:
                return
            self._refs.pop(deltaspace, None)
            self._refs[deltaspace] = (ref, asked)
            while len(self._refs) > 256:
                self._refs.pop(next(iter(self._refs)))

    #: how long a put waits for the put of its base that was still uploading (then it
    #: encodes against the reference instead)
    PENDING_WAIT = 300.0
    #: how long a put started beside the encode of its series' previous version waits
    #: for that encode before choosing its base without it
    ENCODE_WAIT = 30.0

    def _cache_content(self, key: str, sha: str, path: Path, link: bool) -> bool:
        """Cache a file's content (under its SHA-256) as the next version's base."""
        try:
            self.cache.add(sha, path, link=link)
            return True
        except OSError as exc:
            log.debug("content of %s not cached: %s", key, exc)
            return False

    @contextmanager
    def _side_calls(self) -> Iterator[Callable[..., Future]]:  # type: ignore[type-arg]
        """Requests a put sends beside its own work (they touch no state of the put's;
        side calls never wait for a put, so the pool cannot deadlock); none outlives
        the put, whichever way it ends."""
        started: list[Future] = []  # type: ignore[type-arg]

        with self._refs_lock:
            if self._side is None:
                self._side = ThreadPoolExecutor(8, thread_name_prefix="deltafs-side")
            pool = self._side

        def submit(fn: Callable[..., object], *args: object) -> Future:  # type: ignore[type-arg]
            f = pool.submit(fn, *args)
            started.append(f)
            return f
        try:
            yield submit
        finally:
            futures_wait(started)

    def _fetch_reference(self, ref_key: str, sha256: str, dest: Path,
                         verify: bool = True) -> bool:
        """Put the verified reference with ``sha256`` at ``dest``: from the cache when it
        is there (no request at all), else downloaded, verified and cached.
        ``verify=False`` trusts a cache entry without hashing it first: only for a
        decode whose output is itself checked (a damaged source cannot pass that).
        True when it came from the cache."""
        if self.cache.link(sha256, dest, verify=verify):
            return True
        info = self.store.get_file(ref_key, dest)
        actual, sums = digest_file(dest)
        if actual != sha256:
            dest.unlink(missing_ok=True)
            stored_sha = meta_get(info.metadata, "file_sha256")
            if stored_sha and stored_sha != sha256:
                raise IntegrityError(
                    f"{self.store.name}/{ref_key} was replaced since the delta was written "
                    f"(reference SHA-256 {stored_sha[:12]}…, the delta needs {sha256[:12]}…)"
                )
            raise IntegrityError(
                f"{self.store.name}/{ref_key} is corrupt: SHA-256 {actual[:12]}… "
                f"instead of {sha256[:12]}…"
            )
        self.cache.add(sha256, dest, sums=sums)
        return False

    # ---------------------------------------------------------------------- put

    def put(self, src: Path, key: str, attrs: Attrs = Attrs(),
            sha256: str | None = None, owned: bool = False,
            check_other: bool = True, hints: tuple[str, ...] = (), after: str = ""
            ) -> PutResult:
        """Store the local file ``src`` as the logical file ``key``.

        ``sha256`` may be given when the caller already knows it (the filesystem hashes
        while staging); otherwise the file is hashed here, once. ``owned`` says nobody
        will modify ``src`` again, so the cache may hard-link it instead of copying.
        ``check_other=False`` skips the HEAD for an older object of the other form (a
        delta replacing a direct object or the reverse) when the caller knows there is
        none. ``hints``: logical keys of likely bases (the same file's older version,
        files just stored in the same directory), best first; without them the
        directory's first LIST page is searched (:mod:`deltafs.chain`). ``after``: the
        key of a put of this process now encoding the previous version of this file's
        series; this put prepares meanwhile and waits for that encode (up to
        ``ENCODE_WAIT`` seconds) only right before it chooses its base.
        """
        check_logical_key(key)
        size = src.stat().st_size
        sha = sha256 or codec.sha256_file(src)
        deltaspace, name = split_key(key)
        reason = self._delta_ineligible(src, size)
        result: PutResult | None = None
        if not reason and not self._room_for_encode(self._delta_scratch(size)):
            reason = NO_SCRATCH
            log.warning("put %s: no room on the cache disk for the delta; storing it direct",
                        key)
        if not reason:
            try:
                result, reason = self._put_delta(src, key, size, sha, attrs, owned, hints,
                                                 after)
            except (OSError, StoreError) as exc:
                if not _no_space(exc):
                    raise
                # no room for the reference and the delta beside the file: a direct
                # upload needs no scratch space at all
                log.warning("put %s: no space for the delta encode (%s); storing it direct",
                            key, exc)
                result, reason = None, NO_SCRATCH
                # an earlier attempt's pointer may be in the bucket: it must not stay
                # beside the direct object (stat() finds the .delta first)
                check_other = True
        if result is None:
            result = self._put_direct(src, key, size, sha, attrs, reason)
        if check_other:
            self._drop_other_form(key, result.kind)
        log.info("put %s: %s, %d -> %d bytes%s", key, result.kind, size, result.stored_size,
                 f" ({reason})" if result.kind == "direct" and reason else "")
        return result

    def _delta_scratch(self, size: int) -> int:
        """Scratch bytes a delta encode of a ``size``-byte file may hold at its peak: two
        outputs of up to ``max_ratio`` of the file at once (the wide-window retry beside
        the first encode, a chain blob beside its vcdiff). A reference that is not in
        the cache is added once it is known."""
        return int(2 * self.policy.max_ratio * size)

    def _room_for_encode(self, size: int) -> bool:
        """Whether the scratch disk can take ``size`` more bytes with room to spare: a
        full cache disk must not keep staged files from uploading (they would wait for
        room that only their upload can make). Falling short is not an error: the file
        is stored direct (and ENOSPC during the encode is caught the same way)."""
        try:
            st = os.statvfs(self.tmp_dir)
        except OSError:
            return True
        return st.f_bavail * st.f_frsize >= size + (16 << 20)

    def _delta_ineligible(self, src: Path, size: int) -> str:
        if size < self.policy.min_delta_size:
            return f"smaller than {self.policy.min_delta_size} bytes"
        with open(src, "rb") as f:
            head = f.read(8)
        if is_compressed_stream(head) and not (
                (gzrecipe.is_gzip(head) or is_zstd(head)) and self.policy.format != "deltaglider"):
            return "a compressed stream gains nothing from a delta"
        return ""

    def _extended(self, ref: Reference) -> bool:
        """Whether extension objects may be written against ``ref``: by default only
        in a directory seeded in deltafs's format (one DeltaGlider or strict mode made
        stays readable by DeltaGlider); ``--format`` overrides either way."""
        return self.policy.format == "deltafs" or (ref.extended and self.policy.format == "auto")

    def _put_direct(self, src: Path, key: str, size: int, sha: str, attrs: Attrs,
                    reason: str) -> PutResult:
        meta = direct_metadata(name=split_key(key)[1], sha256=sha, size=size, attrs=attrs)
        info = self.store.put_file(key, src, meta)
        return PutResult(key, "direct", size, size, sha, reason, key, info.etag)

    def _put_delta(self, src: Path, key: str, size: int, sha: str,
                   attrs: Attrs, owned: bool, hints: tuple[str, ...] = (), after: str = ""
                   ) -> tuple[PutResult | None, str]:
        """Store as a delta (seeding the reference if there is none); ``(None, reason)``
        when the file is better stored direct. A reference seeded by a put that then
        failed stays: another writer may already have encoded against it (references
        are only ever removed by :meth:`gc`)."""
        codec.xdelta3_path()  # fail before writing anything when the codec is missing
        wrote: list[bool] = []
        result, reason = self._put_delta_attempts(src, key, size, sha, attrs, owned, [],
                                                  hints, wrote, after)
        if result is None and wrote:
            # a chain pointer uploaded by an attempt that did not stand (its blob was
            # swept, the reference changed): it must not stay beside the direct object
            # (review: stat() finds the .delta first)
            try:
                info = self.store.head(delta_key(key))
                if info is not None:
                    self.store.delete(delta_key(key), if_match=info.etag or None)
            except (NotFound, Changed):
                pass
        return result, reason

    def _put_delta_attempts(self, src: Path, key: str, size: int, sha: str,
                            attrs: Attrs, owned: bool, seeded_out: list[bool],
                            hints: tuple[str, ...] = (), wrote: list[bool] | None = None,
                            after: str = "") -> tuple[PutResult | None, str]:
        deltaspace, name = split_key(key)
        with self._scratch() as scratch, self._side_calls() as side:
            for attempt in range(4):
                # the reference this process saw last lets the encode start at once; a
                # HEAD asked beside it must agree before anything is uploaded
                remembered = self._known_reference(deltaspace) if attempt == 0 else None
                fresh: list[Future[Reference | None]] = []
                if remembered is not None:
                    fresh.append(side(self._head_reference, deltaspace))
                ref = remembered or self._head_reference(deltaspace)

                def ref_holds(ref: Reference = ref,
                              fresh: list[Future[Reference | None]] = fresh) -> bool:
                    """Before the first upload: whether the bucket's reference is the one
                    encoded against (asked once; True when it was HEADed, not
                    remembered)."""
                    if not fresh:
                        return True
                    seen = fresh.pop().result()
                    if seen is not None and seen.key == ref.key and seen.sha256 == ref.sha256:
                        return True
                    log.info("put %s: the directory's reference changed since this mount "
                             "last saw it; encoding again", key)
                    return False
                seeded = 0
                if ref is None:
                    ref, seeded = self._seed_reference(src, deltaspace, name, sha, owned)
                    if seeded:
                        seeded_out.append(True)
                    if ref is None:
                        return None, "cannot be a reference (compressed stream)"
                ref_path = scratch / f"ref{attempt}"
                extended = self._extended(ref)
                with open(src, "rb") as f:
                    target_head = f.read(8)
                if is_compressed_stream(target_head) and not extended:
                    return None, "a compressed stream gains nothing from a delta here " \
                                 "(its directory is in DeltaGlider's format)"
                if seeded:
                    ref_path = src
                elif not self.cache.has(ref.sha256) and not self._room_for_encode(
                        ref.size + self._delta_scratch(size)):
                    # the reference must be downloaded beside the delta: no room for both
                    log.warning("put %s: no room on the cache disk for the reference and "
                                "the delta; storing it direct", key)
                    return None, NO_SCRATCH
                elif remembered is not None:
                    try:
                        self._fetch_reference(ref.key, ref.sha256, ref_path)
                    except (IntegrityError, NotFound) as exc:
                        # replaced or removed since this process saw it: ask the bucket
                        log.info("put %s: the reference seen before is gone (%s); "
                                 "looking again", key, exc)
                        self._saw_reference(deltaspace, None)
                        continue
                else:
                    try:
                        self._fetch_reference(ref.key, ref.sha256, ref_path)
                    except NotFound as exc:
                        # removed between its HEAD and this GET (another mount emptied
                        # the directory, and its collector took the reference): ask again
                        # (none now: this file seeds a new one)
                        log.info("put %s: the reference went between its HEAD and its GET "
                                 "(%s); looking again", key, exc)
                        self._saw_reference(deltaspace, None)
                        continue
                with open(ref_path, "rb") as f:
                    ref_head = f.read(8)
                if is_compressed_stream(ref_head) and not extended:
                    return None, "the directory's reference is a compressed stream"
                delta_path = scratch / "delta"
                zero_diff = ref.sha256 == sha
                form = ""
                chained: tuple[ObjectInfo, int] | None = None
                if not zero_diff and extended and self.policy.chains:
                    got = self._put_chain(src, key, size, sha, attrs, ref, ref_path, scratch,
                                          hints, owned, wrote, ref_holds=ref_holds, side=side,
                                          after=after)
                    if got is _REF_MOVED:
                        continue
                    if isinstance(got, str):
                        return None, got
                    chained = got
                closing: Reference | None = None
                if chained is not None:
                    info, blob_size, closing = chained
                    stored = seeded + info.size + blob_size
                elif not zero_diff and extended and extension.wanted(ref_head, target_head):
                    ext = extension.encode(
                        ref_path, src, size, delta_path, scratch,
                        self.policy.codec_limits(),
                        lambda s_, t_, o_, lim: self._encode(
                            s_, s_.stat().st_size, t_, t_.stat().st_size, o_, False, lim),
                        cache=self.cache)
                    if isinstance(ext, str):
                        return None, ext
                    result = codec.EncodeResult(ext.size, ext.command)
                    form = extension.FORM_GZIP
                    log.debug("put %s: extension delta, %s", key, ext.detail)
                else:
                    result = self._encode(ref_path, ref.size, src, size, delta_path,
                                          zero_diff)
                if chained is None:
                    if result.delta_size is None:
                        return None, result.reason
                    meta = delta_metadata(
                        name=name, sha256=sha, size=size, ref_key=ref.key,
                        ref_sha256=ref.sha256, delta_size=result.delta_size,
                        delta_cmd=result.command, zero_diff=zero_diff, attrs=attrs,
                    )
                    if form:
                        meta[FORM_KEY] = form
                    if not ref_holds():
                        continue
                    info = self.store.put_file(delta_key(key), delta_path, meta)
                    if wrote is not None:  # a later attempt that ends direct removes it
                        wrote.append(True)
                    stored = seeded + result.delta_size
                # The reference may have gone (a concurrent delete of its last delta) or
                # been replaced (a writer without conditional puts) while we encoded.
                # (A chain's put made this HEAD beside its confirm, after its pointer.)
                now = closing if chained is not None else self._head_reference(deltaspace)
                if now is not None and now.sha256 == ref.sha256:
                    kind = "reference" if seeded else "delta"
                    return PutResult(key, kind, size, stored, sha, "",
                                     delta_key(key), info.etag, info.size), ""
                if now is None:
                    log.warning("reference %s vanished while %s was stored; restoring it",
                                ref.key, key)
                    restore = ref_path if ref_path.exists() else None
                    if restore is not None:
                        try:
                            self.store.put_file(
                                ref.key, restore,
                                reference_metadata(name, ref.sha256, ref.extended),
                                if_none_match=True)
                        except AlreadyExists:
                            pass
                        now = self._head_reference(deltaspace)
                        if now is not None and now.sha256 == ref.sha256:
                            kind = "reference" if seeded else "delta"
                            return PutResult(key, kind, size, stored, sha, "",
                                             delta_key(key), info.etag, info.size), ""
                log.warning("reference of %s changed during the put; encoding again", key)
        return None, "the directory's reference kept changing"

    def _encode(self, ref_path: Path, ref_size: int, src: Path, size: int, out: Path,
                zero_diff: bool, limits: codec.Limits | None = None) -> codec.EncodeResult:
        """Encode in xdelta3's default 64 MiB source window first: enough whenever the
        changes stay roughly in place, and it keeps xdelta3 near 120 MB of RAM. Only when
        the reference is larger than that window and the delta came out poor, encode again
        with a window covering the whole reference (bounded by ``max_window``): that finds
        blocks that moved far, at ~1.6x the window in RAM. The wider encode is stopped as
        soon as it cannot beat the first."""
        limits = limits or self.policy.codec_limits()
        first = codec.encode(ref_path, src, out, limits=limits, full_window=False)
        if zero_diff or ref_size <= codec.DEFAULT_SOURCE_WINDOW:
            return first
        if first.delta_size is not None and first.delta_size <= size * self.policy.retry_ratio:
            return first
        level = min(limits.level, 3)  # what codec.encode uses above the default window
        wide_window = codec.encode_window(ref_size, size, True, limits.max_window)
        need = codec.encode_footprint(wide_window, ref_size, size, level)
        room = membudget.current().room()
        if need > room:
            log.info("%s: no wide-window encode (it needs %d MiB; the memory limit leaves "
                     "%d MiB): the delta found in the narrower window stays",
                     src.name, need >> 20, room >> 20)
            return first
        bound = limits.max_ratio if first.delta_size is None else first.delta_size / size
        wide_out = out.with_name(out.name + ".wide")
        from dataclasses import replace

        # one wide encode at a time per process: its memory grows with the reference
        with _WIDE_ENCODES:
            wide = codec.encode(ref_path, src, wide_out,
                                limits=replace(limits, max_ratio=bound), full_window=True)
        if wide.delta_size is None:
            wide_out.unlink(missing_ok=True)
            return first
        os.replace(wide_out, out)
        log.debug("wide window: delta %s -> %d bytes", first.delta_size, wide.delta_size)
        return wide

    # ------------------------------------------------------------------ chains

    def _root_content(self, ref: Reference, ref_path: Path, scratch: Path
                      ) -> tuple[Path, str, str]:
        """The reference's *content* (what chains start from): its bytes, or its gzip
        content when it is a readable gzip. ``(path, "raw"|"gunzip", sha256)``."""
        with open(ref_path, "rb") as f:
            gz = gzrecipe.is_gzip(f.read(3))
        if gz:
            dest = scratch / "root-content"
            try:
                sha = extension._gunzipped(ref_path, dest, scratch, self.cache, None)
                return dest, "gunzip", sha or codec.sha256_file(dest)
            except gzrecipe.NotReproducible as exc:
                log.debug("reference %s not decompressed (%s): chains start from its bytes",
                          ref.key, exc)
        return ref_path, "raw", ref.sha256

    def _choose_base(self, deltaspace: str, key: str, hints: tuple[str, ...],
                     ref: Reference, root: str, root_sha: str
                     ) -> tuple[chain.Pointer, chain.Pending | None] | None:
        """The chain of the best base for ``key`` among recent files of its directory
        (the caller's hints and the puts uploading here now, else the directory's first
        LIST page): a chain pointer against the same reference, and the put that is
        still uploading it (None: in the bucket). None: encode against the reference."""
        name = split_key(key)[1]
        mine = chain.template(name)

        def same_series(k: str) -> bool:
            return k == key or chain.template(split_key(k)[1]) == mine
        # only versions of the same series are taken from memory (an unrelated file
        # keeps the directory's LIST page) or waited for (files of different series
        # never wait for each other's uploads)
        hints = tuple(dict.fromkeys((*(k for k in self.chain_memory.recent_in(deltaspace)
                                       if same_series(k)), *hints)))
        cands = chain.rank(name, [(h, split_key(h)[1], -i) for i, h in enumerate(hints)
                                  if split_key(h)[0] == deltaspace])
        if not cands:
            prefix = f"{deltaspace}/" if deltaspace else ""
            found: list[tuple[str, str, float]] = []
            for page in self.store.iter_pages(prefix):
                for o in page.objects:
                    if o.key.endswith(DELTA_SUFFIX):
                        logical = o.key[: -len(DELTA_SUFFIX)]
                        found.append((logical, split_key(logical)[1], o.mtime))
                break  # one page: a hint, not a search
            cands = chain.rank(name, found)
        roots = ((root_sha, root), (chain.EMPTY_SHA256, chain.ROOT_EMPTY))
        for cand in cands[:3]:
            pending = self.chain_memory.pending(cand) if cand != key else None
            if pending is not None and (pending.failed or not same_series(cand)):
                pending = None  # its announced pointer will not be written, or no wait
            if pending is not None:
                if pending.ref_sha256 == ref.sha256 and \
                        (pending.pointer.chain[-1], pending.pointer.root) in roots:
                    return pending.pointer, pending
                continue
            known = self.chain_memory.pointer(cand)  # written (or read) here: no request
            if known is not None and known[1] == ref.sha256 and \
                    (known[0].chain[-1], known[0].root) in roots:
                return known[0], None
            # a HEAD first: only a chain pointer is fetched (a plain delta may be large)
            head = self.store.head(delta_key(cand))
            if head is None or (head.metadata or {}).get(FORM_KEY) not in chain.CHAIN_FORMS:
                continue
            try:
                body, info = self.store.get_bytes(delta_key(cand))
            except NotFound:
                continue
            meta = info.metadata or {}
            if meta_get(meta, "ref_sha256") != ref.sha256:
                continue
            try:
                p = chain.parse_pointer(body, info.key)
            except IntegrityError as exc:
                log.debug("base candidate %s skipped: %s", info.key, exc)
                continue
            if (p.chain[-1], p.root) not in roots:
                continue
            self.chain_memory.wrote(cand, p, ref.sha256)
            return p, None
        return None

    def _chain_content(self, deltaspace: str, links: tuple[str, ...], root_path: Callable[[], Path],
                       scratch: Path, what: str, trusted: list[str] | None = None) -> Path:
        """The verified content ``links[0]`` at a scratch path: from the cache, or
        decoded from the nearest cached content down the chain (the reference's content
        at worst), its blobs fetched in parallel. Every content decoded on the way is
        cached (the next version's read starts there)."""
        top = links[0]
        base_at = len(links) - 1
        base_path: Path | None = None
        for i, s in enumerate(links[:-1]):
            p = scratch / f"chain-{i}"
            # the content itself (i == 0) is returned as it is: always verified first
            unverified = trusted is not None and i > 0
            if self.cache.link(s, p, verify=not unverified):
                if unverified:
                    trusted.append(s)  # type: ignore[union-attr]
                if i == 0:
                    return p
                base_at, base_path = i, p
                break
        if base_path is None:
            base_path = root_path()
        keys = [chain.blob_key(deltaspace, links[j], links[j + 1]) for j in range(base_at)]

        def fetch(j: int) -> Path:
            dest = scratch / f"blob-{j}"
            try:
                # a blob is immutable and its decode checks its output: any copy serves
                if self.prefetched.take(keys[j], dest) is None:
                    self.store.get_file(keys[j], dest)
            except NotFound:
                raise IntegrityError(f"{what}: chain blob {keys[j]} is missing") from None
            return dest

        with ThreadPoolExecutor(min(4, max(1, base_at))) as pool:
            blobs = list(pool.map(fetch, range(base_at)))
        cur = base_path
        for j in range(base_at - 1, -1, -1):
            with open(blobs[j], "rb") as f:
                head = f.read(1 << 16)
            offset = chain.check_blob(head, links[j], links[j + 1], keys[j])
            vcdiff = scratch / f"vcdiff-{j}"
            with open(blobs[j], "rb") as f, open(vcdiff, "wb") as v:
                f.seek(offset)
                while chunk := f.read(codec.CHUNK):
                    v.write(chunk)
            blobs[j].unlink()
            out = scratch / f"content-{j}"
            sums = bytearray()
            codec.decode(cur, vcdiff, out, links[j], sums=sums)
            vcdiff.unlink()
            if cur != base_path or base_at < len(links) - 1:
                cur.unlink(missing_ok=True)
            try:
                self.cache.add(links[j], out, link=True, sums=bytes(sums))
            except OSError as exc:  # a full cache disk: the chain still decodes
                log.debug("chain content not cached: %s", exc)
            cur = out
        return cur

    def _put_chain(self, src: Path, key: str, size: int, sha: str, attrs: Attrs,
                   ref: Reference, ref_path: Path, scratch: Path, hints: tuple[str, ...],
                   owned: bool = False, wrote: list[bool] | None = None, *,
                   ref_holds: Callable[[], bool],
                   side: Callable[..., Future],  # type: ignore[type-arg]
                   after: str = "") -> tuple[ObjectInfo, int, Reference | None] | str:
        """Store ``src`` as a chain pointer and (unless its content is its base's) one
        blob; returns ``(pointer info, blob bytes, the reference as seen after the
        pointer was in the bucket)`` or why it is better stored whole; :data:`_REF_MOVED`
        when ``ref_holds()``, asked before the first upload, says the reference encoded
        against is not the bucket's any more."""
        deltaspace, name = split_key(key)
        with open(src, "rb") as f:
            target_gz = gzrecipe.is_gzip(f.read(3))
        content, recipe = src, None
        if target_gz:
            content = scratch / "target-content"
            try:
                recipe = gzrecipe.analyze(src, content, extension.room(scratch) // 2)
            except gzrecipe.NotReproducible as exc:
                return f"gzip stream not reproducible: {exc}"
        content_size = content.stat().st_size
        content_sha = sha if recipe is None else codec.sha256_file(content)
        ref_root, ref_form, ref_root_sha = self._root_content(ref, ref_path, scratch)
        empty = scratch / "empty"
        empty.touch()
        roots = {ref_form: ref_root, chain.ROOT_EMPTY: empty}
        # The state the last confirm here read lets the base be chosen and encoded at
        # once; the LIST asked beside it becomes ``before`` and must show the same state
        # before anything is uploaded (else the base's chain is checked again).
        before = self.chain_memory.state(deltaspace)
        fresh: Future[chain.SweepState] | None = None
        if before is not None:
            fresh = side(chain.sweep_state, self.store, deltaspace, True)
        else:
            before = chain.sweep_state(self.store, deltaspace, ensure=True)
        if after:
            log.debug("put %s: prepared beside the put of %s (%s); choosing the base "
                      "once it is encoded", key, after,
                      "encoding" if self.chain_memory.is_encoding(after) else "encoded")
            # The previous version of this series is encoding in this process: everything
            # above ran beside its encode; its content is this one's best base once it
            # is announced (or the choice goes without it when its put ends otherwise).
            if not self.chain_memory.wait_encoded(after, self.ENCODE_WAIT):
                log.info("put %s: %s is still encoding after %.0f s; not waiting for it",
                         key, after, self.ENCODE_WAIT)
            hints = tuple(dict.fromkeys((after, *hints)))
        chosen = self._choose_base(deltaspace, key, hints, ref, ref_form, ref_root_sha)
        found, waits_for = chosen if chosen is not None else (None, None)
        at_bound = found is not None and found.depth >= chain.MAX_DEPTH
        if found is not None:
            links, root = chain.next_base(found.chain), found.root
        else:
            links, root = (ref_root_sha,), ref_form
        hp = chain.hidden_prefix(deltaspace)
        # a base still uploading here is checked once it is confirmed (base_holds)
        def link_blobs(links: tuple[str, ...]) -> list[str]:
            return [hp + chain.blob_name(a, b) for a, b in zip(links, links[1:])]

        if waits_for is None and len(links) > 1 and not chain.present(
                self.store, link_blobs(links), self.chain_memory, deltaspace, before):
            log.info("put %s: the chain of its base is incomplete; encoding against the "
                     "reference", key)
            links, root, at_bound = (ref_root_sha,), ref_form, False
        limits = self.policy.codec_limits()

        def encode(links: tuple[str, ...], root: str, ratio: float, out: Path,
                   hopeless: float = limits.hopeless_ratio) -> tuple[int, str] | str:
            """The blob of ``content`` against ``links[0]`` at ``out``: (size, command)."""
            try:
                source = self._chain_content(deltaspace, links, lambda: roots[root], scratch,
                                             f"base of {key}")
            except (IntegrityError, NotFound, codec.CodecError) as exc:
                # a damaged or vanished base: the reference (or storing whole) instead,
                # never a failed upload (review: every later version chose it again)
                log.warning("put %s: its base cannot be read (%s); not using it", key, exc)
                return f"base chain unreadable: {exc}"
            vcdiff = scratch / "chain-vcdiff"
            res = self._encode(source, source.stat().st_size, content, content_size, vcdiff,
                               False, replace(limits, max_ratio=ratio,
                                              hopeless_ratio=hopeless))
            if source != roots[root]:
                source.unlink(missing_ok=True)
            if res.delta_size is None:
                return res.reason or "delta too large"
            with open(out, "wb") as o, open(vcdiff, "rb") as v:
                o.write(chain.blob_header(content_sha, links[0], content_size))
                while chunk := v.read(codec.CHUNK):
                    o.write(chunk)
            vcdiff.unlink()
            return out.stat().st_size, res.command

        def base_holds() -> bool:
            """Whether the chain encoded against is still there: as of its own put's
            confirm when that put was still uploading it (whose state then stands as
            ``before``), else as of the LIST asked beside the encode (likewise)."""
            nonlocal before, fresh, waits_for
            if waits_for is not None and len(links) < 2:
                waits_for = None  # now against the reference or a keyframe: no base
            if waits_for is not None:
                base, waits_for = waits_for, None
                log.debug("put %s: encoded against %s, waiting for its upload", key, base.key)
                state = base.outcome(self.PENDING_WAIT)
                if state is not None:
                    before, fresh = state, None
                    return True
                log.info("put %s: its base %s was not stored as announced; encoding "
                         "against the reference", key, base.key)
                return False
            if fresh is None:
                return True
            got, fresh = fresh.result(), None
            same = chain.Memory.same_state(got, before)
            before = got
            if same or len(links) < 2 or chain.present(
                    self.store, link_blobs(links), self.chain_memory, deltaspace, got):
                return True
            log.info("put %s: a sweep ran since this mount last looked and the chain of "
                     "its base is incomplete; encoding against the reference", key)
            return False

        budget = min(limits.max_ratio * size / max(1, content_size), 1.0)
        announced: chain.Pending | None = None
        info: ObjectInfo | None = None
        try:
            self.chain_memory.encoding(key)
            if self.on_announce is not None:
                self.on_announce()  # the next version may start preparing
            for attempt in range(2):
                blob_size = 0
                if links[0] != content_sha:
                    blob = scratch / "chain-blob"
                    got = encode(links, root, budget, blob)
                    if at_bound and (isinstance(got, str) or got[0] > chain.KEYFRAME_TRY * size):
                        # the jump back drifted far: a keyframe (the content against nothing)
                        # starts the chain afresh if it costs less (architecture.md, "Chains")
                        # (allowed up to the file's size: on incompressible data it costs
                        # what storing the file whole would, once per chain)
                        # it is kept only when smaller than the jump's blob, so it is stopped
                        # as soon as its output reaches that size (a release of compressed
                        # members, such as a wheel, spent 1.3 s compressing a whole keyframe
                        # that was then thrown away)
                        kf_limit = ((1.01 if recipe is None else 1.10) * size + 4096) \
                            / max(1, content_size)
                        if not isinstance(got, str):
                            kf_limit = min(kf_limit, got[0] / max(1, content_size))
                        kf = encode((chain.EMPTY_SHA256,), chain.ROOT_EMPTY, kf_limit,
                                    scratch / "chain-keyframe", hopeless=2.0)
                        if not isinstance(kf, str) and (isinstance(got, str) or kf[0] < got[0]):
                            os.replace(scratch / "chain-keyframe", blob)
                            got, links, root = kf, (chain.EMPTY_SHA256,), chain.ROOT_EMPTY
                        (scratch / "chain-keyframe").unlink(missing_ok=True)
                    if isinstance(got, str):
                        if len(links) > 1 or root != ref_form:
                            links, root, at_bound = (ref_root_sha,), ref_form, False
                            got = encode(links, root, budget, blob)  # the base was a poor one
                        if isinstance(got, str) and root != chain.ROOT_EMPTY:
                            # nothing here to delta against (the reference is another kind of
                            # file): a keyframe smaller than the file starts a chain its next
                            # versions extend; one as large as the file is stored whole
                            kf = encode((chain.EMPTY_SHA256,), chain.ROOT_EMPTY,
                                        size / max(1, content_size), blob)
                            if not isinstance(kf, str):
                                got, links, root = kf, (chain.EMPTY_SHA256,), chain.ROOT_EMPTY
                        if isinstance(got, str):
                            return got
                    blob_size, command = got
                    if blob_size >= limits.max_ratio * size and root != chain.ROOT_EMPTY:
                        return "delta too large"
                    if root == chain.ROOT_EMPTY and not at_bound and blob_size >= size:
                        return "delta too large"
                    cmd = f"deltafs-chain: {command}"
                else:
                    cmd = "deltafs-chain: same content as its base"
                p = chain.Pointer((content_sha, *links) if links[0] != content_sha else links,
                                  root, recipe.to_json() if recipe is not None else None)
                if attempt == 0 and self._cache_content(key, content_sha, content,
                                                        content != src or owned):
                    # The next version may encode against this content while this uploads:
                    # it is cached now, and the put is announced (architecture.md, C5:
                    # that put uploads nothing before this one is confirmed).
                    announced = chain.Pending(key, p, ref.sha256)
                    self.chain_memory.announce(announced)
                    if self.on_announce is not None:
                        self.on_announce()
                elif attempt == 0:
                    # not cached (a full cache disk): nothing will be announced, so a
                    # version waiting for this encode chooses its base now
                    self.chain_memory.encoded(key)
                if not ref_holds():
                    return _REF_MOVED
                if not base_holds():
                    if announced is not None:  # what it announced will not be written
                        self.chain_memory.withdraw(announced)
                    links, root, at_bound = (ref_root_sha,), ref_form, False
                    if blob_size:
                        blob.unlink(missing_ok=True)
                    continue
                if blob_size:
                    self.store.put_file(chain.blob_key(deltaspace, content_sha, links[0]), blob,
                                        {})
                    blob.unlink()
                    crash_point("chain-after-blob")
                meta = delta_metadata(
                    name=name, sha256=sha, size=size, ref_key=ref.key, ref_sha256=ref.sha256,
                    delta_size=blob_size, delta_cmd=cmd, zero_diff=False, attrs=attrs)
                meta[FORM_KEY] = chain.FORM_CHAIN_GZIP if recipe is not None else chain.FORM_CHAIN
                meta[chain.BLOB_KEY] = chain.blob_name(p.chain[0], p.chain[1]) if p.depth else ""
                meta[chain.DEPTH_KEY] = str(p.depth)
                info = self.store.put_bytes(delta_key(key), chain.pointer_bytes(p), meta)
                if wrote is not None:
                    wrote.append(True)
                crash_point("chain-after-pointer")
                needed = [chain.hidden_prefix(deltaspace) + n for n in p.blob_names()]
                # the closing check of the reference (see _put_delta_attempts) needs only the
                # pointer in the bucket: it goes beside the confirm, not after it
                closing = side(self._head_reference, deltaspace)
                state = chain.confirmed(self.store, deltaspace, before, needed,
                                        memory=self.chain_memory)
                if state is not None:
                    self.chain_memory.wrote(key, p, ref.sha256)
                    if announced is not None and announced.pointer == p:
                        announced.finish(state)  # (before the closing HEAD can raise)
                now_ref = closing.result()
                if state is not None:
                    log.debug("put %s: chain depth %d, blob %d bytes", key, p.depth, blob_size)
                    if attempt:  # the next version's base: it starts here instead of decoding
                        self._cache_content(key, content_sha, content, content != src or owned)
                    return info, blob_size, now_ref
                log.warning("put %s: a sweep took a blob its chain needs; encoding it "
                            "against the reference", key)
                if announced is not None:  # a put waiting on this chain goes elsewhere
                    self.chain_memory.withdraw(announced)
                links, root, at_bound = (ref_root_sha,), ref_form, False
                before = chain.sweep_state(self.store, deltaspace, ensure=True)
            if info is not None:
                try:  # our own broken pointer must not stay beside the direct object
                    self.store.delete(delta_key(key), if_match=info.etag or None)
                except (NotFound, Changed):
                    pass
            return "its chain kept being swept"
        finally:
            self.chain_memory.encoded(key)  # a put waiting for it goes on (no-op if told)
            if announced is not None:
                self.chain_memory.withdraw(announced)

    def _decode_chain(self, stored: StoredFile, out: Path, scratch: Path,
                      reference: Path | None = None, body: bytes | None = None,
                      into_cache: bool = False, trusted: list[str] | None = None) -> bool:
        """Rebuild a chain pointer's file into ``out`` (checked by the caller);
        ``reference``: a verified copy of its reference (else fetched or cached);
        ``body``: the pointer, when the caller has it. With ``into_cache``, a file whose
        bytes are its content is left in the cache instead (verified there under its
        SHA-256, as every decoded content is): True then, and ``out`` is not written.
        ``trusted``: cached sources are used without hashing them first, their keys
        listed there (each decode checks its output: a damaged source fails it)."""
        deltaspace = split_key(stored.object_key)[0]
        if body is None and stored.etag:
            ahead = scratch / "pointer-ahead"
            if self.prefetched.take(stored.object_key, ahead, etag=stored.etag) is not None:
                body = ahead.read_bytes()
        if body is None:
            body, _ = self.store.get_bytes(stored.object_key)
        p = chain.parse_pointer(body, stored.object_key)
        ref_key, ref_sha = stored.ref_key, stored.ref_sha256

        def root_path() -> Path:
            path = scratch / "ref"
            if p.root == chain.ROOT_EMPTY:  # a keyframe: the chain starts from nothing
                path = scratch / "empty"
                path.touch()
                return path
            if reference is not None:
                path = reference
            else:
                try:
                    unverified = trusted is not None and p.depth > 0
                    if self._fetch_reference(ref_key or "", ref_sha or "", path,
                                             verify=not unverified) and unverified:
                        trusted.append(ref_sha or "")  # type: ignore[union-attr]
                except NotFound:
                    raise IntegrityError(f"its reference {ref_key} is missing") from None
            if p.root == "gunzip":
                dest = scratch / "root-content"
                try:
                    extension._gunzipped(path, dest, scratch, self.cache, p.chain[-1])
                except gzrecipe.NotReproducible as exc:
                    raise IntegrityError(f"its reference cannot be decompressed: {exc}") \
                        from None
                return dest
            return path

        if p.depth == 0:
            content = root_path()
            if codec.sha256_file(content) != p.chain[0]:
                raise IntegrityError("its reference's content is not the one it names")
        else:
            content = self._chain_content(deltaspace, p.chain, root_path, scratch,
                                          stored.object_key, trusted=trusted)
        if p.recipe is None:
            if into_cache and p.chain[0] == stored.sha256 \
                    and self.cache.has(p.chain[0]):
                return True
            # a copy, never a rename: ``content`` is a hard link of a cache entry (or the
            # caller's reference), and ``out`` may become a user's file
            shutil.copyfile(content, out)
            return False
        try:
            gzrecipe.rebuild(gzrecipe.Recipe.from_json(p.recipe), content, out)
        except (KeyError, TypeError, ValueError, codec.CodecError) as exc:
            out.unlink(missing_ok=True)
            raise IntegrityError(f"cannot compress the content again: {exc}") from None
        return False

    def _seed_reference(self, src: Path, deltaspace: str, name: str,
                        sha: str, owned: bool = False) -> tuple[Reference | None, int]:
        """Make ``src`` the reference of ``deltaspace`` with a conditional create.

        Returns ``(reference, bytes uploaded)``: if another writer won the race, their
        reference and 0. ``(None, 0)`` when ``src`` cannot serve as a reference.
        """
        extended = self.policy.format != "deltaglider"
        with open(src, "rb") as f:
            head = f.read(8)
        if is_compressed_stream(head) and not (extended and (
                is_zstd(head) or (gzrecipe.is_gzip(head) and gzrecipe.readable(src)))):
            # a gzip seeds a reference only if its content can be read back (not a
            # bgzip, a truncated download or a bomb): deltas are made against it
            return None, 0
        key = reference_key(deltaspace)
        try:
            info = self.store.put_file(key, src, reference_metadata(name, sha, extended),
                                       if_none_match=True)
        except AlreadyExists:
            log.info("another writer created %s first; encoding against theirs", key)
            ref = self._head_reference(deltaspace)
            if ref is None:
                raise StoreError(f"{key} exists and vanished at once; retry the put") from None
            return ref, 0
        # Belt and braces: a store that applied two conditional creates (or a writer
        # that overwrites) shows up here as a different SHA-256.
        ref = self._head_reference(deltaspace)
        if ref is None or ref.sha256 != sha:
            return ref, 0
        self.cache.add(sha, src, link=owned)
        return ref, info.size

    def _drop_other_form(self, key: str, kind: str) -> None:
        """A file stored direct must not leave an older delta behind, and vice versa."""
        other = key if kind in ("delta", "reference") else delta_key(key)
        info = self.store.head(other)
        if info is not None:
            try:
                self.store.delete(other, if_match=info.etag or None)
            except (NotFound, Changed):
                return  # gone already, or replaced by another writer: theirs stays
            if other.endswith(".delta"):
                self.collect_reference(split_key(key)[0])

    # ---------------------------------------------------------------------- get

    def stat(self, key: str) -> StoredFile:
        """How ``key`` is stored (one or two HEADs); NotFound if it is not."""
        check_logical_key(key)
        for object_key in (delta_key(key), key):
            info = self.store.head(object_key)
            if info is not None:
                found = classify(info.key, info.size, info.etag, info.mtime, info.metadata)
                if found is not None:
                    return found
        raise NotFound(f"{self.store.name}/{key}: no such file")

    def get(self, key: str, dest: Path, stored: StoredFile | None = None) -> StoredFile:
        """Rebuild ``key`` into ``dest``, SHA-256-verified; ``dest`` appears (atomically,
        by rename) only when every byte matched. Returns how the file was stored."""
        stored = stored or self.stat(key)
        tmp = part_path(dest)
        try:
            self.materialize(stored, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        mtime_ns = stored.attrs.mtime_ns
        if mtime_ns is not None:
            os.utime(dest, ns=(mtime_ns, mtime_ns))
        return stored

    def fetch_ahead(self, stored: StoredFile,
                    stopped: Callable[[], bool] = lambda: False) -> int:
        """GET what a rebuild of the delta ``stored`` will ask for first, into
        :attr:`prefetched`: its object (pointer or plain delta, this version only) and,
        for a chain pointer whose content is not cached, the blob that yields it. No
        decode: its base may still be being rebuilt. Returns the objects fetched.
        ``stopped()`` true (unmount): no second GET. Blocking (worker thread); errors
        propagate (the rebuild, if it comes, GETs again and reports)."""
        if stored.kind is not Kind.DELTA or not stored.etag:
            return 0
        key, fetched = stored.object_key, 0
        path = self.prefetched.begin(key)
        if path is None:
            return 0  # here already or on its way: its blob was seen to by that fetch
        info: ObjectInfo | None = None
        blob: str | None = None
        bpath: Path | None = None
        try:
            info = self.store.get_file(key, path)
            if info.etag != stored.etag:
                return 0  # rewritten since listed: the rebuild will say what it finds
            fetched = 1
            if (info.metadata or {}).get(FORM_KEY) in chain.CHAIN_FORMS and not stopped():
                p = chain.parse_pointer(path.read_bytes(), key)
                if p.depth > 0 and not self.cache.has(p.chain[0]):
                    blob = chain.blob_key(split_key(key)[0], p.chain[0], p.chain[1])
                    # claimed before the pointer is handed over: a rebuild that takes
                    # the pointer then waits for this blob instead of GETting it too
                    bpath = self.prefetched.begin(blob)
        finally:
            self.prefetched.end(key, path, info if fetched else None)
        if blob is None or bpath is None:
            return fetched
        binfo: ObjectInfo | None = None
        try:
            binfo = self.store.get_file(blob, bpath)
        finally:
            self.prefetched.end(blob, bpath, binfo)
        return fetched + 1

    def materialize(self, stored: StoredFile, out: Path) -> str | None:
        """Write the verified content of ``stored`` to ``out`` (any filesystem); returns
        the SHA-256 it was verified against (``None`` for a foreign object)."""
        return self.materialize_for_cache(stored, out, into_cache=False)[0]

    def materialize_for_cache(self, stored: StoredFile, out: Path, into_cache: bool = True
                              ) -> tuple[str | None, bool]:
        """:meth:`materialize` for a reader that opens the cache entry afterwards (the
        mount): a chain file whose decode has just put its content in the cache,
        verified, under its SHA-256 is not copied to ``out`` (16 MB written and hashed
        again for nothing). Returns ``(sha256, True)`` then, else ``(sha256, False)``
        with ``out`` written."""
        if stored.kind is Kind.DELTA:
            return self._decode(stored, out, into_cache)
        info = self.store.get_file(stored.object_key, out)
        expected = meta_get(info.metadata, "file_sha256")
        if expected:
            actual = codec.sha256_file(out)
            if actual != expected:
                out.unlink(missing_ok=True)
                raise IntegrityError(
                    f"{self.store.name}/{stored.object_key} is corrupt: SHA-256 "
                    f"{actual[:12]}… instead of {expected[:12]}…"
                )
        return expected, False

    def _decode(self, stored: StoredFile, out: Path, into_cache: bool = False
                ) -> tuple[str, bool]:
        with self._scratch() as scratch:
            obj: Path | None = None
            body: bytes | None = None
            meta = stored.metadata
            if meta is None:
                # one GET brings the metadata and the body (a HEAD first would cost a
                # round trip per cold open), unless the read-ahead got this version
                obj = scratch / "object"
                info = (self.prefetched.take(stored.object_key, obj, etag=stored.etag)
                        if stored.etag else None) or self.store.get_file(stored.object_key, obj)
                meta = info.metadata
                stored = classify(info.key, info.size, info.etag, info.mtime, meta)  # type: ignore[assignment]
            sha = stored.sha256
            ref_key, ref_sha = stored.ref_key, stored.ref_sha256
            if not (sha and ref_key and ref_sha):
                raise IntegrityError(
                    f"{self.store.name}/{stored.object_key}: delta metadata incomplete "
                    "(dg-file-sha256, dg-ref-key and dg-ref-sha256 are required)"
                )
            if (meta or {}).get(FORM_KEY) in chain.CHAIN_FORMS:
                if obj is not None:
                    body = obj.read_bytes()
                try:
                    return sha, self._decode_chain_checked(stored, sha, out, scratch, body,
                                                           into_cache)
                except IntegrityError as exc:
                    out.unlink(missing_ok=True)
                    raise IntegrityError(
                        f"{self.store.name}/{stored.object_key} cannot be rebuilt: {exc}"
                    ) from None
            delta_path = obj or scratch / "delta"
            for verify in (False, True):
                # a cached reference is used unhashed first: the decode checks its output;
                # the verified attempt works in a directory of its own (an extension's
                # decode leaves links of cache entries behind, never to be written)
                work = scratch / ("verified" if verify else "trusting")
                work.mkdir()
                ref_path = work / "ref"
                try:
                    from_cache = self._fetch_reference(ref_key, ref_sha, ref_path,
                                                       verify=verify)
                except NotFound:
                    raise IntegrityError(
                        f"{self.store.name}/{stored.object_key}: its reference {ref_key} "
                        "is missing") from None
                if not delta_path.exists():
                    self.store.get_file(stored.object_key, delta_path)
                try:
                    self._rebuild(ref_path, delta_path, out, sha, work)
                    break
                except IntegrityError as exc:
                    if not verify and from_cache:
                        log.debug("%s: %s; decoding again from a verified reference",
                                  stored.object_key, exc)
                        continue
                    raise IntegrityError(
                        f"{self.store.name}/{stored.object_key} cannot be rebuilt: {exc}"
                    ) from None
        return sha, False

    def _decode_chain_checked(self, stored: StoredFile, sha: str, out: Path, scratch: Path,
                              body: bytes | None, into_cache: bool) -> bool:
        """:meth:`_decode_chain` with cached bases used unhashed (each decode checks its
        output, so a damaged base fails it), then, on a failure, again from verified
        sources; ``out`` checked against ``sha``. True: left in the cache instead."""
        trusted: list[str] = []
        try:
            cached = self._decode_chain(stored, out, scratch, body=body,
                                        into_cache=into_cache, trusted=trusted)
        except IntegrityError as exc:
            if not trusted:
                raise
            log.debug("%s: %s; decoding again from verified sources", stored.object_key, exc)
            again = scratch / "again"
            again.mkdir()
            cached = self._decode_chain(stored, out, again, body=body, into_cache=into_cache)
        if cached:
            return True
        actual = codec.sha256_file(out)
        if actual != sha:
            raise IntegrityError(f"rebuilt file has SHA-256 {actual[:12]}… "
                                 f"instead of {sha[:12]}…")
        return False

    def _rebuild(self, ref_path: Path, delta_path: Path, out: Path, sha: str,
                 scratch: Path) -> None:
        """Apply a delta object (plain VCDIFF or a deltafs extension object) to its
        reference; ``out`` holds the file only if its SHA-256 is ``sha``."""
        if extension.is_extension(delta_path):
            extension.decode(ref_path, delta_path, out, sha, scratch, self.cache)
        else:
            codec.decode(ref_path, delta_path, out, sha)

    # ----------------------------------------------------- namespace changes (mount)

    def put_marker(self, dir_key: str, attrs: Attrs = Attrs()) -> ObjectInfo:
        """The zero-byte ``dir/`` object that keeps an empty directory (and its mode,
        owner and mtime, in the same metadata keys files use)."""
        return self.store.put_bytes(_dir_prefix(dir_key), b"", attrs.to_metadata())

    def put_symlink(self, key: str, target: str, attrs: Attrs) -> PutResult:
        """A symlink: a direct object whose body is the target, typed in metadata."""
        check_logical_key(key)
        body = target.encode("utf-8", "surrogateescape")
        import hashlib

        sha = hashlib.sha256(body).hexdigest()
        meta = direct_metadata(name=split_key(key)[1], sha256=sha, size=len(body), attrs=attrs)
        info = self.store.put_bytes(key, body, meta)
        self._drop_other_form(key, "direct")
        return PutResult(key, "direct", len(body), len(body), sha, "", key, info.etag)

    def set_attrs(self, stored: StoredFile, attrs: Attrs) -> StoredFile:
        """Rewrite the POSIX attributes of a published file in place (server-side copy:
        cheap, since deltas are small)."""
        meta = self._full_metadata(stored)
        meta.update(stored.attrs.merged(attrs).to_metadata())
        info = self.store.copy(stored.object_key, stored.object_key, meta,
                               if_match=stored.etag or None)
        return classify(info.key, info.size, info.etag, info.mtime, meta) or stored

    def move(self, stored: StoredFile, new_key: str, attrs: Attrs | None = None,
             collect: bool = True, drop_source: bool = True) -> StoredFile:
        """Give a published file a new logical key without re-uploading it when possible.

        Direct objects and deltas whose new directory shares their reference are copied
        server-side; a delta moving to a directory without a reference takes its reference
        along (copied too); otherwise the file is rebuilt and put anew, so that every
        deltaspace stays self-contained. The old object goes last, or with
        ``drop_source=False`` is left for the caller to delete once it has recorded the
        move (the mount: until then the source is the only object its journal names).
        """
        check_logical_key(new_key)
        self.chain_memory.forget(stored.logical_key)
        meta = self._full_metadata(stored)
        if attrs is not None:
            meta.update(stored.attrs.merged(attrs).to_metadata())
        new_space, new_name = split_key(new_key)
        if "dg-original-name" in meta:
            meta["dg-original-name"] = direct_metadata(name=new_name, sha256="", size=0)[
                "dg-original-name"]
        if stored.kind is Kind.DELTA:
            moved = self._move_delta(stored, new_key, meta)
        else:
            info = self.store.copy(stored.object_key, new_key, meta,
                                   if_match=stored.etag or None)
            moved = classify(info.key, info.size, info.etag, info.mtime, meta)
            self._drop_other_form(new_key, "direct")
        if moved.object_key != stored.object_key:
            crash_point("move-after-copy")
        if moved.object_key != stored.object_key and drop_source:
            try:
                self.store.delete(stored.object_key, if_match=stored.etag or None)
            except NotFound:
                pass
            except Changed:
                log.info("moved %s -> %s; another writer has written %s since: theirs stays",
                         stored.object_key, moved.object_key, stored.object_key)
            else:
                if stored.kind is Kind.DELTA and collect:
                    self.collect_reference(split_key(stored.logical_key)[0])
        log.info("moved %s -> %s", stored.object_key, moved.object_key)
        return moved

    def _move_delta(self, stored: StoredFile, new_key: str, meta: dict[str, str]) -> StoredFile:
        new_space = split_key(new_key)[0]
        ref_sha = stored.ref_sha256
        target_ref = self._head_reference(new_space)
        if target_ref is None and stored.ref_key:
            old_ref = self.store.head(stored.ref_key)
            if old_ref is not None and meta_get(old_ref.metadata, "file_sha256") == ref_sha:
                ref_meta = dict(old_ref.metadata or {})
                if self.policy.format == "deltaglider":
                    ref_meta.pop(FORMAT_KEY, None)  # strict mode makes no deltafs directory
                self.store.copy(stored.ref_key, reference_key(new_space), ref_meta)
                target_ref = self._head_reference(new_space)
        if target_ref is not None and target_ref.sha256 == ref_sha and (
                meta.get(FORM_KEY) is None or self._extended(target_ref)):
            # (an extension object goes only where extensions may: into a DeltaGlider
            # directory it is rebuilt and stored by that directory's rules, below)
            meta["dg-ref-key"] = target_ref.key
            meta["dg-ref-path"] = split_key(target_ref.key)[1]
            if not target_ref.key.isascii():
                del meta["dg-ref-key"]
            for legacy in ("dg_ref_key", "ref_key", "ref-key"):
                meta.pop(legacy, None)
            old_space = split_key(stored.object_key)[0]
            carried: list[str] = []
            if meta.get(FORM_KEY) in chain.CHAIN_FORMS and new_space != old_space:
                before = chain.sweep_state(self.store, new_space, ensure=True)
                carried = self._copy_chain(stored, old_space, new_space)
            info = self.store.copy(stored.object_key, delta_key(new_key), meta,
                                   if_match=stored.etag or None)
            for _ in range(3):
                if not carried or chain.confirm(self.store, new_space, before, carried):
                    break
                # a sweep of the new directory took some: copy again, check again
                before = chain.sweep_state(self.store, new_space, ensure=True)
                carried = self._copy_chain(stored, old_space, new_space)
            else:
                raise StoreError(f"moving {stored.object_key}: sweeps of {new_space or '/'} "
                                 "kept taking its chain; retry the rename")
            if not carried and meta.get(FORM_KEY) in chain.CHAIN_FORMS:
                # within the directory: the old pointer goes only while no sweep lists
                # (a pointer renamed twice across one sweep's listings would be missed)
                chain.wait_no_sweep(self.store, new_space)
            self._drop_other_form(new_key, "delta")
            return classify(info.key, info.size, info.etag, info.mtime, meta)  # type: ignore[return-value]
        # Different reference there: rebuild and store anew.
        with self._scratch() as scratch:
            content = scratch / "content"
            self.materialize(stored, content)
            self.put(content, new_key, stored.attrs.merged(Attrs.from_metadata(meta)),
                     sha256=stored.sha256)
        return self.stat(new_key)

    def _copy_chain(self, stored: StoredFile, old_space: str, new_space: str) -> list[str]:
        """A chain pointer moving to another directory takes the blobs its chain goes
        through along (server-side copies; a directory's pointers only ever name blobs
        of their own directory, so each directory can be swept on its own)."""
        body, _ = self.store.get_bytes(stored.object_key)
        p = chain.parse_pointer(body, stored.object_key)
        copied = []
        for name in p.blob_names():
            dst = chain.hidden_prefix(new_space) + name
            try:  # always copied, never skipped when there: a fresh copy is young, so
                # no sweep takes it for garbage (it may be an unused one about to go)
                self.store.copy(chain.hidden_prefix(old_space) + name, dst, {})
            except NotFound:
                raise IntegrityError(f"{stored.object_key}: chain blob {name} is missing") \
                    from None
            copied.append(dst)
        return copied

    def _full_metadata(self, stored: StoredFile) -> dict[str, str]:
        if stored.metadata is not None:
            return dict(stored.metadata)
        info = self.store.head(stored.object_key)
        if info is None:
            raise NotFound(f"{self.store.name}/{stored.object_key}: no such object")
        return dict(info.metadata or {})

    def delete_stored(self, stored: StoredFile, collect: bool = True) -> None:
        """Remove a file known by its object (no HEAD), guarded by the ETag it was known
        by (:class:`Changed` when another writer replaced it). With ``collect``, a delta's
        reference goes too once no delta uses it; the mount passes False and collects
        once per directory after a burst of deletes (``rm -r``: one LIST, not one per
        file)."""
        self.chain_memory.forget(stored.logical_key)
        self.store.delete(stored.object_key, if_match=stored.etag or None)
        log.info("deleted %s", stored.object_key)
        if stored.kind is Kind.DELTA and collect:
            self.collect_reference(split_key(stored.logical_key)[0])

    # ------------------------------------------------------------------- delete

    def delete(self, key: str) -> None:
        """Remove the logical file ``key`` (its delta or direct object). The directory's
        reference stays, even when no delta uses it any more: removing it online could
        orphan a delta another writer is storing right now; :meth:`gc` removes unused
        references after a grace period."""
        stored = self.stat(key)
        self.chain_memory.forget(key)
        try:
            self.store.delete(stored.object_key, if_match=stored.etag or None)
        except Changed:
            raise Changed(f"{self.store.name}/{key} was replaced by another writer while it "
                          "was being deleted; the new version stays") from None
        log.info("deleted %s", key)
        if stored.kind is Kind.DELTA:
            self.collect_reference(split_key(key)[0])

    def collect_reference(self, deltaspace: str, quiet: bool = True) -> bool:
        """Remove ``deltaspace``'s reference once no delta there uses it (its last delta
        was just deleted or moved), without ever leaving a delta without it.

        Another writer may be storing a delta against this reference right now. The
        protocol: LIST (no delta) -> keep a verified copy -> DELETE (If-Match) -> LIST
        again -> if a delta appeared, PUT the reference back (If-None-Match). A writer
        checks after its own delta PUT that the reference is still there and restores it
        from its copy otherwise. Whichever of the two looks last sees the other's write
        (S3 is strongly consistent), so one of them puts it back. Returns whether it was
        removed. Failures are logged, never raised: an unused reference only costs
        storage, and ``deltafs gc`` removes it later. ``quiet=False`` raises them instead
        (the mount keeps the check queued and tries again)."""
        try:
            return self._collect(deltaspace, grace=0.0, now=None) is not None
        except Exception as exc:  # noqa: BLE001 - best effort, see above
            if not quiet:
                raise
            log.warning("could not check whether %s/reference.bin is still used: %s",
                        deltaspace, exc)
            return False

    def _collect(self, deltaspace: str, grace: float, now: float | None) -> str | None:
        import time as _time

        prefix = f"{deltaspace}/" if deltaspace else ""
        ref_key = reference_key(deltaspace)
        ref: ObjectInfo | None = None
        for o in self.store.iter_level(prefix):  # stops at the first delta: one page
            if o.key.endswith(".delta"):
                # files remain: blobs only the removed ones reached may go (after the
                # grace), at most once an hour per directory (one HEAD otherwise)
                self.sweep_blobs(deltaspace, now=now, interval=chain.BLOB_GRACE)
                return None
            if o.key == ref_key:
                ref = o
        # no file left here: every chain blob goes, young ones too (a writer's pointer
        # that appears meanwhile is protected by its own check, chain.confirm)
        self.sweep_blobs(deltaspace, final=True)
        if ref is None:
            return None
        if (_time.time() if now is None else now) - ref.mtime < grace:
            return None
        with self._scratch() as scratch:
            keep = scratch / "ref"
            info = self.store.get_file(ref_key, keep)
            try:
                self.store.delete(ref_key, if_match=ref.etag or None)
            except (NotFound, Changed):
                return None
            self._saw_reference(deltaspace, None)
            appeared = [o for o in self.store.iter_level(prefix) if o.key.endswith(".delta")]
            if appeared:
                log.warning("a delta appeared in %s while its unused reference was removed; "
                            "putting the reference back", deltaspace or "/")
                try:
                    self.store.put_file(ref_key, keep, dict(info.metadata or {}),
                                        if_none_match=True)
                except AlreadyExists:
                    # a writer seeded a new reference in between: deltas encoded against
                    # the one removed would be orphaned; store them again from our copy
                    self._reencode_orphans(appeared, meta_get(info.metadata, "file_sha256"),
                                           keep)
                return None
        log.info("deleted %s: no delta uses it any more", ref_key)
        return ref_key

    def _reencode_orphans(self, deltas: list[ObjectInfo], old_sha: str | None,
                          old_ref: Path) -> None:
        """Deltas encoded against a reference that another writer's new one replaced
        (collector and seeder raced): rebuild each from the kept copy of the old reference
        (SHA-256 checked by the decode) and put it again, against the new reference."""
        if not old_sha:
            return
        current = self._head_reference(split_key(deltas[0].key)[0])
        if current is not None and current.sha256 == old_sha:
            return  # the same content came back: nothing is orphaned
        for o in deltas:
            info = self.store.head(o.key)
            if info is None:
                continue
            stored = classify(info.key, info.size, info.etag, info.mtime, info.metadata)
            if stored is None or stored.ref_sha256 != old_sha:
                continue
            log.warning("%s was encoded against the reference just replaced; storing it "
                        "again against the new one", o.key)
            with self._scratch() as scratch:
                delta = scratch / "delta"
                out = scratch / "content"
                try:
                    if (stored.metadata or {}).get(FORM_KEY) in chain.CHAIN_FORMS:
                        self._decode_chain(stored, out, scratch, reference=old_ref)
                        if codec.sha256_file(out) != stored.sha256:
                            raise IntegrityError("rebuilt file differs from its SHA-256")
                    else:
                        self.store.get_file(o.key, delta)
                        self._rebuild(old_ref, delta, out, stored.sha256 or "", scratch)
                except IntegrityError as exc:
                    log.error("%s: cannot rebuild it from the old reference (%s); left as "
                              "it is", o.key, exc)
                    continue
                again = self.store.head(o.key)
                if again is None or again.etag != info.etag:
                    continue  # rewritten or removed meanwhile: theirs stands
                self.put(out, stored.logical_key, stored.attrs, sha256=stored.sha256)

    def gc(self, prefix: str, grace: float = 3600.0, dry_run: bool = False,
           now: float | None = None) -> list[str]:
        """Remove the references under ``prefix`` that no delta uses and that are older
        than ``grace`` seconds (git's prune expiry is the model): those left behind when a
        removal failed or crashed half-way, or by tools that never remove them. Returns
        their keys. Each goes by the protocol of :meth:`collect_reference`."""
        import time as _time

        now = _time.time() if now is None else now
        prefix = _dir_prefix(prefix)
        spaces: dict[str, ObjectInfo] = {}
        used: set[str] = set()
        chained: set[str] = set()
        for o in self.store.iter_objects(prefix):
            if chain.is_hidden_key(o.key):
                chained.add(o.key[: max(0, o.key.rfind(f"/{chain.HIDDEN}/"))]
                            if not o.key.startswith(f"{chain.HIDDEN}/") else "")
                continue
            space, name = split_key(o.key)
            if name == "reference.bin":
                spaces[space] = o
            elif o.key.endswith(".delta"):
                used.add(space)
        removed: list[str] = []
        for space in sorted(chained):
            # a directory whose files are all gone loses every blob and its markers
            removed += self.sweep_blobs(space, grace, now, dry_run, final=space not in used)
        for space, ref in sorted(spaces.items()):
            if space in used or now - ref.mtime < grace:
                continue
            if dry_run:
                removed.append(ref.key)
                continue
            done = self._collect(space, grace, now)
            if done:
                removed.append(done)
        return removed

    def sweep_blobs(self, deltaspace: str, grace: float = chain.BLOB_GRACE,
                    now: float | None = None, dry_run: bool = False,
                    final: bool = False, interval: float = 0.0) -> list[str]:
        """Remove the chain blobs of ``deltaspace`` that no file's chain reaches any more
        and that are older than ``grace`` (protocol: :func:`deltafs.chain.sweep`)."""
        def heads(keys: list[str]) -> dict[str, dict[str, str] | None]:
            got = self.head_many(keys)
            return {k: dict(f.metadata or {}) for k, f in got.items()}

        return chain.sweep(self.store, deltaspace, heads, grace, now, dry_run, final,
                           interval)

    def delete_tree(self, prefix: str, progress: Callable[[str], None] | None = None) -> int:
        """Remove every logical file below ``prefix`` (a directory), references and
        directory markers included. Returns the number of files removed.

        Streams: files go 1,000 keys per request as the listing reads them; references,
        manifests and markers (one per directory) are kept aside and go last, so no
        delta ever loses its reference while it still exists."""
        prefix = _dir_prefix(prefix)
        batch: list[str] = []
        rest: list[str] = []
        markers: list[str] = []  # each directory's sweep marker (chain.DONE_NAME)
        hidden = False
        n = 0

        def flush() -> None:
            self.store.delete_many(batch)
            if progress:
                for k in batch:
                    progress(k)
            batch.clear()

        for o in self.store.iter_objects(prefix):
            if chain.is_hidden_key(o.key):
                hidden = True  # blobs go in a second pass, once no file needs them
                if chain.is_done_marker(o.key):
                    markers.append(o.key)
                continue
            if _is_reference(o.key) or _is_manifest(o.key) or o.key.endswith("/"):
                rest.append(o.key)
                continue
            batch.append(o.key)
            n += 1
            if len(batch) >= BULK_BATCH:
                flush()
        flush()
        if hidden:
            # each directory's sweep marker goes first: a writer that remembers blobs
            # there (chain.Memory) sees a new state even if this stops half-way
            self.store.delete_many(markers)
            for o in self.store.iter_objects(prefix):
                if chain.is_hidden_key(o.key):
                    batch.append(o.key)
                    if len(batch) >= BULK_BATCH:
                        self.store.delete_many(batch)
                        batch.clear()
            self.store.delete_many(batch)
            batch.clear()
        self.store.delete_many(rest)
        return n

    # --------------------------------------------------------------------- list

    def list(self, prefix: str, recursive: bool = False, sizes: bool = True) -> list[Entry]:
        """Logical files (true sizes) and directories under the directory ``prefix``,
        sorted (all in memory: for big trees use :meth:`iter_entries`).

        Deltas carry their file size in metadata only, so each is HEADed (concurrently);
        ``sizes=False`` skips that and reports ``size=-1`` for them.
        """
        return sorted(self.iter_entries(prefix, recursive, sizes), key=lambda e: e.key)

    def iter_entries(self, prefix: str, recursive: bool = False,
                     sizes: bool = True) -> Iterator[Entry]:
        """Like :meth:`list`, streamed: memory bounded by a LIST page and a HEAD batch,
        whatever the size of the tree. Nearly in key order: a plain object whose
        ``.delta`` form may still come later in the listing is held until the listing
        has passed that key (``a`` comes after ``a-1``, which sorts before ``a.delta``)."""
        prefix = _dir_prefix(prefix)
        dirs: list[str] = []  # sub-prefixes of the pages read so far (one level)
        if recursive:
            objects: Iterator[ObjectInfo] = self.store.iter_objects(prefix)
        else:
            def level() -> Iterator[ObjectInfo]:
                for page in self.store.iter_pages(prefix):
                    dirs.extend(p for p in page.prefixes if not chain.is_hidden_key(p))
                    yield from page.objects
            objects = level()
        for f in self.iter_files(objects, sizes):
            while dirs:
                yield Entry(dirs.pop(), True)
            if f.kind is not Kind.MARKER:
                yield _entry(f)
        for d in dirs:
            yield Entry(d, True)

    def iter_files(self, objects: Iterator[ObjectInfo], sizes: bool = True
                   ) -> Iterator[StoredFile]:
        """Objects (in key order) -> logical files, streamed. Of a delta and a plain
        object with one name the newer wins (a writer that switched forms and crashed
        before cleaning up); since ``name`` < ``name.delta`` in key order, a plain
        object is held until the stream passes ``name.delta``. With ``sizes``, deltas
        are HEADed for their metadata in concurrent batches."""
        held: dict[str, StoredFile] = {}  # logical key -> plain object waiting
        release: list[tuple[str, str]] = []  # heap of (key of its .delta form, logical)
        out: list[StoredFile] = []

        def emit(f: StoredFile) -> Iterator[StoredFile]:
            out.append(f)
            if len(out) >= BULK_BATCH:
                yield from drain()

        def drain() -> Iterator[StoredFile]:
            if sizes:
                need = [f.object_key for f in out if f.kind is Kind.DELTA and f.metadata is None]
                got = self.head_many(need)
                batch = [got.get(f.object_key, f) for f in out]
            else:
                batch = list(out)
            out.clear()
            yield from batch

        for o in objects:
            while release and release[0][0] < o.key:
                _, logical = heapq.heappop(release)
                f = held.pop(logical, None)
                if f is not None:
                    yield from emit(f)
            if chain.is_hidden_key(o.key):
                continue
            f = classify(o.key, o.size, o.etag, o.mtime, o.metadata)
            if f is None or _is_manifest(o.key):
                continue
            if f.kind is Kind.DELTA:
                plain = held.pop(f.logical_key, None)
                if plain is not None and plain.mtime >= f.mtime:  # a tie: the plain one, as the mount
                    f = plain
                yield from emit(f)
            elif f.kind is Kind.MARKER:
                yield from emit(f)
            else:
                held[f.logical_key] = f
                heapq.heappush(release, (f.logical_key + DELTA_SUFFIX, f.logical_key))
        for logical in list(held):
            yield from emit(held.pop(logical))
        yield from drain()

    def _logical(self, objects: list[ObjectInfo]) -> dict[str, StoredFile]:
        """Objects -> logical files; of a delta and a direct object with one name, the
        newer wins (a writer that switched forms and crashed before cleaning up)."""
        files: dict[str, StoredFile] = {}
        for o in objects:
            f = classify(o.key, o.size, o.etag, o.mtime, o.metadata)
            if f is None or _is_manifest(o.key) or chain.is_hidden_key(o.key):
                continue
            old = files.get(f.logical_key)
            if old is None or f.mtime > old.mtime:
                files[f.logical_key] = f
        return files

    def head_many(self, object_keys: list[str]) -> dict[str, StoredFile]:
        """HEAD several objects concurrently (metadata a listing lacks); keys that are
        gone, and reference.bin, are left out of the result."""
        if not object_keys:
            return {}

        def head(key: str) -> StoredFile | None:
            info = self.store.head(key)
            if info is None:
                return None
            return classify(info.key, info.size, info.etag, info.mtime, info.metadata)

        with ThreadPoolExecutor(min(self.head_concurrency, len(object_keys))) as pool:
            return {k: f for k, f in zip(object_keys, pool.map(head, object_keys))
                    if f is not None}

    def _with_metadata(self, files: dict[str, StoredFile]) -> dict[str, StoredFile]:
        need = [f.object_key for f in files.values()
                if f.kind is Kind.DELTA and f.metadata is None]
        for f in self.head_many(need).values():
            files[f.logical_key] = f
        return files

    def stats(self, prefix: str) -> Stats:
        """Logical bytes (true sizes) against every byte stored under ``prefix``;
        streamed (a LIST page and a HEAD batch in memory at a time)."""
        prefix = _dir_prefix(prefix)
        result = Stats()

        def counted() -> Iterator[ObjectInfo]:
            for o in self.store.iter_objects(prefix):
                result.stored_bytes += o.size
                if _is_reference(o.key):
                    result.references += 1
                    result.reference_bytes += o.size
                    result.add_form("reference", 0, 0, o.size)
                elif _is_manifest(o.key):
                    result.add_form("listing manifests", 0, 0, o.size)
                elif chain.is_hidden_key(o.key):
                    if chain.parse_blob_name(o.key.rsplit("/", 1)[-1]):
                        blobs[0] += o.size
                    else:
                        result.add_form("chain bookkeeping", 0, 0, o.size)  # sweep markers
                yield o

        blobs = [0, 0]  # bytes of chain blobs listed, bytes the pointers account for
        for f in self.iter_files(counted()):
            if f.kind is Kind.MARKER:
                continue
            result.files += 1
            size = f.size if f.size is not None else f.object_size
            result.logical_bytes += size
            result.by_kind[f.kind.value] = result.by_kind.get(f.kind.value, 0) + 1
            stored = f.object_size
            if (f.metadata or {}).get(FORM_KEY) in chain.CHAIN_FORMS:
                try:  # the blob this file added (its own link of the chain)
                    blob = int(meta_get(f.metadata, "delta_size") or 0)
                except ValueError:
                    blob = 0
                stored += blob
                blobs[1] += blob
            result.add_form(form_of(f), 1, size, stored)
        if blobs[0] > blobs[1]:
            # blobs no pointer accounts for: bases of deleted files still in a chain,
            # or unused ones the next sweep removes
            result.add_form("chain blobs of removed files", 0, 0, blobs[0] - blobs[1])
        return result

    # ------------------------------------------------------------------- verify

    def verify(self, prefix_or_key: str,
               progress: Callable[[str, str | None], None] | None = None) -> list[tuple[str, str | None]]:
        """Rebuild every file under a prefix (or one file) and check its SHA-256.
        Returns ``(key, error or None)`` for each; nothing is written anywhere."""
        results = []
        for key, error in self.iter_verify(prefix_or_key):
            results.append((key, error))
            if progress:
                progress(key, error)
        return results

    def iter_verify(self, prefix_or_key: str) -> Iterator[tuple[str, str | None]]:
        """:meth:`verify`, streamed: ``(key, error or None)`` as each file is checked."""
        try:
            one = self.stat(prefix_or_key) \
                if prefix_or_key and not prefix_or_key.endswith("/") else None
        except NotFound:
            one = None
        if one is not None:
            targets: Iterator[StoredFile] = iter([one])
        else:
            prefix = _dir_prefix(prefix_or_key)
            targets = (f for f in self.iter_files(self.store.iter_objects(prefix), sizes=False)
                       if f.kind is not Kind.MARKER)
        seen = False
        with self._scratch() as scratch:
            for f in targets:
                seen = True
                out = scratch / "out"
                error: str | None = None
                try:
                    self.materialize(f, out)
                except (IntegrityError, StoreError, codec.CodecError) as exc:
                    error = str(exc)
                finally:
                    out.unlink(missing_ok=True)
                yield f.logical_key, error
        if not seen:
            raise NotFound(f"{self.store.name}/{prefix_or_key}: nothing to verify")


def form_of(f: StoredFile) -> str:
    """How a file is stored, for savings by form (``deltafs stats``)."""
    if f.kind is Kind.DELTA:
        meta = f.metadata or {}
        if meta_get(meta, "note") == NOTE_ZERO_DIFF:
            return "reference"
        form = meta.get(FORM_KEY)
        if form == chain.FORM_CHAIN:
            return "chained delta"
        if form in (extension.FORM_GZIP, chain.FORM_CHAIN_GZIP):
            return "gzip delta"
        return "delta"
    return f.kind.value


def _no_space(exc: BaseException) -> bool:
    """A local ENOSPC, raised as such or wrapped by a store (a GET into a full disk)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(cur):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _dir_prefix(prefix: str) -> str:
    prefix = prefix.lstrip("/")
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def _is_reference(key: str) -> bool:
    return split_key(key)[1] == "reference.bin"


def _is_manifest(key: str) -> bool:
    """A mount's listing manifest: bucket bookkeeping, not a file (see dirmanifest.py)."""
    return split_key(key)[1] == MANIFEST_NAME


def _entry(f: StoredFile) -> Entry:
    size = f.size
    return Entry(
        key=f.logical_key,
        is_dir=False,
        size=size if size is not None else -1,
        stored_size=f.object_size,
        mtime_ns=f.mtime_ns,
        kind=f.kind.value if f.metadata is not None or f.kind is Kind.DELTA else "direct",
        sha256=f.sha256,
        attrs=f.attrs,
        stored=f,
    )
