"""deltafs's extension of the DeltaGlider delta: deltas of compressed files' contents.

An extension object is stored under ``<name>.delta`` with the usual delta metadata (so
listings, sizes and references work as for any delta) plus ``deltafs-form``. Its body is
not VCDIFF: it starts with :data:`MAGIC`, then a 4-byte big-endian length and that many
bytes of JSON (the *header*), then the VCDIFF. So a DeltaGlider reader, or a deltafs
before 0.3, fails on it (xdelta3 rejects the body) instead of returning wrong bytes; and
both check the file's SHA-256 anyway.

Decode rule (docs/architecture.md, "Extension objects"):

1. ``source``: the delta's source is the reference as stored (``raw``) or its gzip
   content (``gunzip``: every member's content, concatenated).
2. Apply the VCDIFF to the source: that gives the target's *content*, whose SHA-256 is
   ``content_sha256``.
3. ``target``: ``null`` means the content is the file; otherwise it is a gzip recipe
   (:mod:`gzrecipe`): the file is that content compressed again as the recipe says.
4. The file's SHA-256 must equal ``dg-file-sha256``.

Blocking: run in a worker thread.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import codec, gzrecipe
from .errors import CodecError, IntegrityError

log = logging.getLogger(__name__)

MAGIC = b"\x89deltafs-x1\n"
FORM_GZIP = "gzip"
#: header fields this version understands; a newer form is refused by name
VERSION = 1


@dataclass(frozen=True)
class Encoded:
    """An extension object written to ``out``: its size, and what it is made of."""

    size: int
    command: str
    detail: str


def is_extension(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def wanted(ref_head: bytes, target_head: bytes) -> bool:
    """Whether a delta of ``target`` against ``ref`` needs the extension (either is gzip);
    otherwise a plain DeltaGlider delta does."""
    return gzrecipe.is_gzip(ref_head) or gzrecipe.is_gzip(target_head)


def _gunzipped(ref: Path, dest: Path, scratch: Path, cache: Any, want: str | None
                ) -> str | None:
    """The content of the gzip reference ``ref`` at ``dest``: from the content cache
    when it holds ``want`` (no decompression), else decompressed (and cached, under its
    SHA-256, which is returned). Raises NotReproducible when it cannot be read."""
    if cache is not None and want and cache.link(want, dest):
        return want
    gzrecipe.decompress(ref, dest, room(scratch))
    if cache is None:
        return None
    from .cache import digest_file

    sha, sums = digest_file(dest)
    if want is None or sha == want:
        try:
            cache.add(sha, dest, link=True, sums=sums)  # scratch: nobody writes it again
        except OSError as exc:
            log.debug("gunzipped reference not cached: %s", exc)
    return sha


def encode(ref: Path, target: Path, target_size: int, out: Path, scratch: Path,
           limits: codec.Limits, encode_fn: Any = None, cache: Any = None
           ) -> Encoded | str:
    """Write an extension object for ``target`` against ``ref`` to ``out``, or return why
    not (a string). ``encode_fn(source, target, out, limits)`` is the VCDIFF encoder
    (the engine's, with its window policy); the delta must stay under
    ``limits.max_ratio`` of ``target_size`` (what storing it whole would cost)."""
    with open(ref, "rb") as f:
        ref_gz = gzrecipe.is_gzip(f.read(3))
    with open(target, "rb") as f:
        target_gz = gzrecipe.is_gzip(f.read(3))
    source, source_form, source_sha = ref, "raw", None
    if ref_gz:
        try:
            source_sha = _gunzipped(ref, scratch / "source-content", scratch, cache, None)
            source, source_form = scratch / "source-content", "gunzip"
        except gzrecipe.NotReproducible as exc:
            # a reference that is no readable gzip (bgzip, truncated): its raw bytes
            log.debug("reference not decompressed (%s): delta against its bytes", exc)
    content, recipe = target, None
    if target_gz:
        content = scratch / "target-content"
        try:
            recipe = gzrecipe.analyze(target, content, room(scratch) // 2)
        except gzrecipe.NotReproducible as exc:
            return f"gzip stream not reproducible: {exc}"
    if source_form == "raw" and recipe is None:
        return "no gzip stream to take apart"
    content_size = content.stat().st_size
    if not content_size:
        return "empty content"
    # the delta competes with the file as stored, not with its (larger) content
    budget = limits.max_ratio * target_size / content_size
    vcdiff = scratch / "ext-vcdiff"
    fn = encode_fn or (lambda s, t, o, lim: codec.encode(s, t, o, limits=lim))
    res = fn(source, content, vcdiff, replace(limits, max_ratio=min(budget, 1.0)))
    if res.delta_size is None:
        return res.reason or "delta too large"
    header = {
        "v": VERSION, "form": FORM_GZIP, "source": source_form,
        "content_sha256": codec.sha256_file(content), "content_size": content_size,
        "target": recipe.to_json() if recipe is not None else None,
    }
    if source_sha:
        header["source_sha256"] = source_sha  # lets readers take it from their cache
    raw = json.dumps(header, separators=(",", ":")).encode()
    with open(out, "wb") as o, open(vcdiff, "rb") as v:
        o.write(MAGIC)
        o.write(struct.pack(">I", len(raw)))
        o.write(raw)
        shutil.copyfileobj(v, o, codec.CHUNK)
    vcdiff.unlink(missing_ok=True)
    size = out.stat().st_size
    if size >= limits.max_ratio * target_size:
        out.unlink(missing_ok=True)
        return "delta too large"
    tools = ",".join(sorted({f"{m.tool}-{m.level}" for m in recipe.members})) if recipe else ""
    detail = (f"{'gunzip(reference)' if ref_gz else 'reference'} -> "
              f"{'gzip content' if target_gz else 'file'}" + (f" ({tools})" if tools else ""))
    return Encoded(size, f"deltafs-x1 {source_form}/{'gzip' if recipe else 'raw'}: "
                         f"{res.command}", detail)


#: left free on the scratch disk by a decompression (the journal, staged files)
RESERVE = 64 << 20


def room(scratch: Path) -> int:
    """Bytes a decompression into ``scratch`` may write: the free space less a reserve,
    so a gzip that expands 60x cannot fill the cache disk under staged files."""
    try:
        st = os.statvfs(scratch)
    except OSError:
        return 1 << 40
    return max(0, st.f_bavail * st.f_frsize - RESERVE)


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header of an extension object and where its VCDIFF starts."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise IntegrityError("not a deltafs extension object")
        raw_len = f.read(4)
        if len(raw_len) < 4:
            raise IntegrityError("extension object truncated")
        (n,) = struct.unpack(">I", raw_len)
        if n > 16 << 20:
            raise IntegrityError("extension header too large")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise IntegrityError(f"extension header is not JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("v") != VERSION or \
            header.get("form") != FORM_GZIP:
        raise IntegrityError(
            f"extension form {header.get('form') if isinstance(header, dict) else '?'} "
            f"version {header.get('v') if isinstance(header, dict) else '?'} is not one "
            "this deltafs reads: upgrade deltafs")
    return header, len(MAGIC) + 4 + n


def decode(ref: Path, obj: Path, out: Path, sha256: str, scratch: Path,
           cache: Any = None) -> None:
    """Rebuild the file an extension object holds into ``out``, verified against
    ``sha256`` (the file's) and the header's content SHA-256 on the way."""
    header, offset = read_header(obj)
    vcdiff = scratch / "x-vcdiff"
    with open(obj, "rb") as f, open(vcdiff, "wb") as v:
        f.seek(offset)
        shutil.copyfileobj(f, v, codec.CHUNK)
    source = ref
    if header.get("source") == "gunzip":
        source = scratch / "x-source"
        want = header.get("source_sha256")
        try:
            _gunzipped(ref, source, scratch, cache, want if isinstance(want, str) else None)
        except gzrecipe.NotReproducible as exc:
            raise IntegrityError(f"its reference cannot be decompressed: {exc}") from None
    elif header.get("source") != "raw":
        raise IntegrityError(f"unknown extension source {header.get('source')!r}")
    target = header.get("target")
    content = out if target is None else scratch / "x-content"
    codec.decode(source, vcdiff, content, str(header.get("content_sha256", "")))
    if target is not None:
        try:
            recipe = gzrecipe.Recipe.from_json(target)
            gzrecipe.rebuild(recipe, content, out)
        except (KeyError, TypeError, ValueError, CodecError) as exc:
            out.unlink(missing_ok=True)
            raise IntegrityError(f"cannot compress the content again: {exc}") from None
    actual = codec.sha256_file(out)
    if actual != sha256:
        out.unlink(missing_ok=True)
        made = (target or {}).get("made_with") if isinstance(target, dict) else None
        raise IntegrityError(
            f"rebuilt gzip stream differs: SHA-256 {actual[:12]}… instead of {sha256[:12]}… "
            "(this machine's zlib or gzip compresses differently from the writer's: "
            f"written with {made or 'unknown'}, here {gzrecipe.tool_versions()})")
