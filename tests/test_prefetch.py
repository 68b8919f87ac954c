"""Objects fetched ahead of a rebuild (deltafs.prefetch, Engine.fetch_ahead): a rebuild
uses them instead of its GETs, only for the version it asks for, and never gets wrong
bytes from them."""
from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest

from deltafs import prefetch
from deltafs.api import make_engine
from deltafs.engine import Engine
from deltafs.prefetch import Prefetched
from deltafs.store.base import ObjectInfo, ObjectStore
from helpers import sha256_file, write_file
from mountfixtures import release_versions


@pytest.fixture(params=["s3store", "localstore"])
def store(request: pytest.FixtureRequest) -> ObjectStore:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


def _info(key: str, etag: str, size: int) -> ObjectInfo:
    return ObjectInfo(key, size, etag, 0.0, {})


def _fill(p: Prefetched, key: str, body: bytes, etag: str = "e1") -> None:
    path = p.begin(key)
    assert path is not None
    path.write_bytes(body)
    p.end(key, path, _info(key, etag, len(body)))


def test_an_entry_serves_only_the_version_asked_for(tmp_path: Path) -> None:
    p = Prefetched(tmp_path / "ahead")
    _fill(p, "d/a.delta", b"old pointer", etag="e1")
    assert p.begin("d/a.delta") is None  # here already: not fetched twice
    # the row now names another version: the entry is dropped, the caller GETs
    assert p.take("d/a.delta", tmp_path / "out", etag="e2") is None
    assert not (tmp_path / "out").exists() and not p.has("d/a.delta")
    _fill(p, "d/a.delta", b"new pointer", etag="e2")
    got = p.take("d/a.delta", tmp_path / "out", etag="e2")
    assert got is not None and got.etag == "e2"
    assert (tmp_path / "out").read_bytes() == b"new pointer"
    assert p.take("d/a.delta", tmp_path / "again", etag="e2") is None  # taken once
    assert (p.used, p.wasted) == (1, 1)
    assert list((tmp_path / "ahead").iterdir()) == []


def test_entries_are_bounded_and_the_oldest_go_first(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(prefetch, "MAX_BYTES", 100)
    p = Prefetched(tmp_path / "ahead")
    for i in range(prefetch.MAX_ENTRIES + 2):
        _fill(p, f"k{i}", b"x")
    assert not p.has("k0") and not p.has("k1") and p.has(f"k{prefetch.MAX_ENTRIES + 1}")
    assert len(list((tmp_path / "ahead").iterdir())) == prefetch.MAX_ENTRIES
    _fill(p, "big", b"y" * 99)  # over the byte bound with the others: they go
    assert p.has("big") and len(list((tmp_path / "ahead").iterdir())) == 2
    p.clear()
    assert list((tmp_path / "ahead").iterdir()) == [] and not p.has("big")


def test_a_taker_waits_for_a_fetch_under_way_and_a_failed_one_leaves_nothing(
        tmp_path: Path) -> None:
    p = Prefetched(tmp_path / "ahead")
    path = p.begin("blob")
    assert path is not None and p.begin("blob") is None

    def finish() -> None:
        time.sleep(0.3)
        path.write_bytes(b"blob bytes")
        p.end("blob", path, _info("blob", "b", 10))

    threading.Thread(target=finish).start()
    t0 = time.monotonic()
    got = p.take("blob", tmp_path / "out")  # immutable: no ETag asked
    assert got is not None and time.monotonic() - t0 >= 0.25
    assert (tmp_path / "out").read_bytes() == b"blob bytes"
    failed = p.begin("gone")
    assert failed is not None
    failed.write_bytes(b"partial")
    p.end("gone", failed, None)
    assert not failed.exists() and p.take("gone", tmp_path / "x") is None


def _stored(eng: Engine, key: str, metadata: bool = False):  # type: ignore[no-untyped-def]
    """The file at ``key`` as a mount's row stands for it (metadata unknown) or as a
    HEAD tells it."""
    s = eng.stat(key)
    return s if metadata else dataclasses.replace(s, metadata=None)


@pytest.mark.parametrize("metadata", [False, True], ids=["as-a-row", "as-a-head"])
def test_a_rebuild_uses_what_was_fetched_ahead_and_no_get(store: ObjectStore, tmp_path: Path,
                                                          metadata: bool) -> None:
    datas = release_versions(4, 256 << 10, seed=3)
    writer = make_engine(store, tmp_path / "w")
    keys = []
    for i, body in enumerate(datas):
        writer.put(write_file(tmp_path / f"src{i}", body), f"rel/app-{i}.bin")
        keys.append(f"rel/app-{i}.bin")
    reader = make_engine(store, tmp_path / "r")  # a new machine
    for i in (0, 1):
        reader.materialize(_stored(reader, keys[i]), tmp_path / "o")
    target = _stored(reader, keys[2], metadata)
    assert target.kind.value == "delta"
    assert reader.fetch_ahead(target) == 2  # the pointer and the blob that yields it
    before = store.stats()
    assert reader.materialize(target, tmp_path / "out2") == sha256_file(tmp_path / "out2")
    assert (tmp_path / "out2").read_bytes() == datas[2]
    after = store.stats()
    got = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert not any(v for k, v in got.items() if "get" in k.lower()), got
    assert reader.prefetched.used == 2


def test_a_file_rewritten_after_its_fetch_ahead_reads_its_new_bytes(
        store: ObjectStore, tmp_path: Path) -> None:
    """Another writer replaced the file between the fetch ahead and the rebuild: the
    rebuild, asking for the new version, GETs it and never serves the old bytes."""
    datas = release_versions(4, 256 << 10, seed=4)
    eng = make_engine(store, tmp_path / "w")
    keys = []
    for i, body in enumerate(datas[:3]):
        eng.put(write_file(tmp_path / f"src{i}", body), f"rel/app-{i}.bin")
        keys.append(f"rel/app-{i}.bin")
    reader = make_engine(store, tmp_path / "r")
    reader.materialize(_stored(reader, keys[1]), tmp_path / "o")
    old = _stored(reader, keys[2])
    assert reader.fetch_ahead(old) >= 1
    eng.put(write_file(tmp_path / "src-new", datas[3]), keys[2])  # another writer
    new = _stored(reader, keys[2])
    assert new.etag != old.etag
    reader.materialize(new, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == datas[3]
    assert reader.prefetched.wasted >= 1


def test_a_fetch_that_cannot_start_leaves_no_key_waited_for(tmp_path: Path,
                                                            monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Found by review: the key was marked as being fetched before the directory was
    made, so when that failed (a full or unwritable cache disk) every rebuild of the
    file waited the whole bound for a fetch that never ran."""
    monkeypatch.setattr(prefetch, "WAIT_S", 5.0)
    (tmp_path / "file").write_bytes(b"")
    p = Prefetched(tmp_path / "file" / "ahead")  # cannot be made
    with pytest.raises(OSError):
        p.begin("k")
    t0 = time.monotonic()
    assert p.take("k", tmp_path / "out") is None
    assert time.monotonic() - t0 < 1.0 and not p.has("k")


def test_clearing_frees_what_nobody_took(tmp_path: Path) -> None:
    """The cache disk's back-pressure clears the objects fetched ahead first."""
    p = Prefetched(tmp_path / "ahead")
    _fill(p, "a", b"x" * 10)
    _fill(p, "b", b"y" * 5)
    assert p.clear() == 15
    assert p.wasted == 2 and not p.has("a") and list((tmp_path / "ahead").iterdir()) == []
    _fill(p, "c", b"z")  # and it goes on working
    assert p.take("c", tmp_path / "out") is not None
