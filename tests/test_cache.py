"""The content cache's block sums: every read checks what it serves, with the sums the
entry was made with (XXH3-64 now, CRC-32 in entries of older versions)."""
from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path

import pytest

from deltafs import blocksums
from deltafs.cache import BLOCK, ContentCache, block_sums
from deltafs.errors import IntegrityError


def _entry_path(cache: ContentCache, key: str) -> str:
    handle = cache._cache.get(key, read=True)
    with handle:
        return str(handle.name)


def _put(tmp_path: Path, cache: ContentCache, data: bytes, sums: bytes | None = None) -> str:
    src = tmp_path / f"src-{len(data)}"
    src.write_bytes(data)
    key = hashlib.sha256(data).hexdigest()
    cache.add(key, src, sums=sums)
    return key


def _crc32_sums(data: bytes) -> bytes:
    return b"".join(zlib.crc32(data[i:i + BLOCK]).to_bytes(4, "little")
                    for i in range(0, len(data), BLOCK))


@pytest.mark.parametrize("legacy", [False, True], ids=["xxh3", "crc32"])
def test_a_damaged_block_is_never_served(tmp_path: Path, legacy: bool) -> None:
    cache = ContentCache(tmp_path / "cache")
    data = os.urandom(3 * BLOCK + 1000)
    key = _put(tmp_path, cache, data, _crc32_sums(data) if legacy else None)
    f = cache.open(key, tmp_path)
    assert f is not None
    assert f.width == (4 if legacy else 8)
    assert f.pread(len(data), 0) == data
    assert f.pread(10, 2 * BLOCK + 5) == data[2 * BLOCK + 5:2 * BLOCK + 15]
    fd = os.open(_entry_path(cache, key), os.O_WRONLY)
    try:
        os.pwrite(fd, bytes([data[BLOCK + 7] ^ 1]), BLOCK + 7)  # one bit, in block 1
    finally:
        os.close(fd)
    assert f.pread(BLOCK, 0) == data[:BLOCK]  # the blocks around it still read
    assert f.pread(1000, 3 * BLOCK) == data[3 * BLOCK:]
    with pytest.raises(IntegrityError, match="block 1"):
        f.pread(1, BLOCK + 100)  # any read touching block 1
    with pytest.raises(IntegrityError, match="block 1"):
        f.pread(2 * BLOCK, 0)
    f.close()


def test_new_entries_carry_xxh3_sums_and_old_ones_are_still_used(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path / "cache")
    data = os.urandom(2 * BLOCK + 3)
    assert block_sums_of(tmp_path, data) == b"".join(
        blocksums.block_sum(data[i:i + BLOCK]) for i in range(0, len(data), BLOCK))
    old = _put(tmp_path, cache, data, _crc32_sums(data))
    # a reference taken out for xdelta3 is hashed whole: an old entry passes on its SHA-256
    assert cache.link(old, tmp_path / "linked", verify=True)
    assert (tmp_path / "linked").read_bytes() == data
    assert cache.has(old)


def test_sums_of_neither_width_drop_the_entry(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path / "cache")
    data = os.urandom(2 * BLOCK)
    key = _put(tmp_path, cache, data, b"\0" * 12)  # 6 bytes a block: no known sum
    assert cache.open(key, tmp_path) is None
    assert not cache.has(key)


def block_sums_of(tmp_path: Path, data: bytes) -> bytes:
    p = tmp_path / "for-sums"
    p.write_bytes(data)
    return block_sums(p)


@pytest.mark.parametrize("made_by_an_older_version", [False, True])
def test_each_threads_index_connection_keeps_little_in_memory(
        tmp_path: Path, made_by_an_older_version: bool) -> None:
    """diskcache's defaults (a 32 MiB page cache and a 64 MiB memory map per thread's
    connection) grew the daemon with the number of files cached (issue 11)."""
    import threading

    import diskcache

    from deltafs.cache import INDEX_CACHE_PAGES

    if made_by_an_older_version:
        diskcache.Cache(str(tmp_path / "c")).close()  # the defaults, stored in its index
    cache = ContentCache(tmp_path / "c")
    _put(tmp_path, cache, b"x" * 5000)
    seen: list[tuple[int, int]] = []

    def look() -> None:
        con = cache._cache._con  # this thread's own connection
        seen.append((con.execute("PRAGMA cache_size").fetchone()[0],
                     con.execute("PRAGMA mmap_size").fetchone()[0]))

    t = threading.Thread(target=look)
    t.start()
    t.join()
    look()
    assert seen == [(INDEX_CACHE_PAGES, 0)] * 2


def _sums_whole(data: bytes) -> bytes:
    """Block sums of ``data`` held whole: one sum per BLOCK, as the reader checks them."""
    out = bytearray()
    blocksums.add_sums(out, memoryview(data))
    return bytes(out)


@pytest.mark.parametrize("size", [0, 1, 300, 4095, 4096, 4097, BLOCK - 1, BLOCK, BLOCK + 1,
                                  (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3 * (1 << 20) + 12345])
def test_digest_of_a_file_of_any_size(tmp_path: Path, size: int) -> None:
    """Small files are read with a buffer of their own size (a 1 MiB buffer zeroed per
    small file held the GIL for most of its digest); the digest is the same."""
    from deltafs.cache import digest_file

    data = os.urandom(size)
    p = tmp_path / "f"
    p.write_bytes(data)
    assert digest_file(p) == (hashlib.sha256(data).hexdigest(), _sums_whole(data))


def test_digest_of_a_file_that_grew_after_its_size_was_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The buffer is sized from fstat: a file longer than that is read again in whole
    chunks, never summed in chunks that split a block."""
    from deltafs import cache

    data = os.urandom(BLOCK * 3 + 777)
    p = tmp_path / "f"
    p.write_bytes(data)
    real = os.fstat

    class Small:
        def __init__(self, st: os.stat_result) -> None:
            self.st = st

        def __getattr__(self, name: str) -> object:
            return 100 if name == "st_size" else getattr(self.st, name)

    monkeypatch.setattr(cache.os, "fstat", lambda fd: Small(real(fd)))
    assert cache.digest_file(p) == (hashlib.sha256(data).hexdigest(), _sums_whole(data))
