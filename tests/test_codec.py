"""xdelta3 through deltafs.codec: round trips, the early give-up, verified decodes."""
from __future__ import annotations

import builtins
import errno
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from deltafs import codec
from deltafs.errors import CodecError, IntegrityError
from helpers import MiB, next_version, sha256_bytes, sha256_file, write_file


class _CountingReader:
    """A file object wrapper that counts the bytes read through it."""

    def __init__(self, f: Any, counter: list[int]) -> None:
        self._f = f
        self._counter = counter

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._counter[0] += len(data)
        return data

    def __enter__(self) -> "_CountingReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def test_round_trip(tmp_path: Path) -> None:
    """A related file encodes small and decodes byte-identical, verified."""
    rng = random.Random(1)
    base = rng.randbytes(3 * MiB)
    target = next_version(next_version(base, rng), rng)
    src = write_file(tmp_path / "src", base)
    tgt = write_file(tmp_path / "tgt", target)
    delta = tmp_path / "delta"
    res = codec.encode(src, tgt, delta)
    assert res.delta_size is not None, res.reason
    assert res.delta_size == delta.stat().st_size
    assert res.delta_size < 64 * 1024, res.delta_size
    assert "-D" in res.command and "-s reference.bin" in res.command
    out = tmp_path / "out"
    codec.decode(src, delta, out, sha256_bytes(target))
    assert sha256_file(out) == sha256_bytes(target)


def test_zero_diff_round_trip(tmp_path: Path) -> None:
    """A file against itself (the seeding file's delta) is tiny and exact."""
    data = random.Random(2).randbytes(2 * MiB)
    src = write_file(tmp_path / "src", data)
    delta = tmp_path / "delta"
    res = codec.encode(src, src, delta, full_window=False)
    assert res.delta_size is not None and res.delta_size < 4096
    out = tmp_path / "out"
    codec.decode(src, delta, out, sha256_bytes(data))
    assert out.read_bytes() == data


def test_round_trip_empty_target(tmp_path: Path) -> None:
    src = write_file(tmp_path / "src", b"abc" * 1000)
    tgt = write_file(tmp_path / "tgt", b"")
    delta = tmp_path / "delta"
    res = codec.encode(src, tgt, delta)
    assert res.delta_size is not None
    out = tmp_path / "out"
    codec.decode(src, delta, out, sha256_bytes(b""))
    assert out.read_bytes() == b""


def test_small_files_get_a_small_window_and_the_same_delta(tmp_path: Path) -> None:
    """xdelta3 allocates all of -B: a small file's encode uses a window just over its
    reference (not 64 MiB of RAM), and the delta is byte-identical to the default's."""
    rng = random.Random(1)
    ref = rng.randbytes(3 << 20)
    new = ref[:1000] + rng.randbytes(500) + ref[1500:2 << 20] + ref[:100_000]
    (tmp_path / "r").write_bytes(ref)
    (tmp_path / "t").write_bytes(new)
    w = codec.encode_window(len(ref), len(new), True, 1 << 30)
    assert w == 3 << 20
    assert codec.encode_window(8192, 8192, False, 1 << 30) == codec.MIN_SOURCE_WINDOW
    assert codec.encode_window(16 << 20, 16 << 20, False, 1 << 30) == \
        codec.DEFAULT_SOURCE_WINDOW
    res = codec.encode(tmp_path / "r", tmp_path / "t", tmp_path / "d")
    assert res.delta_size is not None and f"-B {w} " in res.command
    with pytest.MonkeyPatch.context() as mp:  # the same encode at the 64 MiB default
        mp.setattr(codec, "encode_window", lambda *a: codec.DEFAULT_SOURCE_WINDOW)
        wide = codec.encode(tmp_path / "r", tmp_path / "t", tmp_path / "d64")
    assert f"-B {codec.DEFAULT_SOURCE_WINDOW} " in wide.command
    default = (tmp_path / "d64").read_bytes()
    assert (tmp_path / "d").read_bytes() == default
    out = tmp_path / "o"
    codec.decode(tmp_path / "r", tmp_path / "d", out, sha256_bytes(new))
    assert out.read_bytes() == new


