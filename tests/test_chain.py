"""Chained deltas (deltafs.chain): each version against a recent one, never orphaned.

Engine tests run over S3 (moto) and the local store; the mount test copies a series in
with real ``cp``, deletes and overwrites files in the middle of the chain, and reads
every other file back through a fresh mount with an empty cache.
"""
from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from deltafs import chain
from deltafs.api import make_engine
from deltafs.engine import Engine
from deltafs.store.base import ObjectStore
from helpers import next_version, sha256_bytes, sha256_file, write_file
from mountfixtures import Mount, mounted, release_versions  # noqa: F401 - a fixture

MiB = 1 << 20


@pytest.fixture(params=["s3store", "localstore"])
def store(request: pytest.FixtureRequest) -> ObjectStore:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


def series(n: int, size: int = MiB, seed: int = 5) -> list[bytes]:
    return release_versions(n, size, seed)


def damage_blob(store: ObjectStore, tmp: Path, content: bytes, d: str = "rel") -> None:
    """Flip bytes near the end of the blob that yields ``content`` (keeping its key)."""
    hp = chain.hidden_prefix(d)
    name = next(n for n in blobs(store, d) if n.startswith(sha256_bytes(content)))
    raw = tmp / "blob"
    store.get_file(hp + name, raw)
    body = bytearray(raw.read_bytes())
    body[-20] ^= 0xFF
    raw.write_bytes(bytes(body))
    store.put_file(hp + name, raw, {})


def put_all(eng: Engine, tmp: Path, datas: list[bytes], d: str = "rel") -> list[str]:
    keys = []
    for i, body in enumerate(datas):
        src = write_file(tmp / f"src-{i}", body)
        key = f"{d}/app-1.{i:02d}.bin"
        eng.put(src, key)
        keys.append(key)
    return keys


def read_all_fresh(store: ObjectStore, tmp: Path, want: dict[str, bytes], name: str) -> None:
    """Every file byte-identical through a new engine with an empty cache (a new machine)."""
    fresh = make_engine(store, tmp / f"fresh-{name}")
    for key, body in want.items():
        out = tmp / "out"
        fresh.get(key, out)
        assert sha256_file(out) == sha256_bytes(body), key
    shutil.rmtree(tmp / f"fresh-{name}")


def blobs(store: ObjectStore, d: str = "rel") -> set[str]:
    hp = chain.hidden_prefix(d)
    return {o.key[len(hp):] for o in store.iter_objects(hp)
            if chain.parse_blob_name(o.key[len(hp):])}


def depth(store: ObjectStore, key: str) -> int:
    info = store.head(key + ".delta")
    assert info is not None
    return int((info.metadata or {})[chain.DEPTH_KEY])


def test_each_version_against_the_previous_with_a_bounded_depth(store: ObjectStore,
                                                                 tmp_path: Path) -> None:
    datas = series(20)
    eng = make_engine(store, tmp_path / "cache")
    keys = put_all(eng, tmp_path, datas)
    depths = [depth(store, k) for k in keys[1:]]
    # v1 seeds the reference; then 1, 2, ... up to the bound, then back to JUMP_TO + 1
    assert depths[:chain.MAX_DEPTH] == list(range(1, chain.MAX_DEPTH + 1)), depths
    assert depths[chain.MAX_DEPTH] == chain.JUMP_TO + 1, depths
    assert max(depths) <= chain.MAX_DEPTH
    assert len(blobs(store)) == 19
    # each delta is against its predecessor: far smaller than against the first version
    stats = eng.stats("rel/")
    chained = stats.by_form["chained delta"]
    assert chained["files"] == 19
    first_only = make_engine(store, tmp_path / "c2")
    from dataclasses import replace

    first_only.policy = replace(first_only.policy, chains=False)
    put_all(first_only, tmp_path, datas, d="flat")
    flat = first_only.stats("flat/").by_form["delta"]
    assert chained["stored_bytes"] < 0.6 * flat["stored_bytes"], (chained, flat)
    read_all_fresh(store, tmp_path, dict(zip(keys, datas)), "all")


def test_delete_and_overwrite_in_the_middle_keep_every_other_file(store: ObjectStore,
                                                                   tmp_path: Path) -> None:
    """The acceptance test of issue 10, point 4, at the engine: files whose chains go
    through a deleted or overwritten file read back exactly on a new machine; a sweep
    then keeps every blob a chain needs and removes only the unreachable ones."""
    datas = series(8)
    eng = make_engine(store, tmp_path / "cache")
    keys = put_all(eng, tmp_path, datas)
    want = dict(zip(keys, datas))
    eng.delete(keys[3])  # the base of keys[4]..keys[7]
    del want[keys[3]]
    other = random.Random(9).randbytes(MiB)  # keys[5] overwritten by unrelated bytes
    eng.put(write_file(tmp_path / "other", other), keys[5])
    want[keys[5]] = other
    eng.put(write_file(tmp_path / "again", datas[6]), keys[2])  # keys[2] := v6's bytes
    want[keys[2]] = datas[6]
    renamed = keys[6].replace("app-", "renamed-")
    eng.move(eng.stat(keys[6]), renamed)
    want[renamed] = want.pop(keys[6])
    read_all_fresh(store, tmp_path, want, "after-changes")
    before = blobs(store)
    assert eng.sweep_blobs("rel", grace=0.0) == []  # all still reached (through 4..7)
    assert blobs(store) == before
    read_all_fresh(store, tmp_path, want, "after-sweep")
    # delete every file whose chain went through v3 and v5: their blobs become garbage
    for k in (keys[4], renamed, keys[7]):
        eng.delete(k)
        del want[k]
    swept = eng.sweep_blobs("rel", grace=0.0)
    assert swept, "unreachable blobs were not swept"
    after = blobs(store)
    for name in after:  # what is left is reached by some file
        assert chain.parse_blob_name(name)
    read_all_fresh(store, tmp_path, want, "after-second-sweep")
    # the last files go: nothing of the directory stays (no prefix left behind)
    for k in list(want):
        eng.delete(k)
    assert list(store.iter_objects("rel/")) == []


