"""The journal's own bookkeeping: the cached directory paths behind every object key, and
the guards of queued deletes."""
from __future__ import annotations

import stat
from pathlib import Path

import pytest

from deltafs.content import ORPHAN_PARENT
from deltafs.journal import ROOT_INO, Journal

DIR = stat.S_IFDIR | 0o755
FILE = stat.S_IFREG | 0o644


def _tree(tmp_path: Path) -> tuple[Journal, int, int, int]:
    """a/b/f.bin: returns the journal and the inodes of a, b and f.bin."""
    j = Journal(tmp_path / "state.db", "s3://b/")
    a = j.insert(parent=ROOT_INO, name="a", mode=DIR)
    b = j.insert(parent=a, name="b", mode=DIR)
    f = j.insert(parent=b, name="f.bin", mode=FILE, size=1)
    return j, a, b, f


def _statements(j: Journal) -> list[str]:
    seen: list[str] = []
    j.db.set_trace_callback(seen.append)
    return seen


def test_a_files_key_costs_one_query_once_its_directory_is_known(tmp_path: Path) -> None:
    j, a, b, f = _tree(tmp_path)
    assert j.path(f) == "a/b/f.bin"
    seen = _statements(j)
    g = j.insert(parent=b, name="g.bin", mode=FILE, size=1)
    seen.clear()
    assert j.path(g) == "a/b/g.bin"
    assert j.path(b) == "a/b" and j.path(a) == "a" and j.path(ROOT_INO) == ""
    assert len(seen) == 1, seen


@pytest.mark.parametrize("moved", ["a", "b"])
def test_moving_a_directory_or_its_parent_changes_the_keys_below_it(
        tmp_path: Path, moved: str) -> None:
    j, a, b, f = _tree(tmp_path)
    assert j.path(f) == "a/b/f.bin"
    c = j.insert(parent=ROOT_INO, name="c", mode=DIR)
    if moved == "a":
        j.update(a, name="z")
        assert j.path(f) == "z/b/f.bin" and j.path(b) == "z/b"
    else:
        j.update(b, parent=c, name="y")
        assert j.path(f) == "c/y/f.bin" and j.path(b) == "c/y"
        assert j.path(a) == "a"


def test_a_removed_directory_has_no_key(tmp_path: Path) -> None:
    j, a, b, f = _tree(tmp_path)
    assert j.path(f) == "a/b/f.bin"
    j.delete(f)
    j.update(b, parent=ORPHAN_PARENT, name=f"#{b}")  # rmdir while still looked up
    j.delete(b)
    with pytest.raises(KeyError):
        j.path(b)
    with pytest.raises(KeyError):
        j.path(f)


def test_other_changes_keep_the_cached_paths(tmp_path: Path) -> None:
    j, a, b, f = _tree(tmp_path)
    assert j.path(f) == "a/b/f.bin"
    j.update(b, mtime_ns=5, dirty=1)
    seen = _statements(j)
    assert j.path(b) == "a/b"
    assert seen == []


def test_moving_a_file_keeps_the_cached_paths(tmp_path: Path) -> None:
    j, a, b, f = _tree(tmp_path)
    assert j.path(f) == "a/b/f.bin"
    j.update(f, name="g.bin")
    seen = _statements(j)
    assert j.path(b) == "a/b"
    assert seen == []
    assert j.path(f) == "a/b/g.bin"


def test_a_full_cache_starts_over_with_whole_chains(tmp_path: Path, monkeypatch) -> None:
    """Emptied when full, before a walk (which then caches every directory up to the
    root): a move of any cached directory's ancestor is still seen."""
    import deltafs.journal as journal_mod

    monkeypatch.setattr(journal_mod, "MAX_DIR_PATHS", 2)
    j, a, b, f = _tree(tmp_path)
    c = j.insert(parent=b, name="c", mode=DIR)
    g = j.insert(parent=c, name="g.bin", mode=FILE, size=1)
    assert j.path(f) == "a/b/f.bin"  # caches a and b: full
    assert j.path(g) == "a/b/c/g.bin"  # starts over: a, b and c again
    j.update(a, name="z")
    assert j.path(g) == "z/b/c/g.bin"


