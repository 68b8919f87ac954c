"""gzip streams taken apart and put back together byte for byte.

A byte delta of two gzip files gains nothing: one changed byte early in the content
changes every compressed byte after it. A delta of their *contents* is as small as that
of two tars. That only helps if the exact compressed file can be made again from its
content, so this module finds, for each gzip member, the compressor and settings that
reproduce it, and *proves* it by compressing the content again and comparing every byte
with the original before the file is stored that way. A file that does not reproduce is
stored as before; nothing here is ever trusted without that proof, and the reader checks
the SHA-256 of what it rebuilt.

Two compressors are tried, because they make nearly every gzip file in the wild:

- ``zlib`` (Python's ``gzip``/``tarfile``, most build tools, PyPI sdists): levels 0-9
  with the default memory level, and memory level 9;
- ``gzip``: the GNU ``gzip`` binary (``tar -czf``, shell scripts), levels 1-9. Its deflate
  is not zlib's; the binary itself reproduces it.

The header (name, mtime, flags, OS byte) is kept verbatim; the trailer (CRC-32, size) is
computed again. Bytes after the last member (padding) are kept verbatim when short.

All calls are blocking: run them in a worker thread.
"""
from __future__ import annotations

import base64
import logging
import os
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

from .errors import CodecError

log = logging.getLogger(__name__)

MAGIC = b"\x1f\x8b\x08"
CHUNK = 1 << 20
#: trailing bytes after the last member kept verbatim up to this size; more is not a
#: gzip file this module rebuilds
MAX_TAIL = 64 << 10
#: members per file: bgzip-style files (a member per 64 KiB) are left alone
MAX_MEMBERS = 64
#: a content more than this many times the compressed size is not expanded (gzip bombs)
MAX_EXPANSION = 64
_FTEXT, _FHCRC, _FEXTRA, _FNAME, _FCOMMENT = 1, 2, 4, 8, 16


class NotReproducible(Exception):
    """This gzip file cannot be rebuilt byte for byte (the reason is the message)."""


@dataclass(frozen=True)
class Member:
    """One gzip member: its header bytes, its content length and how it was deflated."""

    header: bytes
    length: int          # bytes of content
    tool: str            # "zlib" or "gzip"
    level: int
    mem_level: int = 8

    def to_json(self) -> dict[str, Any]:
        return {"header": base64.b64encode(self.header).decode(), "length": self.length,
                "tool": self.tool, "level": self.level, "mem_level": self.mem_level}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Member":
        tool = str(d["tool"])
        if tool not in ("zlib", "gzip"):
            raise CodecError(f"unknown gzip compressor {tool!r} in a recipe")
        return cls(base64.b64decode(d["header"]), int(d["length"]), tool, int(d["level"]),
                   int(d.get("mem_level", 8)))


