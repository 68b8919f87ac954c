"""Listing manifests (deltafs/manifest.py): the round trip is exact, a stale entry is never
used, and a damaged, foreign, moved, newer or hostile body is refused with one warning."""
from __future__ import annotations

import json
import logging
import random
import stat
import time
import zlib
from dataclasses import replace
from typing import Any

import pytest

from deltafs.format import (
    Attrs,
    Kind,
    classify,
    delta_metadata,
    direct_metadata,
)
from deltafs.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MAX_DECOMPRESSED,
    ManifestEntry,
    decode,
    encode,
    entry_of,
    from_manifest,
    manifest_key,
    metadata_of,
    stored_from,
)

DIR = "pkgs/boto/"
SHA = "0123456789abcdef" * 4
SHA2 = "fedcba9876543210" * 4
REG = stat.S_IFREG | 0o644
LNK = stat.S_IFLNK | 0o777
MTIME_NS = 1_700_000_000_123_456_789

#: Names that break naive line splitting or quoting. Several are line separators to
#: str.splitlines (\r, \x0b, \x0c, \x1c, \x85, \u2028) that JSON does not escape.
ODD_NAMES = [
    "line\nbreak.txt", "cr\rlf\r\n.txt", 'quo"te.txt', "back\\slash.txt", "tab\there.txt",
    "emoji 🎉🚀.txt", "sep\u2028\u2029.txt", "nel\x85.txt", "vt\x0bff\x0cfs\x1c.txt",
    "nul\x00byte.txt", '{"n":"forged","e":"x"}', "日本語.whl.delta", " lead and trail ",
    "é" * 127 + "x",  # 255 bytes of UTF-8
    "z" * 1000 + ".delta",  # a long delta key
    ".delta",  # not a delta: classify needs something before the suffix
    "x.delta.txt", "%41%2F", "'single'", "<&>", "\u0301combining", "\ufeffbom",
]


def make(name: str, i: int = 0, **kw: Any) -> ManifestEntry:
    """A plausible entry for ``name`` (a delta if the name says so)."""
    delta = name.endswith(".delta") and len(name) > len(".delta")
    fields: dict[str, Any] = {
        "name": name, "etag": f"{i:032x}", "object_size": 1000 + i,
        "kind": "delta" if delta else "direct",
        "size": (5_000_000 + i) if delta else 1000 + i,
        "mode": REG, "uid": 1000, "gid": 100, "mtime_ns": MTIME_NS + i, "sha256": SHA,
        "ref_key": f"{DIR}reference.bin" if delta else None,
        "ref_sha256": SHA2 if delta else None,
    }
    fields.update(kw)
    return ManifestEntry(**fields)


def foreign(name: str, i: int = 0) -> ManifestEntry:
    """An object another tool wrote: no dg-* and no deltafs-* metadata."""
    return make(name, i, sha256=None, mode=None, uid=None, gid=None, mtime_ns=None)


def symlink(name: str, i: int = 0) -> ManifestEntry:
    return make(name, i, mode=LNK, symlink=True, size=1000 + i)


def gz(raw: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    return c.compress(raw) + c.flush()


def header(**kw: Any) -> dict[str, Any]:
    h: dict[str, Any] = {"format": "deltafs-manifest", "version": 1, "dir": DIR,
                         "writer": "test", "written_at": time.time(), "count": 0}
    h.update(kw)
    return h


def wire(e: ManifestEntry) -> dict[str, Any]:
    """An entry as v1 writes it (spelled out here so the test checks the wire format)."""
    d: dict[str, Any] = {"n": e.name, "e": e.etag, "o": e.object_size, "k": e.kind,
                         "s": e.size, "m": e.mode, "u": e.uid, "g": e.gid,
                         "t": e.mtime_ns, "h": e.sha256, "r": e.ref_key,
                         "rh": e.ref_sha256}
    if e.symlink:
        d["l"] = True
    return {k: v for k, v in d.items() if v is not None}


def raw_body(lines: list[Any], **hdr: Any) -> bytes:
    """gzip of a header (count = number of lines unless given) and the given lines
    (dicts are JSON-encoded, bytes go in as they are)."""
    hdr.setdefault("count", len(lines))
    out = [json.dumps(header(**hdr)).encode()]
    for line in lines:
        out.append(line if isinstance(line, bytes) else json.dumps(line).encode())
    return gz(b"\n".join(out) + b"\n")


def many(n: int) -> list[ManifestEntry]:
    out = []
    for i in range(n):
        name = f"botocore-1.35.{i}-py3-none-any.whl" + (".delta" if i % 5 else "")
        out.append(make(name, i))
    return out


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "deltafs.manifest" and r.levelno >= logging.WARNING]