def test_a_rolled_back_move_is_not_remembered(tmp_path: Path) -> None:
    j, a, b, f = _tree(tmp_path)
    j.commit()
    assert j.path(f) == "a/b/f.bin"
    j.update(b, name="y")
    assert j.path(f) == "a/y/f.bin"
    with pytest.raises(Exception):
        j.x("INSERT INTO nodes (ino, parent, name, mode) VALUES (?, ?, ?, ?)",
            (f, b, "dup", FILE))  # a failing statement: SQLite may roll back
    j.db.rollback()
    assert j.path(f) == "a/b/f.bin"


def test_a_second_tombstone_for_a_key_adds_its_guard(tmp_path: Path) -> None:
    """One key can hold the object this mount last saw there or, after a write of its own
    that was in flight when the file left the key, that write's object: the delete
    keeps both guards (replacing one lost the other, and the object it named stayed)."""
    j = Journal(tmp_path / "state.db", "s3://b/")
    j.add_tombstone("d/x.delta", "delta", '"e1"')
    j.add_tombstone("d/x.delta", None, "sha256:ab")
    assert j.tombstone("d/x.delta") == ("delta", '"e1" sha256:ab')
    j.add_tombstone("d/x.delta", None, "sha256:ab")  # the same guard again: kept once
    assert j.tombstone("d/x.delta") == ("delta", '"e1" sha256:ab')
    j.drop_tombstone("d/x.delta", '"e1"')  # processed as it was before: not this one
    assert j.tombstone("d/x.delta") == ("delta", '"e1" sha256:ab')
    j.add_tombstone("d/", "marker", None)  # unguarded stays unguarded
    j.add_tombstone("d/", "marker", '"e2"')
    assert j.tombstone("d/") == ("marker", None)
    j.add_tombstone("d/y", "direct", '"e3"')
    j.add_tombstone("d/y", None, None)
    assert j.tombstone("d/y") == ("direct", None)
    j.drop_tombstone("d/x.delta", '"e1" sha256:ab')
    assert j.tombstone("d/x.delta") is None


def test_whether_a_rename_is_pending_is_one_indexed_probe(tmp_path: Path) -> None:
    """The scheduler asks once per pass whether any row has a rename to carry out (then
    no row can wait for another's move) instead of two queries per dirty row; the
    counter tells it that a rename came since it asked."""
    from deltafs.journal import ATTRS, CONTENT, MOVED
    j, a, b, f = _tree(tmp_path)
    for i in range(50):
        ino = j.insert(parent=b, name=f"g{i}.bin", mode=FILE, size=1)
        j.set_dirty(ino, CONTENT | ATTRS)
    assert not j.any_moved()
    seen = _statements(j)
    before = j.moves_marked
    j.set_dirty(f, MOVED)
    assert j.moves_marked == before + 1
    assert j.any_moved()
    assert "INDEXED BY nodes_dirty" in seen[-1]
    j.x("UPDATE nodes SET dirty = dirty & ~? WHERE ino=?", (MOVED, f))
    assert not j.any_moved()
    j.set_dirty(a, MOVED | CONTENT)  # a directory's rename too
    assert j.any_moved() and j.moves_marked == before + 2
    j.update(b, dirty=MOVED | CONTENT)  # the publish of a row renamed meanwhile
    assert j.moves_marked == before + 3
    j.update(b, dirty=CONTENT)
    assert j.moves_marked == before + 3