def test_small_targets_get_a_small_target_window_and_the_same_delta(tmp_path: Path) -> None:
    """Fed through a pipe, xdelta3 sizes its buffers from -W, not from the target (an
    8 KiB file's encode took 20 MB at -W 4 MiB): a target that fits in one window gets
    a window just over its size, and its delta is byte-identical to the 4 MiB one's."""
    rng = random.Random(2)
    for size in (4000, 8192, 100_000, (1 << 20) + 1):
        ref = rng.randbytes(size)
        new = bytearray(ref)
        for _ in range(5):
            new[rng.randrange(size)] = rng.randrange(256)
        (tmp_path / "r").write_bytes(ref)
        (tmp_path / "t").write_bytes(bytes(new))
        w = codec.target_window(size)
        assert codec.MIN_TARGET_WINDOW <= w <= codec.TARGET_WINDOW and (w >= size or
                                                                       w == codec.TARGET_WINDOW)
        res = codec.encode(tmp_path / "r", tmp_path / "t", tmp_path / "d")
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(codec, "target_window", lambda n: codec.TARGET_WINDOW)
            codec.encode(tmp_path / "r", tmp_path / "t", tmp_path / "d4")
        assert res.delta_size is not None
        assert (tmp_path / "d").read_bytes() == (tmp_path / "d4").read_bytes(), size
        out = tmp_path / "o"
        codec.decode(tmp_path / "r", tmp_path / "d", out, sha256_bytes(bytes(new)))
        assert out.read_bytes() == new
    assert codec.target_window(64 << 20) == codec.TARGET_WINDOW


def test_source_window() -> None:
    assert codec.source_window(1000) == codec.DEFAULT_SOURCE_WINDOW
    assert codec.source_window(64 << 20) == codec.DEFAULT_SOURCE_WINDOW
    assert codec.source_window((64 << 20) + 1) == 65 << 20
    assert codec.source_window(160 << 20) == 160 << 20


def test_give_up_on_unrelated_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unrelated random data: the encode gives up (delta_size None, no output left) before
    it has read the whole 20 MB target."""
    size = 20 * MiB
    src = write_file(tmp_path / "src", random.Random(3).randbytes(size))
    tgt = write_file(tmp_path / "tgt", random.Random(4).randbytes(size))
    delta = tmp_path / "delta"

    consumed = [0]
    real_open = builtins.open

    def counting_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(file, mode, *args, **kwargs)
        if Path(file) == tgt and "r" in mode:
            return _CountingReader(f, consumed)
        return f

    monkeypatch.setattr(codec, "open", counting_open, raising=False)
    t0 = time.monotonic()
    res = codec.encode(src, tgt, delta)
    gave_up_after = time.monotonic() - t0
    monkeypatch.undo()

    assert res.delta_size is None
    assert res.reason, "a give-up must say why"
    assert "similarity" in res.reason or "of the file" in res.reason, res.reason
    assert not delta.exists(), "the partial delta must be removed"
    assert 0 < consumed[0] < size, f"read {consumed[0]} of {size} bytes before giving up"
    print(f"give-up after {gave_up_after:.2f}s, {consumed[0] >> 20} MiB read: {res.reason}")


def test_give_up_is_faster_than_full_encode(tmp_path: Path) -> None:
    """The give-up costs clearly less than paying for the whole encode."""
    size = 20 * MiB
    src = write_file(tmp_path / "src", random.Random(5).randbytes(size))
    tgt = write_file(tmp_path / "tgt", random.Random(6).randbytes(size))
    delta = tmp_path / "delta"
    t0 = time.monotonic()
    quick = codec.encode(src, tgt, delta)
    t_quick = time.monotonic() - t0
    t0 = time.monotonic()
    full = codec.encode(src, tgt, delta,
                        limits=codec.Limits(max_ratio=100.0, hopeless_ratio=100.0))
    t_full = time.monotonic() - t0
    assert quick.delta_size is None
    assert full.delta_size is not None and full.delta_size > size * 0.9
    print(f"give-up {t_quick:.2f}s vs full encode {t_full:.2f}s")
    assert t_quick < 0.85 * t_full, (t_quick, t_full)


def test_small_unrelated_file_discarded(tmp_path: Path) -> None:
    """Below the probe size only the final ratio decides: still None, nothing left."""
    src = write_file(tmp_path / "src", random.Random(7).randbytes(MiB))
    tgt = write_file(tmp_path / "tgt", random.Random(8).randbytes(MiB))
    delta = tmp_path / "delta"
    res = codec.encode(src, tgt, delta)
    assert res.delta_size is None
    assert not delta.exists()


def test_decode_wrong_sha_raises_and_leaves_nothing(tmp_path: Path) -> None:
    rng = random.Random(9)
    base = rng.randbytes(MiB)
    target = next_version(base, rng)
    src = write_file(tmp_path / "src", base)
    tgt = write_file(tmp_path / "tgt", target)
    delta = tmp_path / "delta"
    assert codec.encode(src, tgt, delta).delta_size is not None
    out = tmp_path / "out"
    with pytest.raises(IntegrityError) as exc:
        codec.decode(src, delta, out, "0" * 64)
    assert "SHA-256" in str(exc.value)
    assert "\n" not in str(exc.value)
    assert not out.exists()


def test_decode_garbage_delta_raises_and_leaves_nothing(tmp_path: Path) -> None:
    src = write_file(tmp_path / "src", random.Random(10).randbytes(MiB))
    delta = write_file(tmp_path / "delta", b"this is not a vcdiff stream" * 100)
    out = tmp_path / "out"
    with pytest.raises(IntegrityError):
        codec.decode(src, delta, out, "0" * 64)
    assert not out.exists()


def test_decode_against_wrong_source_raises(tmp_path: Path) -> None:
    rng = random.Random(11)
    base = rng.randbytes(MiB)
    target = next_version(base, rng)
    src = write_file(tmp_path / "src", base)
    tgt = write_file(tmp_path / "tgt", target)
    delta = tmp_path / "delta"
    assert codec.encode(src, tgt, delta).delta_size is not None
    other = write_file(tmp_path / "other", rng.randbytes(MiB))
    out = tmp_path / "out"
    with pytest.raises(IntegrityError):
        codec.decode(other, delta, out, sha256_bytes(target))
    assert not out.exists()


def test_missing_binary_on_encode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTAFS_XDELTA3", "/nonexistent")
    src = write_file(tmp_path / "src", b"a" * 1000)
    with pytest.raises(CodecError) as exc:
        codec.encode(src, src, tmp_path / "delta")
    assert "xdelta3 not found" in str(exc.value)
    with pytest.raises(CodecError, match="xdelta3 not found"):
        codec.xdelta3_path()


def test_missing_binary_on_decode_is_codec_error(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing xdelta3 at decode time is a CodecError ("xdelta3 not found", exit 9),
    not an IntegrityError claiming the stored data is corrupt (exit 8)."""
    rng = random.Random(12)
    base = rng.randbytes(MiB)
    target = next_version(base, rng)
    src = write_file(tmp_path / "src", base)
    tgt = write_file(tmp_path / "tgt", target)
    delta = tmp_path / "delta"
    assert codec.encode(src, tgt, delta).delta_size is not None
    monkeypatch.setenv("DELTAFS_XDELTA3", "/nonexistent")
    out = tmp_path / "out"
    with pytest.raises(CodecError) as exc:
        codec.decode(src, delta, out, sha256_bytes(target))
    assert "xdelta3 not found" in str(exc.value)
    assert not out.exists()