def test_young_blobs_are_not_swept(store: ObjectStore, tmp_path: Path) -> None:
    datas = series(3)
    eng = make_engine(store, tmp_path / "cache")
    keys = put_all(eng, tmp_path, datas)
    eng.delete(keys[2])
    assert eng.sweep_blobs("rel") == []  # under the hour's grace
    assert len(blobs(store)) == 2
    assert len(eng.sweep_blobs("rel", grace=0.0)) == 1


def test_a_sweep_during_a_put_never_orphans_its_chain(store: ObjectStore, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    """The race the flag protocol exists for: while v4 is encoded against v3, another
    client deletes v3 and sweeps; v4's writer notices after its pointer is stored and
    encodes again against the reference. v4 reads back on a new machine."""
    datas = series(4)
    eng = make_engine(store, tmp_path / "cache")
    keys = put_all(eng, tmp_path, datas[:3])
    other = make_engine(store, tmp_path / "other-cache")
    real = eng._encode
    raced: list[bool] = []

    def encode_with_a_sweep(*a: Any, **kw: Any) -> Any:
        if not raced:
            raced.append(True)
            other.delete(keys[2])
            assert other.sweep_blobs("rel", grace=0.0), "the sweep took nothing"
        return real(*a, **kw)

    monkeypatch.setattr(eng, "_encode", encode_with_a_sweep)
    key = "rel/app-1.03.bin"
    eng.put(write_file(tmp_path / "v4", datas[3]), key, hints=(keys[2],))
    assert raced
    assert depth(store, key) == 1  # encoded again against the reference
    read_all_fresh(store, tmp_path, {keys[0]: datas[0], keys[1]: datas[1], key: datas[3]},
                   "raced")


def test_confirm_sees_a_sweep_that_ran_and_one_that_did_not(store: ObjectStore,
                                                            tmp_path: Path) -> None:
    datas = series(3)
    eng = make_engine(store, tmp_path / "cache")
    keys = put_all(eng, tmp_path, datas)
    hp = chain.hidden_prefix("rel")
    needed = [hp + n for n in sorted(blobs(store))]
    before = chain.sweep_state(store, "rel", ensure=True)
    assert chain.confirm(store, "rel", before, needed)
    eng.delete(keys[2])
    eng.delete(keys[1])
    assert eng.sweep_blobs("rel", grace=0.0)
    assert not chain.confirm(store, "rel", before, needed)


def test_a_chain_moves_to_another_directory_with_its_blobs(store: ObjectStore,
                                                           tmp_path: Path) -> None:
    datas = series(4)
    eng = make_engine(store, tmp_path / "cache")
    keys = put_all(eng, tmp_path, datas)
    eng.move(eng.stat(keys[0]), "new/app-1.00.bin")  # the reference goes along first
    moved = eng.move(eng.stat(keys[3]), "new/app-1.03.bin")
    assert moved.object_key == "new/app-1.03.bin.delta"
    assert blobs(store, "new")  # its chain came along
    for k in keys[1:3]:
        eng.delete(k)
    assert list(store.iter_objects("rel/")) == []  # the old directory is gone whole
    read_all_fresh(store, tmp_path, {"new/app-1.00.bin": datas[0],
                                     "new/app-1.03.bin": datas[3]}, "moved")


def test_same_content_as_the_base_costs_a_pointer_only(store: ObjectStore,
                                                       tmp_path: Path) -> None:
    datas = series(2)
    eng = make_engine(store, tmp_path / "cache")
    keys = put_all(eng, tmp_path, datas)
    r = eng.put(write_file(tmp_path / "copy", datas[1]), "rel/app-copy.bin", hints=(keys[1],))
    assert r.kind == "delta" and r.stored_size < 4096, r
    assert len(blobs(store)) == 1
    read_all_fresh(store, tmp_path, {"rel/app-copy.bin": datas[1]}, "copy")


def test_a_damaged_blob_is_an_error_never_data(store: ObjectStore, tmp_path: Path) -> None:
    from deltafs.errors import IntegrityError

    datas = series(3)
    eng = make_engine(store, tmp_path / "cache")
    keys = put_all(eng, tmp_path, datas)
    damage_blob(store, tmp_path, datas[1])
    fresh = make_engine(store, tmp_path / "fresh")
    out = tmp_path / "out"
    with pytest.raises(IntegrityError):
        fresh.get(keys[2], out)  # its chain goes through the damaged blob
    assert not out.exists()


# ------------------------------------------------------------------ through a mount


def test_mount_series_changed_in_the_middle_reads_back_on_a_new_machine(
        mounted: Mount, tmp_path: Path) -> None:
    """Issue 10, acceptance 4: a release series copied in with cp; files in the middle
    of the chain deleted, overwritten and renamed through the mount; every other file
    byte-identical after a remount with an empty cache. The hidden blobs never show."""
    m = mounted
    src = tmp_path / "src"
    src.mkdir()
    datas = series(10, size=512 << 10, seed=11)
    for i, body in enumerate(datas):
        write_file(src / f"app-{i:02d}.bin", body)
    d = m.mountpoint / "rel"
    d.mkdir()
    for i in range(len(datas)):  # one at a time, as releases arrive
        subprocess.run(["cp", str(src / f"app-{i:02d}.bin"), str(d)], check=True)
        m.wait_idle()
    objects = m.objects("rel/", manifests=True)
    assert any(k.startswith("rel/.deltafs/") for k in objects), objects
    # each release against the one before it (the mount's hint), not all against v0
    last = m.head("rel/app-09.bin.delta")
    assert last is not None and int(last["Metadata"]["deltafs-depth"]) == 9, last
    assert sorted(os.listdir(d)) == [f"app-{i:02d}.bin" for i in range(10)]
    with pytest.raises(OSError) as err:
        (d / ".deltafs").mkdir()
    assert err.value.errno == errno.EPERM
    want = {f"app-{i:02d}.bin": body for i, body in enumerate(datas)}
    os.unlink(d / "app-04.bin")
    del want["app-04.bin"]
    other = random.Random(3).randbytes(300 << 10)
    (d / "app-06.bin").write_bytes(other)
    want["app-06.bin"] = other
    os.rename(d / "app-07.bin", d / "renamed-07.bin")
    want["renamed-07.bin"] = want.pop("app-07.bin")
    m.wait_idle()
    m.remount(wipe_cache=True)
    assert sorted(os.listdir(d)) == sorted(want)
    for name, body in want.items():
        assert sha256_file(d / name) == sha256_bytes(body), name
    # rm -r: the directory goes whole, blobs and all, and does not come back
    shutil.rmtree(d)
    m.wait_idle()
    m.remount(wipe_cache=True)
    assert not d.exists()
    assert m.objects("rel/", manifests=True) == {}


def test_a_long_series_stays_deltas_keyframes_restart_drifted_chains(
        localstore: ObjectStore, tmp_path: Path) -> None:
    """Found by review: every jump back at the depth bound lands on the same ancestor,
    so jumps drift further each time, and without a fresh start a long series ended up
    stored whole. A keyframe (the content against nothing) restarts the chain once a
    jump costs more; 100 versions stay deltas, bounded in depth, and read back."""
    store = localstore
    rng = random.Random(7)
    data = rng.randbytes(80 << 10)
    datas = [data]
    for _ in range(99):
        data = next_version(data, rng)
        datas.append(data)
    eng = make_engine(store, tmp_path / "cache")
    kinds = []
    for i, body in enumerate(datas):
        kinds.append(eng.put(write_file(tmp_path / "src", body), f"rel/app-{i:03d}.bin").kind)
    assert kinds == ["reference"] + ["delta"] * 99, kinds
    roots = []
    for i in range(1, 100):
        info = store.head(f"rel/app-{i:03d}.bin.delta")
        assert info is not None and int(info.metadata[chain.DEPTH_KEY]) <= chain.MAX_DEPTH
        body, _ = store.get_bytes(info.key)
        roots.append(chain.parse_pointer(body).root)
    assert chain.ROOT_EMPTY in roots, "no chain ever restarted at a keyframe"
    stored = sum(o.size for o in store.iter_objects("rel/"))
    assert stored < 0.25 * sum(map(len, datas)), stored
    read_all_fresh(store, tmp_path, {f"rel/app-{i:03d}.bin": b for i, b in enumerate(datas)},
                   "long")


def test_a_rename_waits_for_a_running_sweep(store: ObjectStore, tmp_path: Path) -> None:
    """A pointer renamed within its directory loses its old key only while no sweep
    lists: the sweep's flag holds the rename until it goes (or its deadline passes)."""
    import threading
    import time

    datas = series(3)
    eng = make_engine(store, tmp_path / "cache")
    keys = put_all(eng, tmp_path, datas)
    hp = chain.hidden_prefix("rel")
    flag = hp + chain.FLAG_PREFIX + "test"
    store.put_bytes(flag, b"", {})  # a sweep in progress
    done = threading.Event()

    def rename() -> None:
        eng.move(eng.stat(keys[2]), "rel/renamed.bin")
        done.set()

    t = threading.Thread(target=rename)
    t.start()
    time.sleep(1.5)
    assert not done.is_set(), "the rename went on while a sweep was listing"
    assert store.head(keys[2] + ".delta") is not None  # the old pointer is still there
    store.delete(flag)
    t.join(10)
    assert done.is_set()
    assert store.head(keys[2] + ".delta") is None
    read_all_fresh(store, tmp_path, {"rel/renamed.bin": datas[2]}, "renamed")


def test_mount_cp_r_of_a_series_builds_one_chain(mounted: Mount, tmp_path: Path) -> None:
    """``cp -r`` creates the files in directory order and uploads run in parallel; each
    version waits for the one below it by name, so the series is one chain (each
    against its predecessor), not deltas against whatever was uploaded first."""
    m = mounted
    m.remount(extra_args=["--debug"])  # to see which puts started beside an encode
    src = tmp_path / "rel"
    src.mkdir()
    datas = series(8, size=256 << 10, seed=21)
    names = [f"tool-2.{i}.0.bin" for i in range(8)]
    for name, body in zip(names, datas):
        write_file(src / name, body)
    subprocess.run(["cp", "-r", str(src), str(m.mountpoint)], check=True)
    m.wait_idle(120)
    depths = {}
    for name in names:
        head = m.head(f"rel/{name}.delta")
        assert head is not None, name
        depths[name] = head["Metadata"].get("deltafs-depth")
    seeds = [n for n, d in depths.items() if d is None]  # the reference's own file
    assert len(seeds) == 1, depths
    # in name order, every other version extends the chain by one
    assert [int(d) for n, d in depths.items() if d is not None] == list(range(1, 8)), depths
    # the scheduler started versions while the one before them was still uploading, and
    # told their puts which one to wait for (Engine.put's ``after``; issue 12's write)
    assert "prepared beside the put of rel/tool-2." in m.log_text()
    m.remount(wipe_cache=True)
    for name, body in zip(names, datas):
        assert sha256_file(m.mountpoint / "rel" / name) == sha256_bytes(body), name


@pytest.mark.parametrize("fmt", ["auto", "deltaglider"])
def test_zstd_streams_are_deltas_in_deltafs_format(localstore: ObjectStore, tmp_path: Path,
                                                   fmt: str) -> None:
    """zstd output keeps unchanged input unchanged (measured: two botocore tars as
    `zstd -3` delta to 3.8 % of the file), so in deltafs's format a zstd series is stored
    as deltas, reference included; DeltaGlider's format keeps them whole as before."""
    from deltafs.engine import Policy

    magic = b"\x28\xb5\x2f\xfd"
    datas = [magic + body for body in series(4, size=256 << 10, seed=31)]
    eng = make_engine(localstore, tmp_path / "cache", policy=Policy.create(format=fmt))
    kinds = [eng.put(write_file(tmp_path / f"z{i}", body), f"z/app-1.{i}.tar.zst").kind
             for i, body in enumerate(datas)]
    if fmt == "auto":
        assert kinds == ["reference", "delta", "delta", "delta"], kinds
    else:
        assert kinds == ["direct"] * 4, kinds
    read_all_fresh(localstore, tmp_path, {f"z/app-1.{i}.tar.zst": b for i, b in enumerate(datas)},
                   "zstd")


def test_a_damaged_base_is_passed_over_not_a_failed_upload(localstore: ObjectStore,
                                                           tmp_path: Path) -> None:
    """Found by review: a base whose blob is damaged made every later version's upload
    fail (each chose it again). The put now encodes against the reference instead."""
    store = localstore
    datas = series(4)
    eng = make_engine(store, tmp_path / "cache")
    keys = put_all(eng, tmp_path, datas[:3])
    damage_blob(store, tmp_path, datas[2])
    cold = make_engine(store, tmp_path / "cold")  # no cached content to lean on
    r = cold.put(write_file(tmp_path / "v4", datas[3]), "rel/app-1.03.bin", hints=(keys[2],))
    assert r.kind == "delta", r
    assert depth(store, "rel/app-1.03.bin") == 1  # against the reference
    read_all_fresh(store, tmp_path, {"rel/app-1.03.bin": datas[3]}, "passed-over")


def test_a_series_after_an_unrelated_reference_starts_its_own_chain(
        localstore: ObjectStore, tmp_path: Path) -> None:
    """Found by review: when the directory's reference is another kind of file (here a
    zstd stream), a series has nothing to delta against; its first version becomes a
    keyframe (smaller than the file: stored compressed) and the next ones chain on it."""
    store = localstore
    eng = make_engine(store, tmp_path / "cache")
    eng.put(write_file(tmp_path / "z", b"\x28\xb5\x2f\xfd" + random.Random(1).randbytes(MiB)),
            "mix/data.tar.zst")
    text = "".join(f"line {i}: {random.Random(i).random()}\n" for i in range(30000)).encode()
    rng = random.Random(4)
    datas = [text]
    for _ in range(3):
        datas.append(next_version(datas[-1], rng))
    kinds = [eng.put(write_file(tmp_path / f"t{i}", b), f"mix/log-{i}.txt").kind
             for i, b in enumerate(datas)]
    assert kinds == ["delta"] * 4, kinds
    assert [depth(store, f"mix/log-{i}.txt") for i in range(4)] == [1, 2, 3, 4]
    assert sum(o.size for o in store.iter_objects("mix/.deltafs/")) < 0.6 * len(text)
    read_all_fresh(store, tmp_path, {f"mix/log-{i}.txt": b for i, b in enumerate(datas)},
                   "keyframe-root")


def test_a_writer_asks_again_only_when_a_sweep_changed_the_state(store: ObjectStore,
                                                                 tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    """A chained write HEADs no blob and fetches no base pointer that this engine saw or
    wrote under the same sweep state; once the state changed (here: a blob of the
    newest chain deleted and the marker rewritten, as a sweep would), it looks again,
    finds the chain broken and encodes against the reference: never a pointer to a
    missing blob."""
    datas = series(8, size=256 << 10)
    eng = make_engine(store, tmp_path / "cache")
    keys = put_all(eng, tmp_path, datas[:6])
    calls: list[tuple[str, str]] = []
    for op in ("head", "get_bytes", "get_file"):
        orig = getattr(store, op)

        def spy(key: str, *a: Any, _orig: Any = orig, _op: str = op, **kw: Any) -> Any:
            calls.append((_op, key))
            return _orig(key, *a, **kw)
        monkeypatch.setattr(store, op, spy)

    def put(i: int) -> str:
        key = f"rel/app-1.{i:02d}.bin"
        eng.put(write_file(tmp_path / f"src-{i}", datas[i]), key, hints=(keys[-1],))
        keys.append(key)
        return key

    put(6)
    assert depth(store, keys[-1]) == 6
    asked = [c for c in calls if "/.deltafs/" in c[1] and "sweep/" not in c[1]
             or c[0] == "get_bytes" and c[1].endswith(".delta")]
    assert asked == [], asked
    # a blob of the newest chain goes, and the sweep marker changes
    hp = chain.hidden_prefix("rel")
    top = next(n for n in blobs(store) if n.startswith(sha256_bytes(datas[6])))
    store.delete(hp + top)
    store.put_bytes(hp + chain.DONE_NAME, b"another sweep", {})
    calls.clear()
    pointers: list[str] = []
    orig_put = store.put_bytes

    def put_spy(key: str, body: bytes, meta: dict[str, str], *a: Any, **kw: Any) -> Any:
        if key.endswith(".delta"):
            pointers.append(meta[chain.DEPTH_KEY])
        return orig_put(key, body, meta, *a, **kw)
    monkeypatch.setattr(store, "put_bytes", put_spy)
    put(7)
    assert ("head", hp + top) in calls  # the state changed: the chain was checked
    assert depth(store, keys[-1]) == 1  # against the reference, not the broken chain
    # checked before anything was uploaded (the state this engine remembered was only
    # a start): no pointer through the missing blob was ever in the bucket
    assert pointers == ["1"], pointers
    want = dict(zip(keys, datas))
    del want[keys[6]]  # its blob is gone (what this test did, no sweep would)
    read_all_fresh(store, tmp_path, want, "after")


def test_memory_of_blobs_holds_only_under_the_same_sweep_state(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import time
    mem = chain.Memory()
    s = chain.SweepState({}, "etag-1", time.time())
    mem.saw("d", s, ["d/.deltafs/a.b"])
    assert mem.unknown("d", s, ["d/.deltafs/a.b", "d/.deltafs/c.a"]) == ["d/.deltafs/c.a"]
    assert mem.unknown("d", chain.SweepState({}, "etag-2"), ["d/.deltafs/a.b"]) != []
    dead = chain.SweepState({"d/.deltafs/sweep/flag-x": 0.0}, "etag-1")  # a dead sweeper
    assert mem.unknown("d", dead, ["d/.deltafs/a.b"]) == ["d/.deltafs/a.b"]
    assert mem.unknown("e", s, ["d/.deltafs/a.b"]) == ["d/.deltafs/a.b"]
    live = chain.SweepState({"d/.deltafs/sweep/flag-y": time.time()}, "etag-3", time.time())
    mem.saw("d", live, ["d/.deltafs/a.b"])  # a sweep is running: nothing is learnt
    assert mem.unknown("d", live, ["d/.deltafs/a.b"]) == ["d/.deltafs/a.b"]
    # a flag live when the state was read, stale by the time the HEADs came back
    t = time.time() - chain.STALE_FLAG + 0.5
    edge = chain.SweepState({"d/.deltafs/sweep/flag-z": t - 0.4}, "etag-4", t)
    mem.saw("d", edge, ["d/.deltafs/a.b"])
    assert mem.unknown("d", edge, ["d/.deltafs/a.b"]) == ["d/.deltafs/a.b"]
    assert mem.unknown("d", chain.SweepState({}, "", time.time()), ["k"]) == ["k"]  # no marker
    # trusted for a while only (a deleter no sweep state shows)
    mem.saw("d", s, ["d/.deltafs/a.b"])
    now = time.monotonic()
    monkeypatch.setattr(chain.time, "monotonic", lambda: now + chain.Memory.TTL + 1)
    assert mem.unknown("d", s, ["d/.deltafs/a.b"]) == ["d/.deltafs/a.b"]


def test_a_sweep_that_fails_half_way_still_changes_the_state(
        store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep deletes one blob, then its batch delete fails (its flag still goes): the
    marker was rewritten before the first delete, so a writer that remembers the
    chain of a file another mount deleted looks again, and its new file reads back on a new machine
    (review: the state came back exactly as before, and the writer named the gone
    blob)."""
    from deltafs.errors import StoreError
    datas = series(8, size=256 << 10)
    eng = make_engine(store, tmp_path / "cache")
    keys = put_all(eng, tmp_path, datas[:6])
    before = chain.sweep_state(store, "rel")
    other = make_engine(store, tmp_path / "other")  # another mount, or the CLI
    other.delete(keys[5])
    other.delete(keys[4])
    orig = store.delete_many

    def flaky(ks: list[str]) -> None:
        orig(ks[:1])
        raise StoreError("1 of 2 keys failed: InternalError")
    monkeypatch.setattr(store, "delete_many", flaky)
    with pytest.raises(StoreError):
        other.sweep_blobs("rel", grace=0)
    monkeypatch.setattr(store, "delete_many", orig)
    after = chain.sweep_state(store, "rel")
    assert (set(after.flags), after.done) != (set(before.flags), before.done)
    key = "rel/app-1.06.bin"
    eng.put(write_file(tmp_path / "src6", datas[6]), key, hints=(keys[5],))
    read_all_fresh(store, tmp_path, {key: datas[6], keys[3]: datas[3]}, "fresh")


def test_an_rm_r_that_stops_half_way_still_changes_the_state(
        store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``delete_tree`` (the CLI's ``rm -r``) raises no sweep flag: it removes each
    directory's sweep marker before its blobs, so if it stops after deleting blobs a
    writer that remembers them sees a new state, looks again, and its new file reads
    back on a new machine (review: the marker sorted after the blobs)."""
    datas = series(8, size=256 << 10)
    eng = make_engine(store, tmp_path / "cache")
    keys = put_all(eng, tmp_path, datas[:6])
    before = chain.sweep_state(store, "rel")
    other = make_engine(store, tmp_path / "other")
    orig = store.delete_many

    def stop_after_first_blob(ks: list[str]) -> None:
        blob_keys = [k for k in ks if chain.parse_blob_name(k.rpartition("/")[2])]
        if blob_keys:
            orig(blob_keys[:1])  # one blob goes, then the command is interrupted
            raise KeyboardInterrupt
        orig(ks)
    monkeypatch.setattr(store, "delete_many", stop_after_first_blob)
    with pytest.raises(KeyboardInterrupt):
        other.delete_tree("rel")
    monkeypatch.setattr(store, "delete_many", orig)
    after = chain.sweep_state(store, "rel")
    assert after.done != before.done
    # what the interrupted rm -r left: every pointer is gone; this mount writes on
    key = "rel/app-1.06.bin"
    eng.put(write_file(tmp_path / "src6", datas[6]), key, hints=(keys[5],))
    read_all_fresh(store, tmp_path, {key: datas[6]}, "fresh")


def test_a_damaged_cached_base_is_caught_and_the_read_heals(
        localstore: ObjectStore, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A cold read decodes from cached bases without hashing them first (each decode
    checks its output). A damaged cached base fails that check; the read then decodes
    again from verified sources, drops the damaged entry, and returns the right bytes.
    The mount's path too: served from the cache, not copied out."""
    store = localstore
    datas = series(4)
    keys = put_all(make_engine(store, tmp_path / "writer"), tmp_path, datas)
    reader = make_engine(store, tmp_path / "reader")
    reader.get(keys[2], tmp_path / "v2")  # caches the contents of versions 0..2
    assert (tmp_path / "v2").read_bytes() == datas[2]
    flipped = 0
    for p in (tmp_path / "reader" / "content").rglob("*.val"):
        with open(p, "r+b") as f:
            f.seek(1000)
            b = f.read(1)
            f.seek(1000)
            f.write(bytes([b[0] ^ 0x5A]))
        flipped += 1
    assert flipped >= 3
    caplog.set_level("DEBUG", logger="deltafs")
    stored = reader.stat(keys[3])
    sha, in_cache = reader.materialize_for_cache(stored, tmp_path / "v3")
    assert in_cache and sha == sha256_bytes(datas[3]) and not (tmp_path / "v3").exists()
    opened = reader.cache.open(sha, tmp_path)
    assert opened is not None and opened.pread(len(datas[3]) + 1, 0) == datas[3]
    opened.close()
    assert "decoding again from verified sources" in caplog.text
    assert "is damaged" in caplog.text
    # and through get (a user's file): the same bytes
    reader.get(keys[3], tmp_path / "v3b")
    assert (tmp_path / "v3b").read_bytes() == datas[3]


# ------------------------------------------------------------------ puts that overlap

class _Gate:
    """Wraps ``store.put_bytes`` so that the PUT of one key waits until released (or
    fails), and records the order of every PUT."""

    def __init__(self, store: ObjectStore, monkeypatch: pytest.MonkeyPatch, key: str,
                 fail: bool = False) -> None:
        import threading

        self.key, self.fail = key, fail
        self.reached = threading.Event()
        self.release = threading.Event()
        self.puts: list[str] = []
        for op in ("put_bytes", "put_file"):
            orig = getattr(store, op)

            def spy(k: str, *a: Any, _orig: Any = orig, **kw: Any) -> Any:
                if k == self.key:
                    self.reached.set()
                    assert self.release.wait(60)
                    if self.fail:
                        from deltafs.errors import StoreError
                        raise StoreError("injected: the base's pointer PUT failed")
                self.puts.append(k)
                return _orig(k, *a, **kw)
            monkeypatch.setattr(store, op, spy)


def _eventually(cond: Any, timeout: float = 60) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _start(eng: Engine, src: Path, key: str, out: dict[str, Any]) -> Any:
    import threading

    def run() -> None:
        try:
            out[key] = eng.put(src, key)
        except Exception as exc:  # noqa: BLE001 - checked by the test
            out[key] = exc
    t = threading.Thread(target=run)
    t.start()
    return t


class _EncodeGate:
    """Holds the first encode of the engine (the previous version's) until released,
    or makes it fail; records which puts reached the reference fetch meanwhile."""

    def __init__(self, eng: Engine, monkeypatch: pytest.MonkeyPatch, fail: bool = False
                 ) -> None:
        import threading

        self.fail = fail
        self.reached = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        self.fetched: list[str] = []
        enc, fetch = eng._encode, eng._fetch_reference

        def encode(*a: Any, **kw: Any) -> Any:
            self.calls += 1
            if self.calls == 1:
                self.reached.set()
                assert self.release.wait(60)
                if self.fail:
                    from deltafs.errors import StoreError
                    raise StoreError("injected: the previous version's encode failed")
            return enc(*a, **kw)

        def fetch_ref(*a: Any, **kw: Any) -> Any:
            self.fetched.append(threading.current_thread().name)
            return fetch(*a, **kw)
        monkeypatch.setattr(eng, "_encode", encode)
        monkeypatch.setattr(eng, "_fetch_reference", fetch_ref)


def _start_after(eng: Engine, src: Path, key: str, after: str, out: dict[str, Any]) -> Any:
    import threading

    def run() -> None:
        try:
            out[key] = eng.put(src, key, after=after)
        except Exception as exc:  # noqa: BLE001 - checked by the test
            out[key] = exc
    t = threading.Thread(target=run)
    t.start()
    return t


def test_a_version_prepares_beside_the_encode_before_it_and_then_chains_on_it(
        store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12: a version started while the one before it encodes (``after``) fetches
    its reference meanwhile, but chooses its base only once that encode announced
    itself: it ends at depth 2, against its predecessor, not against the reference."""
    datas = series(3)
    eng = make_engine(store, tmp_path / "cache")
    keys = put_all(eng, tmp_path, datas[:1])
    v2, v3 = "rel/app-1.01.bin", "rel/app-1.02.bin"
    gate = _EncodeGate(eng, monkeypatch)
    done: dict[str, Any] = {}
    t2 = _start(eng, write_file(tmp_path / "s2", datas[1]), v2, done)
    try:
        assert gate.reached.wait(60)  # v2 chose its base and encodes (held)
        assert eng.chain_memory.is_encoding(v2)
        t3 = _start_after(eng, write_file(tmp_path / "s3", datas[2]), v3, v2, done)
        assert _eventually(lambda: len(gate.fetched) == 2)  # v3 prepared beside v2's encode
        t3.join(0.5)
        assert t3.is_alive() and gate.calls == 1  # but chose nothing yet
    finally:
        gate.release.set()
    t2.join(60)
    t3.join(60)
    assert done[v2].kind == done[v3].kind == "delta", done
    assert depth(store, v2) == 1 and depth(store, v3) == 2
    assert not eng.chain_memory.is_encoding(v2) and not eng.chain_memory.is_encoding(v3)
    read_all_fresh(store, tmp_path, {keys[0]: datas[0], v2: datas[1], v3: datas[2]},
                   "after")


def test_when_the_encode_waited_for_fails_the_next_goes_on_at_once(
        store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The previous version's put fails in its encode: the version waiting for it is
    told when that put ends (not after ``ENCODE_WAIT``) and encodes against the
    reference; it reads back exactly on a new machine."""
    import time

    datas = series(3)
    eng = make_engine(store, tmp_path / "cache")
    keys = put_all(eng, tmp_path, datas[:1])
    v2, v3 = "rel/app-1.01.bin", "rel/app-1.02.bin"
    monkeypatch.setattr(Engine, "ENCODE_WAIT", 300.0)
    gate = _EncodeGate(eng, monkeypatch, fail=True)
    done: dict[str, Any] = {}
    t2 = _start(eng, write_file(tmp_path / "s2", datas[1]), v2, done)
    try:
        assert gate.reached.wait(60)
        t3 = _start_after(eng, write_file(tmp_path / "s3", datas[2]), v3, v2, done)
        assert _eventually(lambda: len(gate.fetched) == 2)
    finally:
        start = time.monotonic()
        gate.release.set()
    t2.join(60)
    t3.join(60)
    assert not t3.is_alive() and time.monotonic() - start < 60
    assert isinstance(done[v2], Exception), done
    assert done[v3].kind == "delta", done
    assert depth(store, v3) == 1  # against the reference
    read_all_fresh(store, tmp_path, {keys[0]: datas[0], v3: datas[2]}, "after-failed")


def test_an_encode_waited_for_too_long_is_not_waited_for(
        store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bounded: past ``ENCODE_WAIT`` the version chooses its base without the one still
    encoding (against the reference here), and both read back exactly."""
    import time

    datas = series(3)
    eng = make_engine(store, tmp_path / "cache")
    keys = put_all(eng, tmp_path, datas[:1])
    v2, v3 = "rel/app-1.01.bin", "rel/app-1.02.bin"
    monkeypatch.setattr(Engine, "ENCODE_WAIT", 0.5)
    gate = _EncodeGate(eng, monkeypatch)
    done: dict[str, Any] = {}
    t2 = _start(eng, write_file(tmp_path / "s2", datas[1]), v2, done)
    try:
        assert gate.reached.wait(60)
        start = time.monotonic()
        t3 = _start_after(eng, write_file(tmp_path / "s3", datas[2]), v3, v2, done)
        t3.join(60)
        assert not t3.is_alive() and done[v3].kind == "delta", done
        assert time.monotonic() - start >= 0.5  # it did wait, up to the bound
        assert depth(store, v3) == 1
    finally:
        gate.release.set()
    t2.join(60)
    assert done[v2].kind == "delta", done
    read_all_fresh(store, tmp_path, {keys[0]: datas[0], v2: datas[1], v3: datas[2]},
                   "after-timeout")


def test_a_version_encodes_against_one_still_uploading_and_uploads_after_it(
        store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The upload of one version overlaps the encode of the next (a slow link pays the
    round trips once, not per file): v3 finds v2 announced while v2's pointer PUT is
    held, encodes against v2's content, and puts nothing in the bucket before v2 is
    confirmed; it ends at depth 2, one more than v2."""
    datas = series(3)
    eng = make_engine(store, tmp_path / "cache")
    keys = put_all(eng, tmp_path, datas[:1])  # the reference
    v2, v3 = "rel/app-1.01.bin", "rel/app-1.02.bin"
    gate = _Gate(store, monkeypatch, v2 + ".delta")
    done: dict[str, Any] = {}
    t2 = _start(eng, write_file(tmp_path / "s2", datas[1]), v2, done)
    assert gate.reached.wait(60)  # v2 encoded, its blob up, its pointer PUT held
    assert eng.chain_memory.pending(v2) is not None
    t3 = _start(eng, write_file(tmp_path / "s3", datas[2]), v3, done)
    # v3 encodes against v2's content and announces itself while v2 is still held
    assert _eventually(lambda: eng.chain_memory.pending(v3) is not None)
    assert eng.chain_memory.pending(v3).pointer.chain[1] == sha256_bytes(datas[1])  # type: ignore[union-attr]
    t3.join(1)
    assert t3.is_alive()  # and waits for v2
    assert not any(k.startswith(chain.hidden_prefix("rel") + sha256_bytes(datas[2]))
                   or k == v3 + ".delta" for k in gate.puts), gate.puts
    gate.release.set()
    t2.join(60)
    t3.join(60)
    assert done[v2].kind == done[v3].kind == "delta", done
    assert depth(store, v2) == 1 and depth(store, v3) == 2
    order = gate.puts
    assert order.index(v2 + ".delta") < order.index(v3 + ".delta")
    assert eng.chain_memory.pending(v2) is None and eng.chain_memory.pending(v3) is None
    read_all_fresh(store, tmp_path, {keys[0]: datas[0], v2: datas[1], v3: datas[2]},
                   "overlap")


def test_when_the_base_still_uploading_fails_the_next_goes_against_the_reference(
        store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """v2's pointer PUT fails after v3 encoded against it: v3 never writes a pointer
    through v2's content (whose pointer is not in the bucket); it encodes again against
    the reference and reads back exactly on a new machine."""
    datas = series(3)
    eng = make_engine(store, tmp_path / "cache")
    keys = put_all(eng, tmp_path, datas[:1])
    v2, v3 = "rel/app-1.01.bin", "rel/app-1.02.bin"
    gate = _Gate(store, monkeypatch, v2 + ".delta", fail=True)
    done: dict[str, Any] = {}
    t2 = _start(eng, write_file(tmp_path / "s2", datas[1]), v2, done)
    assert gate.reached.wait(60)
    t3 = _start(eng, write_file(tmp_path / "s3", datas[2]), v3, done)
    assert _eventually(lambda: eng.chain_memory.pending(v3) is not None)  # encoded on v2
    t3.join(1)
    assert t3.is_alive()
    gate.release.set()
    t2.join(60)
    t3.join(60)
    assert isinstance(done[v2], Exception), done
    assert done[v3].kind == "delta", done
    assert depth(store, v3) == 1  # against the reference
    assert store.head(v2 + ".delta") is None
    read_all_fresh(store, tmp_path, {keys[0]: datas[0], v3: datas[2]}, "base-failed")


def test_a_remembered_reference_replaced_meanwhile_is_never_encoded_against_in_the_bucket(
        store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A put starts from the reference this engine saw last, but asks the bucket beside
    the encode: when another writer replaced it meanwhile, nothing encoded against the
    old one is uploaded; the file is encoded against the new one."""
    from deltafs.format import reference_key

    datas = series(4)
    eng = make_engine(store, tmp_path / "cache")
    put_all(eng, tmp_path, datas[:2])
    assert eng._known_reference("rel") is not None
    # another writer (no conditional PUT) replaces the reference with other content
    other = make_engine(store, tmp_path / "other")
    store.delete(reference_key("rel"))
    other.put(write_file(tmp_path / "new-ref", datas[3]), "rel/zzz-seed.bin")
    new_sha = sha256_bytes(datas[3])
    info = store.head(reference_key("rel"))
    assert info is not None
    puts: list[tuple[str, dict[str, str]]] = []
    for op in ("put_bytes", "put_file"):
        orig = getattr(store, op)

        def spy(k: str, body: Any, meta: dict[str, str], *a: Any, _orig: Any = orig,
                **kw: Any) -> Any:
            puts.append((k, dict(meta or {})))
            return _orig(k, body, meta, *a, **kw)
        monkeypatch.setattr(store, op, spy)
    key = "rel/app-1.02.bin"
    r = eng.put(write_file(tmp_path / "v3", datas[2]), key)
    assert r.kind == "delta", r
    refs = {m.get("dg-ref-sha256") or m.get("ref-sha256") for k, m in puts
            if k.endswith(".delta")}
    assert refs == {new_sha}, (refs, puts)
    read_all_fresh(store, tmp_path, {key: datas[2], "rel/zzz-seed.bin": datas[3]},
                   "ref-replaced")


def test_a_version_finds_its_predecessor_written_here_but_not_yet_in_its_hints(
        store: ObjectStore, tmp_path: Path) -> None:
    """Found measuring issue 12: a version that starts as soon as the one before it
    announced itself may choose its base after that put finished but before the mount
    recorded it (its hints then end one version early): in one copy of 20 wheels, two
    were encoded two versions back (1.3 -> 2.0 MB each). The engine's own memory of
    what it wrote in the directory closes that gap."""
    datas = series(4)
    eng = make_engine(store, tmp_path / "cache")
    keys = put_all(eng, tmp_path, datas[:3])
    r = eng.put(write_file(tmp_path / "v4", datas[3]), "rel/app-1.03.bin",
                hints=(keys[1],))  # stale hints: the version before last
    assert r.kind == "delta"
    assert depth(store, "rel/app-1.03.bin") == depth(store, keys[2]) + 1


def test_a_file_of_another_series_does_not_wait_for_an_upload(
        store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: a put took any announced put of its directory as its base, so
    unrelated files waited for each other's uploads. Only a version of the same series
    (same name template) waits; another file goes on while the first is held."""
    datas = series(2)
    eng = make_engine(store, tmp_path / "cache")
    put_all(eng, tmp_path, datas[:1])
    held = "rel/libfoo-1.0.so"
    gate = _Gate(store, monkeypatch, held + ".delta")
    done: dict[str, Any] = {}
    t1 = _start(eng, write_file(tmp_path / "s1", datas[1]), held, done)
    assert gate.reached.wait(60)
    other = next_version(datas[1], random.Random(3))
    t2 = _start(eng, write_file(tmp_path / "s2", other), "rel/other-tool.bin", done)
    t2.join(60)
    assert not t2.is_alive(), "an unrelated file waited for another file's upload"
    assert done["rel/other-tool.bin"].kind == "delta", done
    gate.release.set()
    t1.join(60)
    assert done[held].kind == "delta", done
