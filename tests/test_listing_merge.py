"""A listing describes the bucket when the LIST ran: it must never override rows that
changed while it ran (issue 8: a just-uploaded file disappeared or took listing defaults),
nor bring back objects with a pending delete or objects a pending rename still owns."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from deltafs.format import Kind, StoredFile
from deltafs.index import DirListing, listing_snapshot, merge_listing
from deltafs.journal import ROOT_INO, Journal


def _journal(tmp_path: Path) -> Journal:
    return Journal(tmp_path / "state.db", "s3://b/")


def _file(name: str, etag: str, size: int = 10) -> StoredFile:
    return StoredFile(name, name, Kind.DIRECT, size, etag, 1.0, {})


def _row(j: Journal, name: str, **fields: object) -> int:
    base = dict(parent=ROOT_INO, name=name, mode=stat.S_IFREG | 0o644, size=1)
    base.update(fields)
    return j.insert(**base)


def test_a_row_published_during_the_listing_is_kept(tmp_path: Path) -> None:
    j = _journal(tmp_path)
    ino = _row(j, "new.bin", remote_key="new.bin", remote_etag="e1", size=5)
    snap = listing_snapshot(j, ROOT_INO)
    # while the LIST ran, the file was published again (a new upload)
    j.update(ino, remote_etag="e2", size=7, sha256="abc")
    # the listing (older) does not have the new object at all
    merge_listing(j, ROOT_INO, DirListing({}, set(), None), set(), 0, 0, snap)
    row = j.get(ino)
    assert row is not None and row.remote_etag == "e2" and row.size == 7
    # nor does an older version of it override the row
    merge_listing(j, ROOT_INO, DirListing({"new.bin": _file("new.bin", "e1", 5)}, set(), None),
                  set(), 0, 0, snap)
    row = j.get(ino)
    assert row is not None and row.remote_etag == "e2" and row.size == 7


def test_a_row_created_during_the_listing_is_kept(tmp_path: Path) -> None:
    j = _journal(tmp_path)
    snap = listing_snapshot(j, ROOT_INO)
    ino = _row(j, "fresh.bin", remote_key="fresh.bin", remote_etag="e9")
    merge_listing(j, ROOT_INO, DirListing({}, set(), None), set(), 0, 0, snap)
    assert j.get(ino) is not None


def test_an_unchanged_row_follows_the_bucket(tmp_path: Path) -> None:
    j = _journal(tmp_path)
    gone = _row(j, "gone.bin", remote_key="gone.bin", remote_etag="e1")
    changed = _row(j, "changed.bin", remote_key="changed.bin", remote_etag="e1", size=1)
    snap = listing_snapshot(j, ROOT_INO)
    replaced = merge_listing(j, ROOT_INO, DirListing(
        {"changed.bin": _file("changed.bin", "e2", 99)}, set(), None), set(), 0, 0, snap)
    assert j.child(ROOT_INO, "gone.bin") is None  # deleted by another writer
    row = j.child(ROOT_INO, "changed.bin")
    assert row is not None and row.remote_etag == "e2" and row.size == 99
    # another writer's new content is a new inode: the kernel's pages of the old one
    # can never be served for it; the old one is unlinked until the kernel forgets it
    assert row.ino != changed
    for old in (gone, changed):
        orphan = j.get(old)
        assert orphan is not None and orphan.parent == 0
    assert sorted(replaced) == sorted([(gone, "gone.bin"), (changed, "changed.bin")])


def test_pending_deletes_and_renames_do_not_come_back(tmp_path: Path) -> None:
    j = _journal(tmp_path)
    j.add_tombstone("deleted.bin", Kind.DIRECT.value)
    d = j.insert(parent=ROOT_INO, name="d", mode=stat.S_IFDIR | 0o755)
    # renamed from /moved.bin to /d/moved.bin, the copy not done yet: the row keeps the
    # old object as its remote_key
    _row(j, "moved.bin", parent=d, remote_key="moved.bin", remote_etag="e1", dirty=4)
    snap = listing_snapshot(j, ROOT_INO)
    merge_listing(j, ROOT_INO, DirListing({"deleted.bin": _file("deleted.bin", "e1"),
                                           "moved.bin": _file("moved.bin", "e1")},
                                          {"d"}, None), set(), 0, 0, snap)
    assert j.child(ROOT_INO, "deleted.bin") is None
    assert j.child(ROOT_INO, "moved.bin") is None


def test_directory_link_count_and_emptiness_do_not_scan_the_directory(tmp_path: Path) -> None:
    """getattr of a directory (st_nlink = 2 + subdirectories) runs after every create in
    it: it must cost O(subdirectories), not a count of 100,000 files (that made `cp -r`
    into one directory quadratic); rmdir's emptiness check is one probe."""
    j = _journal(tmp_path)
    for i in range(300):
        _row(j, f"f{i}")
    for i in range(3):
        _row(j, f"d{i}", mode=stat.S_IFDIR | 0o755)
    assert j.count_subdirs(ROOT_INO) == 3
    plan = " ".join(str(r) for r in j.x("EXPLAIN QUERY PLAN " + j.SUBDIRS_SQL,
                                        (ROOT_INO, ROOT_INO)).fetchall())
    assert "nodes_subdirs" in plan, plan
    assert j.count_children(ROOT_INO) == 1
    empty = _row(j, "empty", mode=stat.S_IFDIR | 0o755)
    assert j.count_children(empty) == 0 and j.count_subdirs(empty) == 0