def test_sha256_file(tmp_path: Path) -> None:
    data = random.Random(13).randbytes(3 * MiB + 17)
    assert codec.sha256_file(write_file(tmp_path / "f", data)) == sha256_bytes(data)


def test_decode_hands_the_cache_its_block_sums(tmp_path: Path) -> None:
    """The sums a decode computes on the way are the ones the cache would compute from
    the file (sizes around the block size, and the cache's block is the codec's)."""
    from deltafs import cache

    assert codec.SUM_BLOCK == cache.BLOCK
    rng = random.Random(2)
    # and around the codec's read chunk (a chunk is filled from the pipe before summing)
    for size in (0, 1, cache.BLOCK - 1, cache.BLOCK, cache.BLOCK + 1, 5 * cache.BLOCK + 77,
                 codec.CHUNK - 1, codec.CHUNK, codec.CHUNK + 1, 2 * codec.CHUNK + cache.BLOCK + 5):
        ref = tmp_path / "ref"
        tgt = tmp_path / "tgt"
        ref.write_bytes(rng.randbytes(size + 100))
        tgt.write_bytes(ref.read_bytes()[:size])
        res = codec.encode(ref, tgt, tmp_path / "d")
        delta = tmp_path / "d"
        if res.delta_size is None:  # tiny targets may be refused: make a delta anyway
            subprocess.run(["xdelta3", "-e", "-f", "-s", str(ref), str(tgt), str(delta)],
                           check=True)
        sums = bytearray()
        codec.decode(ref, delta, tmp_path / "out", codec.sha256_file(tgt), sums=sums)
        assert bytes(sums) == cache.block_sums(tmp_path / "out"), size


def _fake_xdelta3(tmp_path: Path, body: str) -> str:
    """A stand-in for ``xdelta3 -d -c ... -s SRC DELTA``: a Python script with ``out``, its
    standard output, and ``payload``, the bytes in ``tmp_path/payload``."""
    script = tmp_path / "fake-xdelta3"
    script.write_text(f"#!{sys.executable}\nimport sys, time\nout = sys.stdout.buffer\n"
                      f"payload = open({str(tmp_path / 'payload')!r}, 'rb').read()\n{body}")
    script.chmod(0o755)
    return str(script)


