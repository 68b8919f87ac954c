"""The codec's memory budget: more work than fits waits its turn, in order, and nothing
fails; what cannot fit at all runs alone; the codec narrows its windows to fit."""
from __future__ import annotations

import hashlib
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from deltafs import codec, membudget
from deltafs.membudget import Budget
from mountfixtures import deltafs_exe

MiB = 1 << 20


def _wait_until(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class Holder(threading.Thread):
    """Holds ``need`` of ``budget`` until released."""

    def __init__(self, budget: Budget, need: int, order: list[str], name: str,
                 first: bool = False) -> None:
        super().__init__(daemon=True)
        self.budget, self.need, self.order, self.label = budget, need, order, name
        self.first = first
        self.release = threading.Event()
        self.holding = threading.Event()

    def run(self) -> None:
        with self.budget.hold(self.need, self.label, first=self.first):
            self.order.append(self.label)
            self.holding.set()
            self.release.wait(10)


def test_more_than_fits_waits_in_arrival_order() -> None:
    b = Budget(100 * MiB, rss=lambda: 0)
    order: list[str] = []
    a = Holder(b, 60 * MiB, order, "a")
    a.start()
    a.holding.wait(5)
    big = Holder(b, 60 * MiB, order, "big")
    big.start()
    _wait_until(lambda: len(b._queue) == 1)  # noqa: SLF001
    small = Holder(b, 10 * MiB, order, "small")
    small.start()
    _wait_until(lambda: len(b._queue) == 2)  # noqa: SLF001
    # "small" would fit beside "a", but "big" came first: nobody jumps the queue
    time.sleep(0.2)
    assert order == ["a"] and b.status()["codec_waiting"] == 2
    a.release.set()
    big.holding.wait(5)
    small.holding.wait(5)  # fits beside "big" (70 MiB of 100)
    assert order == ["a", "big", "small"]
    assert b.held == 70 * MiB and b.children == 2
    big.release.set()
    small.release.set()
    big.join(5)
    small.join(5)
    st = b.status()
    assert st["codec_held"] == 0 and st["codec_children"] == 0 and st["codec_waiting"] == 0
    assert st["codec_waits"] == 2 and st["codec_peak_held"] == 70 * MiB
    assert st["codec_alone"] == 0


def test_what_can_never_fit_runs_alone() -> None:
    b = Budget(100 * MiB, rss=lambda: 0)
    order: list[str] = []
    a = Holder(b, 30 * MiB, order, "a")
    a.start()
    a.holding.wait(5)
    huge = Holder(b, 300 * MiB, order, "huge")
    huge.start()
    time.sleep(0.2)
    assert order == ["a"]  # waits for the others to finish, not forever
    a.release.set()
    huge.holding.wait(5)
    assert order == ["a", "huge"] and b.held == 300 * MiB
    after = Holder(b, 1 * MiB, order, "after")
    after.start()
    time.sleep(0.2)
    assert order == ["a", "huge"]  # nothing runs beside it
    huge.release.set()
    after.holding.wait(5)
    after.release.set()
    after.join(5)
    assert b.status()["codec_alone"] == 1 and b.held == 0


def test_the_daemons_own_rss_comes_off_the_top() -> None:
    rss = [40 * MiB]
    b = Budget(100 * MiB, rss=lambda: rss[0])
    assert b.room() == 60 * MiB
    rss[0] = 95 * MiB
    assert b.room() == membudget.MIN_ROOM  # a child always gets some room
    assert Budget(None).room() > 1 << 40


def test_a_failing_child_gives_its_share_back() -> None:
    b = Budget(100 * MiB, rss=lambda: 0)
    with pytest.raises(RuntimeError):
        with b.hold(50 * MiB, "x"):
            raise RuntimeError("xdelta3 died")
    assert b.held == 0 and b.children == 0


def test_unbounded_budget_counts_but_never_waits() -> None:
    b = Budget(None)
    with b.hold(10 << 30, "x"), b.hold(10 << 30, "y"):
        assert b.children == 2
    assert b.held == 0 and b.status()["codec_waits"] == 0


# ------------------------------------------------------------------ the codec's side

def test_footprint_model_matches_measurements() -> None:
    """The model against peak RSS measured with /usr/bin/time (docs/performance.md):
    within 10 % or 4 MiB, and never under by more than that."""
    cases = [  # (window, ref, size, level, measured MB)
        (64 * MiB, 15 * MiB, 15 * MiB, 6, 103.6),
        (32 * MiB, 15 * MiB, 15 * MiB, 6, 71.6),
        (16 * MiB, 15 * MiB, 15 * MiB, 3, 47.7),
        (64 * MiB, 190 * MiB, 190 * MiB, 3, 120.5),
        (16 * MiB, 190 * MiB, 190 * MiB, 3, 48.4),
        (64 * MiB, 8192, 8292, 6, 67.2),
        (64 * MiB, 8192, 8292, 3, 35.2),
        # fed through a pipe as the daemon does (VmRSS sampled over the child): -W
        # follows the target's size (8 KiB at -W 4 MiB took 20.0 MB)
        (512 << 10, 8192, 8192, 3, 3.7),
        (512 << 10, 100_000, 100_000, 3, 4.5),
        (1 * MiB, 1 * MiB, 1 * MiB, 3, 10.3),
        (2944 << 10, 3_000_000, 3_000_000, 3, 28.4),
    ]
    for window, ref, size, level, mb in cases:
        got = codec.encode_footprint(window, ref, size, level) / 1e6
        assert abs(got - mb) <= max(0.1 * mb, 4.2), (window >> 20, ref, level, got, mb)
    assert abs(codec.decode_footprint(190 * MiB) / 1e6 - 71.9) < 4
    assert abs(codec.decode_footprint(190 * MiB, 16 * MiB) / 1e6 - 23.9) < 4
    assert abs(codec.decode_footprint(15 * MiB) / 1e6 - 21.3) < 4


def test_windows_narrow_to_fit_but_not_below_the_floor() -> None:
    ref = size = 200 * MiB
    assert codec.fit_encode(64 * MiB, ref, size, 3, 1 << 40) == 64 * MiB
    w = codec.fit_encode(64 * MiB, ref, size, 3, 60 * MiB)
    assert w == 16 * MiB and codec.encode_footprint(w, ref, size, 3) <= 60 * MiB
    assert codec.fit_encode(64 * MiB, ref, size, 3, 1 * MiB) == codec.MIN_FIT_WINDOW
    # a small file's window is already its reference's size: never narrowed further
    assert codec.fit_encode(512 << 10, 8192, 8192, 6, 1 * MiB) == 512 << 10
    assert codec.fit_decode(ref, 1 << 40) == codec.DECODE_WINDOW
    assert codec.fit_decode(ref, 30 * MiB) == 16 * MiB
    assert codec.fit_decode(ref, 1) == codec.MIN_DECODE_WINDOW


@pytest.fixture
def small_budget() -> object:
    """The process budget at 40 MiB with the test process's RSS left out."""
    old = membudget.current()
    b = Budget(40 * MiB, rss=lambda: 0)
    membudget._current = b  # noqa: SLF001
    yield b
    membudget._current = old  # noqa: SLF001


def test_encode_and_decode_under_a_small_budget(tmp_path: Path, small_budget: Budget,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """A 24 MiB file against its previous version with 40 MiB of room: the encode runs at
    a narrower window (the changes stay in place, so the delta is as small), the decode
    too, and the bytes come back exact."""
    rng = random.Random(5)
    ref = tmp_path / "ref"
    tgt = tmp_path / "tgt"
    data = bytearray(rng.randbytes(24 * MiB))
    ref.write_bytes(data)
    for _ in range(20):
        at = rng.randrange(len(data) - 4096)
        data[at:at + 4096] = rng.randbytes(4096)
    tgt.write_bytes(data)
    caplog.set_level("DEBUG", logger="deltafs.codec")
    res = codec.encode(ref, tgt, tmp_path / "d", limits=codec.Limits(level=6))
    assert res.delta_size is not None and res.delta_size < 200_000
    assert "-B 8 MiB instead of 64" in caplog.text or "-B 16 MiB instead of 64" in caplog.text
    assert small_budget.peak_held <= 40 * MiB and small_budget.held == 0
    out = tmp_path / "out"
    codec.decode(ref, tmp_path / "d", out, codec.sha256_file(tgt))
    assert out.read_bytes() == bytes(data)
    assert small_budget.children == 0 and small_budget.peak_held <= 40 * MiB


# ------------------------------------------------------------------ through a mount

def _xdelta3_children(pid: int) -> int:
    n = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == pid and comm == "xdelta3":
            n += 1
    return n


def test_a_mount_with_a_small_memory_limit_queues_its_encodes(
        moto_server: str, bucket: str, tmp_path: Path, fuse_tools: None) -> None:
    """``--memory-limit 48M`` (less than the daemon alone): six versions of a 6 MiB file
    closed at once still all upload, one xdelta3 at a time (each needs more than the room
    left), the status shows the waits, and a fresh cache reads every byte back."""
    from mountfixtures import Mount, _live, release_versions, sha_of

    versions = release_versions(7, 6 * MiB, seed=11)
    for m in _live(Mount(bucket, moto_server, tmp_path / "d",
                         extra_args=["--memory-limit", "48M"])):
        d = m.mountpoint / "rel"
        d.mkdir()
        (d / "base.bin").write_bytes(versions[0])
        m.wait_idle()
        seen = [0]
        stop = threading.Event()

        def sample() -> None:
            assert m.pid is not None
            while not stop.is_set():
                seen[0] = max(seen[0], _xdelta3_children(m.pid))
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        names = [f"build-{c}.bin" for c in "abcdef"]  # no digits: none waits for another
        files = [open(d / n, "wb") for n in names]
        for f, data in zip(files, versions[1:]):
            f.write(data)
        for f in files:
            f.close()
        st = m.wait_idle(timeout=120)
        stop.set()
        sampler.join(5)
        mem = st["memory"]
        assert mem["limit"] == 48 * MiB, mem
        assert st["failed_files"] == 0 and not st["last_error"], st
        assert mem["codec_children"] == 0 and mem["codec_held"] == 0, mem
        assert mem["codec_alone"] >= 6 and mem["codec_waits"] >= 1, mem
        # never two at once: the sampler (when it was scheduled: the test may run niced
        # on a busy machine) and the accounting, which holds every child (two encodes
        # here would hold 76 MiB or more)
        assert seen[0] <= 1, f"{seen[0]} xdelta3 ran at once under the memory limit"
        assert mem["codec_peak_held"] < 60 * MiB, mem
        deltas = [k for k in m.client.list_objects_v2(Bucket=bucket, Prefix="rel/").get(
            "Contents", []) if k["Key"].endswith(".delta")]
        assert len(deltas) >= 6, deltas
        text = subprocess.run([*deltafs_exe(), "status", str(m.mountpoint)],
                              capture_output=True, text=True, timeout=30).stdout
        assert "memory:   limit 48.0MB" in text, text
        m.remount(wipe_cache=True)
        for n, data in zip(["base.bin", *names], versions):
            assert sha_of(d / n) == hashlib.sha256(data).hexdigest(), n
        assert m.status()["failed_files"] == 0


def test_decodes_go_before_queued_encodes() -> None:
    """A reader waits on a decode; an encode is background work: a decode that arrives
    while encodes wait is served before them (and decodes keep their own order)."""
    b = Budget(100 * MiB, rss=lambda: 0)
    order: list[str] = []
    running = Holder(b, 90 * MiB, order, "running")
    running.start()
    running.holding.wait(5)
    waiters = [Holder(b, 80 * MiB, order, name, first) for name, first in
               (("enc1", False), ("enc2", False), ("dec1", True), ("dec2", True))]
    for n, t in enumerate(waiters, start=1):
        t.start()
        _wait_until(lambda n=n: len(b._queue) == n)  # noqa: SLF001
    running.release.set()
    for t in (waiters[2], waiters[3], waiters[0], waiters[1]):
        t.holding.wait(5)
        t.release.set()
    assert order == ["running", "dec1", "dec2", "enc1", "enc2"]


def test_a_compressed_source_keeps_the_full_decode_window(tmp_path: Path,
                                                         small_budget: Budget) -> None:
    """Found by review: xdelta3 decompresses a gzip source through a pipe it cannot
    seek, so a decode narrowed below the encoder's window fails. Without -D a compressed
    source gets the default window (and its footprint is held); the bytes come back."""
    import gzip

    rng = random.Random(8)
    raw = rng.randbytes(30 * MiB)
    ref = tmp_path / "ref.gz"
    ref.write_bytes(gzip.compress(raw, 1))
    tgt = tmp_path / "tgt"
    tgt.write_bytes(raw[15 * MiB:] + raw[:15 * MiB])  # copies from far back in the source
    delta = tmp_path / "d"
    subprocess.run(["xdelta3", "-e", "-f", "-B", str(32 * MiB), "-s", str(ref), str(tgt),
                    str(delta)], check=True)  # no -D: DeltaGlider's way with a .gz
    # room 32 MiB (the floor): a plain source of this size would be decoded at -B 16 MiB
    out = tmp_path / "out"
    codec.decode(ref, delta, out, codec.sha256_file(tgt))
    assert out.read_bytes() == tgt.read_bytes()
    assert small_budget.peak_held >= codec.DECODE_WINDOW


def test_a_background_decode_queues_behind_opens_and_with_encodes() -> None:
    """A read-ahead's rebuild (membudget.background()) is work nobody waits for: its
    decode queues like an encode, so a real open's decode that arrives later still goes
    first, and it never jumps ahead of an upload's encode already waiting."""
    b = Budget(100 * MiB, rss=lambda: 0)
    order: list[str] = []

    class Background(Holder):
        def run(self) -> None:
            with membudget.background():
                super().run()

    running = Holder(b, 90 * MiB, order, "running")
    running.start()
    running.holding.wait(5)
    waiters = [Holder(b, 80 * MiB, order, "enc", False),
               Background(b, 80 * MiB, order, "read-ahead", True),
               Holder(b, 80 * MiB, order, "open", True)]
    for n, t in enumerate(waiters, start=1):
        t.start()
        _wait_until(lambda n=n: len(b._queue) == n)  # noqa: SLF001
    running.release.set()
    for t in (waiters[2], waiters[0], waiters[1]):
        t.holding.wait(5)
        t.release.set()
    assert order == ["running", "open", "enc", "read-ahead"]
