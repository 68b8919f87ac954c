"""The bucket format: metadata spellings, key classification, reserved and invalid names,
and the POSIX attributes kept beside DeltaGlider's metadata."""
from __future__ import annotations

import stat

import pytest

from deltafs.errors import InvalidName, ReservedName
from deltafs.format import (
    MAX_METADATA_BYTES,
    Attrs,
    Kind,
    check_logical_key,
    classify,
    delta_metadata,
    direct_metadata,
    is_compressed_stream,
    meta_get,
    reference_metadata,
)

SHA = "ab" * 32


# ------------------------------------------------------------------------ meta_get


@pytest.mark.parametrize(
    "key",
    ["dg-file-sha256", "dg_file_sha256", "file_sha256", "file-sha256"],
)
def test_meta_get_reads_every_spelling(key: str) -> None:
    """Each of the four spellings DeltaGlider ever wrote is found."""
    assert meta_get({key: SHA, "other": "x"}, "file_sha256") == SHA


def test_meta_get_prefers_current_spelling_and_skips_empty() -> None:
    meta = {"file_sha256": "old", "dg-file-sha256": "new", "dg_ref_key": ""}
    assert meta_get(meta, "file_sha256") == "new"
    assert meta_get({"dg_ref_key": "", "ref_key": "r/reference.bin"}, "ref_key") == "r/reference.bin"
    assert meta_get({}, "file_sha256") is None
    assert meta_get(None, "file_sha256") is None


@pytest.mark.parametrize(
    "meta",
    [
        {"dg-file-size": "123"},
        {"dg_file_size": "123"},
        {"file_size": "123"},
        {"file-size": "123"},
    ],
)
def test_delta_true_size_from_any_spelling(meta: dict[str, str]) -> None:
    f = classify("p/app.zip.delta", 10, "e", 0.0, meta)
    assert f is not None and f.kind is Kind.DELTA
    assert f.size == 123
    assert f.object_size == 10


def test_ref_key_full_or_relative() -> None:
    full = classify("a/b/x.delta", 1, "e", 0.0, {"dg-ref-key": "/a/b/reference.bin"})
    rel = classify("a/b/x.delta", 1, "e", 0.0, {"dg-ref-path": "reference.bin"})
    old = classify("a/b/x.delta", 1, "e", 0.0, {"ref_key": "a/b/reference.bin"})
    assert full is not None and full.ref_key == "a/b/reference.bin"
    assert rel is not None and rel.ref_key == "a/b/reference.bin"
    assert old is not None and old.ref_key == "a/b/reference.bin"
    root = classify("x.delta", 1, "e", 0.0, {"dg-ref-path": "reference.bin"})
    assert root is not None and root.ref_key == "reference.bin"


# ------------------------------------------------------------------------ classify


def test_classify_reference_is_hidden() -> None:
    assert classify("reference.bin", 5, "e", 0.0) is None
    assert classify("a/b/reference.bin", 5, "e", 0.0, {"dg-file-sha256": SHA}) is None


def test_classify_delta_maps_to_logical_name() -> None:
    f = classify("rel/v1/app.zip.delta", 42, "etag", 1.5)
    assert f is not None
    assert f.kind is Kind.DELTA
    assert f.logical_key == "rel/v1/app.zip"
    assert f.object_key == "rel/v1/app.zip.delta"
    assert f.name == "app.zip"
    assert f.size is None  # not known before a HEAD
    root = classify("x.delta", 1, "e", 0.0)
    assert root is not None and root.logical_key == "x" and root.kind is Kind.DELTA