def assert_refused(caplog: pytest.LogCaptureFixture, why: str | None = None) -> None:
    """Exactly one warning line, no traceback, saying why when ``why`` is given."""
    records = warnings_of(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    record = records[0]
    assert record.exc_info is None and "Traceback" not in caplog.text
    message = record.getMessage()
    assert message.startswith(f"ignoring listing manifest {DIR}{MANIFEST_NAME}: ")
    assert "\n" not in message
    if why is not None:
        assert why in message


# ------------------------------------------------------------------------------ keys


def test_manifest_key() -> None:
    assert manifest_key("") == ".deltafs-manifest"
    assert manifest_key("a/b/") == "a/b/.deltafs-manifest"
    with pytest.raises(ValueError):
        manifest_key("a/b")


# ------------------------------------------------------------------------ round trip


def test_round_trip_many_entries_with_odd_names(caplog: pytest.LogCaptureFixture) -> None:
    entries = many(3000)
    entries += [make(n, i) for i, n in enumerate(ODD_NAMES)]
    entries += [foreign(f"foreign-{i}.bin", i) for i in range(20)]
    entries += [symlink(f"link-{i}", i) for i in range(20)]
    entries += [make("partial.delta", 1, mode=None, uid=None, gid=None, mtime_ns=None),
                make("noref.delta", 2, ref_key=None, ref_sha256=None),
                make("nosha.delta", 3, sha256=None),
                make("old.bin", 4, mtime_ns=-86_400 * 10**9),  # 1969
                make("big.iso.delta", 5, size=2**50, object_size=2**33)]
    body = encode(DIR, entries, "deltafs/test")
    got = decode(DIR, body)
    assert got == {e.name: e for e in entries}
    assert not warnings_of(caplog)


def test_wire_format_header_and_one_line_per_entry() -> None:
    entries = [make(n, i) for i, n in enumerate(ODD_NAMES)]
    before = time.time()
    body = encode(DIR, entries, "deltafs/0.1.0 host 42")
    assert body[:2] == b"\x1f\x8b"
    raw = zlib.decompress(body, 31)
    assert raw.endswith(b"\n")
    lines = raw.split(b"\n")[:-1]
    assert len(lines) == len(entries) + 1  # no name put a newline byte in a line
    head = json.loads(lines[0])
    assert head["format"] == "deltafs-manifest" and head["version"] == FORMAT_VERSION == 1
    assert head["dir"] == DIR and head["writer"] == "deltafs/0.1.0 host 42"
    assert head["count"] == len(entries)
    assert before <= head["written_at"] <= time.time()
    assert [json.loads(line)["n"] for line in lines[1:]] == ODD_NAMES
    assert b'", "' not in lines[1] and b'": ' not in lines[1]  # compact separators


def test_lines_are_exactly_what_json_writes() -> None:
    """encode builds lines by hand for speed: they must be json.dumps' compact output."""
    entries = [make(n, i) for i, n in enumerate(ODD_NAMES)]
    entries += [symlink("l\n\"k", 1), foreign("f\u2028", 2),
                make("r.delta", 3, ref_key="d\u00e9j\u00e0/\"q\"\n/reference.bin", mtime_ns=-1)]
    lines = zlib.decompress(encode(DIR, entries, "w"), 31).split(b"\n")[1:-1]
    expected = [json.dumps(wire(e), ensure_ascii=False, separators=(",", ":")).encode()
                for e in entries]
    assert lines == expected


def test_encode_refuses_duplicate_names_and_bad_dirs() -> None:
    with pytest.raises(ValueError):
        encode(DIR, [make("a.txt", 1), make("a.txt", 2)], "w")
    with pytest.raises(ValueError):
        encode("pkgs/boto", [make("a.txt")], "w")


def test_root_directory_round_trip() -> None:
    entries = many(10)
    assert decode("", encode("", entries, "w")) == {e.name: e for e in entries}


# ------------------------------------------------------------------- metadata_of


CASES = {
    "delta": make("app-1.2.zip.delta", 7),
    "delta-no-attrs": make("app.zip.delta", 1, mode=None, uid=None, gid=None, mtime_ns=None),
    "delta-non-ascii-ref": make("x.delta", 2, ref_key="données/reference.bin"),
    "delta-no-ref": make("x.delta", 3, ref_key=None, ref_sha256=None),
    "delta-setuid": make("x.delta", 4, mode=stat.S_IFREG | 0o4755),
    "direct": make("notes.txt", 5),
    "direct-no-attrs": make("notes.txt", 6, mode=None, uid=None, gid=None, mtime_ns=None),
    "foreign": foreign("photo.jpg", 8),
    "foreign-chmodded": make("photo.jpg", 9, sha256=None, mode=stat.S_IFREG | 0o600),
    "symlink": symlink("latest", 10),
    "root-uid": make("r.txt", 11, uid=0, gid=0),
}
EXPECTED_KIND = {"delta": Kind.DELTA, "direct": Kind.DIRECT}


@pytest.mark.parametrize("case", sorted(CASES))
def test_classify_of_metadata_of_says_what_the_entry_says(case: str) -> None:
    e = CASES[case]
    meta = metadata_of(e)
    assert all(type(k) is str and type(v) is str for k, v in meta.items())
    f = classify(DIR + e.name, e.object_size, e.etag, 1234.5, meta)
    assert f is not None
    kind = Kind.FOREIGN if e.kind == "direct" and e.sha256 is None else EXPECTED_KIND[e.kind]
    assert f.kind is kind
    assert f.object_key == DIR + e.name and f.etag == e.etag
    assert f.object_size == e.object_size
    assert f.size == e.size
    assert f.sha256 == e.sha256
    assert f.ref_key == e.ref_key and f.ref_sha256 == e.ref_sha256
    assert f.attrs == Attrs(mode=e.mode, uid=e.uid, gid=e.gid, mtime_ns=e.mtime_ns)
    assert f.attrs.is_symlink is e.symlink
    assert f.mtime_ns == (e.mtime_ns if e.mtime_ns is not None else int(1234.5 * 1e9))
    assert entry_of(f) == e


def _properties(f: Any) -> tuple[Any, ...]:
    return (f.logical_key, f.object_key, f.kind, f.object_size, f.etag, f.mtime, f.size,
            f.sha256, f.ref_key, f.ref_sha256, f.attrs, f.mtime_ns, f.name)


HEADS = {
    # what deltafs itself writes
    "deltafs-delta": ("pkgs/boto/b-2.whl.delta", delta_metadata(
        name="b-2.whl", sha256=SHA, size=9_000_000, ref_key="pkgs/boto/reference.bin",
        ref_sha256=SHA2, delta_size=4000, delta_cmd="xdelta3 -e", zero_diff=False,
        attrs=Attrs(mode=stat.S_IFREG | 0o640, uid=1001, gid=1002, mtime_ns=MTIME_NS))),
    "deltafs-delta-non-ascii-dir": ("été/b-2.whl.delta", delta_metadata(
        name="b-2.whl", sha256=SHA, size=9_000_000, ref_key="été/reference.bin",
        ref_sha256=SHA2, delta_size=4000, delta_cmd="xdelta3 -e", zero_diff=True)),
    "deltafs-direct": ("pkgs/boto/readme.md", direct_metadata(
        name="readme.md", sha256=SHA, size=4000,
        attrs=Attrs(mode=stat.S_IFREG | 0o755, uid=1, gid=2, mtime_ns=-5))),
    "deltafs-symlink": ("pkgs/boto/latest", direct_metadata(
        name="latest", sha256=SHA, size=4000,
        attrs=Attrs(mode=LNK, uid=0, gid=0, mtime_ns=MTIME_NS))),
    # DeltaGlider's older spellings; the reference known only by its relative path
    "deltaglider-legacy-delta": ("pkgs/boto/a.zip.delta", {
        "dg_file_sha256": SHA.upper(), "file_size": "777", "ref_path": "reference.bin",
        "ref_sha256": SHA2, "tool": "deltaglider/5"}),
    "deltaglider-direct": ("pkgs/boto/a.txt", {"file-sha256": SHA, "compression": "none"}),
    # another tool's object, with and without unrelated metadata
    "foreign": ("pkgs/boto/photo.jpg", {"camera": "x"}),
    "foreign-empty": ("pkgs/boto/photo.jpg", {}),
}


@pytest.mark.parametrize("case", sorted(HEADS))
def test_stored_from_gives_back_what_the_head_said(case: str) -> None:
    """HEAD answer -> entry -> encode -> decode -> StoredFile: every property the mount
    reads is the same as from the HEAD itself."""
    key, meta = HEADS[case]
    size = 4000
    head = classify(key, size, "etag-1", 1700000000.5, meta)
    assert head is not None
    entry = entry_of(head)
    assert entry is not None
    prefix = key.rpartition("/")[0] + "/"
    entries = decode(prefix, encode(prefix, [entry], "w"))
    assert entries is not None
    listed = stored_from(prefix, entries, key, size, "etag-1", 1700000000.5)
    assert listed is not None
    assert _properties(listed) == _properties(head)
    assert from_manifest(listed) and not from_manifest(head)


def test_entry_of_is_none_when_there_is_nothing_to_cache() -> None:
    marker = classify("pkgs/", 0, "e", 1.0, {"deltafs-mode": "755"})
    assert marker is not None and entry_of(marker) is None
    listing_only = classify("pkgs/a.txt", 10, "e", 1.0, None)
    assert listing_only is not None and entry_of(listing_only) is None
    no_size = classify("pkgs/a.zip.delta", 10, "e", 1.0, {"dg-file-sha256": SHA})
    assert no_size is not None and entry_of(no_size) is None
    bad_sha = classify("pkgs/a.txt", 10, "e", 1.0, {"dg-file-sha256": "not-a-sha"})
    assert bad_sha is not None and entry_of(bad_sha) is None
    no_etag = classify("pkgs/a.txt", 10, "", 1.0, {"dg-file-sha256": SHA})
    assert no_etag is not None and entry_of(no_etag) is None
    # the same objects, once their metadata is usable, do give entries
    assert entry_of(classify("pkgs/a.txt", 10, "e", 1.0, {"dg-file-sha256": SHA})) \
        is not None  # type: ignore[arg-type]


# -------------------------------------------------------------- stale entries


def test_stored_from_only_for_the_same_version_of_the_object() -> None:
    e = make("app.zip.delta", 3)
    entries = {e.name: e}
    key = DIR + e.name
    hit = stored_from(DIR, entries, key, e.object_size, e.etag, 99.0)
    assert hit is not None and hit.sha256 == SHA and hit.size == e.size and hit.mtime == 99.0
    assert stored_from(DIR, entries, key, e.object_size, "other-etag", 99.0) is None
    assert stored_from(DIR, entries, key, e.object_size + 1, e.etag, 99.0) is None
    assert stored_from(DIR, entries, DIR + "other.zip.delta", e.object_size, e.etag,
                       99.0) is None
    assert stored_from(DIR, entries, DIR + "sub/" + e.name, e.object_size, e.etag,
                       99.0) is None
    assert stored_from(DIR, entries, "elsewhere/" + e.name, e.object_size, e.etag,
                       99.0) is None
    assert stored_from(DIR, entries, DIR + MANIFEST_NAME, 10, "x", 99.0) is None


# ------------------------------------------------------------------ damaged bodies


def _good_body() -> bytes:
    return encode(DIR, many(300), "w")


def _flip(body: bytes, at: int) -> bytes:
    return body[:at] + bytes([body[at] ^ 0xFF]) + body[at + 1:]


def _damaged() -> dict[str, bytes]:
    good = _good_body()
    g = random.Random(7)
    raw = zlib.decompress(good, 31)
    lines = raw.split(b"\n")
    return {
        "flip-middle": _flip(good, len(good) // 2),
        "flip-crc": _flip(good, len(good) - 6),
        "flip-length": _flip(good, len(good) - 2),
        "truncated-half": good[: len(good) // 2],
        "truncated-trailer": good[:-4],
        "truncated-1": good[:-1],
        "truncated-header": good[:9],
        "random": g.randbytes(5000),
        "random-after-magic": b"\x1f\x8b\x08\x00" + g.randbytes(5000),
        "empty": b"",
        "gzip-of-nothing": gz(b""),
        "trailing-bytes": good + b"\x00",
        "two-members": good + good,
        "garbage-json": raw_body([b"{not json", b'{"n": 1'], count=2),
        "entry-is-a-list": raw_body([["n", "a.txt"]]),
        "entry-is-a-number": raw_body([b"17"]),
        "empty-line": raw_body([wire(make("a.txt")), b"", wire(make("b.txt"))], count=3),
        "not-utf8": raw_body([b'{"n": "\xff\xfe.txt", "e": "x"}']),
        "nan": raw_body([b'{"n": "a.txt", "o": NaN}']),
        "count-too-high": raw_body([wire(make("a.txt"))], count=2),
        "count-too-low": raw_body([wire(make("a.txt")), wire(make("b.txt"))], count=1),
        "count-is-text": raw_body([wire(make("a.txt"))], count="1"),
        "count-negative": raw_body([], count=-1),
        "no-final-newline": gz(b"\n".join(lines[:-1])),
        "writer-not-text": raw_body([], writer=5),
        "written-at-not-a-number": raw_body([], written_at="yesterday"),
        "overlong-line": raw_body([b"{" + b" " * 70_000 + b"}"]),
    }


DAMAGED = _damaged()


def test_good_body_decodes(caplog: pytest.LogCaptureFixture) -> None:
    """The control for the damaged cases: unharmed, the same body is used."""
    got = decode(DIR, _good_body())
    assert got is not None and len(got) == 300 and not warnings_of(caplog)
    assert decode(DIR, raw_body([wire(make("a.txt")), wire(make("b.txt"))])) is not None


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_body_is_refused(case: str, caplog: pytest.LogCaptureFixture) -> None:
    assert decode(DIR, DAMAGED[case]) is None
    assert_refused(caplog)


def test_any_flipped_byte_in_the_compressed_data_is_refused(
        caplog: pytest.LogCaptureFixture) -> None:
    good = _good_body()
    positions = range(10, len(good), max(1, len(good) // 60))  # after the gzip header
    for at in positions:
        caplog.clear()
        assert decode(DIR, _flip(good, at)) is None, at
        assert_refused(caplog)


# -------------------------------------------------- other directories and versions


def test_manifest_of_another_directory_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    body = encode("pkgs/other/", many(5), "w")
    assert decode("pkgs/other/", body) is not None
    caplog.clear()
    assert decode(DIR, body) is None
    assert_refused(caplog, "'pkgs/other/'")
    root = encode("", many(5), "w")
    caplog.clear()
    assert decode(DIR, root) is None
    assert_refused(caplog)


@pytest.mark.parametrize("version", [2, 99, 0, "1", 1.0, True, None])
def test_unknown_version_is_refused(version: Any, caplog: pytest.LogCaptureFixture) -> None:
    entries = [wire(make("a.txt"))]
    assert decode(DIR, raw_body(entries, version=1)) is not None
    caplog.clear()
    assert decode(DIR, raw_body(entries, version=version)) is None
    assert_refused(caplog, "version")


@pytest.mark.parametrize("case", ["entries-only", "format-missing", "format-other",
                                  "empty-object", "plain-text"])
def test_body_without_our_header_is_refused(case: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """An older version (or another tool) wrote this: no usable header."""
    e = json.dumps(wire(make("a.txt"))).encode()
    h = header(count=1)
    bodies = {
        "entries-only": gz(e + b"\n"),
        "format-missing": gz(json.dumps({k: v for k, v in h.items() if k != "format"})
                             .encode() + b"\n" + e + b"\n"),
        "format-other": gz(json.dumps(dict(h, format="s3fs-cache")).encode() + b"\n"
                           + e + b"\n"),
        "empty-object": gz(b"{}\n" + e + b"\n"),
        "plain-text": gz(b"a.txt 10 etag\n"),
    }
    assert decode(DIR, bodies[case]) is None
    assert_refused(caplog, "header")


def test_unknown_keys_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    """Forward compatibility: additions that old readers may skip need no new version."""
    a, b = make("a.txt", 1), make("b.zip.delta", 2)
    lines = [dict(wire(a), future={"x": [1, 2]}, zz=None), dict(wire(b), n2="other")]
    got = decode(DIR, raw_body(lines, compression_hint="zstd", extra=[1]))
    assert got == {"a.txt": a, "b.zip.delta": b}
    assert not warnings_of(caplog)


# ---------------------------------------------------------- invalid entries skipped


BAD_ENTRIES: dict[str, dict[str, Any]] = {
    "negative-size": dict(wire(make("bad.zip.delta")), s=-1),
    "negative-object-size": dict(wire(make("bad.txt")), o=-1, s=-1),
    "float-size": dict(wire(make("bad.zip.delta")), s=10.0),
    "object-size-bool": dict(wire(make("bad.zip.delta")), o=True),
    "mode-text": dict(wire(make("bad.txt")), m="420"),
    "mode-bool": dict(wire(make("bad.txt")), m=True),
    "mode-float": dict(wire(make("bad.txt")), m=33188.0),
    "mode-directory": dict(wire(make("bad.txt")), m=stat.S_IFDIR | 0o755),
    "mode-no-type": dict(wire(make("bad.txt")), m=0o644),
    "sha-short": dict(wire(make("bad.txt")), h="abc"),
    "sha-not-hex": dict(wire(make("bad.txt")), h="g" * 64),
    "sha-65": dict(wire(make("bad.txt")), h=SHA + "0"),
    "sha-number": dict(wire(make("bad.txt")), h=12),
    "ref-sha-bad": dict(wire(make("bad.zip.delta")), rh="xyz"),
    "kind-unknown": dict(wire(make("bad.txt")), k="foreign"),
    "kind-direct-for-delta-name": dict(wire(make("bad.zip.delta")), k="direct", s=1000),
    "kind-delta-for-plain-name": dict(wire(make("bad.txt")), k="delta"),
    "direct-size-differs": dict(wire(make("bad.txt")), s=5),
    "name-slash": dict(wire(make("bad.txt")), n="sub/bad.txt"),
    "name-empty": dict(wire(make("bad.txt")), n=""),
    "name-number": dict(wire(make("bad.txt")), n=7),
    "name-reference": dict(wire(make("bad.txt")), n="reference.bin"),
    "name-manifest": dict(wire(make("bad.txt")), n=MANIFEST_NAME),
    "name-too-long": dict(wire(make("bad.txt")), n="n" * 1025),
    "name-missing": {k: v for k, v in wire(make("bad.txt")).items() if k != "n"},
    "etag-missing": {k: v for k, v in wire(make("bad.txt")).items() if k != "e"},
    "etag-empty": dict(wire(make("bad.txt")), e=""),
    "uid-negative": dict(wire(make("bad.txt")), u=-1),
    "gid-huge": dict(wire(make("bad.txt")), g=2**40),
    "mtime-text": dict(wire(make("bad.txt")), t="now"),
    "ref-absolute": dict(wire(make("bad.zip.delta")), r="/pkgs/reference.bin"),
    "symlink-flag-on-regular": dict(wire(make("bad.txt")), l=True),
    "symlink-mode-without-flag": dict(wire(make("bad.txt")), m=LNK),
    "symlink-flag-text": dict(wire(symlink("bad")), l="yes"),
    "duplicate-name": wire(make("good-0.txt", 99)),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_an_invalid_entry_is_skipped_and_the_rest_kept(
        case: str, caplog: pytest.LogCaptureFixture) -> None:
    good = [make(f"good-{i}.txt", i) for i in range(3)] + [symlink("link", 5)]
    lines: list[Any] = [wire(good[0]), BAD_ENTRIES[case]] + [wire(e) for e in good[1:]]
    got = decode(DIR, raw_body(lines))
    assert got == {e.name: e for e in good}
    records = warnings_of(caplog)
    assert len(records) == 1 and records[0].exc_info is None
    assert "skipped 1 invalid entry (first: line 3" in records[0].getMessage()


def test_many_invalid_entries_log_one_line(caplog: pytest.LogCaptureFixture) -> None:
    bad = [dict(wire(make(f"bad-{i}.txt", i)), s=-1) for i in range(500)]
    got = decode(DIR, raw_body([wire(make("ok.txt"))] + bad))
    assert got is not None and list(got) == ["ok.txt"]
    records = warnings_of(caplog)
    assert len(records) == 1 and "skipped 500 invalid entries" in records[0].getMessage()


def test_invalid_entries_cannot_be_constructed() -> None:
    """The same checks guard the constructor, so encode never writes what decode skips."""
    with pytest.raises(ValueError):
        make("a.txt", size=3)  # direct: size must be the object size
    with pytest.raises(ValueError):
        make("a.txt", sha256="ABC")
    with pytest.raises(ValueError):
        make("a\ud800.txt")  # a lone surrogate is no S3 key
    with pytest.raises(ValueError):
        replace(make("a.txt"), mode=LNK)  # symlink flag left False
    assert make("a.txt", sha256=SHA.upper()).sha256 == SHA.upper()


# ------------------------------------------------------------------ hostile bodies


def _bomb(limit_bytes: int) -> bytes:
    """A gzip body of ~1 KB per MiB that inflates past ``limit_bytes`` into well-formed,
    padded lines (so only the size cap can stop it). Built from one compressed block
    repeated: Z_FULL_FLUSH makes each repetition compress to the same bytes."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    head = json.dumps(header(count=10**9)).encode() + b"\n"
    block = (b" " * 65_000 + b"{}\n") * 16
    out = [c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)]
    piece = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    assert piece == again
    out += [piece] * (limit_bytes // len(block) + 2)
    return b"".join(out) + c.flush()


def test_decompression_bomb_is_capped(caplog: pytest.LogCaptureFixture) -> None:
    body = _bomb(MAX_DECOMPRESSED)
    assert len(body) < 1_000_000
    start = time.monotonic()
    assert decode(DIR, body) is None
    assert time.monotonic() - start < 20  # ~0.5 s unloaded: one inflate, no parsing
    assert_refused(caplog, "inflates to more than")


def test_size_cap_applies_to_well_formed_entries(caplog: pytest.LogCaptureFixture) -> None:
    body = encode(DIR, many(2000), "w")
    assert decode(DIR, body, limit=len(zlib.decompress(body, 31))) is not None
    assert decode(DIR, body, limit=100_000) is None
    assert_refused(caplog, "inflates to more than 100000 bytes")


def test_zero_bomb_without_newlines_is_refused_quickly(
        caplog: pytest.LogCaptureFixture) -> None:
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    body = c.compress(b"\0" * (64 << 20)) + c.flush()  # 64 MiB, no newline
    start = time.monotonic()
    assert decode(DIR, body) is None
    assert time.monotonic() - start < 10
    assert_refused(caplog)


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_the_indexed_reader_agrees_with_decode(case: str, tmp_path: Path) -> None:
    """The mount reads manifests through ``decode_indexed`` (entries on disk): the same
    entries as ``decode``, invalid ones skipped, of a repeated name the first kept."""
    from deltafs.manifest import decode_indexed

    good = [make(f"good-{i}.txt", i) for i in range(40)] + [symlink("link", 5)]
    lines: list[Any] = [wire(good[0]), BAD_ENTRIES[case]] + [wire(e) for e in good[1:]]
    body = raw_body(lines)
    want = decode(DIR, body)
    got = decode_indexed(DIR, body, str(tmp_path))
    assert want is not None and got is not None
    assert dict(got.items()) == want and len(got) == len(want)
    for name, entry in want.items():
        assert got.get(name) == entry and name in got
    assert got.get("missing.txt") is None and "missing.txt" not in got
    got.close()
    assert got.get("good-1.txt") is None  # closed: a miss, never an error


def test_the_indexed_reader_keeps_100000_entries_off_the_heap(tmp_path: Path) -> None:
    """Issue 11: a 100,000-entry manifest decoded as a dict held 55 MB of the daemon's
    memory for the whole listing; indexed, under 4 MB."""
    import tracemalloc

    from deltafs.manifest import Encoder, decode_indexed

    with Encoder(DIR, "test", str(tmp_path)) as enc:
        for i in range(100_000):
            enc.add(make(f"f{i:06d}.dat", i))
        body = enc.finish()
    tracemalloc.start()
    try:
        got = decode_indexed(DIR, body, str(tmp_path))
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got is not None
    assert held < 4_000_000, held
    assert got.get("f054321.dat") == make("f054321.dat", 54321)
    assert got.get("f100000.dat") is None


def test_writing_a_100000_entry_manifest_holds_little_memory(tmp_path: Path) -> None:
    """Issue 11: the daemon rewrites the manifest of a directory being filled every
    ``interval(n)`` seconds; with 100,000 entries the name set (~10 MB) and the body
    held whole (a few MB, and a copy in the PUT) showed in the create's peak RSS. Rows
    of one directory are unique, so the writer keeps no set, spools its lines past 1 MB
    and compresses into a file; what is written decodes to the same entries."""
    import tracemalloc

    from deltafs.manifest import Encoder, decode_indexed

    out = tmp_path / "body"
    tracemalloc.start()
    try:
        with Encoder(DIR, "test", str(tmp_path), unique_names=True) as enc:
            for i in range(100_000):
                enc.add(make(f"f{i:06d}.dat", i))
            size = enc.finish_file(str(out))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, peak  # 3.6 MB measured; 13.7 MB with the set, held whole
    assert size == out.stat().st_size > 0
    got = decode_indexed(DIR, out.read_bytes(), str(tmp_path))
    assert got is not None
    assert got.get("f054321.dat") == make("f054321.dat", 54321)
    assert got.get("f099999.dat") == make("f099999.dat", 99999)
    got.close()
    # and the checking writer still refuses a name twice (a caller's bug)
    with Encoder(DIR, "test", str(tmp_path)) as enc:
        enc.add(make("a.dat", 1))
        with pytest.raises(ValueError):
            enc.add(make("a.dat", 2))