def test_commit_fsyncs_without_the_lock_the_handlers_need(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The fsync that makes a commit durable takes 50-250 ms on a busy disk: every FUSE
    handler on the event loop needs the journal's lock, so the fsync must not hold it
    (0.2 stalled the loop for 270 ms during a 100,000-file copy)."""
    import deltafs.journal as journal_mod

    j = _journal(tmp_path)
    seen: list[bool] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        free = j._lock.acquire(blocking=False)
        if free:
            j._lock.release()
        seen.append(free)
        real(fd)

    monkeypatch.setattr(journal_mod.os, "fsync", fsync)
    _row(j, "a")
    j.commit()
    assert seen and all(seen), seen
    # and it is durable: a second connection (another process after a crash) sees it
    assert Journal(tmp_path / "state.db", "s3://b/").child(ROOT_INO, "a") is not None


@pytest.mark.parametrize("split", [False, True])
def test_the_wal_starts_over_while_handlers_keep_writing(tmp_path: Path, monkeypatch,  # type: ignore[no-untyped-def]
                                                         split: bool) -> None:
    """The checkpoint runs outside the handlers' lock, where a handler has always opened
    the next write transaction already: SQLite then never starts the WAL over, and it
    grew without bound during a long copy (found by review). Simulated: a row is written
    during every commit's fsync, as the event loop does; ``split``: as the filesystem
    commits, written out on the loop, a row written, then made durable in a worker."""
    import deltafs.journal as journal_mod

    monkeypatch.setattr(journal_mod, "CHECKPOINT_BYTES", 64 << 10)
    j = _journal(tmp_path)
    real = j._sync_wal
    n = [0]

    def busy_sync() -> None:
        n[0] += 1
        _row(j, f"during-{n[0]}", target=os.urandom(2000))  # the loop writes meanwhile
        real()

    monkeypatch.setattr(j, "_sync_wal", busy_sync)
    wal = tmp_path / "state.db-wal"
    sizes = []
    for i in range(300):
        for k in range(5):
            _row(j, f"r{i}-{k}", target=os.urandom(2000))
        if split:
            j.write_out()
            _row(j, f"between-{i}", target=os.urandom(2000))
            j.make_durable()
        else:
            j.commit()
        sizes.append(wal.stat().st_size)
    assert max(sizes[100:]) < 1 << 20, (max(sizes), sizes[-5:])


def test_a_restarted_wal_is_written_over_in_place(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Steady state: the WAL starts over once per CHECKPOINT_BYTES of frames and is
    written over from its start, never cut back (cutting it was a truncate on the
    loop's next commit: 8-10 ms each). So its file never shrinks, and checkpoints follow
    the frames in use, not the file's size (which stays at its largest)."""
    import deltafs.journal as journal_mod

    monkeypatch.setattr(journal_mod, "CHECKPOINT_BYTES", 64 << 10)
    j = _journal(tmp_path)
    wal = tmp_path / "state.db-wal"
    sizes, checkpoints = [], 0
    for i in range(300):
        _row(j, f"r{i}", target=os.urandom(3000))
        j.write_out()
        j.make_durable()
        checkpoints += j._restart_wal  # noqa: SLF001  (set by each checkpoint)
        sizes.append(wal.stat().st_size)
    assert all(b >= a for a, b in zip(sizes, sizes[1:])), "the WAL was cut back"
    assert max(sizes) < 1 << 20
    # ~8 frames (~33 KB) a commit against 64 KiB: a checkpoint every third commit here
    # (100); following the file's size instead, one at every commit (300)
    assert 3 <= checkpoints <= 150, checkpoints
    frames = j._wal_bytes()  # noqa: SLF001
    assert frames is not None and 0 < frames <= max(sizes)
    # a crash now (the files as they are, no close): the WAL file holds the frames in
    # use and, past them, frames of earlier generations written over in place; the
    # reopened journal has every committed row and nothing of the stale frames
    import shutil

    assert frames + 32 < sizes[-1], (frames, sizes[-1])  # stale frames past the live ones
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for name in ("state.db", "state.db-wal"):
        shutil.copyfile(tmp_path / name, crashed / name)
    again = Journal(crashed / "state.db", "s3://b/")
    names = {n.name for n in again.children(ROOT_INO)}
    assert names == {f"r{i}" for i in range(300)}, len(names)
    again.close()


def test_pages_are_fetched_one_ahead_in_order_and_errors_come_where_they_happened() -> None:
    """A whole-directory listing has the next LIST in flight while a page is merged:
    the page after is asked for before the consumer is done with this one, never two
    ahead, and an error of the LIST comes at its own place in the sequence."""
    import time

    from deltafs.index import fetched_ahead
    from deltafs.store.base import Listing

    asked: list[int] = []

    def source(n: int, fail_at: int | None = None):  # type: ignore[no-untyped-def]
        for i in range(n):
            asked.append(i)
            if i == fail_at:
                raise OSError("LIST failed")
            yield Listing([], [f"p{i}/"])

    got = []
    for page in fetched_ahead(source(5)):
        got.append(page.prefixes[0])
        deadline = time.monotonic() + 10
        while len(asked) < min(len(got) + 1, 5) and time.monotonic() < deadline:
            time.sleep(0.001)
        # the next page was asked for while this one is held, and no more
        assert len(asked) == min(len(got) + 1, 5), (got, asked)
    assert got == [f"p{i}/" for i in range(5)]

    asked.clear()
    got = []
    try:
        for page in fetched_ahead(source(5, fail_at=3)):
            got.append(page.prefixes[0])
    except OSError as exc:
        assert str(exc) == "LIST failed"
    else:
        raise AssertionError("the LIST error was lost")
    assert got == ["p0/", "p1/", "p2/"]


def test_a_slice_of_names_is_looked_up_in_one_query_per_500(tmp_path: Path) -> None:
    """The merge of a slice asks for its rows together: one query per slice gives up the
    GIL once, not once per name (each give-up may wait 5 ms while workers hash)."""
    j = _journal(tmp_path)
    for i in range(1200):
        _row(j, f"f{i:05}", remote_key=f"f{i:05}", remote_etag="e1")
    sub = j.insert(parent=ROOT_INO, name="sub", mode=stat.S_IFDIR | 0o755)
    _row(j, "f00001", parent=sub)  # the same name elsewhere is not found
    queries: list[str] = []
    j.db.set_trace_callback(queries.append)
    names = [f"f{i:05}" for i in range(0, 2400, 2)]  # half exist, half do not
    found = j.children_named(ROOT_INO, names)
    j.db.set_trace_callback(None)
    assert sorted(found) == [n for n in names if int(n[1:]) < 1200]
    assert all(found[n].parent == ROOT_INO and found[n].name == n for n in found)
    assert len([q for q in queries if q.startswith("SELECT")]) == 3
    # and a merge of 600 unchanged names asks for them in two queries, not 600
    listing = DirListing({n: _file(n, "e1", 1) for n in names[:600]}, set(), None)
    snap = listing_snapshot(j, ROOT_INO)
    queries.clear()
    j.db.set_trace_callback(queries.append)
    merge_listing(j, ROOT_INO, listing, set(), 0, 0, snap, names=list(listing.files),
                  final=False)
    j.db.set_trace_callback(None)
    assert len([q for q in queries if "FROM nodes" in q]) == 2, queries[:5]


def test_merge_steps_adapt_to_the_time_they_hold_the_loop() -> None:
    """A step slower than its budget shrinks the next in proportion, a quick one doubles
    it: the loop is held about ``step_s`` whatever the machine's load."""
    import trio

    from deltafs.dirsync import MERGE_SLICE, MERGE_SLICE_MAX, MERGE_SLICE_MIN, Slices

    s = Slices(step_s=0.010)
    assert s.size == MERGE_SLICE
    s.took(0.100, 200)  # 200 names took 100 ms: 20 fit in 10 ms
    assert s.size == 20
    s.took(0.001, 20)
    assert s.size == 40
    s.took(10.0, 40)
    assert s.size == MERGE_SLICE_MIN
    for _ in range(20):
        s.took(0.0, s.size)
    assert s.size == MERGE_SLICE_MAX
    s.took(0.0, 3)  # a short last slice says nothing about a full one
    assert s.size == MERGE_SLICE_MAX

    # each() covers every name once, in order, marks the last step, and calls once for none
    seen: list[tuple[list[str], bool]] = []
    s = Slices(step_s=0.010)
    s.size = 3
    trio.run(s.each, [str(i) for i in range(7)], lambda c, last: seen.append((c, last)))
    assert [n for c, _ in seen for n in c] == [str(i) for i in range(7)]
    assert [last for _, last in seen] == [False] * (len(seen) - 1) + [True]
    seen.clear()
    trio.run(s.each, [], lambda c, last: seen.append((c, last)))
    assert seen == [([], True)]

    # a call starts from at most MERGE_SLICE names, whatever the last one grew to (its
    # names may have cost far less than these), and grows again from there
    s = Slices(step_s=10.0)  # every step quick
    s.size = MERGE_SLICE_MAX
    sizes: list[int] = []
    trio.run(s.each, [str(i) for i in range(MERGE_SLICE * 7)],
             lambda c, last: sizes.append(len(c)))
    want, size, left = [], MERGE_SLICE, MERGE_SLICE * 7
    while left:
        want.append(min(size, left))
        left -= want[-1]
        size = min(MERGE_SLICE_MAX, size * 2)
    assert sizes == want and max(sizes) <= MERGE_SLICE_MAX


def test_a_slice_of_new_names_is_inserted_in_a_few_statements(tmp_path: Path) -> None:
    """Issue 11: a cold listing inserts every name; four statements per new row (two
    checks, the row, the next inode number) were most of its time on the trio thread.
    A slice of 1,000 new names now costs a handful of statements, keeps skipping the
    objects with a pending delete or owned by a pending rename among them, and gives
    every row its own inode number, never reused after a reopen."""
    j = _journal(tmp_path)
    j.add_tombstone("n00007", Kind.DIRECT.value)
    d = j.insert(parent=ROOT_INO, name="d", mode=stat.S_IFDIR | 0o755)
    _row(j, "renamed", parent=d, remote_key="n00011", remote_etag="e1", dirty=4)
    _row(j, "n00013", remote_key="n00013", remote_etag="old")  # replaced by another writer
    names = [f"n{i:05}" for i in range(1000)]
    listing = DirListing({n: _file(n, "e1") for n in names}, set(), None)
    snap = listing_snapshot(j, ROOT_INO)
    queries: list[str] = []
    j.db.set_trace_callback(queries.append)
    gone = merge_listing(j, ROOT_INO, listing, set(), 0, 0, snap, names=names, final=False)
    j.db.set_trace_callback(None)
    # (the rows go in one executemany: SQLite traces each of its rows, all in C)
    other = [q for q in queries if not q.startswith("INSERT INTO nodes")]
    assert len(other) <= 10, other
    assert len([q for q in other if "next_ino" in q]) == 1
    assert [name for _, name in gone] == ["n00013"]
    rows = {n.name: n for n in j.children(ROOT_INO)}
    assert "n00007" not in rows and "n00011" not in rows  # deleted / the rename's source
    assert len([n for n in names if n in rows]) == 998
    assert rows["n00013"].remote_etag == "e1"
    inos = [rows[n].ino for n in names if n in rows]
    assert len(set(inos)) == len(inos) and sorted(inos) == inos
    top = max(inos)
    j.commit()
    j.close()
    j2 = _journal(tmp_path)
    assert j2.insert(parent=ROOT_INO, name="later", mode=stat.S_IFREG | 0o644) > top


def test_a_listing_holds_no_read_of_the_journal_while_its_pages_come_in(
        tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """What the journal knew when a listing began is copied before its first LIST, not
    held as an open read: held for a 100,000-entry listing (30 s), that read kept the
    WAL from starting over while the create wrote on, and its restart after cut ~100 MB
    back in one truncate on the loop (86-115 ms, scale benchmark run 10). Here, rows
    written and made durable between pages start the WAL over during the listing. The
    copy still predates the pages: a row published during the listing, which no page
    lists, is not taken for one the bucket lost, while one published before is."""
    import deltafs.journal as journal_mod
    from deltafs.index import stream_listing
    from deltafs.store.base import Listing, ObjectInfo

    monkeypatch.setattr(journal_mod, "CHECKPOINT_BYTES", 64 << 10)
    j = _journal(tmp_path)
    names = [f"f{i:03d}" for i in range(60)]
    for n in names:
        _row(j, n, remote_key=n, remote_etag=f"e-{n}", sha256="ab", mtime_ns=1)
    lost = _row(j, "lost", remote_key="lost", remote_etag="e-lost")
    j.commit()

    class Store:
        def iter_pages(self, prefix: str):  # type: ignore[no-untyped-def]
            for i in range(0, len(names), 10):
                yield Listing([ObjectInfo(n, 1, f"e-{n}", 1.0) for n in names[i:i + 10]])

    class Engine:
        store = Store()

        def head_many(self, keys: list[str]) -> dict[str, StoredFile]:
            assert not keys, keys  # every listed object is known at its ETag
            return {}

    frames: list[int] = []
    during: list[int] = []
    snaps: dict[int, tuple[str, str | None, str | None]] = {}
    republished = j.child(ROOT_INO, "f045")
    assert republished is not None

    def emit(listing: DirListing, snap: dict) -> None:  # type: ignore[type-arg]
        snaps.update(snap)
        if not during:
            # a later page's file published again after the listing began: its page
            # (listed after) still has the old object, and is decided against the row as
            # it was (no HEAD; the merge then leaves the changed row alone)
            j.update(republished.ino, remote_etag="e-new")
        for k in range(8):  # ~3 checkpoints' worth of WAL per page
            during.append(_row(j, f"during-{len(during)}", remote_key=f"d{len(during)}",
                               remote_etag="e", target=os.urandom(3000)))
            j.write_out()
            j.make_durable()
            frames.append(j._mx_frame() or 0)  # noqa: SLF001

    end = stream_listing(Engine(), j, ROOT_INO, "", emit)  # type: ignore[arg-type]
    assert end.pages == 6
    restarts = sum(b < a for a, b in zip(frames, frames[1:]))
    assert restarts >= 3, frames  # held, the WAL would only grow (no restart at all)
    assert end.removals == ["lost"] and set(end.removal_snapshot) == {lost}
    assert snaps[republished.ino] == ("f045", "f045", "e-f045")


def test_a_one_name_listing_copies_that_name_and_its_keys_only(tmp_path: Path) -> None:
    """A lookup after the TTL lists one name: its copy of the journal holds that name's
    row and any row holding one of its keys (a rename not yet carried out), so that a
    known object needs no HEAD, and a name the bucket lost is found gone."""
    from deltafs.index import stream_listing
    from deltafs.store.base import Listing, ObjectInfo

    j = _journal(tmp_path)
    for i in range(50):
        _row(j, f"f{i:03d}", remote_key=f"f{i:03d}", remote_etag=f"e-f{i:03d}")
    kept = _row(j, "kept", remote_key="kept", remote_etag="e-kept")
    moved = _row(j, "moved-to", remote_key="moved-from", remote_etag="e-m")  # its object not moved yet
    _row(j, "lost", remote_key="lost", remote_etag="e-lost")
    j.commit()
    bucket = {k: f"e-{k}" for k in [f"f{i:03d}" for i in range(50)] + ["kept"]}
    bucket["moved-from"] = "e-m"
    heads: list[str] = []

    class Store:
        def iter_pages(self, prefix: str):  # type: ignore[no-untyped-def]
            yield Listing([ObjectInfo(k, 1, e, 1.0) for k, e in sorted(bucket.items())
                           if k.startswith(prefix)])

    class Engine:
        store = Store()

        def head_many(self, keys: list[str]) -> dict[str, StoredFile]:
            heads.extend(keys)
            return {}

    def listing(name: str):  # type: ignore[no-untyped-def]
        got: list[tuple[DirListing, dict]] = []  # type: ignore[type-arg]
        end = stream_listing(Engine(), j, ROOT_INO, "",  # type: ignore[arg-type]
                             lambda part, snap: got.append((part, snap)), only=name)
        return end, got

    end, got = listing("kept")
    assert not heads and end.removals == []
    assert {i: v for _, snap in got for i, v in snap.items()} == {kept: ("kept", "kept", "e-kept")}
    end, got = listing("moved-from")  # known by its key, under another name
    assert not heads and end.removals == []
    assert all(not snap for _, snap in got)
    end, got = listing("lost")
    assert not heads and end.removals == ["lost"]
    assert moved  # (the rename's row is untouched by all three)
    from deltafs.index import _Known

    with j.read_cursor() as conn:  # one row copied, not the directory's 53
        _Known(conn, ROOT_INO, None, "", "kept")
        assert conn.execute("SELECT count(*) FROM known_rows").fetchone()[0] == 1


def test_a_wal_grown_during_a_long_read_is_not_cut_back_while_open(
        tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A read of the journal held while commits go on keeps the WAL from starting over,
    so it grows; at the restart after, SQLite would cut it back to journal_size_limit in
    the loop's commit (86-115 ms for ~100 MB, scale run 10). Open, the journal never
    cuts it (the file keeps its largest size); close() truncates it."""
    import deltafs.journal as journal_mod

    monkeypatch.setattr(journal_mod, "CHECKPOINT_BYTES", 64 << 10)
    j = _journal(tmp_path)
    wal = tmp_path / "state.db-wal"

    def commits(n: int, tag: str) -> list[tuple[int, int]]:
        out = []
        for i in range(n):
            _row(j, f"{tag}{i}", target=os.urandom(3000))
            j.write_out()
            j.make_durable()
            out.append((wal.stat().st_size, j._mx_frame() or 0))  # noqa: SLF001
        return out

    before = commits(20, "a")
    with j.read_cursor() as conn:
        conn.execute("SELECT count(*) FROM nodes").fetchone()  # a read held
        held = commits(80, "b")
    after = commits(40, "c")
    grown = held[-1][0]
    assert grown > 4 * (64 << 10), grown  # held: the WAL grew past twice the limit's old value
    assert any(b[1] < a[1] for a, b in zip(after, after[1:])), after  # it started over
    sizes = [s for s, _ in before + held + after]
    assert all(b >= a for a, b in zip(sizes, sizes[1:])), "the WAL was cut back"
    j.close()
    assert not wal.exists() or wal.stat().st_size == 0


def test_a_wal_left_large_by_a_crash_is_cut_at_start_up(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Open, the journal never cuts its WAL; a crash leaves it at its largest, so the
    next start cuts it (before the mount serves anything), with every committed row."""
    import shutil

    import deltafs.journal as journal_mod

    monkeypatch.setattr(journal_mod, "CHECKPOINT_BYTES", 64 << 10)
    j = _journal(tmp_path)
    with j.read_cursor() as conn:
        conn.execute("SELECT count(*) FROM nodes").fetchone()  # holds the WAL's restart
        for i in range(60):
            _row(j, f"r{i}", target=os.urandom(3000))
            j.commit()
    assert (tmp_path / "state.db-wal").stat().st_size > 2 * (64 << 10)
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for name in ("state.db", "state.db-wal"):
        shutil.copyfile(tmp_path / name, crashed / name)
    again = Journal(crashed / "state.db", "s3://b/")
    assert (crashed / "state.db-wal").stat().st_size < 64 << 10
    assert {n.name for n in again.children(ROOT_INO)} == {f"r{i}" for i in range(60)}
    again.close()
    j.close()


def test_a_listing_whose_copy_of_the_journal_fails_is_a_failed_listing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """SQLite's temp directory full or unwritable: the listing cannot copy what the
    journal knew (``_Known``). That is handled as a failed LIST: EIO for a directory
    never listed, the known entries served (and ``cannot refresh`` logged) for one that
    was, and another try in 10 s rather than on every operation."""
    import errno
    import logging
    import sqlite3
    import time

    import pyfuse3
    import trio

    from deltafs import index
    from deltafs.fs import DeltaFS, Options
    from deltafs.store.local import LocalStore
    from deltafs.wiring import make_engine

    store = LocalStore(tmp_path / "store", create=True)
    store.put_bytes("d/a.txt", b"hello", {})
    engine = make_engine(store, tmp_path / "cache")
    j = Journal(tmp_path / "state.db", "/x/store")
    fs = DeltaFS(engine, j, engine.cache, "", tmp_path / "files", Options(), "/x/store")
    real_init = index._Known.__init__
    copies: list[str | None] = []

    def full(self: object, conn: object, dir_ino: int, latest: object = None,
             prefix: str = "", only: str | None = None) -> None:
        copies.append(only)
        raise sqlite3.OperationalError("database or disk is full")

    ctx = None
    try:
        caplog.set_level(logging.WARNING, logger="deltafs.dirsync")
        monkeypatch.setattr(index._Known, "__init__", full)
        # a directory never listed: nothing to serve, so the listing's failure is EIO
        for call in (lambda: fs.dirsync.ensure_listed(ROOT_INO),
                     lambda: fs.lookup(ROOT_INO, b"d", ctx)):  # type: ignore[arg-type]
            with pytest.raises(pyfuse3.FUSEError) as err:
                trio.run(call)
            assert err.value.errno == errno.EIO
        assert "cannot list /" in caplog.text and len(copies) == 2
        # the temp directory has room again: listed, with the directory and its file
        monkeypatch.setattr(index._Known, "__init__", real_init)
        d = trio.run(fs.lookup, ROOT_INO, b"d", ctx).st_ino
        assert trio.run(fs.lookup, d, b"a.txt", ctx).st_size == 5
        a = j.child(d, "a.txt")
        assert a is not None
        # full again, and the listings are stale: what is known is served, not EIO
        monkeypatch.setattr(index._Known, "__init__", full)
        for ino in (ROOT_INO, d):
            j.update(ino, listed_at=time.time() - 3600)
        caplog.clear()
        copies.clear()
        trio.run(fs.dirsync.ensure_listed, d)  # the whole directory
        assert "cannot refresh d/" in caplog.text and copies == [None]
        row = j.get(d)
        assert row is not None and row.listed_at is not None
        # tried again 10 s before the TTL ends, not now nor on every operation
        assert abs(time.time() + 10 - (row.listed_at + Options().listing_ttl)) < 5
        trio.run(fs.dirsync.ensure_listed, d)
        assert copies == [None]
        # one name, in a listed directory (the root): the known row serves the lookup
        assert trio.run(fs.lookup, ROOT_INO, b"d", ctx).st_ino == d
        assert copies == [None, "d"] and "cannot refresh d" in caplog.text
        assert trio.run(fs.lookup, ROOT_INO, b"d", ctx).st_ino == d  # not again now
        assert copies == [None, "d"]
        # a name this mount never saw, in a directory it listed: not there (ENOENT)
        with pytest.raises(pyfuse3.FUSEError) as err:
            trio.run(fs.lookup, ROOT_INO, b"other", ctx)
        assert err.value.errno == errno.ENOENT
        assert j.child(d, "a.txt") is not None and j.get(a.ino) is not None
    finally:
        j.close()