def test_classify_marker_direct_foreign() -> None:
    marker = classify("dir/", 0, "e", 0.0)
    assert marker is not None and marker.kind is Kind.MARKER
    unknown = classify("dir/f.bin", 7, "e", 0.0)
    assert unknown is not None and unknown.kind is Kind.DIRECT and unknown.size == 7
    direct = classify("dir/f.bin", 7, "e", 0.0, {"dg-file-sha256": SHA})
    assert direct is not None and direct.kind is Kind.DIRECT and direct.sha256 == SHA
    foreign = classify("dir/f.bin", 7, "e", 0.0, {"content-owner": "x"})
    assert foreign is not None and foreign.kind is Kind.FOREIGN and foreign.size == 7
    # a bare ".delta" has no logical name: it is just an object
    bare = classify("dir/.delta", 3, "e", 0.0)
    assert bare is not None and bare.kind is not Kind.DELTA and bare.logical_key == "dir/.delta"


def test_mtime_ns_from_attrs_or_object() -> None:
    ours = classify("f", 1, "e", 100.0, {"deltafs-mtime-ns": "123456789"})
    theirs = classify("f", 1, "e", 100.5, {})
    assert ours is not None and ours.mtime_ns == 123456789
    assert theirs is not None and theirs.mtime_ns == 100_500_000_000


# ------------------------------------------------------------------ logical keys


@pytest.mark.parametrize("key", ["reference.bin", "a/reference.bin", "a/b/reference.bin"])
def test_reference_bin_is_reserved(key: str) -> None:
    with pytest.raises(ReservedName) as exc:
        check_logical_key(key)
    msg = str(exc.value)
    assert "reserved" in msg and "reference.bin" in msg
    assert "\n" not in msg
    assert exc.value.exit_code != 0


@pytest.mark.parametrize("key", ["x.delta", "a/app.zip.delta", "a/b/.x.delta"])
def test_delta_suffix_is_reserved(key: str) -> None:
    with pytest.raises(ReservedName) as exc:
        check_logical_key(key)
    msg = str(exc.value)
    assert "reserved" in msg and ".delta" in msg
    assert key in msg


@pytest.mark.parametrize(
    "key",
    [
        "",
        "a/",
        "/a",
        "a//b",
        "a/../b",
        "..",
        "a/./b",
        "a/..",
        "x" * 256,  # one component over 255 bytes
    ],
)
def test_invalid_names(key: str) -> None:
    with pytest.raises(InvalidName):
        check_logical_key(key)


def test_key_length_limit() -> None:
    """The key plus ``.delta`` must fit S3's 1,024 bytes."""
    part = "d" * 200
    ok = "/".join([part] * 5) + "/" + "f" * (1024 - len(".delta") - 5 * 201)
    assert len(ok.encode()) == 1018
    check_logical_key(ok)
    too_long = ok + "g"
    with pytest.raises(InvalidName) as exc:
        check_logical_key(too_long)
    assert "1,024" in str(exc.value) or "1024" in str(exc.value)
    # multi-byte characters count as bytes, not characters
    wide = "/".join(["é" * 120] * 5)  # 600 characters, 1,204 bytes
    with pytest.raises(InvalidName):
        check_logical_key(wide)


def test_invalid_utf8_refused() -> None:
    with pytest.raises(InvalidName):
        check_logical_key("bad\udcffname")


@pytest.mark.parametrize("key", ["a", "a/b/c.zip", "reference.bin.txt", "x.delta.zip",
                                 "my.deltas", "dir with space/ünïcode.tar"])
def test_ordinary_names_accepted(key: str) -> None:
    check_logical_key(key)


# ------------------------------------------------------------------------ Attrs