def test_writes_in_flight_are_recorded_until_their_result_is(tmp_path: Path) -> None:
    """A write about to start is in the journal, and the journal says it must be
    committed first (the writeback then commits it, with its fsync, before the write
    goes out: another connection reads it, as a kill -9 or a power loss would); it stays
    until its result is recorded or the row goes. Recording it again adds nothing, but a
    commit that failed still leaves it to commit."""
    import sqlite3

    j, a, b, f = _tree(tmp_path)
    j.commit()
    assert not j.has_attempts(f) and j.attempts_of(f) == []
    assert j.add_attempts(f, [("a/b/f.bin", "sha256:aa"), ("a/b/f.bin.delta", "sha256:aa")])
    assert j.add_attempts(b, [("a/b/", None)])
    j.commit()
    other = sqlite3.connect(str(tmp_path / "state.db"))
    assert sorted(other.execute("SELECT ino, object_key, guard FROM attempts")) == [
        (b, "a/b/", ""), (f, "a/b/f.bin", "sha256:aa"), (f, "a/b/f.bin.delta", "sha256:aa")]
    assert not j.add_attempts(f, [("a/b/f.bin", "sha256:aa")])  # nothing new to commit
    assert j.add_attempts(f, [("a/b/f.bin", "sha256:bb")])  # a later version: both kept
    assert j.add_attempts(f, [("a/b/f.bin", "sha256:bb")])  # not committed yet: still says so
    j.commit()
    assert j.attempts_of(f) == [("a/b/f.bin", "sha256:aa"), ("a/b/f.bin", "sha256:bb"),
                                ("a/b/f.bin.delta", "sha256:aa")]
    assert j.attempts_of(b) == [("a/b/", None)]
    j.drop_attempts(f, ["a/b/f.bin.delta"])  # left to a tombstone by a rename
    assert j.attempts_of(f) == [("a/b/f.bin", "sha256:aa"), ("a/b/f.bin", "sha256:bb")]
    j.drop_attempts(f)
    assert not j.has_attempts(f) and j.has_attempts(b)
    j.delete(b)  # a row reaped: its attempts go with it
    assert not j.has_attempts(b)
    j.add_attempts(f, [("a/b/f.bin", "sha256:cc")])
    j.x("DELETE FROM nodes WHERE ino=?", (f,))  # as recover() drops orphans, raw
    j.commit()
    j.close()
    other.close()
    j = Journal(tmp_path / "state.db", "s3://b/")  # the next start drops what is left
    assert not j.has_attempts(f)


def test_a_commit_written_out_but_not_yet_fsynced_is_not_taken_for_durable(
        tmp_path: Path) -> None:
    """The filesystem writes a commit out on its loop and fsyncs it in a worker: in
    between (or when that fsync failed) no transaction is open, yet nothing is durable.
    An upload's attempt rows must then still be committed before its write starts."""
    j = Journal(tmp_path / "state.db", "s3://b/")
    ino = j.insert(parent=ROOT_INO, name="a", mode=0o100644)
    assert j.add_attempts(ino, [("a", None)]) is True
    j.write_out()
    assert not j.db.in_transaction and j.needs_sync
    # the same attempt again: no change, no transaction open, but not durable yet
    assert j.add_attempts(ino, [("a", None)]) is True
    j.write_out()
    j.make_durable()
    assert not j.needs_sync
    assert j.add_attempts(ino, [("a", None)]) is False
    j.commit()
    j.write_out()  # nothing open: nothing written, nothing to sync
    assert not j.needs_sync
    j.close()