@dataclass(frozen=True)
class Recipe:
    """How to make the gzip file again from its content."""

    members: tuple[Member, ...]
    tail: bytes = b""
    #: the compressors' versions where it was proven (for the reader's error message)
    made_with: str = ""

    @property
    def content_size(self) -> int:
        return sum(m.length for m in self.members)

    def to_json(self) -> dict[str, Any]:
        return {"members": [m.to_json() for m in self.members],
                "tail": base64.b64encode(self.tail).decode(),
                "made_with": self.made_with or tool_versions(self)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Recipe":
        return cls(tuple(Member.from_json(m) for m in d["members"]),
                   base64.b64decode(d.get("tail", "")), str(d.get("made_with", "")))


def tool_versions(recipe: "Recipe | None" = None) -> str:
    """``zlib 1.2.13``, ``gzip 1.12``: what this machine compresses with."""
    tools = {m.tool for m in recipe.members} if recipe else {"zlib", "gzip"}
    out = []
    if "zlib" in tools:
        out.append(f"zlib {zlib.ZLIB_RUNTIME_VERSION}")
    if "gzip" in tools:
        out.append(f"gzip {_gzip_version()}")
    return ", ".join(out)


_GZIP_VERSION: list[str] = []


def _gzip_version() -> str:
    if not _GZIP_VERSION:
        binary = gzip_binary()
        text = "missing"
        if binary:
            try:
                res = subprocess.run([binary, "--version"], capture_output=True, text=True,
                                     timeout=10)
                first = (res.stdout or res.stderr).splitlines()
                text = first[0].split()[-1] if first else "unknown"
            except (OSError, subprocess.SubprocessError):
                text = "unknown"
        _GZIP_VERSION.append(text)
    return _GZIP_VERSION[0]


def is_gzip(head: bytes) -> bool:
    return head[:3] == MAGIC


# ------------------------------------------------------------------- taking apart

@dataclass
class _Parsed:
    header: bytes
    body_start: int
    body_len: int
    length: int


def _read_header(f: IO[bytes], start: int) -> bytes:
    f.seek(start)
    fixed = f.read(10)
    if len(fixed) < 10 or fixed[:3] != MAGIC:
        raise NotReproducible("not a gzip member")
    flags = fixed[3]
    if flags & 0xE0:
        raise NotReproducible("reserved gzip header flags set")
    out = bytearray(fixed)
    if flags & _FEXTRA:
        raw = f.read(2)
        if len(raw) < 2:
            raise NotReproducible("truncated gzip header")
        (xlen,) = struct.unpack("<H", raw)
        extra = f.read(xlen)
        if len(extra) < xlen:
            raise NotReproducible("truncated gzip header")
        out += raw + extra
    for flag in (_FNAME, _FCOMMENT):
        if flags & flag:
            while True:
                b = f.read(1)
                if not b:
                    raise NotReproducible("truncated gzip header")
                out += b
                if b == b"\0":
                    break
                if len(out) > 4096:
                    raise NotReproducible("gzip header name or comment too long")
    if flags & _FHCRC:
        out += f.read(2)
    return bytes(out)


def _inflate_member(f: IO[bytes], start: int, out: IO[bytes] | None,
                    budget: int) -> _Parsed:
    header = _read_header(f, start)
    body_start = start + len(header)
    f.seek(body_start)
    d = zlib.decompressobj(-15)
    crc = 0
    length = 0
    consumed = 0
    while not d.eof:
        chunk = f.read(CHUNK)
        if not chunk:
            raise NotReproducible("truncated gzip stream")
        # bounded output per call: a gzip bomb's megabyte must never become a gigabyte
        # in memory before the budget below sees it
        data = d.decompress(chunk, CHUNK)
        while True:
            crc = zlib.crc32(data, crc)
            length += len(data)
            if length > budget:
                raise NotReproducible("expands too much")
            if out is not None:
                out.write(data)
            if d.eof or not d.unconsumed_tail:
                break
            data = d.decompress(d.unconsumed_tail, CHUNK)
        consumed += len(chunk)
    body_len = consumed - len(d.unused_data)
    f.seek(body_start + body_len)
    trailer = f.read(8)
    if len(trailer) < 8:
        raise NotReproducible("truncated gzip trailer")
    want_crc, want_len = struct.unpack("<II", trailer)
    if want_crc != crc or want_len != length & 0xFFFFFFFF:
        raise NotReproducible("gzip trailer does not match the content (corrupt stream)")
    return _Parsed(header, body_start, body_len, length)


def _members(f: IO[bytes], size: int, out: IO[bytes] | None, limit: int | None = None
             ) -> tuple[list[_Parsed], int]:
    """:func:`_members_raw`, with a corrupt deflate stream (zlib's error, a truncated
    member) reported as NotReproducible like every other unreadable gzip."""
    try:
        return _members_raw(f, size, out, limit)
    except (zlib.error, EOFError) as exc:
        raise NotReproducible(f"corrupt gzip stream: {exc}") from None


def _members_raw(f: IO[bytes], size: int, out: IO[bytes] | None, limit: int | None = None
             ) -> tuple[list[_Parsed], int]:
    """The members of a gzip file (content written to ``out``, at most ``limit`` bytes
    of it: the room the caller has), and where the tail (bytes after the last member)
    starts."""
    parsed: list[_Parsed] = []
    pos = 0
    budget = max(size, 1 << 20) * MAX_EXPANSION
    if limit is not None:
        budget = min(budget, limit)
    while pos < size:
        f.seek(pos)
        if f.read(3) != MAGIC:
            if not parsed:
                raise NotReproducible("not a gzip file")
            break
        if len(parsed) >= MAX_MEMBERS:
            raise NotReproducible(f"more than {MAX_MEMBERS} gzip members")
        p = _inflate_member(f, pos, out, budget - sum(m.length for m in parsed))
        parsed.append(p)
        pos = p.body_start + p.body_len + 8
    if not parsed:
        raise NotReproducible("not a gzip file")
    return parsed, pos


def decompress(src: Path, out: Path, limit: int | None = None) -> int:
    """Write the content of every member of the gzip file ``src`` to ``out`` (bytes
    after the last member are left out); returns its size. Raises NotReproducible for
    a stream that is not gzip, is corrupt, or expands past ``limit`` (``out`` removed)."""
    size = src.stat().st_size
    try:
        with open(src, "rb") as f, open(out, "wb") as o:
            parsed, _ = _members(f, size, o, limit)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return sum(p.length for p in parsed)


def readable(src: Path) -> bool:
    """Whether ``src`` is a gzip file this module can read to its end (so its content
    can serve as a delta source): parsed and checked, nothing written."""
    size = src.stat().st_size
    try:
        with open(src, "rb") as f:
            _, tail_at = _members(f, size, None)
    except NotReproducible:
        return False
    return size - tail_at <= MAX_TAIL


def analyze(src: Path, content: Path, limit: int | None = None) -> Recipe:
    """Take the gzip file ``src`` apart: its content goes to ``content`` (at most
    ``limit`` bytes), and the recipe that makes ``src`` again from it is returned, proven
    by making it and comparing every byte. Raises NotReproducible (``content`` removed)
    when no compressor tried does."""
    size = src.stat().st_size
    try:
        with open(src, "rb") as f:
            with open(content, "wb") as o:
                parsed, tail_at = _members(f, size, o, limit)
            if size - tail_at > MAX_TAIL:
                raise NotReproducible(f"{size - tail_at} bytes after the last gzip member")
            f.seek(tail_at)
            tail = f.read()
            members: list[Member] = []
            offset = 0
            with open(content, "rb") as c:
                for p in parsed:
                    members.append(_find_settings(f, c, p, offset))
                    offset += p.length
    except BaseException:
        content.unlink(missing_ok=True)
        raise
    return Recipe(tuple(members), tail)


def _candidates(header: bytes) -> Iterator[tuple[str, int, int]]:
    """Compressor settings to try, the likeliest first (from the header's XFL and OS
    bytes: Python writes OS 255, GNU gzip on Unix 3; XFL 2 is level 9, 4 is level 1)."""
    xfl, os_byte = header[8], header[9]
    first = 9 if xfl == 2 else 1 if xfl == 4 else 6
    levels = [first] + [lv for lv in (6, 9, 1, 5, 4, 3, 2, 7, 8) if lv != first]
    zlib_first = os_byte != 3
    zl = [("zlib", lv, 8) for lv in levels] + [("zlib", 0, 8)] + \
         [("zlib", lv, 9) for lv in levels]
    gz = [("gzip", lv, 8) for lv in levels] if gzip_binary() else []
    yield from (zl + gz) if zlib_first else (gz + zl)


#: failed tries may compress at most this many times the member's content in all: a
#: stream that matches every candidate until near its end must not cost minutes
MAX_TRY_FACTOR = 3


def _find_settings(f: IO[bytes], content: IO[bytes], p: _Parsed, offset: int) -> Member:
    spent = 0
    for tool, level, mem in _candidates(p.header):
        ok, compared = _reproduces(f, content, p, offset, tool, level, mem)
        if ok:
            return Member(p.header, p.length, tool, level, mem)
        spent += compared
        if spent > MAX_TRY_FACTOR * max(p.body_len, 1 << 20):
            raise NotReproducible("no compressor tried makes the same bytes within the "
                                  "cost bound")
    raise NotReproducible("no compressor tried makes the same bytes "
                          "(zlib levels 0-9, GNU gzip levels 1-9)")


def _reproduces(f: IO[bytes], content: IO[bytes], p: _Parsed, offset: int,
                tool: str, level: int, mem: int) -> tuple[bool, int]:
    """Compress the member's content again and compare with its body as it goes:
    the first differing byte ends the try. Returns (same, compressed bytes compared)."""
    f.seek(p.body_start)
    left = p.body_len

    def same(produced: bytes) -> bool:
        nonlocal left
        if len(produced) > left:
            return False
        if f.read(len(produced)) != produced:
            return False
        left -= len(produced)
        return True

    content.seek(offset)
    pieces = _deflate(content, p.length, tool, level, mem)
    try:
        for piece in pieces:
            if not same(piece):
                return False, p.body_len - left
    finally:
        pieces.close()  # stops a gzip child at once
    return left == 0, p.body_len - left


def _deflate(content: IO[bytes], length: int, tool: str, level: int,
             mem: int) -> Iterator[bytes]:
    """The raw deflate body of ``length`` bytes of ``content`` (from where it stands)."""
    if tool == "zlib":
        c = zlib.compressobj(level, zlib.DEFLATED, -15, mem)
        left = length
        while left:
            chunk = content.read(min(CHUNK, left))
            if not chunk:
                raise CodecError("content shorter than the recipe says")
            left -= len(chunk)
            out = c.compress(chunk)
            if out:
                yield out
        yield c.flush()
        return
    yield from _gnu_gzip(content, length, level)


def _gnu_gzip(content: IO[bytes], length: int, level: int) -> Iterator[bytes]:
    binary = gzip_binary()
    if binary is None:
        raise CodecError("this file needs GNU gzip to be rebuilt: install gzip")
    import threading

    # GZIP in the environment (e.g. GZIP=--rsyncable, common backup advice) changes
    # gzip's output: a file proven under it would not rebuild without it, or the reverse
    env = {k: v for k, v in os.environ.items() if k != "GZIP"}
    proc = subprocess.Popen([binary, "-c", "-n", f"-{level}"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0,
                            env=env)
    assert proc.stdin is not None and proc.stdout is not None
    failed: list[BaseException] = []

    def feed() -> None:
        left = length
        try:
            while left:
                chunk = content.read(min(CHUNK, left))
                if not chunk:
                    raise CodecError("content shorter than the recipe says")
                left -= len(chunk)
                proc.stdin.write(chunk)  # type: ignore[union-attr]
        except BrokenPipeError:
            pass
        except BaseException as exc:  # noqa: BLE001 - raised by the reader below
            failed.append(exc)
        finally:
            try:
                proc.stdin.close()  # type: ignore[union-attr]
            except OSError:
                pass

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    try:
        header = _read_exact(proc.stdout, 10)
        if len(header) < 10:
            raise CodecError("gzip produced no output")
        # the body ends 8 bytes (the trailer) before gzip's output does
        held = b""
        while chunk := proc.stdout.read(CHUNK):
            held += chunk
            if len(held) > 8:
                yield held[:-8]
                held = held[-8:]
    finally:
        proc.kill()
        t.join()
        proc.wait()
    if failed:
        raise failed[0]


def _read_exact(stream: IO[bytes], n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = stream.read(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


_GZIP: list[str | None] = []


def gzip_binary() -> str | None:
    if not _GZIP:
        _GZIP.append(shutil.which("gzip"))
    return _GZIP[0]


# -------------------------------------------------------------- putting together

def rebuild(recipe: Recipe, content: Path, out: Path) -> None:
    """Make the gzip file again from its content (the caller checks its SHA-256)."""
    if content.stat().st_size != recipe.content_size:
        raise CodecError(f"content is {content.stat().st_size} bytes, the recipe says "
                         f"{recipe.content_size}")
    with open(content, "rb") as c, open(out, "wb") as o:
        offset = 0
        for m in recipe.members:
            o.write(m.header)
            c.seek(offset)
            for piece in _deflate(c, m.length, m.tool, m.level, m.mem_level):
                o.write(piece)
            c.seek(offset)
            crc = 0
            left = m.length
            while left:
                chunk = c.read(min(CHUNK, left))
                crc = zlib.crc32(chunk, crc)
                left -= len(chunk)
            o.write(struct.pack("<II", crc, m.length & 0xFFFFFFFF))
            offset += m.length
        o.write(recipe.tail)