def test_decode_follows_a_slow_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                      ) -> None:
    """xdelta3's output arrives in pieces of odd sizes with pauses between them: the
    reader fills whole chunks across them, and the digest and the cache's block sums
    come out as for a whole file."""
    from deltafs import cache

    data = random.Random(14).randbytes(2 * codec.CHUNK + 3 * cache.BLOCK + 11)
    write_file(tmp_path / "payload", data)
    monkeypatch.setenv("DELTAFS_XDELTA3", _fake_xdelta3(tmp_path, (
        "for a, b in ((0, 1000), (1000, 300_000), (300_000, 1_500_000), (1_500_000, None)):\n"
        "    out.write(payload[a:b]); out.flush(); time.sleep(0.05)\n")))
    src = write_file(tmp_path / "src", b"s")
    delta = write_file(tmp_path / "delta", b"d")
    sums = bytearray()
    codec.decode(src, delta, tmp_path / "out", sha256_bytes(data), sums=sums)
    assert (tmp_path / "out").read_bytes() == data
    assert bytes(sums) == cache.block_sums(tmp_path / "out")


def test_decode_of_a_stalled_xdelta3_times_out(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    write_file(tmp_path / "payload", b"x" * 5000)
    monkeypatch.setenv("DELTAFS_XDELTA3", _fake_xdelta3(tmp_path, (
        "out.write(payload); out.flush(); time.sleep(60)\n")))
    src = write_file(tmp_path / "src", b"s")
    delta = write_file(tmp_path / "delta", b"d")
    t0 = time.monotonic()
    with pytest.raises(IntegrityError, match="timed out"):
        codec.decode(src, delta, tmp_path / "out", sha256_bytes(b"x" * 5000), timeout=0.5)
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "out").exists()


def test_decode_that_fails_after_writing_the_right_bytes_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The exit status counts even when the bytes hash right."""
    write_file(tmp_path / "payload", b"y" * 5000)
    monkeypatch.setenv("DELTAFS_XDELTA3", _fake_xdelta3(tmp_path, (
        "out.write(payload); out.flush()\n"
        "sys.stderr.write('xdelta3: target window checksum mismatch')\nsys.exit(1)\n")))
    src = write_file(tmp_path / "src", b"s")
    delta = write_file(tmp_path / "delta", b"d")
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        codec.decode(src, delta, tmp_path / "out", sha256_bytes(b"y" * 5000))
    assert not (tmp_path / "out").exists()


def test_decode_sums_are_of_the_attempt_that_passed(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The first attempt (no -D) fails after writing other bytes; the sums handed back are
    the second attempt's, the file's."""
    from deltafs import cache

    data = random.Random(16).randbytes(3 * cache.BLOCK + 5)
    write_file(tmp_path / "payload", data)
    monkeypatch.setenv("DELTAFS_XDELTA3", _fake_xdelta3(tmp_path, (
        "if '-D' not in sys.argv:\n    out.write(b'z' * 400_000); out.flush(); sys.exit(1)\n"
        "out.write(payload)\n")))
    sums = bytearray()
    codec.decode(write_file(tmp_path / "s", b"s"), write_file(tmp_path / "d", b"d"),
                 tmp_path / "out", sha256_bytes(data), sums=sums)
    assert bytes(sums) == cache.block_sums(tmp_path / "out")


def test_decode_onto_a_full_disk_is_a_disk_error(tmp_path: Path) -> None:
    """A decode whose output cannot be written (here: the file size limit, as a full disk
    would) is that OSError, tried once, not a corrupt object; nothing is left behind.
    Run in a child process: the limit is the process's."""
    rng = random.Random(17)
    base = rng.randbytes(2 * MiB)
    target = next_version(base, rng)
    src = write_file(tmp_path / "src", base)
    tgt = write_file(tmp_path / "tgt", target)
    delta = tmp_path / "delta"
    assert codec.encode(src, tgt, delta).delta_size is not None
    script = f"""
import errno, resource, sys
from pathlib import Path
from deltafs import codec
from deltafs.errors import IntegrityError
resource.setrlimit(resource.RLIMIT_FSIZE, ({MiB}, {MiB}))
out = Path({str(tmp_path / "out")!r})
try:
    codec.decode(Path({str(src)!r}), Path({str(delta)!r}), out, {sha256_bytes(target)!r})
except IntegrityError as exc:
    print("integrity", exc)
except OSError as exc:
    print("oserror", exc.errno == errno.EFBIG, out.exists())
else:
    print("passed")
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert res.stdout.strip() == "oserror True False", res.stdout + res.stderr