@pytest.mark.parametrize(
    "attrs",
    [
        Attrs(),
        Attrs(mode=stat.S_IFREG | 0o644),
        Attrs(mode=stat.S_IFREG | 0o4755, uid=1000, gid=100, mtime_ns=1_700_000_000_123_456_789),
        Attrs(mode=stat.S_IFLNK | 0o777, uid=0, gid=0, mtime_ns=0),
        Attrs(uid=5),
    ],
)
def test_attrs_round_trip(attrs: Attrs) -> None:
    meta = attrs.to_metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert all(k.startswith("deltafs-") for k in meta)
    assert Attrs.from_metadata(meta) == attrs
    # and through delta/direct metadata, next to DeltaGlider's keys
    full = delta_metadata(name="f", sha256=SHA, size=1, ref_key="reference.bin",
                          ref_sha256=SHA, delta_size=1, delta_cmd="x", zero_diff=False,
                          attrs=attrs)
    assert Attrs.from_metadata(full) == attrs
    assert Attrs.from_metadata(direct_metadata(name="f", sha256=SHA, size=1, attrs=attrs)) == attrs


def test_attrs_symlink_and_malformed() -> None:
    link = Attrs(mode=stat.S_IFLNK | 0o777)
    assert link.is_symlink
    assert link.to_metadata()["deltafs-type"] == "symlink"
    assert not Attrs(mode=stat.S_IFREG | 0o644).is_symlink
    bad = Attrs.from_metadata({"deltafs-mode": "rwx", "deltafs-uid": "12", "deltafs-gid": "x"})
    assert bad == Attrs(uid=12)
    assert Attrs.from_metadata(None) == Attrs()


# -------------------------------------------------------------------- metadata


def test_delta_metadata_has_every_format_field() -> None:
    meta = delta_metadata(name="app.zip", sha256=SHA, size=1000, ref_key="r/v/reference.bin",
                          ref_sha256="cd" * 32, delta_size=12, delta_cmd="xdelta3 -e",
                          zero_diff=False)
    for key in ("dg-tool", "dg-original-name", "dg-file-sha256", "dg-file-size",
                "dg-created-at", "dg-ref-key", "dg-ref-path", "dg-ref-sha256",
                "dg-delta-size", "dg-delta-cmd", "dg-note"):
        assert key in meta, key
    assert meta["dg-ref-key"] == "r/v/reference.bin"
    assert meta["dg-ref-path"] == "reference.bin"
    assert meta["dg-file-size"] == "1000"
    assert meta["dg-note"] == "delta"
    assert meta["dg-created-at"].endswith("Z")
    zero = delta_metadata(name="a", sha256=SHA, size=1, ref_key="reference.bin",
                          ref_sha256=SHA, delta_size=1, delta_cmd="x", zero_diff=True)
    assert zero["dg-note"] == "zero-diff (reference identical)"
    ref = reference_metadata("app.zip", SHA)
    assert ref["dg-note"] == "reference" and ref["dg-source-name"] == "app.zip"
    direct = direct_metadata(name="a", sha256=SHA, size=3)
    assert direct["dg-compression"] == "none" and direct["dg-file-size"] == "3"


def test_metadata_fits_s3_limit_and_is_ascii() -> None:
    name = "ü" * 250
    meta = delta_metadata(name=name, sha256=SHA, size=1, ref_key="d/" * 400 + "reference.bin",
                          ref_sha256=SHA, delta_size=1, delta_cmd="x" * 500, zero_diff=False,
                          attrs=Attrs(mode=0o100644, uid=1, gid=1, mtime_ns=1))
    assert sum(len(k) + len(v) for k, v in meta.items()) <= MAX_METADATA_BYTES
    assert all(v.isascii() for v in meta.values())
    # the fields readers need are never dropped
    for key in ("dg-file-sha256", "dg-ref-key", "dg-ref-sha256", "dg-file-size"):
        assert key in meta


@pytest.mark.parametrize(
    "head,expected",
    [
        (b"\x1f\x8b\x08\x00", True),
        (b"BZh91AY", True),
        (b"\xfd7zXZ\x00\x00", True),
        (b"\x28\xb5\x2f\xfd\x00", True),
        (b"PK\x03\x04", False),
        (b"ustar\x00", False),
        (b"", False),
    ],
)
def test_compressed_stream_magic(head: bytes, expected: bool) -> None:
    assert is_compressed_stream(head) is expected