def test_a_commit_that_holds_the_lock_past_the_threshold_is_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The daemon sets ``slow_hold`` to the slow-step log's threshold (the journal reads
    no environment of its own); by default only a loop-stall-sized hold is logged."""
    j, *_ = _tree(tmp_path)
    assert j.slow_hold == 0.25
    j.insert(parent=ROOT_INO, name="quick", mode=FILE)
    with caplog.at_level("WARNING", logger="deltafs.journal"):
        j.commit()
    assert "journal commit took" not in caplog.text
    j.slow_hold = 0.0  # every commit is slow by this measure
    j.insert(parent=ROOT_INO, name="slow", mode=FILE)
    with caplog.at_level("WARNING", logger="deltafs.journal"):
        j.commit()
    assert "journal commit took" in caplog.text
    # with what it wrote to the WAL: a large transaction, a restart and a cut differ
    import re

    m = re.search(r"WAL frames (\d+) -> (\d+), WAL file (\d+\.\d) MiB", caplog.text)
    assert m is not None and int(m[2]) > int(m[1]), caplog.text
    j.close()


def test_a_commit_cancelled_between_its_halves_is_still_made_durable(
        tmp_path: Path) -> None:
    """``Contents.commit`` writes out on the loop, then fsyncs in a worker, shielded: a
    cancellation that arrives during the fsync (a handler interrupted, the mount torn
    down) must not leave a commit written out but never made durable, nor remove the
    files the durable state still points to before it is. (It fails if the fsync is
    awaited abandonably, ``abandon_on_cancel=True``, without the shield.)"""
    import threading
    import time as _time

    import trio

    from deltafs.content import Contents

    j, *_ = _tree(tmp_path)
    contents = Contents(j, None, None, tmp_path)  # type: ignore[arg-type] - commit only
    old = tmp_path / "old-staging"
    old.write_bytes(b"x")
    contents.drop_after_commit(str(old))
    synced = threading.Event()
    durable = j.make_durable

    def slow_durable() -> None:
        _time.sleep(0.3)  # the cancellation arrives meanwhile
        durable()
        synced.set()

    j.make_durable = slow_durable  # type: ignore[method-assign]
    j.insert(parent=ROOT_INO, name="new", mode=FILE)

    async def main() -> None:
        with trio.move_on_after(0.05):
            await contents.commit()

    trio.run(main)
    assert synced.is_set(), "the fsync did not run to its end"
    assert not j.needs_sync
    # the cancellation came while the shield held: commit() finished, then the
    # scope noticed; the file dropped after the commit was removed only after it
    assert not old.exists()
    j.close()


def test_every_hold_of_the_lock_is_counted_for_the_slow_step_log(tmp_path: Path) -> None:
    """The slow-step log tells a step that waited for the journal's lock from one that
    waited in SQLite by ``Journal.timing``: the methods that hold the lock across several
    statements count too, not only :meth:`Journal.x`."""
    j = Journal(tmp_path / "state.db", "s3://b/")
    d = j.insert(parent=ROOT_INO, name="d", mode=stat.S_IFDIR | 0o755)
    calls = [  # (what, holds it counts at least: insert_many writes the next inode too)
        (lambda: j.insert_many([dict(parent=d, name=f"f{i}", mode=stat.S_IFREG | 0o644)
                                for i in range(3)]), 2),
        (lambda: j.add_attempts(d, [("d/x", None)]), 1),
        (lambda: j.drop_attempts(d, ["d/x"]), 1),
        (lambda: (j.forget_paths(), j.path(d)), 1),
    ]
    for call, holds in calls:
        before = list(j.timing)
        call()
        assert j.timing[2] >= before[2] + holds and j.timing[1] > before[1], (before, j.timing)
    j.close()


def test_no_statement_is_left_open_on_the_connection_a_worker_checkpoints(tmp_path: Path) -> None:
    """``x`` reads every row under the lock: a cursor handed back, half read, kept a
    statement open on the connection, so the worker's checkpoint under the lock was
    refused (SQLITE_LOCKED; with the loop stepping that cursor at the same moment, the
    error read back as "not an error") and a flush failed with EIO (scale run 11)."""
    import threading

    j = Journal(tmp_path / "state.db", "s3://b/")
    for i in range(20):
        j.insert(parent=ROOT_INO, name=f"f{i}", mode=0o100644)
    j.commit()
    rows = j.x("SELECT ino FROM nodes ORDER BY ino")
    assert rows.fetchone() is not None  # half read, as `.fetchone()` callers leave it
    j._restart_wal = True  # noqa: SLF001  (a checkpoint is due)
    errors: list[BaseException] = []

    def durable() -> None:
        try:
            j.make_durable()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=durable)
    t.start()
    t.join()
    assert not errors
    assert not j._restart_wal, "the checkpoint was refused (a statement left open)"  # noqa: SLF001
    assert len(rows.fetchall()) == 21
    j.close()
