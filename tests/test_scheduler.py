"""The upload scheduler's pass over the dirty rows: bounded per pass, yet every row gets
its turn, and a directory's reference is still seeded by its first file (issue 11: a
pass that re-read thousands of rows waiting on a series' encodes stalled the loop)."""
from __future__ import annotations

import stat
from pathlib import Path
from typing import Any, Iterator

import pytest
import trio

from deltafs import writeback as wb
from deltafs.journal import ROOT_INO, Journal

FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


class _Nursery:
    """Records what the pass starts instead of running it."""

    def __init__(self) -> None:
        self.started: list[int] = []

    def start_soon(self, fn: Any, ino: Any, *args: Any) -> None:
        if getattr(fn, "__name__", "") == "_sync_node":
            self.started.append(ino)


@pytest.fixture
def fs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from deltafs.fs import DeltaFS, Options
    from deltafs.store.local import LocalStore
    from deltafs.wiring import make_engine

    monkeypatch.setattr(wb, "SCHEDULE_PAGE", 2)
    monkeypatch.setattr(wb, "SCAN_HEAD", 4)
    monkeypatch.setattr(wb, "SCAN_WINDOW", 4)
    store = LocalStore(tmp_path / "store", create=True)
    engine = make_engine(store, tmp_path / "cache")
    journal = Journal(tmp_path / "state.db", "/x/store")
    try:
        yield DeltaFS(engine, journal, engine.cache, "", tmp_path / "files", Options(),
                      "/x/store")
    finally:
        journal.close()


def _files(fs: Any, parent: int, n: int, size: int) -> list[int]:
    return [fs.journal.insert(parent=parent, name=f"f{i:03d}", mode=FILE, size=size,
                              dirty=1, sha256=f"{i:064x}", staged=f"/nonexistent/{i}")
            for i in range(n)]


def _pass(fs: Any) -> tuple[list[int], int]:
    nursery = _Nursery()
    fs.writeback._rows_read = 0

    async def run() -> None:
        await fs.writeback._schedule(nursery)

    trio.run(run)
    fs.writeback._active.clear()
    return nursery.started, fs.writeback._rows_read


def test_a_pass_reads_a_bounded_window_and_every_row_gets_its_turn(fs: Any) -> None:
    small = fs.engine.policy.min_delta_size - 1  # no reference, no chain: just files
    d = fs.journal.insert(parent=ROOT_INO, name="d", mode=DIR)
    inos = _files(fs, d, 20, small)
    waiting = set(inos[:16])  # e.g. versions waiting for an encode
    fs.writeback._blocked = lambda node: node.ino in waiting
    started: list[int] = []
    for _ in range(4):
        got, read = _pass(fs)
        assert read <= wb.SCAN_HEAD + wb.SCAN_WINDOW
        started += got
    assert started == inos[16:]
    # the window came round: the head is looked at on every pass, the rest in turn
    waiting.clear()
    got, _ = _pass(fs)
    assert got and got[0] == inos[0]


def test_a_reference_is_seeded_by_the_first_file_though_met_in_the_window(fs: Any) -> None:
    big = fs.engine.policy.min_delta_size
    d = fs.journal.insert(parent=ROOT_INO, name="d", mode=DIR)
    e = fs.journal.insert(parent=ROOT_INO, name="e", mode=DIR)
    filler = _files(fs, d, 6, big - 1)
    first, second = _files(fs, e, 2, big)
    # the head (4 rows) and the window (4 rows): e's second file may come into a window
    # that starts after e's first; it must not seed e's reference
    fs.writeback._blocked = lambda node: node.ino in filler or node.ino == first
    fs.writeback._scan_after = first
    got, _ = _pass(fs)
    assert second not in got
    # once the first is not held back it goes, alone
    fs.writeback._blocked = lambda node: node.ino in filler
    fs.writeback._scan_after = 0
    got, _ = _pass(fs)
    assert got == [first]


def test_an_older_file_that_failed_for_good_does_not_hold_back_the_window(fs: Any) -> None:
    """As in the head: only an older candidate that may still go (staged, not failed for
    good) owns a directory's seeding."""
    from deltafs.writeback import _signature

    big = fs.engine.policy.min_delta_size
    d = fs.journal.insert(parent=ROOT_INO, name="d", mode=DIR)
    e = fs.journal.insert(parent=ROOT_INO, name="e", mode=DIR)
    filler = _files(fs, d, 6, big - 1)
    first, second = _files(fs, e, 2, big)
    fs.writeback._blocked = lambda node: node.ino in filler
    row = fs.journal.get(first)
    fs.writeback.state.failed[first] = "refused"
    fs.writeback.state.failed_sig[first] = _signature(row)
    fs.writeback._scan_after = first
    got, _ = _pass(fs)
    assert got == [second]
